//! Prefill attention for a chunk of queries over a layer's hybrid cache, retrieval and
//! streaming heads in one launch, on the tensor cores.
//!
//! Flash-style tiling: a block takes 64 queries of one query head (16 per warp) and walks its
//! KV head's cache in tiles of 64 rows, keeping an online softmax in registers; `Q K^T` and
//! `P V` are bf16 `mma.sync` (m16n8k16) with `f32` accumulation, and the score fragments are
//! reused in registers as the `P` operand.
//!
//! The mask is by position. A retrieval head sees every cached position up to the query's
//! (causal). A streaming head sees the Λ shape: `k <= q && (k < sink || q - k < recent)` —
//! the same rule as the CPU's `Visibility::Lambda`. Rows' positions only increase, so the walk
//! stops at the first tile past the last query, and a streaming head skips every tile that
//! holds neither sinks nor keys within `recent` of some query: its work per query is constant,
//! not proportional to the context. Fully visible tiles skip the per-element mask.
//!
//! The chunk's keys and values are in the cache before this runs (see [`crate::ops`]), so the
//! kernel reads one source per head. The parity bound against the `f64` reference is `1e-2`
//! absolute: queries and softmax weights enter the tensor cores as bf16 (2^-9 relative).

use crate::{CudaError, Result};

/// How one KV head's cache is laid out and masked, as the kernels read it (`int4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct HeadEntry {
    /// First row of the head's region in the layer's cache.
    pub offset: i32,
    /// Sink tokens (streaming heads).
    pub sink: i32,
    /// Recent window, the current token included (streaming heads); for
    /// [`HeadEntry::FIXED`] heads, the number of rows.
    pub recent: i32,
    /// [`HeadEntry::RETRIEVAL`], [`HeadEntry::STREAMING`] or [`HeadEntry::FIXED`].
    pub kind: i32,
}

impl HeadEntry {
    /// Row `r` holds position `r`.
    pub const RETRIEVAL: i32 = 0;
    /// Sinks, then a window of consecutive positions from the window start.
    pub const STREAMING: i32 = 1;
    /// Decode only: exactly `recent` rows, all visible (standalone kernel checks).
    pub const FIXED: i32 = 2;

    /// A retrieval head at `offset`.
    pub fn retrieval(offset: usize) -> Self {
        Self { offset: offset as i32, sink: 0, recent: 0, kind: Self::RETRIEVAL }
    }

    /// A streaming head at `offset`.
    pub fn streaming(offset: usize, sink: usize, recent: usize) -> Self {
        Self { offset: offset as i32, sink: sink as i32, recent: recent as i32, kind: Self::STREAMING }
    }

    /// Rows this head holds when `n` tokens have been cached and the window starts at `win`.
    pub fn rows(&self, n: usize, win: usize) -> usize {
        match self.kind {
            Self::RETRIEVAL => n,
            Self::FIXED => self.recent as usize,
            _ => {
                let s = self.sink as usize;
                n.min(s) + if n > s { n - win } else { 0 }
            }
        }
    }

    /// Position held by row `r`.
    pub fn position(&self, r: usize, win: usize) -> usize {
        if self.kind == Self::STREAMING && r >= self.sink as usize { win + r - self.sink as usize } else { r }
    }

    /// Whether a query at `q` sees the key at `k`.
    pub fn visible(&self, q: usize, k: usize) -> bool {
        k <= q && (self.kind != Self::STREAMING || k < self.sink as usize || q - k < self.recent as usize)
    }
}

/// One layer's prefill attention problem.
#[derive(Debug, Clone)]
pub struct PrefillInput {
    /// Query heads.
    pub n_heads: usize,
    /// 64 or 128.
    pub head_dim: usize,
    /// Queries of the chunk, `[t, n_heads * head_dim]`, after RoPE.
    pub q: Vec<f32>,
    /// The layer's key cache (bf16 values held as `f32`), rows of `head_dim`.
    pub keys: Vec<f32>,
    /// The value cache, laid out as `keys`.
    pub values: Vec<f32>,
    /// Per KV head.
    pub heads: Vec<HeadEntry>,
    /// Position of the chunk's first query.
    pub first_position: usize,
    /// Streaming window start.
    pub window_start: usize,
}

impl PrefillInput {
    /// Queries in the chunk.
    pub fn tokens(&self) -> usize {
        self.q.len() / (self.n_heads * self.head_dim)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CudaError::Input(m));
        let (h, d, g) = (self.n_heads, self.head_dim, self.heads.len());
        if ![64, 128].contains(&d) {
            return bad(format!("prefill head_dim {d} must be 64 or 128"));
        }
        if g == 0 || h % g != 0 || self.q.is_empty() || !self.q.len().is_multiple_of(h * d) {
            return bad(format!("{h} query heads for {g} KV heads, {} query values", self.q.len()));
        }
        let n = self.first_position + self.tokens();
        let rows = self.keys.len() / d;
        for e in &self.heads {
            if e.kind == HeadEntry::FIXED || e.offset < 0 || e.offset as usize + e.rows(n, self.window_start) > rows || self.values.len() != self.keys.len() {
                return bad(format!("head {e:?} does not fit the {rows} cache rows"));
            }
        }
        Ok(())
    }
}

/// The reference: per query, softmax over its visible cached keys, in `f64`. Returns
/// `[t, n_heads * head_dim]`.
pub fn reference(x: &PrefillInput) -> Result<Vec<f32>> {
    x.validate()?;
    let (h, d, t) = (x.n_heads, x.head_dim, x.tokens());
    let group = h / x.heads.len();
    let n = x.first_position + t;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0f32; t * h * d];
    for qh in 0..h {
        let e = x.heads[qh / group];
        let rows = e.rows(n, x.window_start);
        for i in 0..t {
            let qp = x.first_position + i;
            let q = &x.q[(i * h + qh) * d..][..d];
            let seen: Vec<usize> = (0..rows).filter(|&r| e.visible(qp, e.position(r, x.window_start))).map(|r| e.offset as usize + r).collect();
            let s: Vec<f64> = seen.iter().map(|&r| q.iter().zip(&x.keys[r * d..][..d]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale).collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for (wi, &r) in w.iter().zip(&seen) {
                for c in 0..d {
                    out[(i * h + qh) * d + c] += (wi / z * x.values[r * d + c] as f64) as f32;
                }
            }
        }
    }
    Ok(out)
}

/// The CUDA source. `HEAD_DIM` is given to NVRTC per model.
pub const SOURCE: &str = r#"
typedef unsigned short bf16_t;
#define BQ 64
#define BK 64
#define KPAD (HEAD_DIM + 8)
#define VPAD (BK + 8)
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ unsigned short to_bf(float f) {
    unsigned u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ unsigned pack(float lo, float hi) { return (unsigned)to_bf(lo) | ((unsigned)to_bf(hi) << 16); }

__device__ __forceinline__ void mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ int row_pos(int4 e, int r, int win) { return e.w == 1 && r >= e.y ? win + r - e.y : r; }

__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// 16 bytes global -> shared without passing through registers; `bytes` 0 writes zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// Four 8x8 bf16 matrices from shared memory, rows addressed by lanes 0-7, 8-15, 16-23, 24-31.
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// Shared memory: two stages of K and V tiles, rows padded to KPAD (conflict-free ldmatrix).
#define STAGE_ELEMS (BK * KPAD)
#define SMEM_BYTES (4 * STAGE_ELEMS * 2)

extern "C" __global__ void __launch_bounds__(128) duo_prefill_attention(
    const float* __restrict__ q, const bf16_t* __restrict__ keys, const bf16_t* __restrict__ values,
    const int4* __restrict__ heads, const int* __restrict__ state, int T, int n_heads, int group,
    float scale_log2, bf16_t* __restrict__ out)
{
    const int h = blockIdx.y, qt = gridDim.x - 1 - blockIdx.x;  // longest query tiles first
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
    const int p0 = state[0], win = state[1];
    const int4 e = heads[h / group];
    const int n = p0 + T;
    const int rows = e.w == 0 ? n : min(n, e.y) + (n > e.y ? n - win : 0);
    const int q_lo = p0 + qt * BQ, q_hi = min(n, q_lo + BQ) - 1;
    const int ra = qt * BQ + warp * 16 + gr, rb = ra + 8;   // chunk rows of this lane's two queries
    const int pa = p0 + ra, pb = p0 + rb;
    const size_t qs = (size_t)n_heads * HEAD_DIM;

    unsigned qf[HEAD_DIM / 16][4];
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; kk++) {
        const int c0 = kk * 16 + 2 * tq, c1 = c0 + 8;
        const float* qa = q + (size_t)ra * qs + h * HEAD_DIM;
        const float* qb = q + (size_t)rb * qs + h * HEAD_DIM;
        const bool va = ra < T, vb = rb < T;
        qf[kk][0] = va ? pack(qa[c0] * scale_log2, qa[c0 + 1] * scale_log2) : 0u;
        qf[kk][1] = vb ? pack(qb[c0] * scale_log2, qb[c0 + 1] * scale_log2) : 0u;
        qf[kk][2] = va ? pack(qa[c1] * scale_log2, qa[c1 + 1] * scale_log2) : 0u;
        qf[kk][3] = vb ? pack(qb[c1] * scale_log2, qb[c1 + 1] * scale_log2) : 0u;
    }
    float o[HEAD_DIM / 8][4];
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 8; i++) { o[i][0] = 0.f; o[i][1] = 0.f; o[i][2] = 0.f; o[i][3] = 0.f; }
    float ma = NEG_INF, mb = NEG_INF, la = 0.f, lb = 0.f;

    extern __shared__ __align__(16) bf16_t smem[];
    const bf16_t* kbase = keys + (size_t)e.x * HEAD_DIM;
    const bf16_t* vbase = values + (size_t)e.x * HEAD_DIM;

    // The next tile at or after row r that some query sees (rows' positions only increase),
    // or `rows` when there is none.
    auto next_tile = [&](int r) -> int {
        for (; r < rows; r += BK) {
            if (row_pos(e, r, win) > q_hi) return rows;
            const int r1 = min(rows, r + BK) - 1;
            if (!(e.w == 1 && r >= e.y && q_lo - row_pos(e, r1, win) >= e.z)) return r;
        }
        return rows;
    };
    auto load_tile = [&](int r0, int stage) {
        bf16_t* ks = smem + stage * STAGE_ELEMS;
        bf16_t* vs = smem + (2 + stage) * STAGE_ELEMS;
        for (int i = threadIdx.x; i < BK * HEAD_DIM / 8; i += blockDim.x) {
            const int r = i / (HEAD_DIM / 8), c = (i % (HEAD_DIM / 8)) * 8;
            const bool live = r0 + r < rows;
            const size_t at = (size_t)(live ? r0 + r : 0) * HEAD_DIM + c;
            cp_async16(ks + r * KPAD + c, kbase + at, live ? 16 : 0);
            cp_async16(vs + r * KPAD + c, vbase + at, live ? 16 : 0);
        }
    };

    int cur = next_tile(0), stage = 0;
    if (cur < rows) load_tile(cur, 0);
    cp_async_commit();
    while (cur < rows) {
        const int nxt = next_tile(cur + BK);
        if (nxt < rows) load_tile(nxt, stage ^ 1);
        cp_async_commit();
        cp_async_wait_1();
        __syncthreads();
        const bf16_t* ks = smem + stage * STAGE_ELEMS;
        const bf16_t* vs = smem + (2 + stage) * STAGE_ELEMS;
        const int r0 = cur, r1 = min(rows, r0 + BK) - 1;
        const int kp_lo = row_pos(e, r0, win), kp_hi = row_pos(e, r1, win);

        float s[BK / 8][4];
#pragma unroll
        for (int j = 0; j < BK / 8; j++) { s[j][0] = 0.f; s[j][1] = 0.f; s[j][2] = 0.f; s[j][3] = 0.f; }
#pragma unroll
        for (int j = 0; j < BK / 8; j++) {
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; kk += 2) {
                // Keys 8j..8j+7; dims 16kk.. (b0, b1) and 16(kk+1).. (b0, b1).
                unsigned b[4];
                ldmatrix_x4(b, ks + (8 * j + (lane & 7)) * KPAD + kk * 16 + (lane >> 3) * 8);
                mma(s[j], qf[kk], b[0], b[1]);
                mma(s[j], qf[kk + 1], b[2], b[3]);
            }
        }
        const bool full = r0 + BK <= rows && kp_hi <= q_lo && (e.w == 0 || r1 < e.y || q_hi - kp_lo < e.z);
        if (!full) {
#pragma unroll
            for (int j = 0; j < BK / 8; j++) {
#pragma unroll
                for (int x = 0; x < 4; x++) {
                    const int r = r0 + 8 * j + 2 * tq + (x & 1);
                    const int qp = x < 2 ? pa : pb;
                    const int kp = row_pos(e, r, win);
                    const bool vis = r < rows && kp <= qp && (e.w == 0 || kp < e.y || qp - kp < e.z);
                    if (!vis) s[j][x] = NEG_INF;
                }
            }
        }
        float xa = NEG_INF, xb = NEG_INF;
#pragma unroll
        for (int j = 0; j < BK / 8; j++) { xa = fmaxf(xa, fmaxf(s[j][0], s[j][1])); xb = fmaxf(xb, fmaxf(s[j][2], s[j][3])); }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) { xa = fmaxf(xa, __shfl_xor_sync(0xffffffff, xa, off)); xb = fmaxf(xb, __shfl_xor_sync(0xffffffff, xb, off)); }
        const float na = fmaxf(ma, xa), nb = fmaxf(mb, xb);
        const float ca = na == NEG_INF ? 1.f : exp2f(ma - na), cb = nb == NEG_INF ? 1.f : exp2f(mb - nb);
        float sa = 0.f, sb = 0.f;
#pragma unroll
        for (int j = 0; j < BK / 8; j++) {
            s[j][0] = na == NEG_INF ? 0.f : exp2f(s[j][0] - na);
            s[j][1] = na == NEG_INF ? 0.f : exp2f(s[j][1] - na);
            s[j][2] = nb == NEG_INF ? 0.f : exp2f(s[j][2] - nb);
            s[j][3] = nb == NEG_INF ? 0.f : exp2f(s[j][3] - nb);
            sa += s[j][0] + s[j][1]; sb += s[j][2] + s[j][3];
        }
        la = la * ca + sa; lb = lb * cb + sb; ma = na; mb = nb;
#pragma unroll
        for (int i = 0; i < HEAD_DIM / 8; i++) { o[i][0] *= ca; o[i][1] *= ca; o[i][2] *= cb; o[i][3] *= cb; }
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            const unsigned a[4] = {pack(s[2 * kk][0], s[2 * kk][1]), pack(s[2 * kk][2], s[2 * kk][3]),
                                   pack(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int i = 0; i < HEAD_DIM / 8; i += 2) {
                // Keys 16kk..16kk+15 (rows), dims 8i.. and 8(i+1).. (columns), transposed.
                unsigned b[4];
                ldmatrix_x4_trans(b, vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * KPAD + (i + (lane >> 4)) * 8);
                mma(o[i], a, b[0], b[1]);
                mma(o[i + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // the next iteration loads into this stage
        stage ^= 1;
        cur = nxt;
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) { la += __shfl_xor_sync(0xffffffff, la, off); lb += __shfl_xor_sync(0xffffffff, lb, off); }
    const float ia = la > 0.f ? 1.f / la : 0.f, ib = lb > 0.f ? 1.f / lb : 0.f;
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 8; i++) {
        const int c = 8 * i + 2 * tq;
        if (ra < T) *reinterpret_cast<unsigned*>(out + (size_t)ra * qs + h * HEAD_DIM + c) = pack(o[i][0] * ia, o[i][1] * ia);
        if (rb < T) *reinterpret_cast<unsigned*>(out + (size_t)rb * qs + h * HEAD_DIM + c) = pack(o[i][2] * ib, o[i][3] * ib);
    }
}
"#;

/// Random problems for the parity check: a cache of `heads` laid out as given, `t` queries.
pub fn random_input(seed: u64, n_heads: usize, head_dim: usize, heads: Vec<HeadEntry>, cache_rows: usize, t: usize, first_position: usize, window_start: usize) -> PrefillInput {
    let r = |k: u64, n: usize, round: bool| -> Vec<f32> {
        (0..n as u64).map(|i| {
            let v = crate::ops::hash_uniform(seed.wrapping_mul(31).wrapping_add(k), i) * 1.7;
            if round { crate::ops::round_bf16(v) } else { v }
        }).collect()
    };
    PrefillInput {
        n_heads,
        head_dim,
        q: r(1, t * n_heads * head_dim, false),
        keys: r(2, cache_rows * head_dim, true),
        values: r(3, cache_rows * head_dim, true),
        heads,
        first_position,
        window_start,
    }
}

/// The parity cases: first chunks, later chunks, streaming windows with and without gaps,
/// GQA and MHA, head dims 64 and 128, lengths off the tile size.
pub fn cases(seed: u64) -> Vec<(String, PrefillInput)> {
    let mut out = Vec::new();
    // (heads, dim, kinds (true = retrieval), first position, chunk, sink, recent, window start)
    let specs: [(usize, usize, &[bool], usize, usize, usize, usize, usize); 5] = [
        (4, 128, &[true, false], 0, 200, 8, 40, 8),          // first chunk: sinks fill, then window
        (8, 128, &[true, false], 1000, 130, 16, 100, 900),   // later chunk, window of 100 + 130
        (3, 64, &[false, true, false], 300, 77, 4, 64, 236), // SmolLM2-like MHA, window start past sinks
        (2, 64, &[true, true], 0, 1, 4, 16, 4),             // one token
        (32, 128, &[true, false, true, false, false, true, false, false], 4000, 256, 64, 256, 3700),
    ];
    for (i, (h, d, kinds, p0, t, sink, recent, win)) in specs.iter().enumerate() {
        let n = p0 + t;
        let mut heads = Vec::new();
        let mut at = 0;
        for &retrieval in kinds.iter() {
            let e = if retrieval { HeadEntry::retrieval(at) } else { HeadEntry::streaming(at, *sink, *recent) };
            at += e.rows(n, *win) + 3; // gaps between regions catch reads past a head's rows
            heads.push(e);
        }
        let x = random_input(seed + i as u64, *h, *d, heads, at, *t, *p0, *win);
        out.push((format!("prefill attention: {h} heads x {d}, kinds {kinds:?}, positions {p0}..{n}, sink {sink} recent {recent} window from {win}"), x));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_rows_and_positions_follow_the_window() {
        let e = HeadEntry::streaming(0, 4, 8);
        assert_eq!(e.rows(3, 4), 3, "fewer tokens than sinks");
        assert_eq!(e.rows(20, 10), 4 + 10);
        assert_eq!(e.position(2, 10), 2);
        assert_eq!(e.position(4, 10), 10);
        assert_eq!(e.position(13, 10), 19);
        assert!(e.visible(19, 12) && !e.visible(19, 11) && e.visible(19, 3) && !e.visible(19, 20));
        let r = HeadEntry::retrieval(5);
        assert_eq!((r.rows(20, 10), r.position(13, 10)), (20, 13));
        assert!(r.visible(19, 0) && !r.visible(3, 4));
    }

    #[test]
    fn reference_of_a_first_token_is_its_value() {
        let cases = cases(3);
        let x = &cases[3].1; // one token at position 0: it sees only itself
        let out = reference(x).unwrap();
        let d = x.head_dim;
        for qh in 0..x.n_heads {
            let e = x.heads[qh / (x.n_heads / x.heads.len())];
            let v = &x.values[e.offset as usize * d..][..d];
            assert!(out[qh * d..][..d].iter().zip(v).all(|(a, b)| (a - b).abs() < 1e-6));
        }
    }

    #[test]
    fn every_case_is_valid() {
        for (name, x) in cases(1) {
            assert!(x.validate().is_ok(), "{name}");
        }
        let mut x = cases(1).remove(0).1;
        x.keys.truncate(64);
        assert!(reference(&x).is_err());
    }
}
