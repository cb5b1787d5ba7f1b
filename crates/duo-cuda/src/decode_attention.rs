//! One decode step of attention over a layer's hybrid KV cache, in one fused launch.
//!
//! A layer's KV heads are a mix of retrieval heads (every token) and streaming heads (sinks
//! plus a ring of recent tokens). At decode time both are just "a list of cached keys and
//! values" — softmax does not care about their order, and keys are cached after RoPE — so
//! one kernel covers both: a table gives each KV head its rows' offset and count. A long
//! retrieval cache is split across the sequence (split-K): grid `(KV heads, splits)`, each
//! block reads its slice of one KV head's keys and values once for all the query heads that
//! share it (GQA) and reduces them with an online softmax into partials (max, sum, weighted
//! values); a second small kernel merges the partials. Streaming heads have few keys, so
//! their blocks beyond the first split exit at once.
//!
//! Storage is `f32` (as the CPU cache) or bf16 ([`KvType`]), accumulation `f32`; the parity
//! bound against the `f64` reference (on the same rounded cache for bf16) is `1e-4` absolute
//! on outputs of magnitude ~1.

use crate::{CudaError, Result};

/// How the cache stores keys and values on the GPU (accumulation is `f32` either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    /// 4 bytes per element, as the CPU cache.
    F32,
    /// 2 bytes per element: half the bytes a decode step reads.
    Bf16,
}

impl KvType {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::Bf16 => 2,
        }
    }
}

/// `x` with keys and values rounded to bf16 (what the bf16 kernel sees), for the reference.
pub fn rounded_to_bf16(x: &DecodeInput) -> DecodeInput {
    let round = |v: &[f32]| v.iter().map(|&f| half::bf16::from_f32(f).to_f32()).collect();
    DecodeInput { keys: round(&x.keys), values: round(&x.values), ..x.clone() }
}

/// Whether a warp may read `kpw` keys at once for heads of `head_dim`: each lane takes
/// `head_dim * kpw / 32` elements, which must fill whole 16-byte loads, and at most 4 keys.
pub fn keys_per_warp_fits(head_dim: usize, kpw: usize, kv: KvType) -> bool {
    [1, 2, 4].contains(&kpw) && head_dim * kpw / 32 * kv.bytes() >= 16 && (head_dim * kpw / 32 * kv.bytes()).is_multiple_of(16)
}

/// Fewest keys per split.
pub const MIN_SPLIT: usize = 256;

/// Keys per split for a layer: enough blocks to give each of the H100's 132 multiprocessors
/// four (the two-keys-per-warp kernel fits four blocks per multiprocessor; each KV head counts
/// by its length relative to the longest), but splits of 256 to 2048 keys, rounded up to 64.
/// Measured on the H100 at 128K tokens (BENCHMARKS.md): a full layer is fastest with
/// 2048-key splits (512 blocks), a duo layer with 1024 (its 4 long heads give 512 blocks);
/// with 2048 the duo layer leaves half the card idle (0.198 vs 0.137 ms).
pub fn auto_split(lens: &[u32]) -> usize {
    let max_len = lens.iter().copied().max().unwrap_or(1).max(1) as usize;
    // Work in units of the longest head: 8 full heads count 8, 4 long + 4 streaming about 4.
    let heads = lens.iter().map(|&l| l as f64).sum::<f64>() / max_len as f64;
    let want = (max_len as f64 * heads / 528.0).ceil() as usize;
    want.clamp(MIN_SPLIT, 2048).div_ceil(64) * 64
}

/// The inputs of one decode step of one layer.
#[derive(Debug, Clone)]
pub struct DecodeInput {
    /// Query heads.
    pub n_heads: usize,
    /// Dimension of a head: 64, 128 or 256.
    pub head_dim: usize,
    /// Queries, `[n_heads, head_dim]` (after RoPE).
    pub q: Vec<f32>,
    /// Every KV head's keys, rows of `head_dim`, one head after another.
    pub keys: Vec<f32>,
    /// Values, laid out as `keys`.
    pub values: Vec<f32>,
    /// Per KV head: first row in `keys`/`values`.
    pub offsets: Vec<u32>,
    /// Per KV head: rows cached (a retrieval head: every token; a streaming head: at most
    /// sink + recent).
    pub lens: Vec<u32>,
}

impl DecodeInput {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CudaError::Input(m));
        let (h, d, g) = (self.n_heads, self.head_dim, self.offsets.len());
        if ![64, 128, 256].contains(&d) {
            return bad(format!("head_dim {d} must be 64, 128 or 256"));
        }
        if g == 0 || h % g != 0 || self.lens.len() != g {
            return bad(format!("{h} query heads for {g} KV heads ({} lengths)", self.lens.len()));
        }
        if self.q.len() != h * d || self.keys.len() != self.values.len() || !self.keys.len().is_multiple_of(d) {
            return bad("q, keys or values have the wrong size".into());
        }
        let rows = self.keys.len() / d;
        for (o, l) in self.offsets.iter().zip(&self.lens) {
            if *l == 0 || (*o as usize + *l as usize) > rows {
                return bad(format!("a KV head's rows {o}..{} are empty or past the {rows} rows", o + l));
            }
        }
        Ok(())
    }
}

/// The reference: softmax(q k^T / sqrt(d)) v per query head, in `f64`. Returns
/// `[n_heads, head_dim]`.
pub fn reference(x: &DecodeInput) -> Result<Vec<f32>> {
    x.validate()?;
    let (d, group) = (x.head_dim, x.n_heads / x.offsets.len());
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0f32; x.n_heads * d];
    for h in 0..x.n_heads {
        let g = h / group;
        let (o, l) = (x.offsets[g] as usize, x.lens[g] as usize);
        let q = &x.q[h * d..(h + 1) * d];
        let scores: Vec<f64> = (o..o + l).map(|r| q.iter().zip(&x.keys[r * d..(r + 1) * d]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale).collect();
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = w.iter().sum();
        for (i, r) in (o..o + l).enumerate() {
            for c in 0..d {
                out[h * d + c] += (w[i] / z * x.values[r * d + c] as f64) as f32;
            }
        }
    }
    Ok(out)
}

/// Random inputs: `lens` per KV head, values ~ N(0, 1) like keys and queries.
pub fn random_input(seed: u64, n_heads: usize, head_dim: usize, lens: &[u32]) -> DecodeInput {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut normal = |n: usize| -> Vec<f32> {
        (0..n).map(|_| {
            // Box-Muller from two uniforms.
            let (u, v): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        }).collect()
    };
    let rows: usize = lens.iter().map(|&l| l as usize).sum();
    let mut offsets = Vec::with_capacity(lens.len());
    let mut at = 0u32;
    for &l in lens {
        offsets.push(at);
        at += l;
    }
    DecodeInput { n_heads, head_dim, q: normal(n_heads * head_dim), keys: normal(rows * head_dim), values: normal(rows * head_dim), offsets, lens: lens.to_vec() }
}

/// The CUDA source: a partial kernel (one block per KV head and split: the `GROUP` query
/// heads that share a KV head are served from one read of its keys and values; a warp takes
/// 4 keys at a time, 8 lanes each) and a merge.
/// `GROUP` and `PER_LANE` (`head_dim / 32`) are compile-time constants, given to NVRTC per
/// model shape.
pub const SOURCE: &str = r#"
#define WARPS 4
// NVRTC has no math headers: negative infinity by its bits.
#define NEG_INF __int_as_float(0xff800000)
#define HEAD_DIM (PER_LANE * 32)

#ifdef KV_BF16
typedef unsigned short kv_t;
#else
typedef float kv_t;
#endif

// A warp works on KPW keys at a time, LANES lanes per key, DIMS dimensions per lane: the
// dot product of a key needs only log2(LANES) shuffles per query head.
#ifndef KPW
#define KPW 4
#endif
#define LANES (32 / KPW)
#define DIMS (HEAD_DIM / LANES)

// A lane's part of a row, DIMS elements from dimension `first`, as raw 16-byte words: loads
// are issued one iteration ahead of their use, so each warp keeps two steps of keys and values
// in flight (one step alone leaves too few bytes in flight to saturate HBM).
#define RAW_N (DIMS * (int)sizeof(kv_t) / 16)
__device__ __forceinline__ void load_raw(const kv_t* __restrict__ row, int first, uint4* r) {
    const uint4* p = reinterpret_cast<const uint4*>(row + first);
#pragma unroll
    for (int i = 0; i < RAW_N; i++) r[i] = p[i];
}

// Widens raw words to f32 (a bf16 is the top half of an f32).
__device__ __forceinline__ void unpack(const uint4* r, float* out) {
#pragma unroll
    for (int i = 0; i < RAW_N; i++) {
        const unsigned w[4] = {r[i].x, r[i].y, r[i].z, r[i].w};
#ifdef KV_BF16
#pragma unroll
        for (int j = 0; j < 4; j++) { out[8*i + 2*j] = __uint_as_float(w[j] << 16); out[8*i + 2*j + 1] = __uint_as_float(w[j] & 0xffff0000u); }
#else
#pragma unroll
        for (int j = 0; j < 4; j++) out[4*i + j] = __uint_as_float(w[j]);
#endif
    }
}

// The rows a KV head shows a decode step when `n` tokens are cached (the current one
// included): logical row `t < len` is physical row `off + t + (t >= sinks ? gap : 0)`.
__device__ __forceinline__ void visible_rows(int4 e, int n, int win, int* len, int* sinks, int* gap) {
    if (e.w == 0) { *len = n; *sinks = n; *gap = 0; }
    else if (e.w == 2) { *len = e.z; *sinks = e.z; *gap = 0; }
    else {
        const int s = min(n, e.y), w = n > e.y ? n - win : 0, v = min(w, e.z);
        *len = s + v; *sinks = s; *gap = w - v;
    }
}

extern "C" __global__ void duo_decode_partial(
    const float* __restrict__ q, const kv_t* __restrict__ keys, const kv_t* __restrict__ values,
    const int4* __restrict__ heads, const int* __restrict__ state,
    int split, int n_splits, float scale,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc)
{
    const int g = blockIdx.x, s = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sub = lane / LANES, first = (lane % LANES) * DIMS;
    const int4 e = heads[g];
    int len_i, sinks, gap;
    visible_rows(e, state[0] + 1, state[1], &len_i, &sinks, &gap);
    const unsigned len = len_i, off = e.x;
    const unsigned begin = (unsigned)s * split;
    const unsigned end = min(len, begin + (unsigned)split);
    float qr[GROUP][DIMS], acc[GROUP][DIMS], m[GROUP], l[GROUP];
#pragma unroll
    for (int j = 0; j < GROUP; j++) {
#pragma unroll
        for (int i = 0; i < DIMS; i++) { qr[j][i] = q[(size_t)(g * GROUP + j) * HEAD_DIM + first + i] * scale; acc[j][i] = 0.f; }
        m[j] = NEG_INF; l[j] = 0.f;
    }
    // Every lane runs the same number of steps (shuffles need the whole warp); a lane whose
    // key is past the end takes part in the reductions and changes nothing.
    const unsigned stride = WARPS * KPW;
    uint4 kr[RAW_N], vr[RAW_N];
    {
        const unsigned t = begin + warp * KPW + sub;
        if (t < end) {
            const size_t row = (size_t)off + t + (t >= (unsigned)sinks ? gap : 0);
            load_raw(keys + row * HEAD_DIM, first, kr);
            load_raw(values + row * HEAD_DIM, first, vr);
        }
    }
    for (unsigned t0 = begin + warp * KPW; t0 < end; t0 += stride) {
        const unsigned t = t0 + sub;
        const bool valid = t < end;
        uint4 kn[RAW_N], vn[RAW_N];
        const unsigned tn = t + stride;
        if (tn < end) {
            const size_t row = (size_t)off + tn + (tn >= (unsigned)sinks ? gap : 0);
            load_raw(keys + row * HEAD_DIM, first, kn);
            load_raw(values + row * HEAD_DIM, first, vn);
        }
        float k[DIMS], v[DIMS];
        if (valid) {
            unpack(kr, k);
            unpack(vr, v);
        } else {
#pragma unroll
            for (int i = 0; i < DIMS; i++) { k[i] = 0.f; v[i] = 0.f; }
        }
#pragma unroll
        for (int j = 0; j < GROUP; j++) {
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < DIMS; i++) dot += qr[j][i] * k[i];
#pragma unroll
            for (int o = LANES / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
            if (valid) {
                // Rescale only when the running maximum grows (rare after the first keys).
                if (dot > m[j]) {
                    const float c = __expf(m[j] - dot);
#pragma unroll
                    for (int i = 0; i < DIMS; i++) acc[j][i] *= c;
                    l[j] *= c;
                    m[j] = dot;
                }
                const float p = __expf(dot - m[j]);
#pragma unroll
                for (int i = 0; i < DIMS; i++) acc[j][i] += p * v[i];
                l[j] += p;
            }
        }
#pragma unroll
        for (int i = 0; i < RAW_N; i++) { kr[i] = kn[i]; vr[i] = vn[i]; }
    }
    // Merge the WARPS * KPW partial states of the block, one query head at a time.
    __shared__ float sm[WARPS * KPW][GROUP], sl[WARPS * KPW][GROUP], sacc[WARPS * KPW][HEAD_DIM];
    const int slot = warp * KPW + sub;
#pragma unroll
    for (int j = 0; j < GROUP; j++) {
        if (lane % LANES == 0) { sm[slot][j] = m[j]; sl[slot][j] = l[j]; }
#pragma unroll
        for (int i = 0; i < DIMS; i++) sacc[slot][first + i] = acc[j][i];
        __syncthreads();
        if (warp == 0) {
            float mm = NEG_INF;
            for (int w = 0; w < WARPS * KPW; w++) mm = fmaxf(mm, sm[w][j]);
            float ll = 0.f, out[PER_LANE];
#pragma unroll
            for (int i = 0; i < PER_LANE; i++) out[i] = 0.f;
            for (int w = 0; w < WARPS * KPW; w++) {
                const float c = sm[w][j] == NEG_INF ? 0.f : __expf(sm[w][j] - mm);
                ll += sl[w][j] * c;
#pragma unroll
                for (int i = 0; i < PER_LANE; i++) out[i] += sacc[w][lane * PER_LANE + i] * c;
            }
            const size_t p = (size_t)(g * GROUP + j) * n_splits + s;
            if (lane == 0) { part_m[p] = mm; part_l[p] = ll; }
#pragma unroll
            for (int i = 0; i < PER_LANE; i++) part_acc[p * HEAD_DIM + lane * PER_LANE + i] = out[i];
        }
        __syncthreads();
    }
}

extern "C" __global__ void duo_decode_merge(
    const float* __restrict__ part_m, const float* __restrict__ part_l, const float* __restrict__ part_acc,
    int n_splits, float* __restrict__ out, unsigned short* __restrict__ out_bf16)
{
    const int h = blockIdx.x, c = threadIdx.x;
    float mm = NEG_INF;
#pragma unroll 8
    for (int s = 0; s < n_splits; s++) mm = fmaxf(mm, part_m[h * n_splits + s]);
    float l = 0.f, a = 0.f;
#pragma unroll 8
    for (int s = 0; s < n_splits; s++) {
        const float ms = part_m[h * n_splits + s];
        if (ms == NEG_INF) continue;
        const float w = __expf(ms - mm);
        l += part_l[h * n_splits + s] * w;
        a += part_acc[((size_t)h * n_splits + s) * HEAD_DIM + c] * w;
    }
    const float r = a / l;
    if (out) out[h * HEAD_DIM + c] = r;
    if (out_bf16) {
        unsigned u = __float_as_uint(r);
        u += 0x7fffu + ((u >> 16) & 1u);
        out_bf16[h * HEAD_DIM + c] = (unsigned short)(u >> 16);
    }
}
"#;

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use crate::prefill_attention::HeadEntry;
    use crate::runtime::{DecodeLaunch, Gpu};
    use crate::Parity;

    /// Runs the fused decode attention on the GPU (copying inputs in and the output out),
    /// a warp reading `keys_per_warp` keys at once.
    pub fn decode_attention(gpu: &Gpu, x: &DecodeInput, kv: KvType, keys_per_warp: usize) -> Result<Vec<f32>> {
        Ok(run(gpu, x, kv, auto_split(&x.lens), keys_per_warp, 1)?.0)
    }

    /// Milliseconds per launch pair (partial + merge), inputs already on the GPU, mean of
    /// `iters` after one warm-up; and the KV bytes each launch reads. `split`: keys per
    /// split, or `None` for [`auto_split`].
    pub fn time_decode_attention(gpu: &Gpu, x: &DecodeInput, kv: KvType, split: Option<usize>, keys_per_warp: usize, iters: usize) -> Result<(f64, usize)> {
        let split = split.unwrap_or_else(|| auto_split(&x.lens)).max(1);
        let (_, ms) = run(gpu, x, kv, split, keys_per_warp, iters.max(1))?;
        Ok((ms, x.lens.iter().map(|&l| l as usize).sum::<usize>() * x.head_dim * kv.bytes() * 2))
    }

    fn run(gpu: &Gpu, x: &DecodeInput, kv: KvType, split: usize, keys_per_warp: usize, iters: usize) -> Result<(Vec<f32>, f64)> {
        if !keys_per_warp_fits(x.head_dim, keys_per_warp, kv) {
            return Err(CudaError::Input(format!("{keys_per_warp} keys per warp do not suit heads of {} ({kv:?})", x.head_dim)));
        }
        x.validate()?;
        let (h, d, g) = (x.n_heads, x.head_dim, x.offsets.len());
        let max_len = *x.lens.iter().max().unwrap_or(&1) as usize;
        let launch = DecodeLaunch { n_kv: g, group: h / g, head_dim: d, split, n_splits: max_len.div_ceil(split), kv, keys_per_warp };
        // Each head shows exactly its own rows.
        let table: Vec<HeadEntry> = x.offsets.iter().zip(&x.lens).map(|(&o, &l)| HeadEntry::fixed(o as usize, l as usize)).collect();
        let heads = gpu.upload(&HeadEntry::table(&table))?;
        let state = gpu.upload(&[0i32, 0])?;
        let q = gpu.upload(&x.q)?;
        let out = gpu.zeros::<f32>(h * d)?;
        let ns = launch.n_splits;
        let (pm, pl, pa) = (gpu.zeros::<f32>(h * ns)?, gpu.zeros::<f32>(h * ns)?, gpu.zeros::<f32>(h * ns * d)?);
        let (k32, v32, k16, v16);
        let (kc, vc) = match kv {
            KvType::F32 => {
                (k32, v32) = (gpu.upload(&x.keys)?, gpu.upload(&x.values)?);
                (gpu.addr(&k32), gpu.addr(&v32))
            }
            KvType::Bf16 => {
                (k16, v16) = (gpu.upload(&crate::ops::bf16_bits(&x.keys))?, gpu.upload(&crate::ops::bf16_bits(&x.values))?);
                (gpu.addr(&k16), gpu.addr(&v16))
            }
        };
        let parts = (gpu.addr(&pm), gpu.addr(&pl), gpu.addr(&pa));
        let mut started = std::time::Instant::now();
        for round in 0..iters + usize::from(iters > 1) {
            if round == 1 {
                gpu.sync()?;
                started = std::time::Instant::now();
            }
            gpu.decode_attention(&launch, gpu.addr(&q), kc, vc, gpu.addr(&heads), gpu.addr(&state), parts, gpu.addr(&out), 0)?;
        }
        gpu.sync()?;
        let ms = started.elapsed().as_secs_f64() * 1000.0 / iters as f64;
        Ok((gpu.download(&out)?, ms))
    }

    /// Parity on random inputs: GQA and MHA groups, head dims 64 and 128, retrieval caches
    /// from 1 to 40,000 tokens next to streaming caches of at most 320.
    pub fn check(gpu: &Gpu, seed: u64) -> Result<Vec<Parity>> {
        let cases: [(usize, usize, &[u32]); 5] = [
            (9, 64, &[1, 320, 57]),                              // SmolLM2-like: 3 KV heads, group 3
            (32, 128, &[4096, 320, 4096, 320, 17, 320, 9000, 1]), // Llama-3-8B-like layer, mixed
            (32, 128, &[40_000; 8]),                              // long retrieval caches
            (8, 128, &[300, 320, 256, 257, 512, 1, 2, 3]),        // split boundaries, MHA
            (4, 256, &[1000, 20]),                                // widest head
        ];
        let mut out = Vec::new();
        for kv in [KvType::F32, KvType::Bf16] {
            for (i, (h, d, lens)) in cases.iter().enumerate() {
                let x = random_input(seed + i as u64, *h, *d, lens);
                // The bf16 kernel is compared with the reference on the same rounded cache.
                let want = reference(&if kv == KvType::Bf16 { rounded_to_bf16(&x) } else { x.clone() })?;
                for kpw in [4, 2, 1].into_iter().filter(|&k| keys_per_warp_fits(*d, k, kv)) {
                    let got = decode_attention(gpu, &x, kv, kpw)?;
                    let err = want.iter().zip(&got).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max);
                    out.push(Parity { case: format!("decode attention {kv:?}, {kpw} keys/warp: {h} heads x {d}, KV lens {lens:?}"), max_abs_err: err, bound: 1e-4 });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{check as check_kernel, decode_attention, time_decode_attention};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_card_within_256_to_2048_keys() {
        assert_eq!(auto_split(&[131_072; 8]), 2048);
        assert_eq!(auto_split(&[131_072, 131_072, 131_072, 131_072, 320, 320, 320, 320]), 1024, "4 long heads: 128 splits each");
        assert_eq!(auto_split(&[16_384; 8]), 256, "16K: 64 splits of each of 8 heads fill the card");
        assert_eq!(auto_split(&[1_000_000; 8]), 2048, "long caches: the largest split, many waves");
        assert_eq!(auto_split(&[100, 320]), 256, "short caches: one split of at least 256 keys");
        assert_eq!(auto_split(&[1000, 20]), 256);
    }

    #[test]
    fn reference_is_a_softmax_average() {
        // One key: the output is its value. Two equal keys: the mean of their values.
        let mut x = random_input(1, 2, 64, &[1, 2]);
        let out = reference(&x).unwrap();
        assert!(out[..64].iter().zip(&x.values[..64]).all(|(a, b)| (a - b).abs() < 1e-6));
        let (k1, v1, v2) = (x.keys[64..128].to_vec(), x.values[64..128].to_vec(), x.values[128..192].to_vec());
        x.keys[128..192].copy_from_slice(&k1);
        let out = reference(&x).unwrap();
        assert!(out[64..].iter().zip(v1.iter().zip(&v2)).all(|(o, (a, b))| (o - (a + b) / 2.0).abs() < 1e-5));
    }

    #[test]
    fn bad_shapes_are_refused() {
        let x = random_input(1, 3, 64, &[4, 4]);
        assert!(reference(&x).is_err(), "3 query heads cannot share 2 KV heads");
        let mut x = random_input(1, 2, 64, &[4, 4]);
        x.lens[1] = 9;
        assert!(reference(&x).is_err());
        let x = random_input(1, 2, 96, &[4, 4]);
        assert!(reference(&x).is_err(), "head_dim must be 64, 128 or 256");
    }
}
