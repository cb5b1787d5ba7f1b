//! Quantised matrix products for the GGUF block types the default model uses (Q4_1
//! weights, Q8_0 weights), computed the way llama.cpp computes them: activations are
//! quantised per block of 32 to 8 bits (`Q8_1` for Q4_1, `Q8_0` for Q8_0) with
//! `d = amax / 127`, `id = 127 / amax`, round-half-to-even, and `s = fp16(d * Σq)`; the
//! block products are summed in `f32`. Matching these details is what keeps greedy
//! decoding token-for-token equal to llama.cpp; other block types go through candle.
//!
//! With AVX2 (the project's baseline) the block products run as llama.cpp's AVX2 path
//! does: `maddubs`/`madd` integer products, one FMA per block into 8 lanes, lanes summed
//! last; a portable loop serves other targets and as the SIMD path's check.
//!
//! [`QuantMatrix::reference_matmul`] dequantises the weights and multiplies in `f64`:
//! the parity oracle for the fast path (which differs only by activation rounding).

use half::f16;
use crate::par::{self, DisjointChunks};

/// Elements per block.
pub const BLOCK: usize = 32;

/// Block types with a native kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// `d: f16, m: f16, qs: [u8; 16]` — value `d * q + m`, q in 0..16.
    Q4_1,
    /// `d: f16, qs: [i8; 32]` — value `d * q`.
    Q8_0,
}

impl QuantKind {
    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_1 => 20,
            QuantKind::Q8_0 => 34,
        }
    }
}

/// A `[rows, cols]` weight matrix in a GGUF block format, row-major.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    /// Per-block scale `d`, converted from f16 once (f16 conversion is slow without
    /// compile-time F16C support in `half`).
    scales: Vec<f32>,
    /// Per-block minimum `m` (Q4_1), else zeros.
    mins: Vec<f32>,
}

impl QuantMatrix {
    /// The rows of `parts` one after another, as one matrix (each output row is computed
    /// alone, so a product with the stack gives every row the bits it gets from its own
    /// part); the parts back when they differ in type or width.
    pub fn stack(parts: Vec<QuantMatrix>) -> Result<QuantMatrix, Vec<QuantMatrix>> {
        let Some(first) = parts.first() else { return Err(parts) };
        let (kind, cols) = (first.kind, first.cols);
        if parts.iter().any(|p| p.kind != kind || p.cols != cols) {
            return Err(parts);
        }
        let mut out = QuantMatrix { kind, rows: 0, cols, data: Vec::new(), scales: Vec::new(), mins: Vec::new() };
        for p in parts {
            out.rows += p.rows;
            out.data.extend(p.data);
            out.scales.extend(p.scales);
            out.mins.extend(p.mins);
        }
        Ok(out)
    }
}

/// Activations quantised to 8 bits, per block of 32.
#[cfg(test)]
struct Q8 {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Quantises `x` (length a multiple of 32) as llama.cpp's `quantize_row_q8_1`.
#[cfg(test)]
fn quantize_q8(x: &[f32], with_sum: bool) -> Q8 {
    let nb = x.len() / BLOCK;
    let mut q = Q8 { qs: vec![0; x.len()], d: vec![0.0; nb], s: vec![0.0; nb] };
    quantize_into(x, &mut q.qs, &mut q.d, &mut q.s, with_sum);
    q
}

/// [`quantize_q8`] of one row into preallocated slices.
fn quantize_into(x: &[f32], qs: &mut [i8], ds: &mut [f32], ss: &mut [f32], with_sum: bool) {
    for ((xs, q), (d_out, s_out)) in x.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(BLOCK)).zip(ds.iter_mut().zip(ss.iter_mut())) {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (o, v) in q.iter_mut().zip(xs) {
            *o = (v * id).round_ties_even() as i8;
            sum += *o as i32;
        }
        *d_out = f16::from_f32(d).to_f32();
        *s_out = if with_sum { f16::from_f32(d * sum as f32).to_f32() } else { 0.0 };
    }
}

impl QuantMatrix {
    /// Wraps raw GGUF bytes; errors if the size does not match the shape.
    pub fn new(kind: QuantKind, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!("{cols} columns are not a multiple of {BLOCK}"));
        }
        let want = rows * cols / BLOCK * kind.block_bytes();
        if data.len() != want {
            return Err(format!("{} bytes for a {rows}x{cols} {kind:?} matrix, expected {want}", data.len()));
        }
        let bb = kind.block_bytes();
        let scales = data.chunks_exact(bb).map(|b| f16_at(b, 0)).collect();
        let mins = data.chunks_exact(bb).map(|b| if kind == QuantKind::Q4_1 { f16_at(b, 2) } else { 0.0 }).collect();
        Ok(Self { kind, rows, cols, data, scales, mins })
    }

    /// Output size.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input size.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` dequantised.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let bb = self.kind.block_bytes();
        let nb = self.cols / BLOCK;
        let row = &self.data[r * nb * bb..(r + 1) * nb * bb];
        let mut out = vec![0.0f32; self.cols];
        for b in 0..nb {
            let blk = &row[b * bb..(b + 1) * bb];
            let o = &mut out[b * BLOCK..(b + 1) * BLOCK];
            match self.kind {
                QuantKind::Q4_1 => {
                    let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                    for j in 0..16 {
                        o[j] = (blk[4 + j] & 0x0F) as f32 * d + m;
                        o[j + 16] = (blk[4 + j] >> 4) as f32 * d + m;
                    }
                }
                QuantKind::Q8_0 => {
                    let d = f16_at(blk, 0);
                    for j in 0..BLOCK {
                        o[j] = blk[2 + j] as i8 as f32 * d;
                    }
                }
            }
        }
        out
    }

    /// `y = x W^T` for `x` of `[t, cols]`; returns `[t, rows]`.
    pub fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        self.matmul_parts(x, t, &[self.rows]).pop().unwrap_or_default()
    }

    /// [`QuantMatrix::matmul`] with the output rows cut into consecutive parts of `dims`
    /// rows (summing to the matrix's rows): each part's `[t, dims[i]]`, written straight from
    /// the product (a stack of projections, [`QuantMatrix::stack`], without a copy to split it).
    pub fn matmul_parts(&self, x: &[f32], t: usize, dims: &[usize]) -> Vec<Vec<f32>> {
        assert_eq!(dims.iter().sum::<usize>(), self.rows, "parts must cover the rows");
        let (n, k) = (self.rows, self.cols);
        let bb = self.kind.block_bytes();
        let nb = k / BLOCK;
        assert_eq!(x.len(), t * k, "activations must be [t, cols]");
        // Activations of all tokens side by side, quantised in parallel: qs [t][k], d and s [t][nb].
        let (mut qs, mut ds, mut ss) = (vec![0i8; t * k], vec![0.0f32; t * nb], vec![0.0f32; t * nb]);
        let with_sum = self.kind == QuantKind::Q4_1;
        {
            let (q, d, s) = (DisjointChunks::new(&mut qs, k), DisjointChunks::new(&mut ds, nb), DisjointChunks::new(&mut ss, nb));
            par::for_each(t, |r| quantize_into(&x[r * k..(r + 1) * k], q.take(r), d.take(r), s.take(r), with_sum));
        }
        // Tokens go in tiles of TT: a tile's activations (TT x k bytes) stay in L1 while the
        // weight rows of a work item run over them, instead of every row streaming all
        // tokens' activations from L2 (a token's arithmetic does not depend on its tile).
        const TT: usize = 64;
        let tiles: Vec<(usize, usize)> = (0..t).step_by(TT).map(|t0| (t0, (t - t0).min(TT))).collect();
        // The AVX-512 kernel's scales, block-major within each tile.
        let (dt, st) = if t >= 8 && wide_kernel() {
            let per_tile = |x: &[f32]| -> Vec<f32> { tiles.iter().flat_map(|&(t0, tn)| transpose(&x[t0 * nb..(t0 + tn) * nb], tn, nb)).collect() };
            (per_tile(&ds), per_tile(&ss))
        } else {
            (Vec::new(), Vec::new())
        };
        // Weight rows per job: 16 keep a prefill tile's activations busy; a decode step's few
        // tokens make each row's job tiny, so 4 rows give 16 threads enough jobs to share
        // evenly (36 jobs of 16 rows for a 576-row projection left a quarter of them idle at
        // the section's end). Each row is computed alone either way: the same bits.
        let rows_per_job = if t <= 4 { 4 } else { 16 };
        // Computed as [rows][t], then transposed.
        let mut out_t = vec![0.0f32; n * t];
        par::for_each_chunk_mut(&mut out_t, rows_per_job * t, |c, chunk| {
            for &(t0, tn) in &tiles {
                let (b0, b1) = (t0 * nb, (t0 + tn) * nb);
                let acts = Acts {
                    qs: &qs[t0 * k..(t0 + tn) * k],
                    d: &ds[b0..b1],
                    s: &ss[b0..b1],
                    dt: if dt.is_empty() { &[] } else { &dt[b0..b1] },
                    st: if st.is_empty() { &[] } else { &st[b0..b1] },
                    k,
                    nb,
                };
                for (ri, acc) in chunk.chunks_mut(t).enumerate() {
                    let r = c * rows_per_job + ri;
                    let row = RowRef {
                        data: &self.data[r * nb * bb..(r + 1) * nb * bb],
                        scales: &self.scales[r * nb..(r + 1) * nb],
                        mins: &self.mins[r * nb..(r + 1) * nb],
                    };
                    row_dot(self.kind, &row, &acts, &mut acc[t0..t0 + tn]);
                }
            }
        });
        // One token: [rows][1] is already [1][rows]; each part is a plain copy.
        if t == 1 {
            let mut first = 0;
            return dims
                .iter()
                .map(|&d| {
                    first += d;
                    out_t[first - d..first].to_vec()
                })
                .collect();
        }
        // Back to [t][rows] of each part, in tiles of 32 x 32 so both sides stay in cache.
        const TB: usize = 32;
        let mut first = 0;
        dims.iter()
            .map(|&d| {
                let rows = first..first + d;
                first += d;
                let mut out = vec![0.0f32; t * d];
                par::for_each_chunk_mut(&mut out, TB * d.max(1), |c, rows_out| {
                    let t0 = c * TB;
                    let tn = rows_out.len() / d.max(1);
                    for r0 in rows.clone().step_by(TB) {
                        for r in r0..(r0 + TB).min(rows.end) {
                            let src = &out_t[r * t + t0..][..tn];
                            for (ti, v) in src.iter().enumerate() {
                                rows_out[ti * d + r - rows.start] = *v;
                            }
                        }
                    }
                });
                out
            })
            .collect()
    }

    /// The parity oracle: dequantised weights times unquantised activations, in `f64`.
    pub fn reference_matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        let w: Vec<Vec<f32>> = (0..self.rows).map(|r| self.dequantize_row(r)).collect();
        let mut out = vec![0.0; t * self.rows];
        for ti in 0..t {
            let xr = &x[ti * self.cols..(ti + 1) * self.cols];
            for (r, wr) in w.iter().enumerate() {
                out[ti * self.rows + r] = wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32;
            }
        }
        out
    }
}

/// One weight row: raw blocks plus the scales converted once.
struct RowRef<'a> {
    data: &'a [u8],
    scales: &'a [f32],
    mins: &'a [f32],
}

/// Quantised activations of all tokens: `qs` `[t][k]`, `d`/`s` `[t][nb]`; `dt`/`st` the same
/// scales `[nb][t]` (block-major, for kernels that take several tokens' scales in one load;
/// empty where not made).
struct Acts<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
    dt: &'a [f32],
    st: &'a [f32],
    k: usize,
    nb: usize,
}

/// `[rows][cols]` to `[cols][rows]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

/// Whether `row_dot` takes the AVX-512 kernel for 8 tokens or more (which reads `Acts::dt`).
fn wide_kernel() -> bool {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    return avx2::has_avx512_vnni();
    #[allow(unreachable_code)]
    false
}

/// `out[ti]` = row . activations of token `ti`, for every token.
fn row_dot(kind: QuantKind, row: &RowRef<'_>, acts: &Acts<'_>, out: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    {
        // SAFETY: the build enables AVX2 and FMA (cfg above), AVX-VNNI is used only where the
        // CPU reports it; every pointer read stays inside the slices, whose lengths the
        // kernels check on entry.
        #[allow(unsafe_code)]
        unsafe {
            if out.len() >= 8 && !acts.dt.is_empty() && avx2::has_avx512_vnni() {
                avx2::row_dot_vnni512(kind, row, acts, out)
            } else if avx2::has_vnni() {
                avx2::row_dot_vnni(kind, row, acts, out)
            } else {
                avx2::row_dot(kind, row, acts, out)
            }
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    portable_row_dot(kind, row, acts, out)
}

/// The same arithmetic without SIMD (summation order aside).
#[allow(dead_code)]
fn portable_row_dot(kind: QuantKind, row: &RowRef<'_>, acts: &Acts<'_>, out: &mut [f32]) {
    let bb = kind.block_bytes();
    let mut w = [0i8; BLOCK];
    for (ti, o) in out.iter_mut().enumerate() {
        let (mut acc, mut summs) = (0.0f32, 0.0f32);
        for (b, blk) in row.data.chunks_exact(bb).enumerate() {
            match kind {
                QuantKind::Q4_1 => {
                    for j in 0..16 {
                        w[j] = (blk[4 + j] & 0x0F) as i8;
                        w[j + 16] = (blk[4 + j] >> 4) as i8;
                    }
                }
                QuantKind::Q8_0 => {
                    for j in 0..BLOCK {
                        w[j] = blk[2 + j] as i8;
                    }
                }
            }
            let y = &acts.qs[ti * acts.k + b * BLOCK..][..BLOCK];
            let sumi: i32 = w.iter().zip(y).map(|(a, b)| *a as i32 * *b as i32).sum();
            acc += row.scales[b] * acts.d[ti * acts.nb + b] * sumi as f32;
            summs += row.mins[b] * acts.s[ti * acts.nb + b];
        }
        *o = acc + summs;
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
#[allow(unsafe_code)]
mod avx2 {
    //! The block dot products as llama.cpp's AVX2 path computes them: integer products
    //! with `maddubs`/`madd`, one `f32` FMA per block into 8 lanes, the lanes summed last.
    //!
    //! Two things make it faster without changing a bit of any result:
    //! * Tokens go four at a time: a weight block is loaded (and its nibbles unpacked) once
    //!   for four tokens' activations, each token keeping its own accumulator, so every
    //!   (row, token) pair sees exactly the operations, in the same order, that it sees alone.
    //! * Where the CPU has AVX-VNNI, one `vpdpbusd` replaces `maddubs` + `madd`: it sums the
    //!   same four byte products into each 32-bit lane, and no `maddubs` pair here can
    //!   saturate 16 bits (|4-bit x 8-bit| x 2 <= 3,810; |8-bit| x 127 x 2 <= 32,512), so the
    //!   integers, and so the floats, are identical.
    use super::{Acts, QuantKind, RowRef, BLOCK};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let mut res = _mm256_extractf128_ps(x, 1);
        res = _mm_add_ps(res, _mm256_castps256_ps128(x));
        res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }

    /// Checks the bounds every raw read below relies on.
    fn check(kind: QuantKind, row: &RowRef<'_>, acts: &Acts<'_>, out: &[f32]) {
        let (bb, nb) = (kind.block_bytes(), acts.nb);
        assert!(row.data.len() == nb * bb && row.scales.len() == nb && row.mins.len() == nb);
        assert!(acts.qs.len() >= out.len() * acts.k && acts.k >= nb * BLOCK);
        assert!(acts.d.len() >= out.len() * nb && acts.s.len() >= out.len() * nb);
    }

    /// A weight block as the dot product takes it: Q4_1 nibbles as unsigned bytes, Q8_0 as
    /// its absolute values (the activations then take its signs).
    #[inline(always)]
    unsafe fn weights(kind: QuantKind, blk: *const u8) -> (__m256i, __m256i) {
        match kind {
            QuantKind::Q4_1 => {
                let low = _mm_set1_epi8(0x0F);
                let q = _mm_loadu_si128(blk.add(4) as *const __m128i);
                let lo = _mm_and_si128(q, low);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
                let x = _mm256_set_m128i(hi, lo);
                (x, x)
            }
            QuantKind::Q8_0 => {
                let x = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                (_mm256_sign_epi8(x, x), x)
            }
        }
    }

    /// The activations of a block as the dot product takes them (Q8_0: with the weights' signs).
    #[inline(always)]
    unsafe fn acts_for(kind: QuantKind, y: *const i8, signs: __m256i) -> __m256i {
        let y = _mm256_loadu_si256(y as *const __m256i);
        match kind {
            QuantKind::Q4_1 => y,
            QuantKind::Q8_0 => _mm256_sign_epi8(y, signs),
        }
    }

    /// One kernel per integer dot product: `$dot(x, y)` gives the 8 lanes of 4-byte sums.
    macro_rules! kernel {
        ($(#[$doc:meta])* $name:ident, $features:literal, |$x:ident, $y:ident| $dot:expr) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(kind: QuantKind, row: &RowRef<'_>, acts: &Acts<'_>, out: &mut [f32]) {
                check(kind, row, acts, out);
                let (bb, nb, t) = (kind.block_bytes(), acts.nb, out.len());
                let (data, scales, mins) = (row.data.as_ptr(), row.scales.as_ptr(), row.mins.as_ptr());
                let (qs, yd, ys) = (acts.qs.as_ptr(), acts.d.as_ptr(), acts.s.as_ptr());
                let mut ti = 0;
                // Four tokens per weight block.
                while ti + 4 <= t {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    let mut summs = [0.0f32; 4];
                    for b in 0..nb {
                        let (wx, signs) = weights(kind, data.add(b * bb));
                        for k in 0..4 {
                            let tok = ti + k;
                            let $x = wx;
                            let $y = acts_for(kind, qs.add(tok * acts.k + b * BLOCK), signs);
                            let prod: __m256i = $dot;
                            let d = _mm256_set1_ps(*scales.add(b) * *yd.add(tok * nb + b));
                            if kind == QuantKind::Q4_1 {
                                summs[k] += *mins.add(b) * *ys.add(tok * nb + b);
                            }
                            acc[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(prod), acc[k]);
                        }
                    }
                    for k in 0..4 {
                        out[ti + k] = hsum(acc[k]) + summs[k];
                    }
                    ti += 4;
                }
                // The rest one at a time (a decode step is one token).
                for tok in ti..t {
                    let mut acc = _mm256_setzero_ps();
                    let mut summs = 0.0f32;
                    for b in 0..nb {
                        let (wx, signs) = weights(kind, data.add(b * bb));
                        let $x = wx;
                        let $y = acts_for(kind, qs.add(tok * acts.k + b * BLOCK), signs);
                        let prod: __m256i = $dot;
                        let d = _mm256_set1_ps(*scales.add(b) * *yd.add(tok * nb + b));
                        if kind == QuantKind::Q4_1 {
                            summs += *mins.add(b) * *ys.add(tok * nb + b);
                        }
                        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(prod), acc);
                    }
                    out[tok] = hsum(acc) + summs;
                }
            }
        };
    }

    kernel!(
        /// `maddubs` + `madd` (AVX2).
        row_dot, "avx2,fma", |x, y| _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
    );
    kernel!(
        /// `vpdpbusd` (AVX-VNNI): the same integers in one instruction.
        row_dot_vnni, "avx2,fma,avxvnni", |x, y| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), x, y)
    );

    /// The AVX-512 VNNI kernel: two tokens per 512-bit register (token `2k` in the low
    /// half, `2k + 1` in the high half), eight tokens per weight block. Each half takes the
    /// 256-bit kernel's operations on the same values in the same order (`vpdpbusd` on the
    /// same bytes, the same scale, one fused multiply-add per block, the same final sum), so
    /// every token gets the bits it gets alone; what changes is that one instruction serves
    /// two tokens and a weight block is unpacked once for eight. Tokens past the last eight
    /// go to the 256-bit kernel.
    #[target_feature(enable = "avx2,fma,avxvnni,avx512f,avx512bw,avx512dq,avx512vnni")]
    pub(super) unsafe fn row_dot_vnni512(kind: QuantKind, row: &RowRef<'_>, acts: &Acts<'_>, out: &mut [f32]) {
        check(kind, row, acts, out);
        let (bb, nb, t) = (kind.block_bytes(), acts.nb, out.len());
        let (data, scales, mins) = (row.data.as_ptr(), row.scales.as_ptr(), row.mins.as_ptr());
        let qs = acts.qs.as_ptr();
        assert!(acts.dt.len() >= nb * t && acts.st.len() >= nb * t, "block-major scales");
        let (dt, st) = (acts.dt.as_ptr(), acts.st.as_ptr());
        // Lanes 0-7 take scale 2k, lanes 8-15 scale 2k + 1, of eight tokens' scales.
        let pick: [__m512i; 4] = std::array::from_fn(|k| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_set1_epi32(2 * k as i32)), _mm256_set1_epi32(2 * k as i32 + 1)));
        let mut ti = 0;
        while ti + 8 <= t {
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut summs = _mm256_setzero_ps();
            for b in 0..nb {
                let (wx, signs) = weights(kind, data.add(b * bb));
                let w2 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(wx), wx);
                // The eight tokens' block scales in one load: the products the 256-bit kernel
                // forms one token at a time.
                let d8 = _mm256_mul_ps(_mm256_set1_ps(*scales.add(b)), _mm256_loadu_ps(dt.add(b * t + ti)));
                if kind == QuantKind::Q4_1 {
                    summs = _mm256_add_ps(summs, _mm256_mul_ps(_mm256_set1_ps(*mins.add(b)), _mm256_loadu_ps(st.add(b * t + ti))));
                }
                for (k, acc_k) in acc.iter_mut().enumerate() {
                    let (t0, t1) = (ti + 2 * k, ti + 2 * k + 1);
                    let y0 = acts_for(kind, qs.add(t0 * acts.k + b * BLOCK), signs);
                    let y1 = acts_for(kind, qs.add(t1 * acts.k + b * BLOCK), signs);
                    let y = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(y0), y1);
                    let prod = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w2, y);
                    let d = _mm512_permutexvar_ps(pick[k], _mm512_castps256_ps512(d8));
                    *acc_k = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(prod), *acc_k);
                }
            }
            let mut sm = [0.0f32; 8];
            _mm256_storeu_ps(sm.as_mut_ptr(), summs);
            for (k, acc_k) in acc.iter().enumerate() {
                out[ti + 2 * k] = hsum(_mm512_castps512_ps256(*acc_k)) + sm[2 * k];
                out[ti + 2 * k + 1] = hsum(_mm512_extractf32x8_ps::<1>(*acc_k)) + sm[2 * k + 1];
            }
            ti += 8;
        }
        if ti < t {
            row_dot_vnni(kind, row, &Acts { qs: &acts.qs[ti * acts.k..], d: &acts.d[ti * nb..], s: &acts.s[ti * nb..], dt: &[], st: &[], k: acts.k, nb }, &mut out[ti..]);
        }
    }

    /// Whether this CPU has AVX-512 with VNNI (checked once; `DUO_NO_AVX512` turns it off).
    pub(super) fn has_avx512_vnni() -> bool {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX512.get_or_init(|| {
            std::env::var_os("DUO_NO_AVX512").is_none()
                && has_vnni()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vnni")
        })
    }

    /// Whether this CPU has AVX-VNNI (checked once; `DUO_NO_VNNI` turns it off).
    pub(super) fn has_vnni() -> bool {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| std::env::var_os("DUO_NO_VNNI").is_none() && is_x86_feature_detected!("avxvnni"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_matrix(kind: QuantKind, rows: usize, cols: usize, rng: &mut impl Rng) -> QuantMatrix {
        let nblocks = rows * cols / BLOCK;
        let mut data = Vec::with_capacity(nblocks * kind.block_bytes());
        for _ in 0..nblocks {
            data.extend(f16::from_f32(rng.gen_range(0.001..0.05)).to_le_bytes());
            if kind == QuantKind::Q4_1 {
                data.extend(f16::from_f32(rng.gen_range(-0.3..0.0)).to_le_bytes());
                data.extend((0..16).map(|_| rng.gen::<u8>()));
            } else {
                data.extend((0..32).map(|_| rng.gen::<u8>()));
            }
        }
        QuantMatrix::new(kind, rows, cols, data).unwrap()
    }

    #[test]
    fn fast_matmul_matches_dequantised_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for kind in [QuantKind::Q4_1, QuantKind::Q8_0] {
            for &(rows, cols, t) in &[(1usize, 32usize, 1usize), (37, 96, 3), (64, 576, 5)] {
                let m = random_matrix(kind, rows, cols, &mut rng);
                let x: Vec<f32> = (0..t * cols).map(|_| rng.gen_range(-3.0..3.0)).collect();
                let fast = m.matmul(&x, t);
                let slow = m.reference_matmul(&x, t);
                let num: f32 = fast.iter().zip(&slow).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
                let den: f32 = slow.iter().map(|b| b * b).sum::<f32>().sqrt();
                // 8-bit activations: about 0.5% relative error.
                assert!(num / den < 1e-2, "{kind:?} {rows}x{cols} t={t}: {}", num / den);
                // The SIMD path and the portable path agree up to summation order.
                let q: Vec<Q8> = x.chunks(cols).map(|r| quantize_q8(r, kind == QuantKind::Q4_1)).collect();
                let qs: Vec<i8> = q.iter().flat_map(|a| a.qs.clone()).collect();
                let ds: Vec<f32> = q.iter().flat_map(|a| a.d.clone()).collect();
                let ss: Vec<f32> = q.iter().flat_map(|a| a.s.clone()).collect();
                let nb = cols / BLOCK;
                let bb = kind.block_bytes();
                for r in 0..rows {
                    let row = RowRef { data: &m.data[r * nb * bb..(r + 1) * nb * bb], scales: &m.scales[r * nb..(r + 1) * nb], mins: &m.mins[r * nb..(r + 1) * nb] };
                    let acts = Acts { qs: &qs, d: &ds, s: &ss, dt: &[], st: &[], k: cols, nb };
                    let mut portable = vec![0.0f32; t];
                    portable_row_dot(kind, &row, &acts, &mut portable);
                    for ti in 0..t {
                        let f = fast[ti * rows + r];
                        assert!((f - portable[ti]).abs() <= 1e-4 * portable[ti].abs().max(1.0), "{kind:?} row {r}: {f} vs {}", portable[ti]);
                    }
                }
            }
        }
    }

    /// Four tokens at a time, and AVX-VNNI where the CPU has it, give every token the bits it
    /// gets alone from the AVX2 kernel, on random blocks and on the extremes (all nibbles 15,
    /// Q8_0 bytes of -128, activations of +-127).
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    #[test]
    #[allow(unsafe_code)]
    fn tiles_and_vnni_give_each_token_its_bits_alone() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (rows, cols, t) = (6usize, 576usize, 11usize);
        for kind in [QuantKind::Q4_1, QuantKind::Q8_0] {
            for extreme in [false, true] {
                let mut m = random_matrix(kind, rows, cols, &mut rng);
                let mut x: Vec<f32> = (0..t * cols).map(|_| rng.gen_range(-3.0..3.0)).collect();
                if extreme {
                    let bb = kind.block_bytes();
                    for blk in m.data.chunks_mut(bb) {
                        let first = if kind == QuantKind::Q4_1 { 4 } else { 2 };
                        blk[first..].fill(if kind == QuantKind::Q4_1 { 0xFF } else { 0x80 });
                    }
                    for (i, v) in x.iter_mut().enumerate() {
                        *v = if i % 2 == 0 { 5.0 } else { -5.0 };
                    }
                }
                let q: Vec<Q8> = x.chunks(cols).map(|r| quantize_q8(r, kind == QuantKind::Q4_1)).collect();
                let qs: Vec<i8> = q.iter().flat_map(|a| a.qs.clone()).collect();
                let ds: Vec<f32> = q.iter().flat_map(|a| a.d.clone()).collect();
                let ss: Vec<f32> = q.iter().flat_map(|a| a.s.clone()).collect();
                let (nb, bb) = (cols / BLOCK, kind.block_bytes());
                for r in 0..rows {
                    let row = RowRef { data: &m.data[r * nb * bb..(r + 1) * nb * bb], scales: &m.scales[r * nb..(r + 1) * nb], mins: &m.mins[r * nb..(r + 1) * nb] };
                    let (dt, st) = (transpose(&ds, t, nb), transpose(&ss, t, nb));
                    let acts = Acts { qs: &qs, d: &ds, s: &ss, dt: &dt, st: &st, k: cols, nb };
                    let mut tiled = vec![0.0f32; t];
                    // SAFETY: the build has AVX2 and FMA; the kernel checks the slices.
                    unsafe { avx2::row_dot(kind, &row, &acts, &mut tiled) };
                    for ti in 0..t {
                        let one = Acts { qs: &qs[ti * cols..(ti + 1) * cols], d: &ds[ti * nb..(ti + 1) * nb], s: &ss[ti * nb..(ti + 1) * nb], dt: &[], st: &[], k: cols, nb };
                        let mut alone = [0.0f32];
                        // SAFETY: as above.
                        unsafe { avx2::row_dot(kind, &row, &one, &mut alone) };
                        assert_eq!(tiled[ti].to_bits(), alone[0].to_bits(), "{kind:?} extreme {extreme} row {r} token {ti}");
                    }
                    if avx2::has_avx512_vnni() {
                        let mut wide = vec![0.0f32; t];
                        // SAFETY: the CPU reports AVX-512 F/BW/DQ/VNNI and AVX-VNNI.
                        unsafe { avx2::row_dot_vnni512(kind, &row, &acts, &mut wide) };
                        assert_eq!(wide.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), tiled.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{kind:?} extreme {extreme} row {r}: AVX-512");
                    }
                    if avx2::has_vnni() {
                        let mut vnni = vec![0.0f32; t];
                        // SAFETY: the CPU reports AVX-VNNI.
                        unsafe { avx2::row_dot_vnni(kind, &row, &acts, &mut vnni) };
                        assert_eq!(vnni.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), tiled.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{kind:?} extreme {extreme} row {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_stack_of_projections_gives_each_part_its_own_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let parts = [72usize, 24, 40];
        let mats: Vec<QuantMatrix> = parts.iter().map(|&r| random_matrix(QuantKind::Q4_1, r, 256, &mut rng)).collect();
        for t in [1usize, 3, 70] {
            let x: Vec<f32> = (0..t * 256).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let want: Vec<Vec<f32>> = mats.iter().map(|m| m.matmul(&x, t)).collect();
            let stack = QuantMatrix::stack(mats.clone()).expect("same type and width");
            assert_eq!(stack.matmul_parts(&x, t, &parts), want, "t {t}");
        }
        let mixed = vec![random_matrix(QuantKind::Q4_1, 8, 64, &mut rng), random_matrix(QuantKind::Q8_0, 8, 64, &mut rng)];
        assert_eq!(QuantMatrix::stack(mixed).map(|_| ()).unwrap_err().len(), 2, "different types stay apart");
    }

    #[test]
    fn activation_quantisation_is_llama_cpp_rounding() {
        // 127/amax scaling, ties to even: 2.5 -> 2, 3.5 -> 4; s = fp16(d * sum).
        let mut x = vec![0.0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = 3.5;
        x[3] = -2.5;
        let q = quantize_q8(&x, true);
        assert_eq!(&q.qs[..4], &[127, 2, 4, -2]);
        assert_eq!(q.d[0], 1.0);
        assert_eq!(q.s[0], 131.0);
        assert!(QuantMatrix::new(QuantKind::Q8_0, 2, 32, vec![0; 10]).is_err());
    }
}
