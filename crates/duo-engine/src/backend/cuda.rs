//! The CUDA backend: duo's own kernels (`duo_cuda`) over bf16 weights and a bf16 hybrid cache
//! on one GPU. The driver, NVRTC and cuBLAS are loaded at run time, so every build has this
//! backend; on a machine without a driver, opening it is a clear error.
//!
//! Checkpoints go straight to the GPU: tensor by tensor, converted to bf16 on the host (a
//! safetensors bf16 matrix is copied as it is; other types are converted or dequantised one
//! tensor at a time) and uploaded block by block, so the host never holds the whole model.

use super::{downcast, kv_plan, plan_bytes, Backend, Logits, PoolOptions, PoolStep, Sequence};
use crate::error::{EngineError, Result};
use crate::method::{KvDtype, ResolvedMethod};
use duo_core::cache_spec::CachePlan;
use duo_core::config::ModelConfig;
use duo_cuda::decode_attention::KvType;
use duo_cuda::dequant::QuantType;
use duo_cuda::model::{GlobalMatrix, GpuConfig, GpuWeights, HostLayer, HostMatrix};
use duo_cuda::paged::{PagedLayout, Ring};
use duo_cuda::pool::{bucket, DecodeRow, KvPool, PagedSeq, PoolConfig, PrefillChunk, RowLogits};
use duo_cuda::Gpu;
use duo_kv::{KvBytes, PrefillMode};
use duo_model::checkpoint::names;
use duo_model::Checkpoint;
use std::any::Any;
use std::sync::Arc;

/// A model on one GPU.
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    weights: Arc<GpuWeights>,
    config: ModelConfig,
    ordinal: usize,
    /// Device memory in use before the weights were loaded (other processes and this
    /// process's context): what `--gpu-memory-utilization` does not charge to duo.
    used_before: usize,
}

/// The GPU's dequantisation of a GGUF type, where it has one.
pub fn gpu_type(ty: candle_core::quantized::GgmlDType) -> Option<QuantType> {
    use candle_core::quantized::GgmlDType as G;
    Some(match ty {
        G::F32 => QuantType::F32,
        G::F16 => QuantType::F16,
        G::BF16 => QuantType::Bf16,
        G::Q8_0 => QuantType::Q8_0,
        G::Q4_0 => QuantType::Q4_0,
        G::Q4_1 => QuantType::Q4_1,
        G::Q4K => QuantType::Q4K,
        G::Q6K => QuantType::Q6K,
        _ => return None,
    })
}

fn supported(config: &ModelConfig) -> Result<()> {
    if config.architecture != duo_core::Architecture::Llama {
        return Err(EngineError::Backend(format!("the CUDA backend runs the Llama architecture (no projection biases); this model is {:?}", config.architecture)));
    }
    Ok(())
}

impl CudaBackend {
    /// Loads a checkpoint onto `gpu` (device `ordinal`).
    pub fn load(gpu: Arc<Gpu>, ordinal: usize, ck: &Checkpoint, config: ModelConfig) -> Result<Self> {
        supported(&config)?;
        let used_before = gpu.memory_used()?.0;
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let cuda_err = |e: duo_model::ModelError| duo_cuda::CudaError::Input(e.to_string());
        // GGUF blocks of the types the GPU dequantises go up as they are; everything else is
        // converted to bf16 on the host, one tensor at a time.
        let get = |name: &str, rows: usize, cols: usize| -> duo_cuda::Result<HostMatrix<'_>> {
            if let Some((ty, bytes)) = ck.gguf_blocks(name, &[rows, cols]).map_err(cuda_err)? {
                if let Some(q) = gpu_type(ty) {
                    return Ok(HostMatrix::Blocks(q, bytes));
                }
            }
            ck.bf16(name, &[rows, cols]).map(HostMatrix::Bf16).map_err(cuda_err)
        };
        let matrix = |which: GlobalMatrix| -> duo_cuda::Result<Option<HostMatrix<'_>>> {
            match which {
                GlobalMatrix::Embed => get(names::EMBED, c.vocab_size, h).map(Some),
                GlobalMatrix::LmHead if c.tie_embeddings => Ok(None),
                GlobalMatrix::LmHead => get(names::LM_HEAD, c.vocab_size, h).map(Some),
            }
        };
        let layer = |l: usize| -> duo_cuda::Result<HostLayer<'_>> {
            let m = |part: &str, out: usize, inp: usize| get(&names::block(l, part), out, inp);
            let vec = |part: &str| ck.f32(&names::block(l, part), &[h]).map_err(cuda_err);
            Ok(HostLayer {
                attn_norm: vec(names::ATTN_NORM)?,
                qkv: vec![m(names::Q, c.n_heads * hd, h)?, m(names::K, c.n_kv_heads * hd, h)?, m(names::V, c.n_kv_heads * hd, h)?],
                o: vec![m(names::O, h, c.n_heads * hd)?],
                ffn_norm: vec(names::FFN_NORM)?,
                gate_up: vec![m(names::GATE, c.intermediate_size, h)?, m(names::UP, c.intermediate_size, h)?],
                down: vec![m(names::DOWN, h, c.intermediate_size)?],
            })
        };
        let weights = GpuWeights::load(&gpu, GpuConfig::from_model(c), ck.f32(names::OUTPUT_NORM, &[h])?, matrix, layer)?;
        Ok(Self { gpu, weights: Arc::new(weights), config, ordinal, used_before })
    }

    /// Seeded random bf16 weights of `config`'s shape, generated on the GPU.
    pub fn random(gpu: Arc<Gpu>, ordinal: usize, config: ModelConfig, seed: u64) -> Result<Self> {
        supported(&config)?;
        let used_before = gpu.memory_used()?.0;
        let weights = GpuWeights::random(&gpu, GpuConfig::from_model(&config), seed)?;
        Ok(Self { gpu, weights: Arc::new(weights), config, ordinal, used_before })
    }

    /// The paged layout of `method`: blocks of `block_tokens`, prefill chunks up to
    /// `max_chunk`, sequences up to `max_tokens`.
    pub fn layout(&self, method: &ResolvedMethod, block_tokens: usize, max_chunk: usize, max_tokens: usize) -> Result<PagedLayout> {
        if method.prefill != PrefillMode::Lambda {
            return Err(EngineError::InvalidParameter { name: "prefill", reason: "the CUDA backend prefills streaming heads with the Λ mask only (--prefill lambda)".into() });
        }
        if method.kv_dtype_streaming.is_some_and(|s| Some(s) != method.kv_dtype) {
            return Err(EngineError::InvalidParameter { name: "kv-dtype-streaming", reason: "the CUDA backend caches every head in one type (--kv-dtype); --kv-dtype-streaming is the CPU backend's".into() });
        }
        let kv = match method.kv_dtype {
            None | Some(KvDtype::Bf16) => KvType::Bf16,
            Some(KvDtype::Fp8) => KvType::Fp8,
            Some(KvDtype::Int8) => KvType::Int8,
            Some(KvDtype::Int4) => KvType::Int4,
            Some(d) => return Err(EngineError::InvalidParameter { name: "kv-dtype", reason: format!("the CUDA backend caches bf16, fp8, int8 or int4, not {d:?}") }),
        };
        Ok(PagedLayout {
            retrieval: (0..self.config.n_layers).map(|l| method.pattern.layer(l).to_vec()).collect(),
            sink: method.window.sink,
            recent: method.window.recent,
            block_tokens,
            max_chunk: max_chunk.max(1),
            max_tokens,
            kv,
        })
    }
}

/// Positions per block of a single sequence's pool.
const SINGLE_BLOCK_TOKENS: usize = 64;

/// A sequence on the GPU (in its own pool, or in a serving pool) and the plan its bytes are
/// counted by.
struct CudaSequence {
    seq: PagedSeq,
    plan: CachePlan,
}

impl Sequence for CudaSequence {
    fn tokens(&self) -> usize {
        self.seq.tokens()
    }
    fn bytes(&self) -> KvBytes {
        plan_bytes(&self.plan, self.seq.tokens())
    }
    fn peak_bytes(&self) -> KvBytes {
        // Streaming heads hold their window at most, retrieval heads grow: bytes never shrink.
        self.bytes()
    }
    fn fork(&self) -> Result<Box<dyn Sequence>> {
        let pool = self.seq.pool();
        // A serving pool's sequence forks inside it; a single sequence into a pool of its own.
        let into = if pool.config().max_seqs > 1 { pool.clone() } else { KvPool::single(pool.gpu().clone(), pool.weights().clone(), pool.layout().clone())? };
        Ok(Box::new(CudaSequence { seq: pool.copy_to(&self.seq, &into)?, plan: self.plan.clone() }))
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl CudaSequence {
    /// Runs `tokens`: one token after a cached prefix is a decode step (a replayed CUDA graph),
    /// more are prefill chunks. Returns the logits asked for.
    fn run(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        let pool = self.seq.pool().clone();
        if tokens.len() == 1 && self.seq.tokens() > 0 && logits != Logits::None {
            return Ok(pool.step(&mut [DecodeRow { seq: &mut self.seq, token: tokens[0] }], None, false)?.decode);
        }
        let chunk = pool.layout().max_chunk;
        let mut out = Vec::new();
        for (i, c) in tokens.chunks(chunk).enumerate() {
            let last = (i + 1) * chunk >= tokens.len();
            let rows = match logits {
                Logits::None => RowLogits::None,
                Logits::Last if last => RowLogits::Last,
                Logits::Last => RowLogits::None,
                Logits::All => RowLogits::All,
            };
            let got = pool.step(&mut [], Some(PrefillChunk { seq: &mut self.seq, tokens: c, logits: rows }), false)?;
            out.extend(got.prefill);
        }
        Ok(out)
    }
}

impl Backend for CudaBackend {
    fn describe(&self) -> String {
        format!("{} (cuda:{})", self.gpu.name(), self.ordinal)
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_element_bytes(&self) -> usize {
        2
    }

    fn new_sequence(&self, method: &ResolvedMethod, max_tokens: usize) -> Result<Box<dyn Sequence>> {
        // One row more than asked: a decode step reads its own token's row.
        let layout = self.layout(method, SINGLE_BLOCK_TOKENS, method.chunk.min(max_tokens), max_tokens + 1)?;
        let pool = KvPool::single(self.gpu.clone(), self.weights.clone(), layout)?;
        Ok(Box::new(CudaSequence { seq: pool.sequence()?, plan: kv_plan(self, method) }))
    }

    fn forward(&self, seq: &mut dyn Sequence, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(EngineError::InvalidParameter { name: "tokens", reason: "an empty chunk".into() });
        }
        downcast::<CudaSequence>(seq, "CUDA")?.run(tokens, logits)
    }

    fn greedy_step(&self, seq: &mut dyn Sequence, token: u32) -> Result<u32> {
        let s = downcast::<CudaSequence>(seq, "CUDA")?;
        let pool = s.seq.pool().clone();
        let out = pool.step(&mut [DecodeRow { seq: &mut s.seq, token }], None, true)?;
        Ok(out.next[0])
    }

    fn decode_batch(&self, tokens: &[u32], seqs: &mut [&mut dyn Sequence]) -> Result<Vec<f32>> {
        if tokens.len() != seqs.len() {
            return Err(EngineError::Backend(format!("{} tokens for {} sequences", tokens.len(), seqs.len())));
        }
        let mut rows = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            rows.push(&mut downcast::<CudaSequence>(&mut **s, "CUDA")?.seq);
        }
        let Some(first) = rows.first().map(|s| s.pool().clone()) else { return Ok(Vec::new()) };
        if rows.iter().all(|s| Arc::ptr_eq(s.pool(), &first)) && bucket(rows.len()) <= first.config().max_rows && rows.len() <= first.config().max_seqs {
            let mut rows: Vec<DecodeRow> = rows.into_iter().zip(tokens).map(|(seq, &token)| DecodeRow { seq, token }).collect();
            return Ok(first.step(&mut rows, None, false)?.decode);
        }
        // Sequences of different pools: one step each.
        let mut out = Vec::new();
        for (seq, &token) in rows.into_iter().zip(tokens) {
            let pool = seq.pool().clone();
            out.extend(pool.step(&mut [DecodeRow { seq, token }], None, false)?.decode);
        }
        Ok(out)
    }

    fn available_memory(&self) -> Option<usize> {
        self.gpu.memory_used().ok().map(|(used, total)| total - used)
    }

    fn memory_in_use(&self) -> Option<usize> {
        self.gpu.memory_used().ok().map(|(used, _)| used)
    }

    fn fill_synthetic(&self, seq: &mut dyn Sequence, tokens: usize, seed: u64) -> Result<()> {
        let s = downcast::<CudaSequence>(seq, "CUDA")?;
        let pool = s.seq.pool().clone();
        Ok(pool.fill_synthetic(&mut s.seq, tokens, seed)?)
    }

    fn decode_floor(&self) -> Result<Option<(usize, f64)>> {
        Ok(Some((self.weights.config.weight_bytes(), self.gpu.copy_bandwidth()?)))
    }

    fn kv_pool(&self, method: &ResolvedMethod, o: &PoolOptions) -> Result<Option<Arc<dyn super::KvPool>>> {
        o.validate()?;
        let chunk = method.chunk.min(o.max_num_batched_tokens);
        let layout = self.layout(method, o.block_size, chunk, self.config.context_length + 1)?;
        // A decode-only step pads its rows to the graph bucket of the running sequences.
        let rows = o.max_num_batched_tokens.max(bucket(o.max_num_seqs)).max(chunk);
        let mut config = PoolConfig { blocks: 0, max_seqs: o.max_num_seqs, max_rows: rows, graphs: true };
        let (used, total) = self.gpu.memory_used()?;
        // vLLM's meaning: this process may use the fraction of the card; less what it holds
        // now (weights; its context is counted with other processes' memory at load), the step
        // buffers and tables, and room for cuBLAS and captured graphs; never more than is free.
        let ours = used.saturating_sub(self.used_before);
        let allowed = (o.gpu_memory_utilization * total as f64) as usize;
        let overhead = KvPool::overhead_bytes(&self.weights, &layout, &config) + (768 << 20);
        let budget = allowed.saturating_sub(ours + overhead).min((total - used).saturating_sub(overhead));
        config.blocks = budget / layout.block_bytes(self.config.head_dim);
        if let Some(n) = o.blocks_override {
            if n * layout.block_bytes(self.config.head_dim) > budget {
                return Err(EngineError::InvalidParameter { name: "num_gpu_blocks_override", reason: format!("{n} blocks need more than the {:.2} GiB the memory fraction leaves", budget as f64 / (1u64 << 30) as f64) });
            }
            config.blocks = n;
        }
        if config.blocks < layout.blocks_for(layout.max_chunk + 1, Ring::Prefill) {
            return Err(EngineError::Backend(format!(
                "--gpu-memory-utilization {} leaves {:.2} GiB for KV blocks on this {:.1} GiB card ({:.2} GiB in use): not one sequence's first chunk fits",
                o.gpu_memory_utilization,
                budget as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64,
                used as f64 / (1u64 << 30) as f64
            )));
        }
        let pool = KvPool::new(self.gpu.clone(), self.weights.clone(), layout, config)?;
        Ok(Some(Arc::new(ServingPool { pool, plan: kv_plan(self, method) })))
    }
}

/// The serving pool as the engine sees it.
struct ServingPool {
    pool: Arc<KvPool>,
    plan: CachePlan,
}

impl super::KvPool for ServingPool {
    fn new_sequence(&self) -> Result<Box<dyn Sequence>> {
        Ok(Box::new(CudaSequence { seq: self.pool.sequence()?, plan: self.plan.clone() }))
    }
    fn blocks_for(&self, tokens: usize) -> usize {
        self.pool.layout().blocks_for(tokens, Ring::Prefill)
    }
    fn blocks_needed(&self, seq: &mut dyn Sequence, more: usize, decode: bool) -> Result<usize> {
        let ring = if decode { Ring::Decode } else { Ring::Prefill };
        Ok(self.pool.blocks_needed(&downcast::<CudaSequence>(seq, "CUDA")?.seq, more, ring))
    }
    fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }
    fn total_blocks(&self) -> usize {
        self.pool.config().blocks
    }
    fn block_bytes(&self) -> usize {
        self.pool.block_bytes()
    }
    fn block_tokens(&self) -> usize {
        self.pool.layout().block_tokens
    }
    fn max_rows(&self) -> usize {
        self.pool.config().max_rows
    }
    fn max_seqs(&self) -> usize {
        self.pool.config().max_seqs
    }
    fn max_chunk(&self) -> usize {
        self.pool.layout().max_chunk
    }
    fn step(&self, decode: &mut [(&mut dyn Sequence, u32)], prefill: Option<(&mut dyn Sequence, &[u32], bool)>) -> Result<PoolStep> {
        let mut rows = Vec::with_capacity(decode.len());
        for (s, token) in decode.iter_mut() {
            rows.push(DecodeRow { seq: &mut downcast::<CudaSequence>(&mut **s, "CUDA")?.seq, token: *token });
        }
        let chunk = match prefill {
            Some((s, tokens, last)) => Some(PrefillChunk { seq: &mut downcast::<CudaSequence>(s, "CUDA")?.seq, tokens, logits: if last { RowLogits::Last } else { RowLogits::None } }),
            None => None,
        };
        let out = self.pool.step(&mut rows, chunk, false)?;
        Ok(PoolStep { decode: out.decode, prefill: out.prefill, steady: out.steady })
    }
}
