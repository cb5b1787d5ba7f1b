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
//! the same rule as the CPU's `Visibility::Lambda`. The kernel walks a head's positions in
//! order (a streaming head: its sinks, then its ring from the oldest position it holds), each
//! row found through the sequence's block table ([`crate::paged`]); so the walk stops at the
//! first tile past the last query, and a streaming head skips every tile that holds neither
//! sinks nor keys within `recent` of some query: its work per query is constant, not
//! proportional to the context. Fully visible tiles skip the per-element mask.
//!
//! The chunk's keys and values are in the cache before this runs (see [`crate::ops`]), so the
//! kernel reads one source per head. The parity bound against the `f64` reference is `1e-2`
//! absolute: queries and softmax weights enter the tensor cores as bf16 (2^-9 relative).

use crate::{CudaError, Result};

/// How one KV head is cached and masked, as the kernels read it (`int4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct HeadEntry {
    /// The head's index among the model's retrieval heads (a retrieval head) or streaming
    /// heads (a streaming head): its unit within a block (see [`crate::paged`]).
    pub offset: i32,
    /// Sink tokens (streaming heads).
    pub sink: i32,
    /// Recent window, the current token included (streaming heads).
    pub recent: i32,
    /// [`HeadEntry::RETRIEVAL`] or [`HeadEntry::STREAMING`].
    pub kind: i32,
}

impl HeadEntry {
    /// Keeps every position.
    pub const RETRIEVAL: i32 = 0;
    /// Keeps the sinks and a ring of the latest positions.
    pub const STREAMING: i32 = 1;
    /// Not this launch's head: where the two kinds keep different types, each kernel runs
    /// once per kind, and a head of the other kind does nothing (its blocks return at once).
    pub const SKIP: i32 = 2;

    /// A head another launch runs ([`HeadEntry::SKIP`]).
    pub fn skip() -> Self {
        Self { offset: 0, sink: 0, recent: 0, kind: Self::SKIP }
    }

    /// The retrieval head of index `index`.
    pub fn retrieval(index: usize) -> Self {
        Self {
            offset: index as i32,
            sink: 0,
            recent: 0,
            kind: Self::RETRIEVAL,
        }
    }

    /// The streaming head of index `index`.
    pub fn streaming(index: usize, sink: usize, recent: usize) -> Self {
        Self {
            offset: index as i32,
            sink: sink as i32,
            recent: recent as i32,
            kind: Self::STREAMING,
        }
    }

    /// A layer's entries as the kernels read them: one `int4` per KV head.
    pub fn table(heads: &[HeadEntry]) -> Vec<i32> {
        heads
            .iter()
            .flat_map(|e| [e.offset, e.sink, e.recent, e.kind])
            .collect()
    }

    /// Whether a query at `q` sees the key at `k`.
    pub fn visible(&self, q: usize, k: usize) -> bool {
        if self.kind == Self::STREAMING {
            duo_core::cache_spec::lambda_sees(self.sink as usize, self.recent as usize, q, k)
        } else {
            k <= q
        }
    }
}

/// One layer's prefill attention problem: a chunk of queries after a cached prefix.
#[derive(Debug, Clone)]
pub struct PrefillInput {
    /// Query heads.
    pub n_heads: usize,
    /// 64 or 128.
    pub head_dim: usize,
    /// Queries of the chunk, `[t, n_heads * head_dim]`, after RoPE.
    pub q: Vec<f32>,
    /// Keys of every position up to the chunk's end (bf16 values held as `f32`):
    /// `[kv head][position][head_dim]`.
    pub keys: Vec<f32>,
    /// Values, laid out as `keys`.
    pub values: Vec<f32>,
    /// Per KV head.
    pub heads: Vec<HeadEntry>,
    /// Position of the chunk's first query.
    pub first_position: usize,
}

impl PrefillInput {
    /// Queries in the chunk.
    pub fn tokens(&self) -> usize {
        self.q.len() / (self.n_heads * self.head_dim)
    }

    /// Positions cached once the chunk is in.
    pub fn positions(&self) -> usize {
        self.first_position + self.tokens()
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CudaError::Input(m));
        let (h, d, g) = (self.n_heads, self.head_dim, self.heads.len());
        if ![64, 128].contains(&d) {
            return bad(format!("prefill head_dim {d} must be 64 or 128"));
        }
        if g == 0 || h % g != 0 || self.q.is_empty() || !self.q.len().is_multiple_of(h * d) {
            return bad(format!(
                "{h} query heads for {g} KV heads, {} query values",
                self.q.len()
            ));
        }
        if self.keys.len() != g * self.positions() * d || self.values.len() != self.keys.len() {
            return bad(format!(
                "keys and values must hold {} positions of {g} heads",
                self.positions()
            ));
        }
        Ok(())
    }
}

/// The reference: per query, softmax over the keys its head sees, in `f64`. Returns
/// `[t, n_heads * head_dim]`.
pub fn reference(x: &PrefillInput) -> Result<Vec<f32>> {
    x.validate()?;
    let (h, d, t, n) = (x.n_heads, x.head_dim, x.tokens(), x.positions());
    let group = h / x.heads.len();
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0f32; t * h * d];
    for qh in 0..h {
        let g = qh / group;
        let e = x.heads[g];
        for i in 0..t {
            let qp = x.first_position + i;
            let q = &x.q[(i * h + qh) * d..][..d];
            let seen: Vec<usize> = (0..=qp)
                .filter(|&p| e.visible(qp, p))
                .map(|p| (g * n + p) * d)
                .collect();
            let s: Vec<f64> = seen
                .iter()
                .map(|&at| {
                    q.iter()
                        .zip(&x.keys[at..][..d])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for (wi, &at) in w.iter().zip(&seen) {
                for c in 0..d {
                    out[(i * h + qh) * d + c] += (wi / z * x.values[at + c] as f64) as f32;
                }
            }
        }
    }
    Ok(out)
}

/// The tensor-core helpers the prefill kernel and the tensor-core decode kernel share: bf16
/// packing, `ex2`, `mma.sync` m16n8k16, `cp.async` and `ldmatrix`. Compiled before either.
pub const TENSOR_CORE_HELPERS: &str = r#"
typedef unsigned short bf16_t;
#ifndef NEG_INF
#define NEG_INF __int_as_float(0xff800000)
#endif

__device__ __forceinline__ unsigned short to_bf(float f) {
    unsigned u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
// Two f32 to a bf16 pair (round to nearest even, as to_bf) in one instruction.
__device__ __forceinline__ unsigned pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// 2^x on the special-function unit (inputs here are <= 0; -inf gives 0).
__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}
// One row's online-softmax step over the N score pairs p[4 j], p[4 j + 1] this lane holds of
// it in mma accumulator tiles (the quad's other lanes hold its other columns): the row's
// maximum over the quad, the pairs replaced by exp2(score - maximum) in place, the running
// maximum `m` and this lane's running sum `l` updated. Returns the factor the row's output
// so far is scaled by. A row that has seen no key yet subtracts 0: exp2(-inf) = 0 and its
// sums stay 0. With TREE the row's maximum and sum are four independent partial results
// (chains a quarter as long; the maximum is the same, the sum differs by rounding order),
// else one chain each.
template <int N, bool TREE = false>
__device__ __forceinline__ float softmax_row(float* p, float& m, float& l) {
    constexpr int K = TREE ? 4 : 1;
    static_assert(N >= K, "a partial result per pair at least");
    float part[K];
#pragma unroll
    for (int k = 0; k < K; k++) part[k] = fmaxf(p[4 * k], p[4 * k + 1]);
#pragma unroll
    for (int j = K; j < N; j++) part[j % K] = fmaxf(part[j % K], fmaxf(p[4 * j], p[4 * j + 1]));
    float mx = part[0];
    if (TREE) mx = fmaxf(fmaxf(part[0], part[1 % K]), fmaxf(part[2 % K], part[3 % K]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    const float nm = fmaxf(m, mx);
    const float base = nm == NEG_INF ? 0.f : nm;
    const float c = fast_exp2(m - base);
    float sum[K];
#pragma unroll
    for (int k = 0; k < K; k++) sum[k] = 0.f;
#pragma unroll
    for (int j = 0; j < N; j++) {
        p[4 * j] = fast_exp2(p[4 * j] - base);
        p[4 * j + 1] = fast_exp2(p[4 * j + 1] - base);
        if (TREE && j < K) sum[j % K] = p[4 * j] + p[4 * j + 1];
        else sum[j % K] += p[4 * j] + p[4 * j + 1];
    }
    float total = sum[0];
    if (TREE) total = (sum[0] + sum[1 % K]) + (sum[2 % K] + sum[3 % K]);
    l = l * c + total;
    m = nm;
    return c;
}

__device__ __forceinline__ void mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// The f16 twins of pack and mma: over an fp8 cache the tensor cores run in f16, since e4m3
// values times a power-of-two row scale are exact in f16 (crate::fp8).
__device__ __forceinline__ unsigned pack_h(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ void mma_h(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#if defined(KV_FP8) || defined(KV_INT8) || defined(KV_INT4) || defined(KV_K8V4)
#define KV_BYTES 1
#endif
// Each side's format: KEY_INT4 / VAL_INT4 where that side holds int4 (int4, and K8V4's
// values), BYTES_INT8 where the byte side(s) hold int8 (int8, and K8V4's keys) rather than
// e4m3.
#if defined(KV_INT4)
#define KEY_INT4 1
#define VAL_INT4 1
#elif defined(KV_K8V4)
#define VAL_INT4 1
#define BYTES_INT8 1
#elif defined(KV_INT8)
#define BYTES_INT8 1
#endif
// Bytes of a cached row of a quantised cache, keys' and values': a byte per value, or
// int4's two per byte. ROW_BYTES, the wider, is what a staged row is padded from.
#ifdef KEY_INT4
#define K_ROW_BYTES (HEAD_DIM / 2)
#else
#define K_ROW_BYTES HEAD_DIM
#endif
#ifdef VAL_INT4
#define V_ROW_BYTES (HEAD_DIM / 2)
#else
#define V_ROW_BYTES HEAD_DIM
#endif
#define ROW_BYTES K_ROW_BYTES
// Two cache bytes (the low 16 bits of x) to an f16 pair, exactly: e4m3 by conversion; int8
// (two's complement) as f16 1024 + (b ^ 0x80) built by a byte permute, less 1152.
__device__ __forceinline__ unsigned bytes2_h(unsigned x) {
    unsigned r;
#ifdef BYTES_INT8
    r = __byte_perm(x ^ 0x8080u, 0x64646464u, 0x4140);
    asm("sub.rn.f16x2 %0, %0, %1;" : "+r"(r) : "r"(0x64806480u));
#else
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"((unsigned short)x));
#endif
    return r;
}
// A row scale as an f16 pair (exact: scales are powers of two within f16's range).
__device__ __forceinline__ unsigned scale_h2(float s) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %1;" : "=r"(r) : "f"(s));
    return r;
}
// int4 (crate::int4): the pair of values (2j, 2j + 1) of a word of 8 codes as the f16 pair
// (1024 + n, 1024 + n'), exact: the codes masked into the mantissas of f16 1024 by one
// three-input logic op ((w >> 4j) & mask | exponent; written out, ptxas emits an AND and an
// OR, as only one operand of its LOP3 may be an immediate).
__device__ __forceinline__ unsigned nib2_biased(unsigned w, int j) {
    unsigned r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w >> (4 * j)), "r"(0x000f000fu), "r"(0x64006400u));
    return r;
}
// The same pair as the codes themselves (0..15): 1024 taken away.
__device__ __forceinline__ unsigned nib2_h(unsigned w, int j) {
    unsigned r = nib2_biased(w, j);
    asm("sub.rn.f16x2 %0, %0, %1;" : "+r"(r) : "r"(0x64006400u));
    return r;
}
// A row's int4 scale word (f16 step low, f16 minimum high) as the pairs (step, step) and
// (min, min).
__device__ __forceinline__ void int4_params(float word, unsigned* s2, unsigned* z2) {
    const unsigned u = __float_as_uint(word);
    *s2 = __byte_perm(u, 0, 0x1010);
    *z2 = __byte_perm(u, 0, 0x3232);
}
// One f16 to f32.
__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#ifdef KV_BYTES
// 16 values of a quantised row from value c (`row` its bytes, in shared or global memory;
// `word` its scale) to f16 pairs in eight registers: byte codes times the scale, or (INT4:
// the side holds int4) n * step + min (one f16 fused multiply-add, as crate::int4::value).
template <bool INT4>
__device__ __forceinline__ void dequant_row16_regs(const unsigned char* row, int c, float word, unsigned* h) {
    if (INT4) {
        const uint2 x = *reinterpret_cast<const uint2*>(row + c / 2);
        unsigned s2, z2;
        int4_params(word, &s2, &z2);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            h[j] = nib2_h(x.x, j);
            h[4 + j] = nib2_h(x.y, j);
            asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(h[j]) : "r"(s2), "r"(z2));
            asm("fma.rn.f16x2 %0, %0, %1, %2;" : "+r"(h[4 + j]) : "r"(s2), "r"(z2));
        }
    } else {
        const uint4 x = *reinterpret_cast<const uint4*>(row + c);
        const unsigned w[4] = {x.x, x.y, x.z, x.w};
        const unsigned s2 = scale_h2(word);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            h[2 * i] = bytes2_h(w[i] & 0xffffu);
            h[2 * i + 1] = bytes2_h(w[i] >> 16);
            asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(h[2 * i]) : "r"(s2));
            asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(h[2 * i + 1]) : "r"(s2));
        }
    }
}
// The same to 16 f16 at `dst` (shared memory).
template <bool INT4>
__device__ __forceinline__ void dequant_row16(const unsigned char* row, int c, float word, unsigned short* dst) {
    unsigned h[8];
    dequant_row16_regs<INT4>(row, c, word, h);
    *reinterpret_cast<uint4*>(dst) = make_uint4(h[0], h[1], h[2], h[3]);
    *reinterpret_cast<uint4*>(dst + 8) = make_uint4(h[4], h[5], h[6], h[7]);
}
#ifdef KEY_INT4
#define KEY_IS_INT4 true
#else
#define KEY_IS_INT4 false
#endif
#ifdef VAL_INT4
#define VAL_IS_INT4 true
#else
#define VAL_IS_INT4 false
#endif
#endif

// 16 bytes global -> shared without passing through registers; `bytes` 0 writes zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
#if CP_L2_PREFETCH == 256
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" :: "r"(smem_addr(dst)), "l"(src), "r"(bytes));
#elif CP_L2_PREFETCH == 128
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;" :: "r"(smem_addr(dst)), "l"(src), "r"(bytes));
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_addr(dst)), "l"(src), "r"(bytes));
#endif
}
// 16 bytes global -> shared, all of them, to a shared-space address (no conversion, no size).
__device__ __forceinline__ void cp_async16_full(unsigned dst, const void* src) {
#if CP_L2_PREFETCH == 256
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" :: "r"(dst), "l"(src));
#elif CP_L2_PREFETCH == 128
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;" :: "r"(dst), "l"(src));
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src));
#endif
}
// 4 bytes global -> shared (the L1-allocating form: `cg` copies 16 bytes only).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }
__device__ __forceinline__ void cp_async_wait_0() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// Four 8x8 bf16 matrices from shared memory, rows addressed by lanes 0-7, 8-15, 16-23, 24-31.
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

"#;

/// The CUDA source (after [`TENSOR_CORE_HELPERS`]). `HEAD_DIM` is given to NVRTC per model.
pub const SOURCE: &str = r#"
#define BQ 128
#define BK 64
#define KPAD (HEAD_DIM + 8)
#define VPAD (BK + 8)


// Shared memory: the block's queries (bf16, pre-scaled), then two stages of K and V tiles;
// rows padded to KPAD so that ldmatrix reads are free of bank conflicts.
#define STAGE_ELEMS (BK * KPAD)
#define Q_ELEMS (BQ * KPAD)
#ifdef KV_BYTES
// A quantised cache (fp8, int8, int4, K8V4): two stages of raw rows (ROW_BYTES, padded by 16) and
// their scales after the queries, then the tile's K and V dequantised to f16 (the tensor
// cores run in f16).
typedef unsigned char kv_t;
#define RPAD (ROW_BYTES + 16)
#define RAW_TILE (BK * RPAD)
#define PACK pack_h
#define MMA mma_h
#else
typedef bf16_t kv_t;
#define PACK pack
#define MMA mma
#endif

// `state = [slot, first position]`: the chunk's sequence and where it starts. A streaming
// head's ring holds positions from `win = max(sink, n - cap)`; its rows (in the order the
// kernel walks them) are the sinks, then `win..n`.
extern "C" __global__ void __launch_bounds__(128, 1) duo_prefill_attention(
    const float* __restrict__ q, const kv_t* __restrict__ keys, const kv_t* __restrict__ values,
    const int4* __restrict__ heads, const int* __restrict__ state, Paged pg, int T, int n_heads, int group,
    float scale_log2, bf16_t* __restrict__ out)
{
    const int h = blockIdx.y, qt = gridDim.x - 1 - blockIdx.x;  // longest query tiles first
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
    const int slot = state[0], p0 = state[1];
    const int4 e = heads[h / group];
    if (e.w == 2) return;  // another launch's head (HeadEntry::SKIP)
    const int n = p0 + T;
    // A streaming head's ring rows (read once: every row lookup below takes it).
    const int cap = e.w == 1 ? slot_cap(pg, slot) : 1;
    const int win = e.w == 1 ? max(e.y, n - cap) : 0;
    const int rows = e.w == 0 ? n : min(n, e.y) + (n > e.y ? n - win : 0);
    const int q_lo = p0 + qt * BQ, q_hi = min(n, q_lo + BQ) - 1;
    // This lane's four query rows (chunk rows): m-tile mt, half hf -> warp*32 + mt*16 + hf*8 + gr.
    const int row0 = qt * BQ + warp * 32 + gr;
    const size_t qs = (size_t)n_heads * HEAD_DIM;

    extern __shared__ __align__(16) bf16_t smem[];
    bf16_t* qsm = smem;
    // Queries to shared memory as bf16, scaled for exp2.
    for (int i = threadIdx.x; i < BQ * HEAD_DIM / 2; i += blockDim.x) {
        const int r = i / (HEAD_DIM / 2), c = (i % (HEAD_DIM / 2)) * 2;
        const int qr = qt * BQ + r;
        unsigned v = 0u;
        if (qr < T) {
            const float2 x = *reinterpret_cast<const float2*>(q + (size_t)qr * qs + h * HEAD_DIM + c);
            v = PACK(x.x * scale_log2, x.y * scale_log2);
        }
        *reinterpret_cast<unsigned*>(qsm + r * KPAD + c) = v;
    }

    float o[2][HEAD_DIM / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int i = 0; i < HEAD_DIM / 8; i++) { o[mt][i][0] = 0.f; o[mt][i][1] = 0.f; o[mt][i][2] = 0.f; o[mt][i][3] = 0.f; }
    float m[4], l[4];  // per row: mt * 2 + hf
#pragma unroll
    for (int x = 0; x < 4; x++) { m[x] = NEG_INF; l[x] = 0.f; }

    auto next_tile = [&](int r) { return next_seen_tile(e, r, rows, win, q_lo, q_hi, BK); };
#ifdef KV_BYTES
    unsigned char* raw = reinterpret_cast<unsigned char*>(smem + Q_ELEMS);        // [2][K, V][BK][RPAD]
    float* scl = reinterpret_cast<float*>(raw + 4 * RAW_TILE);                    // [2][K, V][BK]
    bf16_t* conv = reinterpret_cast<bf16_t*>(scl + 4 * BK);                        // K, V: [BK][KPAD] each (f16)
    auto load_tile = [&](int r0, int stage) {
        unsigned char* kr = raw + stage * 2 * RAW_TILE;
        const long long run = page_run(pg, e, slot, r0, rows);
        for (int i = threadIdx.x; i < BK * K_ROW_BYTES / 16; i += blockDim.x) {
            const int r = i / (K_ROW_BYTES / 16), c = (i % (K_ROW_BYTES / 16)) * 16;
            const bool live = r0 + r < rows;
            const size_t row = (size_t)(run >= 0 ? run + r : live ? kv_row_cap(pg, e, slot, walk_pos(e, r0 + r, win), cap) : 0);
            cp_async16(kr + r * RPAD + c, keys + row * K_ROW_BYTES + c, live ? 16 : 0);
            // A value row is as wide as a key row, or (K8V4) half as wide.
            if (c < V_ROW_BYTES) cp_async16(kr + RAW_TILE + r * RPAD + c, values + row * V_ROW_BYTES + c, live ? 16 : 0);
        }
        // Row scales: threads 0-63 the keys', 64-127 the values'.
        const int r = threadIdx.x % BK;
        const bool live = r0 + r < rows;
        const long long row = run >= 0 ? run + r : live ? kv_row_cap(pg, e, slot, walk_pos(e, r0 + r, win), cap) : 0;
        cp_async4(scl + (stage * 2 + threadIdx.x / BK) * BK + r, (threadIdx.x < BK ? pg.kscale : pg.vscale) + row, live ? 4 : 0);
    };
#else
    auto load_tile = [&](int r0, int stage) {
        bf16_t* ks = smem + Q_ELEMS + stage * STAGE_ELEMS;
        bf16_t* vs = smem + Q_ELEMS + (2 + stage) * STAGE_ELEMS;
        const long long run = page_run(pg, e, slot, r0, rows);
        for (int i = threadIdx.x; i < BK * HEAD_DIM / 8; i += blockDim.x) {
            const int r = i / (HEAD_DIM / 8), c = (i % (HEAD_DIM / 8)) * 8;
            const bool live = r0 + r < rows;
            const long long row = run >= 0 ? run + r : live ? kv_row_cap(pg, e, slot, walk_pos(e, r0 + r, win), cap) : 0;
            cp_async16(ks + r * KPAD + c, keys + (size_t)key_row(pg, row) * HEAD_DIM + c, live ? 16 : 0);
            cp_async16(vs + r * KPAD + c, values + (size_t)row * HEAD_DIM + c, live ? 16 : 0);
        }
    };
#endif

    int cur = next_tile(0), stage = 0;
    if (cur < rows) load_tile(cur, 0);
    cp_async_commit();
    while (cur < rows) {
        const int nxt = next_tile(cur + BK);
        if (nxt < rows) load_tile(nxt, stage ^ 1);
        cp_async_commit();
        cp_async_wait_1();
        __syncthreads();
#ifdef KV_BYTES
        // The tile's keys and values to f16, each row times its scale.
        for (int i = threadIdx.x; i < 2 * BK * HEAD_DIM / 16; i += blockDim.x) {
            const int kv = i / (BK * HEAD_DIM / 16), j = i % (BK * HEAD_DIM / 16);
            const int r = j / (HEAD_DIM / 16), c = (j % (HEAD_DIM / 16)) * 16;
            const unsigned char* src = raw + (stage * 2 + kv) * RAW_TILE + r * RPAD;
            const float word = scl[(stage * 2 + kv) * BK + r];
            unsigned short* dst = conv + (kv * BK + r) * KPAD + c;
            if (kv) dequant_row16<VAL_IS_INT4>(src, c, word, dst);
            else dequant_row16<KEY_IS_INT4>(src, c, word, dst);
        }
        __syncthreads();
        const bf16_t* ks = conv;
        const bf16_t* vs = conv + BK * KPAD;
#else
        const bf16_t* ks = smem + Q_ELEMS + stage * STAGE_ELEMS;
        const bf16_t* vs = smem + Q_ELEMS + (2 + stage) * STAGE_ELEMS;
#endif
        const int r0 = cur, r1 = min(rows, r0 + BK) - 1;
        const int kp_lo = walk_pos(e, r0, win), kp_hi = walk_pos(e, r1, win);

        float s[2][BK / 8][4];
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int j = 0; j < BK / 8; j++) { s[mt][j][0] = 0.f; s[mt][j][1] = 0.f; s[mt][j][2] = 0.f; s[mt][j][3] = 0.f; }
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; kk++) {
            // A fragments of both m-tiles for dims 16kk..16kk+15.
            unsigned a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
                ldmatrix_x4(a[mt], qsm + (warp * 32 + mt * 16 + (lane & 15)) * KPAD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int jp = 0; jp < BK / 16; jp++) {
                // Keys 16jp..16jp+7 (b0, b1) and 16jp+8..16jp+15 (b2, b3), dims 16kk..
                unsigned b[4];
                ldmatrix_x4(b, ks + (16 * jp + (lane & 7) + ((lane >> 4) & 1) * 8) * KPAD + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    MMA(s[mt][2 * jp], a[mt], b[0], b[1]);
                    MMA(s[mt][2 * jp + 1], a[mt], b[2], b[3]);
                }
            }
        }
        const bool full = r0 + BK <= rows && kp_hi <= q_lo && (e.w == 0 || r1 < e.y || q_hi - kp_lo < e.z);
        if (!full) {
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int j = 0; j < BK / 8; j++)
#pragma unroll
                    for (int x = 0; x < 4; x++) {
                        const int r = r0 + 8 * j + 2 * tq + (x & 1);
                        const int qp = p0 + row0 + mt * 16 + (x >> 1) * 8;
                        const int kp = walk_pos(e, r, win);
                        const bool vis = r < rows && kp <= qp && (e.w == 0 || kp < e.y || qp - kp < e.z);
                        if (!vis) s[mt][j][x] = NEG_INF;
                    }
        }
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int x = mt * 2 + hf;
                const float c = softmax_row<BK / 8>(&s[mt][0][2 * hf], m[x], l[x]);
#pragma unroll
                for (int i = 0; i < HEAD_DIM / 8; i++) { o[mt][i][2 * hf] *= c; o[mt][i][2 * hf + 1] *= c; }
            }
        }
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            unsigned pa[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                pa[mt][0] = PACK(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = PACK(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = PACK(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = PACK(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int i = 0; i < HEAD_DIM / 8; i += 2) {
                // Keys 16kk..16kk+15 (rows), dims 8i.. and 8(i+1).. (columns), transposed.
                unsigned b[4];
                ldmatrix_x4_trans(b, vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * KPAD + (i + (lane >> 4)) * 8);
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    MMA(o[mt][i], pa[mt], b[0], b[1]);
                    MMA(o[mt][i + 1], pa[mt], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // the next iteration loads into this stage
        stage ^= 1;
        cur = nxt;
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int x = mt * 2 + hf;
            float sum = l[x];
            sum += __shfl_xor_sync(0xffffffff, sum, 1);
            sum += __shfl_xor_sync(0xffffffff, sum, 2);
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            const int r = row0 + mt * 16 + hf * 8;
            if (r < T) {
#pragma unroll
                for (int i = 0; i < HEAD_DIM / 8; i++)
                    *reinterpret_cast<unsigned*>(out + (size_t)r * qs + h * HEAD_DIM + 8 * i + 2 * tq) = pack(o[mt][i][2 * hf] * inv, o[mt][i][2 * hf + 1] * inv);
            }
        }
    }
}
"#;

/// One warpgroup-wide `wgmma` product, m64 x `n` x k16, bf16 (or with `f16`, f16) in, f32
/// accumulators: a CUDA
/// function `name(float* d, const unsigned* a, unsigned long long b, int accumulate)` with A
/// (64 x 16) in registers (each warp's 16 rows as an `mma.sync` m16n8k16 A fragment) and B
/// from a shared-memory descriptor, K-major, or with `trans` MN-major. `accumulate` 0
/// overwrites `d`. `d[4 t + x]` holds row `gr + 8 (x >> 1)` of the warp's 16, column
/// `8 t + 2 tq + (x & 1)` (the `mma.sync` accumulator layout, repeated over n / 8 tiles).
pub fn wgmma_function(name: &str, n: usize, trans: bool, f16: bool) -> String {
    let acc = n / 2;
    let d: Vec<String> = (0..acc).map(|i| format!("%{i}")).collect();
    let outs: Vec<String> = (0..acc).map(|i| format!("\"+f\"(d[{i}])")).collect();
    format!(
        "__device__ __forceinline__ void {name}(float* d, const unsigned* a, unsigned long long b, int accumulate) {{\n    asm volatile(\"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{s}, 0;\\nwgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} {{{dl}}}, {{%{a0}, %{a1}, %{a2}, %{a3}}}, %{b}, p, 1, 1, {t};\\n}}\\n\"\n        : {outs}\n        : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"l\"(b), \"r\"(accumulate));\n}}\n",
        s = acc + 5,
        dl = d.join(", "),
        a0 = acc,
        a1 = acc + 1,
        a2 = acc + 2,
        a3 = acc + 3,
        b = acc + 4,
        t = u8::from(trans),
        ty = if f16 { "f16" } else { "bf16" },
        outs = outs.join(", "),
    )
}

/// The Hopper prefill kernel (after [`TENSOR_CORE_HELPERS`] and the `wgmma` functions
/// `wg_qk` (n = 64 keys, K-major) and `wg_pv` (n = `HEAD_DIM`, MN-major), compiled for
/// `sm_90a`): bf16 caches, heads of 64 or 128.
///
/// The same walk, masks and online softmax as [`SOURCE`], on Hopper's warpgroup
/// instructions: a block of two warpgroups takes 128 queries of one head (64 each), the
/// queries stay in registers as the A operand of `wgmma.mma_async` m64n64k16 (`Q K^T`, the
/// keys read by the tensor cores straight from shared memory through a matrix descriptor),
/// and the softmax weights, packed to bf16 in registers, are the A operand of m64n`HEAD_DIM`k16
/// (`P V`, the values read transposed from shared memory). One instruction per warpgroup
/// does what 8 to 16 `mma.sync` and their `ldmatrix` loads did. Tiles of 128 keys and values
/// (`WG_BK`, 64 as a knob) come by `cp.async` into the 128-byte-swizzled layout (`WG_SWIZZLE`:
/// one column block of 128-byte rows per 64 dimensions, a row's 16-byte chunks permuted by the
/// row index mod 8), read K-major for the keys (a k16 step 32 bytes along the row; stride: 8
/// keys, 1,024 bytes) and MN-major for the values (leading offset: the next column block;
/// stride: 8 keys) — the descriptor fields measured on the H200 by
/// `scripts/probes/wgmma_swizzle_probe.cu`. The swizzle lets a warp copy whole 128-byte lines
/// without shared-memory bank conflicts; the unswizzled core matrices it replaced made a warp
/// read half lines and bound the kernel by L2 (BENCHMARKS.md, session 16).
pub const WG_SOURCE: &str = r#"
#define WG_BQ 128
// Keys per tile: 64, or 128 (`DUO_PREFILL_WG_BK`: half the per-tile barriers, waits and
// softmax reductions, twice the score registers).
#ifndef WG_BK
#define WG_BK 64
#endif
#if WG_BK != 64 && WG_BK != 128
#error "WG_BK is 64 or 128"
#endif
#define ROW_CORES (HEAD_DIM / 8)
#define WG_TILE_BYTES (WG_BK * HEAD_DIM * 2)

// WG_SWIZZLE = 1 (the default): K and V tiles in the 128-byte-swizzled layout (rows of 128
// bytes, one column block per 64 dimensions, a row's 16-byte chunks permuted by the row's
// index mod 8), which lets the copying warps read whole 128-byte lines of the cache (a
// warp's 32 chunks are whole rows) and still write shared memory without bank conflicts.
// 0: unswizzled core matrices (8 rows x 16 bytes), where a warp reads half lines: on the H200
// that form's L2 traffic ran at 89% of its peak (Nsight Compute), the prefill's limit.
#ifndef WG_SWIZZLE
#define WG_SWIZZLE 1
#endif
#define WG_COLBLOCK (WG_BK * 128)
__device__ __forceinline__ unsigned long long wg_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr >> 4) & 0x3fffu) | ((unsigned long long)((lbo >> 4) & 0x3fffu) << 16)
         | ((unsigned long long)((sbo >> 4) & 0x3fffu) << 32) | (WG_SWIZZLE ? 1ull << 62 : 0ull);
}
// Byte offset in a tile of row `kr`'s 16-byte chunk `c8`.
__device__ __forceinline__ int wg_chunk_at(int kr, int c8) {
#if WG_SWIZZLE
    return (c8 / 8) * WG_COLBLOCK + kr * 128 + (((c8 % 8) ^ (kr % 8)) * 16);
#else
    return ((kr / 8) * ROW_CORES + c8) * 128 + (kr % 8) * 16;
#endif
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Pins registers an in-flight wgmma reads or writes in place: the compiler may not move
// arithmetic on them across the wgmma fences and waits around this (which take no register
// operands themselves).
template <int N>
__device__ __forceinline__ void pin(float* x) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(x[i]) :: "memory");
}
template <int N>
__device__ __forceinline__ void pin(unsigned* x) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(x[i]) :: "memory");
}

// mbarrier helpers (shared-space addresses), for the warp-specialised form (WS).
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" :: "r"(bar) : "memory");
}
// This thread's cp.async copies issued so far arrive on `bar` once they land (no pending
// count added: the barrier's expected count includes the arrival).
__device__ __forceinline__ void mbar_arrive_copies(unsigned bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred done;\nLAB_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra LAB_WAIT;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}

// WG_TMA = 1 (the host's default; `DUO_PREFILL_TMA=0` off; bf16, swizzled, warp-specialised): a tile that is whole
// page runs comes by bulk tensor copies (TMA), one thread issuing a 64-row x 128-byte box per
// page run and column block, the tensor map (the host's, per launch) over the cache's rows
// with the 128-byte swizzle, the layout `wg_chunk_at` describes; other tiles (streaming heads,
// a partial last tile, blocks under 64 rows) by the copying threads as before.
#ifndef WG_TMA
#define WG_TMA 0
#endif
// WG_SOFTMAX_TREE = 1 (the host's default; `DUO_PREFILL_SOFTMAX_TREE=0` off): a row's maximum and sum over a tile
// by four independent partial results (softmax_row's TREE) instead of one chain of N
// dependent steps (Nsight Compute put the kernel's largest stall on fixed-latency
// dependencies once the swizzle had lifted the L2 limit).
#ifndef WG_SOFTMAX_TREE
#define WG_SOFTMAX_TREE 0
#endif
// A CUtensorMap as the driver encodes it (128 opaque bytes, 64-byte aligned).
struct __align__(64) TmaMap { unsigned long long v[16]; };
// One arrival on `bar` that also expects `bytes` more of transfers before its phase completes.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" :: "r"(bar), "r"(bytes) : "memory");
}
// The box at (column c0, row c1) of `map` into shared memory at `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(unsigned dst, const TmaMap* map, int c0, int c1, unsigned bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
                 :: "r"(dst), "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(bar) : "memory");
}

// WS = 1: three warpgroups, one copying (its registers given back: setmaxnreg) and two
// computing, each tile stage handed over by mbarriers (full: the producer's copies landed;
// empty: both consumers are done with it), so no block-wide barrier per tile and the copies
// of the next stages run while the consumers compute. WS = 0: two warpgroups that copy and
// compute in turn, a block barrier per tile (the first form, measured).
#ifndef WS
#define WS 0
#endif
// PINGPONG = 1 (with WS = 2): the two computing warpgroups take turns issuing their
// products, each handing the turn to the other by a named barrier once its own are issued,
// so that one warpgroup's softmax runs while the other's products hold the tensor cores
// (FlashAttention-3's inter-warpgroup schedule). Barrier 1 + w is warpgroup w's turn.
#ifndef PINGPONG
#define PINGPONG 0
#endif
#if PINGPONG && WS != 2
#error "PINGPONG needs WS = 2"
#endif
#if WS == 2 && WG_STAGES < 2
#error "the overlapped form holds two stages at once: WG_STAGES >= 2"
#endif
#define WG_THREADS (WS ? 384 : 256)
// WG_SHARED_ROWS = 1 (warp-specialised forms; the default over bf16, `DUO_PREFILL_SHARED_ROWS`
// on the host): a tile that is not
// whole page runs (a streaming head's, a partial last one, blocks under 64 rows; every tile of
// a quantised cache) has its rows looked up once, one row per copying thread, into shared
// memory after the barriers, instead of by each thread for each of its copies (a block-table
// load and two divisions by the ring size each: an all-streaming layer's 16K chunk took 1.28
// ms on the H200 for 1% of a full layer's work, 0.60 ms with this).
#ifndef WG_SHARED_ROWS
#define WG_SHARED_ROWS 0
#endif
#if WG_SHARED_ROWS && !WS
#error "shared row lookups are the copying warpgroup's (WS >= 1)"
#endif
#if WG_TMA && (!WS || !WG_SWIZZLE || defined(KV_FP8) || defined(KV_INT8) || defined(KV_INT4) || defined(KV_K8V4))
#error "TMA copies take bf16 tiles into the swizzled layout, in the warp-specialised forms"
#endif
// A quantised cache (KV_FP8, KV_INT8, KV_INT4, KV_K8V4): the copying warpgroup reads each
// tile's codes and row scales, dequantises them to f16 (as the mma.sync kernel does) and
// writes the swizzled tile, so the products run in f16 on tiles laid out as bf16's.
#ifdef KV_BYTES
#if !WS
#error "a quantised cache needs the warp-specialised form (WS >= 1)"
#endif
typedef unsigned char wg_kv_t;
#define WG_PACK pack_h
// One raw slot: a tile's key and value codes and both sides' row scales. WG_RAW_SLOTS of
// them: 2 (the default), the next tile's codes land while this one's are converted; 1
// (`DUO_PREFILL_RAW_SLOTS=1`), the next tile's are copied once this one's are converted, which
// leaves room for a third stage of 128-key tiles with heads of 128, so that the copying warps
// can convert a tile ahead while the computing warpgroups hold two stages (WS = 2).
#define WG_RAW_SLOT (WG_BK * (K_ROW_BYTES + V_ROW_BYTES) + 2 * WG_BK * 4)
#ifndef WG_RAW_SLOTS
#define WG_RAW_SLOTS 2
#endif
#if WG_RAW_SLOTS != 1 && WG_RAW_SLOTS != 2
#error "the raw ring has one or two slots"
#endif
#define WG_RAW_BYTES (WG_RAW_SLOTS * WG_RAW_SLOT)
#else
#define WG_RAW_BYTES 0
typedef bf16_t wg_kv_t;
#define WG_PACK pack
#endif

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) duo_prefill_attention_wg(
    const float* __restrict__ q, const wg_kv_t* __restrict__ keys, const wg_kv_t* __restrict__ values,
    const int4* __restrict__ heads, const int* __restrict__ state, Paged pg, int T, int n_heads, int group,
    float scale_log2, bf16_t* __restrict__ out
#if WG_TMA
    , const __grid_constant__ TmaMap tm_keys, const __grid_constant__ TmaMap tm_values
#endif
    )
{
    const int h = blockIdx.y, qt = gridDim.x - 1 - blockIdx.x;  // longest query tiles first
    const int wgi = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
    // The computing warpgroup's index (0, 1): WS puts the copying one first.
    const int wg = WS ? wgi - 1 : wgi;
    const int slot = state[0], p0 = state[1];
    const int4 e = heads[h / group];
    if (e.w == 2) return;  // another launch's head (HeadEntry::SKIP)
    const int n = p0 + T;
    // A streaming head's ring rows (read once: every row lookup below takes it).
    const int cap = e.w == 1 ? slot_cap(pg, slot) : 1;
    const int win = e.w == 1 ? max(e.y, n - cap) : 0;
    const int rows = e.w == 0 ? n : min(n, e.y) + (n > e.y ? n - win : 0);
    const int q_lo = p0 + qt * WG_BQ, q_hi = min(n, q_lo + WG_BQ) - 1;
    // This thread's two query rows (chunk rows): row0 and row0 + 8.
    const int row0 = qt * WG_BQ + wg * 64 + warp * 16 + gr;
    const size_t qs = (size_t)n_heads * HEAD_DIM;

    auto next_tile = [&](int r) { return next_seen_tile(e, r, rows, win, q_lo, q_hi, WG_BK); };
    // [WG_STAGES][K, V] tiles of WG_TILE_BYTES (laid out as wg_chunk_at says), then over a
    // quantised cache the raw ring (WG_RAW_BYTES), then, with WS, the stages' full and empty
    // barriers.
    extern __shared__ __align__(128) unsigned char wsm_raw[];
    // Swizzled tiles start at 1,024-byte boundaries (the swizzle reads address bits 4-9);
    // the host gives 1,024 bytes more.
    const unsigned sbase = (smem_addr(wsm_raw) + 1023u) & ~1023u;
    unsigned char* wsm = wsm_raw + (sbase - smem_addr(wsm_raw));
    // A stage's key tile (its value tile follows, WG_TILE_BYTES on).
    auto stage_keys = [&](int stage) { return sbase + stage * 2 * WG_TILE_BYTES; };
    // The page runs of the tile at row r0, one per 64 rows (page runs are 64 rows long; -1
    // where the rows are not one), so that a run costs one table lookup.
    auto tile_runs = [&](int r0, long long* runs) {
#pragma unroll
        for (int h64 = 0; h64 < WG_BK / 64; h64++) runs[h64] = page_run(pg, e, slot, r0 + 64 * h64, rows);
    };
    // The cache row of the tile's row kr: from its run, else looked up (0 past the head's rows).
    auto tile_row = [&](const long long* runs, int r0, int kr) -> long long {
        const long long run = WG_BK == 64 || kr < 64 ? runs[0] : runs[WG_BK / 64 - 1];
        return run >= 0 ? run + kr % 64 : r0 + kr < rows ? kv_row_cap(pg, e, slot, walk_pos(e, r0 + kr, win), cap) : 0;
    };
    // The copying warpgroup's own barrier (1 and 2 are the computing warpgroups' turns).
    auto copiers_sync = [&]() { asm volatile("bar.sync 3, 128;" ::: "memory"); };
#if WG_SHARED_ROWS
    // The tile's rows in shared memory (after the stages' barriers), as 32-bit numbers (the
    // host refuses a cache of more rows) so that three stages fit beside one raw slot:
    // share_rows looks up tile r0's rows, one per copying thread, between two barriers
    // (everyone done reading the previous tile's; everyone's written).
    unsigned* shared_rows = reinterpret_cast<unsigned*>(wsm + WG_STAGES * 2 * WG_TILE_BYTES + WG_RAW_BYTES + 16 * WG_STAGES);
    auto share_rows = [&](int r0, int tid) {
        long long runs[WG_BK / 64];
        tile_runs(r0, runs);
        copiers_sync();
        for (int kr = tid; kr < WG_BK; kr += 128) shared_rows[kr] = (unsigned)tile_row(runs, r0, kr);
        copiers_sync();
    };
    auto copy_row = [&](const long long*, int, int kr) { return (long long)shared_rows[kr]; };
#else
    auto copy_row = [&](const long long* runs, int r0, int kr) { return tile_row(runs, r0, kr); };
#endif
#ifndef KV_BYTES
    // Tile r0 into `stage`, by `threads` threads from `tid` (a quantised cache's tiles come
    // through the raw ring instead: load_raw, convert_raw).
    auto load_tile = [&](int r0, int stage, int tid, int threads) {
        unsigned char* ks = wsm + stage * 2 * WG_TILE_BYTES;
        long long runs[WG_BK / 64];
        tile_runs(r0, runs);
        for (int i = tid; i < WG_BK * ROW_CORES; i += threads) {
#if WG_SWIZZLE
            // Consecutive threads copy consecutive chunks of a row: whole lines.
            const int kr = i / ROW_CORES, c8 = i % ROW_CORES;
#else
            // Consecutive threads fill consecutive 16-byte rows of a core matrix.
            const int kr = (i % 8) + 8 * (i / (8 * ROW_CORES)), c8 = (i / 8) % ROW_CORES;
#endif
            const int off = wg_chunk_at(kr, c8);
            const bool live = r0 + kr < rows;
            const long long row = copy_row(runs, r0, kr);
            cp_async16(ks + off, keys + (size_t)key_row(pg, row) * HEAD_DIM + c8 * 8, live ? 16 : 0);
            cp_async16(ks + WG_TILE_BYTES + off, values + (size_t)row * HEAD_DIM + c8 * 8, live ? 16 : 0);
        }
    };
#else
    // The raw ring after the stages: two slots, each a tile's key codes, value codes and
    // both sides' row scales as stored (rows past the head's zero-filled, which dequantise
    // to zeros).
    unsigned char* raw0 = wsm + WG_STAGES * 2 * WG_TILE_BYTES;
    // Tile r0's codes and scales into raw slot `slot_raw` by `cp.async` (the 128 copying threads).
    auto load_raw = [&](int r0, int slot_raw, int tid) {
        unsigned char* rk = raw0 + slot_raw * WG_RAW_SLOT;
        unsigned char* rv = rk + WG_BK * K_ROW_BYTES;
        float* sc = reinterpret_cast<float*>(rv + WG_BK * V_ROW_BYTES);
        long long runs[WG_BK / 64];
        tile_runs(r0, runs);
        auto row_of = [&](int kr) { return copy_row(runs, r0, kr); };
        for (int i = tid; i < WG_BK * (K_ROW_BYTES / 16); i += 128) {
            const int kr = i / (K_ROW_BYTES / 16), c = (i % (K_ROW_BYTES / 16)) * 16;
            cp_async16(rk + kr * K_ROW_BYTES + c, keys + row_of(kr) * K_ROW_BYTES + c, r0 + kr < rows ? 16 : 0);
        }
        for (int i = tid; i < WG_BK * (V_ROW_BYTES / 16); i += 128) {
            const int kr = i / (V_ROW_BYTES / 16), c = (i % (V_ROW_BYTES / 16)) * 16;
            cp_async16(rv + kr * V_ROW_BYTES + c, values + row_of(kr) * V_ROW_BYTES + c, r0 + kr < rows ? 16 : 0);
        }
        for (int i = tid; i < 2 * WG_BK; i += 128) {
            const int kr = i % WG_BK;
            cp_async4(sc + i, (i < WG_BK ? pg.kscale : pg.vscale) + row_of(kr), r0 + kr < rows ? 4 : 0);
        }
    };
    // Raw slot `slot_raw` dequantised to f16 into `stage`'s swizzled tiles (as the mma.sync
    // kernel's dequant_row16): consecutive threads take consecutive 16-value pieces of a row.
    auto convert_raw = [&](int slot_raw, int stage, int tid) {
        unsigned char* ks = wsm + stage * 2 * WG_TILE_BYTES;
        const unsigned char* rk = raw0 + slot_raw * WG_RAW_SLOT;
        const unsigned char* rv = rk + WG_BK * K_ROW_BYTES;
        const float* sc = reinterpret_cast<const float*>(rv + WG_BK * V_ROW_BYTES);
        for (int i = tid; i < WG_BK * (HEAD_DIM / 16); i += 128) {
            const int kr = i / (HEAD_DIM / 16), c = (i % (HEAD_DIM / 16)) * 16;
            unsigned h[8];
            dequant_row16_regs<KEY_IS_INT4>(rk + kr * K_ROW_BYTES, c, sc[kr], h);
            *reinterpret_cast<uint4*>(ks + wg_chunk_at(kr, c / 8)) = make_uint4(h[0], h[1], h[2], h[3]);
            *reinterpret_cast<uint4*>(ks + wg_chunk_at(kr, c / 8 + 1)) = make_uint4(h[4], h[5], h[6], h[7]);
            dequant_row16_regs<VAL_IS_INT4>(rv + kr * V_ROW_BYTES, c, sc[WG_BK + kr], h);
            *reinterpret_cast<uint4*>(ks + WG_TILE_BYTES + wg_chunk_at(kr, c / 8)) = make_uint4(h[0], h[1], h[2], h[3]);
            *reinterpret_cast<uint4*>(ks + WG_TILE_BYTES + wg_chunk_at(kr, c / 8 + 1)) = make_uint4(h[4], h[5], h[6], h[7]);
        }
    };
#endif
#if WS
    const unsigned full0 = sbase + WG_STAGES * 2 * WG_TILE_BYTES + WG_RAW_BYTES, empty0 = full0 + 8 * WG_STAGES;
    if (threadIdx.x == 0) {
        for (int st = 0; st < WG_STAGES; st++) { mbar_init(full0 + 8 * st, 128); mbar_init(empty0 + 8 * st, 2); }
    }
    __syncthreads();
    if (wgi == 0) {
        // The copying warpgroup: the block's tiles in order, each stage once both computing
        // warpgroups have released it.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        int cur = next_tile(0);
#ifdef KV_BYTES
        // A quantised cache: the next tile's codes are copied into the raw ring while this
        // tile's are dequantised into its stage, so no load waits in registers.
#if WG_SHARED_ROWS
        if (cur < rows) share_rows(cur, threadIdx.x);
#endif
        if (cur < rows) load_raw(cur, 0, threadIdx.x);
        cp_async_commit();
        for (int it = 0; cur < rows; it++) {
            const int stage = it % WG_STAGES, nxt = next_tile(cur + WG_BK);
#if WG_RAW_SLOTS == 2
#if WG_SHARED_ROWS
            if (nxt < rows) share_rows(nxt, threadIdx.x);
#endif
            if (nxt < rows) load_raw(nxt, (it + 1) & 1, threadIdx.x);
            cp_async_commit();
            cp_async_wait_1();  // this thread's copies of this tile have landed
#else
            // The stage first, so that this tile's codes land while the computing warpgroups
            // free it.
            if (it >= WG_STAGES) mbar_wait(empty0 + 8 * stage, ((it / WG_STAGES) - 1) & 1);
            asm volatile("cp.async.wait_all;" ::: "memory");  // this thread's copies of this tile have landed
#endif
            copiers_sync();     // and everyone's
#if WG_RAW_SLOTS == 2
            if (it >= WG_STAGES) mbar_wait(empty0 + 8 * stage, ((it / WG_STAGES) - 1) & 1);
#endif
            convert_raw(WG_RAW_SLOTS == 2 ? it & 1 : 0, stage, threadIdx.x);
            // This thread's stores, made visible to the tensor cores' reads, are done.
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            mbar_arrive(full0 + 8 * stage);
            copiers_sync();     // every thread is done with this raw slot before it is refilled
#if WG_RAW_SLOTS == 1
            // The one slot is free: the next tile's codes come while the computing warpgroups
            // take this one.
#if WG_SHARED_ROWS
            if (nxt < rows) share_rows(nxt, threadIdx.x);
#endif
            if (nxt < rows) load_raw(nxt, 0, threadIdx.x);
            cp_async_commit();
#endif
            cur = nxt;
        }
#else
        for (int it = 0; cur < rows; it++) {
            const int stage = it % WG_STAGES;
            if (it >= WG_STAGES) mbar_wait(empty0 + 8 * stage, ((it / WG_STAGES) - 1) & 1);
#if WG_TMA
            // A tile of whole page runs: one thread's bulk copies (the barrier's 128 arrivals:
            // its own with the bytes to expect, and the other threads' plain ones).
            long long runs[WG_BK / 64];
            tile_runs(cur, runs);
            bool whole = true;
#pragma unroll
            for (int h64 = 0; h64 < WG_BK / 64; h64++) whole = whole && runs[h64] >= 0;
            if (whole) {
                if (threadIdx.x == 0) {
                    const unsigned ks = stage_keys(stage);
                    mbar_arrive_expect_tx(full0 + 8 * stage, 2 * WG_TILE_BYTES);
#pragma unroll
                    for (int h64 = 0; h64 < WG_BK / 64; h64++)
#pragma unroll
                        for (int cb = 0; cb < HEAD_DIM / 64; cb++) {
                            const unsigned at = cb * WG_COLBLOCK + h64 * 64 * 128;
                            tma_load_2d(ks + at, &tm_keys, cb * 64, (int)runs[h64], full0 + 8 * stage);
                            tma_load_2d(ks + WG_TILE_BYTES + at, &tm_values, cb * 64, (int)runs[h64], full0 + 8 * stage);
                        }
                } else {
                    mbar_arrive(full0 + 8 * stage);
                }
                cur = next_tile(cur + WG_BK);
                continue;
            }
#endif
#if WG_SHARED_ROWS
            share_rows(cur, threadIdx.x);
#endif
            load_tile(cur, stage, threadIdx.x, 128);
            mbar_arrive_copies(full0 + 8 * stage);
            cur = next_tile(cur + WG_BK);
        }
#endif
        asm volatile("cp.async.wait_all;" ::: "memory");
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
#endif

    // The queries as A fragments, bf16, scaled for exp2 (zero past the chunk).
    unsigned qa[HEAD_DIM / 16][4];
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; kk++) {
#pragma unroll
        for (int x = 0; x < 4; x++) {
            const int r = row0 + (x & 1) * 8, c = kk * 16 + (x >> 1) * 8 + 2 * tq;
            unsigned v = 0u;
            if (r < T) {
                const float2 f = *reinterpret_cast<const float2*>(q + (size_t)r * qs + h * HEAD_DIM + c);
                v = WG_PACK(f.x * scale_log2, f.y * scale_log2);
            }
            qa[kk][x] = v;
        }
    }

    float o[HEAD_DIM / 2];
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 2; i++) o[i] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};  // rows row0, row0 + 8

    // One tile: S = Q K^T, the mask, the online softmax, O += P V.
    // A tile's pieces: Q K^T issued, the mask and online softmax of its scores (returning
    // each row's rescaling factor), P packed, P V issued.
    // Keys are n, dims k: the descriptors of wg_chunk_at's layout (swizzled or not).
    auto issue_qk = [&](float* s, int stage) {
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; kk++) {
#if WG_SWIZZLE
            // Swizzled K-major: a k16 step is 32 bytes into the row of its column block;
            // 8 keys are 1,024 bytes.
            const unsigned long long d = wg_desc(stage_keys(stage) + (kk / 4) * WG_COLBLOCK + (kk % 4) * 32, 16, 1024);
#else
            const unsigned long long d = wg_desc(stage_keys(stage) + kk * 256, 128, ROW_CORES * 128);
#endif
            wg_qk(s, qa[kk], d, kk > 0);
        }
    };
    auto softmax_tile = [&](float* s, int r0, float* cf) {
        const int r1 = min(rows, r0 + WG_BK) - 1;
        const int kp_lo = walk_pos(e, r0, win), kp_hi = walk_pos(e, r1, win);
        const bool full = r0 + WG_BK <= rows && kp_hi <= q_lo && (e.w == 0 || r1 < e.y || q_hi - kp_lo < e.z);
        if (!full) {
#pragma unroll
            for (int j = 0; j < WG_BK / 8; j++)
#pragma unroll
                for (int x = 0; x < 4; x++) {
                    const int r = r0 + 8 * j + 2 * tq + (x & 1);
                    const int qp = p0 + row0 + (x >> 1) * 8;
                    const int kp = walk_pos(e, r, win);
                    const bool vis = r < rows && kp <= qp && (e.w == 0 || kp < e.y || qp - kp < e.z);
                    if (!vis) s[4 * j + x] = NEG_INF;
                }
        }
#pragma unroll
        for (int hf = 0; hf < 2; hf++) cf[hf] = softmax_row<WG_BK / 8, WG_SOFTMAX_TREE == 1>(&s[2 * hf], m[hf], l[hf]);
    };
    // Past the first tiles a row's maximum rarely moves: the warp skips rescaling its output
    // accumulators when none of its rows' did.
    auto rescale = [&](const float* cf) {
        if (__any_sync(0xffffffff, cf[0] != 1.f || cf[1] != 1.f)) {
#pragma unroll
            for (int i = 0; i < HEAD_DIM / 8; i++) { o[4 * i] *= cf[0]; o[4 * i + 1] *= cf[0]; o[4 * i + 2] *= cf[1]; o[4 * i + 3] *= cf[1]; }
        }
    };
    // P (bf16) as A fragments straight from the score accumulators.
    unsigned pa[WG_BK / 16][4];
    auto pack_p = [&](const float* s) {
#pragma unroll
        for (int kk = 0; kk < WG_BK / 16; kk++) {
            pa[kk][0] = WG_PACK(s[8 * kk], s[8 * kk + 1]);
            pa[kk][1] = WG_PACK(s[8 * kk + 2], s[8 * kk + 3]);
            pa[kk][2] = WG_PACK(s[8 * kk + 4], s[8 * kk + 5]);
            pa[kk][3] = WG_PACK(s[8 * kk + 6], s[8 * kk + 7]);
        }
    };
    // Values are k, dims n, read transposed: the descriptors of wg_chunk_at's layout.
    auto issue_pv = [&](int stage) {
#pragma unroll
        for (int kk = 0; kk < WG_BK / 16; kk++) {
#if WG_SWIZZLE
            // Swizzled MN-major (transposed): 16 keys are 2,048 bytes; the leading offset
            // steps between 64-dimension column blocks, the stride between 8-key groups.
            const unsigned long long d = wg_desc(stage_keys(stage) + WG_TILE_BYTES + kk * 2048, WG_COLBLOCK, 1024);
#else
            const unsigned long long d = wg_desc(stage_keys(stage) + WG_TILE_BYTES + kk * 2 * ROW_CORES * 128, ROW_CORES * 128, 128);
#endif
            wg_pv(o, pa[kk], d, 1);
        }
    };
    // One tile, each product waited for: S = Q K^T, the mask, the online softmax, O += P V.
    auto compute_tile = [&](int r0, int stage) {
        float s[WG_BK / 2], cf[2];
        pin<HEAD_DIM / 2>(o);
        wg_fence();
        issue_qk(s, stage);
        wg_commit();
        wg_wait();
        pin<WG_BK / 2>(s);
        softmax_tile(s, r0, cf);
        rescale(cf);
        pack_p(s);
        pin<HEAD_DIM / 2>(o);
        pin<WG_BK / 4>(&pa[0][0]);
        wg_fence();
        issue_pv(stage);
        wg_commit();
        wg_wait();
        pin<HEAD_DIM / 2>(o);
    };

#if WS == 2
    // Each tile's Q K^T runs on the tensor cores with the previous tile's P V, and its
    // softmax while that P V finishes (the FlashAttention-3 order): the warpgroup waits for
    // S, computes its softmax, then waits for P V, rescales O and packs the new P.
    int cur = next_tile(0), prev_stage = 0;
    bool have_p = false;
#if PINGPONG
    // Both warpgroups walk the same tiles, so they take the same number of turns: warpgroup 0
    // goes first, and warpgroup 1 does not hand over after its last turn (every barrier's
    // arrivals are matched when the block ends).
    auto turn_wait = [&]() { asm volatile("bar.sync %0, 256;" :: "r"(1 + wg) : "memory"); };
    auto turn_pass = [&]() { asm volatile("bar.arrive %0, 256;" :: "r"(2 - wg) : "memory"); };
    if (wg == 1 && cur < rows) turn_pass();
#endif
    for (int it = 0; cur < rows; it++) {
        const int stage = it % WG_STAGES;
        mbar_wait(full0 + 8 * stage, (it / WG_STAGES) & 1);
        // The copies (generic proxy) before the tensor cores read them (async proxy).
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        float s[WG_BK / 2], cf[2];
        pin<HEAD_DIM / 2>(o);
        pin<WG_BK / 4>(&pa[0][0]);
#if PINGPONG
        turn_wait();
#endif
        wg_fence();
        issue_qk(s, stage);
        wg_commit();
        if (have_p) issue_pv(prev_stage);
        wg_commit();
#if PINGPONG
        turn_pass();
#endif
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");  // S is in
        pin<WG_BK / 2>(s);
        softmax_tile(s, cur, cf);
        wg_wait();  // the previous P V is in: its stage is free, O may change
        pin<HEAD_DIM / 2>(o);
        if (have_p && threadIdx.x % 128 == 0) mbar_arrive(empty0 + 8 * prev_stage);
        rescale(cf);
        pack_p(s);
        have_p = true;
        prev_stage = stage;
        cur = next_tile(cur + WG_BK);
    }
    if (have_p) {
        pin<HEAD_DIM / 2>(o);
        pin<WG_BK / 4>(&pa[0][0]);
#if PINGPONG
        turn_wait();
#endif
        wg_fence();
        issue_pv(prev_stage);
        wg_commit();
#if PINGPONG
        if (wg == 0) turn_pass();
#endif
        wg_wait();
        pin<HEAD_DIM / 2>(o);
        if (threadIdx.x % 128 == 0) mbar_arrive(empty0 + 8 * prev_stage);
    }
#elif WS
    int cur = next_tile(0);
    for (int it = 0; cur < rows; it++) {
        const int stage = it % WG_STAGES;
        mbar_wait(full0 + 8 * stage, (it / WG_STAGES) & 1);
        // The copies (generic proxy) before the tensor cores read them (async proxy).
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        compute_tile(cur, stage);
        // This warpgroup's products have read the stage: one arrival per warpgroup.
        if (threadIdx.x % 128 == 0) mbar_arrive(empty0 + 8 * stage);
        cur = next_tile(cur + WG_BK);
    }
#else
    // WG_STAGES - 1 tiles in flight: `issue` is the next tile to copy, `cur` the one computed.
    int cur = next_tile(0), issue = cur;
#pragma unroll
    for (int st = 0; st < WG_STAGES - 1; st++) {
        if (issue < rows) {
            load_tile(issue, st, threadIdx.x, blockDim.x);
            issue = next_tile(issue + WG_BK);
        }
        cp_async_commit();
    }
    for (int it = 0; cur < rows; it++) {
        const int stage = it % WG_STAGES;
        if (issue < rows) {
            load_tile(issue, (it + WG_STAGES - 1) % WG_STAGES, threadIdx.x, blockDim.x);
            issue = next_tile(issue + WG_BK);
        }
        cp_async_commit();
        cp_async_wait<WG_STAGES - 1>();
        // The copies (generic proxy) before the tensor cores read them (async proxy).
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        compute_tile(cur, stage);
        __syncthreads();  // the next iteration loads into this stage
        cur = next_tile(cur + WG_BK);
    }
#endif
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        float sum = l[hf];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const int r = row0 + hf * 8;
        if (r < T) {
#pragma unroll
            for (int i = 0; i < HEAD_DIM / 8; i++)
                *reinterpret_cast<unsigned*>(out + (size_t)r * qs + h * HEAD_DIM + 8 * i + 2 * tq) = pack(o[4 * i + 2 * hf] * inv, o[4 * i + 2 * hf + 1] * inv);
        }
    }
}
"#;

/// A random problem: `t` queries at `first_position..` over keys of every position.
pub fn random_input(
    seed: u64,
    n_heads: usize,
    head_dim: usize,
    heads: Vec<HeadEntry>,
    t: usize,
    first_position: usize,
) -> PrefillInput {
    let r = |k: u64, n: usize, round: bool| -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let v = crate::ops::hash_uniform(seed.wrapping_mul(31).wrapping_add(k), i) * 1.7;
                if round {
                    crate::ops::round_bf16(v)
                } else {
                    v
                }
            })
            .collect()
    };
    let cached = heads.len() * (first_position + t) * head_dim;
    PrefillInput {
        n_heads,
        head_dim,
        q: r(1, t * n_heads * head_dim, false),
        keys: r(2, cached, true),
        values: r(3, cached, true),
        heads,
        first_position,
    }
}

/// The parity cases, each with its one-layer paged layout: first chunks, later chunks,
/// streaming rings that have wrapped, GQA and MHA, head dims 64 and 128, lengths off the
/// tile and block sizes.
pub fn cases(seed: u64) -> Vec<(String, PrefillInput, crate::paged::PagedLayout)> {
    let mut out = Vec::new();
    // (heads, dim, kinds (true = retrieval), first position, chunk, sink, recent, block tokens)
    type Case = (
        usize,
        usize,
        &'static [bool],
        usize,
        usize,
        usize,
        usize,
        usize,
    );
    let specs: [Case; 6] = [
        (4, 128, &[true, false], 0, 200, 8, 40, 64), // first chunk: sinks fill, then the ring
        (8, 128, &[true, false], 1000, 130, 16, 100, 16), // later chunk, ring wrapped
        (3, 64, &[false, true, false], 300, 77, 4, 64, 32), // SmolLM2-like MHA
        (2, 64, &[true, true], 0, 1, 4, 16, 64),     // one token
        (
            32,
            128,
            &[true, false, true, false, false, true, false, false],
            4000,
            256,
            64,
            256,
            64,
        ),
        (6, 64, &[true, false, true], 256, 200, 4, 64, 64), // heads of 64, whole page-run tiles
    ];
    for (i, (h, d, kinds, p0, t, sink, recent, bt)) in specs.iter().enumerate() {
        let n = p0 + t;
        let layout = crate::paged::PagedLayout {
            retrieval: vec![kinds.to_vec()],
            sink: *sink,
            recent: *recent,
            block_tokens: *bt,
            max_chunk: *t,
            max_tokens: n,
            kv: crate::decode_attention::KvType::Bf16,
            kv_streaming: crate::decode_attention::KvType::Bf16,
        };
        let x = random_input(seed + i as u64, *h, *d, layout.heads(0), *t, *p0);
        out.push((format!("paged prefill attention: {h} heads x {d}, kinds {kinds:?}, positions {p0}..{n}, sink {sink} recent {recent}, blocks of {bt}"), x, layout));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wgmma_function_numbers_its_operands_in_order() {
        // m64n128: 64 accumulators (%0..%63), then A's four registers, the descriptor and
        // the accumulate flag; the transpose flag is an immediate.
        let f = wgmma_function("pv", 128, true, false);
        assert_eq!(f.matches("\"+f\"(d[").count(), 64);
        assert!(f.contains("m64n128k16.f32.bf16.bf16 {%0, %1,"));
        assert!(f.contains("%63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;"));
        assert!(f.contains("setp.ne.b32 p, %69, 0;"));
        let g = wgmma_function("qk", 64, false, false);
        assert!(g.contains("%31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;") && g.contains("setp.ne.b32 p, %37, 0;"));
        // Over a quantised cache the products take f16.
        assert!(wgmma_function("qk", 128, false, true).contains("m64n128k16.f32.f16.f16 {%0,"));
    }

    #[test]
    fn streaming_heads_see_the_lambda() {
        let e = HeadEntry::streaming(0, 4, 8);
        assert!(e.visible(19, 12) && !e.visible(19, 11) && e.visible(19, 3) && !e.visible(19, 20));
        let r = HeadEntry::retrieval(5);
        assert!(r.visible(19, 0) && !r.visible(3, 4));
    }

    #[test]
    fn reference_of_a_first_token_is_its_value() {
        let cases = cases(3);
        let x = &cases[3].1; // one token at position 0: it sees only itself
        let out = reference(x).unwrap();
        let d = x.head_dim;
        for qh in 0..x.n_heads {
            let g = qh / (x.n_heads / x.heads.len());
            let v = &x.values[g * d..][..d];
            assert!(out[qh * d..][..d]
                .iter()
                .zip(v)
                .all(|(a, b)| (a - b).abs() < 1e-6));
        }
    }

    #[test]
    fn every_case_is_valid() {
        for (name, x, layout) in cases(1) {
            assert!(x.validate().is_ok(), "{name}");
            assert!(
                layout.ring_rows(crate::paged::Ring::Prefill) >= layout.recent + x.tokens() - 1,
                "{name}: the ring keeps what the chunk sees"
            );
        }
        let mut x = cases(1).remove(0).1;
        x.keys.truncate(64);
        assert!(reference(&x).is_err());
    }
}
