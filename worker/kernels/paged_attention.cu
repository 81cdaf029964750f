// The engine's own CUDA kernels (built to PTX by worker/build.rs with the `cuda` feature;
// launched from worker/src/engine/cuda_ops.rs): paged attention for every new token of a step
// (decode tokens and prefill chunks alike, each query over its own causal context), the KV
// write, and the greedy argmax over vocabulary rows. bf16 in and out, f32 arithmetic.
#include <cuda_bf16.h>
#include <stdint.h>

#define THREADS 128  // threads per attention block
#define WARPS (THREADS / 32)
#define MAX_G 8      // query heads per KV head
#define FULL 0xffffffffu

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
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

// One thread block per (query token, KV head); grid (n, nkv). The block's 4 warps split the
// query's keys (warp w takes keys w*32.., then every 128th tile) and run independently, each
// with its own online softmax, so no block-wide barrier sits in the key loop; the warps'
// partial results are merged once at the end.
//  * QK: lane = key; the lane reads its key row (16-byte loads) and dots it with the g query
//    heads of this KV head (q, pre-scaled, in shared memory).
//  * PV: lanes form groups of HD/8 lanes per key, one 8-element chunk of V each; probabilities
//    and slots are passed by shuffles.
// q: [n, nh, HD]; kc, vc: [slots, nkv * HD]; tables: [rows, max_blocks] block ids;
// table_rows: [n] row of `tables` for each query; ctx_lens: [n] keys each query attends to
// (>= 1; the first ctx_lens[s] positions of its sequence); out: [n, nh, HD].
// Requires nh % nkv == 0 and nh / nkv <= MAX_G.
template <int HD>
__device__ __forceinline__ void paged_attention(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kc,
    const __nv_bfloat16* __restrict__ vc, const uint32_t* __restrict__ tables,
    const uint32_t* __restrict__ table_rows, const uint32_t* __restrict__ ctx_lens,
    __nv_bfloat16* __restrict__ out, int nh, int nkv, int block_size, int max_blocks,
    float scale) {
    constexpr int CH = HD / 8;    // 16-byte chunks per head row
    constexpr int KPI = 32 / CH;  // keys per PV iteration (CH lanes per key)
    const int s = blockIdx.x;
    const int kvh = blockIdx.y;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = nh / nkv;
    const int ctx = (int)ctx_lens[s];
    const size_t kvd = (size_t)nkv * HD;
    const uint32_t* table = tables + (size_t)table_rows[s] * max_blocks;

    __shared__ __align__(16) float qs[MAX_G * HD];
    __shared__ float red_m[WARPS][MAX_G];
    __shared__ float red_l[WARPS][MAX_G];
    __shared__ float red_acc[WARPS][MAX_G * HD];

    for (int i = threadIdx.x; i < g * HD; i += THREADS) {
        const int qh = kvh * g + i / HD;
        qs[i] = __bfloat162float(q[((size_t)s * nh + qh) * HD + i % HD]) * scale;
    }
    __syncthreads();
    const float4* qs4 = reinterpret_cast<const float4*>(qs);

    float m[MAX_G], l[MAX_G], acc[MAX_G][8];
#pragma unroll
    for (int h = 0; h < MAX_G; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[h][j] = 0.f;
    }
    const int kg = lane / CH;  // key group in PV
    const int c = lane % CH;   // chunk in PV

    for (int t0 = warp * 32; t0 < ctx; t0 += WARPS * 32) {
        const int t = t0 + lane;
        const bool valid = t < ctx;
        unsigned long long slot = 0;
        float sc[MAX_G];
#pragma unroll
        for (int h = 0; h < MAX_G; ++h) sc[h] = 0.f;
        if (valid) {
            slot = (unsigned long long)table[t / block_size] * block_size + t % block_size;
            const __nv_bfloat16* krow = kc + slot * kvd + (size_t)kvh * HD;
            constexpr int NB = CH < 8 ? CH : 8;  // chunks loaded together (bounds registers)
#pragma unroll
            for (int c0 = 0; c0 < CH; c0 += NB) {
                float k8[NB][8];
#pragma unroll
                for (int cc = 0; cc < NB; ++cc) load8(krow + (c0 + cc) * 8, k8[cc]);
#pragma unroll
                for (int cc = 0; cc < NB; ++cc) {
#pragma unroll
                    for (int h = 0; h < MAX_G; ++h) {
                        if (h < g) {
                            const float4 a = qs4[(h * HD + (c0 + cc) * 8) / 4];
                            const float4 b = qs4[(h * HD + (c0 + cc) * 8) / 4 + 1];
                            sc[h] += k8[cc][0] * a.x + k8[cc][1] * a.y + k8[cc][2] * a.z +
                                     k8[cc][3] * a.w + k8[cc][4] * b.x + k8[cc][5] * b.y +
                                     k8[cc][6] * b.z + k8[cc][7] * b.w;
                        }
                    }
                }
            }
        }
        // Online softmax of this tile, per head (lane 0's key always exists: t0 < ctx).
#pragma unroll
        for (int h = 0; h < MAX_G; ++h) {
            if (h < g) {
                const float mx = warp_max(valid ? sc[h] : -INFINITY);
                const float m_new = fmaxf(m[h], mx);
                const float p = valid ? __expf(sc[h] - m_new) : 0.f;
                const float alpha = __expf(m[h] - m_new);  // 0 on the first tile
                l[h] = l[h] * alpha + warp_sum(p);
                m[h] = m_new;
                sc[h] = p;
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[h][j] *= alpha;
            }
        }
        // PV over the tile's keys, KPI at a time.
        const int n_valid = min(32, ctx - t0);
#pragma unroll
        for (int kk = 0; kk < 32; kk += KPI) {
            if (kk >= n_valid) break;  // warp-uniform
            const int src = kk + kg;
            const unsigned long long vslot = __shfl_sync(FULL, slot, src);
            float pk[MAX_G];
#pragma unroll
            for (int h = 0; h < MAX_G; ++h) pk[h] = __shfl_sync(FULL, sc[h], src);
            if (src < n_valid) {
                float v8[8];
                load8(vc + vslot * kvd + (size_t)kvh * HD + c * 8, v8);
#pragma unroll
                for (int h = 0; h < MAX_G; ++h) {
                    if (h < g) {
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[h][j] += pk[h] * v8[j];
                    }
                }
            }
        }
    }

    // Sum the key groups of the warp, then merge the warps.
#pragma unroll
    for (int o = CH; o < 32; o <<= 1) {
#pragma unroll
        for (int h = 0; h < MAX_G; ++h)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[h][j] += __shfl_xor_sync(FULL, acc[h][j], o);
    }
    if (kg == 0) {
#pragma unroll
        for (int h = 0; h < MAX_G; ++h) {
            if (h < g) {
#pragma unroll
                for (int j = 0; j < 8; ++j) red_acc[warp][h * HD + c * 8 + j] = acc[h][j];
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < MAX_G; ++h) {
            red_m[warp][h] = m[h];
            red_l[warp][h] = l[h];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < g * HD; i += THREADS) {
        const int h = i / HD;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, red_m[w][h]);
        float num = 0.f, den = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float e = red_m[w][h] == -INFINITY ? 0.f : __expf(red_m[w][h] - mx);
            num += e * red_acc[w][i];
            den += e * red_l[w][h];
        }
        out[((size_t)s * nh + kvh * g + h) * HD + i % HD] = __float2bfloat16(num / den);
    }
}

#define PAGED_ATTENTION_ENTRY(HD)                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) paged_attention_bf16_hd##HD(           \
        const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kc,                \
        const __nv_bfloat16* __restrict__ vc, const uint32_t* __restrict__ tables,                \
        const uint32_t* __restrict__ table_rows, const uint32_t* __restrict__ ctx_lens,           \
        __nv_bfloat16* __restrict__ out, int nh, int nkv, int block_size, int max_blocks,         \
        float scale) {                                                                            \
        paged_attention<HD>(q, kc, vc, tables, table_rows, ctx_lens, out, nh, nkv, block_size,    \
                            max_blocks, scale);                                                   \
    }

PAGED_ATTENTION_ENTRY(16)
PAGED_ATTENTION_ENTRY(32)
PAGED_ATTENTION_ENTRY(64)
PAGED_ATTENTION_ENTRY(128)
PAGED_ATTENTION_ENTRY(256)

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

// SwiGLU: out[r, c] = silu(x[r, c]) * x[r, inter + c] for x [n, 2 * inter] -> out [n, inter].
// One thread per 8 outputs (16-byte loads and stores), grid-stride. inter % 8 == 0.
extern "C" __global__ void silu_mul_bf16(const __nv_bfloat16* __restrict__ x,
                                         __nv_bfloat16* __restrict__ out, int n, int inter) {
    const int chunks = inter / 8;
    const size_t total = (size_t)n * chunks;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / chunks;
        const size_t c = (i % chunks) * 8;
        float g[8], u[8];
        load8(x + r * 2 * inter + c, g);
        load8(x + r * 2 * inter + inter + c, u);
        uint4 raw;
        __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float a = g[2 * j] / (1.f + __expf(-g[2 * j])) * u[2 * j];
            const float b = g[2 * j + 1] / (1.f + __expf(-g[2 * j + 1])) * u[2 * j + 1];
            o[j] = __floats2bfloat162_rn(a, b);
        }
        *reinterpret_cast<uint4*>(out + r * inter + c) = raw;
    }
}

#define ARGMAX_THREADS 512

// Greedy sampling: out[r] = the first index of the largest value of row r of x [rows, cols]
// (bf16). One block per row; 16-byte loads when cols % 8 == 0 (rows then stay aligned).
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
    argmax_rows_bf16(const __nv_bfloat16* __restrict__ x, uint32_t* __restrict__ out, int cols) {
    const __nv_bfloat16* row = x + (size_t)blockIdx.x * cols;
    float best = -INFINITY;
    int idx = 0x7fffffff;
    if (cols % 8 == 0) {
        for (int c = threadIdx.x * 8; c < cols; c += ARGMAX_THREADS * 8) {
            float f[8];
            load8(row + c, f);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                if (f[j] > best) {  // strictly greater: the first index wins within a thread
                    best = f[j];
                    idx = c + j;
                }
            }
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += ARGMAX_THREADS) {
            const float f = __bfloat162float(row[c]);
            if (f > best) {
                best = f;
                idx = c;
            }
        }
    }
    // NaN-free rows assumed; a row of -inf keeps idx of its first element below.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(FULL, best, o);
        const int oi = __shfl_xor_sync(FULL, idx, o);
        if (ob > best || (ob == best && oi < idx)) {
            best = ob;
            idx = oi;
        }
    }
    __shared__ float bs[ARGMAX_THREADS / 32];
    __shared__ int bi[ARGMAX_THREADS / 32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        bs[warp] = best;
        bi[warp] = idx;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < ARGMAX_THREADS / 32; ++w) {
            if (bs[w] > best || (bs[w] == best && bi[w] < idx)) {
                best = bs[w];
                idx = bi[w];
            }
        }
        out[blockIdx.x] = idx == 0x7fffffff ? 0u : (uint32_t)idx;
    }
}
