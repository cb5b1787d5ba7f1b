// GGUF weight blocks dequantised to bf16 on the GPU, one thread per output value.
// Block layouts (little-endian, as in GGML):
//   Q8_0  34 B / 32: f16 d, i8 q[32]                          x = d * q
//   Q4_0  18 B / 32: f16 d, u8 q[16]                          x = d * (nibble - 8)
//   Q4_1  20 B / 32: f16 d, f16 m, u8 q[16]                   x = d * nibble + m
//   Q4_K 144 B / 256: f16 d, f16 dmin, u8 scales[12], u8 q[128]
//   Q6_K 210 B / 256: u8 ql[128], u8 qh[64], i8 scales[16], f16 d
// Products and sums use round-to-nearest intrinsics (no fused multiply-add), in the order of
// the CPU reference, so both give the same f32 before the bf16 rounding.
typedef unsigned short bf16_t;
typedef unsigned char u8;

__device__ __forceinline__ bf16_t to_bf(float f) {
    unsigned u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float f16(const u8* p) {
    const unsigned short bits = (unsigned short)(p[0] | (p[1] << 8));
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
}

// GGML's get_scale_min_k4: the 6-bit scale and min of sub-block j of a Q4_K block.
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int* sc, int* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// kind: 0 F32, 1 F16, 2 BF16, 3 Q8_0, 4 Q4_0, 5 Q4_1, 6 Q4_K, 7 Q6_K
extern "C" __global__ void dequant_bf16(const u8* src, bf16_t* out, unsigned long long n, int kind) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float x = 0.f;
        if (kind == 0) {
            const u8* p = src + 4 * i;
            x = __uint_as_float(p[0] | (p[1] << 8) | (p[2] << 16) | ((unsigned)p[3] << 24));
        } else if (kind == 1) {
            x = f16(src + 2 * i);
        } else if (kind == 2) {
            const u8* p = src + 2 * i;
            x = __uint_as_float((unsigned)(p[0] | (p[1] << 8)) << 16);
        } else if (kind == 3) {
            const u8* b = src + (i / 32) * 34;
            x = __fmul_rn(f16(b), (float)(signed char)b[2 + i % 32]);
        } else if (kind == 4 || kind == 5) {
            const int size = kind == 4 ? 18 : 20, j = i % 32;
            const u8* b = src + (i / 32) * size;
            const u8 q = b[size - 16 + (j & 15)];
            const int nib = j < 16 ? (q & 0xF) : (q >> 4);
            x = kind == 4 ? __fmul_rn(f16(b), (float)(nib - 8)) : __fadd_rn(__fmul_rn(f16(b), (float)nib), f16(b + 2));
        } else if (kind == 6) {
            const u8* b = src + (i / 256) * 144;
            const int j = i % 256, g = j / 64, w = j % 64, l = w % 32;
            int sc, m;
            scale_min_k4(2 * g + (w >= 32), b + 4, &sc, &m);
            const float d = __fmul_rn(f16(b), (float)sc), mn = __fmul_rn(f16(b + 2), (float)m);
            const u8 q = b[16 + 32 * g + l];
            x = __fsub_rn(__fmul_rn(d, (float)(w < 32 ? (q & 0xF) : (q >> 4))), mn);
        } else {
            const u8* b = src + (i / 256) * 210;
            const int j = i % 256, h = j / 128, r = j % 128, quarter = r / 32, l = r % 32;
            const u8* ql = b + 64 * h;
            const u8* qh = b + 128 + 32 * h;
            const signed char* sc = (const signed char*)(b + 192 + 8 * h);
            const int low = quarter & 1 ? ql[l + 32] : ql[l];
            const int nib = quarter < 2 ? (low & 0xF) : (low >> 4);
            const int q = (nib | (((qh[l] >> (2 * quarter)) & 3) << 4)) - 32;
            x = __fmul_rn(__fmul_rn(f16(b + 208), (float)sc[l / 16 + 2 * quarter]), (float)q);
        }
        out[i] = to_bf(x);
    }
}
