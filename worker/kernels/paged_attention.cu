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

__device__ __forceinline__ void unpack8(const uint4& raw, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 x = __bfloat1622float2(h[i]);
        f[2 * i] = x.x;
        f[2 * i + 1] = x.y;
    }
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

    // Slot of this lane's key in the first tile; each iteration looks up the next tile's slot
    // while its own loads are in flight.
    auto slot_of = [&](int t) -> unsigned long long {
        return t < ctx ? (unsigned long long)table[t / block_size] * block_size + t % block_size : 0ull;
    };
    unsigned long long slot = slot_of(warp * 32 + lane);
    for (int t0 = warp * 32; t0 < ctx; t0 += WARPS * 32) {
        const bool valid = t0 + lane < ctx;
        const int n_valid = min(32, ctx - t0);
        // Issue every load of the tile first: this lane's key row, then the V rows the lane
        // reads in PV (lanes past the end read key t0's row with probability 0).
        uint4 kraw[CH];
        {
            const __nv_bfloat16* krow = kc + slot * kvd + (size_t)kvh * HD;
#pragma unroll
            for (int cc = 0; cc < CH; ++cc) kraw[cc] = *reinterpret_cast<const uint4*>(krow + cc * 8);
        }
        uint4 vraw[CH];
#pragma unroll
        for (int it = 0; it < CH; ++it) {
            const int src = it * KPI + kg;
            const unsigned long long vs = __shfl_sync(FULL, slot, src < n_valid ? src : 0);
            vraw[it] = *reinterpret_cast<const uint4*>(vc + vs * kvd + (size_t)kvh * HD + c * 8);
        }
        slot = slot_of(t0 + WARPS * 32 + lane);

        float sc[MAX_G];
#pragma unroll
        for (int h = 0; h < MAX_G; ++h) sc[h] = 0.f;
#pragma unroll
        for (int cc = 0; cc < CH; ++cc) {
            float k8[8];
            unpack8(kraw[cc], k8);
#pragma unroll
            for (int h = 0; h < MAX_G; ++h) {
                if (h < g) {
                    const float4 a = qs4[(h * HD + cc * 8) / 4];
                    const float4 b = qs4[(h * HD + cc * 8) / 4 + 1];
                    sc[h] += k8[0] * a.x + k8[1] * a.y + k8[2] * a.z + k8[3] * a.w + k8[4] * b.x +
                             k8[5] * b.y + k8[6] * b.z + k8[7] * b.w;
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
        // PV: iteration `it` covers keys it*KPI .. it*KPI+KPI-1, one per lane group.
#pragma unroll
        for (int it = 0; it < CH; ++it) {
            const int src = it * KPI + kg;
            float pk[MAX_G];
#pragma unroll
            for (int h = 0; h < MAX_G; ++h) pk[h] = __shfl_sync(FULL, sc[h], src);
            float v8[8];
            unpack8(vraw[it], v8);
#pragma unroll
            for (int h = 0; h < MAX_G; ++h) {
                if (h < g) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[h][j] += pk[h] * v8[j];
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

// MINB: blocks per SM the registers must allow (3 keeps hd <= 64 spill-free at 12 warps/SM).
#define PAGED_ATTENTION_ENTRY(NAME, HD, MINB)                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS, MINB) NAME(                             \
        const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kc,                \
        const __nv_bfloat16* __restrict__ vc, const uint32_t* __restrict__ tables,                \
        const uint32_t* __restrict__ table_rows, const uint32_t* __restrict__ ctx_lens,           \
        __nv_bfloat16* __restrict__ out, int nh, int nkv, int block_size, int max_blocks,         \
        float scale) {                                                                            \
        paged_attention<HD>(q, kc, vc, tables, table_rows, ctx_lens, out, nh, nkv, block_size,    \
                            max_blocks, scale);                                                   \
    }

PAGED_ATTENTION_ENTRY(paged_attention_bf16_hd16, 16, 3)
PAGED_ATTENTION_ENTRY(paged_attention_bf16_hd32, 32, 3)
PAGED_ATTENTION_ENTRY(paged_attention_bf16_hd64, 64, 3)
PAGED_ATTENTION_ENTRY(paged_attention_bf16_hd64_occ2, 64, 2)
PAGED_ATTENTION_ENTRY(paged_attention_bf16_hd128, 128, 1)
PAGED_ATTENTION_ENTRY(paged_attention_bf16_hd256, 256, 1)

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

// After the QKV projection: adds the bias (if any), applies rotate-half RoPE at each token's
// position to the query and key heads, writes the rotated queries to q_out and the keys and
// values straight into their cache slots. One thread per (token, head, i < hd/2) pair.
// qkv: [n, (nh + 2 nkv) * hd]; bias: [(nh + 2 nkv) * hd] or null; pos, slots: [n];
// cos, sin: [max_len, hd/2] f32; q_out: [n, nh, hd]; kc, vc: [slots, nkv * hd].
extern "C" __global__ void rope_qkv_cache_bf16(
    const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ bias,
    const uint32_t* __restrict__ pos, const float* __restrict__ cos_t,
    const float* __restrict__ sin_t, __nv_bfloat16* __restrict__ q_out,
    __nv_bfloat16* __restrict__ kc, __nv_bfloat16* __restrict__ vc,
    const uint32_t* __restrict__ slots, int n, int nh, int nkv, int hd) {
    const int half = hd / 2;
    const int heads = nh + 2 * nkv;
    const size_t total = (size_t)n * heads * half;
    const size_t kvd = (size_t)nkv * hd;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const int hh = (int)((idx / half) % heads);
        const size_t t = idx / ((size_t)half * heads);
        const size_t base = t * heads * hd + (size_t)hh * hd;
        float x1 = __bfloat162float(qkv[base + i]);
        float x2 = __bfloat162float(qkv[base + i + half]);
        if (bias != nullptr) {
            // Round after the bias add, as the separate bias add would.
            x1 = __bfloat162float(__float2bfloat16(x1 + __bfloat162float(bias[hh * hd + i])));
            x2 = __bfloat162float(__float2bfloat16(x2 + __bfloat162float(bias[hh * hd + i + half])));
        }
        if (hh < nh + nkv) {
            const size_t p = (size_t)pos[t] * half + i;
            const float c = cos_t[p], s = sin_t[p];
            const float y1 = x1 * c - x2 * s;
            const float y2 = x2 * c + x1 * s;
            __nv_bfloat16* dst = hh < nh ? q_out + (t * nh + hh) * hd
                                         : kc + (size_t)slots[t] * kvd + (size_t)(hh - nh) * hd;
            dst[i] = __float2bfloat16(y1);
            dst[i + half] = __float2bfloat16(y2);
        } else {
            __nv_bfloat16* dst = vc + (size_t)slots[t] * kvd + (size_t)(hh - nh - nkv) * hd;
            dst[i] = __float2bfloat16(x1);
            dst[i + half] = __float2bfloat16(x2);
        }
    }
}

#define NORM_THREADS 128

// Residual add + RMSNorm: out[0] = x + r (rounded to bf16), out[1] = RMSNorm(out[0]) * w.
// x, r: [n, h]; w: [h]; out: [2, n, h]. One block per row; f32 statistics.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    add_rms_norm_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ r,
                      const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ out, int n,
                      int h, float eps) {
    const size_t row = blockIdx.x;
    const __nv_bfloat16* xr = x + row * h;
    const __nv_bfloat16* rr = r + row * h;
    __nv_bfloat16* sum_out = out + row * h;
    __nv_bfloat16* norm_out = out + ((size_t)n + row) * h;
    float ss = 0.f;
    for (int c = threadIdx.x; c < h; c += NORM_THREADS) {
        const __nv_bfloat16 v = __float2bfloat16(__bfloat162float(xr[c]) + __bfloat162float(rr[c]));
        sum_out[c] = v;
        const float f = __bfloat162float(v);
        ss += f * f;
    }
    ss = warp_sum(ss);
    __shared__ float part[NORM_THREADS / 32];
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
    __syncthreads();
    float tot = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_THREADS / 32; ++i) tot += part[i];
    const float rs = rsqrtf(tot / h + eps);
    for (int c = threadIdx.x; c < h; c += NORM_THREADS) {
        const float f = __bfloat162float(sum_out[c]);
        norm_out[c] = __float2bfloat16(f * rs * __bfloat162float(w[c]));
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
