// Layout probe for wgmma (sm_90a): which descriptor fields read a no-swizzle smem tile.
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cmath>
#include <cstring>

__device__ __forceinline__ uint64_t desc(const void* p, unsigned lbo, unsigned sbo) {
    uint64_t a = (uint64_t)(__cvta_generic_to_shared(p)) >> 4;
    return (a & 0x3fff) | ((uint64_t)((lbo >> 4) & 0x3fff) << 16) | ((uint64_t)((sbo >> 4) & 0x3fff) << 32);
}

template <int TB>
__device__ __forceinline__ void wgmma64(float* d, const unsigned* a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
        "{%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]),"+f"(d[1]),"+f"(d[2]),"+f"(d[3]),"+f"(d[4]),"+f"(d[5]),"+f"(d[6]),"+f"(d[7]),
          "+f"(d[8]),"+f"(d[9]),"+f"(d[10]),"+f"(d[11]),"+f"(d[12]),"+f"(d[13]),"+f"(d[14]),"+f"(d[15]),
          "+f"(d[16]),"+f"(d[17]),"+f"(d[18]),"+f"(d[19]),"+f"(d[20]),"+f"(d[21]),"+f"(d[22]),"+f"(d[23]),
          "+f"(d[24]),"+f"(d[25]),"+f"(d[26]),"+f"(d[27]),"+f"(d[28]),"+f"(d[29]),"+f"(d[30]),"+f"(d[31])
        : "r"(a[0]),"r"(a[1]),"r"(a[2]),"r"(a[3]), "l"(b), "r"(0), "n"(TB));
}

// A: 64 x 16 (row-major, bf16 bits), B logical 16 (k) x 64 (n) given as bt[n][k] (n-major rows).
// mode 0/1: B stored K-major (rows n, k contiguous) in core matrices, lbo/sbo hypothesis.
// mode 2/3: B stored MN-major (rows k, n contiguous) with trans-b, lbo/sbo hypothesis.
__global__ void probe(const unsigned short* A, const unsigned short* BT, float* out, int mode) {
    __shared__ __align__(1024) unsigned short sb[16 * 64];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gr = lane / 4, tq = lane % 4;
    // Fill smem.
    for (int i = tid; i < 16 * 64; i += 128) {
        const int n = i / 16, k = i % 16;  // element (k, n) = BT[n][k]
        int off;  // in elements
        if (mode < 2) off = ((n / 8) * 2 + (k / 8)) * 64 + (n % 8) * 8 + (k % 8);        // K-major: core (n8,k8), k8 stride 128 B, n8 stride 256 B
        else off = ((k / 8) * 8 + (n / 8)) * 64 + (k % 8) * 8 + (n % 8);                   // MN-major: core (k8,n8), n8 stride 128 B, k8 stride 1024 B
        sb[off] = BT[n * 16 + k];
    }
    asm volatile("fence.proxy.async.shared::cta;");
    __syncthreads();
    unsigned a[4];
    const int r0 = warp * 16 + gr;
    auto pk = [&](int r, int c) { return (unsigned)A[r * 16 + c] | ((unsigned)A[r * 16 + c + 1] << 16); };
    a[0] = pk(r0, 2 * tq); a[1] = pk(r0 + 8, 2 * tq); a[2] = pk(r0, 2 * tq + 8); a[3] = pk(r0 + 8, 2 * tq + 8);
    float d[32];
    for (int i = 0; i < 32; i++) d[i] = 0.f;
    uint64_t b;
    if (mode == 0) b = desc(sb, 128, 256);
    else if (mode == 1) b = desc(sb, 256, 128);
    else if (mode == 2) b = desc(sb, 128, 1024);
    else b = desc(sb, 1024, 128);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    if (mode < 2) wgmma64<0>(d, a, b); else wgmma64<1>(d, a, b);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    for (int t = 0; t < 8; t++) {
        out[r0 * 64 + 8 * t + 2 * tq] = d[4 * t];
        out[r0 * 64 + 8 * t + 2 * tq + 1] = d[4 * t + 1];
        out[(r0 + 8) * 64 + 8 * t + 2 * tq] = d[4 * t + 2];
        out[(r0 + 8) * 64 + 8 * t + 2 * tq + 1] = d[4 * t + 3];
    }
}

static unsigned short bf(float f) { unsigned u; memcpy(&u, &f, 4); return (unsigned short)((u + 0x7fff + ((u >> 16) & 1)) >> 16); }
static float fb(unsigned short b) { unsigned u = (unsigned)b << 16; float f; memcpy(&f, &u, 4); return f; }

int main(int argc, char** argv) {
    const int only = argc > 1 ? atoi(argv[1]) : -1;
    unsigned short hA[64 * 16], hB[64 * 16];
    srand(1);
    for (int i = 0; i < 64 * 16; i++) { hA[i] = bf((rand() % 17 - 8) / 4.f); hB[i] = bf((rand() % 17 - 8) / 4.f); }
    float ref[64 * 64];
    for (int m = 0; m < 64; m++) for (int n = 0; n < 64; n++) { double s = 0; for (int k = 0; k < 16; k++) s += (double)fb(hA[m * 16 + k]) * fb(hB[n * 16 + k]); ref[m * 64 + n] = (float)s; }
    unsigned short *dA, *dB; float* dO;
    cudaMalloc(&dA, sizeof hA); cudaMalloc(&dB, sizeof hB); cudaMalloc(&dO, 64 * 64 * 4);
    cudaMemcpy(dA, hA, sizeof hA, cudaMemcpyHostToDevice); cudaMemcpy(dB, hB, sizeof hB, cudaMemcpyHostToDevice);
    for (int mode = 0; mode < 4; mode++) {
        if (only >= 0 && mode != only) continue;
        cudaMemset(dO, 0, 64 * 64 * 4);
        probe<<<1, 128>>>(dA, dB, dO, mode);
        cudaError_t e = cudaDeviceSynchronize();
        float o[64 * 64]; cudaMemcpy(o, dO, sizeof o, cudaMemcpyDeviceToHost);
        double err = 0; for (int i = 0; i < 64 * 64; i++) err = fmax(err, fabs(o[i] - ref[i]));
        printf("mode %d (%s, lbo %s): %s max err %g\n", mode, mode < 2 ? "K-major" : "MN-major+trans", (mode % 2 == 0) ? "small" : "large", cudaGetErrorString(e), err);
    }
    return 0;
}
