// Paged-attention decode for sluice's engine (built to PTX by worker/build.rs with the `cuda`
// feature; launched from worker/src/engine/cuda_ops.rs). One thread block per (KV head,
// sequence): the block reads its sequence's keys and values once, straight from the paged
// cache through the block table, for all the query heads that share the KV head (GQA), with an
// online softmax over tiles of 128 keys. bf16 in and out, f32 arithmetic.
#include <cuda_bf16.h>
#include <stdint.h>

#define THREADS 128   // threads per block = keys per tile
#define WARPS (THREADS / 32)
#define MAX_G 8       // query heads per KV head
#define MAX_GHD 1024  // g * head_dim
#define MAX_IPL 4     // (g * head_dim / 8) items per lane: MAX_GHD / 8 / 32

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* f) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 x = __bfloat1622float2(h[i]);
        f[2 * i] = x.x;
        f[2 * i + 1] = x.y;
    }
}

// q: [b, nh, hd]; kc, vc: [slots, nkv * hd]; tables: [b, max_blocks] block ids;
// ctx_lens: [b] keys per sequence (>= 1); out: [b, nh, hd].
// Requires nh % nkv == 0, nh / nkv <= MAX_G, (nh / nkv) * hd <= MAX_GHD, hd % 8 == 0.
// HD > 0 fixes head_dim at compile time (loops unroll, loads issue together); 0 = runtime.
template <int HD>
__device__ __forceinline__ void paged_decode(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kc,
    const __nv_bfloat16* __restrict__ vc, const uint32_t* __restrict__ tables,
    const uint32_t* __restrict__ ctx_lens, __nv_bfloat16* __restrict__ out, int nh, int nkv,
    int hd_arg, int block_size, int max_blocks, float scale) {
    const int hd = HD > 0 ? HD : hd_arg;
    const int kvh = blockIdx.x;
    const int s = blockIdx.y;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int g = nh / nkv;
    const int ghd = g * hd;
    const int chunks = hd / 8;      // 8-element chunks per head
    const int items = g * chunks;   // (query head, chunk) pairs
    const int ctx = (int)ctx_lens[s];
    const size_t kvd = (size_t)nkv * hd;

    __shared__ float qs[MAX_GHD];
    __shared__ float sc[MAX_G * THREADS];
    __shared__ size_t slot_s[THREADS];
    __shared__ float part[WARPS * MAX_GHD];
    __shared__ float m_s[MAX_G], l_s[MAX_G], a_s[MAX_G];

    for (int i = tid; i < ghd; i += THREADS) {
        const int qh = kvh * g + i / hd;
        qs[i] = __bfloat162float(q[((size_t)s * nh + qh) * hd + i % hd]) * scale;
    }
    if (tid < g) {
        m_s[tid] = -INFINITY;
        l_s[tid] = 0.f;
    }
    float acc[MAX_IPL][8];
#pragma unroll
    for (int k = 0; k < MAX_IPL; ++k)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[k][j] = 0.f;
    __syncthreads();

    const uint32_t* table = tables + (size_t)s * max_blocks;
    for (int t0 = 0; t0 < ctx; t0 += THREADS) {
        // 1. one key per thread: scores for every query head of this KV head.
        const int t = t0 + tid;
        float dot[MAX_G];
#pragma unroll
        for (int h = 0; h < MAX_G; ++h) dot[h] = 0.f;
        if (t < ctx) {
            const size_t slot = (size_t)table[t / block_size] * block_size + t % block_size;
            slot_s[tid] = slot;
            const __nv_bfloat16* krow = kc + slot * kvd + (size_t)kvh * hd;
#pragma unroll
            for (int c = 0; c < (HD > 0 ? HD / 8 : chunks); ++c) {
                float k8[8];
                load8(krow + c * 8, k8);
#pragma unroll
                for (int h = 0; h < MAX_G; ++h) {
                    if (h < g) {
                        const float* qq = qs + h * hd + c * 8;
#pragma unroll
                        for (int j = 0; j < 8; ++j) dot[h] += k8[j] * qq[j];
                    }
                }
            }
        }
#pragma unroll
        for (int h = 0; h < MAX_G; ++h)
            if (h < g) sc[h * THREADS + tid] = t < ctx ? dot[h] : -INFINITY;
        __syncthreads();

        // 2. online softmax per query head (one warp per head).
        for (int h = warp; h < g; h += WARPS) {
            float mx = -INFINITY;
            for (int i = lane; i < THREADS; i += 32) mx = fmaxf(mx, sc[h * THREADS + i]);
            mx = warp_max(mx);
            const float m_old = m_s[h];
            const float m_new = fmaxf(m_old, mx);  // finite: the tile has a key
            float sum = 0.f;
            for (int i = lane; i < THREADS; i += 32) {
                const float v = sc[h * THREADS + i];
                const float p = v == -INFINITY ? 0.f : __expf(v - m_new);
                sc[h * THREADS + i] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float a = m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
                a_s[h] = a;
                l_s[h] = l_s[h] * a + sum;
                m_s[h] = m_new;
            }
        }
        __syncthreads();

        // 3. P·V: warp w takes keys w, w + WARPS, ...; lane takes (head, chunk) items.
        const int n_valid = min(THREADS, ctx - t0);
#pragma unroll
        for (int k = 0; k < MAX_IPL; ++k) {
            const int item = lane + 32 * k;
            if (item < items) {
                const float a = a_s[item / chunks];
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[k][j] *= a;
            }
        }
#pragma unroll 4
        for (int i = warp; i < n_valid; i += WARPS) {
            const __nv_bfloat16* vrow = vc + slot_s[i] * kvd + (size_t)kvh * hd;
#pragma unroll
            for (int k = 0; k < MAX_IPL; ++k) {
                const int item = lane + 32 * k;
                if (item < items) {
                    const int h = item / chunks;
                    const int c = item % chunks;
                    const float p = sc[h * THREADS + i];
                    float v8[8];
                    load8(vrow + c * 8, v8);
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[k][j] += p * v8[j];
                }
            }
        }
        __syncthreads();  // sc and slot_s are rewritten by the next tile
    }

    // 4. sum the warps' partial outputs, normalise, write bf16.
#pragma unroll
    for (int k = 0; k < MAX_IPL; ++k) {
        const int item = lane + 32 * k;
        if (item < items) {
            const int h = item / chunks;
            const int c = item % chunks;
#pragma unroll
            for (int j = 0; j < 8; ++j) part[warp * MAX_GHD + h * hd + c * 8 + j] = acc[k][j];
        }
    }
    __syncthreads();
    for (int i = tid; i < ghd; i += THREADS) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) v += part[w * MAX_GHD + i];
        const int h = i / hd;
        const int qh = kvh * g + h;
        out[((size_t)s * nh + qh) * hd + i % hd] = __float2bfloat16(v / l_s[h]);
    }
}

#define PAGED_DECODE_ENTRY(name, HD)                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) name(                                 \
        const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kc,              \
        const __nv_bfloat16* __restrict__ vc, const uint32_t* __restrict__ tables,              \
        const uint32_t* __restrict__ ctx_lens, __nv_bfloat16* __restrict__ out, int nh,         \
        int nkv, int hd, int block_size, int max_blocks, float scale) {                         \
        paged_decode<HD>(q, kc, vc, tables, ctx_lens, out, nh, nkv, hd, block_size, max_blocks, \
                         scale);                                                                \
    }

PAGED_DECODE_ENTRY(paged_decode_bf16, 0)
PAGED_DECODE_ENTRY(paged_decode_bf16_hd64, 64)
PAGED_DECODE_ENTRY(paged_decode_bf16_hd128, 128)

// Writes the new tokens' keys (or values) into the paged cache: src [n, kvd] -> cache rows
// slots[t]. One thread per 8 elements (16-byte copies), grid-stride. kvd % 8 == 0.
extern "C" __global__ void write_kv_bf16(const __nv_bfloat16* __restrict__ src,
                                         __nv_bfloat16* __restrict__ cache,
                                         const uint32_t* __restrict__ slots, int n, int kvd) {
    const int chunks = kvd / 8;
    const size_t total = (size_t)n * chunks;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / chunks;
        const size_t c = i % chunks;
        const size_t dst = (size_t)slots[t] * kvd + c * 8;
        *reinterpret_cast<uint4*>(cache + dst) =
            *reinterpret_cast<const uint4*>(src + t * kvd + c * 8);
    }
}
