//! Attention over a set of key segments with a visibility rule.
//!
//! A query head attends to one or more *segments* of keys and values: the retrieval
//! cache of its KV head, or the sink part and the ring part of a streaming cache, plus
//! the keys of the chunk being processed. Each segment knows the absolute positions of
//! its rows, and a [`Visibility`] rule decides which (query, key) pairs count:
//!
//! * [`Visibility::Causal`] — `j <= i` (full attention, retrieval heads);
//! * [`Visibility::Lambda`] — `j <= i && (j < sink || i - j < recent)`, the Λ-shaped
//!   streaming mask, applied from the first token;
//! * [`Visibility::CachedAndCausal`] — every cached key, plus the chunk's keys causally:
//!   the DuoAttention reference code's chunked prefill for streaming heads.
//!
//! [`attend`] is the fast kernel: for contiguous segments it computes the visible index
//! ranges of each query row instead of testing every pair, so a streaming head's work
//! is linear in the length; it runs a single-pass (online) softmax over blocks of keys.
//! [`reference_attention`] materialises every score in `f64` and is the parity oracle.

use crate::ops::fast_exp;

/// How a cache stores a key or value element: `f32`, `half::f16` for half the bytes, or `i8`
/// codes with a scale per row for a quarter ([`crate::kv8`]; the scales ride beside the rows
/// in [`KeySegment`]). Attention computes in `f32` either way; an element is widened where it
/// is read (a row's scale multiplies its score, and its weight in the values), so an `f32`
/// cache gives exactly the bits it gave before caches could be anything else.
pub trait KvElem: Copy + Send + Sync + std::fmt::Debug + PartialEq + 'static {
    /// Bytes per element.
    const BYTES: usize;
    /// Whether each row carries a scale (`i8`): then a cached row is [`Self::encode_row`]'s.
    const ROW_SCALED: bool = false;
    /// `row` appended to `out` as this type caches it; returns the row's scale (1 where rows
    /// carry none).
    fn encode_row(row: &[f32], out: &mut Vec<Self>) -> f32 {
        out.extend(row.iter().map(|&x| Self::from_f32(x)));
        1.0
    }
    /// `row` written over `out` (as long as `row`) as this type caches it; returns its scale.
    fn encode_into(row: &[f32], out: &mut [Self]) -> f32 {
        for (o, &x) in out.iter_mut().zip(row) {
            *o = Self::from_f32(x);
        }
        1.0
    }
    /// The element nearest `x`.
    fn from_f32(x: f32) -> Self;
    /// Its value (exact).
    fn to_f32(self) -> f32;
    /// `x` as elements: borrowed where they are `f32`, rounded into a new buffer otherwise.
    fn from_f32_slice(x: &[f32]) -> std::borrow::Cow<'_, [Self]>;
    /// Eight elements from `p`, widened.
    ///
    /// # Safety
    /// `p` must point to eight readable elements.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    #[allow(unsafe_code)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    const BYTES: usize = 4;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32_slice(x: &[f32]) -> std::borrow::Cow<'_, [Self]> {
        std::borrow::Cow::Borrowed(x)
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees eight readable floats at `p`.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl KvElem for half::f16 {
    const BYTES: usize = 2;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32_slice(x: &[f32]) -> std::borrow::Cow<'_, [Self]> {
        std::borrow::Cow::Owned(x.iter().map(|&v| half::f16::from_f32(v)).collect())
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees eight readable halves (16 bytes) at `p`; F16C is
        // enabled for the build (cfg above).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

impl KvElem for i8 {
    const BYTES: usize = 1;
    const ROW_SCALED: bool = true;
    fn encode_row(row: &[f32], out: &mut Vec<Self>) -> f32 {
        crate::kv8::encode_row(row, out)
    }
    fn encode_into(row: &[f32], out: &mut [Self]) -> f32 {
        crate::kv8::encode_into(row, out)
    }
    /// The code nearest `x` at scale 1: a code, not a value (a cache encodes each row with
    /// its own scale, [`KvElem::encode_row`]; only that is how an int8 cache holds values).
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        crate::kv8::code(x, 1.0)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    /// Codes at scale 1, as [`Self::from_f32`] (not a cache's rows).
    fn from_f32_slice(x: &[f32]) -> std::borrow::Cow<'_, [Self]> {
        std::borrow::Cow::Owned(x.iter().map(|&v| Self::from_f32(v)).collect())
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees eight readable bytes at `p`; AVX2 is enabled for the
        // build (cfg above).
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
    }
}

/// Which (query, key) pairs are visible, by absolute position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// `j <= i`.
    Causal,
    /// `j <= i && (j < sink || i - j < recent)`.
    Lambda {
        /// Leading tokens always visible.
        sink: usize,
        /// Window of most recent tokens, the current one included.
        recent: usize,
    },
    /// Keys of cached segments are all visible; other keys causally.
    CachedAndCausal,
}

impl Visibility {
    /// The rule itself, for one pair.
    #[inline]
    pub fn sees(&self, i: usize, j: usize, cached: bool) -> bool {
        match *self {
            Visibility::Causal => j <= i,
            Visibility::Lambda { sink, recent } => duo_core::cache_spec::lambda_sees(sink, recent, i, j),
            Visibility::CachedAndCausal => cached || j <= i,
        }
    }
}

/// Absolute positions of a segment's rows.
#[derive(Debug, Clone, Copy)]
pub enum Positions<'a> {
    /// Row `r` is at position `start + r`.
    Contiguous(usize),
    /// Row `r` is at `positions[r]` (a ring buffer's order).
    List(&'a [usize]),
}

/// Keys and values of consecutive rows, `row_stride` elements apart, `head_dim` used.
#[derive(Debug, Clone, Copy)]
pub struct KeySegment<'a, E: KvElem = f32> {
    /// Keys, row `r` at `keys[r * row_stride..][..head_dim]`.
    pub keys: &'a [E],
    /// Values, laid out like the keys.
    pub values: &'a [E],
    /// Distance between rows.
    pub row_stride: usize,
    /// Where each row sits in the sequence.
    pub positions: Positions<'a>,
    /// Whether the rows come from the cache (before the current chunk).
    pub cached: bool,
    /// Each key row's scale (row-scaled elements, [`KvElem::ROW_SCALED`]), by row; empty: 1.
    pub key_scales: &'a [f32],
    /// Each value row's scale, likewise.
    pub value_scales: &'a [f32],
}

impl<E: KvElem> KeySegment<'_, E> {
    /// Row `r`'s key scale.
    #[inline(always)]
    fn key_scale(&self, r: usize) -> f32 {
        if self.key_scales.is_empty() { 1.0 } else { self.key_scales[r] }
    }

    /// Row `r`'s value scale.
    #[inline(always)]
    fn value_scale(&self, r: usize) -> f32 {
        if self.value_scales.is_empty() { 1.0 } else { self.value_scales[r] }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        match self.positions {
            Positions::List(p) => p.len(),
            Positions::Contiguous(_) => {
                if self.keys.is_empty() { 0 } else { (self.keys.len() - 1) / self.row_stride + 1 }
            }
        }
    }

    /// True when the segment has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn position(&self, r: usize) -> usize {
        match self.positions {
            Positions::Contiguous(s) => s + r,
            Positions::List(p) => p[r],
        }
    }
}

/// Query rows of one head at consecutive positions, or (`shared_position`) the query heads
/// that share one KV head at one position (a decode step's group, so that each key and value
/// is read from memory once for all of them).
#[derive(Debug, Clone, Copy)]
pub struct QueryBlock<'a> {
    /// Row `r` at `queries[r * row_stride..][..head_dim]`.
    pub queries: &'a [f32],
    /// Distance between rows.
    pub row_stride: usize,
    /// Position of row 0.
    pub first_position: usize,
    /// Every row is at `first_position` (rows are heads, not positions).
    pub shared_position: bool,
}

impl QueryBlock<'_> {
    /// The position of row `r`.
    fn position(&self, r: usize) -> usize {
        if self.shared_position {
            self.first_position
        } else {
            self.first_position + r
        }
    }

    fn rows(&self, head_dim: usize) -> usize {
        if self.queries.len() < head_dim {
            0
        } else {
            (self.queries.len() - head_dim) / self.row_stride + 1
        }
    }
}

/// Keys scored per softmax block.
const BLOCK: usize = 64;

/// Attention of every query row over the visible keys; writes `out` rows of `head_dim`,
/// `out_stride` apart. A row that sees no key gets zeros.
pub fn attend<E: KvElem>(
    q: QueryBlock<'_>,
    segments: &[KeySegment<'_, E>],
    vis: Visibility,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    out_stride: usize,
) {
    let rows = q.rows(head_dim);
    let state = attend_state(q, segments, vis, head_dim, scale);
    for r in 0..rows {
        state.write_row(r, head_dim, &mut out[r * out_stride..][..head_dim]);
    }
}

/// The online-softmax state of query rows after some keys: per row the running maximum
/// score `m`, the sum of `exp(score - m)` `l`, and the weighted sum of values `acc` (rows of
/// `head_dim`). States over disjoint sets of keys merge into the state over their union.
#[derive(Debug, Clone)]
pub struct SoftmaxState {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
}

impl SoftmaxState {
    /// Folds `other` (the same rows over other keys) into this state.
    pub fn merge(&mut self, other: &SoftmaxState, head_dim: usize) {
        for r in 0..self.m.len() {
            let (mo, lo) = (other.m[r], other.l[r]);
            if lo == 0.0 {
                continue;
            }
            let m = self.m[r].max(mo);
            let (a, b) = ((self.m[r] - m).exp(), (mo - m).exp());
            self.l[r] = self.l[r] * a + lo * b;
            for (x, y) in self.acc[r * head_dim..(r + 1) * head_dim]
                .iter_mut()
                .zip(&other.acc[r * head_dim..(r + 1) * head_dim])
            {
                *x = *x * a + y * b;
            }
            self.m[r] = m;
        }
    }

    /// Row `r`'s attention output (zeros where it saw no key).
    pub fn write_row(&self, r: usize, head_dim: usize, out: &mut [f32]) {
        if self.l[r] > 0.0 {
            let inv = 1.0 / self.l[r];
            for (o, a) in out
                .iter_mut()
                .zip(&self.acc[r * head_dim..(r + 1) * head_dim])
            {
                *o = a * inv;
            }
        } else {
            out.fill(0.0);
        }
    }
}

/// [`attend`]'s work before the outputs are normalised: the softmax state of every row.
pub fn attend_state<E: KvElem>(
    q: QueryBlock<'_>,
    segments: &[KeySegment<'_, E>],
    vis: Visibility,
    head_dim: usize,
    scale: f32,
) -> SoftmaxState {
    let rows = q.rows(head_dim);
    debug_assert!(
        segments.iter().all(|s| !E::ROW_SCALED || (s.key_scales.len() == s.len() && s.value_scales.len() == s.len())),
        "row-scaled elements come with a key and a value scale for every row"
    );
    // Rows that share a position (a decode step's query heads) take the one-row paths only,
    // so each gets the bits it would get alone.
    let wide = rows >= 8 && !q.shared_position;
    let mut scores = [0.0f32; BLOCK];
    // Each row's online-softmax state; segments are taken one after another for all rows, so
    // every row still sees its segments, ranges and blocks in the order it would alone.
    let (mut m, mut l) = (vec![f32::NEG_INFINITY; rows], vec![0.0f32; rows]);
    let mut acc = vec![0.0f32; rows * head_dim];
    let qrow = |r: usize| &q.queries[r * q.row_stride..][..head_dim];
    for seg in segments {
        let n = seg.len();
        match seg.positions {
            Positions::Contiguous(start) => {
                #[cfg(all(
                    target_arch = "x86_64",
                    target_feature = "avx2",
                    target_feature = "fma"
                ))]
                if let Visibility::Lambda { sink, recent } = vis {
                    if rows >= tiled::MIN_ROWS && !q.shared_position && head_dim.is_multiple_of(16) {
                        // Many rows under the Λ rule: the sinks, then each row's window, on
                        // register tiles with per-row ranges (blocks aligned to the segment,
                        // so a row's bits do not follow the tiling).
                        let (sinks, windows): (Vec<_>, Vec<_>) = (0..rows).map(|r| lambda_ranges(sink, recent, q.position(r), start, n)).unzip();
                        for part in [&sinks, &windows] {
                            tiled::ranged_rows(&|r| qrow(r), seg, part, scale, &mut m, &mut l, &mut acc);
                        }
                        continue;
                    }
                }
                let ranges: Vec<Vec<(usize, usize)>> = (0..rows)
                    .map(|r| visible_ranges(vis, q.position(r), start, n, seg.cached))
                    .collect();
                let first = ranges.iter().find_map(|rg| rg.first().map(|x| x.0));
                let lockstep = ranges
                    .iter()
                    .all(|rg| rg.len() <= 1 && rg.first().is_none_or(|x| Some(x.0) == first));
                if let (true, Some(a)) = (lockstep, first) {
                    let ends: Vec<usize> = ranges
                        .iter()
                        .map(|rg| rg.first().map_or(a, |x| x.1))
                        .collect();
                    #[cfg(all(
                        target_arch = "x86_64",
                        target_feature = "avx2",
                        target_feature = "fma"
                    ))]
                    // (The Λ rule took its own tiled path above: per-row ranges.)
                    if rows >= tiled::MIN_ROWS
                        && !q.shared_position
                        && head_dim.is_multiple_of(16)
                        && !matches!(vis, Visibility::Lambda { .. })
                    {
                        // Many rows over the same keys: matrix products on register tiles.
                        tiled::causal_rows(
                            &|r| qrow(r),
                            seg,
                            a,
                            &ends,
                            scale,
                            &mut m,
                            &mut l,
                            &mut acc,
                        );
                        continue;
                    }
                    // One range per row, all from the same key (causal rules): the rows walk
                    // the same blocks together, so a block of keys and values is read once
                    // for all of them, each row stopping at its own end.
                    let end = ends.iter().copied().max().unwrap_or(a);
                    let mut j = a;
                    while j < end {
                        for (r, rg) in ranges.iter().enumerate() {
                            let Some(&(_, b)) = rg.first() else { continue };
                            if j < b {
                                let e = (j + BLOCK).min(b);
                                block_update(
                                    qrow(r),
                                    seg,
                                    j..e,
                                    scale,
                                    &mut scores,
                                    &mut m[r],
                                    &mut l[r],
                                    &mut acc[r * head_dim..(r + 1) * head_dim],
                                    wide,
                                );
                            }
                        }
                        j += BLOCK;
                    }
                } else {
                    for (r, rg) in ranges.iter().enumerate() {
                        for &(a, b) in rg {
                            let mut j = a;
                            while j < b {
                                let e = (j + BLOCK).min(b);
                                block_update(
                                    qrow(r),
                                    seg,
                                    j..e,
                                    scale,
                                    &mut scores,
                                    &mut m[r],
                                    &mut l[r],
                                    &mut acc[r * head_dim..(r + 1) * head_dim],
                                    wide,
                                );
                                j = e;
                            }
                        }
                    }
                }
            }
            Positions::List(_) => {
                // Small segments (a streaming ring): test each row.
                for r in 0..rows {
                    let i = q.position(r);
                    let row_acc = &mut acc[r * head_dim..(r + 1) * head_dim];
                    let mut idx = [0usize; BLOCK];
                    let mut count = 0;
                    for rr in 0..n {
                        if vis.sees(i, seg.position(rr), seg.cached) {
                            idx[count] = rr;
                            count += 1;
                            if count == BLOCK {
                                gathered_update(
                                    qrow(r),
                                    seg,
                                    &idx[..count],
                                    scale,
                                    &mut scores,
                                    &mut m[r],
                                    &mut l[r],
                                    row_acc,
                                    wide,
                                );
                                count = 0;
                            }
                        }
                    }
                    if count > 0 {
                        gathered_update(
                            qrow(r),
                            seg,
                            &idx[..count],
                            scale,
                            &mut scores,
                            &mut m[r],
                            &mut l[r],
                            row_acc,
                            wide,
                        );
                    }
                }
            }
        }
    }
    SoftmaxState { m, l, acc }
}

/// A query's two ranges under the Λ rule (segment-relative, each possibly empty): its sinks,
/// then its recent window (what [`visible_ranges`] gives under Λ, empty ones dropped).
fn lambda_ranges(sink: usize, recent: usize, i: usize, start: usize, n: usize) -> ((usize, usize), (usize, usize)) {
    let causal_end = (start + n).min(i + 1).max(start);
    let sink_end = causal_end.min(sink).max(start);
    let win_start = (i + 1).saturating_sub(recent).max(sink_end).max(start);
    ((0, sink_end - start), (win_start - start, causal_end.max(win_start) - start))
}

/// Visible row ranges `[a, b)` (segment-relative) of a contiguous segment for query `i`.
fn visible_ranges(vis: Visibility, i: usize, start: usize, n: usize, cached: bool) -> Vec<(usize, usize)> {
    let end = start + n; // exclusive, absolute
    let causal_end = end.min(i + 1);
    let clip = |a: usize, b: usize| if b > a { Some((a - start, b - start)) } else { None };
    match vis {
        Visibility::Causal => clip(start, causal_end.max(start)).into_iter().collect(),
        Visibility::CachedAndCausal => {
            if cached { clip(start, end).into_iter().collect() } else { clip(start, causal_end.max(start)).into_iter().collect() }
        }
        Visibility::Lambda { sink, recent } => {
            let (sinks, window) = lambda_ranges(sink, recent, i, start, n);
            [sinks, window].into_iter().filter(|r| r.1 > r.0).collect()
        }
    }
}

#[inline(always)]
fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    // Eight lanes of multiply-adds over the chunks of 8, then the lanes summed in order.
    let mut s = [0.0f32; 8];
    let whole = a.len().min(b.len()) / 8 * 8;
    let tail: f32 = a[whole..].iter().zip(&b[whole..]).map(|(x, y)| x * y.to_f32()).sum();
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    #[allow(unsafe_code)]
    // SAFETY: AVX2, FMA and F16C are enabled for the build (cfg); loads read a[c..c + 8] and
    // b[c..c + 8] with c + 8 <= whole <= both lengths; the store writes s's 8 lanes. Each lane
    // takes the same fused multiply-adds, in the same order, as the scalar form below.
    unsafe {
        use std::arch::x86_64::*;
        let mut v = _mm256_setzero_ps();
        for c in (0..whole).step_by(8) {
            v = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(c)), E::load8(b.as_ptr().add(c)), v);
        }
        _mm256_storeu_ps(s.as_mut_ptr(), v);
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    for c in (0..whole).step_by(8) {
        for k in 0..8 {
            s[k] = a[c + k].mul_add(b[c + k].to_f32(), s[k]);
        }
    }
    s.iter().sum::<f32>() + tail
}

/// `scores[k] = dot(qrow, key(row(k))) * scale` (times the key row's scale for row-scaled
/// elements) for `k < n`; with `wide`, eight keys at a
/// time where the head dimension is a multiple of 8 (the same bits as [`dot`], see
/// `simd::dot8`). Prefill (many query rows) gains from it; a single decode row, which only
/// streams the cache from memory, measured slower with it (BENCHMARKS.md), so it keeps
/// one key at a time.
#[inline(always)]
fn score_rows<E: KvElem>(qrow: &[f32], seg: &KeySegment<'_, E>, n: usize, row: impl Fn(usize) -> usize, scale: f32, scores: &mut [f32], wide: bool) {
    let hd = qrow.len();
    let key = |k: usize| &seg.keys[row(k) * seg.row_stride..][..hd];
    let mut k = 0;
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    if wide && hd.is_multiple_of(8) {
        while k + 8 <= n {
            let d = simd::dot8(qrow, [key(k), key(k + 1), key(k + 2), key(k + 3), key(k + 4), key(k + 5), key(k + 6), key(k + 7)]);
            for (i, v) in d.into_iter().enumerate() {
                scores[k + i] = if E::ROW_SCALED { v * (scale * seg.key_scale(row(k + i))) } else { v * scale };
            }
            k += 8;
        }
    }
    for (k, sc) in scores.iter_mut().enumerate().take(n).skip(k) {
        *sc = if E::ROW_SCALED { dot(qrow, key(k)) * (scale * seg.key_scale(row(k))) } else { dot(qrow, key(k)) * scale };
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
#[allow(unsafe_code)]
mod simd {
    //! Eight dot products at once, bit for bit [`super::dot`]: each key's 8 lanes take the
    //! same fused multiply-adds in the same order; then, instead of summing a key's lanes
    //! one after another (seven dependent scalar adds per key), the 8 x 8 lanes are
    //! transposed so that one vector add sums lane `i` of all eight keys, in the same lane
    //! order `dot` uses.
    use super::KvElem;
    use std::arch::x86_64::*;

    #[inline(always)]
    pub(super) fn dot8<E: KvElem>(a: &[f32], b: [&[E]; 8]) -> [f32; 8] {
        let n = a.len();
        assert!(n.is_multiple_of(8) && b.iter().all(|r| r.len() >= n));
        let mut out = [0.0f32; 8];
        // SAFETY: AVX2, FMA and F16C are enabled for the whole build (cfg above); every load reads
        // 8 floats at `c + 8 <= n` of slices checked above; the store writes `out`'s 8.
        unsafe {
            let mut s = [_mm256_setzero_ps(); 8];
            let mut c = 0;
            while c < n {
                let x = _mm256_loadu_ps(a.as_ptr().add(c));
                for j in 0..8 {
                    s[j] = _mm256_fmadd_ps(x, E::load8(b[j].as_ptr().add(c)), s[j]);
                }
                c += 8;
            }
            // Transpose: t[i] holds lane i of every key.
            let u0 = _mm256_unpacklo_ps(s[0], s[1]);
            let u1 = _mm256_unpackhi_ps(s[0], s[1]);
            let u2 = _mm256_unpacklo_ps(s[2], s[3]);
            let u3 = _mm256_unpackhi_ps(s[2], s[3]);
            let u4 = _mm256_unpacklo_ps(s[4], s[5]);
            let u5 = _mm256_unpackhi_ps(s[4], s[5]);
            let u6 = _mm256_unpacklo_ps(s[6], s[7]);
            let u7 = _mm256_unpackhi_ps(s[6], s[7]);
            let v0 = _mm256_shuffle_ps::<0x44>(u0, u2);
            let v1 = _mm256_shuffle_ps::<0xEE>(u0, u2);
            let v2 = _mm256_shuffle_ps::<0x44>(u1, u3);
            let v3 = _mm256_shuffle_ps::<0xEE>(u1, u3);
            let v4 = _mm256_shuffle_ps::<0x44>(u4, u6);
            let v5 = _mm256_shuffle_ps::<0xEE>(u4, u6);
            let v6 = _mm256_shuffle_ps::<0x44>(u5, u7);
            let v7 = _mm256_shuffle_ps::<0xEE>(u5, u7);
            let t = [
                _mm256_permute2f128_ps::<0x20>(v0, v4),
                _mm256_permute2f128_ps::<0x20>(v1, v5),
                _mm256_permute2f128_ps::<0x20>(v2, v6),
                _mm256_permute2f128_ps::<0x20>(v3, v7),
                _mm256_permute2f128_ps::<0x31>(v0, v4),
                _mm256_permute2f128_ps::<0x31>(v1, v5),
                _mm256_permute2f128_ps::<0x31>(v2, v6),
                _mm256_permute2f128_ps::<0x31>(v3, v7),
            ];
            // dot sums lanes 0, 1, ..., 7 in order, starting from 0.0 (`Iterator::sum`).
            let mut sum = _mm256_add_ps(_mm256_setzero_ps(), t[0]);
            for ti in &t[1..] {
                sum = _mm256_add_ps(sum, *ti);
            }
            _mm256_storeu_ps(out.as_mut_ptr(), sum);
        }
        out
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
#[allow(unsafe_code)]
mod tiled {
    //! Prefill attention of many query rows over the same keys as two small matrix products
    //! per block of 64 keys. The key block is transposed once (`[dim][key]`), so scores of 4
    //! rows x 16 keys accumulate in 8 registers with one broadcast per row and two key loads
    //! per dimension; the weighted values of 4 rows x 16 dimensions likewise, one broadcast
    //! weight per row and two value loads per key. The row-at-a-time path spends a load per
    //! multiply-add and transposes every eight scores; this one reuses each load for four
    //! rows. Sums run in a different order than the row-at-a-time path (each score one
    //! chain over the dimensions), so a row's bits differ from it in the last places; the
    //! result is still per row (no row's numbers depend on another's), and the same rows
    //! give the same bits whatever else runs.
    use super::{KeySegment, KvElem, BLOCK};
    use crate::ops::fast_exp;
    use std::arch::x86_64::*;

    /// Fewest rows for which the tiles pay.
    pub(super) const MIN_ROWS: usize = 8;
    /// Rows per register tile.
    pub(super) const R: usize = 4;

    /// Folds the keys `start..ends[r]` of `seg` (segment rows) into row `r`'s online-softmax
    /// state (`m[r]`, `l[r]`, `acc[r]`), for every row, in blocks of [`BLOCK`] keys.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn causal_rows<'q, E: KvElem>(
        qrow: &dyn Fn(usize) -> &'q [f32],
        seg: &KeySegment<'_, E>,
        start: usize,
        ends: &[usize],
        scale: f32,
        m: &mut [f32],
        l: &mut [f32],
        acc: &mut [f32],
    ) {
        let ranges: Vec<(usize, usize)> = ends.iter().map(|&e| (start, e)).collect();
        ranged_rows(qrow, seg, &ranges, scale, m, l, acc);
    }

    /// Folds the keys `ranges[r].0..ranges[r].1` of `seg` (segment rows) into row `r`'s
    /// online-softmax state, for every row. Blocks of [`BLOCK`] keys are aligned to the
    /// segment (not to the rows' ranges), so a row meets the same blocks in the same order
    /// whatever rows it is tiled with, and keeps its bits (a block's keys outside a row's range
    /// get zero weight and leave its sums as they were). The Λ rule's windows start at each
    /// row's own key: that is why the alignment matters.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn ranged_rows<'q, E: KvElem>(
        qrow: &dyn Fn(usize) -> &'q [f32],
        seg: &KeySegment<'_, E>,
        ranges: &[(usize, usize)],
        scale: f32,
        m: &mut [f32],
        l: &mut [f32],
        acc: &mut [f32],
    ) {
        let rows = ranges.len();
        let hd = acc.len() / rows.max(1);
        assert!(
            hd.is_multiple_of(16) && acc.len() == rows * hd && m.len() == rows && l.len() == rows
        );
        let live = || ranges.iter().filter(|r| r.1 > r.0);
        let (Some(start), Some(end)) = (live().map(|r| r.0).min(), live().map(|r| r.1).max()) else {
            return;
        };
        let start = start / BLOCK * BLOCK;
        let key = |k: usize| &seg.keys[k * seg.row_stride..][..hd];
        let mut kt = vec![0.0f32; hd * BLOCK]; // [dim][key]
        let mut p = vec![0.0f32; rows.div_ceil(R) * R * BLOCK]; // scores, then weights
        let mut j = start;
        while j < end {
            let e = (j + BLOCK).min(end);
            let nk = e - j;
            let strips = nk.div_ceil(16);
            for k in 0..nk {
                let ks = seg.key_scale(j + k);
                for (d, &x) in key(j + k).iter().enumerate() {
                    kt[d * BLOCK + k] = if E::ROW_SCALED { x.to_f32() * ks } else { x.to_f32() };
                }
            }
            for k in nk..strips * 16 {
                for d in 0..hd {
                    kt[d * BLOCK + k] = 0.0;
                }
            }
            // A row's visible keys of the block: `lo..hi` (block-relative, empty when lo >= hi).
            let seen = |r: usize| {
                let (a, b) = ranges[r];
                (a.max(j).saturating_sub(j), b.min(e).saturating_sub(j))
            };
            for g in (0..rows).step_by(R) {
                let group = g..(g + R).min(rows);
                if group.clone().all(|r| {
                    let (lo, hi) = seen(r);
                    hi <= lo
                }) {
                    continue;
                }
                let qs: [&[f32]; R] = std::array::from_fn(|i| qrow((g + i).min(rows - 1)));
                let tile = &mut p[g * BLOCK..(g + R) * BLOCK];
                // SAFETY: AVX2, FMA and F16C are enabled for the build (cfg on the module);
                // the CPU reports AVX-512 F and DQ where `wide512` says so.
                if wide512() && strips.is_multiple_of(2) {
                    unsafe { scores512(&qs, &kt, hd, strips, scale, tile) };
                } else {
                    unsafe { scores(&qs, &kt, hd, strips, scale, tile) };
                }
                // Online softmax per row over its visible keys of the block; weights past a
                // row's end are zero, so the value product can run over the whole group.
                let mut used = 0;
                for r in group.clone() {
                    let row = &mut tile[(r - g) * BLOCK..(r - g + 1) * BLOCK];
                    let (lo, c) = seen(r);
                    if c <= lo {
                        row[..strips * 16].fill(0.0);
                        continue;
                    }
                    used = used.max(c);
                    let bm = max_of(&row[lo..c]);
                    let row_acc = &mut acc[r * hd..(r + 1) * hd];
                    if bm > m[r] {
                        let f = fast_exp(m[r] - bm);
                        l[r] *= f;
                        row_acc.iter_mut().for_each(|a| *a *= f);
                        m[r] = bm;
                    }
                    exp_minus(&mut row[..c.div_ceil(8) * 8], m[r]);
                    row[..lo].fill(0.0);
                    row[c..strips * 16].fill(0.0);
                    // Eight partial sums (the weights past `c` are zero), then their total.
                    let mut part = [0.0f32; 8];
                    for w in row[..strips * 16].chunks_exact(8) {
                        for (p, x) in part.iter_mut().zip(w) {
                            *p += x;
                        }
                    }
                    l[r] += part.iter().sum::<f32>();
                }
                let mut outs: [&mut [f32]; R] = Default::default();
                let mut rest = &mut acc[g * hd..];
                for (i, o) in outs.iter_mut().enumerate() {
                    if g + i < rows {
                        let (head, tail) = rest.split_at_mut(hd);
                        *o = head;
                        rest = tail;
                    }
                }
                if used > 0 && E::ROW_SCALED {
                    // Row-scaled values: each key's weight times its value row's scale (the
                    // sums above took the weights alone).
                    for r in group.clone() {
                        let row = &mut tile[(r - g) * BLOCK..(r - g + 1) * BLOCK];
                        for (k, w) in row[..used].iter_mut().enumerate() {
                            *w *= seg.value_scale(j + k);
                        }
                    }
                }
                if used > 0 {
                    // Rows j..j + used of the segment, `row_stride` apart, `hd` used of the last.
                    let vals =
                        &seg.values[j * seg.row_stride..(j + used - 1) * seg.row_stride + hd];
                    // SAFETY: as for the scores above.
                    if wide512() && hd.is_multiple_of(32) {
                        unsafe {
                            weighted_values512(tile, vals, seg.row_stride, used, hd, &mut outs)
                        };
                    } else {
                        unsafe { weighted_values(tile, vals, seg.row_stride, used, hd, &mut outs) };
                    }
                }
            }
            j = e;
        }
    }

    /// The largest of `x` (not empty).
    fn max_of(x: &[f32]) -> f32 {
        let whole = x.len() / 8 * 8;
        let mut best = x[whole..].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if whole > 0 {
            // SAFETY: AVX2 as above; loads read x[i .. i + 8] with i + 8 <= whole <= x.len().
            unsafe {
                let mut v = _mm256_loadu_ps(x.as_ptr());
                for i in (8..whole).step_by(8) {
                    v = _mm256_max_ps(v, _mm256_loadu_ps(x.as_ptr().add(i)));
                }
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                best = lanes.iter().copied().fold(best, f32::max);
            }
        }
        best
    }

    /// `x[i] = e^(x[i] - m)` for a length that is a multiple of 8: [`fast_exp`]'s clamp,
    /// reduction and polynomial, eight lanes at a time.
    fn exp_minus(x: &mut [f32], m: f32) {
        assert!(x.len().is_multiple_of(8));
        // SAFETY: AVX2/FMA as above; each load and store touches x[i .. i + 8], i + 8 <= len.
        unsafe {
            let (lo, hi) = (_mm256_set1_ps(-87.0), _mm256_set1_ps(88.0));
            let (log2e, c1, c2) = (_mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.693_145_75), _mm256_set1_ps(1.428_606_8e-6));
            let coef = [0.001_393_8f32, 0.008_333_6, 0.041_666_5, 0.166_666_67, 0.5, 1.0, 1.0].map(|c| _mm256_set1_ps(c));
            let mv = _mm256_set1_ps(m);
            for i in (0..x.len()).step_by(8) {
                let v = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), mv), lo), hi);
                let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(v, log2e));
                let r = _mm256_fnmadd_ps(n, c2, _mm256_fnmadd_ps(n, c1, v));
                let mut p = coef[0];
                for c in &coef[1..] {
                    p = _mm256_fmadd_ps(p, r, *c);
                }
                let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
                _mm256_storeu_ps(x.as_mut_ptr().add(i), _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
            }
        }
    }

    /// Whether the CPU has AVX-512 F and DQ (checked once; `DUO_NO_AVX512` turns it off).
    /// The 512-bit forms below give every score and every output element the same chain of
    /// fused multiply-adds as the 256-bit ones, so the same bits: a wider register only holds
    /// more independent chains.
    pub(super) fn wide512() -> bool {
        static W: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *W.get_or_init(|| std::env::var_os("DUO_NO_AVX512").is_none() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq"))
    }

    /// The two tile products, one body for each register width: `$w` lanes per register,
    /// so a pass covers 4 rows x `2 $w` keys (scores) or dimensions (values). Every score and
    /// every output element is the same chain of fused multiply-adds at either width, so
    /// both give the same bits (tested): a wider register only holds more chains.
    macro_rules! tile_kernels {
        ($scores:ident, $values:ident, $features:literal, $w:literal, $v:ty,
         zero: $zero:path, load: $load:path, set1: $set1:path, fmadd: $fmadd:path, mul: $mul:path, store: $store:path,
         load_kv: |$p:ident| $load_kv:expr) => {
            /// `tile[r][k] = scale * q_r . key k` for 4 rows and `strips` strips of 16 keys of
            /// `kt` (`strips * 16` a multiple of twice the register width).
            ///
            /// # Safety
            /// The CPU must have the features the function enables.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $scores(qs: &[&[f32]; R], kt: &[f32], hd: usize, strips: usize, scale: f32, tile: &mut [f32]) {
                assert!(kt.len() >= hd * BLOCK && tile.len() >= R * BLOCK && strips * 16 <= BLOCK && (strips * 16).is_multiple_of(2 * $w) && qs.iter().all(|q| q.len() >= hd));
                // SAFETY: the features are the caller's promise; loads read kt[d * BLOCK + s ..
                // + 2w] with d < hd, s + 2w <= strips * 16 <= BLOCK, and q[d] with d < hd, all
                // inside the slices checked above; stores write tile[r * BLOCK + s .. + 2w], r < 4.
                unsafe {
                    let sc = $set1(scale);
                    for s in (0..strips * 16).step_by(2 * $w) {
                        let mut a: [[$v; 2]; R] = [[$zero(); 2]; R];
                        for d in 0..hd {
                            let k0 = $load(kt.as_ptr().add(d * BLOCK + s));
                            let k1 = $load(kt.as_ptr().add(d * BLOCK + s + $w));
                            for (ar, q) in a.iter_mut().zip(qs) {
                                let q = $set1(*q.as_ptr().add(d));
                                ar[0] = $fmadd(q, k0, ar[0]);
                                ar[1] = $fmadd(q, k1, ar[1]);
                            }
                        }
                        for (r, ar) in a.iter().enumerate() {
                            $store(tile.as_mut_ptr().add(r * BLOCK + s), $mul(ar[0], sc));
                            $store(tile.as_mut_ptr().add(r * BLOCK + s + $w), $mul(ar[1], sc));
                        }
                    }
                }
            }

            /// `outs[r] += sum_k w[r][k] * value k` for the rows present and the first `n`
            /// value rows of `vals` (`stride` apart), in key order per element (`hd` a
            /// multiple of twice the register width).
            ///
            /// # Safety
            /// The CPU must have the features the function enables.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $values<E: KvElem>(w: &[f32], vals: &[E], stride: usize, n: usize, hd: usize, outs: &mut [&mut [f32]; R]) {
                assert!(w.len() >= R * BLOCK && (1..=BLOCK).contains(&n) && vals.len() >= (n - 1) * stride + hd && hd.is_multiple_of(2 * $w));
                let present = outs.iter().filter(|o| !o.is_empty()).count();
                assert!(outs[..present].iter().all(|o| o.len() >= hd));
                // SAFETY: the features are the caller's promise; value loads read vals[k * stride
                // + c .. + 2w] with k < n, c + 2w <= hd, inside the length checked above; weights
                // w[r * BLOCK + k] with r < 4, k < n <= BLOCK; outputs are read and written at
                // [c .. c + 2w] only for the `present` rows, each at least hd long.
                unsafe {
                    for c in (0..hd).step_by(2 * $w) {
                        let mut a: [[$v; 2]; R] = [[$zero(); 2]; R];
                        for r in 0..present {
                            a[r][0] = $load(outs[r].as_ptr().add(c));
                            a[r][1] = $load(outs[r].as_ptr().add(c + $w));
                        }
                        let mut v = vals.as_ptr().add(c);
                        for k in 0..n {
                            let v0 = { let $p = v; $load_kv };
                            let v1 = { let $p = v.add($w); $load_kv };
                            for (r, ar) in a.iter_mut().enumerate() {
                                let p = $set1(*w.as_ptr().add(r * BLOCK + k));
                                ar[0] = $fmadd(p, v0, ar[0]);
                                ar[1] = $fmadd(p, v1, ar[1]);
                            }
                            if k + 1 < n {
                                v = v.add(stride);
                            }
                        }
                        for r in 0..present {
                            $store(outs[r].as_mut_ptr().add(c), a[r][0]);
                            $store(outs[r].as_mut_ptr().add(c + $w), a[r][1]);
                        }
                    }
                }
            }
        };
    }

    tile_kernels!(scores, weighted_values, "avx2,fma,f16c", 8, __m256,
        zero: _mm256_setzero_ps, load: _mm256_loadu_ps, set1: _mm256_set1_ps, fmadd: _mm256_fmadd_ps, mul: _mm256_mul_ps, store: _mm256_storeu_ps,
        load_kv: |p| E::load8(p));
    tile_kernels!(scores512, weighted_values512, "avx2,fma,f16c,avx512f,avx512dq", 16, __m512,
        zero: _mm512_setzero_ps, load: _mm512_loadu_ps, set1: _mm512_set1_ps, fmadd: _mm512_fmadd_ps, mul: _mm512_mul_ps, store: _mm512_storeu_ps,
        load_kv: |p| _mm512_insertf32x8::<1>(_mm512_castps256_ps512(E::load8(p)), E::load8(p.add(8))));
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block_update<E: KvElem>(
    qrow: &[f32],
    seg: &KeySegment<'_, E>,
    rows: std::ops::Range<usize>,
    scale: f32,
    scores: &mut [f32; BLOCK],
    m: &mut f32,
    l: &mut f32,
    acc: &mut [f32],
    wide: bool,
) {
    let hd = qrow.len();
    let cnt = rows.len();
    score_rows(qrow, seg, cnt, |k| rows.start + k, scale, &mut scores[..], wide);
    softmax_accumulate(&mut scores[..cnt], m, l, acc, |k| &seg.values[(rows.start + k) * seg.row_stride..][..hd], |k| seg.value_scale(rows.start + k));
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gathered_update<E: KvElem>(
    qrow: &[f32],
    seg: &KeySegment<'_, E>,
    idx: &[usize],
    scale: f32,
    scores: &mut [f32; BLOCK],
    m: &mut f32,
    l: &mut f32,
    acc: &mut [f32],
    wide: bool,
) {
    let hd = qrow.len();
    score_rows(qrow, seg, idx.len(), |k| idx[k], scale, &mut scores[..], wide);
    softmax_accumulate(&mut scores[..idx.len()], m, l, acc, |k| &seg.values[idx[k] * seg.row_stride..][..hd], |k| seg.value_scale(idx[k]));
}

#[inline(always)]
fn softmax_accumulate<'v, E: KvElem>(scores: &mut [f32], m: &mut f32, l: &mut f32, acc: &mut [f32], value: impl Fn(usize) -> &'v [E], value_scale: impl Fn(usize) -> f32) {
    let bm = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if bm > *m {
        let c = fast_exp(*m - bm);
        *l *= c;
        for a in acc.iter_mut() {
            *a *= c;
        }
        *m = bm;
    }
    let mm = *m;
    for s in scores.iter_mut() {
        *s = fast_exp(*s - mm);
    }
    // The weighted values, 64 dimensions at a time kept in registers across the block's keys
    // (each element still takes its keys' multiply-adds in key order); the weights' sum in
    // key order rides along with the first pass, where the multiply-adds hide its latency.
    const W: usize = 64;
    let whole = acc.len() / W * W;
    let mut sum = *l;
    for c in (0..whole).step_by(W) {
        let mut local = [0.0f32; W];
        local.copy_from_slice(&acc[c..c + W]);
        for (k, &p) in scores.iter().enumerate() {
            if c == 0 {
                sum += p;
            }
            let v: &[E; W] = value(k)[c..c + W].try_into().expect("64 values");
            // A row-scaled value row weighs its weight times its scale (the sum takes the weight).
            weighted_add(if E::ROW_SCALED { p * value_scale(k) } else { p }, v, &mut local);
        }
        acc[c..c + W].copy_from_slice(&local);
    }
    for (k, &p) in scores.iter().enumerate() {
        if whole == 0 {
            sum += p;
        }
        let pw = if E::ROW_SCALED { p * value_scale(k) } else { p };
        for (a, v) in acc[whole..].iter_mut().zip(&value(k)[whole..]) {
            *a = pw.mul_add(v.to_f32(), *a);
        }
    }
    *l = sum;
}

/// `local[i] = p * v[i] + local[i]` (fused) for 64 elements.
#[inline(always)]
fn weighted_add<E: KvElem>(p: f32, v: &[E; 64], local: &mut [f32; 64]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    #[allow(unsafe_code)]
    // SAFETY: AVX2, FMA and F16C are enabled for the build (cfg); every load and store
    // touches 8 of the 64 elements of `v` or `local`.
    unsafe {
        use std::arch::x86_64::*;
        let pv = _mm256_set1_ps(p);
        for i in (0..64).step_by(8) {
            let x = _mm256_fmadd_ps(pv, E::load8(v.as_ptr().add(i)), _mm256_loadu_ps(local.as_ptr().add(i)));
            _mm256_storeu_ps(local.as_mut_ptr().add(i), x);
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    for i in 0..64 {
        local[i] = p.mul_add(v[i].to_f32(), local[i]);
    }
}

/// One query head's work inside [`attend_heads`].
#[derive(Debug, Clone)]
pub struct HeadJob<'a, E: KvElem = f32> {
    /// The head's queries.
    pub queries: QueryBlock<'a>,
    /// Segments the head may see.
    pub segments: Vec<KeySegment<'a, E>>,
    /// The visibility rule.
    pub visibility: Visibility,
}

/// Keys per part when one query position (a decode step) is split across threads: a head's
/// contiguous keys are cut into parts of this many rows, each part's softmax state is
/// computed on its own thread and the states are merged in order. Without it a decode step
/// has one task per query head (9 for SmolLM2), which leaves most of 16 cores idle
/// (BENCHMARKS.md, issue 20). A constant, so a row's parts, and its bits, follow its own keys
/// only: never the batch or the number of threads.
pub const DECODE_PART_KEYS: usize = 512;

/// A single row's segments cut into parts for [`attend_heads`]: rings and other short
/// segments together first, then each contiguous segment in pieces of [`DECODE_PART_KEYS`].
fn decode_parts<'a, E: KvElem>(
    segments: &[KeySegment<'a, E>],
    head_dim: usize,
) -> Vec<Vec<KeySegment<'a, E>>> {
    let (mut small, mut parts) = (Vec::new(), Vec::new());
    for seg in segments {
        let n = seg.len();
        match seg.positions {
            Positions::Contiguous(start) if n > DECODE_PART_KEYS => {
                for a in (0..n).step_by(DECODE_PART_KEYS) {
                    let b = (a + DECODE_PART_KEYS).min(n);
                    let (lo, hi) = (a * seg.row_stride, (b - 1) * seg.row_stride + head_dim);
                    let rows = |s: &'a [f32]| if s.is_empty() { s } else { &s[a..b] };
                    parts.push(vec![KeySegment {
                        keys: &seg.keys[lo..hi],
                        values: &seg.values[lo..hi],
                        positions: Positions::Contiguous(start + a),
                        key_scales: rows(seg.key_scales),
                        value_scales: rows(seg.value_scales),
                        ..*seg
                    }]);
                }
            }
            _ => small.push(*seg),
        }
    }
    if !small.is_empty() {
        parts.insert(0, small);
    }
    parts
}

/// Runs many heads in parallel; returns each head's output as `[rows, head_dim]`.
/// Long query blocks are split in row tiles so both prefill and decode use all cores; the
/// last tile takes the remainder (32 to 63 rows), so a block of at least 8 rows never
/// leaves a tile too short for the register-tiled path, and each row gets the bits a single
/// [`attend`] over the whole block gives it (every tile of at least 8 rows takes the tiled
/// path, whose blocks are aligned to the segment). A single row (a decode step) over
/// many keys is split by keys instead ([`DECODE_PART_KEYS`]).
pub fn attend_heads<E: KvElem>(
    jobs: &[HeadJob<'_, E>],
    head_dim: usize,
    scale: f32,
) -> Vec<Vec<f32>> {
    const TILE: usize = 32;
    enum Task {
        Rows(usize, usize),
        Part(usize, usize),
    }
    enum Done {
        Rows(usize, usize, Vec<f32>),
        Part(usize, SoftmaxState),
    }
    let parts: Vec<Vec<Vec<KeySegment<'_, E>>>> = jobs
        .iter()
        .map(|j| {
            let rows = j.queries.rows(head_dim);
            if rows == 1 || (rows > 0 && j.queries.shared_position) {
                decode_parts(&j.segments, head_dim)
            } else {
                Vec::new()
            }
        })
        .collect();
    let tasks: Vec<Task> = jobs
        .iter()
        .enumerate()
        .flat_map(|(h, j)| {
            let rows = j.queries.rows(head_dim);
            let split: Vec<Task> = if parts[h].len() > 1 {
                (0..parts[h].len()).map(|p| Task::Part(h, p)).collect()
            } else {
                let n = if rows == 0 { 0 } else { (rows / TILE).max(1) };
                (0..n).map(|t| Task::Rows(h, t)).collect()
            };
            split
        })
        .collect();
    let outs: Vec<Done> = crate::par::map(tasks.len(), |i| match tasks[i] {
            Task::Part(h, p) => {
                let job = &jobs[h];
                Done::Part(
                    h,
                    attend_state(job.queries, &parts[h][p], job.visibility, head_dim, scale),
                )
            }
            Task::Rows(h, t) => {
                let job = &jobs[h];
                let rows = job.queries.rows(head_dim);
                let r0 = t * TILE;
                let r1 = if t + 1 == (rows / TILE).max(1) {
                    rows
                } else {
                    r0 + TILE
                };
                let stride = job.queries.row_stride;
                let q = QueryBlock {
                    queries: &job.queries.queries[r0 * stride..(r1 - 1) * stride + head_dim],
                    row_stride: stride,
                    first_position: job.queries.position(r0),
                    shared_position: job.queries.shared_position,
                };
                let mut out = vec![0.0f32; (r1 - r0) * head_dim];
                attend(
                    q,
                    &job.segments,
                    job.visibility,
                    head_dim,
                    scale,
                    &mut out,
                    head_dim,
                );
                Done::Rows(h, r0, out)
            }
        });
    let mut result: Vec<Vec<f32>> = jobs
        .iter()
        .map(|j| vec![0.0; j.queries.rows(head_dim) * head_dim])
        .collect();
    let mut states: Vec<Option<SoftmaxState>> = (0..jobs.len()).map(|_| None).collect();
    // Parts come back in task order: each head's states merge in the order of its keys.
    for done in outs {
        match done {
            Done::Rows(h, r0, out) => {
                result[h][r0 * head_dim..r0 * head_dim + out.len()].copy_from_slice(&out)
            }
            Done::Part(h, st) => match &mut states[h] {
                Some(s) => s.merge(&st, head_dim),
                none => *none = Some(st),
            },
        }
    }
    for (h, st) in states.into_iter().enumerate() {
        if let Some(st) = st {
            for (r, out) in result[h].chunks_mut(head_dim).enumerate() {
                st.write_row(r, head_dim, out);
            }
        }
    }
    result
}

/// The parity oracle: every score materialised, softmax in `f64`, the rule applied to
/// every pair. Same inputs and output layout as [`attend`].
pub fn reference_attention<E: KvElem>(
    q: QueryBlock<'_>,
    segments: &[KeySegment<'_, E>],
    vis: Visibility,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    out_stride: usize,
) {
    for r in 0..q.rows(head_dim) {
        let i = q.position(r);
        let qrow = &q.queries[r * q.row_stride..][..head_dim];
        let mut pairs: Vec<(f64, &[E], f64)> = Vec::new();
        for seg in segments {
            for rr in 0..seg.len() {
                if vis.sees(i, seg.position(rr), seg.cached) {
                    let k = &seg.keys[rr * seg.row_stride..][..head_dim];
                    let s: f64 = qrow.iter().zip(k).map(|(a, b)| *a as f64 * b.to_f32() as f64).sum::<f64>() * scale as f64 * seg.key_scale(rr) as f64;
                    pairs.push((s, &seg.values[rr * seg.row_stride..][..head_dim], seg.value_scale(rr) as f64));
                }
            }
        }
        let o = &mut out[r * out_stride..][..head_dim];
        if pairs.is_empty() {
            o.fill(0.0);
            continue;
        }
        let m = pairs.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = pairs.iter().map(|p| (p.0 - m).exp()).sum();
        for (d, o) in o.iter_mut().enumerate() {
            *o = (pairs.iter().map(|p| (p.0 - m).exp() * p.1[d].to_f32() as f64 * p.2).sum::<f64>() / z) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect()
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt();
        let den: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt().max(1e-12);
        num / den
    }

    #[test]
    fn fast_kernel_matches_reference_for_every_rule() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let hd = 24;
        for &(cached_len, chunk, first) in &[(0usize, 37usize, 0usize), (53, 29, 53), (300, 1, 300), (5, 200, 5), (0, 1, 0)] {
            let stride = hd * 3; // rows interleaved with other heads
            let ck = random(cached_len * hd, &mut rng);
            let cv = random(cached_len * hd, &mut rng);
            let nk = random(chunk * stride, &mut rng);
            let nv = random(chunk * stride, &mut rng);
            let q = random(chunk * stride, &mut rng);
            let segs = [
                KeySegment { keys: &ck, values: &cv, row_stride: hd, positions: Positions::Contiguous(0), cached: true, key_scales: &[], value_scales: &[] },
                KeySegment { keys: &nk[..], values: &nv[..], row_stride: stride, positions: Positions::Contiguous(first), cached: false, key_scales: &[], value_scales: &[] },
            ];
            for vis in [
                Visibility::Causal,
                Visibility::CachedAndCausal,
                Visibility::Lambda { sink: 4, recent: 16 },
                Visibility::Lambda { sink: 0, recent: 1 },
                Visibility::Lambda { sink: 64, recent: 7 },
            ] {
                let qb = QueryBlock { queries: &q, row_stride: stride, first_position: first, shared_position: false };
                let mut fast = vec![f32::NAN; chunk * hd];
                let mut slow = vec![f32::NAN; chunk * hd];
                attend(qb, &segs, vis, hd, 0.3, &mut fast, hd);
                reference_attention(qb, &segs, vis, hd, 0.3, &mut slow, hd);
                assert!(fast.iter().all(|x| x.is_finite()), "every output written");
                let e = max_rel(&fast, &slow);
                assert!(e < 1e-5, "{vis:?} cached={cached_len} chunk={chunk}: rel err {e}");
            }
        }
    }

    /// Rows as an int8 cache holds them: codes and a scale per row (`head_dim` apart).
    fn int8_rows(x: &[f32], hd: usize) -> (Vec<i8>, Vec<f32>) {
        let mut codes = Vec::with_capacity(x.len());
        let scales = x.chunks(hd).map(|r| i8::encode_row(r, &mut codes)).collect();
        (codes, scales)
    }

    #[test]
    fn int8_rows_with_their_scales_match_the_reference_on_every_path() {
        // Every path that reads keys and values: one row (split by keys past 512), query heads
        // at one position, many rows (register tiles, causal and Λ), and a ring; against the
        // f64 reference over the same codes and scales, and that reference against the f32
        // one over the dequantised rows (the same numbers).
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // Heads of 32 take the register tiles for many rows; heads of 24 eight keys at a time.
        for &(hd, cached, chunk) in &[(32usize, 700usize, 1usize), (32, 1300, 1), (32, 90, 40), (32, 0, 70), (32, 3, 9), (24, 90, 40), (24, 0, 17)] {
            let ck = random(cached * hd, &mut rng);
            let cv = random(cached * hd, &mut rng);
            let nk: Vec<f32> = random(chunk * hd, &mut rng).into_iter().map(|x| x * 4.0).collect();
            let nv = random(chunk * hd, &mut rng);
            let q: Vec<f32> = random(chunk.max(4) * hd, &mut rng).into_iter().map(|x| x * 2.0).collect();
            let ((cki, cks), (cvi, cvs)) = (int8_rows(&ck, hd), int8_rows(&cv, hd));
            let ((nki, nks), (nvi, nvs)) = (int8_rows(&nk, hd), int8_rows(&nv, hd));
            let deq = |c: &[i8], s: &[f32]| -> Vec<f32> { c.chunks(hd).zip(s).flat_map(|(r, &sc)| r.iter().map(move |&b| b as f32 * sc)).collect() };
            let (ckf, cvf, nkf, nvf) = (deq(&cki, &cks), deq(&cvi, &cvs), deq(&nki, &nks), deq(&nvi, &nvs));
            let segs = [
                KeySegment { keys: &cki[..], values: &cvi[..], row_stride: hd, positions: Positions::Contiguous(0), cached: true, key_scales: &cks, value_scales: &cvs },
                KeySegment { keys: &nki[..], values: &nvi[..], row_stride: hd, positions: Positions::Contiguous(cached), cached: false, key_scales: &nks, value_scales: &nvs },
            ];
            let segs_f32 = [
                KeySegment { keys: &ckf[..], values: &cvf[..], row_stride: hd, positions: Positions::Contiguous(0), cached: true, key_scales: &[], value_scales: &[] },
                KeySegment { keys: &nkf[..], values: &nvf[..], row_stride: hd, positions: Positions::Contiguous(cached), cached: false, key_scales: &[], value_scales: &[] },
            ];
            for vis in [Visibility::Causal, Visibility::Lambda { sink: 4, recent: 16 }] {
                for shared in [false, true] {
                    let rows = if shared { 4 } else { chunk };
                    let qb = QueryBlock { queries: &q[..rows * hd], row_stride: hd, first_position: cached + chunk - 1, shared_position: shared };
                    let qb = if shared { qb } else { QueryBlock { first_position: cached, ..qb } };
                    let (mut slow, mut slow32) = (vec![f32::NAN; rows * hd], vec![f32::NAN; rows * hd]);
                    reference_attention(qb, &segs, vis, hd, 0.2, &mut slow, hd);
                    reference_attention(qb, &segs_f32, vis, hd, 0.2, &mut slow32, hd);
                    assert!(max_rel(&slow, &slow32) < 1e-6, "scaled codes are their dequantised rows");
                    let jobs = [HeadJob { queries: qb, segments: segs.to_vec(), visibility: vis }];
                    let fast = attend_heads(&jobs, hd, 0.2).remove(0);
                    let e = max_rel(&fast, &slow);
                    assert!(fast.iter().all(|x| x.is_finite()) && e < 1e-5, "{vis:?} cached={cached} chunk={chunk} shared={shared}: rel err {e}");
                }
            }
        }
        // A ring (rows listed out of order) of int8 rows.
        let hd = 32;
        let (k, v) = (random(6 * hd, &mut rng), random(6 * hd, &mut rng));
        let ((ki, ks), (vi, vs)) = (int8_rows(&k, hd), int8_rows(&v, hd));
        let pos = [12usize, 13, 8, 9, 10, 11];
        let ring = KeySegment { keys: &ki[..], values: &vi[..], row_stride: hd, positions: Positions::List(&pos), cached: true, key_scales: &ks, value_scales: &vs };
        let q = random(hd, &mut rng);
        let qb = QueryBlock { queries: &q, row_stride: hd, first_position: 14, shared_position: false };
        let (mut fast, mut slow) = (vec![0.0; hd], vec![0.0; hd]);
        attend(qb, &[ring], Visibility::Lambda { sink: 0, recent: 5 }, hd, 0.2, &mut fast, hd);
        reference_attention(qb, &[ring], Visibility::Lambda { sink: 0, recent: 5 }, hd, 0.2, &mut slow, hd);
        assert!(max_rel(&fast, &slow) < 1e-5);
    }

    /// Eight keys at a time give the bits `dot` gives one at a time, and the whole kernel
    /// the bits of the one-key-at-a-time kernel.
    #[test]
    fn eight_dots_at_once_are_eight_dots() {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        {
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            for n in [64usize, 128, 8, 256] {
                let a = random(n, &mut rng);
                let bs: Vec<Vec<f32>> = (0..8).map(|_| random(n, &mut rng).into_iter().map(|x| x * 1e3).collect()).collect();
                let got = simd::dot8(&a, std::array::from_fn(|j| bs[j].as_slice()));
                for (g, b) in got.iter().zip(&bs) {
                    assert_eq!(g.to_bits(), dot(&a, b).to_bits(), "n {n}");
                }
            }
        }
    }

    /// The kernel as it was before rows walked blocks together: one row at a time.
    #[allow(clippy::too_many_arguments)]
    fn attend_row_by_row(
        q: QueryBlock<'_>,
        segments: &[KeySegment<'_>],
        vis: Visibility,
        head_dim: usize,
        scale: f32,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let rows = q.rows(head_dim);
        let wide = rows >= 8;
        let mut scores = [0.0f32; BLOCK];
        let mut acc = vec![0.0f32; head_dim];
        for r in 0..rows {
            let i = q.position(r);
            let qrow = &q.queries[r * q.row_stride..][..head_dim];
            let mut m = f32::NEG_INFINITY;
            let mut l = 0.0f32;
            acc.fill(0.0);
            for seg in segments {
                let n = seg.len();
                match seg.positions {
                    Positions::Contiguous(start) => {
                        for (a, b) in visible_ranges(vis, i, start, n, seg.cached) {
                            let mut j = a;
                            while j < b {
                                let e = (j + BLOCK).min(b);
                                block_update(qrow, seg, j..e, scale, &mut scores, &mut m, &mut l, &mut acc, wide);
                                j = e;
                            }
                        }
                    }
                    Positions::List(_) => {
                        // Small segments (a streaming ring): test each row.
                        let mut idx = [0usize; BLOCK];
                        let mut count = 0;
                        for rr in 0..n {
                            if vis.sees(i, seg.position(rr), seg.cached) {
                                idx[count] = rr;
                                count += 1;
                                if count == BLOCK {
                                    gathered_update(qrow, seg, &idx[..count], scale, &mut scores, &mut m, &mut l, &mut acc, wide);
                                    count = 0;
                                }
                            }
                        }
                        if count > 0 {
                            gathered_update(qrow, seg, &idx[..count], scale, &mut scores, &mut m, &mut l, &mut acc, wide);
                        }
                    }
                }
            }
            let o = &mut out[r * out_stride..][..head_dim];
            if l > 0.0 {
                let inv = 1.0 / l;
                for (o, a) in o.iter_mut().zip(&acc) {
                    *o = a * inv;
                }
            } else {
                o.fill(0.0);
            }
        }
    }

    #[test]
    fn rows_in_lockstep_match_each_row_alone() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for hd in [64, 24] {
            for vis in [Visibility::Causal, Visibility::CachedAndCausal, Visibility::Lambda { sink: 4, recent: 40 }] {
                for (cached, chunk, first) in [(300usize, 37usize, 300usize), (0, 70, 0), (129, 8, 129)] {
                    let (ck, cv) = (random(cached * hd, &mut rng), random(cached * hd, &mut rng));
                    let (nk, nv) = (random(chunk * hd, &mut rng), random(chunk * hd, &mut rng));
                    let qs = random(chunk * hd, &mut rng);
                    let segs = [
                        KeySegment { keys: &ck, values: &cv, row_stride: hd, positions: Positions::Contiguous(0), cached: true, key_scales: &[], value_scales: &[] },
                        KeySegment { keys: &nk, values: &nv, row_stride: hd, positions: Positions::Contiguous(cached), cached: false, key_scales: &[], value_scales: &[] },
                    ];
                    let segs = if cached == 0 { &segs[1..] } else { &segs[..] };
                    let q = QueryBlock { queries: &qs, row_stride: hd, first_position: first, shared_position: false };
                    let (mut got, mut want, mut exact) = (vec![0.0f32; chunk * hd], vec![0.0f32; chunk * hd], vec![0.0f32; chunk * hd]);
                    attend(q, segs, vis, hd, 0.125, &mut got, hd);
                    attend_row_by_row(q, segs, vis, hd, 0.125, &mut want, hd);
                    reference_attention(q, segs, vis, hd, 0.125, &mut exact, hd);
                    // Rows taken together (register tiles where head_dim allows) sum in another
                    // order than one row at a time; both stay as close to the f64 reference.
                    assert!(max_rel(&got, &want) < 2e-6, "{vis:?} hd {hd} cached {cached} chunk {chunk}: {}", max_rel(&got, &want));
                    assert!(max_rel(&got, &exact) < 2e-6 && max_rel(&want, &exact) < 2e-6, "{vis:?} hd {hd} cached {cached} chunk {chunk}");
                    if hd % 16 != 0 {
                        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "without tiles the bits are the row's alone");
                    }
                }
            }
        }
    }

    #[test]
    fn register_tiles_match_the_reference_and_keep_rows_independent() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        for hd in [64usize, 128] {
            // Cached prefixes off the 64-key blocks, chunks off the 4-row tiles and 16-key strips.
            for (cached, chunk) in [(0usize, 8usize), (0, 130), (77, 41), (1000, 66), (64, 9)] {
                let stride = hd * 2; // rows interleaved with another head's
                let (ck, cv) = (random(cached * hd, &mut rng), random(cached * hd, &mut rng));
                let (nk, nv) = (random(chunk * stride, &mut rng), random(chunk * stride, &mut rng));
                let qs = random(chunk * stride, &mut rng);
                let segs = [
                    KeySegment { keys: &ck, values: &cv, row_stride: hd, positions: Positions::Contiguous(0), cached: true, key_scales: &[], value_scales: &[] },
                    KeySegment { keys: &nk, values: &nv, row_stride: stride, positions: Positions::Contiguous(cached), cached: false, key_scales: &[], value_scales: &[] },
                ];
                let segs = if cached == 0 { &segs[1..] } else { &segs[..] };
                // The Λ rule too: windows shorter and longer than a tile, sinks across a block.
                for vis in [Visibility::Causal, Visibility::CachedAndCausal, Visibility::Lambda { sink: 4, recent: 40 }, Visibility::Lambda { sink: 70, recent: 9 }] {
                    let q = QueryBlock { queries: &qs, row_stride: stride, first_position: cached, shared_position: false };
                    let (mut got, mut exact) = (vec![f32::NAN; chunk * hd], vec![0.0f32; chunk * hd]);
                    attend(q, segs, vis, hd, 0.09, &mut got, hd);
                    reference_attention(q, segs, vis, hd, 0.09, &mut exact, hd);
                    assert!(got.iter().all(|x| x.is_finite()), "every output written");
                    assert!(max_rel(&got, &exact) < 2e-6, "{vis:?} hd {hd} cached {cached} chunk {chunk}: {}", max_rel(&got, &exact));
                    // The same rows from row 3 on (other tile neighbours), where at least 8 remain.
                    if chunk >= 11 {
                        let sub = QueryBlock { queries: &qs[3 * stride..], row_stride: stride, first_position: cached + 3, shared_position: false };
                        let mut part = vec![0.0f32; (chunk - 3) * hd];
                        attend(sub, segs, vis, hd, 0.09, &mut part, hd);
                        assert!(part.iter().zip(&got[3 * hd..]).all(|(a, b)| a.to_bits() == b.to_bits()), "a row's bits do not depend on its neighbours");
                    }
                }
            }
        }
    }

    #[test]
    fn parallel_heads_match_the_reference_at_every_length() {
        // Nine query heads of 64 over one cache (SmolLM2's shape), row tiles of 32 to 63 rows.
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (hd, qstride) = (64usize, 576usize);
        for t in (1..40).chain([63, 64, 65, 97, 361]) {
            let (k, v) = (random(t * hd, &mut rng), random(t * hd, &mut rng));
            let q: Vec<f32> = random(t * qstride, &mut rng).into_iter().map(|x| x * 3.0).collect();
            let seg = KeySegment { keys: &k, values: &v, row_stride: hd, positions: Positions::Contiguous(0), cached: true, key_scales: &[], value_scales: &[] };
            let jobs: Vec<HeadJob> = (0..9)
                .map(|h| HeadJob { queries: QueryBlock { queries: &q[h * hd..(t - 1) * qstride + h * hd + hd], row_stride: qstride, first_position: 0, shared_position: false }, segments: vec![seg], visibility: Visibility::Causal })
                .collect();
            let got = attend_heads(&jobs, hd, 0.125);
            for (h, job) in jobs.iter().enumerate() {
                let mut want = vec![0.0f32; t * hd];
                reference_attention(job.queries, &[seg], Visibility::Causal, hd, 0.125, &mut want, hd);
                assert!(max_rel(&got[h], &want) < 2e-6, "t {t} head {h}: {}", max_rel(&got[h], &want));
            }
        }
    }

    #[test]
    fn lambda_rows_get_the_same_bits_in_any_tiling() {
        // A streaming head's chunk after its sinks: in the chunk segment the first 256 rows'
        // windows all start at the chunk's first key, the block's later rows' do not. Tiles of
        // 32 rows and one call over all 512 must still agree bit for bit.
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let (hd, t, first) = (64usize, 512usize, 512usize);
        let (sk, sv) = (random(4 * hd, &mut rng), random(4 * hd, &mut rng));
        let (k, v, q) = (random(t * hd, &mut rng), random(t * hd, &mut rng), random(t * hd, &mut rng));
        let segs = vec![
            KeySegment { keys: &sk, values: &sv, row_stride: hd, positions: Positions::Contiguous(0), cached: true, key_scales: &[], value_scales: &[] },
            KeySegment { keys: &k, values: &v, row_stride: hd, positions: Positions::Contiguous(first), cached: false, key_scales: &[], value_scales: &[] },
        ];
        for vis in [Visibility::Lambda { sink: 4, recent: 256 }, Visibility::Causal] {
            let qb = QueryBlock { queries: &q, row_stride: hd, first_position: first, shared_position: false };
            let tiles = attend_heads(&[HeadJob { queries: qb, segments: segs.clone(), visibility: vis }], hd, 0.125);
            let mut single = vec![0.0f32; t * hd];
            attend(qb, &segs, vis, hd, 0.125, &mut single, hd);
            assert!(tiles[0].iter().zip(&single).all(|(a, b)| a.to_bits() == b.to_bits()), "{vis:?}");
        }
    }

    /// The 512-bit tiles give the 256-bit tiles' bits (each score and each output element
    /// is the same chain of fused multiply-adds), for f32 and f16 values.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    #[test]
    #[allow(unsafe_code)]
    fn wide_tiles_give_the_narrow_tiles_bits() {
        if !tiled::wide512() {
            eprintln!("no AVX-512 on this CPU: nothing to compare");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(29);
        for hd in [64usize, 128] {
            let kt = random(hd * BLOCK, &mut rng);
            let q: Vec<Vec<f32>> = (0..tiled::R).map(|_| random(hd, &mut rng)).collect();
            let qs: [&[f32]; tiled::R] = std::array::from_fn(|i| q[i].as_slice());
            let (mut a, mut b) = (vec![0.0f32; tiled::R * BLOCK], vec![0.0f32; tiled::R * BLOCK]);
            // SAFETY: the build enables AVX2, FMA and F16C; the CPU reports AVX-512 F and DQ.
            unsafe { tiled::scores(&qs, &kt, hd, 4, 0.125, &mut a) };
            // SAFETY: as above.
            unsafe { tiled::scores512(&qs, &kt, hd, 4, 0.125, &mut b) };
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "scores, hd {hd}");
            let w = random(tiled::R * BLOCK, &mut rng);
            let (stride, n) = (hd * 3, 61);
            let vals = random((n - 1) * stride + hd, &mut rng);
            let vals16: Vec<half::f16> = vals.iter().map(|&x| half::f16::from_f32(x)).collect();
            let base = random(tiled::R * hd, &mut rng);
            let run = |wide: bool, f16: bool| -> Vec<f32> {
                let mut o = base.clone();
                let mut it = o.chunks_mut(hd);
                let mut outs: [&mut [f32]; tiled::R] = std::array::from_fn(|_| it.next().expect("row"));
                match (wide, f16) {
                    // SAFETY: as above.
                    (true, false) => unsafe { tiled::weighted_values512(&w, &vals, stride, n, hd, &mut outs) },
                    (true, true) => unsafe { tiled::weighted_values512(&w, &vals16, stride, n, hd, &mut outs) },
                    (false, false) => unsafe { tiled::weighted_values(&w, &vals, stride, n, hd, &mut outs) },
                    (false, true) => unsafe { tiled::weighted_values(&w, &vals16, stride, n, hd, &mut outs) },
                }
                o
            };
            for f16 in [false, true] {
                let (x, y) = (run(false, f16), run(true, f16));
                assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "values, hd {hd}, f16 {f16}");
            }
        }
    }

    #[test]
    fn ring_segments_follow_their_positions() {
        // A ring holding positions out of order gives the same result as sorted rows.
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let hd = 8;
        let k = random(5 * hd, &mut rng);
        let v = random(5 * hd, &mut rng);
        let q = random(hd, &mut rng);
        let ring_pos = [12usize, 13, 9, 10, 11];
        let ring = KeySegment { keys: &k, values: &v, row_stride: hd, positions: Positions::List(&ring_pos), cached: true, key_scales: &[], value_scales: &[] };
        let vis = Visibility::Lambda { sink: 0, recent: 4 }; // query at 13 sees 10..=13
        let qb = QueryBlock { queries: &q, row_stride: hd, first_position: 13, shared_position: false };
        let mut fast = vec![0.0; hd];
        let mut slow = vec![0.0; hd];
        attend(qb, &[ring], vis, hd, 1.0, &mut fast, hd);
        reference_attention(qb, &[ring], vis, hd, 1.0, &mut slow, hd);
        assert!(max_rel(&fast, &slow) < 1e-5);
        // Sorted copy of the visible rows (positions 10, 11, 12, 13 = ring rows 3, 4, 0, 1).
        let order = [3usize, 4, 0, 1];
        let sk: Vec<f32> = order.iter().flat_map(|&r| k[r * hd..][..hd].to_vec()).collect();
        let sv: Vec<f32> = order.iter().flat_map(|&r| v[r * hd..][..hd].to_vec()).collect();
        let sorted = KeySegment { keys: &sk, values: &sv, row_stride: hd, positions: Positions::Contiguous(10), cached: true, key_scales: &[], value_scales: &[] };
        let mut dense = vec![0.0; hd];
        reference_attention(qb, &[sorted], Visibility::Causal, hd, 1.0, &mut dense, hd);
        assert!(max_rel(&fast, &dense) < 1e-5);
    }

    #[test]
    fn lambda_ranges_are_exact() {
        let vis = Visibility::Lambda { sink: 3, recent: 4 };
        for i in 0..20 {
            let mut got = vec![false; 20];
            for (a, b) in visible_ranges(vis, i, 0, 20, false) {
                for (j, seen) in got.iter_mut().enumerate().take(b).skip(a) {
                    assert!(!*seen, "ranges overlap at {j}");
                    *seen = true;
                }
            }
            let want: Vec<bool> = (0..20).map(|j| vis.sees(i, j, false)).collect();
            assert_eq!(got, want, "query {i}");
        }
    }

    #[test]
    fn parallel_heads_equal_single_calls() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let hd = 16;
        let (n, t) = (90, 70);
        let k = random(n * hd, &mut rng);
        let v = random(n * hd, &mut rng);
        let q = random(t * hd, &mut rng);
        let seg = KeySegment { keys: &k, values: &v, row_stride: hd, positions: Positions::Contiguous(0), cached: true, key_scales: &[], value_scales: &[] };
        let qb = QueryBlock { queries: &q, row_stride: hd, first_position: 20, shared_position: false };
        let jobs = vec![
            HeadJob { queries: qb, segments: vec![seg], visibility: Visibility::Causal },
            HeadJob { queries: qb, segments: vec![seg], visibility: Visibility::Lambda { sink: 2, recent: 5 } },
        ];
        let outs = attend_heads(&jobs, hd, 0.25);
        for (job, out) in jobs.iter().zip(&outs) {
            let mut single = vec![0.0; t * hd];
            attend(job.queries, &job.segments, job.visibility, hd, 0.25, &mut single, hd);
            assert_eq!(out, &single);
        }
    }

    #[test]
    fn a_decode_row_split_by_keys_matches_the_reference_and_its_own_bits() {
        // One row per head (a decode step) over a ring of sinks and recent keys plus a long
        // contiguous cache, at lengths around the part size: split across threads by keys,
        // merged in order; the same within a batch of other heads as alone.
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let hd = 64usize;
        for n in [
            DECODE_PART_KEYS,
            DECODE_PART_KEYS + 1,
            2 * DECODE_PART_KEYS,
            3000,
        ] {
            assert_eq!(
                decode_parts::<f32>(
                    &[KeySegment {
                        keys: &vec![0.0; n * hd],
                        values: &vec![0.0; n * hd],
                        row_stride: hd,
                        positions: Positions::Contiguous(0),
                        cached: true,
                        key_scales: &[],
                        value_scales: &[],
                    }],
                    hd
                )
                .len(),
                n.div_ceil(DECODE_PART_KEYS)
            );
            let (k, v) = (random(n * hd, &mut rng), random(n * hd, &mut rng));
            let (rk, rv) = (random(4 * hd, &mut rng), random(4 * hd, &mut rng));
            let ring_pos = [n + 3, n, n + 1, n + 2];
            let q: Vec<f32> = random(hd, &mut rng).into_iter().map(|x| x * 3.0).collect();
            let segments = vec![
                KeySegment {
                    keys: &rk,
                    values: &rv,
                    row_stride: hd,
                    positions: Positions::List(&ring_pos),
                    cached: true,
                    key_scales: &[],
                    value_scales: &[],
                },
                KeySegment {
                    keys: &k,
                    values: &v,
                    row_stride: hd,
                    positions: Positions::Contiguous(0),
                    cached: true,
                    key_scales: &[],
                    value_scales: &[],
                },
            ];
            let qb = QueryBlock {
                queries: &q,
                row_stride: hd,
                first_position: n + 3,
                shared_position: false,
            };
            for vis in [
                Visibility::Causal,
                Visibility::Lambda {
                    sink: 4,
                    recent: 700,
                },
            ] {
                let job = HeadJob {
                    queries: qb,
                    segments: segments.clone(),
                    visibility: vis,
                };
                let alone = attend_heads(std::slice::from_ref(&job), hd, 0.125);
                let mut want = vec![0.0f32; hd];
                reference_attention(qb, &segments, vis, hd, 0.125, &mut want, hd);
                assert!(
                    max_rel(&alone[0], &want) < 1e-5,
                    "n {n} {vis:?}: {}",
                    max_rel(&alone[0], &want)
                );
                let other = HeadJob {
                    queries: QueryBlock {
                        queries: &k[..3 * hd],
                        row_stride: hd,
                        first_position: 0,
                        shared_position: false,
                    },
                    segments: segments[1..].to_vec(),
                    visibility: Visibility::Causal,
                };
                let batch = attend_heads(&[other, job], hd, 0.125);
                assert_eq!(
                    batch[1], alone[0],
                    "n {n} {vis:?}: a row's bits do not depend on the batch"
                );
            }
        }
    }

    #[test]
    fn query_heads_grouped_at_one_position_keep_their_own_bits() {
        // Three query heads sharing a KV head, one decode position: one grouped job (each key
        // read once for the three) against one job per head, short and split-by-keys caches.
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let hd = 64usize;
        for n in [37usize, 3 * DECODE_PART_KEYS + 5] {
            let (k, v) = (random(n * hd, &mut rng), random(n * hd, &mut rng));
            let q = random(3 * hd, &mut rng);
            let seg = KeySegment {
                keys: &k,
                values: &v,
                row_stride: hd,
                positions: Positions::Contiguous(0),
                cached: true,
                key_scales: &[],
                value_scales: &[],
            };
            for vis in [
                Visibility::Causal,
                Visibility::Lambda {
                    sink: 4,
                    recent: 300,
                },
            ] {
                let grouped = HeadJob {
                    queries: QueryBlock {
                        queries: &q,
                        row_stride: hd,
                        first_position: n - 1,
                        shared_position: true,
                    },
                    segments: vec![seg],
                    visibility: vis,
                };
                let alone: Vec<HeadJob> = (0..3)
                    .map(|h| HeadJob {
                        queries: QueryBlock {
                            queries: &q[h * hd..(h + 1) * hd],
                            row_stride: hd,
                            first_position: n - 1,
                            shared_position: false,
                        },
                        segments: vec![seg],
                        visibility: vis,
                    })
                    .collect();
                let got = attend_heads(std::slice::from_ref(&grouped), hd, 0.125);
                let want: Vec<f32> = attend_heads(&alone, hd, 0.125).concat();
                assert_eq!(got[0], want, "n {n} {vis:?}");
            }
        }
    }
}
