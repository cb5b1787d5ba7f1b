//! The small kernels of a transformer step, each with a plain CPU reference: seeded random
//! weights, token embedding, RMSNorm, RoPE with the KV append into the paged cache, SiLU×up,
//! argmax, block-table updates and block copies.
//!
//! Conventions shared by every kernel here and by the attention kernels:
//! * bf16 values travel as their raw bits (`unsigned short`) and are rounded to nearest even,
//!   exactly as [`half::bf16::from_f32`] does, so CPU references can reproduce them bit for bit.
//! * The residual stream is `f32` (the output and down products accumulate into it);
//!   matrix-product inputs (normalised activations, attention outputs, SiLU×up) and the
//!   qkv and gate/up products' outputs are bf16, as in a bf16 PyTorch model.
//! * A step's rows (their sequence slot and position) and the block tables live in device
//!   memory, so a captured CUDA graph replays for any positions and any blocks.
//!
//! The cache layout is [`crate::paged`]'s: rows are found through a slot's block table.

/// The kernels' CUDA source (compiled once per process with NVRTC).
pub const SOURCE: &str = r#"
typedef unsigned short bf16_t;
__device__ __forceinline__ float bf(bf16_t b) { return __uint_as_float(((unsigned)b) << 16); }
__device__ __forceinline__ bf16_t to_bf(float f) {
    unsigned u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// splitmix64 of (seed, index), mapped to [-1, 1): the same function as `hash_uniform` in Rust.
__device__ __forceinline__ float hash_uniform(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed * 0x9E3779B97F4A7C15ull + i * 0xD1B54A32D192ED03ull;
    z ^= z >> 30; z *= 0xBF58476D1CE4E5B9ull; z ^= z >> 27; z *= 0x94D049BB133111EBull; z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
}

extern "C" __global__ void fill_uniform_bf16(bf16_t* out, unsigned long long n, unsigned long long seed, float scale) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = to_bf(hash_uniform(seed, i) * scale);
}

// x[t] = the embedding of tokens[t]: a row of the table, or (table == 0) the seeded random row.
extern "C" __global__ void embed(const int* tokens, const bf16_t* table, unsigned long long seed, float scale, float* x, int hidden) {
    const int t = blockIdx.x;
    const unsigned long long row = (unsigned long long)tokens[t] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        x[(size_t)t * hidden + i] = table ? bf(table[row + i]) : bf(to_bf(hash_uniform(seed, row + i) * scale));
}

// out[t] = bf16(x[t] / rms(x[t]) * w), one row per block. The row stays in registers between the sum of squares and the
// output (up to RMS_VECS float4 per thread; the host gives dim / 4 threads, rounded up to a
// warp, at most 1024), loaded in one round of 16-byte loads: a decode step's single row is
// then one memory round trip, not the 16 dependent loads of a 256-thread loop (14 us per
// norm on the H200, two per layer). Rows of a dim that is not a multiple of 4 take the
// scalar loop.
#define RMS_VECS 4
extern "C" __global__ void __launch_bounds__(1024) rms_norm(const float* x, const float* w, bf16_t* out, int dim, float eps) {
    const float* row = x + (size_t)blockIdx.x * dim;
    bf16_t* o = out + (size_t)blockIdx.x * dim;
    const bool vec = dim % 4 == 0 && dim / 4 <= RMS_VECS * (int)blockDim.x;
    float s = 0.f;
    float4 v[RMS_VECS];
    if (vec) {
#pragma unroll
        for (int k = 0; k < RMS_VECS; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            v[k] = i < dim / 4 ? reinterpret_cast<const float4*>(row)[i] : make_float4(0.f, 0.f, 0.f, 0.f);
            s += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) s += row[i] * row[i];
    }
    __shared__ float part[32];
    for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffff, s, d);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < (int)blockDim.x / 32; i++) total += part[i];
    const float scale = rsqrtf(total / dim + eps);
    if (vec) {
#pragma unroll
        for (int k = 0; k < RMS_VECS; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < dim / 4) {
                const float4 g = reinterpret_cast<const float4*>(w)[i];
                const unsigned lo = to_bf(v[k].x * scale * g.x) | ((unsigned)to_bf(v[k].y * scale * g.y) << 16);
                const unsigned hi = to_bf(v[k].z * scale * g.z) | ((unsigned)to_bf(v[k].w * scale * g.w) << 16);
                reinterpret_cast<uint2*>(o)[i] = make_uint2(lo, hi);
            }
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = to_bf(row[i] * scale * w[i]);
    }
}

// The largest of every thread's `v` in the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_max(float v) {
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    float m = part[0];
    for (int i = 1; i < (int)blockDim.x / 32; i++) m = fmaxf(m, part[i]);
    __syncthreads();  // part is reused by the next call
    return m;
}

// The power-of-two scale of an fp8 row whose largest magnitude is `amax`: the smallest with
// amax / scale <= 448, its exponent clamped to [-24, 15] (crate::fp8::row_scale).
__device__ float fp8_row_scale(float amax) {
    const unsigned u = __float_as_uint(amax);
    const int biased = (int)((u >> 23) & 0xffu);
    if (amax == 0.f || biased == 0) return 1.f;
    const int e = min(15, max(-24, biased - 135 + ((u & 0x7fffffu) > 0x600000u ? 1 : 0)));
    return __uint_as_float((unsigned)(e + 127) << 23);
}

// Two values to e4m3 bytes (round to nearest even, saturating): `lo` in the low byte.
__device__ __forceinline__ unsigned short e4m3x2(float lo, float hi) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// f32 to f16 bits, to nearest even (values here are within f16's range).
__device__ __forceinline__ unsigned short to_h(float f) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
__device__ __forceinline__ float from_h(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Stores elements a and b of a cached row: bf16, or (scales set) codes with the row's scale,
// which thread 0 writes to `scales[row]`: e4m3 (format 1), int8 (format 2: amax / 127,
// round to nearest even, as crate::int8) or int4 (format 3: an f16 step and minimum, codes
// staged in shared memory and packed a word of 8 at a time, as crate::int4). Every thread
// of the block calls it.
__device__ __forceinline__ void store_row_pair(void* cache, float* scales, int format, size_t row, int head_dim, int a, int b, float x0, float x1) {
    if (scales && format == 3) {
        const float limit = 32768.f;
        const float hi = fminf(fmaxf(block_max(fmaxf(x0, x1)), -limit), limit);
        const float lo = fminf(fmaxf(-block_max(-fminf(x0, x1)), -limit), limit);
        unsigned short sh = to_h((hi - lo) / 15.f);
        if (!(from_h(sh) > 0.f)) sh = 0x3c00;  // a constant row steps by 1
        const unsigned short zh = to_h(lo);
        const float st = from_h(sh), z = from_h(zh);
        __shared__ unsigned char codes[256];
        codes[a] = (unsigned char)max(0, min(15, __float2int_rn((x0 - z) / st)));
        codes[b] = (unsigned char)max(0, min(15, __float2int_rn((x1 - z) / st)));
        __syncthreads();
        if (threadIdx.x < head_dim / 8) {
            // Nibble j < 4 of word w holds value 8w + 2j, nibble 4 + j value 8w + 2j + 1.
            const unsigned char* c = codes + 8 * threadIdx.x;
            unsigned w = 0;
            for (int j = 0; j < 4; j++) w |= ((unsigned)c[2 * j] << (4 * j)) | ((unsigned)c[2 * j + 1] << (16 + 4 * j));
            reinterpret_cast<unsigned*>(cache)[row * (head_dim / 8) + threadIdx.x] = w;
        }
        __syncthreads();  // codes is reused by the next row
        if (threadIdx.x == 0) scales[row] = __uint_as_float((unsigned)sh | ((unsigned)zh << 16));
    } else if (scales && format == 2) {
        const float amax = block_max(fmaxf(fabsf(x0), fabsf(x1)));
        const float s = amax > 0.f && amax <= 3.402823e38f ? amax / 127.f : 1.f;
        signed char* c = (signed char*)cache + row * head_dim;
        c[a] = (signed char)max(-127, min(127, __float2int_rn(x0 / s)));
        c[b] = (signed char)max(-127, min(127, __float2int_rn(x1 / s)));
        if (threadIdx.x == 0) scales[row] = s;
    } else if (scales) {
        const float s = fp8_row_scale(block_max(fmaxf(fabsf(x0), fabsf(x1))));
        const float inv = 1.f / s;
        const unsigned short p = e4m3x2(x0 * inv, x1 * inv);
        unsigned char* c = (unsigned char*)cache + row * head_dim;
        c[a] = (unsigned char)(p & 0xffu); c[b] = (unsigned char)(p >> 8);
        if (threadIdx.x == 0) scales[row] = s;
    } else {
        bf16_t* c = (bf16_t*)cache + row * head_dim;
        c[a] = to_bf(x0); c[b] = to_bf(x1);
    }
}

// An orthonormal Walsh-Hadamard transform of a head's values, in place: thread i holds
// elements a and b (of head_dim / 2 threads) and `buf` has head_dim floats. Butterflies in the
// order of crate::int4::hadamard (stage h = 1, 2, 4, ...: pair j, j + h -> sum, difference),
// then a scale of 1 / sqrt(head_dim). Every thread of the block calls it.
__device__ __forceinline__ void hadamard_pair(float* buf, int head_dim, int a, int b, float* y0, float* y1) {
    buf[a] = *y0; buf[b] = *y1;
    __syncthreads();
    const int i = threadIdx.x;
    for (int h = 1; h < head_dim; h *= 2) {
        const int j = (i / h) * 2 * h + i % h;
        const float x = buf[j], y = buf[j + h];
        __syncthreads();
        buf[j] = x + y; buf[j + h] = x - y;
        __syncthreads();
    }
    const float s = 1.f / sqrtf((float)head_dim);
    *y0 = buf[a] * s; *y1 = buf[b] * s;
    __syncthreads();  // buf is reused by the next call
}

// Rotates the step's queries and keys (row t: sequence slot row_slot[t], position
// row_pos[t]), writes queries as f32 and keys/values into the paged cache rows of their
// positions (`kv_row`): bf16, or codes with a scale word per row where pg.kscale is set
// (fp8, int8, int4; keys are quantised from their f32 rotation; over int4 and fp8, queries
// and keys are turned into the Hadamard basis first). qkv rows (bf16) are [q (heads * D) | k (kv * D) | v (kv * D)].
// A row whose slot is negative is padding: nothing is written to the cache. Each KV head
// (and its query heads: over int4 and fp8 they turn with its keys) takes its kind's view of the pool,
// pg_streaming a streaming head's: where the kinds keep different types (bf16 windows
// beside a quantised cache) the two differ in units per block and format. A head whose entry
// is HeadEntry::SKIP (kind 2) is another launch's.
// Grid (T, heads + kv), D/2 threads.
extern "C" __global__ void rope_append(const bf16_t* qkv, const int* row_slot, const int* row_pos, const float* inv_freq,
    const int4* heads, int n_heads, int n_kv, int head_dim, int half_split,
    float* q_out, void* kc, void* vc, Paged pg_retrieval, Paged pg_streaming)
{
    pdl_launch_dependents();  // the decode partial kernel may be placed (DUO_PDL=1); it waits for this grid
    const int t = blockIdx.x, h = blockIdx.y, i = threadIdx.x, half = head_dim / 2;
    const int kind = heads[h < n_heads ? h / (n_heads / n_kv) : h - n_heads].w;
    if (kind == 2) return;
    const Paged& pg = kind == 1 ? pg_streaming : pg_retrieval;
    const int slot = row_slot[t], pos = row_pos[t];
    const bf16_t* row = qkv + (size_t)t * (n_heads + 2 * n_kv) * head_dim;
    const bf16_t* x = row + h * head_dim;
    const int a = half_split ? i : 2 * i, b = half_split ? i + half : 2 * i + 1;
    float s, c;
    sincosf((float)pos * inv_freq[i], &s, &c);
    const float x0 = bf(x[a]), x1 = bf(x[b]);
    float y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
    __shared__ float buf[256];
    if ((pg.kv_format == 3 || pg.kv_format == 1) && (h < n_heads || slot >= 0)) {
        // An int4 or fp8 cache holds keys in a Hadamard basis (KvType::turns_keys), so
        // queries turn with them: q . k is unchanged.
        hadamard_pair(buf, head_dim, a, b, &y0, &y1);
    }
    if (h < n_heads) {
        float* q = q_out + (size_t)t * n_heads * head_dim + h * head_dim;
        q[a] = y0; q[b] = y1;
    } else if (slot >= 0) {
        const int g = h - n_heads;
        const size_t r = (size_t)kv_row(pg, heads[g], slot, pos);
        // K8V4 (format 4): keys as int8 (2), values as int4 (3).
        store_row_pair(kc, pg.kscale, pg.kv_format == 4 ? 2 : pg.kv_format, (size_t)key_row(pg, r), head_dim, a, b, y0, y1);
        const bf16_t* v = row + (n_heads + n_kv + g) * head_dim;
        store_row_pair(vc, pg.vscale, pg.kv_format == 4 ? 3 : pg.kv_format, r, head_dim, a, b, bf(v[a]), bf(v[b]));
    }
}

// out[i * n_cols + j] = in[rows[i] * in_cols + cols[j]] (bf16 words): one rank's rows and
// columns of a weight matrix under tensor parallelism (crate::shard::gather_rows_cols).
extern "C" __global__ void gather_bf16(const unsigned short* in, long long in_cols, const int* rows, int n_rows,
    const int* cols, int n_cols, unsigned short* out)
{
    const size_t n = (size_t)n_rows * n_cols;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x) {
        const size_t i = k / n_cols, j = k % n_cols;
        out[k] = in[(size_t)rows[i] * in_cols + cols[j]];
    }
}

// dst[pairs[2i]] = pairs[2i + 1] for i < n: block-table updates in one launch.
extern "C" __global__ void scatter_i32(int* dst, const int* pairs, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) dst[pairs[2 * i]] = pairs[2 * i + 1];
}

// Moves the ring rows of positions first..first+count of every streaming head of `slot`
// between a ring of `cap` rows and `scratch` ([head][keys, values][count][row], then an fp8
// cache's row scales [head][keys, values][count]); a key row is `row_u16` 16-bit words, a
// value row `v_row_u16` (as many, or K8V4's half), each scratch row `row_u16`.
// to_scratch = 1 reads the ring, 0 writes it. A ring changes size in two launches (out
// with the old size, in with the new), so rows that overlap are never read after being
// overwritten. Grid (streaming heads, 2): y = 0 keys, 1 values; 128 threads.
extern "C" __global__ void ring_move(unsigned short* kc, unsigned short* vc, unsigned short* scratch, Paged pg, int slot, int cap, int sink,
    int first, int count, int row_u16, int v_row_u16, int to_scratch)
{
    const int h = blockIdx.x;
    unsigned short* cache = blockIdx.y == 0 ? kc : vc;
    const int words = blockIdx.y == 0 ? row_u16 : v_row_u16;
    float* scales = blockIdx.y == 0 ? pg.kscale : pg.vscale;
    float* scratch_scales = reinterpret_cast<float*>(scratch + (size_t)gridDim.x * 2 * count * row_u16);
    const int4 e = make_int4(h, sink, 0, 1);
    for (int i = 0; i < count; i++) {
        const long long row = kv_row_cap(pg, e, slot, first + i, cap);
        unsigned short* ring = cache + (size_t)(blockIdx.y == 0 ? key_row(pg, row) : row) * words;
        const size_t at = ((size_t)h * 2 + blockIdx.y) * count + i;
        unsigned short* s = scratch + at * row_u16;
        for (int c = threadIdx.x; c < words; c += blockDim.x) {
            if (to_scratch) s[c] = ring[c]; else ring[c] = s[c];
        }
        if (scales && threadIdx.x == 0) {
            if (to_scratch) scratch_scales[at] = scales[row]; else scales[row] = scratch_scales[at];
        }
    }
}

// n values in [-1, 1) times 2^8 as e4m3 bytes (synthetic fp8 caches; their rows take the scale
// 2^-8).
extern "C" __global__ void fill_uniform_e4m3(unsigned char* out, unsigned long long n, unsigned long long seed) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = (unsigned char)(e4m3x2(hash_uniform(seed, i) * 256.f, 0.f) & 0xffu);
}

extern "C" __global__ void fill_f32(float* out, unsigned long long n, float value) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = value;
}

// Copies whole blocks of 16-bit words, `elems` a key block and `v_elems` a value block (as
// many, or K8V4's half): block pairs[2i] of (sk, sv) to block pairs[2i + 1] of (dk, dv).
// Grid (n, 2): y = 0 keys, 1 values; 256 threads.
extern "C" __global__ void copy_blocks(const bf16_t* sk, const bf16_t* sv, bf16_t* dk, bf16_t* dv, const int* pairs, long long k_elems, long long v_elems) {
    const long long elems = blockIdx.y == 0 ? k_elems : v_elems;
    const uint4* from = reinterpret_cast<const uint4*>((blockIdx.y == 0 ? sk : sv) + (size_t)pairs[2 * blockIdx.x] * elems);
    uint4* to = reinterpret_cast<uint4*>((blockIdx.y == 0 ? dk : dv) + (size_t)pairs[2 * blockIdx.x + 1] * elems);
    for (long long i = threadIdx.x; i < elems / 8; i += blockDim.x) to[i] = from[i];
}

// bf16(silu(g) * u) as every kernel here writes it (silu_mul, gemv_fused's SiLU pairs and
// its SiLU input rows): one function, so the three agree bit for bit.
__device__ __forceinline__ bf16_t silu_mul_bf(float g, float u) { return to_bf(g / (1.f + expf(-g)) * u); }

// A decode step's matrix-vector products, y[t, n] = sum_k in[t, k] w[n, k] for at most
// GEMV_ROWS rows t, which only stream the weights, with the small kernels around them folded
// in: the input is bf16 rows, f32 rows that each block puts through RMSNorm itself (`norm`
// set: into shared memory, as `rms_norm` would write them), or bf16 [gate | up] rows whose
// SiLU each block computes into shared memory (`stage_x` 2), and the output is
// f32 (out_mode 0, plus beta y where beta != 0), bf16 (1), or bf16(silu(gate) * up) of a
// [gate | up] product (2: a warp takes gate row n and up row n + out_dim / 2 in turn and
// writes one value, as `silu_mul` would from the bf16 pair). Persistent: each warp takes
// output rows first, first + stride, ..., a row in items of 32 x GEMV_UNROLL 16-byte chunks,
// copied by cp.async into the warp's own ring of GEMV_STAGES items in shared memory (each
// lane copies and reads only its own chunks, so the lanes never wait for each other), so
// that GEMV_STAGES - 1 items a warp are in flight without holding registers. A row's sum
// has one order whatever the grid and the row count (batch invariance). Launched as a
// programmatic dependent (Gpu::gemv_fused): the first items are asked for before the wait for
// the kernel before, as nothing in a step writes weights.
#define GEMV_ROWS 8
#define GEMV_WARPS 8
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 4
#endif
#ifndef GEMV_STAGES
#define GEMV_STAGES 4
#endif
#ifndef GEMV_BLOCKS
#define GEMV_BLOCKS 2
#endif
#define GEMV_ITEM (32 * GEMV_UNROLL)
// A warp's work, items in order: unit k (output row first + k * stride), its part r (gate,
// then up: row + r * units), its group g of chunks. A cursor steps through them without
// dividing (per item, index arithmetic would cost as much as the sums).
struct GemvWork { int first, stride, units, per_unit, groups, chunks, items; };
struct GemvCursor {
    int k, r, g;
    __device__ __forceinline__ void step(const GemvWork& s) {
        if (++g == s.groups) { g = 0; if (++r == s.per_unit) { r = 0; ++k; } }
    }
};
// This lane's chunks of the cursor's item into its slots of `stage`, as one cp.async group
// (an empty group past the last item, so that every lane counts the same groups).
__device__ __forceinline__ void gemv_issue(uint4* stage, const bf16_t* w, const GemvWork& s, const GemvCursor& at, bool live) {
    const int lane = threadIdx.x % 32;
    if (live) {
        const size_t n = (size_t)(s.first + at.k * s.stride) + (size_t)at.r * s.units;
        const uint4* row = reinterpret_cast<const uint4*>(w + n * (size_t)s.chunks * 8);
        const int c0 = at.g * GEMV_ITEM + lane;
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + 32 * u;
            if (c < s.chunks) {
                const unsigned dst = (unsigned)__cvta_generic_to_shared(stage + lane + 32 * u);
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(row + c) : "memory");
            }
        }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
}
__device__ __forceinline__ void gemv_sum(const uint4* stage, const GemvWork& s, const GemvCursor& at, const uint4* in, int rows,
                                         float (&acc)[GEMV_ROWS], float (&gate)[GEMV_ROWS], void* y, int out_dim, float beta, int out_mode) {
    const int lane = threadIdx.x % 32, g = at.g;
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; u++) {
        const int c = g * GEMV_ITEM + lane + 32 * u;
        if (c >= s.chunks) break;
        const uint4 wv = stage[lane + 32 * u];
        const unsigned ww[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int t = 0; t < GEMV_ROWS; t++) {
            if (t >= rows) break;
            const uint4 xv = in[(size_t)t * s.chunks + c];
            const unsigned xx[4] = {xv.x, xv.y, xv.z, xv.w};
            float a = acc[t];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                a = fmaf(__uint_as_float(ww[i] << 16), __uint_as_float(xx[i] << 16), a);
                a = fmaf(__uint_as_float(ww[i] & 0xffff0000u), __uint_as_float(xx[i] & 0xffff0000u), a);
            }
            acc[t] = a;
        }
    }
    if (g != s.groups - 1) return;
    const int r = at.r, n = s.first + at.k * s.stride;
#pragma unroll
    for (int t = 0; t < GEMV_ROWS; t++) {
        if (t >= rows) break;
        float v = acc[t];
        acc[t] = 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (out_mode == 2 && r == 0) { gate[t] = v; continue; }
        if (lane != 0) continue;
        if (out_mode == 0) {
            float* yf = reinterpret_cast<float*>(y) + (size_t)t * out_dim + n;
            *yf = beta == 0.f ? v : v + beta * *yf;
        } else if (out_mode == 1) {
            reinterpret_cast<bf16_t*>(y)[(size_t)t * out_dim + n] = to_bf(v);
        } else {
            const float gv = bf(to_bf(gate[t])), uv = bf(to_bf(v));
            reinterpret_cast<bf16_t*>(y)[(size_t)t * s.units + n] = silu_mul_bf(gv, uv);
        }
    }
}
// Dynamic shared memory: the warps' rings (GEMV_WARPS x GEMV_STAGES items), then the
// normalised rows where `norm` is set, or, where `stage_x` is 1, a copy of the bf16 rows (the
// L1 beside the rings is too small to keep a 14,336-wide row: every warp would read it from
// the L2 again), or, where it is 2, bf16(silu(gate) * up) of bf16 [gate | up] rows of twice
// in_dim, exactly as `silu_mul` writes them (the SiLU before the down product).
extern "C" __global__ void __launch_bounds__(256, GEMV_BLOCKS) gemv_fused(const void* x, const float* norm, float eps, const bf16_t* __restrict__ w,
                                                              void* y, int rows, int in_dim, int out_dim, float beta, int out_mode, int stage_x) {
    extern __shared__ __align__(16) uint4 gemv_smem[];
    __shared__ float part[GEMV_WARPS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    GemvWork s;
    s.chunks = in_dim / 8;
    s.groups = (s.chunks + GEMV_ITEM - 1) / GEMV_ITEM;
    s.per_unit = out_mode == 2 ? 2 : 1;
    s.units = out_dim / s.per_unit;
    s.stride = gridDim.x * GEMV_WARPS;
    s.first = blockIdx.x * GEMV_WARPS + warp;
    const int mine = s.first < s.units ? (s.units - s.first + s.stride - 1) / s.stride : 0;
    s.items = mine * s.per_unit * s.groups;
    uint4* ring = gemv_smem + (size_t)warp * GEMV_STAGES * GEMV_ITEM;
    GemvCursor issue = {0, 0, 0}, sum = {0, 0, 0};
#pragma unroll
    for (int j = 0; j < GEMV_STAGES - 1; j++) {
        gemv_issue(ring + j * GEMV_ITEM, w, s, issue, j < s.items);
        issue.step(s);
    }
    pdl_wait();
    const uint4* in = reinterpret_cast<const uint4*>(x);
    if (norm != nullptr) {
        uint4* xs = gemv_smem + (size_t)GEMV_WARPS * GEMV_STAGES * GEMV_ITEM;
        for (int t = 0; t < rows; t++) {
            const float4* xr = reinterpret_cast<const float4*>(x) + (size_t)t * (in_dim / 4);
            float sq = 0.f;
#pragma unroll 4
            for (int i = threadIdx.x; i < in_dim / 4; i += blockDim.x) {
                const float4 v = xr[i];
                sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
            for (int d = 16; d > 0; d >>= 1) sq += __shfl_xor_sync(0xffffffff, sq, d);
            if (lane == 0) part[warp] = sq;
            __syncthreads();
            float total = 0.f;
            for (int i = 0; i < GEMV_WARPS; i++) total += part[i];
            const float scale = rsqrtf(total / in_dim + eps);
            const float4* g4 = reinterpret_cast<const float4*>(norm);
#pragma unroll 2
            for (int i = threadIdx.x; i < s.chunks; i += blockDim.x) {
                const float4 a = xr[2 * i], b = xr[2 * i + 1], ga = g4[2 * i], gb = g4[2 * i + 1];
                uint4 o;
                o.x = to_bf(a.x * scale * ga.x) | ((unsigned)to_bf(a.y * scale * ga.y) << 16);
                o.y = to_bf(a.z * scale * ga.z) | ((unsigned)to_bf(a.w * scale * ga.w) << 16);
                o.z = to_bf(b.x * scale * gb.x) | ((unsigned)to_bf(b.y * scale * gb.y) << 16);
                o.w = to_bf(b.z * scale * gb.z) | ((unsigned)to_bf(b.w * scale * gb.w) << 16);
                xs[(size_t)t * s.chunks + i] = o;
            }
            __syncthreads();  // part[] is the next row's, and every warp reads every row
        }
        in = xs;
    } else if (stage_x) {
        uint4* xs = gemv_smem + (size_t)GEMV_WARPS * GEMV_STAGES * GEMV_ITEM;
        if (stage_x == 1) {
            for (int i = threadIdx.x; i < rows * s.chunks; i += blockDim.x) xs[i] = in[i];
        } else {
            for (int i = threadIdx.x; i < rows * s.chunks; i += blockDim.x) {
                const int t = i / s.chunks, c = i % s.chunks;
                const uint4 g4 = in[(size_t)t * 2 * s.chunks + c], u4 = in[(size_t)t * 2 * s.chunks + s.chunks + c];
                const unsigned gw[4] = {g4.x, g4.y, g4.z, g4.w}, uw[4] = {u4.x, u4.y, u4.z, u4.w};
                unsigned o[4];
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const float g0 = bf((bf16_t)(gw[k] & 0xffffu)), g1 = bf((bf16_t)(gw[k] >> 16));
                    const float u0 = bf((bf16_t)(uw[k] & 0xffffu)), u1 = bf((bf16_t)(uw[k] >> 16));
                    o[k] = silu_mul_bf(g0, u0) | ((unsigned)silu_mul_bf(g1, u1) << 16);
                }
                xs[i] = make_uint4(o[0], o[1], o[2], o[3]);
            }
        }
        __syncthreads();
        in = xs;
    }
    float acc[GEMV_ROWS], gate[GEMV_ROWS];
#pragma unroll
    for (int t = 0; t < GEMV_ROWS; t++) { acc[t] = 0.f; gate[t] = 0.f; }
    int slot = 0;  // item j's: j % GEMV_STAGES
    for (int j = 0; j < s.items; j++) {
        // Item j's group is in once at most GEMV_STAGES - 2 later ones are pending; the
        // slot before it, whose last reader was item j - 1, takes item j + GEMV_STAGES - 1.
        asm volatile("cp.async.wait_group %0;" :: "n"(GEMV_STAGES - 2) : "memory");
        const int free = slot == 0 ? GEMV_STAGES - 1 : slot - 1;
        gemv_issue(ring + free * GEMV_ITEM, w, s, issue, j + GEMV_STAGES - 1 < s.items);
        issue.step(s);
        gemv_sum(ring + slot * GEMV_ITEM, s, sum, in, rows, acc, gate, y, out_dim, beta, out_mode);
        sum.step(s);
        slot = slot == GEMV_STAGES - 1 ? 0 : slot + 1;
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    pdl_launch_dependents();
}

// out[t, i] = bf16(silu(gate) * up), rows of gu (bf16) being [gate (inter) | up (inter)].
extern "C" __global__ void silu_mul(const bf16_t* gu, bf16_t* out, int rows, int inter) {
    const size_t n = (size_t)rows * inter;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x) {
        const size_t t = k / inter, i = k % inter;
        const float g = bf(gu[t * 2 * inter + i]), u = bf(gu[t * 2 * inter + inter + i]);
        out[k] = silu_mul_bf(g, u);
    }
}

// The index of the largest value of each row of n (the lowest index among equals), one block
// of 1024 threads per row. Rows whose length is a multiple of 4 are read in 16-byte loads,
// four in flight per thread (over a 128K vocabulary: 51 us with one float per load, each
// waiting for the last).
__device__ __forceinline__ void argmax_take(float v, int i, float* best, int* at) {
    if (v > *best || (v == *best && i < *at)) { *best = v; *at = i; }
}
extern "C" __global__ void argmax(const float* x, int n, int* out) {
    x += (size_t)blockIdx.x * n;
    out += blockIdx.x;
    float best = __int_as_float(0xff800000); int at = 0x7fffffff;
    if (n % 4 == 0) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        const int n4 = n / 4;
        for (int base = threadIdx.x; base < n4; base += 4 * blockDim.x) {
            float4 c[4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const int i = base + k * blockDim.x;
                c[k] = i < n4 ? x4[i] : make_float4(best, best, best, best);
            }
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const int i = 4 * (base + k * blockDim.x);
                if (i < n) {
                    argmax_take(c[k].x, i, &best, &at); argmax_take(c[k].y, i + 1, &best, &at);
                    argmax_take(c[k].z, i + 2, &best, &at); argmax_take(c[k].w, i + 3, &best, &at);
                }
            }
        }
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) argmax_take(x[i], i, &best, &at);
    }
    __shared__ float sb[1024]; __shared__ int si[1024];
    sb[threadIdx.x] = best; si[threadIdx.x] = at;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float b = sb[threadIdx.x + s]; const int j = si[threadIdx.x + s];
            if (b > sb[threadIdx.x] || (b == sb[threadIdx.x] && j < si[threadIdx.x])) { sb[threadIdx.x] = b; si[threadIdx.x] = j; }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) *out = si[0];
}

"#;

pub use duo_core::random_weights::hash_uniform;

/// `x` rounded to bf16 and back.
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// `v` as bf16 bits (round to nearest even), the form the GPU buffers hold.
pub fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

/// The seeded random bf16 tensor `fill_uniform_bf16` writes, as `f32`.
pub fn uniform_bf16(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| round_bf16(hash_uniform(seed, i) * scale))
        .collect()
}

/// RMSNorm of each row of `x` times `w`, rounded to bf16 (the kernel's output).
pub fn rms_norm_ref(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|row| {
            let ms = row.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / d as f64;
            let s = 1.0 / (ms + eps as f64).sqrt();
            row.iter()
                .zip(w)
                .map(move |(v, w)| round_bf16((*v as f64 * s) as f32 * w))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// RoPE of one head's vector at `pos` (pairs `(i, i + d/2)` when `half_split`, else `(2i, 2i+1)`).
pub fn rope_ref(x: &mut [f32], pos: usize, inv_freq: &[f32], half_split: bool) {
    let half = inv_freq.len();
    for (i, f) in inv_freq.iter().enumerate() {
        let (a, b) = if half_split {
            (i, i + half)
        } else {
            (2 * i, 2 * i + 1)
        };
        let ang = pos as f32 * f;
        let (s, c) = (ang.sin(), ang.cos());
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
    }
}

/// `bf16(silu(gate) * up)` for rows of `[gate | up]`.
pub fn silu_mul_ref(gu: &[f32], inter: usize) -> Vec<f32> {
    gu.chunks(2 * inter)
        .flat_map(|row| {
            (0..inter).map(move |i| round_bf16(row[i] / (1.0 + (-row[i]).exp()) * row[inter + i]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_uniform_in_minus_one_one_and_seeded() {
        let v: Vec<f32> = (0..10_000).map(|i| hash_uniform(7, i)).collect();
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert_ne!(hash_uniform(7, 3), hash_uniform(8, 3));
        assert_eq!(hash_uniform(7, 3), hash_uniform(7, 3));
    }

    #[test]
    fn rope_append_turns_exactly_the_formats_whose_keys_kv_type_turns() {
        use crate::decode_attention::KvType;
        // The kernel tests `Paged::kv_format` codes where the host asks KvType::turns_keys;
        // the two must name the same formats (K8V4's keys are int8's: not turned).
        let line = SOURCE.lines().find(|l| l.contains("&& (h < n_heads || slot >= 0))")).expect("rope_append's turn test");
        let mut in_kernel: Vec<i32> = line.split("pg.kv_format == ").skip(1).map(|x| x.chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()).collect();
        in_kernel.sort_unstable();
        let kinds = [KvType::Bf16, KvType::Fp8, KvType::Int8, KvType::Int4, KvType::K8V4];
        let mut on_host: Vec<i32> = kinds.iter().filter(|k| k.turns_keys()).map(|k| k.format_code()).collect();
        on_host.sort_unstable();
        assert_eq!(in_kernel, on_host, "{line}");
    }

    #[test]
    fn rms_norm_of_a_constant_row_is_the_weight() {
        let out = rms_norm_ref(&[3.0; 8], &[0.5; 8], 0.0);
        assert!(out.iter().all(|v| (v - 0.5).abs() < 1e-3));
    }

    #[test]
    fn rope_at_zero_is_identity_and_keeps_the_norm() {
        let inv: Vec<f32> = (0..4).map(|i| 10_000f32.powf(-(i as f32) / 4.0)).collect();
        let x0 = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        for half in [true, false] {
            let mut x = x0.clone();
            rope_ref(&mut x, 0, &inv, half);
            assert_eq!(x, x0);
            rope_ref(&mut x, 1234, &inv, half);
            let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
            assert!((n(&x) - n(&x0)).abs() < 1e-3);
            assert_ne!(x, x0);
        }
    }

    #[test]
    fn silu_mul_matches_its_definition() {
        let out = silu_mul_ref(&[0.0, 2.0, 3.0, -1.0], 2);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - round_bf16(-(2.0 / (1.0 + (-2f32).exp())))).abs() < 1e-6);
    }
}
