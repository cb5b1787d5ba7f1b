//! The seam between the engine and the hardware it runs on.
//!
//! Everything above this module (generation, scoring, continuous batching, evaluation,
//! benchmarks) is written once against [`Backend`] and [`Sequence`]; below it, each backend
//! owns its weights and its KV memory:
//!
//! * [`cpu::CpuBackend`]: duo's quantised CPU kernels over an `f32` hybrid cache
//!   (`duo_kv::SequenceKv`);
//! * [`cuda::CudaBackend`]: duo's CUDA kernels over a bf16 hybrid cache on one GPU
//!   (`duo_cuda::model::GpuSequence`).
//!
//! A sequence is an opaque, owned cache ([`Sequence`]); the backend that made it is the only
//! one that runs it (it downcasts and refuses another backend's sequence with an error).
//! Bytes held are always the method's formula at the sequence's length (`CachePlan`, with the
//! backend's element size), so every backend reports memory the same way.

pub mod cpu;
pub mod cuda;

use crate::error::{EngineError, Result};
use crate::method::{KvDtype, ResolvedMethod};
use duo_core::cache_spec::CachePlan;
use duo_core::config::ModelConfig;
use duo_kv::KvBytes;
pub use duo_model::Logits;
use std::any::Any;
use std::sync::Arc;

/// Where a model runs: `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// duo's CPU kernels.
    #[default]
    Cpu,
    /// duo's CUDA backend on GPU `N`.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || EngineError::InvalidParameter { name: "device", reason: format!("`{s}` is not one of cpu, cuda, cuda:N") };
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Device::Cuda).ok_or_else(bad),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// One sequence's KV cache on some backend: owned, movable between threads, copyable.
pub trait Sequence: Send {
    /// Tokens cached (the next token's position).
    fn tokens(&self) -> usize;
    /// Bytes held now, by head kind.
    fn bytes(&self) -> KvBytes;
    /// The most bytes held after any chunk.
    fn peak_bytes(&self) -> KvBytes;
    /// An independent copy holding the same tokens (one prefill, many continuations).
    fn fork(&self) -> Result<Box<dyn Sequence>>;
    /// For the backend that made it.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A backend's measured matrix-product rates in FLOP/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProductRate {
    /// Over a burst of products (milliseconds): the card at its highest clock.
    pub burst: f64,
    /// Over seconds of products back to back: a card that reaches its power limit lowers
    /// its clock, so this is the floor of work that takes seconds (a long prefill).
    pub sustained: f64,
}

/// A model loaded on some hardware: makes sequences and runs tokens through them.
pub trait Backend: Send + Sync {
    /// What runs the model, for people (`cpu (2 threads)`, `NVIDIA H200 (cuda:0)`).
    fn describe(&self) -> String;
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;
    /// Bytes of one cached key or value element (4 for `f32`, 2 for bf16).
    fn kv_element_bytes(&self) -> usize;
    /// An empty sequence for `method`, with room for `max_tokens` tokens.
    fn new_sequence(&self, method: &ResolvedMethod, max_tokens: usize) -> Result<Box<dyn Sequence>>;
    /// Runs `tokens` at positions `seq.tokens()..` (any length: the backend chunks as the
    /// method says), appending them to the cache, and returns the requested logits.
    fn forward(&self, seq: &mut dyn Sequence, tokens: &[u32], logits: Logits) -> Result<Vec<f32>>;
    /// Appends `token` and returns the greedy next token (backends may avoid copying logits).
    fn greedy_step(&self, seq: &mut dyn Sequence, token: u32) -> Result<u32> {
        Ok(crate::sampler::argmax(&self.forward(seq, &[token], Logits::Last)?))
    }
    /// One decode step for several sequences: `tokens[i]` goes to `seqs[i]`; returns the
    /// logits `[n, vocab]`, row `i` equal to what `seqs[i]` alone would give.
    fn decode_batch(&self, tokens: &[u32], seqs: &mut [&mut dyn Sequence]) -> Result<Vec<f32>> {
        if tokens.len() != seqs.len() {
            return Err(EngineError::Backend(format!("{} tokens for {} sequences", tokens.len(), seqs.len())));
        }
        let mut out = Vec::new();
        for (t, s) in tokens.iter().zip(seqs.iter_mut()) {
            out.extend(self.forward(&mut **s, &[*t], Logits::Last)?);
        }
        Ok(out)
    }
    /// Bytes free for new KV caches, where known.
    fn available_memory(&self) -> Option<usize>;
    /// Bytes the process (CPU) or the device (GPU) has in use now, where known.
    fn memory_in_use(&self) -> Option<usize>;
    /// Pretends `tokens` tokens were prefilled (seeded random keys and values): for decode
    /// measurements at lengths whose prefill would take too long. Backends without it say so.
    fn fill_synthetic(&self, _seq: &mut dyn Sequence, _tokens: usize, _seed: u64) -> Result<()> {
        Err(EngineError::Backend(format!("{} cannot fill caches with synthetic tokens", self.describe())))
    }
    /// The bandwidth floor of a decode step: weight bytes read per step and the measured
    /// copy bandwidth (bytes per second), where the backend measures it.
    fn decode_floor(&self) -> Result<Option<(usize, f64)>> {
        Ok(None)
    }
    /// The rates of the backend's matrix products, measured (a large bf16 product by the
    /// library the engine's products use), where the backend measures them (CUDA): a
    /// prefill's compute floor is its FLOPs over these.
    fn product_rate(&self) -> Result<Option<ProductRate>> {
        Ok(None)
    }
    /// One shared KV pool for serving `method`, where the backend pages its caches (CUDA);
    /// `None` where each sequence owns its memory (CPU: the server reserves bytes instead).
    fn kv_pool(&self, _method: &ResolvedMethod, _options: &PoolOptions) -> Result<Option<Arc<dyn KvPool>>> {
        Ok(None)
    }
}

/// How a serving pool is sized (vLLM's names and meanings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolOptions {
    /// Fraction of the device's memory duo may use, weights included.
    pub gpu_memory_utilization: f64,
    /// Sequences that may run at once.
    pub max_num_seqs: usize,
    /// Rows one step may run (decode rows plus a prefill chunk).
    pub max_num_batched_tokens: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Exactly this many blocks instead of what the memory fraction leaves (vLLM's
    /// `--num-gpu-blocks-override`: tests and preemption experiments).
    pub blocks_override: Option<usize>,
}

impl PoolOptions {
    /// Checks every field, naming the flag that sets it.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &'static str, reason: String| Err(EngineError::InvalidParameter { name, reason });
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return bad("gpu-memory-utilization", format!("must be in (0, 1] (got {})", self.gpu_memory_utilization));
        }
        if !duo_cuda::paged::block_tokens_ok(self.block_size) {
            return bad("block-size", format!("must be a power of two from 8 to 1024 (got {})", self.block_size));
        }
        if !(1..=duo_cuda::pool::MAX_SEQS).contains(&self.max_num_seqs) {
            return bad("max-num-seqs", format!("must be from 1 to {} (got {})", duo_cuda::pool::MAX_SEQS, self.max_num_seqs));
        }
        if !(1..=duo_cuda::pool::MAX_ROWS).contains(&self.max_num_batched_tokens) {
            return bad("max-num-batched-tokens", format!("must be from 1 to {} (got {})", duo_cuda::pool::MAX_ROWS, self.max_num_batched_tokens));
        }
        Ok(())
    }
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self { gpu_memory_utilization: 0.9, max_num_seqs: 256, max_num_batched_tokens: 1024, block_size: 64, blocks_override: None }
    }
}

/// What a pool's step returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolStep {
    /// Logits of each decode row, `[rows, vocab]`.
    pub decode: Vec<f32>,
    /// The prefill chunk's logits (its last row, when asked for).
    pub prefill: Vec<f32>,
    /// Whether the step ran as every later step of its shape will (not the first steps of a
    /// new shape, which a backend may run slower while it prepares, e.g. captures a graph).
    /// Only steady steps feed the serving statistics' widest step and full-batch tally, so a
    /// pool whose steps are all alike sets it on every step (`PoolStep::default()` leaves it
    /// false).
    pub steady: bool,
}

/// A pool of KV blocks that many sequences draw from as they grow (vLLM's paged cache), and
/// the batched step that runs them: the serving engine's view of a paging backend.
pub trait KvPool: Send + Sync {
    /// A new, empty sequence in the pool (it takes blocks as it grows).
    fn new_sequence(&self) -> Result<Box<dyn Sequence>>;
    /// Blocks a sequence of `tokens` tokens holds while prefilling (the most it holds).
    fn blocks_for(&self, tokens: usize) -> usize;
    /// Blocks `seq` must take to grow by `more` tokens in a decode row (`decode`) or a
    /// prefill chunk (a decoding sequence may hold less than a prefilling one).
    fn blocks_needed(&self, seq: &mut dyn Sequence, more: usize, decode: bool) -> Result<usize>;
    /// Blocks free now.
    fn free_blocks(&self) -> usize;
    /// Blocks in the pool.
    fn total_blocks(&self) -> usize;
    /// Bytes of one block.
    fn block_bytes(&self) -> usize;
    /// Positions per block.
    fn block_tokens(&self) -> usize;
    /// Rows one step may run.
    fn max_rows(&self) -> usize;
    /// Sequences that may exist at once.
    fn max_seqs(&self) -> usize;
    /// Longest prefill chunk of a step.
    fn max_chunk(&self) -> usize;
    /// One step: token `decode[i].1` appended to sequence `decode[i].0`, and a prefill chunk
    /// of one more sequence (with its last row's logits when `last`). Fails, changing nothing,
    /// when the blocks it needs are not free.
    fn step(&self, decode: &mut [(&mut dyn Sequence, u32)], prefill: Option<(&mut dyn Sequence, &[u32], bool)>) -> Result<PoolStep>;
}

/// The method's cache plan with its element size (the method's `--kv-dtype`, else the
/// backend's own): the one formula for bytes held.
pub fn kv_plan(backend: &dyn Backend, method: &ResolvedMethod) -> CachePlan {
    let bits = method.kv_dtype.map_or(8 * backend.kv_element_bytes(), |d| d.bits());
    let scales = method.kv_dtype.map_or(0, |d| d.scale_bytes());
    let plan = CachePlan::with_bits(&method.pattern, backend.config().head_dim, bits, method.window).with_row_scales(scales);
    with_streaming_dtype(plan, method.kv_dtype, method.kv_dtype_streaming, bits, scales)
}

/// `plan` (a cache of `cache`, `bits` per element and `scales` bytes a row) with its
/// streaming heads in `streaming`. A GPU bf16 window beside a quantised cache spans whole
/// rows of the cache's type in the GPU's pool ([`KvDtype::gpu_window_width`]), scale words
/// included, so a window row counts as that many of them: the bytes it takes, not the 16 bits
/// per element it keeps.
pub fn with_streaming_dtype(plan: CachePlan, cache: Option<KvDtype>, streaming: Option<KvDtype>, bits: usize, scales: usize) -> CachePlan {
    match (streaming, cache.zip(streaming).and_then(|(c, s)| c.gpu_window_width(s))) {
        (Some(_), Some(width)) => plan.with_streaming(width * bits, width * scales),
        (Some(s), None) => plan.with_streaming(s.bits(), s.scale_bytes()),
        (None, _) => plan,
    }
}

/// Bytes held after `tokens` tokens under `plan`, by head kind.
pub fn plan_bytes(plan: &CachePlan, tokens: usize) -> KvBytes {
    KvBytes { retrieval: plan.retrieval_bytes(tokens), streaming: plan.streaming_bytes(tokens) }
}

/// The sequence as the concrete type `T`, or an error naming the backend.
pub(crate) fn downcast<'a, T: 'static>(seq: &'a mut dyn Sequence, backend: &str) -> Result<&'a mut T> {
    seq.as_any_mut().downcast_mut::<T>().ok_or_else(|| EngineError::Backend(format!("this sequence was not made by the {backend} backend")))
}

/// A device opened before any model file is read, so that a missing driver is the first
/// error a user sees.
pub enum OpenedDevice {
    /// The CPU (nothing to open).
    Cpu,
    /// A GPU and its ordinal.
    Cuda(std::sync::Arc<duo_cuda::Gpu>, usize),
}

/// Opens `device`.
pub fn open(device: Device) -> Result<OpenedDevice> {
    Ok(match device {
        Device::Cpu => OpenedDevice::Cpu,
        Device::Cuda(n) => OpenedDevice::Cuda(std::sync::Arc::new(duo_cuda::Gpu::new(n)?), n),
    })
}

/// Loads a checkpoint onto an opened device.
pub fn load(device: OpenedDevice, checkpoint: &duo_model::Checkpoint, config: ModelConfig) -> Result<Box<dyn Backend>> {
    Ok(match device {
        OpenedDevice::Cpu => Box::new(cpu::CpuBackend::new(duo_model::Model::load(checkpoint, config)?)),
        OpenedDevice::Cuda(gpu, n) => Box::new(cuda::CudaBackend::load(gpu, n, checkpoint, config)?),
    })
}

/// A model of `config`'s shape with seeded random weights on `device` (speed and memory
/// only; the CPU stores Q4_1 weights, the GPU bf16).
pub fn random(device: Device, config: ModelConfig, seed: u64) -> Result<Box<dyn Backend>> {
    Ok(match open(device)? {
        OpenedDevice::Cpu => Box::new(cpu::CpuBackend::new(duo_model::Model::random(config, seed)?)),
        OpenedDevice::Cuda(gpu, n) => Box::new(cuda::CudaBackend::random(gpu, n, config, seed)?),
    })
}

/// This process's rank of a tensor-parallel group spanning processes (hosts): where it is,
/// and where rank 0 hands out the group's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRank {
    /// The GPU of this process it runs on.
    pub ordinal: usize,
    /// Its rank.
    pub rank: usize,
    /// Ranks in the group.
    pub world: usize,
    /// `HOST:PORT` where rank 0 listens.
    pub rendezvous: String,
}

/// Where the shards of a model split by tensor parallelism go, opened before any model
/// file is read (too few GPUs, or none, is the first error a user sees).
pub enum Shards {
    /// GPUs 0..N, all driven by this process.
    InProcess(Vec<std::sync::Arc<duo_cuda::Gpu>>),
    /// This process's one rank of a group spanning processes, on its GPU.
    Rank(std::sync::Arc<duo_cuda::Gpu>, ProcessRank),
}

impl Shards {
    /// GPUs 0..n of this process.
    pub fn in_process(n: usize) -> Result<Self> {
        Ok(Shards::InProcess(duo_cuda::runtime::open_gpus(n)?))
    }

    /// This process's rank `at`.
    pub fn rank(at: ProcessRank) -> Result<Self> {
        Ok(Shards::Rank(std::sync::Arc::new(duo_cuda::Gpu::new(at.ordinal)?), at))
    }

    fn backend(self, config: ModelConfig, placement: duo_core::placement::Placement, upload: impl Fn(&duo_cuda::Gpu, &duo_cuda::model::ShardSpec) -> Result<duo_cuda::model::GpuWeights>) -> Result<Box<dyn Backend>> {
        Ok(Box::new(match self {
            Shards::InProcess(gpus) => cuda::CudaBackend::parallel(gpus, config, placement, upload)?,
            Shards::Rank(gpu, at) => cuda::CudaBackend::one_rank(gpu, at.rank, at.world, &at.rendezvous, config, placement, upload)?,
        }))
    }
}

/// A checkpoint split over `shards` by `placement` (tensor parallelism).
pub fn load_split(shards: Shards, placement: duo_core::placement::Placement, checkpoint: &duo_model::Checkpoint, config: ModelConfig) -> Result<Box<dyn Backend>> {
    let c = config.clone();
    shards.backend(config, placement, |gpu, shard| cuda::CudaBackend::upload(gpu, checkpoint, &c, Some(shard)))
}

/// [`random`] split over `shards` by `placement` (tensor parallelism).
pub fn random_split(shards: Shards, placement: duo_core::placement::Placement, config: ModelConfig, seed: u64) -> Result<Box<dyn Backend>> {
    let shape = duo_cuda::model::GpuConfig::from_model(&config);
    shards.backend(config, placement, |gpu, shard| Ok(duo_cuda::model::GpuWeights::random_shard(gpu, shape.clone(), seed, Some(shard))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window row of the GPU's bf16 beside an int4 cache takes four int4 rows' bytes (36
    /// bytes a side at head_dim 64), beside k8v4 four of its rows (keys 68, values 36 bytes);
    /// the CPU's f16 window beside int8 its own 128 bytes a side.
    #[test]
    fn a_gpu_window_counts_the_cache_rows_it_spans() {
        let pattern = duo_core::HeadPattern::from_rows(vec![vec![true, false]]).unwrap();
        let window = duo_core::cache_spec::Window { sink: 4, recent: 12 };
        let plan = |cache: KvDtype, streaming: Option<KvDtype>| {
            let base = CachePlan::with_bits(&pattern, 64, cache.bits(), window).with_row_scales(cache.scale_bytes());
            with_streaming_dtype(base, Some(cache), streaming, cache.bits(), cache.scale_bytes())
        };
        // 16 positions of one streaming head, keys and values.
        assert_eq!(plan(KvDtype::Int4, Some(KvDtype::Bf16)).streaming_bytes(100), 16 * 2 * 4 * 36);
        assert_eq!(plan(KvDtype::K8V4, Some(KvDtype::Bf16)).streaming_bytes(100), 16 * 4 * (68 + 36));
        assert_eq!(plan(KvDtype::Fp8, Some(KvDtype::Bf16)).streaming_bytes(100), 16 * 2 * 2 * 68);
        assert_eq!(plan(KvDtype::Int8, Some(KvDtype::F16)).streaming_bytes(100), 16 * 2 * 128);
        assert_eq!(plan(KvDtype::Int4, None).streaming_bytes(100), 16 * 2 * 36);
        // Retrieval heads keep the cache's rows whatever the window.
        assert_eq!(plan(KvDtype::K8V4, Some(KvDtype::Bf16)).retrieval_bytes(100), plan(KvDtype::K8V4, None).retrieval_bytes(100));
    }

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", "cuda:-1", ""] {
            let e = bad.parse::<Device>().unwrap_err().to_string();
            assert!(e.contains("cpu, cuda, cuda:N"), "{bad}: {e}");
        }
    }
}
