// Which wgmma descriptor fields read 128-byte-swizzled shared-memory tiles (the layout TMA
// writes), for the Hopper prefill kernel's next form (issue 16). One warpgroup, A (64 x 16)
// in registers, B from shared memory; every mode prints its largest error against a CPU
// product. Build and run on the GPU host, one process per mode (an illegal access is sticky):
//   nvcc -gencode arch=compute_90a,code=sm_90a -O2 -o swz wgmma_swizzle_probe.cu
//   for m in 0 1 2 3 4 5; do ./swz $m; done
// Modes 0-1: K-major B (keys x dims, a 64-dim row is one 128-byte swizzled row), one k16
// step at each of the row's four 32-byte offsets (mode 0: the step at offset 32 bytes,
// mode 1: at 96), SBO = 1024 (8 rows), LBO = 1 (unused when swizzled).
// Modes 2-5: MN-major B with the transpose flag, one m64n128k16: B is 16 keys x 128 dims
// stored as two 64-dim column blocks of 16 swizzled 128-byte rows (2,048 bytes each); modes
// 2/3 try (LBO, SBO) = (2048, 1024) / (1024, 2048); modes 4/5 the same with the column
// blocks 8,192 bytes apart (as a 64-key tile holds them): (8192, 1024) / (1024, 8192).
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <cmath>

__device__ __forceinline__ uint64_t desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (uint64_t)((addr >> 4) & 0x3fff) | ((uint64_t)((lbo >> 4) & 0x3fff) << 16) | ((uint64_t)((sbo >> 4) & 0x3fff) << 32) | (1ull << 62);
}
// Byte offset of 16-byte chunk c of row r in a 128-byte-swizzled region (rows of 128 bytes).
__host__ __device__ __forceinline__ unsigned swz(unsigned r, unsigned c) { return r * 128 + ((c ^ (r & 7)) * 16); }

// One m64n64k16, B K-major (modes 0-1).
__device__ __forceinline__ void wg64(float* d, const unsigned* a, uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]),"+f"(d[1]),"+f"(d[2]),"+f"(d[3]),"+f"(d[4]),"+f"(d[5]),"+f"(d[6]),"+f"(d[7]),"+f"(d[8]),"+f"(d[9]),"+f"(d[10]),"+f"(d[11]),"+f"(d[12]),"+f"(d[13]),"+f"(d[14]),"+f"(d[15]),
          "+f"(d[16]),"+f"(d[17]),"+f"(d[18]),"+f"(d[19]),"+f"(d[20]),"+f"(d[21]),"+f"(d[22]),"+f"(d[23]),"+f"(d[24]),"+f"(d[25]),"+f"(d[26]),"+f"(d[27]),"+f"(d[28]),"+f"(d[29]),"+f"(d[30]),"+f"(d[31])
        : "r"(a[0]),"r"(a[1]),"r"(a[2]),"r"(a[3]), "l"(b), "r"(0));
}

__device__ __forceinline__ void wg128t(float* d, const unsigned* a, uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]),"+f"(d[1]),"+f"(d[2]),"+f"(d[3]),"+f"(d[4]),"+f"(d[5]),"+f"(d[6]),"+f"(d[7]),"+f"(d[8]),"+f"(d[9]),"+f"(d[10]),"+f"(d[11]),"+f"(d[12]),"+f"(d[13]),"+f"(d[14]),"+f"(d[15]),"+f"(d[16]),"+f"(d[17]),"+f"(d[18]),"+f"(d[19]),"+f"(d[20]),"+f"(d[21]),"+f"(d[22]),"+f"(d[23]),"+f"(d[24]),"+f"(d[25]),"+f"(d[26]),"+f"(d[27]),"+f"(d[28]),"+f"(d[29]),"+f"(d[30]),"+f"(d[31]),"+f"(d[32]),"+f"(d[33]),"+f"(d[34]),"+f"(d[35]),"+f"(d[36]),"+f"(d[37]),"+f"(d[38]),"+f"(d[39]),"+f"(d[40]),"+f"(d[41]),"+f"(d[42]),"+f"(d[43]),"+f"(d[44]),"+f"(d[45]),"+f"(d[46]),"+f"(d[47]),"+f"(d[48]),"+f"(d[49]),"+f"(d[50]),"+f"(d[51]),"+f"(d[52]),"+f"(d[53]),"+f"(d[54]),"+f"(d[55]),"+f"(d[56]),"+f"(d[57]),"+f"(d[58]),"+f"(d[59]),"+f"(d[60]),"+f"(d[61]),"+f"(d[62]),"+f"(d[63])
        : "r"(a[0]),"r"(a[1]),"r"(a[2]),"r"(a[3]), "l"(b), "r"(0));
}

// A: 64 x 16 row-major. Bsrc: the logical B as [n][k] for modes 0-1 (64 x 64: n keys, k dims)
// and as [k][n] for modes 2-5 (16 keys x 128 dims). out: 64 x 128 (modes 2-5 use two n64 halves).
__global__ void probe(const unsigned short* A, const unsigned short* Bsrc, float* out, int mode) {
    __shared__ __align__(1024) unsigned char sb[16384];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gr = lane / 4, tq = lane % 4;
    for (int i = tid; i < 16384 / 2; i += 128) reinterpret_cast<unsigned short*>(sb)[i] = 0;
    __syncthreads();
    const unsigned colblock = mode >= 4 ? 8192 : 2048;
    if (mode < 2) {
        for (int i = tid; i < 64 * 64; i += 128) {
            const int n = i / 64, k = i % 64;
            *reinterpret_cast<unsigned short*>(sb + swz(n, k / 8) + (k % 8) * 2) = Bsrc[n * 64 + k];
        }
    } else {
        for (int i = tid; i < 16 * 128; i += 128) {
            const int k = i / 128, n = i % 128;
            *reinterpret_cast<unsigned short*>(sb + (n / 64) * colblock + swz(k, (n % 64) / 8) + (n % 8) * 2) = Bsrc[k * 128 + n];
        }
    }
    asm volatile("fence.proxy.async.shared::cta;");
    __syncthreads();
    unsigned a[4];
    const int r0 = warp * 16 + gr;
    auto pk = [&](int r, int c) { return (unsigned)A[r * 16 + c] | ((unsigned)A[r * 16 + c + 1] << 16); };
    a[0] = pk(r0, 2 * tq); a[1] = pk(r0 + 8, 2 * tq); a[2] = pk(r0, 2 * tq + 8); a[3] = pk(r0 + 8, 2 * tq + 8);
    const unsigned base = (unsigned)__cvta_generic_to_shared(sb);
    if (mode < 2) {
        float d[32];
        for (int i = 0; i < 32; i++) d[i] = 0.f;
        const uint64_t b = desc(base + (mode == 0 ? 32 : 96), 16, 1024);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        wg64(d, a, b);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        for (int t = 0; t < 8; t++) {
            const int c = 8 * t + 2 * tq;
            out[r0 * 128 + c] = d[4 * t]; out[r0 * 128 + c + 1] = d[4 * t + 1];
            out[(r0 + 8) * 128 + c] = d[4 * t + 2]; out[(r0 + 8) * 128 + c + 1] = d[4 * t + 3];
        }
    } else {
        // One m64n128k16 over both column blocks: the descriptor's MN-direction step decides.
        float d[64];
        for (int i = 0; i < 64; i++) d[i] = 0.f;
        const unsigned lbo = (mode == 2 || mode == 4) ? colblock : 1024, sbo = (mode == 2 || mode == 4) ? 1024 : colblock;
        const uint64_t b = desc(base, lbo, sbo);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        wg128t(d, a, b);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        for (int t = 0; t < 16; t++) {
            const int c = 8 * t + 2 * tq;
            out[r0 * 128 + c] = d[4 * t]; out[r0 * 128 + c + 1] = d[4 * t + 1];
            out[(r0 + 8) * 128 + c] = d[4 * t + 2]; out[(r0 + 8) * 128 + c + 1] = d[4 * t + 3];
        }
    }
}

static unsigned short bf(float f) { unsigned u; memcpy(&u, &f, 4); return (unsigned short)((u + 0x7fff + ((u >> 16) & 1)) >> 16); }
static float fb(unsigned short b) { unsigned u = (unsigned)b << 16; float f; memcpy(&f, &u, 4); return f; }

int main(int argc, char** argv) {
    const int mode = argc > 1 ? atoi(argv[1]) : 0;
    static unsigned short hA[64 * 16], hB[64 * 128];
    srand(7);
    for (int i = 0; i < 64 * 16; i++) hA[i] = bf((rand() % 17 - 8) / 4.f);
    for (int i = 0; i < 64 * 128; i++) hB[i] = bf((rand() % 17 - 8) / 4.f);
    static float ref[64 * 128], got[64 * 128];
    const int kofs = mode == 0 ? 16 : 48;  // modes 0-1: the k16 step at byte offset 32 / 96
    for (int m = 0; m < 64; m++) for (int n = 0; n < 128; n++) {
        double s = 0;
        for (int k = 0; k < 16; k++) {
            if (mode < 2) s += n < 64 ? (double)fb(hA[m * 16 + k]) * fb(hB[n * 64 + kofs + k]) : 0.0;
            else s += (double)fb(hA[m * 16 + k]) * fb(hB[k * 128 + n]);
        }
        ref[m * 128 + n] = (float)s;
    }
    unsigned short *dA, *dB; float* dO;
    cudaMalloc(&dA, sizeof hA); cudaMalloc(&dB, sizeof hB); cudaMalloc(&dO, sizeof got);
    cudaMemcpy(dA, hA, sizeof hA, cudaMemcpyHostToDevice); cudaMemcpy(dB, hB, sizeof hB, cudaMemcpyHostToDevice);
    cudaMemset(dO, 0, sizeof got);
    probe<<<1, 128>>>(dA, dB, dO, mode);
    cudaError_t e = cudaDeviceSynchronize();
    cudaMemcpy(got, dO, sizeof got, cudaMemcpyDeviceToHost);
    double err = 0;
    for (int i = 0; i < 64 * 128; i++) if (mode >= 2 || i % 128 < 64) err = fmax(err, fabs(got[i] - ref[i]));
    printf("mode %d: %s, max err %g\n", mode, cudaGetErrorString(e), err);
    return 0;
}
