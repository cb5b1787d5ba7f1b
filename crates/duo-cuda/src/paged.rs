//! The paged KV layout: one pool of fixed-size blocks on the GPU that every sequence's
//! retrieval and streaming heads draw from, and the address arithmetic the kernels share.
//!
//! Why this shape:
//! * Every retrieval head of a sequence grows by the same token at the same time, so a
//!   *block* is `block_tokens` positions for **all** the model's retrieval heads (of every
//!   layer): a *unit* is one head's `block_tokens` rows, and a block is `group()` consecutive
//!   units. A sequence then needs one block table (not one per layer and head), a block is
//!   taken every `block_tokens` tokens and returned when the sequence ends, and blocks of any
//!   sequence are interchangeable, so the pool never fragments.
//! * Streaming heads keep a constant region per sequence: `sink` rows (padded to a whole
//!   unit), then a ring of `cap` rows holding the latest positions. A ring needs no
//!   compaction copies: position `p >= sink` lives at row `sink_pad + (p - sink) % cap`.
//!   While a sequence prefills, `cap >= recent + max_chunk` keeps every key a chunk's queries
//!   see ([`Ring::Prefill`]); once it decodes, `recent` rows are enough ([`Ring::Decode`]):
//!   the pool moves the last `recent` positions into the smaller ring and gives the rest of
//!   the region back, so a decoding sequence holds no prefill-sized ring.
//! * A streaming region is packed unit-major (ring unit `u` of every streaming head, then
//!   unit `u + 1`), so the decode ring is a prefix of the prefill ring's blocks: shrinking
//!   frees the tail blocks, growing appends them.
//! * Streaming heads may keep their rows in a wider type than retrieval heads
//!   (`kv_streaming`: bf16 windows beside an fp8, int8, int4 or k8v4 cache,
//!   `--kv-dtype-streaming`). A
//!   block is then still `group()` units of the retrieval type's rows, and in a streaming
//!   region the same bytes hold `streaming_group()` units of the wider rows: `group()` is
//!   padded to a multiple of the width ratio so that they divide evenly. The kernels see
//!   two views of one pool ([`PagedLayout::paged_args`], [`PagedLayout::streaming_args`]);
//!   a kernel compiled for one type runs each kind's heads in its own launch. The wider
//!   type keeps no row scales, so the scale words stay the retrieval rows' alone.
//! * One row index addresses a key row and a value row. Where the two sides widen unalike
//!   (k8v4: int8 keys widen twice to bf16, int4 values four times), the width is the
//!   values' and a streaming key row sits at `row << key_shift` (one bf16 key row in every
//!   second slot of the key bytes): half of a streaming block's key bytes stay unused
//!   (`2 x head_dim` bytes per streaming head and ring row: about 6 MB a sequence for
//!   SmolLM2's window, 10 MB for Llama-3-8B's 0.5 pattern with a 64 + 256 window while it
//!   decodes, more while a prefill-sized ring is held), and the kernels keep one row lookup
//!   for both sides.
//! * Tables live in device memory, one row per *slot* (a running sequence), so a captured
//!   step and the kernels read them without host involvement: `[retrieval blocks | streaming
//!   blocks | ring rows]` of `table_stride()` entries.
//!
//! [`PREFIX`] is the CUDA helper every kernel that touches the cache includes; [`Tables`]
//! computes the same row on the host, and the tests check that live rows never collide.

use crate::decode_attention::KvType;
use crate::prefill_attention::HeadEntry;
use crate::{CudaError, Result};

/// How many rows of a `kv` cache one streaming row of `streaming` spans in a pool, keys and
/// values: (1, 1) where the types are the same; bf16 beside fp8 or int8 (2, 2), beside int4
/// (4, 4), beside K8V4 (2, 4). `None` where a pool cannot keep streaming heads in `streaming`
/// beside `kv`: a narrower window, or two quantised types. The one rule the layout, the engine
/// and the command line check a pair against.
pub fn window_widths(kv: KvType, streaming: KvType) -> Option<(usize, usize)> {
    if streaming == kv {
        return Some((1, 1));
    }
    if streaming != KvType::Bf16 || !matches!(kv, KvType::Fp8 | KvType::Int8 | KvType::Int4 | KvType::K8V4) {
        return None;
    }
    // 256 elements: a whole number of bytes in every type.
    let ratio = |wide: usize, narrow: usize| wide.div_ceil(narrow.max(1));
    Some((ratio(streaming.key_bytes_for(256), kv.key_bytes_for(256)), ratio(streaming.value_bytes_for(256), kv.value_bytes_for(256))))
}

/// Whether `n` positions per block is a size the kernels take: a power of two from 8 to 1024.
pub fn block_tokens_ok(n: usize) -> bool {
    n.is_power_of_two() && (8..=1024).contains(&n)
}

/// Which heads keep what, and how the pool is cut.
#[derive(Debug, Clone, PartialEq)]
pub struct PagedLayout {
    /// `[layer][kv head]`: true for a retrieval head.
    pub retrieval: Vec<Vec<bool>>,
    /// Sink tokens of streaming heads.
    pub sink: usize,
    /// Recent window of streaming heads (the current token included).
    pub recent: usize,
    /// Positions per block (a power of two).
    pub block_tokens: usize,
    /// Longest prefill chunk a step may run for one sequence.
    pub max_chunk: usize,
    /// Most tokens one sequence may hold (the width of its block table).
    pub max_tokens: usize,
    /// How keys and values are stored (bf16, or fp8 with row scales).
    pub kv: KvType,
    /// How streaming heads store theirs: `kv`, or bf16 beside an fp8, int8, int4 or k8v4 `kv`.
    pub kv_streaming: KvType,
}

impl PagedLayout {
    /// This layout as a rank that holds `heads[layer]` (model indices, in its order) sees it
    /// under tensor parallelism: those heads' kinds, everything else the same.
    pub fn for_heads(&self, heads: &[Vec<usize>]) -> PagedLayout {
        let retrieval = heads.iter().enumerate().map(|(l, hs)| hs.iter().map(|&h| self.retrieval[l][h]).collect()).collect();
        PagedLayout { retrieval, ..self.clone() }
    }

    /// Retrieval heads of the whole model.
    pub fn n_retrieval(&self) -> usize {
        self.retrieval.iter().flatten().filter(|&&r| r).count()
    }

    /// Streaming heads of the whole model.
    pub fn n_streaming(&self) -> usize {
        self.retrieval.iter().flatten().filter(|&&r| !r).count()
    }

    /// How many rows of the retrieval type one streaming row spans: 1 where both kinds
    /// share a type; bf16 beside fp8 or int8 2, beside int4 or k8v4 4 (the wider of the two
    /// sides' ratios: k8v4's int4 values).
    pub fn streaming_width(&self) -> usize {
        if !self.split_types() {
            return 1;
        }
        let (k, v) = self.side_widths();
        k.max(v)
    }

    /// How many rows of the retrieval type one streaming key row and one value row span
    /// ([`window_widths`]; a pair [`PagedLayout::validate`] refuses counts as one type).
    fn side_widths(&self) -> (usize, usize) {
        window_widths(self.kv, self.kv_streaming).unwrap_or((1, 1))
    }

    /// log2 of how far apart a streaming head's key rows sit, in rows of its own type: 0
    /// where keys widen as much as values, 1 for bf16 beside k8v4 (keys widen twice, values
    /// four times, so the block's key bytes hold twice the rows its values hold).
    pub fn streaming_key_shift(&self) -> u32 {
        if !self.split_types() {
            return 0;
        }
        let (k, v) = self.side_widths();
        (k.max(v) / k).trailing_zeros()
    }

    /// Units per block: one per retrieval head (per streaming head when there is none),
    /// padded to a multiple of [`PagedLayout::streaming_width`].
    pub fn group(&self) -> usize {
        let heads = match self.n_retrieval() {
            0 => self.n_streaming().max(1),
            n => n,
        };
        heads.div_ceil(self.streaming_width()) * self.streaming_width()
    }

    /// Units of streaming rows a block holds: `group()` where both kinds share a type.
    pub fn streaming_group(&self) -> usize {
        self.group() / self.streaming_width()
    }

    /// The cache type of a retrieval (`true`) or streaming head.
    pub fn kv_of(&self, retrieval: bool) -> KvType {
        if retrieval { self.kv } else { self.kv_streaming }
    }

    /// Whether the two kinds of head keep different types, so that every kernel over the
    /// cache runs once per kind (never where there are no streaming heads: a layout of
    /// retrieval heads only, or a tensor-parallel rank's, keeps one type and unpadded blocks).
    pub fn split_types(&self) -> bool {
        self.kv_streaming != self.kv && self.n_streaming() > 0
    }

    /// Sink rows rounded up to whole units.
    pub fn sink_pad(&self) -> usize {
        self.sink.div_ceil(self.block_tokens) * self.block_tokens
    }

    /// Rows of a streaming head's ring while prefilling or decoding.
    pub fn ring_rows(&self, ring: Ring) -> usize {
        let rows = match ring {
            Ring::Prefill => self.recent + self.max_chunk,
            Ring::Decode => self.recent,
        };
        rows.div_ceil(self.block_tokens).max(1) * self.block_tokens
    }

    /// Units of one streaming head's region (sinks and ring).
    pub fn head_units(&self, ring: Ring) -> usize {
        (self.sink_pad() + self.ring_rows(ring)) / self.block_tokens
    }

    /// Blocks holding a sequence's streaming regions.
    pub fn streaming_blocks(&self, ring: Ring) -> usize {
        (self.n_streaming() * self.head_units(ring)).div_ceil(self.streaming_group())
    }

    /// Retrieval blocks of a sequence of `tokens` tokens.
    pub fn retrieval_blocks(&self, tokens: usize) -> usize {
        if self.n_retrieval() == 0 { 0 } else { tokens.div_ceil(self.block_tokens) }
    }

    /// Blocks a sequence of `tokens` tokens holds with its rings sized for `ring`.
    pub fn blocks_for(&self, tokens: usize, ring: Ring) -> usize {
        self.streaming_blocks(ring) + self.retrieval_blocks(tokens)
    }

    /// Retrieval entries of a table row.
    pub fn max_blocks(&self) -> usize {
        self.max_tokens.div_ceil(self.block_tokens).max(1)
    }

    /// Entries of one slot's table row: retrieval blocks, streaming blocks (prefill-sized),
    /// then the rows of the slot's rings now.
    pub fn table_stride(&self) -> usize {
        self.max_blocks() + self.streaming_blocks(Ring::Prefill) + 1
    }

    /// Rows of one block (a row: one position of one head), keys or values.
    pub fn block_rows(&self) -> usize {
        self.group() * self.block_tokens
    }

    /// Elements of one block, keys or values.
    pub fn block_elems(&self, head_dim: usize) -> usize {
        self.block_rows() * head_dim
    }

    /// Bytes of one block, keys and values, row scales included.
    pub fn block_bytes(&self, head_dim: usize) -> usize {
        self.block_rows() * (self.kv.key_bytes_for(head_dim) + self.kv.value_bytes_for(head_dim) + 2 * self.kv.scale_bytes())
    }

    /// The layer's head table for the launches of one kind where the kinds keep different
    /// types ([`PagedLayout::split_types`]): the other kind's heads are [`HeadEntry::SKIP`].
    pub fn heads_of_kind(&self, layer: usize, retrieval: bool) -> Vec<HeadEntry> {
        let want = if retrieval { HeadEntry::RETRIEVAL } else { HeadEntry::STREAMING };
        self.heads(layer).into_iter().map(|e| if e.kind == want { e } else { HeadEntry::skip() }).collect()
    }

    /// The layer's head table: each head's index among the model's retrieval (or streaming)
    /// heads, in layer order.
    pub fn heads(&self, layer: usize) -> Vec<HeadEntry> {
        let before = |want: bool| self.retrieval[..layer].iter().flatten().filter(|&&r| r == want).count();
        let (mut ret, mut st) = (before(true), before(false));
        self.retrieval[layer]
            .iter()
            .map(|&r| {
                if r {
                    ret += 1;
                    HeadEntry::retrieval(ret - 1)
                } else {
                    st += 1;
                    HeadEntry::streaming(st - 1, self.sink, self.recent)
                }
            })
            .collect()
    }

    /// Checks the shape against the model's layers and KV heads.
    pub fn validate(&self, n_layers: usize, n_kv_heads: usize) -> Result<()> {
        if self.retrieval.len() != n_layers || self.retrieval.iter().any(|l| l.len() != n_kv_heads) {
            return Err(CudaError::Input(format!("the head pattern is not {n_layers} layers x {n_kv_heads} KV heads")));
        }
        if !block_tokens_ok(self.block_tokens) {
            return Err(CudaError::Input(format!("block size {} must be a power of two from 8 to 1024", self.block_tokens)));
        }
        if self.recent == 0 || self.max_chunk == 0 || self.max_tokens == 0 {
            return Err(CudaError::Input("recent window, chunk and max_tokens must be positive".into()));
        }
        if window_widths(self.kv, self.kv_streaming).is_none() {
            return Err(CudaError::Input(format!(
                "streaming heads cached as {:?} beside {:?}: on the GPU they keep the cache's type, or bf16 beside an fp8, int8, int4 or k8v4 cache",
                self.kv_streaming, self.kv
            )));
        }
        Ok(())
    }

    /// The kernels' view of the pool, for tables at `tables` (device address).
    pub fn paged_args(&self, tables: u64) -> PagedArgs {
        PagedArgs {
            tables,
            kscale: 0,
            vscale: 0,
            stride: self.table_stride() as i32,
            streaming_at: self.max_blocks() as i32,
            group: self.group() as i32,
            n_streaming: self.n_streaming() as i32,
            sink_pad: self.sink_pad() as i32,
            block_log2: self.block_tokens.trailing_zeros() as i32,
            kv_format: self.kv.format_code(),
            key_shift: 0,
        }
    }

    /// The streaming heads' view of the same pool: their units per block, their type
    /// (without row scales when that is bf16; `paged` is [`PagedLayout::paged_args`]'s view,
    /// scales included) and their key rows' spacing. The same view where both kinds share a
    /// type.
    pub fn streaming_args(&self, paged: PagedArgs) -> PagedArgs {
        if !self.split_types() {
            return paged;
        }
        PagedArgs {
            group: self.streaming_group() as i32,
            kv_format: self.kv_streaming.format_code(),
            kscale: 0,
            vscale: 0,
            key_shift: self.streaming_key_shift() as i32,
            ..paged
        }
    }
}

/// What a kernel needs to find a cached row: the same fields as `struct Paged` in [`PREFIX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct PagedArgs {
    /// Device address of the tables (`i32`, one row of `stride` per slot).
    pub tables: u64,
    /// Device address of the keys' row scales (one 32-bit word per pool row: an `f32`
    /// scale, or int4's f16 step and minimum, moved as bits, never as floats) of a quantised
    /// cache, else 0.
    pub kscale: u64,
    /// The values' row scales, as `kscale`.
    pub vscale: u64,
    /// Entries per slot.
    pub stride: i32,
    /// Where a row's streaming entries start.
    pub streaming_at: i32,
    /// Units per block.
    pub group: i32,
    /// Streaming heads of the model (the stride of the unit-major packing).
    pub n_streaming: i32,
    /// Sink rows, padded to a unit.
    pub sink_pad: i32,
    /// log2 of the block size.
    pub block_log2: i32,
    /// A quantised cache's format ([`KvType::format_code`]): 1 e4m3, 2 int8, 3 int4, else 0.
    pub kv_format: i32,
    /// A key row of this view lives at row `row << key_shift` of the view's key rows (value
    /// rows at `row`): 1 only in bf16 windows beside k8v4 ([`PagedLayout::streaming_key_shift`]).
    pub key_shift: i32,
}

impl PagedArgs {
    /// The same view of a quantised cache whose row scales are at `kscale` and `vscale`.
    pub fn with_scales(self, kscale: u64, vscale: u64) -> Self {
        Self { kscale, vscale, ..self }
    }
}

/// Which ring size a sequence's streaming heads use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// `recent + max_chunk` rows: every key a prefill chunk's queries see.
    Prefill,
    /// `recent` rows: what a decode step sees.
    Decode,
}

/// The CUDA side of [`PagedArgs`] and the row lookup. `kv_row` returns the pool row (units
/// times `block_tokens` plus the row in the unit) that holds `pos` for KV head `e` of `slot`;
/// `kv_row_cap` the same for a streaming ring of `cap` rows (the slot's own, in the last
/// entry of its table row, for `kv_row`).
pub const PREFIX: &str = r#"
struct Paged { const int* tables; float* kscale; float* vscale; int stride, streaming_at, group, n_streaming, sink_pad, block_log2, kv_format, key_shift; };
// A view's key rows are `key_shift` apart (PagedArgs::key_shift): the row a key is at.
__device__ __forceinline__ long long key_row(const Paged& p, long long row) { return row << p.key_shift; }
// kv_row_cap in two halves, so that a kernel may load a table entry early and finish the row
// later: the entry's index in the slot's table row, then the row from the entry.
__device__ __forceinline__ int kv_entry_at(const Paged& p, int4 e, int pos, int cap) {
    if (e.w == 0) return pos >> p.block_log2;
    const int at = pos < e.y ? pos : p.sink_pad + (pos - e.y) % cap;
    return p.streaming_at + ((at >> p.block_log2) * p.n_streaming + e.x) / p.group;
}
__device__ __forceinline__ long long kv_row_from(const Paged& p, int4 e, int pos, int cap, int entry) {
    const int mask = (1 << p.block_log2) - 1;
    int unit, r;
    if (e.w == 0) {
        unit = entry * p.group + e.x;
        r = pos & mask;
    } else {
        const int at = pos < e.y ? pos : p.sink_pad + (pos - e.y) % cap;
        unit = entry * p.group + ((at >> p.block_log2) * p.n_streaming + e.x) % p.group;
        r = at & mask;
    }
    return ((long long)unit << p.block_log2) + r;
}
__device__ __forceinline__ long long kv_row_cap(const Paged& p, int4 e, int slot, int pos, int cap) {
    return kv_row_from(p, e, pos, cap, p.tables[(size_t)slot * p.stride + kv_entry_at(p, e, pos, cap)]);
}
__device__ __forceinline__ int slot_cap(const Paged& p, int slot) {
    return p.tables[(size_t)slot * p.stride + p.stride - 1];
}
__device__ __forceinline__ long long kv_row(const Paged& p, int4 e, int slot, int pos) {
    return kv_row_cap(p, e, slot, pos, e.w == 0 ? 1 : slot_cap(p, slot));
}
// The first cache row of a retrieval head's 64 rows from position r0 (a multiple of 64, the
// whole tile before `rows`) where they are one run of consecutive rows (blocks of at least 64
// tokens): the prefill kernels' one table lookup per tile instead of one per copied chunk.
// Else -1.
__device__ __forceinline__ long long page_run(const Paged& p, int4 e, int slot, int r0, int rows) {
    return e.w == 0 && p.block_log2 >= 6 && (r0 & 63) == 0 && r0 + 64 <= rows ? kv_row(p, e, slot, r0) : -1;
}
// The prefill kernels' walk over a head's `rows` rows: row r's position (a streaming head's
// rows are its sinks, then its ring's positions from `win`).
__device__ __forceinline__ int walk_pos(int4 e, int r, int win) { return e.w == 1 && r >= e.y ? win + r - e.y : r; }
// The first tile of `tile` rows at or after row r (tiles start at multiples of `tile`) that
// some query of positions q_lo..q_hi sees (rows' positions only increase), or `rows` when
// there is none. A streaming head's ring rows before the window of q_lo (the row of position
// q_lo - recent + 1) are skipped in one step: a chunk's ring holds the whole chunk, so a
// tile by tile walk would cost a late query tile hundreds of steps.
__device__ __forceinline__ int next_seen_tile(int4 e, int r, int rows, int win, int q_lo, int q_hi, int tile) {
    if (e.w == 1 && r >= e.y) {
        const int first = q_lo - e.z + 1 - win + e.y;
        if (first > r) r += (first - r) / tile * tile;
    }
    for (; r < rows; r += tile) {
        if (walk_pos(e, r, win) > q_hi) return rows;
        const int r1 = min(rows, r + tile) - 1;
        if (!(e.w == 1 && r >= e.y && q_lo - walk_pos(e, r1, win) >= e.z)) return r;
    }
    return rows;
}
"#;

/// One slot's table row on the host, and the same lookup as `kv_row`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    /// Retrieval blocks, in order of position.
    pub retrieval: Vec<u32>,
    /// Blocks of the streaming regions.
    pub streaming: Vec<u32>,
    /// Rows of the streaming rings now (0 before the sequence's first step).
    pub cap: usize,
}

impl Tables {
    /// The pool row holding `pos` for head `e` (the reference of `kv_row`): a streaming
    /// head's in rows of its own type ([`PagedLayout::kv_streaming`]).
    pub fn row(&self, layout: &PagedLayout, e: HeadEntry, pos: usize) -> usize {
        let (bt, g) = (layout.block_tokens, layout.group());
        let (unit, r) = if e.kind == HeadEntry::RETRIEVAL {
            (self.retrieval[pos / bt] as usize * g + e.offset as usize, pos % bt)
        } else {
            let at = if pos < e.sink as usize { pos } else { layout.sink_pad() + (pos - e.sink as usize) % self.cap };
            // A streaming row of its own type: units of `streaming_group()` a block.
            let sg = layout.streaming_group();
            let k = (at / bt) * layout.n_streaming() + e.offset as usize;
            (self.streaming[k / sg] as usize * sg + k % sg, at % bt)
        };
        unit * bt + r
    }

    /// The row of the keys at `pos` for head `e` in rows of its kind's type: [`Tables::row`],
    /// or for a streaming head of a view whose key rows are spaced out
    /// ([`PagedLayout::streaming_key_shift`]) that row shifted (the reference of `key_row`).
    pub fn key_row(&self, layout: &PagedLayout, e: HeadEntry, pos: usize) -> usize {
        let shift = if e.kind == HeadEntry::RETRIEVAL { 0 } else { layout.streaming_key_shift() };
        self.row(layout, e, pos) << shift
    }

    /// The device form of one slot's table row.
    pub fn device_row(&self, layout: &PagedLayout) -> Vec<i32> {
        let mut out = vec![0i32; layout.table_stride()];
        for (j, &b) in self.retrieval.iter().enumerate() {
            out[j] = b as i32;
        }
        for (k, &b) in self.streaming.iter().enumerate() {
            out[layout.max_blocks() + k] = b as i32;
        }
        out[layout.table_stride() - 1] = self.cap as i32;
        out
    }
}

/// Free blocks and slots of a pool (host side). Blocks are handed out lowest first on a
/// fresh pool and reused last-freed first.
#[derive(Debug, Clone)]
pub struct Allocator {
    blocks: Vec<u32>,
    slots: Vec<u32>,
    total_blocks: usize,
}

impl Allocator {
    /// `blocks` blocks and `slots` slots, all free.
    pub fn new(blocks: usize, slots: usize) -> Self {
        Self { blocks: (0..blocks as u32).rev().collect(), slots: (0..slots as u32).rev().collect(), total_blocks: blocks }
    }

    /// Blocks free.
    pub fn free_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.total_blocks
    }

    /// Slots free.
    pub fn free_slots(&self) -> usize {
        self.slots.len()
    }

    /// `n` blocks, or `None` (and nothing taken) when fewer are free.
    pub fn take(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.blocks.len() {
            return None;
        }
        let at = self.blocks.len() - n;
        let mut got = self.blocks.split_off(at);
        got.reverse();
        Some(got)
    }

    /// Returns blocks.
    pub fn give(&mut self, blocks: &[u32]) {
        self.blocks.extend(blocks.iter().rev());
    }

    /// A slot, or `None`.
    pub fn take_slot(&mut self) -> Option<u32> {
        self.slots.pop()
    }

    /// Returns a slot.
    pub fn give_slot(&mut self, slot: u32) {
        self.slots.push(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decode_ring_is_a_prefix_of_the_prefill_ring() {
        let l = layout();
        let small = Tables { retrieval: vec![], streaming: (0..l.streaming_blocks(Ring::Decode) as u32).collect(), cap: l.ring_rows(Ring::Decode) };
        let big = Tables { streaming: (0..l.streaming_blocks(Ring::Prefill) as u32).collect(), cap: l.ring_rows(Ring::Prefill), ..small.clone() };
        for layer in 0..3 {
            for e in l.heads(layer).into_iter().filter(|e| e.kind == HeadEntry::STREAMING) {
                // The same unit-major packing: sinks sit in the same rows either way.
                for p in 0..l.sink {
                    assert_eq!(small.row(&l, e, p), big.row(&l, e, p));
                }
            }
        }
        assert_eq!(small.device_row(&l).last(), Some(&48));
    }

    /// The pool's ring resizing, emulated on the host with the kernels' lookup: write every
    /// position of a prompt through the prefill-sized ring, move the last `recent` positions
    /// into the decode-sized ring (out with the old size, in with the new, as `ring_move`),
    /// append decode positions, grow again; every position a query may still see must hold
    /// its own value throughout.
    #[test]
    fn resizing_rings_keeps_every_position_a_query_sees() {
        let l = layout();
        let mut alloc = Allocator::new(100, 1);
        let value = |h: usize, p: usize| (h * 100_000 + p) as i64;
        let rows = 100 * l.group() * l.block_tokens;
        let mut pool = vec![-1i64; rows];
        let heads: Vec<HeadEntry> = (0..3).flat_map(|layer| l.heads(layer)).filter(|e| e.kind == HeadEntry::STREAMING).collect();
        let mut t = Tables { retrieval: vec![], streaming: alloc.take(l.streaming_blocks(Ring::Prefill)).unwrap(), cap: l.ring_rows(Ring::Prefill) };
        let write = |pool: &mut Vec<i64>, t: &Tables, from: usize, to: usize| {
            for e in &heads {
                for p in from..to {
                    pool[t.row(&l, *e, p)] = value(e.offset as usize, p);
                }
            }
        };
        let check = |pool: &Vec<i64>, t: &Tables, n: usize, chunk: usize| {
            // Sinks, and every position the chunk just written (its first query included) sees.
            let lo = (n - chunk + 1).saturating_sub(l.recent).max(l.sink);
            for e in &heads {
                for p in (0..l.sink.min(n)).chain(lo..n) {
                    assert_eq!(pool[t.row(&l, *e, p)], value(e.offset as usize, p), "head {} position {p} with {n} cached (chunk {chunk})", e.offset);
                }
            }
        };
        let resize = |pool: &mut Vec<i64>, t: &mut Tables, alloc: &mut Allocator, n: usize, ring: Ring| {
            let first = l.sink.max(n.saturating_sub(l.recent));
            let moved: Vec<Vec<i64>> = heads.iter().map(|e| (first..n).map(|p| pool[t.row(&l, *e, p)]).collect()).collect();
            let want = l.streaming_blocks(ring);
            if want > t.streaming.len() {
                t.streaming.extend(alloc.take(want - t.streaming.len()).unwrap());
            } else {
                let tail = t.streaming.split_off(want);
                for &b in &tail {
                    // A freed block may be reused by anyone: poison it.
                    let rows = l.group() * l.block_tokens;
                    pool[b as usize * rows..(b as usize + 1) * rows].fill(-7);
                }
                alloc.give(&tail);
            }
            t.cap = l.ring_rows(ring);
            for (e, vals) in heads.iter().zip(&moved) {
                for (p, v) in (first..n).zip(vals) {
                    pool[t.row(&l, *e, p)] = *v;
                }
            }
        };
        // Prefill 300 positions in chunks of 48, then 50 decode rows, then a 48-token chunk.
        let mut n = 0;
        while n < 300 {
            let end = (n + l.max_chunk).min(300);
            write(&mut pool, &t, n, end);
            let chunk = end - n;
            n = end;
            check(&pool, &t, n, chunk);
        }
        resize(&mut pool, &mut t, &mut alloc, n, Ring::Decode);
        assert_eq!(t.streaming.len(), l.streaming_blocks(Ring::Decode));
        for _ in 0..50 {
            write(&mut pool, &t, n, n + 1);
            n += 1;
            check(&pool, &t, n, 1);
        }
        resize(&mut pool, &mut t, &mut alloc, n, Ring::Prefill);
        write(&mut pool, &t, n, n + l.max_chunk);
        n += l.max_chunk;
        check(&pool, &t, n, l.max_chunk);
    }

    /// What the kernels' page runs (`page_run`, and the decode kernel's `page_tiles`) rely
    /// on: with blocks of 64 tokens or more, a retrieval head's 64 positions from a multiple
    /// of 64 sit in consecutive rows, whatever blocks the table hands out; with blocks of 32
    /// they do not (the kernels then look up every row).
    #[test]
    fn retrieval_runs_of_64_positions_are_consecutive_rows_in_blocks_of_64_or_more() {
        for block_tokens in [32usize, 64, 128] {
            let l = PagedLayout { block_tokens, ..layout() };
            // Blocks handed out in a scrambled order.
            let retrieval: Vec<u32> = (0..16u32).map(|i| (i * 7 + 3) % 16).collect();
            let t = Tables { retrieval, streaming: vec![], cap: 0 };
            let mut all_runs = true;
            for e in l.heads(0).into_iter().chain(l.heads(2)).filter(|e| e.kind == HeadEntry::RETRIEVAL) {
                for r0 in (0..16 * block_tokens - 63).step_by(64) {
                    let first = t.row(&l, e, r0);
                    all_runs &= (0..64).all(|k| t.row(&l, e, r0 + k) == first + k);
                }
            }
            assert_eq!(all_runs, block_tokens >= 64, "blocks of {block_tokens}");
        }
    }

    fn layout() -> PagedLayout {
        PagedLayout { retrieval: vec![vec![true, false], vec![false, false], vec![false, true]], sink: 4, recent: 40, block_tokens: 16, max_chunk: 48, max_tokens: 1000, kv: KvType::Bf16, kv_streaming: KvType::Bf16 }
    }

    #[test]
    fn sizes_follow_the_heads() {
        let l = layout();
        assert_eq!((l.n_retrieval(), l.n_streaming(), l.group()), (2, 4, 2));
        assert_eq!((l.sink_pad(), l.ring_rows(Ring::Prefill), l.head_units(Ring::Prefill)), (16, 96, 7));
        assert_eq!((l.ring_rows(Ring::Decode), l.head_units(Ring::Decode)), (48, 4), "recent 40 in whole units of 16");
        assert_eq!(l.streaming_blocks(Ring::Prefill), 14, "4 heads x 7 units in blocks of 2 units");
        assert_eq!(l.streaming_blocks(Ring::Decode), 8);
        assert_eq!(l.blocks_for(0, Ring::Prefill), 14);
        assert_eq!(l.blocks_for(17, Ring::Prefill), 16);
        assert_eq!(l.blocks_for(17, Ring::Decode), 10);
        assert_eq!((l.max_blocks(), l.table_stride()), (63, 78));
        assert_eq!(l.block_bytes(64), 2 * 16 * 64 * 4);
        let fp8 = PagedLayout { kv: KvType::Fp8, kv_streaming: KvType::Fp8, ..l.clone() };
        assert_eq!(fp8.block_bytes(64), 2 * 16 * (64 + 4) * 2, "bytes and a scale per row");
        let h = l.heads(2);
        assert_eq!((h[0].kind, h[0].offset, h[1].kind, h[1].offset), (HeadEntry::STREAMING, 3, HeadEntry::RETRIEVAL, 1));
        let full = PagedLayout { retrieval: vec![vec![true; 2]; 3], ..l.clone() };
        assert_eq!((full.group(), full.streaming_blocks(Ring::Prefill)), (6, 0));
        let streaming = PagedLayout { retrieval: vec![vec![false; 2]; 3], ..l };
        assert_eq!((streaming.group(), streaming.retrieval_blocks(500)), (6, 0));
    }

    /// Sequences of `(tokens, ring)` placed in a fresh pool of `blocks` blocks, streaming
    /// blocks first: each one's tables and tokens.
    fn place(l: &PagedLayout, blocks: usize, seqs: &[(usize, Ring)]) -> Vec<(Tables, usize)> {
        let mut alloc = Allocator::new(blocks, seqs.len());
        seqs.iter()
            .map(|&(n, ring)| {
                let streaming = alloc.take(l.streaming_blocks(ring)).unwrap();
                let retrieval = alloc.take(l.retrieval_blocks(n)).unwrap();
                (Tables { retrieval, streaming, cap: l.ring_rows(ring) }, n)
            })
            .collect()
    }

    #[test]
    fn live_rows_never_collide_within_or_across_sequences() {
        let l = layout();
        // Two sequences with prefill-sized rings, one with a decode-sized ring.
        let seqs = place(&l, 200, &[(700, Ring::Prefill), (700, Ring::Prefill), (300, Ring::Decode)]);
        let mut seen = std::collections::HashMap::new();
        for (s, (t, n)) in seqs.iter().enumerate() {
            for layer in 0..3 {
                for (g, e) in l.heads(layer).into_iter().enumerate() {
                    // What a chunk of max_chunk tokens ending at n needs: every position for a
                    // retrieval head; sinks and the last recent + chunk for a streaming head.
                    let chunk = if t.cap == l.ring_rows(Ring::Prefill) { l.max_chunk } else { 1 };
                    let live: Vec<usize> = if e.kind == HeadEntry::RETRIEVAL { (0..*n).collect() } else { (0..l.sink).chain(n - l.recent - chunk + 1..*n).collect() };
                    for p in live {
                        let row = t.row(&l, e, p);
                        assert!(row < 200 * l.group() * l.block_tokens);
                        if e.kind == HeadEntry::STREAMING && t.cap == l.ring_rows(Ring::Decode) {
                            // A decode-sized ring lives in the first blocks of the region.
                            assert!(t.streaming[..l.streaming_blocks(Ring::Decode)].contains(&((row / l.block_tokens / l.group()) as u32)));
                        }
                        if let Some(prev) = seen.insert(row, (s, layer, g, p)) {
                            panic!("row {row} holds {prev:?} and {:?}", (s, layer, g, p));
                        }
                    }
                }
            }
        }
    }

    /// Streaming heads in bf16 beside a quantised cache: a block's bytes hold fewer of
    /// their (wider) units, `group()` padded so that they divide evenly; no byte of any live
    /// key or value row belongs to two rows, and every row stays inside its block's bytes.
    #[test]
    fn bf16_windows_beside_a_quantised_cache_share_no_byte() {
        let d = 64;
        for (kv, width, key_shift) in [(KvType::Fp8, 2, 0), (KvType::Int8, 2, 0), (KvType::Int4, 4, 0), (KvType::K8V4, 4, 1)] {
            let l = PagedLayout { kv, kv_streaming: KvType::Bf16, ..layout() };
            l.validate(3, 2).unwrap();
            assert_eq!((l.streaming_width(), l.group(), l.streaming_group()), (width, width.max(2), width.max(2) / width), "{kv:?}: 2 retrieval heads padded to whole streaming units");
            assert_eq!((l.streaming_key_shift(), l.streaming_args(l.paged_args(0)).key_shift, l.paged_args(0).key_shift), (key_shift, key_shift as i32, 0));
            let seqs = place(&l, 300, &[(700, Ring::Prefill), (300, Ring::Decode), (5, Ring::Prefill)]);
            for key in [true, false] {
                let bytes = |t: KvType| if key { t.key_bytes_for(d) } else { t.value_bytes_for(d) };
                let block_bytes = l.block_rows() * bytes(kv);
                let mut spans = Vec::new();
                for (t, n) in &seqs {
                    for layer in 0..3 {
                        for e in l.heads(layer) {
                            let retrieval = e.kind == HeadEntry::RETRIEVAL;
                            let w = bytes(l.kv_of(retrieval));
                            let live: Vec<usize> = if retrieval { (0..*n).collect() } else { (0..l.sink.min(*n)).chain(n.saturating_sub(l.recent).max(l.sink)..*n).collect() };
                            for p in live {
                                let at = if key { t.key_row(&l, e, p) } else { t.row(&l, e, p) } * w;
                                let block = (at / block_bytes) as u32;
                                let own = if retrieval { &t.retrieval } else { &t.streaming };
                                assert!(own.contains(&block) && (at + w - 1) / block_bytes == at / block_bytes, "{kv:?} (keys: {key}): layer {layer} head {} position {p} outside its blocks: byte {at} of {w}, block {block}, {own:?}", e.offset);
                                spans.push((at, at + w));
                            }
                        }
                    }
                }
                spans.sort_unstable();
                for pair in spans.windows(2) {
                    assert!(pair[0].1 <= pair[1].0, "{kv:?} (keys: {key}): bytes {:?} and {:?} overlap", pair[0], pair[1]);
                }
            }
        }
        // What the views cannot address: a narrower window, two quantised types.
        for (kv, kv_streaming) in [(KvType::Bf16, KvType::Int4), (KvType::Int4, KvType::Fp8), (KvType::Bf16, KvType::F32), (KvType::K8V4, KvType::Int4), (KvType::Int8, KvType::K8V4)] {
            let l = PagedLayout { kv, kv_streaming, ..layout() };
            assert!(l.validate(3, 2).is_err(), "{kv:?} with {kv_streaming:?} windows");
        }
        let same = PagedLayout { kv: KvType::Int4, kv_streaming: KvType::Int4, ..layout() };
        assert_eq!((same.streaming_width(), same.group(), same.split_types()), (1, 2, false));
        // No streaming heads (full attention, or a rank that holds retrieval heads only): one
        // type, blocks unpadded.
        let full = PagedLayout { retrieval: vec![vec![true; 2]; 3], kv: KvType::Int4, kv_streaming: KvType::Bf16, ..layout() };
        assert_eq!((full.streaming_width(), full.group(), full.split_types()), (1, 6, false));
    }

    /// `PagedArgs` goes to the kernels by value as `struct Paged` of [`PREFIX`]: three
    /// 8-byte addresses, then eight 32-bit fields in the same order.
    #[test]
    fn the_kernels_view_has_the_cuda_structs_layout() {
        assert_eq!(std::mem::size_of::<PagedArgs>(), 3 * 8 + 8 * 4);
        let fields = PREFIX.split("struct Paged {").nth(1).and_then(|s| s.split("};").next()).expect("struct Paged in PREFIX");
        assert!(fields.trim().ends_with("int stride, streaming_at, group, n_streaming, sink_pad, block_log2, kv_format, key_shift;"), "{fields}");
        let a = PagedLayout { kv: KvType::K8V4, kv_streaming: KvType::Bf16, ..layout() }.paged_args(7);
        let base = &a as *const PagedArgs as usize;
        assert_eq!((&a.stride as *const i32 as usize - base, &a.key_shift as *const i32 as usize - base), (24, 52));
    }

    #[test]
    fn the_allocator_never_hands_out_a_block_twice() {
        let mut a = Allocator::new(10, 1);
        let x = a.take(4).unwrap();
        assert_eq!(x, vec![0, 1, 2, 3]);
        assert!(a.take(7).is_none(), "only 6 free");
        assert_eq!(a.free_blocks(), 6);
        let y = a.take(6).unwrap();
        a.give(&x);
        let z = a.take(4).unwrap();
        let mut all: Vec<u32> = y.iter().chain(&z).copied().collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(a.take_slot(), Some(0));
        assert_eq!(a.take_slot(), None);
    }
}
