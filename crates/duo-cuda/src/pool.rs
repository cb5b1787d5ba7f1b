//! Many sequences on one GPU: a pool of paged KV blocks ([`crate::paged`]) and the batched
//! step that runs them.
//!
//! A [`KvPool`] owns the cache memory of every sequence it makes ([`PagedSeq`]), the block
//! tables (device memory, one row per slot) and the activation buffers of one step. A step
//! ([`KvPool::step`]) runs, as one forward pass, one decode row for each of several sequences
//! and optionally a prefill chunk of one more: the projections are one product over all rows,
//! the decode attention is one launch per layer over every decode row's blocks, the prefill
//! chunk's attention one more. Blocks are taken as sequences grow and given back when a
//! [`PagedSeq`] is dropped; a step that needs more blocks than are free fails with
//! [`CudaError::PoolFull`] before it changes anything, so the caller can preempt and retry.
//!
//! Decode-only steps are captured as CUDA graphs per batch bucket (rows padded to the bucket
//! with rows of slot -1 that write nothing) and per launch shape, and replayed: every value a
//! step changes (tokens, slots, positions, tables) is in device memory at a fixed address.
//!
//! Invariant: a sequence's rows are computed from its own tokens, blocks and positions only;
//! nothing a kernel does for row `i` reads another row.

use crate::decode_attention::{splits_for, tensor_blocks, DecodeKernel, KvType, Splits, MIN_SPLIT};
use crate::model::{GpuConfig, GpuWeights};
use crate::paged::{Allocator, PagedLayout, Ring, Tables};
use crate::prefill_attention::HeadEntry;
use crate::runtime::{driver, DecodeLaunch, GemvInput, GemvOutput, Gpu, StepGemv, StepGraph, StreamingKernel};
use crate::{CudaError, Result};
use cudarc::driver::{sys as drv, CudaSlice};
use std::sync::{Arc, Mutex};

/// How big a pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// KV blocks.
    pub blocks: usize,
    /// Sequences that may exist at once (slots of the block tables).
    pub max_seqs: usize,
    /// Rows one step may run: decode rows plus a prefill chunk.
    pub max_rows: usize,
    /// Capture decode-only steps as CUDA graphs.
    pub graphs: bool,
}

/// Which logits a prefill chunk returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLogits {
    /// None (a chunk before the last).
    None,
    /// The last row's.
    Last,
    /// Every row's (scoring).
    All,
}

/// One decode row of a step: `token` appended to `seq`.
pub struct DecodeRow<'a> {
    /// The sequence.
    pub seq: &'a mut PagedSeq,
    /// Its next token.
    pub token: u32,
}

/// The prefill chunk of a step.
pub struct PrefillChunk<'a> {
    /// The sequence.
    pub seq: &'a mut PagedSeq,
    /// Tokens at positions `seq.tokens()..`.
    pub tokens: &'a [u32],
    /// Which logits to return.
    pub logits: RowLogits,
}

/// What a step returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOut {
    /// Logits of each decode row, `[rows, vocab]` (empty when the step was greedy).
    pub decode: Vec<f32>,
    /// The greedy next token of each decode row (greedy steps only).
    pub next: Vec<u32>,
    /// The prefill chunk's logits as asked.
    pub prefill: Vec<f32>,
    /// Whether the step ran as every later step of its shape will: a replayed CUDA graph, or
    /// launch by launch where this shape is never captured (prefill chunks, graphs off).
    /// False for the first steps of a new decode shape (the one that runs launch by launch
    /// before its capture, and the capture's): their times say little about a steady load.
    pub steady: bool,
}

/// Rows whose logits one LM-head product computes when a chunk's every row is asked for.
const ROW_BLOCK: usize = 256;

/// (row, split) pairs the partial buffers hold: splits are lengthened until a step fits.
const PART_PAIRS: usize = 16_384;

/// Most sequences one pool holds: a decode step's rows must fit the partial buffers.
pub const MAX_SEQS: usize = PART_PAIRS;

/// Most rows one step may run (decode rows and a prefill chunk): far beyond what a step's
/// buffers on any card allow, so a larger request is a mistake, not a configuration.
pub const MAX_ROWS: usize = 1 << 20;

/// Keys a warp of the CUDA-core decode kernel reads at once, where the head size allows (heads
/// the tensor-core kernel does not take).
const DECODE_KEYS_PER_WARP: usize = 2;

/// Keys per decode split in a pool shared by several sequences. One constant for every row
/// and every batch, so that a row's partial sums, and so its logits, do not depend on what
/// else runs in the step (a split that followed the batch, as `batch_split` does, reorders
/// the sums). 2,048 was the best or within 5% of the best constant from 512 to 8,192 for
/// the tensor-core kernel on the H200 at 25 x 16K and 64 x 4K rows, and 1.4-1.7x faster than
/// 512 for one long row (BENCHMARKS.md, issue 16). A pool of one sequence has nothing to be
/// independent of and takes `splits_for`'s splits.
pub const DECODE_SPLIT: usize = 2048;

/// Graphs kept at once (each holds its launches' parameters; old ones are dropped).
const MAX_GRAPHS: usize = 24;

/// Whether [`Gpu::gemv_fused`] takes every decode step a pool of `pool` can make for a
/// model of `c` (at most `bucket(max_seqs)` decode rows: its normalised hidden rows and its
/// attention-output and MLP rows), so that the pool can take it for all of them.
fn pool_takes_gemv(c: &GpuConfig, pool: &PoolConfig) -> bool {
    let most = bucket(pool.max_seqs);
    let normed = GemvInput::Normed { x: 0, norm: 0, eps: 0.0 };
    Gpu::gemv_takes(most, c.hidden, normed) && [c.n_heads * c.head_dim, c.ffn].iter().all(|&k| Gpu::gemv_takes(most, k, GemvInput::Bf16(0)))
}

/// The padded row count of a decode-only step with `b` rows (the graph bucket).
pub fn bucket(b: usize) -> usize {
    match b {
        0..=8 => b.max(1).next_power_of_two(),
        _ => b.div_ceil(16) * 16,
    }
}

struct Buffers {
    meta: CudaSlice<i32>,
    x: CudaSlice<f32>,
    xn: CudaSlice<u16>,
    qkv: CudaSlice<u16>,
    q: CudaSlice<f32>,
    att: CudaSlice<u16>,
    gu: CudaSlice<u16>,
    act: CudaSlice<u16>,
    logits: CudaSlice<f32>,
    next: CudaSlice<i32>,
    part_m: CudaSlice<f32>,
    part_l: CudaSlice<f32>,
    part_acc: CudaSlice<f32>,
    patches: CudaSlice<i32>,
    /// Ring rows on their way between two ring sizes: `[streaming head][k, v][recent][d]`.
    scratch: CudaSlice<u16>,
}

/// Logit rows a step computes at once: every decode row (a decode-only step's padded to
/// its bucket) and a chunk's last row, or a block of a chunk's rows.
fn logit_rows(c: &PoolConfig) -> usize {
    bucket(c.max_seqs)
        .max(c.max_seqs + 1)
        .max(ROW_BLOCK.min(c.max_rows))
}

impl Buffers {
    fn new(gpu: &Gpu, w: &GpuWeights, c: &PoolConfig, layout: &PagedLayout) -> Result<Self> {
        let g = &w.config;
        let r = c.max_rows;
        let qd = g.n_heads * g.head_dim;
        Ok(Self {
            meta: gpu.zeros(3 * r + 4)?,
            x: gpu.zeros(r * g.hidden)?,
            xn: gpu.zeros(r * g.hidden)?,
            qkv: gpu.zeros(r * g.qkv_dim())?,
            q: gpu.zeros(r * qd)?,
            att: gpu.zeros(r * qd)?,
            gu: gpu.zeros(r * 2 * g.ffn)?,
            act: gpu.zeros(r * g.ffn)?,
            logits: gpu.zeros(logit_rows(c) * g.vocab)?,
            next: gpu.zeros(logit_rows(c))?,
            part_m: gpu.zeros(PART_PAIRS * g.n_heads)?,
            part_l: gpu.zeros(PART_PAIRS * g.n_heads)?,
            part_acc: gpu.zeros(PART_PAIRS * g.n_heads * g.head_dim)?,
            patches: gpu.zeros(2 * 1024)?,
            scratch: gpu.zeros(Self::scratch_elems(w, layout))?,
        })
    }

    /// 16-bit words of the ring scratch: streaming rows (each as wide as a key row, the
    /// wider), then (a quantised cache) a scale of two words per row.
    fn scratch_elems(w: &GpuWeights, layout: &PagedLayout) -> usize {
        let kv = layout.kv_streaming;
        let row_words = kv.key_bytes_for(w.config.head_dim) / 2 + kv.scale_bytes() / 2;
        layout.n_streaming() * 2 * layout.recent * row_words
    }

    /// Bytes of a pool's step buffers (for sizing the pool before allocating it).
    fn bytes(w: &GpuWeights, c: &PoolConfig, layout: &PagedLayout) -> usize {
        let g = &w.config;
        let (r, qd) = (c.max_rows, g.n_heads * g.head_dim);
        4 * (3 * r + 4)
            + r * (4 * g.hidden
                + 2 * g.hidden
                + 2 * g.qkv_dim()
                + 4 * qd
                + 2 * qd
                + 4 * g.ffn
                + 2 * g.ffn)
            + logit_rows(c) * (4 * g.vocab + 4)
            + PART_PAIRS * g.n_heads * (8 + 4 * g.head_dim)
            + PART_PAIRS * g.n_kv_heads * 4
            + 8 * 1024
            + 2 * Self::scratch_elems(w, layout)
    }
}

/// Launch shapes that key a captured graph: padded rows, the rows' length bucket and each
/// layer's decode launch. The bucket is in the key although the launches follow from it:
/// under tensor parallelism a rank whose heads all stream has launches that stop changing
/// with the length, and every rank must capture and replay at the same steps (its NCCL
/// calls are in the graph), so keys change on all ranks together.
type GraphKey = (usize, usize, Vec<DecodeLaunch>);

struct State {
    alloc: Allocator,
    b: Buffers,
    graphs: Vec<(GraphKey, StepGraph)>,
    pending: Option<GraphKey>,
    /// Keys whose capture failed: their steps run launch by launch.
    uncapturable: Vec<GraphKey>,
    graph_steps: u64,
}

/// A pool of KV blocks with the sequences it holds and the buffers of one step.
pub struct KvPool {
    gpu: Arc<Gpu>,
    w: Arc<GpuWeights>,
    layout: PagedLayout,
    config: PoolConfig,
    /// Keys and values of every block (bf16 or e4m3 bytes, per the layout).
    keys: CudaSlice<u8>,
    values: CudaSlice<u8>,
    /// Row scales of an fp8 cache (one `f32` per pool row), else one unused value.
    key_scales: CudaSlice<f32>,
    value_scales: CudaSlice<f32>,
    tables: CudaSlice<i32>,
    heads: Vec<CudaSlice<i32>>,
    /// Where the kinds keep different types ([`PagedLayout::split_types`]): each layer's
    /// tables for the retrieval heads' launches and the streaming heads' (the other kind
    /// [`HeadEntry::SKIP`]); else empty.
    kind_heads: Vec<(CudaSlice<i32>, CudaSlice<i32>)>,
    state: Mutex<State>,
    /// Under tensor parallelism, this GPU's end of the communicator: the weights are this
    /// rank's shard, and the two products of each layer that end in a partial sum (output
    /// projection, down projection) are summed over the ranks in place. Rank 0 alone adds
    /// the residual.
    link: Option<Arc<crate::nccl::Link>>,
    /// Whether steps copy logits (or greedy tokens) back to the host: off for the ranks of
    /// a tensor-parallel process past its first, whose logits equal the first's (a chunk's
    /// every row of a large vocabulary is gigabytes).
    host_logits: std::sync::atomic::AtomicBool,
    /// Under tensor parallelism within one process with `DUO_TP_OVERLAP=1`: a second stream for the prefill's
    /// all-reduces, so that one half of a chunk's sum crosses NVLink while the other half
    /// computes ([`KvPool::prefill_layers_overlapped`]). A measurement knob until measured.
    comm: Option<Arc<cudarc::driver::CudaStream>>,
}

/// One sequence in a pool: its slot, its blocks, its length. Dropping it returns its blocks.
pub struct PagedSeq {
    pool: Arc<KvPool>,
    slot: u32,
    tables: Tables,
    tokens: usize,
}

impl PagedSeq {
    /// Tokens cached.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Blocks held.
    pub fn blocks(&self) -> usize {
        self.tables.retrieval.len() + self.tables.streaming.len()
    }

    /// The pool it lives in.
    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }
}

impl Drop for PagedSeq {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        st.alloc.give(&self.tables.retrieval);
        st.alloc.give(&self.tables.streaming);
        st.alloc.give_slot(self.slot);
    }
}

impl KvPool {
    /// Bytes a pool of `config` takes besides its blocks (tables and step buffers).
    pub fn overhead_bytes(w: &GpuWeights, layout: &PagedLayout, config: &PoolConfig) -> usize {
        Buffers::bytes(w, config, layout) + 4 * config.max_seqs * layout.table_stride()
    }

    /// Allocates a pool: `config.blocks` blocks of `layout`, tables for `config.max_seqs`
    /// sequences, buffers for `config.max_rows` rows.
    pub fn new(
        gpu: Arc<Gpu>,
        w: Arc<GpuWeights>,
        layout: PagedLayout,
        config: PoolConfig,
    ) -> Result<Arc<Self>> {
        Self::linked(gpu, w, layout, config, None)
    }

    /// [`KvPool::new`] for one rank under tensor parallelism: `w` is the rank's shard
    /// ([`GpuWeights::random_shard`], [`GpuWeights::load_shard`]), `layout` its KV heads' kinds, `link` its end of the
    /// communicator. Every rank's pool must run the same steps in the same order (each on
    /// its own thread): each step's forward pass waits for the others at every layer.
    pub fn linked(
        gpu: Arc<Gpu>,
        w: Arc<GpuWeights>,
        layout: PagedLayout,
        config: PoolConfig,
        link: Option<Arc<crate::nccl::Link>>,
    ) -> Result<Arc<Self>> {
        let c = &w.config;
        layout.validate(c.n_layers, c.n_kv_heads)?;
        if config.max_seqs == 0 || config.max_rows == 0 {
            return Err(CudaError::Input(
                "a pool needs at least one sequence and one row".into(),
            ));
        }
        if config.max_seqs > MAX_SEQS
            || bucket(config.max_seqs) > PART_PAIRS
            || config.max_rows > MAX_ROWS
        {
            return Err(CudaError::Input(format!(
                "{} sequences exceed the {PART_PAIRS} decode rows the partial buffers hold",
                config.max_seqs
            )));
        }
        if layout.max_chunk > config.max_rows {
            return Err(CudaError::Input(format!(
                "prefill chunks of {} tokens exceed the {} rows of a step",
                layout.max_chunk, config.max_rows
            )));
        }
        if layout.kv == KvType::F32
            || (layout.kv.is_quantised()
                && !DecodeKernel::Tensor.fits(c.head_dim, c.n_heads / c.n_kv_heads, layout.kv))
        {
            return Err(CudaError::Input(format!(
                "a {:?} KV cache is not supported here: pools cache bf16, or fp8, int8, int4 and K8V4 for heads of 64 or 128 dims with at most 16 query heads per KV head (these: {} dims, {})",
                layout.kv,
                c.head_dim,
                c.n_heads / c.n_kv_heads
            )));
        }
        let elems = config.blocks * layout.block_elems(c.head_dim);
        let keys = gpu.zeros::<u8>(layout.kv.key_bytes_for(elems))?;
        let values = gpu.zeros::<u8>(layout.kv.value_bytes_for(elems))?;
        let scale_rows = if layout.kv.is_quantised() {
            config.blocks * layout.block_rows()
        } else {
            1
        };
        let (key_scales, value_scales) =
            (gpu.zeros::<f32>(scale_rows)?, gpu.zeros::<f32>(scale_rows)?);
        let tables = gpu.zeros::<i32>(config.max_seqs * layout.table_stride())?;
        let heads = (0..c.n_layers)
            .map(|l| gpu.upload(&HeadEntry::table(&layout.heads(l))))
            .collect::<Result<Vec<_>>>()?;
        let kind_heads = if layout.split_types() {
            (0..c.n_layers)
                .map(|l| Ok((gpu.upload(&HeadEntry::table(&layout.heads_of_kind(l, true)))?, gpu.upload(&HeadEntry::table(&layout.heads_of_kind(l, false)))?)))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        // Every layer's decode launch can be made (a layer with both kinds in two types needs
        // the listed form): checked once here, so that no step fails on it later.
        if layout.split_types() {
            decode_shapes(c, &layout, &config, layout.max_tokens, bucket(config.max_seqs))?;
        }
        let b = Buffers::new(&gpu, &w, &config, &layout)?;
        gpu.sync()?;
        let state = State {
            alloc: Allocator::new(config.blocks, config.max_seqs),
            b,
            graphs: Vec::new(),
            pending: None,
            uncapturable: Vec::new(),
            graph_steps: 0,
        };
        // Only where every rank is in this process (they share its environment, so all take
        // the same path); across processes each would read its own, and ranks sending
        // differently cut sums would hang NCCL.
        let comm = match &link {
            Some(l) if l.in_one_process() && crate::decode_attention::tuning("DUO_TP_OVERLAP") == Some(1) => {
                // The highest priority, so that the sums' kernels get multiprocessors while
                // the other half's products hold them.
                gpu.ctx.bind_to_thread().map_err(driver)?;
                let (_, highest) = cudarc::driver::result::stream::get_priority_range().map_err(driver)?;
                Some(gpu.ctx.new_stream_with_priority(highest).map_err(driver)?)
            }
            _ => None,
        };
        Ok(Arc::new(Self {
            gpu,
            w,
            layout,
            config,
            keys,
            values,
            key_scales,
            value_scales,
            tables,
            heads,
            kind_heads,
            state: Mutex::new(state),
            comm,
            link,
            host_logits: std::sync::atomic::AtomicBool::new(true),
        }))
    }

    /// Whether steps return logits (and greedy tokens) to the host; see
    /// [`KvPool::host_logits`]. Without them a step returns empty ones (its forward pass,
    /// collectives included, is unchanged).
    pub fn set_host_logits(&self, on: bool) {
        self.host_logits.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether steps return logits to the host (the default).
    pub fn host_logits(&self) -> bool {
        self.host_logits.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// This pool's end of the tensor-parallel communicator, if it is one rank of several.
    pub fn link(&self) -> Option<&Arc<crate::nccl::Link>> {
        self.link.as_ref()
    }

    /// The kernels' view of this pool (with its row scales where the cache is fp8).
    fn paged(&self) -> crate::paged::PagedArgs {
        let g = &*self.gpu;
        let args = self.layout.paged_args(g.addr(&self.tables));
        if self.layout.kv.is_quantised() {
            args.with_scales(g.addr(&self.key_scales), g.addr(&self.value_scales))
        } else {
            args
        }
    }

    /// The streaming heads' view of this pool: [`KvPool::paged`] where both kinds share a type.
    fn paged_streaming(&self) -> crate::paged::PagedArgs {
        self.layout.streaming_args(self.paged())
    }

    /// A pool for one sequence of up to `layout.max_tokens` tokens (and its forks made
    /// elsewhere): exactly the blocks that length needs.
    pub fn single(gpu: Arc<Gpu>, w: Arc<GpuWeights>, layout: PagedLayout) -> Result<Arc<Self>> {
        Self::single_linked(gpu, w, layout, None)
    }

    /// [`KvPool::single`] for one rank under tensor parallelism (see [`KvPool::linked`]).
    pub fn single_linked(gpu: Arc<Gpu>, w: Arc<GpuWeights>, layout: PagedLayout, link: Option<Arc<crate::nccl::Link>>) -> Result<Arc<Self>> {
        let config = PoolConfig {
            blocks: layout.blocks_for(layout.max_tokens, Ring::Prefill),
            max_seqs: 1,
            max_rows: layout.max_chunk,
            graphs: true,
        };
        Self::linked(gpu, w, layout, config, link)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The layout.
    pub fn layout(&self) -> &PagedLayout {
        &self.layout
    }

    /// The size.
    pub fn config(&self) -> PoolConfig {
        self.config
    }

    /// Blocks free now.
    pub fn free_blocks(&self) -> usize {
        self.lock().alloc.free_blocks()
    }

    /// The GPU.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The weights.
    pub fn weights(&self) -> &Arc<GpuWeights> {
        &self.w
    }

    /// The model's vocabulary.
    pub fn vocab(&self) -> usize {
        self.w.config.vocab
    }

    /// Bytes of one block (keys and values).
    pub fn block_bytes(&self) -> usize {
        self.layout.block_bytes(self.w.config.head_dim)
    }

    /// Decode steps replayed from a captured graph so far.
    pub fn graph_steps(&self) -> u64 {
        self.lock().graph_steps
    }

    /// A new, empty sequence (its blocks are taken by the steps that grow it).
    pub fn sequence(self: &Arc<Self>) -> Result<PagedSeq> {
        let slot = self.lock().alloc.take_slot().ok_or_else(|| {
            CudaError::Input(format!(
                "all {} sequence slots of the pool are in use",
                self.config.max_seqs
            ))
        })?;
        Ok(PagedSeq {
            pool: self.clone(),
            slot,
            tables: Tables::default(),
            tokens: 0,
        })
    }

    /// Blocks `seq` must take to hold `more` more tokens with rings sized for `ring`.
    pub fn blocks_needed(&self, seq: &PagedSeq, more: usize, ring: Ring) -> usize {
        self.layout
            .blocks_for(seq.tokens + more, ring)
            .saturating_sub(seq.blocks())
    }

    /// Blocks `seq` gives back when its rings shrink to `ring`'s size.
    fn blocks_freed(&self, seq: &PagedSeq, ring: Ring) -> usize {
        if seq.tables.cap == 0 {
            0
        } else {
            seq.tables
                .streaming
                .len()
                .saturating_sub(self.layout.streaming_blocks(ring))
        }
    }

    /// The ring size `seq` uses now (`None` before its first step).
    fn ring_of(&self, seq: &PagedSeq) -> Option<Ring> {
        match seq.tables.cap {
            0 => None,
            c if c == self.layout.ring_rows(Ring::Decode) => Some(Ring::Decode),
            _ => Some(Ring::Prefill),
        }
    }

    fn owns(&self, seq: &PagedSeq) -> Result<()> {
        if std::ptr::eq(Arc::as_ptr(&seq.pool), self) {
            Ok(())
        } else {
            Err(CudaError::Input(
                "this sequence belongs to another pool".into(),
            ))
        }
    }

    /// Gives each `(sequence, new tokens, ring)` the blocks it needs, all or none: first
    /// resizes rings (shrinking ones give their tail blocks back, growing ones take more; the
    /// last `recent` positions move), then takes retrieval blocks; writes every table change.
    /// Whether one step of `decode` rows and a `prefill` chunk of that many tokens has the
    /// blocks it needs ([`CudaError::PoolFull`] if not): the check [`KvPool::step`] makes
    /// before it changes anything, for callers that run one step on several pools (tensor
    /// parallelism) and must know on every pool before any starts.
    pub fn step_room(&self, decode: &[&PagedSeq], prefill: Option<(&PagedSeq, usize)>) -> Result<()> {
        let grows = decode.iter().map(|&s| (s, 1, Ring::Decode)).chain(prefill.map(|(s, n)| (s, n, Ring::Prefill)));
        let free = self.lock().alloc.free_blocks();
        self.room(free, grows).map(|_| ())
    }

    /// [`KvPool::step_room`] for [`KvPool::fill_synthetic`] of `n` tokens.
    pub fn fill_room(&self, seq: &PagedSeq, n: usize) -> Result<()> {
        let free = self.lock().alloc.free_blocks();
        self.room(free, std::iter::once((seq, n, Ring::Decode))).map(|_| ())
    }

    /// The blocks `grows` need, or [`CudaError::PoolFull`] where those `free` and those
    /// their rings give back do not cover them.
    fn room<'s>(&self, free: usize, grows: impl Iterator<Item = (&'s PagedSeq, usize, Ring)> + Clone) -> Result<usize> {
        let needed: usize = grows.clone().map(|(s, more, ring)| self.blocks_needed(s, more, ring)).sum();
        let freed: usize = grows.map(|(s, _, ring)| self.blocks_freed(s, ring)).sum();
        if needed > free + freed {
            return Err(CudaError::PoolFull {
                needed: needed - freed.min(needed),
                free,
            });
        }
        Ok(needed)
    }

    fn grow(&self, st: &mut State, grows: &mut [(&mut PagedSeq, usize, Ring)]) -> Result<()> {
        let needed = self.room(st.alloc.free_blocks(), grows.iter().map(|(s, more, ring)| (&**s, *more, *ring)))?;
        // Shrinking rings first: the blocks they free may serve the others.
        for want in [Ring::Decode, Ring::Prefill] {
            for (s, _, ring) in grows.iter_mut() {
                if *ring == want {
                    self.resize_rings(st, s, want)?;
                }
            }
        }
        let stride = self.layout.table_stride();
        let mut pairs = Vec::new();
        for (s, more, _) in grows.iter_mut() {
            let row = s.slot as usize * stride;
            let want = self.layout.retrieval_blocks(s.tokens + *more);
            if want > s.tables.retrieval.len() {
                let got = st
                    .alloc
                    .take(want - s.tables.retrieval.len())
                    .ok_or(CudaError::PoolFull { needed, free: 0 })?;
                for b in got {
                    pairs.extend([(row + s.tables.retrieval.len()) as i32, b as i32]);
                    s.tables.retrieval.push(b);
                }
            }
        }
        self.write_tables(&mut st.b, &pairs)
    }

    /// Gives `s` rings of `ring`'s size: takes or returns the tail blocks of its streaming
    /// region and moves its last `recent` positions from the old ring to the new one.
    fn resize_rings(&self, st: &mut State, s: &mut PagedSeq, ring: Ring) -> Result<()> {
        let cap = self.layout.ring_rows(ring);
        if s.tables.cap == cap {
            return Ok(());
        }
        let (g, l) = (&*self.gpu, &self.layout);
        let row = s.slot as usize * l.table_stride();
        let paged = self.paged_streaming();
        let row_bytes = (l.kv_streaming.key_bytes_for(self.w.config.head_dim), l.kv_streaming.value_bytes_for(self.w.config.head_dim));
        let first = l.sink.max(s.tokens.saturating_sub(l.recent));
        let count = s.tokens.saturating_sub(first);
        let (kc, vc, scratch) = (
            g.addr(&self.keys),
            g.addr(&self.values),
            g.addr(&st.b.scratch),
        );
        let moving = s.tables.cap != 0 && count > 0;
        if moving {
            g.ring_move(
                kc,
                vc,
                scratch,
                paged,
                l.n_streaming(),
                s.slot as usize,
                s.tables.cap,
                l.sink,
                first,
                count,
                row_bytes,
                true,
            )?;
        }
        let want = l.streaming_blocks(ring);
        let mut pairs = Vec::new();
        if want > s.tables.streaming.len() {
            let got =
                st.alloc
                    .take(want - s.tables.streaming.len())
                    .ok_or(CudaError::PoolFull {
                        needed: want - s.tables.streaming.len(),
                        free: st.alloc.free_blocks(),
                    })?;
            for b in got {
                pairs.extend([
                    (row + l.max_blocks() + s.tables.streaming.len()) as i32,
                    b as i32,
                ]);
                s.tables.streaming.push(b);
            }
        } else {
            let tail = s.tables.streaming.split_off(want);
            st.alloc.give(&tail);
        }
        s.tables.cap = cap;
        pairs.extend([(row + l.table_stride() - 1) as i32, cap as i32]);
        self.write_tables(&mut st.b, &pairs)?;
        if moving {
            g.ring_move(
                kc,
                vc,
                scratch,
                paged,
                l.n_streaming(),
                s.slot as usize,
                cap,
                l.sink,
                first,
                count,
                row_bytes,
                false,
            )?;
        }
        Ok(())
    }

    fn write_tables(&self, b: &mut Buffers, pairs: &[i32]) -> Result<()> {
        for chunk in pairs.chunks(b.patches.len()) {
            self.gpu.write(chunk, &mut b.patches)?;
            self.gpu.scatter_i32(
                self.gpu.addr(&self.tables),
                self.gpu.addr(&b.patches),
                chunk.len() / 2,
            )?;
        }
        Ok(())
    }

    /// One step: a decode row for each of `decode`, then `prefill`'s chunk, as one forward
    /// pass. With `greedy`, decode rows return their argmax token instead of logits.
    /// Fails with [`CudaError::PoolFull`] (changing nothing) when the blocks the step needs
    /// are not free.
    pub fn step(
        &self,
        decode: &mut [DecodeRow],
        prefill: Option<PrefillChunk>,
        greedy: bool,
    ) -> Result<StepOut> {
        let c = &self.w.config;
        let bsz = decode.len();
        let chunk = prefill.as_ref().map_or(0, |p| p.tokens.len());
        if bsz + chunk == 0 {
            return Ok(StepOut::default());
        }
        if let Some(p) = &prefill {
            if p.tokens.is_empty() {
                return Err(CudaError::Input("an empty prefill chunk".into()));
            }
        }
        let padded = if prefill.is_none() && self.config.graphs {
            bucket(bsz)
        } else {
            bsz
        };
        if padded + chunk > self.config.max_rows
            || chunk > self.layout.max_chunk
            || padded > logit_rows(&self.config)
        {
            return Err(CudaError::Input(format!("{bsz} decode rows and a chunk of {chunk} exceed the step's {} rows (chunks up to {})", self.config.max_rows, self.layout.max_chunk)));
        }
        let mut slots_seen = std::collections::HashSet::new();
        for (seq, tokens) in decode
            .iter()
            .map(|r| (&*r.seq, std::slice::from_ref(&r.token)))
            .chain(prefill.as_ref().map(|p| (&*p.seq, p.tokens)))
        {
            self.owns(seq)?;
            if let Some(bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(CudaError::Input(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    c.vocab
                )));
            }
            if seq.tokens + tokens.len() > self.layout.max_tokens {
                return Err(CudaError::Input(format!(
                    "{} tokens exceed this sequence's {} tokens",
                    seq.tokens + tokens.len(),
                    self.layout.max_tokens
                )));
            }
            if !slots_seen.insert(seq.slot) {
                return Err(CudaError::Input(
                    "a sequence appears twice in one step".into(),
                ));
            }
        }
        // Launch shapes before any block is taken: a step that cannot run changes nothing.
        let max_n = decode.iter().map(|r| r.seq.tokens + 1).max().unwrap_or(1);
        let shapes = if bsz > 0 { self.shapes(max_n, padded)? } else { Vec::new() };
        let bucket_n = self.length_bucket(max_n);

        let mut st = self.lock();
        let st = &mut *st;
        let mut prefill = prefill;
        {
            let mut grows: Vec<(&mut PagedSeq, usize, Ring)> = decode
                .iter_mut()
                .map(|r| (&mut *r.seq, 1, Ring::Decode))
                .collect();
            if let Some(p) = prefill.as_mut() {
                grows.push((&mut *p.seq, chunk, Ring::Prefill));
            }
            self.grow(st, &mut grows)?;
        }
        self.run(st, decode, prefill, padded, (bucket_n, shapes), greedy)
    }

    fn run(
        &self,
        st: &mut State,
        decode: &mut [DecodeRow],
        prefill: Option<PrefillChunk>,
        padded: usize,
        (bucket_n, shapes): (usize, Vec<DecodeLaunch>),
        greedy: bool,
    ) -> Result<StepOut> {
        let (g, c) = (&*self.gpu, &self.w.config);
        let bsz = decode.len();
        let chunk = prefill.as_ref().map_or(0, |p| p.tokens.len());
        let rows = padded + chunk;
        // Row metadata: tokens, slots, positions, then the prefill chunk's [slot, first], and
        // that of its second half (for the overlapped prefill under tensor parallelism).
        let mut meta = vec![0i32; 3 * rows + 4];
        for (i, r) in decode.iter().enumerate() {
            meta[i] = r.token as i32;
            meta[rows + i] = r.seq.slot as i32;
            meta[2 * rows + i] = r.seq.tokens as i32;
        }
        for i in bsz..padded {
            meta[rows + i] = -1;
        }
        if let Some(p) = &prefill {
            for (j, &t) in p.tokens.iter().enumerate() {
                let i = padded + j;
                meta[i] = t as i32;
                meta[rows + i] = p.seq.slot as i32;
                meta[2 * rows + i] = (p.seq.tokens + j) as i32;
            }
            meta[3 * rows] = p.seq.slot as i32;
            meta[3 * rows + 1] = p.seq.tokens as i32;
            meta[3 * rows + 2] = p.seq.slot as i32;
            meta[3 * rows + 3] = (p.seq.tokens + p.tokens.len() / 2) as i32;
        }
        g.write(&meta, &mut st.b.meta)?;

        let logit_rows = if bsz > 0 { padded } else { 0 };
        let key: GraphKey = (padded, if self.link.is_some() { bucket_n } else { 0 }, shapes.clone());
        let mut steady = true;
        if prefill.is_none() && self.config.graphs && !st.uncapturable.contains(&key) {
            if let Some(i) = st.graphs.iter().position(|(k, _)| *k == key) {
                st.graphs[i].1.launch()?;
                st.graph_steps += 1;
            } else if st.pending.as_ref() == Some(&key) {
                steady = false;
                let stream = &g.stream;
                stream
                    .begin_capture(drv::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(driver)?;
                let captured = self.forward(&st.b, rows, padded, &shapes, 0, logit_rows);
                let ended = stream.end_capture(drv::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).map_err(driver);
                st.pending = None;
                // Under tensor parallelism every rank uses its graph or none does (a graph
                // holds the rank's NCCL calls; NCCL needs the same ones captured everywhere).
                let ok = matches!((&captured, &ended), (Ok(()), Ok(Some(_))));
                let agreed = match &self.link {
                    None => true,
                    Some(link) => link.all_say(&self.gpu, ok)?,
                };
                match (captured, ended) {
                    (Ok(()), Ok(Some(graph))) if agreed => {
                        let graph = StepGraph::new(graph);
                        graph.launch()?;
                        if st.graphs.len() >= MAX_GRAPHS {
                            st.graphs.remove(0);
                        }
                        st.graphs.push((key, graph));
                        st.graph_steps += 1;
                    }
                    // This shape is not captured again; the step runs launch by launch.
                    _ => {
                        st.uncapturable.push(key);
                        self.forward(&st.b, rows, padded, &shapes, 0, logit_rows)?;
                    }
                }
            } else {
                self.forward(&st.b, rows, padded, &shapes, 0, logit_rows)?;
                st.pending = Some(key);
                steady = false;
            }
        } else {
            self.forward(&st.b, rows, padded, &shapes, chunk, logit_rows)?;
        }

        let mut out = StepOut { steady, ..StepOut::default() };
        let host = self.host_logits();
        if bsz > 0 && host {
            if greedy {
                g.argmax_rows(g.addr(&st.b.logits), c.vocab, bsz, g.addr(&st.b.next))?;
                let ids = g
                    .stream
                    .clone_dtoh(&st.b.next.slice(0..bsz))
                    .map_err(driver)?;
                out.next = ids.into_iter().map(|i| i as u32).collect();
            } else {
                out.decode = g
                    .stream
                    .clone_dtoh(&st.b.logits.slice(0..bsz * c.vocab))
                    .map_err(driver)?;
            }
        }
        if let Some(p) = prefill.as_ref().filter(|_| host) {
            out.prefill = match p.logits {
                RowLogits::None => Vec::new(),
                RowLogits::Last => self.row_logits(&st.b, rows - 1, 1)?,
                RowLogits::All => self.row_logits(&st.b, padded, chunk)?,
            };
        }
        g.sync()?;
        for r in decode.iter_mut() {
            r.seq.tokens += 1;
        }
        if let Some(p) = prefill {
            p.seq.tokens += chunk;
        }
        Ok(out)
    }

    /// Logits of `n` consecutive rows from `first`, `ROW_BLOCK` rows per LM-head product.
    fn row_logits(&self, b: &Buffers, first: usize, n: usize) -> Result<Vec<f32>> {
        let (g, c) = (&*self.gpu, &self.w.config);
        let per = ROW_BLOCK.min(b.logits.len() / c.vocab).max(1);
        let mut out = Vec::with_capacity(n * c.vocab);
        for r0 in (0..n).step_by(per) {
            let k = per.min(n - r0);
            let x = g.addr(&b.x) + ((first + r0) * c.hidden * 4) as u64;
            g.rms_norm(x, g.addr(&self.w.norm), g.addr(&b.xn), k, c.hidden, c.eps)?;
            g.gemm(
                g.addr(&b.xn),
                g.addr(self.w.lm_head()),
                g.addr(&b.logits),
                k,
                c.hidden,
                c.vocab,
                0.0,
                false,
            )?;
            out.extend(
                g.stream
                    .clone_dtoh(&b.logits.slice(0..k * c.vocab))
                    .map_err(driver)?,
            );
        }
        Ok(out)
    }

    /// Decode launch shapes for rows of up to `max_n` tokens: lengths rounded up to 2048
    /// (so shapes, and captured graphs, change rarely as sequences grow), splits of
    /// [`DECODE_SPLIT`] keys (a pool of one sequence: `splits_for`'s), lengthened only when
    /// the partial buffers cannot hold every (row, split) (then rows are no longer
    /// independent of the batch, bit for bit).
    /// `max_n` rounded up to 2048 (within the layout's longest sequence).
    fn length_bucket(&self, max_n: usize) -> usize {
        (max_n.div_ceil(2048) * 2048).min(self.layout.max_tokens).max(max_n)
    }

    fn shapes(&self, max_n: usize, rows: usize) -> Result<Vec<DecodeLaunch>> {
        decode_shapes(&self.w.config, &self.layout, &self.config, self.length_bucket(max_n), rows)
    }

    /// Every launch of one forward over `rows` rows: decode rows `0..decode_rows` (the
    /// `shapes` launches), then a prefill chunk of `chunk` rows; then the final norm and LM
    /// head over the first `logit_rows` rows.
    fn forward(
        &self,
        b: &Buffers,
        rows: usize,
        decode_rows: usize,
        shapes: &[DecodeLaunch],
        chunk: usize,
        logit_rows: usize,
    ) -> Result<()> {
        let (g, c, w) = (&*self.gpu, &self.w.config, &*self.w);
        let h = c.hidden;
        let a = |s: &CudaSlice<f32>| g.addr(s);
        let a16 = |s: &CudaSlice<u16>| g.addr(s);
        let meta = g.addr(&b.meta);
        let (tokens, slots, pos, pre) = (
            meta,
            meta + 4 * rows as u64,
            meta + 8 * rows as u64,
            meta + 12 * rows as u64,
        );
        let paged = self.paged();
        // Both kinds' views of the pool (the same twice where they keep one type).
        let views = (paged, self.layout.streaming_args(paged));
        let (kc, vc) = (g.addr(&self.keys), g.addr(&self.values));
        // The products that end in a partial sum add the residual on rank 0 only (one GPU:
        // always), so that the sum over ranks holds it once.
        let residual = if self.link.as_ref().is_some_and(|k| k.rank != 0) { 0.0 } else { 1.0 };
        g.embed(
            tokens,
            w.embed.as_ref().map_or(0, &a16),
            w.embed_seed(),
            1.0,
            a(&b.x),
            h,
            rows,
        )?;
        match (&self.comm, &self.link) {
            (Some(comm), Some(link)) if decode_rows == 0 && chunk == rows && chunk >= 2 => {
                self.prefill_layers_overlapped(b, chunk, comm, link, residual)?;
            }
            _ => {
                // A decode step's few rows take duo's matrix-vector products with the norms
                // and SiLU folded in; a chunk's rows (and many decode rows) cuBLAS's.
                let fused = self.fused_rows(decode_rows);
                let mlp_fused = if crate::runtime::step_gemv() == StepGemv::FusedAttention { 0 } else { fused };
                for (l, lw) in w.layers.iter().enumerate() {
                    let heads = g.addr(&self.heads[l]);
                    self.attention_input(b, lw, l, paged, rows, (0, rows), fused)?;
                    if decode_rows > 0 {
                        let parts = (a(&b.part_m), a(&b.part_l), a(&b.part_acc));
                        g.decode_attention(&shapes[l], a(&b.q), kc, vc, heads, slots, pos, views, parts, Some((0, a16(&b.att))))?;
                    }
                    if chunk > 0 {
                        self.prefill_rows(b, l, paged, pre, (decode_rows, chunk))?;
                    }
                    self.output_projection(b, lw, (0, rows), residual, fused)?;
                    self.sum_over_ranks(a(&b.x), rows * h)?;
                    self.mlp(b, lw, (0, rows), residual, mlp_fused)?;
                    self.sum_over_ranks(a(&b.x), rows * h)?;
                }
            }
        }
        if logit_rows > 0 {
            g.rms_norm(a(&b.x), a(&w.norm), a16(&b.xn), logit_rows, h, c.eps)?;
            g.gemm(
                a16(&b.xn),
                a16(w.lm_head()),
                a(&b.logits),
                logit_rows,
                h,
                c.vocab,
                0.0,
                false,
            )?;
        }
        Ok(())
    }

    /// How many of a step's `decode_rows` leading rows take [`Gpu::gemv_fused`]: all of
    /// them in a pool whose every step's decode rows (at most its largest bucket) the kernel
    /// takes at the model's widths, where asked ([`crate::runtime::step_gemv`]); none in any
    /// other pool. Never some steps one way and some the other, so that a row's products on
    /// duo's kernel do not depend on how many rows share its step (under
    /// [`StepGemv::FusedBesideCublasGateUp`] the gate/up product is cuBLAS's, whose kernel
    /// may change with the row count, as on the default path).
    fn fused_rows(&self, decode_rows: usize) -> usize {
        debug_assert!(decode_rows <= bucket(self.config.max_seqs));
        if crate::runtime::step_gemv() != StepGemv::Cublas && pool_takes_gemv(&self.w.config, &self.config) { decode_rows } else { 0 }
    }

    /// Rows `off..off + n` of a step of `rows` rows through a layer's attention input:
    /// RMSNorm, the q/k/v product, RoPE, with queries to `b.q` (f32) and keys and values
    /// appended to the cache rows of their positions. The first `fused` rows of the range
    /// take [`Gpu::gemv_fused`] (the norm folded into the product), the rest RMSNorm and
    /// cuBLAS.
    #[allow(clippy::too_many_arguments)]
    fn attention_input(&self, b: &Buffers, lw: &crate::model::LayerWeights, layer: usize, paged: crate::paged::PagedArgs, rows: usize, (off, n): (usize, usize), fused: usize) -> Result<()> {
        let (g, c) = (&*self.gpu, &self.w.config);
        let (h, qd, kvd) = (c.hidden, c.n_heads * c.head_dim, c.qkv_dim());
        let (x, xn, qkv, q) = (g.addr(&b.x) + (off * h * 4) as u64, g.addr(&b.xn) + (off * h * 2) as u64, g.addr(&b.qkv) + (off * kvd * 2) as u64, g.addr(&b.q) + (off * qd * 4) as u64);
        // Row metadata ([`KvPool::step`]): tokens, slots, positions, `rows` of each.
        let meta = g.addr(&b.meta);
        let (slots, pos) = (meta + (4 * (rows + off)) as u64, meta + (4 * (2 * rows + off)) as u64);
        let f = fused.min(n);
        if f > 0 {
            let input = GemvInput::Normed { x, norm: g.addr(&lw.attn_norm), eps: c.eps };
            g.gemv_fused(input, g.addr(&lw.qkv), GemvOutput::Bf16(qkv), f, h, kvd)?;
        }
        if n > f {
            let (x, xn, qkv) = (x + (f * h * 4) as u64, xn + (f * h * 2) as u64, qkv + (f * kvd * 2) as u64);
            g.rms_norm(x, g.addr(&lw.attn_norm), xn, n - f, h, c.eps)?;
            g.gemm(xn, g.addr(&lw.qkv), qkv, n - f, h, kvd, 0.0, true)?;
        }
        // Each kind's heads (and their queries) with its own view of the pool, in one launch.
        let heads = g.addr(&self.heads[layer]);
        g.rope_append(qkv, slots, pos, g.addr(&self.w.inv_freq), heads, c.n_heads, c.n_kv_heads, c.head_dim, c.half_split, q, g.addr(&self.keys), g.addr(&self.values), n, (paged, self.layout.streaming_args(paged)))
    }

    /// Where the kinds keep different types: `layer`'s tables for the retrieval heads'
    /// launches and the streaming heads'.
    fn kinds_of(&self, layer: usize) -> Option<(u64, u64)> {
        self.kind_heads.get(layer).map(|(r, s)| (self.gpu.addr(r), self.gpu.addr(s)))
    }

    /// Prefill attention of rows `off..off + n` (their queries in `b.q`, their output to
    /// `b.att`), the sequence's `[slot, first position]` at `state`, by the GPU's default
    /// prefill kernel.
    fn prefill_rows(&self, b: &Buffers, layer: usize, paged: crate::paged::PagedArgs, state: u64, (off, n): (usize, usize)) -> Result<()> {
        let (g, c) = (&*self.gpu, &self.w.config);
        let qd = c.n_heads * c.head_dim;
        let run = |heads: u64, paged: crate::paged::PagedArgs, kv: KvType| {
            g.prefill_attention(
                g.prefill_kernel_for(c.head_dim, kv),
                g.addr(&b.q) + (off * qd * 4) as u64,
                g.addr(&self.keys),
                g.addr(&self.values),
                self.keys.len(),
                heads,
                state,
                paged,
                n,
                c.n_heads,
                c.n_heads / c.n_kv_heads,
                c.head_dim,
                kv,
                g.addr(&b.att) + (off * qd * 2) as u64,
            )
        };
        let heads = g.addr(&self.heads[layer]);
        match self.kinds_of(layer) {
            Some((ret, st)) => {
                run(ret, paged, self.layout.kv)?;
                run(st, self.paged_streaming(), self.layout.kv_streaming)
            }
            None => run(heads, paged, self.layout.kv),
        }
    }

    /// The output projection of rows `off..off + n` of `b.att` into `b.x`, adding the
    /// residual where `residual` is 1; the first `fused` rows by [`Gpu::gemv_fused`].
    fn output_projection(&self, b: &Buffers, lw: &crate::model::LayerWeights, (off, n): (usize, usize), residual: f32, fused: usize) -> Result<()> {
        let (g, c) = (&*self.gpu, &self.w.config);
        let (h, qd) = (c.hidden, c.n_heads * c.head_dim);
        let (att, x) = (g.addr(&b.att) + (off * qd * 2) as u64, g.addr(&b.x) + (off * h * 4) as u64);
        let f = fused.min(n);
        if f > 0 {
            g.gemv_fused(GemvInput::Bf16(att), g.addr(&lw.o), GemvOutput::F32 { y: x, beta: residual }, f, qd, h)?;
        }
        if n > f {
            g.gemm(att + (f * qd * 2) as u64, g.addr(&lw.o), x + (f * h * 4) as u64, n - f, qd, h, residual, false)?;
        }
        Ok(())
    }

    /// Rows `off..off + n` of `b.x` through a layer's MLP: RMSNorm, gate/up, SiLU, and the
    /// down projection back into `b.x`, adding the residual where `residual` is 1. The first
    /// `fused` rows take two [`Gpu::gemv_fused`] launches (the norm and the SiLU folded into
    /// the gate/up product) under [`StepGemv::Fused`], or RMSNorm, cuBLAS's gate/up and one
    /// [`Gpu::gemv_fused`] launch with the SiLU in its input rows (or `silu_mul` before it,
    /// where the rows do not fit) under [`StepGemv::FusedBesideCublasGateUp`]; the rest the
    /// four kernels.
    fn mlp(&self, b: &Buffers, lw: &crate::model::LayerWeights, (off, n): (usize, usize), residual: f32, fused: usize) -> Result<()> {
        let (g, c) = (&*self.gpu, &self.w.config);
        let h = c.hidden;
        let (x, xn) = (g.addr(&b.x) + (off * h * 4) as u64, g.addr(&b.xn) + (off * h * 2) as u64);
        let (gu, act) = (g.addr(&b.gu) + (off * 2 * c.ffn * 2) as u64, g.addr(&b.act) + (off * c.ffn * 2) as u64);
        let f = fused.min(n);
        let down = GemvOutput::F32 { y: x, beta: residual };
        if f > 0 && crate::runtime::step_gemv() == StepGemv::FusedBesideCublasGateUp {
            // gate/up on cuBLAS; the SiLU inside the down product's input where its rows fit
            // (else its kernel: the same bits either way).
            g.rms_norm(x, g.addr(&lw.ffn_norm), xn, f, h, c.eps)?;
            g.gemm(xn, g.addr(&lw.gate_up), gu, f, h, 2 * c.ffn, 0.0, true)?;
            if Gpu::gemv_takes(f, c.ffn, GemvInput::SiluOf(gu)) {
                g.gemv_fused(GemvInput::SiluOf(gu), g.addr(&lw.down), down, f, c.ffn, h)?;
            } else {
                g.silu_mul(gu, act, f, c.ffn)?;
                g.gemv_fused(GemvInput::Bf16(act), g.addr(&lw.down), down, f, c.ffn, h)?;
            }
        } else if f > 0 {
            let input = GemvInput::Normed { x, norm: g.addr(&lw.ffn_norm), eps: c.eps };
            g.gemv_fused(input, g.addr(&lw.gate_up), GemvOutput::SiluPairs(act), f, h, 2 * c.ffn)?;
            g.gemv_fused(GemvInput::Bf16(act), g.addr(&lw.down), down, f, c.ffn, h)?;
        }
        if n > f {
            let (x, xn) = (x + (f * h * 4) as u64, xn + (f * h * 2) as u64);
            let (gu, act) = (gu + (f * 2 * c.ffn * 2) as u64, act + (f * c.ffn * 2) as u64);
            g.rms_norm(x, g.addr(&lw.ffn_norm), xn, n - f, h, c.eps)?;
            g.gemm(xn, g.addr(&lw.gate_up), gu, n - f, h, 2 * c.ffn, 0.0, true)?;
            g.silu_mul(gu, act, n - f, c.ffn)?;
            g.gemm(act, g.addr(&lw.down), x, n - f, c.ffn, h, residual, false)?;
        }
        Ok(())
    }

    /// Every layer of a prefill-only step of `chunk` rows under tensor parallelism, the
    /// chunk cut in two halves so that each half's all-reduce (on `comm`) overlaps the other
    /// half's work (on the main stream): per layer, half A's attention block and then B's,
    /// each followed by its sum; then A's MLP once A's sum is in, B's once B's is. Half B's
    /// attention sees half A's keys (appended before it on the main stream), as two
    /// consecutive chunks would; every rank makes the same all-reduces in the same order.
    /// Ends with the main stream waiting for the last sums.
    fn prefill_layers_overlapped(&self, b: &Buffers, chunk: usize, comm: &Arc<cudarc::driver::CudaStream>, link: &crate::nccl::Link, residual: f32) -> Result<()> {
        let (g, h, paged) = (&*self.gpu, self.w.config.hidden, self.paged());
        // The halves' [slot, first position] pairs follow the rows' metadata ([`KvPool::step`]).
        let pre = g.addr(&b.meta) + (12 * chunk) as u64;
        let halves = [(0usize, chunk / 2), (chunk / 2, chunk - chunk / 2)];
        // The event after each half's latest sum: the main stream waits for it before it
        // touches that half's rows of `x` again.
        let mut summed: [Option<cudarc::driver::CudaEvent>; 2] = [None, None];
        let sum_half = |(off, n): (usize, usize)| -> Result<cudarc::driver::CudaEvent> {
            let ready = g.stream.record_event(None).map_err(driver)?;
            comm.wait(&ready).map_err(driver)?;
            link.all_reduce_sum_f32(g.addr(&b.x) + (off * h * 4) as u64, n * h, comm)?;
            comm.record_event(None).map_err(driver)
        };
        let wait_for = |e: &Option<cudarc::driver::CudaEvent>| e.as_ref().map_or(Ok(()), |e| g.stream.wait(e).map_err(driver));
        for (l, lw) in self.w.layers.iter().enumerate() {
            for (i, &half) in halves.iter().enumerate() {
                wait_for(&summed[i])?;
                self.attention_input(b, lw, l, paged, chunk, half, 0)?;
                self.prefill_rows(b, l, paged, pre + (8 * i) as u64, half)?;
                self.output_projection(b, lw, half, residual, 0)?;
                summed[i] = Some(sum_half(half)?);
            }
            for (i, &half) in halves.iter().enumerate() {
                wait_for(&summed[i])?;
                self.mlp(b, lw, half, residual, 0)?;
                summed[i] = Some(sum_half(half)?);
            }
        }
        summed.iter().try_for_each(wait_for)
    }

    /// `x[..n] = sum over the ranks of x[..n]` (f32) under tensor parallelism, else nothing.
    fn sum_over_ranks(&self, x: u64, n: usize) -> Result<()> {
        match &self.link {
            Some(link) => link.all_reduce_sum_f32(x, n, &self.gpu.stream),
            None => Ok(()),
        }
    }

    /// Pretends `n` tokens were prefilled into the empty `seq`: takes its blocks and fills
    /// them with seeded random keys and values (what a decode step reads does not depend on
    /// what they say). For decode measurements at lengths whose prefill would take too long.
    pub fn fill_synthetic(&self, seq: &mut PagedSeq, n: usize, seed: u64) -> Result<()> {
        self.owns(seq)?;
        if seq.tokens != 0 || n + 1 > self.layout.max_tokens {
            return Err(CudaError::Input(format!(
                "synthetic tokens go into an empty sequence with room for one more ({n} of {})",
                self.layout.max_tokens
            )));
        }
        let mut st = self.lock();
        let st = &mut *st;
        self.grow(st, &mut [(&mut *seq, n, Ring::Decode)])?;
        let (elems, rows) = (
            self.layout.block_elems(self.w.config.head_dim),
            self.layout.block_rows(),
        );
        let (g, k, v) = (
            &*self.gpu,
            self.gpu.addr(&self.keys),
            self.gpu.addr(&self.values),
        );
        let (ks, vs) = (g.addr(&self.key_scales), g.addr(&self.value_scales));
        let n_retrieval = seq.tables.retrieval.len();
        for (i, &blk) in seq
            .tables
            .retrieval
            .iter()
            .chain(&seq.tables.streaming)
            .enumerate()
        {
            let (at, v_at) = (self.layout.kv.key_bytes_for(blk as usize * elems) as u64, self.layout.kv.value_bytes_for(blk as usize * elems) as u64);
            let (sk, sv) = (
                seed.wrapping_add(2 * i as u64),
                seed.wrapping_add(2 * i as u64 + 1),
            );
            let s_at = (blk as usize * rows * 4) as u64;
            // A streaming block holds rows of the streaming heads' type (as many as their
            // units a block, their keys' spaced `streaming_key_shift` apart); a bf16 one has
            // no scales.
            let (kv, rows, key_rows) = if i < n_retrieval {
                (self.layout.kv, rows, rows)
            } else {
                let rows = self.layout.streaming_group() * self.layout.block_tokens;
                (self.layout.kv_streaming, rows, rows << self.layout.streaming_key_shift())
            };
            let d = self.w.config.head_dim;
            g.fill_synthetic_side(kv.key(), k + at, ks + s_at, key_rows, d, sk)?;
            g.fill_synthetic_side(kv.value(), v + v_at, vs + s_at, rows, d, sv)?;
        }
        seq.tokens = n;
        g.sync()
    }

    /// A copy of `seq` in `into` (this pool or another of the same layout): the same tokens
    /// in blocks of its own.
    pub fn copy_to(&self, seq: &PagedSeq, into: &Arc<KvPool>) -> Result<PagedSeq> {
        self.owns(seq)?;
        if into.layout != self.layout || !Arc::ptr_eq(&into.w, &self.w) {
            return Err(CudaError::Input(
                "a sequence is copied only into a pool of the same model and layout".into(),
            ));
        }
        let mut copy = into.sequence()?;
        let mut st = into.lock();
        let st = &mut *st;
        let ring = self.ring_of(seq).unwrap_or(Ring::Prefill);
        into.grow(st, &mut [(&mut copy, seq.tokens, ring)])?;
        let block_pairs: Vec<i32> = seq
            .tables
            .retrieval
            .iter()
            .zip(&copy.tables.retrieval)
            .chain(seq.tables.streaming.iter().zip(&copy.tables.streaming))
            .flat_map(|(&s, &d)| [s as i32, d as i32])
            .collect();
        let g = &*self.gpu;
        let list = g.upload(&block_pairs)?;
        let elems = self.layout.block_elems(self.w.config.head_dim);
        let words = (self.layout.kv.key_bytes_for(elems) / 2, self.layout.kv.value_bytes_for(elems) / 2);
        g.copy_blocks(
            g.addr(&self.keys),
            g.addr(&self.values),
            g.addr(&into.keys),
            g.addr(&into.values),
            g.addr(&list),
            block_pairs.len() / 2,
            words,
        )?;
        if self.layout.kv.is_quantised() {
            // Scales: an f32 is two 16-bit words.
            g.copy_blocks(
                g.addr(&self.key_scales),
                g.addr(&self.value_scales),
                g.addr(&into.key_scales),
                g.addr(&into.value_scales),
                g.addr(&list),
                block_pairs.len() / 2,
                (2 * self.layout.block_rows(), 2 * self.layout.block_rows()),
            )?;
        }
        g.sync()?;
        copy.tokens = seq.tokens;
        Ok(copy)
    }
}

/// A pool's decode launch shapes for rows whose longest is `bucket_n` tokens (a length
/// bucket), one per layer: splits of [`DECODE_SPLIT`] keys (a pool of one sequence:
/// `splits_for`'s), made uniform and lengthened only when the partial buffers cannot hold
/// every (row, split) (then rows are no longer independent of the batch, bit for bit); a streaming window's
/// splits from the pool's constants (its whole window, its most sequences), never the step's
/// rows or lengths.
fn decode_shapes(c: &GpuConfig, layout: &PagedLayout, pool: &PoolConfig, bucket_n: usize, rows: usize) -> Result<Vec<DecodeLaunch>> {
    let (window, max_rows) = (layout.sink + layout.recent, bucket(pool.max_seqs));
    let short = window.min(bucket_n) as u32;
    let group = c.n_heads / c.n_kv_heads;
    let kernel = DecodeKernel::best(c.head_dim, group, layout.kv, DECODE_KEYS_PER_WARP);
    // Streaming heads in a type of their own: their launch's kernel and view.
    let streaming = layout.split_types().then(|| StreamingKernel {
        kv: layout.kv_streaming,
        kernel: DecodeKernel::best(c.head_dim, group, layout.kv_streaming, DECODE_KEYS_PER_WARP),
    });
    (0..c.n_layers)
        .map(|l| {
            let lens: Vec<u32> = layout.retrieval[l].iter().map(|&r| if r { bucket_n as u32 } else { short }).collect();
            let max_len = *lens.iter().max().unwrap_or(&1) as usize;
            let mut splits = if pool.max_seqs == 1 {
                splits_for(kernel, layout.kv, tensor_blocks(c.head_dim, group, layout.kv), &lens, rows)
            } else {
                Splits::uniform(DECODE_SPLIT)
            };
            if splits.count(max_len) * rows > PART_PAIRS {
                splits = Splits::uniform((max_len.div_ceil(PART_PAIRS / rows.max(1)).max(MIN_SPLIT)).div_ceil(64) * 64);
            }
            let shape = (group, c.head_dim, rows, layout.kv, kernel);
            let launch = DecodeLaunch::for_layer_split(&layout.retrieval[l], shape, splits, max_len, window, pool.max_seqs, PART_PAIRS / max_rows);
            // Holds because a pool never has more rows than PART_PAIRS (checked in `new`) and
            // a window's splits are gated by the slots its largest batch leaves.
            debug_assert!(launch.n_splits * rows <= PART_PAIRS);
            match streaming {
                Some(st) => launch.with_streaming_type(&layout.retrieval[l], st),
                None => Ok(launch),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(n_layers: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> GpuConfig {
        GpuConfig { n_layers, hidden: n_heads * head_dim, n_heads, n_kv_heads, head_dim, ffn: 4 * n_heads * head_dim, vocab: 1000, eps: 1e-5, inv_freq: vec![1.0; head_dim / 2], half_split: true }
    }

    fn layout(retrieval: Vec<Vec<bool>>, kv: KvType) -> PagedLayout {
        PagedLayout { retrieval, sink: 128, recent: 256, block_tokens: 64, max_chunk: 4096, max_tokens: 1 << 20, kv, kv_streaming: kv }
    }

    fn pool(max_seqs: usize) -> PoolConfig {
        PoolConfig { blocks: 1, max_seqs, max_rows: max_seqs + 4096, graphs: true }
    }

    #[test]
    fn a_pool_takes_the_fused_products_for_every_step_or_for_none() {
        // Llama-3-8B's widths: up to 8 sequences every step's rows fit (8 normalised rows of
        // 4,096 in shared memory); 9 make steps of 16 rows, past the kernel's 8.
        let l3 = config(1, 32, 8, 128);
        for seqs in [1, 2, 5, 8] {
            assert!(pool_takes_gemv(&l3, &pool(seqs)), "{seqs} sequences");
        }
        assert!(!pool_takes_gemv(&l3, &pool(9)));
        // A hidden size of 8,192: 6 rows fit (bucket 8 does not), so a pool of 5 sequences,
        // whose steps pad to 8 rows, takes it for none of them.
        let wide = config(1, 64, 8, 128);
        assert!(pool_takes_gemv(&wide, &pool(4)) && !pool_takes_gemv(&wide, &pool(5)));
        // Widths not in whole 16-byte chunks: never.
        let odd = GpuConfig { ffn: 1001, ..config(1, 4, 2, 64) };
        assert!(!pool_takes_gemv(&odd, &pool(1)));
    }

    #[test]
    fn a_rows_launch_does_not_depend_on_its_neighbours() {
        // Llama-3-8B's shape: a mixed layer, a streaming layer, a full layer.
        let c = config(3, 32, 8, 128);
        let kinds = vec![vec![true, false, false, true, false, true, false, false], vec![false; 8], vec![true; 8]];
        for kv in [KvType::Bf16, KvType::Int4] {
            let l = layout(kinds.clone(), kv);
            for max_seqs in [2, 8, 64, 1024] {
                let p = pool(max_seqs);
                for bucket_n in [2048, 32_768, 131_072] {
                    let alone = decode_shapes(&c, &l, &p, bucket_n, 1).expect("shapes");
                    for rows in [2, bucket(max_seqs)] {
                        let batch = decode_shapes(&c, &l, &p, bucket_n, rows).expect("shapes");
                        for (a, b) in alone.iter().zip(&batch) {
                            let at = format!("{kv:?}, {max_seqs} seqs, {bucket_n} tokens, {rows} rows");
                            // A streaming window's splits never follow the batch (a layer without
                            // windows, `short_split` 0, splits every head as a retrieval head).
                            assert_eq!((a.short_split, a.retrieval), (b.short_split, b.retrieval), "{at}");
                            if a.short_split > 0 {
                                assert_eq!(a.short_splits, b.short_splits, "{at}");
                            }
                            // A retrieval head's neither, unless the partial buffers cannot
                            // hold every row's splits (the documented exception).
                            if bucket_n.div_ceil(DECODE_SPLIT) * rows <= PART_PAIRS {
                                assert_eq!(a.split, b.split, "{at}");
                            } else {
                                assert!(b.split >= a.split, "{at}"); // longer, where a layer has long heads
                            }
                            assert!(b.rows * b.n_splits <= PART_PAIRS, "{at}: {b:?}");
                        }
                    }
                }
            }
        }
    }

    /// bf16 windows beside a quantised cache: every layer with streaming heads launches them
    /// by the bf16 kernel (over the pool's streaming view, `PagedLayout::streaming_args`,
    /// whose units and key spacing `paged`'s tests check); a layer of retrieval heads keeps
    /// one launch.
    #[test]
    fn bf16_windows_launch_on_their_own_with_their_view() {
        let c = config(3, 32, 8, 128);
        let kinds = vec![vec![true, false, false, true, false, true, false, false], vec![false; 8], vec![true; 8]];
        for kv in [KvType::Fp8, KvType::Int4, KvType::K8V4] {
            let l = PagedLayout { kv_streaming: KvType::Bf16, ..layout(kinds.clone(), kv) };
            assert_eq!(l.group(), 12, "11 retrieval heads padded to whole window units");
            for max_seqs in [1, 64] {
                let shapes = decode_shapes(&c, &l, &pool(max_seqs), 131_072, 1).expect("shapes");
                let want = Some(StreamingKernel { kv: KvType::Bf16, kernel: DecodeKernel::Tensor });
                assert_eq!((shapes[0].streaming, shapes[1].streaming), (want, want), "{kv:?}, {max_seqs} seqs");
                assert!(shapes[0].short_split > 0, "a mixed layer lists its windows' splits after the retrieval heads'");
                assert_eq!(shapes[2].streaming, None, "{kv:?}: a layer of retrieval heads");
                assert_eq!((shapes[0].kv, shapes[2].kv), (kv, kv), "retrieval heads keep the cache's type");
            }
        }
    }

    #[test]
    fn a_pool_of_one_reads_windows_in_tiles_and_a_large_one_in_one_split() {
        let c = config(1, 32, 8, 128);
        let l = layout(vec![vec![true, false, false, true, false, true, false, false]], KvType::Bf16);
        let one = &decode_shapes(&c, &l, &pool(1), 131_072, 1).expect("shapes")[0];
        assert_eq!((one.short_split, one.short_splits, one.retrieval), (64, 6, 0b10_1001), "a 384-key window in 6 tiles");
        assert_eq!(one.blocks(), 3 * one.n_splits + 5 * 6);
        let many = &decode_shapes(&c, &l, &pool(64), 131_072, 64).expect("shapes")[0];
        assert_eq!((many.short_split, many.short_splits), (384, 1), "64 rows x 5 windows fill the card already");
        // A layer of retrieval heads only: every head split alike.
        let full = &decode_shapes(&c, &layout(vec![vec![true; 8]], KvType::Bf16), &pool(1), 131_072, 1).expect("shapes")[0];
        assert_eq!((full.short_split, full.blocks()), (0, 8 * full.n_splits));
    }
}
