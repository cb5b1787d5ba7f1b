//! The CUDA backend: duo's own kernels (`duo_cuda`) over bf16 weights and a bf16 hybrid cache
//! on one GPU. The driver, NVRTC and cuBLAS are loaded at run time, so every build has this
//! backend; on a machine without a driver, opening it is a clear error.
//!
//! Checkpoints go straight to the GPU: tensor by tensor, converted to bf16 on the host (a
//! safetensors bf16 matrix is copied as it is; other types are converted or dequantised one
//! tensor at a time) and uploaded block by block, so the host never holds the whole model.
//!
//! Tensor parallelism (`--tensor-parallel N`): the backend holds one [`Rank`] per GPU, each
//! with its shard of the weights (the KV heads a placement gives it, `duo_cuda::shard`), its
//! own pools and its end of an NCCL communicator. Every operation runs on all ranks at once,
//! one thread each, with the same inputs; the all-reduces inside each forward pass keep
//! them in step, and every rank ends with the same logits: rank 0's are returned. One GPU
//! is the case of one rank.

use super::{downcast, kv_plan, plan_bytes, Backend, Logits, PoolOptions, PoolStep, Sequence};
use crate::error::{EngineError, Result};
use crate::method::{KvDtype, ResolvedMethod};
use duo_core::cache_spec::CachePlan;
use duo_core::config::ModelConfig;
use duo_cuda::decode_attention::KvType;
use duo_cuda::dequant::QuantType;
use duo_cuda::model::{GlobalMatrix, GpuConfig, GpuWeights, HostLayer, HostMatrix, ShardSpec};
use duo_cuda::paged::{PagedLayout, Ring};
use duo_cuda::pool::{bucket, DecodeRow, KvPool, PagedSeq, PoolConfig, PrefillChunk, RowLogits};
use duo_core::placement::Placement;
use duo_cuda::nccl::Link;
use duo_cuda::Gpu;
use duo_kv::{KvBytes, PrefillMode};
use duo_model::checkpoint::names;
use duo_model::Checkpoint;
use std::any::Any;
use std::sync::Arc;

/// One GPU of the backend: the whole model, or one rank's shard of it.
struct Rank {
    gpu: Arc<Gpu>,
    weights: Arc<GpuWeights>,
    /// This GPU's end of the communicator (tensor parallelism only).
    link: Option<Arc<Link>>,
    /// The KV heads (model indices) this rank holds in each layer, in its order.
    heads: Vec<Vec<usize>>,
    /// Device memory in use before the weights were loaded (other processes and this
    /// process's context): what `--gpu-memory-utilization` does not charge to duo.
    used_before: usize,
}

/// A model on one GPU, or split over several (tensor parallelism): all of them driven by
/// this process, or this process's one rank of a group spanning processes.
pub struct CudaBackend {
    /// The ranks this process drives.
    ranks: Vec<Rank>,
    /// Ranks in the whole group (this process's and other processes').
    world: usize,
    /// How the KV heads were placed (tensor parallelism only).
    placement: Option<Placement>,
    config: ModelConfig,
    ordinal: usize,
}

/// `f(rank)` for every rank, on a thread each when there are several (their forward passes
/// wait for each other at every all-reduce); the results in rank order. Under tensor
/// parallelism (`link`: any rank's) one such operation runs at a time. A rank that fails
/// while others are still running after a grace period (they wait for it in a collective)
/// aborts the group's communicators, which ends those waits with errors, and so does a
/// step that failed on some ranks only (they are out of step); the backend refuses to run
/// after either. A failure on every rank alike (a bad input, refused before any GPU work)
/// leaves it usable within one process; across processes this one cannot know how the
/// others fared, so any failure aborts the group (its alarm tells the other processes,
/// [`duo_cuda::rendezvous::Watch`]). What can be checked before a step (room for it) is
/// agreed across processes first ([`Group::all`]), so that it fails everywhere alike.
fn on_ranks<I: Send, T: Send>(link: Option<&Arc<Link>>, items: Vec<I>, f: impl Fn(I) -> duo_cuda::Result<T> + Sync) -> Result<Vec<T>> {
    let Some(link) = link else {
        return items.into_iter().map(|i| f(i).map_err(EngineError::from)).collect();
    };
    let _turn = link.turn();
    if link.aborted() {
        return Err(EngineError::Backend("an earlier error on one GPU left the GPUs out of step; start duo again".into()));
    }
    let n = items.len();
    let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results: Vec<duo_cuda::Result<T>> = std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = items
            .into_iter()
            .map(|item| {
                let finished = finished.clone();
                s.spawn(move || {
                    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(item))).unwrap_or_else(|_| Err(duo_cuda::CudaError::Driver("a GPU's thread panicked".into())));
                    finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if got.is_err() {
                        abort_unless_all_finish(link.clone(), finished, n);
                    }
                    got
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(duo_cuda::CudaError::Driver("a GPU's thread panicked".into())))).collect()
    });
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 && (failed < n || link.world > n) {
        link.abort_all();
    }
    Ok(results.into_iter().collect::<duo_cuda::Result<Vec<T>>>()?)
}

/// After a rank's error: the group's communicators are aborted unless every rank of this
/// process has finished within two seconds (a rank still running is waiting for the
/// failed one in a collective). Watched from a thread of its own, so the failed rank
/// returns at once.
fn abort_unless_all_finish(link: Arc<Link>, finished: Arc<std::sync::atomic::AtomicUsize>, n: usize) {
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if finished.load(std::sync::atomic::Ordering::SeqCst) == n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        link.abort_all();
    });
}

/// Agreement among the processes of a tensor-parallel group spanning processes (one rank
/// each; `local`: the ranks of this process). Every process reaches the same calls in the
/// same order (they run the same command), so each pairs up like the forward passes'
/// collectives: decisions one process would otherwise take alone (does it fit, how many
/// blocks, which token) come out the same everywhere. Within one process, or without a
/// group, each is the identity.
struct Group<'a> {
    link: Option<&'a Arc<Link>>,
    gpu: &'a Arc<duo_cuda::Gpu>,
    local: usize,
}

impl Group<'_> {
    /// The link, where the group spans processes.
    fn across(&self) -> Option<&Arc<Link>> {
        self.link.filter(|l| l.world > self.local)
    }

    /// The smallest `value` over the processes (each gives its own).
    fn min(&self, value: f32) -> Result<f32> {
        let Some(link) = self.across() else { return Ok(value) };
        let _turn = link.turn();
        Ok(link.reduce_on_host(self.gpu, &[value], true)?[0])
    }

    /// The smallest count over the processes: each is rounded down to an f32 first (above
    /// 2^24 an f32 cannot hold every integer, and rounding up would promise blocks or
    /// bytes that are not there).
    fn min_count(&self, value: usize) -> Result<usize> {
        Ok(self.min(f32_at_most(value))? as usize)
    }

    /// Whether `ok` holds on every process.
    fn all(&self, ok: bool) -> Result<bool> {
        let Some(link) = self.across() else { return Ok(ok) };
        let _turn = link.turn();
        Ok(link.all_say(self.gpu, ok)?)
    }

    /// `local` if every process's check passed, else its error, or one saying another rank
    /// refused (so that all return an error together and none starts the operation).
    fn agree(&self, local: Result<()>) -> Result<()> {
        if self.all(local.is_ok())? {
            return local;
        }
        local.and(Err(EngineError::Backend("another rank of the tensor-parallel group refused this operation (its process says why)".into())))
    }

    /// `check` (whether an operation fits on every rank of this process) agreed over the
    /// group before any rank starts it: where there are several ranks, a step that could
    /// not run on one must not start on the others (they would wait for it at the first
    /// all-reduce). One GPU alone finds out by itself and runs no check.
    fn check_all(&self, check: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.local == 1 && self.across().is_none() {
            return Ok(());
        }
        self.agree(check())
    }

    /// Rank 0's `tokens` on every rank: each process samples from its own logits, which
    /// are the same on identical GPUs but need not be bit for bit on others, and a rank that
    /// fed a different token would mix a different sequence into every later all-reduce.
    /// (Token ids below 2^24 are exact as f32.)
    fn tokens(&self, tokens: &[u32]) -> Result<Vec<u32>> {
        let Some(link) = self.across().filter(|_| !tokens.is_empty()) else { return Ok(tokens.to_vec()) };
        let _turn = link.turn();
        let mine: Vec<f32> = tokens.iter().map(|&t| if link.rank == 0 { t as f32 } else { 0.0 }).collect();
        Ok(link.reduce_on_host(self.gpu, &mine, false)?.iter().map(|&t| t as u32).collect())
    }
}

/// The largest f32 not above `value` (exact up to 2^24).
fn f32_at_most(value: usize) -> f32 {
    let f = value as f32;
    if f as f64 > value as f64 { f.next_down() } else { f }
}

/// Rank 0's result (every rank computes the same logits).
fn first<T>(v: Vec<T>) -> T {
    v.into_iter().next().expect("at least one rank")
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
        let weights = Self::upload(&gpu, ck, &config, None)?;
        Ok(Self::one(gpu, weights, config, ordinal, used_before))
    }

    fn one(gpu: Arc<Gpu>, weights: GpuWeights, config: ModelConfig, ordinal: usize, used_before: usize) -> Self {
        let heads = vec![(0..config.n_kv_heads).collect(); config.n_layers];
        Self { ranks: vec![Rank { gpu, weights: Arc::new(weights), link: None, heads, used_before }], world: 1, placement: None, config, ordinal }
    }

    /// The model split over `gpus` (devices 0..n of this process) by `placement`: each GPU
    /// uploads its shard (`upload`, layer by layer, each layer cut as it arrives), one after
    /// the other.
    pub fn parallel(gpus: Vec<Arc<Gpu>>, config: ModelConfig, placement: Placement, upload: impl Fn(&Gpu, &ShardSpec) -> Result<GpuWeights>) -> Result<Self> {
        let ordinals: Vec<usize> = gpus.iter().map(|g| g.ctx.ordinal()).collect();
        let links = Link::all(&ordinals)?;
        Self::ranks(gpus.into_iter().zip(links).collect(), config, placement, upload)
    }

    /// This process's rank `rank` of a group of `world` processes (hosts), on `gpu`: the id
    /// of the group's communicator comes from rank 0 at `rendezvous` (rank 0 makes it and
    /// hands it out), then the rank uploads its shard as [`CudaBackend::parallel`] does.
    /// The rendezvous connections stay open as the group's alarm
    /// ([`duo_cuda::rendezvous::Watch`]): this process aborting its communicator tells the
    /// others, and another process's failure or end aborts this one's, so that no rank
    /// waits for ever in a collective for a peer that is gone.
    pub fn one_rank(gpu: Arc<Gpu>, rank: usize, world: usize, rendezvous: &str, config: ModelConfig, placement: Placement, upload: impl Fn(&Gpu, &ShardSpec) -> Result<GpuWeights>) -> Result<Self> {
        const WAIT: std::time::Duration = std::time::Duration::from_secs(300);
        let (id, peers) = if rank == 0 {
            let id = duo_cuda::nccl::Nccl::load()?.unique_id()?;
            (id, duo_cuda::rendezvous::serve(rendezvous, world, &id, WAIT)?)
        } else {
            let (id, to_rank0) = duo_cuda::rendezvous::fetch(rendezvous, rank, world, WAIT)?;
            (id, vec![(0, to_rank0)])
        };
        // The alarm is watched from before the communicator exists: a peer that fails while
        // the group forms (NCCL's join waits for every rank) ends this process too, since
        // there is no communicator to abort yet.
        let joined: Arc<std::sync::OnceLock<std::sync::Weak<Link>>> = Arc::default();
        let link_of = joined.clone();
        let watch = duo_cuda::rendezvous::Watch::start(peers, move |why| match link_of.get() {
            Some(weak) => {
                eprintln!("duo: tensor-parallel rank {rank}: {why}; aborting this rank's communicator");
                if let Some(link) = weak.upgrade() {
                    link.abort_all();
                }
            }
            None => {
                eprintln!("duo: tensor-parallel rank {rank}: {why} while the group was forming; stopping");
                std::process::exit(1);
            }
        })?;
        // A failure here leaves the others waiting in the join: they are told, not said
        // goodbye to.
        let link = match gpu.bind().and_then(|()| Link::one(id, rank, world)) {
            Ok(link) => link,
            Err(e) => {
                watch.raise();
                return Err(e.into());
            }
        };
        let _ = joined.set(Arc::downgrade(&link));
        // The link owns the watch (and so keeps it as long as the backend lives); the watch
        // holds the link weakly.
        link.on_abort(move || watch.raise());
        // A rank whose upload fails aborts the group (the others would wait for it at their
        // first collective), which also tells them.
        let group = link.clone();
        Self::ranks(vec![(gpu, link)], config, placement, upload).inspect_err(|_| group.abort_all())
    }

    fn ranks(gpus: Vec<(Arc<Gpu>, Arc<Link>)>, config: ModelConfig, placement: Placement, upload: impl Fn(&Gpu, &ShardSpec) -> Result<GpuWeights>) -> Result<Self> {
        supported(&config)?;
        let world = gpus.first().map_or(0, |(_, l)| l.world);
        if placement.gpus() != world {
            return Err(EngineError::Backend(format!("a placement over {} GPUs for {world} GPUs", placement.gpus())));
        }
        let mut ranks = Vec::with_capacity(gpus.len());
        for (gpu, link) in gpus {
            let r = link.rank;
            let used_before = gpu.memory_used()?.0;
            let heads = placement.heads_of(r);
            let weights = upload(&gpu, &ShardSpec { rank: r, world, kv_heads: heads.clone() })?;
            ranks.push(Rank { gpu, weights: Arc::new(weights), link: Some(link), heads, used_before });
        }
        // NCCL sets up its connections and buffers at the first collective: one now, before
        // any pool is sized from the free memory (and a broken link fails here, not mid-request).
        let n = 1 << 20;
        let link = ranks[0].link.clone();
        on_ranks(link.as_ref(), ranks.iter().collect(), |rank| {
            let buf = rank.gpu.zeros::<f32>(n)?;
            let link = rank.link.as_ref().expect("every rank of a parallel backend has a link");
            link.all_reduce_sum_f32(rank.gpu.addr(&buf), n, &rank.gpu.stream)?;
            rank.gpu.sync()
        })?;
        let ordinal = ranks[0].gpu.ctx.ordinal();
        Ok(Self { ranks, world, placement: Some(placement), config, ordinal })
    }

    /// A checkpoint's weights on `gpu`: whole, or cut to `shard` layer by layer.
    pub fn upload(gpu: &Gpu, ck: &Checkpoint, config: &ModelConfig, shard: Option<&ShardSpec>) -> Result<GpuWeights> {
        let c = config;
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
        Ok(GpuWeights::load_shard(gpu, GpuConfig::from_model(c), ck.f32(names::OUTPUT_NORM, &[h])?, matrix, layer, shard)?)
    }

    /// Seeded random bf16 weights of `config`'s shape, generated on the GPU.
    pub fn random(gpu: Arc<Gpu>, ordinal: usize, config: ModelConfig, seed: u64) -> Result<Self> {
        supported(&config)?;
        let used_before = gpu.memory_used()?.0;
        let weights = GpuWeights::random(&gpu, GpuConfig::from_model(&config), seed)?;
        Ok(Self::one(gpu, weights, config, ordinal, used_before))
    }

    /// GPUs the model runs on (in every process of its group).
    pub fn world(&self) -> usize {
        self.world
    }

    /// GPUs this process drives.
    fn local(&self) -> usize {
        self.ranks.len()
    }

    /// The group of processes this backend's ranks belong to.
    fn group(&self) -> Group<'_> {
        Group { link: self.ranks[0].link.as_ref(), gpu: &self.ranks[0].gpu, local: self.local() }
    }

    /// Rank 0's end of the communicator (tensor parallelism only).
    fn link(&self) -> Option<&Arc<Link>> {
        self.ranks[0].link.as_ref()
    }

    /// Rank `r`'s layout: `layout`'s kinds for its own KV heads, in its order.
    fn rank_layout(&self, r: usize, layout: &PagedLayout) -> PagedLayout {
        layout.for_heads(&self.ranks[r].heads)
    }

    /// A one-sequence pool per rank for `layout`.
    fn single_pools(&self, layout: &PagedLayout) -> Result<Vec<Arc<KvPool>>> {
        let mut pools = Vec::with_capacity(self.local());
        for (r, rank) in self.ranks.iter().enumerate() {
            let pool = KvPool::single_linked(rank.gpu.clone(), rank.weights.clone(), self.rank_layout(r, layout), rank.link.clone())?;
            pool.set_host_logits(r == 0);
            pools.push(pool);
        }
        Ok(pools)
    }

    /// The paged layout of `method`: blocks of `block_tokens`, prefill chunks up to
    /// `max_chunk`, sequences up to `max_tokens`.
    pub fn layout(&self, method: &ResolvedMethod, block_tokens: usize, max_chunk: usize, max_tokens: usize) -> Result<PagedLayout> {
        if method.prefill != PrefillMode::Lambda {
            return Err(EngineError::InvalidParameter { name: "prefill", reason: "the CUDA backend prefills streaming heads with the Λ mask only (--prefill lambda)".into() });
        }
        let gpu_type = |d: Option<KvDtype>, name: &'static str| match d {
            None => Ok(KvType::Bf16),
            Some(d) => d.gpu().ok_or_else(|| EngineError::InvalidParameter { name, reason: format!("the CUDA backend caches bf16, fp8, int8, int4 or k8v4, not {d:?}") }),
        };
        let kv = gpu_type(method.kv_dtype, "kv-dtype")?;
        let kv_streaming = match method.kv_dtype_streaming {
            None => kv,
            Some(d) => gpu_type(Some(d), "kv-dtype-streaming")?,
        };
        // Streaming rows of their own type span whole rows of the cache's (crate duo-cuda's
        // `paged`): bf16 windows beside fp8, int8, int4 or k8v4.
        if duo_cuda::paged::window_widths(kv, kv_streaming).is_none() {
            return Err(EngineError::InvalidParameter { name: "kv-dtype-streaming", reason: format!("the CUDA backend keeps streaming heads in the cache's type, or in bf16 beside an fp8, int8, int4 or k8v4 cache, not {kv_streaming:?} beside {kv:?}") });
        }
        Ok(PagedLayout {
            retrieval: (0..self.config.n_layers).map(|l| method.pattern.layer(l).to_vec()).collect(),
            sink: method.window.sink,
            recent: method.window.recent,
            block_tokens,
            max_chunk: max_chunk.max(1),
            max_tokens,
            kv,
            kv_streaming,
        })
    }
}

/// Positions per block of a single sequence's pool.
const SINGLE_BLOCK_TOKENS: usize = 64;

/// A sequence on the GPU (in its own pool, or in a serving pool; one per rank under tensor
/// parallelism, each in its rank's pool) and the plan its bytes are counted by.
struct CudaSequence {
    seqs: Vec<PagedSeq>,
    plan: CachePlan,
}

impl Sequence for CudaSequence {
    fn tokens(&self) -> usize {
        self.seqs[0].tokens()
    }
    fn bytes(&self) -> KvBytes {
        plan_bytes(&self.plan, self.tokens())
    }
    fn peak_bytes(&self) -> KvBytes {
        // Streaming heads hold their window at most, retrieval heads grow: bytes never shrink.
        self.bytes()
    }
    fn fork(&self) -> Result<Box<dyn Sequence>> {
        let mut seqs = Vec::with_capacity(self.seqs.len());
        for seq in &self.seqs {
            let pool = seq.pool();
            // A serving pool's sequence forks inside it; a single sequence into a pool of its own.
            let into = if pool.config().max_seqs > 1 {
                pool.clone()
            } else {
                let own = KvPool::single_linked(pool.gpu().clone(), pool.weights().clone(), pool.layout().clone(), pool.link().cloned())?;
                own.set_host_logits(pool.host_logits());
                own
            };
            seqs.push(pool.copy_to(seq, &into)?);
        }
        Ok(Box::new(CudaSequence { seqs, plan: self.plan.clone() }))
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Runs `tokens` on one rank's sequence: one token after a cached prefix is a decode step (a
/// replayed CUDA graph), more are prefill chunks. Returns the logits asked for.
fn run_rank(seq: &mut PagedSeq, tokens: &[u32], logits: Logits) -> duo_cuda::Result<Vec<f32>> {
    let pool = seq.pool().clone();
    if tokens.len() == 1 && seq.tokens() > 0 && logits != Logits::None {
        return Ok(pool.step(&mut [DecodeRow { seq, token: tokens[0] }], None, false)?.decode);
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
        let got = pool.step(&mut [], Some(PrefillChunk { seq: &mut *seq, tokens: c, logits: rows }), false)?;
        out.extend(got.prefill);
    }
    Ok(out)
}

/// The sequences of `seqs` rank by rank: `[rank][sequence]`.
fn by_rank(seqs: Vec<&mut CudaSequence>, world: usize) -> Vec<Vec<&mut PagedSeq>> {
    let mut out: Vec<Vec<&mut PagedSeq>> = (0..world).map(|_| Vec::with_capacity(seqs.len())).collect();
    for s in seqs {
        for (r, seq) in s.seqs.iter_mut().enumerate() {
            out[r].push(seq);
        }
    }
    out
}

impl Backend for CudaBackend {
    fn describe(&self) -> String {
        let gpu = self.ranks[0].gpu.name();
        match &self.placement {
            None => format!("{gpu} (cuda:{})", self.ordinal),
            Some(p) if self.local() == self.world() => format!("{} x {gpu} (cuda:0-{}, tensor parallel, {} head placement)", self.world(), self.world() - 1, p.strategy()),
            Some(p) => format!("{gpu} (cuda:{}, rank {} of {} processes, tensor parallel, {} head placement)", self.ordinal, self.ranks[0].link.as_ref().map_or(0, |l| l.rank), self.world(), p.strategy()),
        }
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
        let made = self.single_pools(&layout).and_then(|pools| Ok(pools.iter().map(|pool| pool.sequence()).collect::<duo_cuda::Result<Vec<_>>>()?));
        // Across processes, a sequence that fits on one GPU only fits nowhere.
        if !self.group().all(made.is_ok())? {
            return Err(made.err().unwrap_or_else(|| EngineError::Backend("this sequence does not fit on another rank's GPU".into())));
        }
        Ok(Box::new(CudaSequence { seqs: made?, plan: kv_plan(self, method) }))
    }

    fn forward(&self, seq: &mut dyn Sequence, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(EngineError::InvalidParameter { name: "tokens", reason: "an empty chunk".into() });
        }
        let tokens = &self.group().tokens(tokens)?;
        let s = downcast::<CudaSequence>(seq, "CUDA")?;
        Ok(first(on_ranks(self.link(), s.seqs.iter_mut().collect(), |seq| run_rank(seq, tokens, logits))?))
    }

    fn greedy_step(&self, seq: &mut dyn Sequence, token: u32) -> Result<u32> {
        let token = self.group().tokens(&[token])?[0];
        let s = downcast::<CudaSequence>(seq, "CUDA")?;
        let next = on_ranks(self.link(), s.seqs.iter_mut().collect(), |seq| {
            let pool = seq.pool().clone();
            // Ranks that do not read their logits back (in-process ranks past the first) have
            // no token; rank 0's is the one returned.
            Ok(pool.step(&mut [DecodeRow { seq, token }], None, true)?.next.first().copied().unwrap_or(0))
        })?;
        Ok(first(next))
    }

    fn decode_batch(&self, tokens: &[u32], seqs: &mut [&mut dyn Sequence]) -> Result<Vec<f32>> {
        if tokens.len() != seqs.len() {
            return Err(EngineError::Backend(format!("{} tokens for {} sequences", tokens.len(), seqs.len())));
        }
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let group = self.group();
        let tokens = &group.tokens(tokens)?;
        let mut cuda = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            cuda.push(downcast::<CudaSequence>(&mut **s, "CUDA")?);
        }
        let ranks = by_rank(cuda, self.local());
        let shared = ranks.iter().all(|rows| {
            let first = rows[0].pool();
            rows.iter().all(|s| Arc::ptr_eq(s.pool(), first)) && bucket(rows.len()) <= first.config().max_rows && rows.len() <= first.config().max_seqs
        });
        if shared {
            group.check_all(|| ranks.iter().try_for_each(|rows| Ok(rows[0].pool().step_room(&rows.iter().map(|s| &**s).collect::<Vec<_>>(), None)?)))?;
        }
        let out = on_ranks(self.link(), ranks, |rows| {
            if shared {
                let pool = rows[0].pool().clone();
                let mut rows: Vec<DecodeRow> = rows.into_iter().zip(tokens).map(|(seq, &token)| DecodeRow { seq, token }).collect();
                return Ok(pool.step(&mut rows, None, false)?.decode);
            }
            // Sequences of different pools: one step each (in the same order on every rank).
            let mut out = Vec::new();
            for (seq, &token) in rows.into_iter().zip(tokens) {
                let pool = seq.pool().clone();
                out.extend(pool.step(&mut [DecodeRow { seq, token }], None, false)?.decode);
            }
            Ok(out)
        })?;
        Ok(first(out))
    }

    fn available_memory(&self) -> Option<usize> {
        // Each GPU holds its share of a sequence's cache: the fullest GPU's free memory times
        // the GPUs (exact for equal shares; a GPU with a head more holds a little more).
        let free = self.ranks.iter().map(|r| r.gpu.memory_used().ok().map(|(used, total)| total - used)).min().flatten()?;
        // Across processes, the fullest GPU of any.
        let free = self.group().min_count(free).ok()?;
        Some(free * self.world())
    }

    fn memory_in_use(&self) -> Option<usize> {
        self.ranks.iter().map(|r| r.gpu.memory_used().ok().map(|(used, _)| used)).sum()
    }

    fn fill_synthetic(&self, seq: &mut dyn Sequence, tokens: usize, seed: u64) -> Result<()> {
        let s = downcast::<CudaSequence>(seq, "CUDA")?;
        // Every rank's blocks first (in every process): a fill that fits on one GPU only would
        // leave the ranks holding different lengths.
        self.group().check_all(|| s.seqs.iter().try_for_each(|seq| Ok(seq.pool().fill_room(seq, tokens)?)))?;
        for seq in &mut s.seqs {
            let pool = seq.pool().clone();
            pool.fill_synthetic(seq, tokens, seed)?;
        }
        Ok(())
    }

    fn decode_floor(&self) -> Result<Option<(usize, f64)>> {
        // Under tensor parallelism each GPU reads its shard at its own bandwidth, in parallel:
        // one rank's weights (the largest) at `world` times one GPU's bandwidth keeps the KV
        // term (the whole model's, as the bench counts it) divided among the GPUs.
        let weights = self.ranks.iter().map(|r| r.weights.config.weight_bytes()).max().unwrap_or(0);
        let bandwidth = self.ranks[0].gpu.copy_bandwidth()?;
        Ok(Some((weights * self.world(), bandwidth * self.world() as f64)))
    }

    fn product_rate(&self) -> Result<Option<super::ProductRate>> {
        // 8192 x 8192 x 8192 products by cuBLAS (bf16 in, f32 accumulation), in a burst and
        // over two seconds; under tensor parallelism every GPU runs its share at these rates.
        let (burst, sustained) = duo_cuda::time_product_burst_and_sustained(&self.ranks[0].gpu, 2.0)?;
        let rate = |ms: f64| 2.0 * 8192f64.powi(3) / (ms / 1000.0) * self.world() as f64;
        Ok(Some(super::ProductRate { burst: rate(burst), sustained: rate(sustained) }))
    }

    fn kv_pool(&self, method: &ResolvedMethod, o: &PoolOptions) -> Result<Option<Arc<dyn super::KvPool>>> {
        o.validate()?;
        let chunk = method.chunk.min(o.max_num_batched_tokens);
        let layout = self.layout(method, o.block_size, chunk, self.config.context_length + 1)?;
        // A decode-only step pads its rows to the graph bucket of the running sequences.
        let rows = o.max_num_batched_tokens.max(bucket(o.max_num_seqs)).max(chunk);
        let mut config = PoolConfig { blocks: 0, max_seqs: o.max_num_seqs, max_rows: rows, graphs: true };
        // Every rank gets the same number of blocks (its blocks are its own heads' rows of the
        // same positions): the fewest that any GPU's memory fraction leaves.
        let mut blocks = usize::MAX;
        let mut tightest = (0usize, 0usize, 0usize);
        let mut refused: Result<()> = Ok(());
        for (r, rank) in self.ranks.iter().enumerate() {
            let rank_layout = self.rank_layout(r, &layout);
            let (used, total) = rank.gpu.memory_used()?;
            // vLLM's meaning: this process may use the fraction of the card; less what it holds
            // now (weights; its context is counted with other processes' memory at load), the
            // step buffers and tables, and room for cuBLAS and captured graphs; never more than
            // is free.
            let ours = used.saturating_sub(rank.used_before);
            let allowed = (o.gpu_memory_utilization * total as f64) as usize;
            let overhead = KvPool::overhead_bytes(&rank.weights, &rank_layout, &config) + (768 << 20);
            let budget = allowed.saturating_sub(ours + overhead).min((total - used).saturating_sub(overhead));
            let fits = budget / rank_layout.block_bytes(self.config.head_dim).max(1);
            if fits < blocks {
                blocks = fits;
                tightest = (budget, total, used);
            }
            if let Some(n) = o.blocks_override.filter(|n| n * rank_layout.block_bytes(self.config.head_dim) > budget) {
                refused = refused.and(Err(EngineError::InvalidParameter { name: "num_gpu_blocks_override", reason: format!("{n} blocks need more than the {:.2} GiB the memory fraction leaves", budget as f64 / (1u64 << 30) as f64) }));
            }
        }
        // Every process takes part in each agreement below before any of them may fail.
        let group = self.group();
        config.blocks = group.min_count(o.blocks_override.unwrap_or(blocks))?;
        let first_chunk = (0..self.local()).map(|r| self.rank_layout(r, &layout).blocks_for(layout.max_chunk + 1, Ring::Prefill)).max().unwrap_or(0);
        if refused.is_ok() && config.blocks < first_chunk {
            let (budget, total, used) = tightest;
            refused = Err(EngineError::Backend(format!(
                "--gpu-memory-utilization {} leaves {:.2} GiB for KV blocks on this {:.1} GiB card ({:.2} GiB in use): not one sequence's first chunk fits",
                o.gpu_memory_utilization,
                budget as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64,
                used as f64 / (1u64 << 30) as f64
            )));
        }
        group.agree(refused)?;
        let mut pools = Vec::with_capacity(self.local());
        for (r, rank) in self.ranks.iter().enumerate() {
            let pool = KvPool::linked(rank.gpu.clone(), rank.weights.clone(), self.rank_layout(r, &layout), config, rank.link.clone())?;
            // Every rank computes the same logits: the first of this process reads them back.
            pool.set_host_logits(r == 0);
            pools.push(pool);
        }
        Ok(Some(Arc::new(ServingPool { pools, plan: kv_plan(self, method) })))
    }
}

/// The serving pool as the engine sees it: one pool per rank, stepped together.
struct ServingPool {
    pools: Vec<Arc<KvPool>>,
    plan: CachePlan,
}

impl super::KvPool for ServingPool {
    fn new_sequence(&self) -> Result<Box<dyn Sequence>> {
        let seqs = self.pools.iter().map(|p| p.sequence()).collect::<duo_cuda::Result<Vec<_>>>()?;
        Ok(Box::new(CudaSequence { seqs, plan: self.plan.clone() }))
    }
    fn blocks_for(&self, tokens: usize) -> usize {
        self.pools.iter().map(|p| p.layout().blocks_for(tokens, Ring::Prefill)).max().unwrap_or(0)
    }
    fn blocks_needed(&self, seq: &mut dyn Sequence, more: usize, decode: bool) -> Result<usize> {
        let ring = if decode { Ring::Decode } else { Ring::Prefill };
        let s = downcast::<CudaSequence>(seq, "CUDA")?;
        Ok(self.pools.iter().zip(&s.seqs).map(|(p, seq)| p.blocks_needed(seq, more, ring)).max().unwrap_or(0))
    }
    fn free_blocks(&self) -> usize {
        self.pools.iter().map(|p| p.free_blocks()).min().unwrap_or(0)
    }
    fn total_blocks(&self) -> usize {
        self.pools[0].config().blocks
    }
    fn block_bytes(&self) -> usize {
        // A block of positions over every GPU.
        self.pools.iter().map(|p| p.block_bytes()).sum()
    }
    fn block_tokens(&self) -> usize {
        self.pools[0].layout().block_tokens
    }
    fn max_rows(&self) -> usize {
        self.pools[0].config().max_rows
    }
    fn max_seqs(&self) -> usize {
        self.pools[0].config().max_seqs
    }
    fn max_chunk(&self) -> usize {
        self.pools[0].layout().max_chunk
    }
    fn step(&self, decode: &mut [(&mut dyn Sequence, u32)], prefill: Option<(&mut dyn Sequence, &[u32], bool)>) -> Result<PoolStep> {
        let world = self.pools.len();
        let group = Group { link: self.pools[0].link(), gpu: self.pools[0].gpu(), local: world };
        let tokens: Vec<u32> = group.tokens(&decode.iter().map(|(_, t)| *t).collect::<Vec<u32>>())?;
        let mut cuda = Vec::with_capacity(decode.len());
        for (s, _) in decode.iter_mut() {
            cuda.push(downcast::<CudaSequence>(&mut **s, "CUDA")?);
        }
        let by = by_rank(cuda, world);
        let (chunk, last) = match prefill {
            Some((s, tokens, last)) => (Some((&mut downcast::<CudaSequence>(s, "CUDA")?.seqs, tokens)), last),
            None => (None, false),
        };
        let mut chunks: Vec<Option<(&mut PagedSeq, &[u32])>> = match chunk {
            Some((seqs, tokens)) => seqs.iter_mut().map(|s| Some((s, tokens))).collect(),
            None => (0..world).map(|_| None).collect(),
        };
        // The blocks are checked on every rank, in every process, first.
        group.check_all(|| {
            self.pools.iter().zip(&by).zip(&chunks).try_for_each(|((pool, rows), chunk)| Ok(pool.step_room(&rows.iter().map(|s| &**s).collect::<Vec<_>>(), chunk.as_ref().map(|(s, t)| (&**s, t.len())))?))
        })?;
        let work: Vec<_> = self.pools.iter().zip(by).zip(chunks.drain(..)).collect();
        let out = on_ranks(self.pools[0].link(), work, |((pool, rows), chunk)| {
            let mut rows: Vec<DecodeRow> = rows.into_iter().zip(&tokens).map(|(seq, &token)| DecodeRow { seq, token }).collect();
            let chunk = chunk.map(|(seq, tokens)| PrefillChunk { seq, tokens, logits: if last { RowLogits::Last } else { RowLogits::None } });
            pool.step(&mut rows, chunk, false)
        })?;
        let out = first(out);
        Ok(PoolStep { decode: out.decode, prefill: out.prefill, steady: out.steady })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agreed_as_f32_are_never_rounded_up() {
        for v in [0usize, 1, 4095, 1 << 24, (1 << 24) + 1, (1 << 24) + 3, 123_456_789, 141_000_000_000 / 8192, usize::MAX >> 20] {
            let f = f32_at_most(v);
            assert!(f as f64 <= v as f64, "{v} -> {f}");
            // And it is the nearest such f32: the next one up is above v.
            assert!((f.next_up() as f64) > v as f64, "{v} -> {f}");
        }
        assert_eq!(f32_at_most(16_777_217) as usize, 16_777_216);
        assert_eq!(f32_at_most(5_000_000) as usize, 5_000_000);
    }
}
