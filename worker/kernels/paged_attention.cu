// The engine's own CUDA kernels (built to PTX by worker/build.rs with the `cuda` feature;
// launched from worker/src/engine/cuda_ops.rs): paged attention for every new token of a step
// (decode tokens and prefill chunks alike, each query over its own causal context), the fused
// QKV epilogue (bias + RoPE + KV write), residual add + RMSNorm, SwiGLU, projections of a few
// rows (with SwiGLU fused), and the greedy argmax
// over vocabulary rows, the resolution of placeholder token ids from the step in flight, and the
// per-row E4M3 quantization of FP8 projections' weights and activations.
// bf16 in and out, f32 arithmetic; the KV cache in bf16 or FP8 E4M3 at unit scale (every
// attention kernel reads both).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
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
    unpack8(*reinterpret_cast<const uint4*>(p), f);
}

// mma.sync m16n8k16 with f32 accumulators (the tensor-core kernels below): bf16 operands.
__device__ __forceinline__ void mma_bf16(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The same product with f16 operands (an E4M3 cache's fragments, widened exactly).
__device__ __forceinline__ void mma_f16(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_f16(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// A KV-cache element type: `Raw` holds 8 consecutive elements (one 16-byte chunk of bf16, 8
// bytes of E4M3), `unpack` widens them to f32 and `store2` rounds two f32 values into the cache
// (E4M3 saturates at +-448: the cache keeps values at unit scale, as vLLM's fp8 KV cache does
// without calibrated scales).
template <typename C>
struct KvElem;

template <>
struct KvElem<__nv_bfloat16> {
    using Raw = uint4;
    static __device__ __forceinline__ void unpack(const Raw& raw, float* f) { unpack8(raw, f); }
    // The 8 elements as the tensor-core kernels' fragment halves (bf16 here).
    static __device__ __forceinline__ uint4 frag8(const Raw& raw) { return raw; }
    // Two query (bf16x2) or probability values in the fragment type, and the mma of that type.
    static __device__ __forceinline__ uint32_t qword(uint32_t bf16x2) { return bf16x2; }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return pack_bf16(lo, hi); }
    static __device__ __forceinline__ void mma(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
        mma_bf16(d, a0, a1, a2, a3, b0, b1);
    }
    static __device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
        *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
    }
};

template <>
struct KvElem<__nv_fp8_storage_t> {
    using Raw = uint2;
    static __device__ __forceinline__ void unpack(const Raw& raw, float* f) {
        const __nv_fp8x2_storage_t* h = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 x = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(h[i], __NV_E4M3)));
            f[2 * i] = x.x;
            f[2 * i + 1] = x.y;
        }
    }
    // The tensor-core kernels multiply an E4M3 cache in f16: every E4M3 value is an f16 value,
    // so one cvt per pair makes the fragments exactly (bf16 fragments took three per pair);
    // queries are rounded from bf16 to f16 (more mantissa, saturated at +-65504) and
    // probabilities are packed as f16.
    static __device__ __forceinline__ uint4 frag8(const Raw& raw) {
        const __nv_fp8x2_storage_t* h = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
        uint32_t w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const __half2_raw x = __nv_cvt_fp8x2_to_halfraw2(h[i], __NV_E4M3);
            w[i] = (uint32_t)x.x | ((uint32_t)x.y << 16);
        }
        return make_uint4(w[0], w[1], w[2], w[3]);
    }
    // Saturated at the f16 range (a query beyond +-65504 would otherwise become inf).
    static __device__ __forceinline__ uint32_t qword(uint32_t bf16x2) {
        const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bf16x2));
        return pack_f16(fminf(fmaxf(f.x, -65504.f), 65504.f), fminf(fmaxf(f.y, -65504.f), 65504.f));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return pack_f16(lo, hi); }
    static __device__ __forceinline__ void mma(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
        mma_f16(d, a0, a1, a2, a3, b0, b1);
    }
    static __device__ __forceinline__ void store2(__nv_fp8_storage_t* p, float a, float b) {
        *reinterpret_cast<__nv_fp8x2_storage_t*>(p) = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
    }
};

// The paged caches' layout: [blocks][nkv][block_size][HD] elements, so the keys of one block
// and KV head are contiguous (block_size * HD: 2 KiB for 16 E4M3 keys of head_dim 128, where
// a [slot][nkv][HD] layout spread them as 128-byte rows 1 KiB apart). The row of position `r`
// of block `block` for KV head `kvh` starts at element kv_row(..) * HD; the caller of each
// kernel keeps blocks * nkv * block_size within u32.
__device__ __forceinline__ uint32_t kv_row(uint32_t block, int kvh, int nkv, int block_size, int r) {
    return (block * (uint32_t)nkv + (uint32_t)kvh) * (uint32_t)block_size + (uint32_t)r;
}

// One thread block per (query token, KV head); grid (n, nkv). The block's 4 warps split the
// query's keys (warp w takes keys w*32.., then every 128th tile) and run independently, each
// with its own online softmax, so no block-wide barrier sits in the key loop; the warps'
// partial results are merged once at the end.
//  * QK: lane = key; the lane reads its key row (16-byte loads) and dots it with the g query
//    heads of this KV head (q, pre-scaled, in shared memory).
//  * PV: lanes form groups of HD/8 lanes per key, one 8-element chunk of V each; probabilities
//    and cache rows are passed by shuffles.
// q: [n, nh, HD]; kc, vc: the paged caches (kv_row's layout); tables: [rows, max_blocks] block ids;
// table_rows: [n] row of `tables` for each query; ctx_lens: [n] keys each query attends to
// (>= 1; the first ctx_lens[s] positions of its sequence); out: [n, nh, HD].
// Requires nh % nkv == 0 and nh / nkv <= MAX_G.
template <int HD, typename C>
__device__ __forceinline__ void paged_attention(
    const __nv_bfloat16* __restrict__ q, const C* __restrict__ kc,
    const C* __restrict__ vc, const uint32_t* __restrict__ tables,
    const uint32_t* __restrict__ table_rows, const uint32_t* __restrict__ ctx_lens,
    __nv_bfloat16* __restrict__ out, int nh, int nkv, int block_size, int max_blocks,
    float scale) {
    using Raw = typename KvElem<C>::Raw;
    constexpr int CH = HD / 8;    // 8-element chunks per head row
    constexpr int KPI = 32 / CH;  // keys per PV iteration (CH lanes per key)
    const int s = blockIdx.x;
    const int kvh = blockIdx.y;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = nh / nkv;
    const int ctx = (int)ctx_lens[s];
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

    // Cache row (kv_row) of this lane's key in the first tile; each iteration looks up the next
    // tile's row while its own loads are in flight.
    auto row_of = [&](int t) -> unsigned long long {
        return t < ctx ? kv_row(table[t / block_size], kvh, nkv, block_size, t % block_size) : 0ull;
    };
    unsigned long long key_row = row_of(warp * 32 + lane);
    for (int t0 = warp * 32; t0 < ctx; t0 += WARPS * 32) {
        const bool valid = t0 + lane < ctx;
        const int n_valid = min(32, ctx - t0);
        // Issue every load of the tile first: this lane's key row, then the V rows the lane
        // reads in PV (lanes past the end read key t0's row with probability 0).
        Raw kraw[CH];
        {
            const C* krow = kc + key_row * HD;
#pragma unroll
            for (int cc = 0; cc < CH; ++cc) kraw[cc] = *reinterpret_cast<const Raw*>(krow + cc * 8);
        }
        Raw vraw[CH];
#pragma unroll
        for (int it = 0; it < CH; ++it) {
            const int src = it * KPI + kg;
            const unsigned long long vs = __shfl_sync(FULL, key_row, src < n_valid ? src : 0);
            vraw[it] = *reinterpret_cast<const Raw*>(vc + vs * HD + c * 8);
        }
        key_row = row_of(t0 + WARPS * 32 + lane);

        float sc[MAX_G];
#pragma unroll
        for (int h = 0; h < MAX_G; ++h) sc[h] = 0.f;
#pragma unroll
        for (int cc = 0; cc < CH; ++cc) {
            float k8[8];
            KvElem<C>::unpack(kraw[cc], k8);
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
            KvElem<C>::unpack(vraw[it], v8);
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

// ---------------------------------------------------------------------------------------------
// Tensor-core variant (HD = 64 or 128, g <= 8): per 32-key tile a warp computes S = Q K^T and
// O += P V with mma.sync m16n8k16 (bf16 in, f32 accumulate). The M dimension holds the g query
// heads of the KV head (rows g..15 are zero). Both products may permute their reduction (k) and
// output (n) indices freely as long as both operands agree, which lets every lane read whole
// 16-byte chunks straight from the paged cache into mma fragments:
//  * QK: lane (gid, t) holds key nt*8+gid's dims [t*HD/4, (t+1)*HD/4); k-step s uses words 2s
//    and 2s+1 of that chunk, and the Q fragment takes the same dims.
//  * PV: output column gid of n-tile j is dim (HD/8)*gid + j, so lane (gid, t) reads chunk gid
//    (HD/8 dims) of keys 2t, 2t+1, 2t+8, 2t+9 and pairs them per dim with byte permutes.
// Softmax statistics are per row (head gid), shared by the lane quad; warps merge at the end.
__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Online softmax of one mma row over a 32-key tile starting at key t0. Lane (gid, t) holds the
// row's scores of keys t0 + nt*8 + 2t + e in sc[nt][c + e] (c = 0: row gid; c = 2: row 8 + gid,
// the C fragment's layout). Masks keys >= ctx, leaves the probabilities in sc and updates the
// row's running max m, sum l and accumulators o[.][c], o[.][c + 1]. A row with no key yet
// (m = -inf after the tile) gets probabilities 0 and stays empty.
template <int NT>
__device__ __forceinline__ void tile_softmax_row(float (&sc)[4][4], int c, int t0, int t, int ctx, float scale,
                                                 float& m, float& l, float (&o)[NT][4]) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int key = t0 + nt * 8 + 2 * t + e;
            sc[nt][c + e] = key < ctx ? sc[nt][c + e] * scale : -INFINITY;
            mx = fmaxf(mx, sc[nt][c + e]);
        }
    }
    mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, 2));
    float m_new = fmaxf(m, mx);
    if (m_new == -INFINITY) m_new = 0.f;  // no key of this row yet: p = 0, alpha = 0
    const float alpha = __expf(m - m_new);
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            sc[nt][c + e] = __expf(sc[nt][c + e] - m_new);
            sum += sc[nt][c + e];
        }
    }
    sum += __shfl_xor_sync(FULL, sum, 1);
    sum += __shfl_xor_sync(FULL, sum, 2);
    l = l * alpha + sum;
    m = fmaxf(m, mx);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        o[j][c] *= alpha;
        o[j][c + 1] *= alpha;
    }
}

// O += P V for keys kb*16 .. kb*16+15 of a 32-key tile (one mma k-step), P from the
// probabilities tile_softmax_row left in sc: row gid and, when TWO, row 8 + gid. v[r] holds
// chunk gid (HD/8 dims) of key kb*16 + 2t + (r & 1) + (r >> 1)*8; output column gid of n-tile j
// is dim (HD/8)*gid + j, so each dim's keys pair with byte permutes.
template <int HD, bool TWO, typename C>
__device__ __forceinline__ void pv_kstep(float (&o)[HD / 8][4], const float (&sc)[4][4], int kb,
                                         const uint4 (&v)[4][HD / 64]) {
    const uint32_t pa0 = KvElem<C>::pack(sc[2 * kb][0], sc[2 * kb][1]);
    const uint32_t pa1 = TWO ? KvElem<C>::pack(sc[2 * kb][2], sc[2 * kb][3]) : 0u;
    const uint32_t pa2 = KvElem<C>::pack(sc[2 * kb + 1][0], sc[2 * kb + 1][1]);
    const uint32_t pa3 = TWO ? KvElem<C>::pack(sc[2 * kb + 1][2], sc[2 * kb + 1][3]) : 0u;
#pragma unroll
    for (int j = 0; j < HD / 8; ++j) {
        const int w = j / 2;  // word of the lane's chunk holding dim j (and j ^ 1)
        const uint32_t sel = (j % 2) ? 0x7632u : 0x5410u;
        const uint32_t b0 = __byte_perm(word(v[0][w / 4], w % 4), word(v[1][w / 4], w % 4), sel);
        const uint32_t b1 = __byte_perm(word(v[2][w / 4], w % 4), word(v[3][w / 4], w % 4), sel);
        KvElem<C>::mma(o[j], pa0, pa1, pa2, pa3, b0, b1);
    }
}

// PIPE: the loads of a warp's next tile are issued before the current tile is computed
// (double-buffered fragments: fewer resident warps, but loads always in flight).
// C: the cache element (bf16, or E4M3 widened to bf16 fragments as it loads: half the bytes).
template <int HD, bool PIPE, typename C>
__device__ __forceinline__ void paged_attention_mma(
    const __nv_bfloat16* __restrict__ q, const C* __restrict__ kc,
    const C* __restrict__ vc, const uint32_t* __restrict__ tables,
    const uint32_t* __restrict__ table_rows, const uint32_t* __restrict__ ctx_lens,
    __nv_bfloat16* __restrict__ out, int nh, int nkv, int block_size, int max_blocks,
    float scale) {
    using Raw = typename KvElem<C>::Raw;
    constexpr int KS = HD / 16;   // k-steps of QK
    constexpr int KU = HD / 32;   // 8-element chunks per lane per key in QK (HD/4 dims)
    constexpr int NT = HD / 8;    // n-tiles of PV
    constexpr int VU = HD / 64;   // 8-element chunks per lane per key in PV (HD/8 dims)
    const int s = blockIdx.x;
    const int kvh = blockIdx.y;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int gid = lane / 4;
    const int t = lane % 4;
    const int g = nh / nkv;
    const int ctx = (int)ctx_lens[s];
    const uint32_t* table = tables + (size_t)table_rows[s] * max_blocks;

    __shared__ float red_m[WARPS][MAX_G];
    __shared__ float red_l[WARPS][MAX_G];
    __shared__ float red_acc[WARPS][MAX_G * HD];

    // Q fragments (row gid = head kvh*g + gid; zero rows past g).
    uint32_t qa[KS][2];
    {
        const uint32_t* qrow = reinterpret_cast<const uint32_t*>(
            q + ((size_t)s * nh + kvh * g + (gid < g ? gid : 0)) * HD + t * (HD / 4));
#pragma unroll
        for (int k = 0; k < KS; ++k) {
            qa[k][0] = gid < g ? KvElem<C>::qword(qrow[2 * k]) : 0u;
            qa[k][1] = gid < g ? KvElem<C>::qword(qrow[2 * k + 1]) : 0u;
        }
    }
    float o[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m = -INFINITY, l = 0.f;

    // Cache row (kv_row) of key min(t0 + lane, ctx - 1): past the end, lanes repeat the last
    // key (finite data, masked out of the softmax).
    auto row_of = [&](int key) -> uint32_t {
        key = min(key, ctx - 1);
        return kv_row(table[key / block_size], kvh, nkv, block_size, key % block_size);
    };
    // The tile's K rows (key nt*8 + gid, this lane's quarter) and V chunks (keys 2t, 2t+1,
    // 2t+8, 2t+9 of each 16-key half, chunk gid), with `sl` = the cache row of key t0 + lane.
    // Raw elements stay in registers until used (E4M3: half the registers of its fragments).
    auto load_tile = [&](uint32_t sl, Raw (&kr)[4][KU], Raw (&vr)[2][4][VU]) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const uint32_t ks = __shfl_sync(FULL, sl, nt * 8 + gid);
            const Raw* row = reinterpret_cast<const Raw*>(kc + (size_t)ks * HD + t * (HD / 4));
#pragma unroll
            for (int u = 0; u < KU; ++u) kr[nt][u] = row[u];
        }
#pragma unroll
        for (int kb = 0; kb < 2; ++kb) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int key = kb * 16 + 2 * t + (r & 1) + (r >> 1) * 8;
                const uint32_t vs = __shfl_sync(FULL, sl, key);
                const Raw* row = reinterpret_cast<const Raw*>(vc + (size_t)vs * HD + gid * (HD / 8));
#pragma unroll
                for (int u = 0; u < VU; ++u) vr[kb][r][u] = row[u];
            }
        }
    };
    uint32_t key_row = row_of(warp * 32 + lane);
    Raw kr[4][KU];
    Raw vr[2][4][VU];
    if (PIPE && warp * 32 < ctx) {
        load_tile(key_row, kr, vr);
        key_row = row_of(warp * 32 + WARPS * 32 + lane);
    }
    for (int t0 = warp * 32; t0 < ctx; t0 += WARPS * 32) {
        Raw kn[4][KU];
        Raw vn[2][4][VU];
        if (PIPE) {
            if (t0 + WARPS * 32 < ctx) {  // warp-uniform
                load_tile(key_row, kn, vn);
                key_row = row_of(t0 + 2 * WARPS * 32 + lane);
            }
        } else {
            load_tile(key_row, kr, vr);
            key_row = row_of(t0 + WARPS * 32 + lane);
        }

        // S = Q K^T: sc[nt] holds row gid, keys nt*8 + 2t, 2t+1.
        float sc[4][4];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
            for (int k = 0; k < KS; k += 2) {
                const uint4 kf = KvElem<C>::frag8(kr[nt][k / 2]);
                KvElem<C>::mma(sc[nt], qa[k][0], 0u, qa[k][1], 0u, kf.x, kf.y);
                KvElem<C>::mma(sc[nt], qa[k + 1][0], 0u, qa[k + 1][1], 0u, kf.z, kf.w);
            }
        }
        tile_softmax_row<NT>(sc, 0, t0, t, ctx, scale, m, l, o);
#pragma unroll
        for (int kb = 0; kb < 2; ++kb) {
            uint4 vf[4][VU];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int u = 0; u < VU; ++u) vf[r][u] = KvElem<C>::frag8(vr[kb][r][u]);
            pv_kstep<HD, false, C>(o, sc, kb, vf);
        }
        if (PIPE && t0 + WARPS * 32 < ctx) {
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int u = 0; u < KU; ++u) kr[nt][u] = kn[nt][u];
#pragma unroll
            for (int kb = 0; kb < 2; ++kb)
#pragma unroll
                for (int r = 0; r < 4; ++r)
#pragma unroll
                    for (int u = 0; u < VU; ++u) vr[kb][r][u] = vn[kb][r][u];
        }
    }

    // Merge the warps: lane (gid, t) holds row gid, dims (HD/8)*2t + j and (HD/8)*(2t+1) + j.
    if (gid < g) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            red_acc[warp][gid * HD + (HD / 8) * (2 * t) + j] = o[j][0];
            red_acc[warp][gid * HD + (HD / 8) * (2 * t + 1) + j] = o[j][1];
        }
        if (t == 0) {
            red_m[warp][gid] = m;
            red_l[warp][gid] = l;
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

#define PAGED_ATTENTION_MMA_ENTRY(NAME, HD, PIPE, C, MINB)                                        \
    extern "C" __global__ void __launch_bounds__(THREADS, MINB) NAME(                             \
        const __nv_bfloat16* __restrict__ q, const C* __restrict__ kc,                            \
        const C* __restrict__ vc, const uint32_t* __restrict__ tables,                            \
        const uint32_t* __restrict__ table_rows, const uint32_t* __restrict__ ctx_lens,           \
        __nv_bfloat16* __restrict__ out, int nh, int nkv, int block_size, int max_blocks,         \
        float scale) {                                                                            \
        paged_attention_mma<HD, PIPE, C>(q, kc, vc, tables, table_rows, ctx_lens, out, nh, nkv,   \
                                         block_size, max_blocks, scale);                          \
    }

PAGED_ATTENTION_MMA_ENTRY(paged_attention_mma_bf16_hd64, 64, false, __nv_bfloat16, 4)
PAGED_ATTENTION_MMA_ENTRY(paged_attention_mma_bf16_hd128, 128, false, __nv_bfloat16, 2)
PAGED_ATTENTION_MMA_ENTRY(paged_attention_mma_pipe_bf16_hd64, 64, true, __nv_bfloat16, 2)
PAGED_ATTENTION_MMA_ENTRY(paged_attention_mma_e4m3_hd64, 64, false, __nv_fp8_storage_t, 4)
// An E4M3 cache at head_dim 128 is always double-buffered: its raw tiles take half the registers
// of bf16 ones, so both buffers fit at 2 blocks/SM (8B shape, H100: 264 vs 277 us per layer
// single-buffered, 287 at 3 blocks/SM with spills; docs/BENCHMARKS.md attempt 22).
PAGED_ATTENTION_MMA_ENTRY(paged_attention_mma_e4m3_hd128, 128, true, __nv_fp8_storage_t, 2)
PAGED_ATTENTION_MMA_ENTRY(paged_attention_mma_pipe_e4m3_hd64, 64, true, __nv_fp8_storage_t, 2)

// ---------------------------------------------------------------------------------------------
// Prefill chunks on tensor cores: a block of PF_WARPS warps takes up to PF_WARPS * P
// consecutive positions of one sequence (`items[b]` = first token | (count - 1) << 24) and one
// KV head, P = 16 / g positions per warp for g query heads per KV head: mma row r of warp w is
// query head r % g of position w * P + r / g, so every row of the m16 tile works (g = 4: four
// positions per warp, where a warp took two and left half its rows empty). Every warp walks
// every key tile of the block's longest context. Each 32-key tile of K and V is copied once per
// block into shared memory with cp.async (double-buffered: tile j + 1 loads while tile j is
// computed), and the warps read their fragments from there with the same lane layout as the
// paged kernel. Rows are padded by 16 bytes so those 16-byte fragment reads do not conflict on
// banks.
#define PF_WARPS 8
#define PF_THREADS (PF_WARPS * 32)

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}

// C: the cache element; an E4M3 tile is staged as its bytes (half the copies) and widened to
// bf16 fragments as the warps read it.
template <int HD, typename C>
__device__ __forceinline__ void prefill_attention_mma(
    const __nv_bfloat16* __restrict__ q, const C* __restrict__ kc,
    const C* __restrict__ vc, const uint32_t* __restrict__ tables,
    const uint32_t* __restrict__ table_rows, const uint32_t* __restrict__ ctx_lens,
    const uint32_t* __restrict__ items, __nv_bfloat16* __restrict__ out, int nh, int nkv,
    int block_size, int max_blocks, float scale) {
    constexpr int KS = HD / 16;
    constexpr int NT = HD / 8;
    using Raw = typename KvElem<C>::Raw;  // 8 elements
    constexpr int ROW = HD + 16 / (int)sizeof(C);  // padded smem row (16 bytes), in elements
    constexpr int PER16 = 16 / (int)sizeof(C);     // elements per 16-byte copy
    constexpr int CH = HD / PER16;                 // 16-byte copies per row
    __shared__ __align__(16) C ks[2][32 * ROW];
    __shared__ __align__(16) C vs[2][32 * ROW];

    const uint32_t item = items[blockIdx.x];
    const int s0 = (int)(item & 0x00ffffffu);
    const int count = (int)(item >> 24) + 1;
    const int kvh = blockIdx.y;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int gid = lane / 4;
    const int t = lane % 4;
    const int g = nh / nkv;
    const int P = 16 / g;  // positions per warp
    const uint32_t* table = tables + (size_t)table_rows[s0] * max_blocks;
    const int ctx_max = (int)ctx_lens[s0 + count - 1];
    const int ntiles = (ctx_max + 31) / 32;

    // This lane's two mma rows gid (a) and 8 + gid (b): position and head of each; rows past the
    // warp's positions or past the chunk attend nothing. Consecutive positions have consecutive
    // contexts, so the warp's last position has its longest.
    const int p0 = warp * P;
    const int pa = p0 + gid / g, ha = gid % g, pb = p0 + (8 + gid) / g, hb = (8 + gid) % g;
    const bool has_a = gid < P * g && pa < count, has_b = 8 + gid < P * g && pb < count;
    const int ctx_a = has_a ? (int)ctx_lens[s0 + pa] : 0;
    const int ctx_b = has_b ? (int)ctx_lens[s0 + pb] : 0;
    const int ctx_warp = p0 < count ? (int)ctx_lens[s0 + min(p0 + P, count) - 1] : 0;
    uint32_t qa[KS][2], qb[KS][2];
    {
        const uint32_t* qra = reinterpret_cast<const uint32_t*>(q + ((size_t)(s0 + (has_a ? pa : 0)) * nh + kvh * g + ha) * HD + t * (HD / 4));
        const uint32_t* qrb = reinterpret_cast<const uint32_t*>(q + ((size_t)(s0 + (has_b ? pb : 0)) * nh + kvh * g + hb) * HD + t * (HD / 4));
#pragma unroll
        for (int k = 0; k < KS; ++k) {
            qa[k][0] = has_a ? KvElem<C>::qword(qra[2 * k]) : 0u;
            qa[k][1] = has_a ? KvElem<C>::qword(qra[2 * k + 1]) : 0u;
            qb[k][0] = has_b ? KvElem<C>::qword(qrb[2 * k]) : 0u;
            qb[k][1] = has_b ? KvElem<C>::qword(qrb[2 * k + 1]) : 0u;
        }
    }

    // Copies tile j (keys 32j..32j+31, clamped to the last key) of K and V into buffer b.
    auto issue = [&](int j, int b) {
        for (int idx = threadIdx.x; idx < 32 * CH; idx += PF_THREADS) {
            const int r = idx / CH, c = idx % CH;
            const int key = min(j * 32 + r, ctx_max - 1);
            const size_t off = (size_t)kv_row(table[key / block_size], kvh, nkv, block_size, key % block_size) * HD + c * PER16;
            cp_async16(&ks[b][r * ROW + c * PER16], kc + off);
            cp_async16(&vs[b][r * ROW + c * PER16], vc + off);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };

    float o[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m0 = -INFINITY, l0 = 0.f, m1 = -INFINITY, l1 = 0.f;

    issue(0, 0);
    for (int j = 0; j < ntiles; ++j) {
        const int b = j & 1;
        if (j + 1 < ntiles) {
            issue(j + 1, b ^ 1);
            asm volatile("cp.async.wait_group 1;\n" ::);
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::);
        }
        __syncthreads();
        const int t0 = j * 32;
        if (t0 < ctx_warp) {  // warp-uniform: the tile has keys for a row
            // S = Q K^T for the 32 keys (n-tile nt: keys nt*8 + gid in the B fragment).
            float sc[4][4];
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
                const Raw* krow = reinterpret_cast<const Raw*>(&ks[b][(nt * 8 + gid) * ROW + t * (HD / 4)]);
#pragma unroll
                for (int k = 0; k < KS; ++k) {
                    const uint4 kv4 = KvElem<C>::frag8(krow[k / 2]);
                    KvElem<C>::mma(sc[nt], qa[k][0], qb[k][0], qa[k][1], qb[k][1], word(kv4, (k % 2) * 2),
                                   word(kv4, (k % 2) * 2 + 1));
                }
            }
            tile_softmax_row<NT>(sc, 0, t0, t, ctx_a, scale, m0, l0, o);
            tile_softmax_row<NT>(sc, 2, t0, t, ctx_b, scale, m1, l1, o);
            // V fragments of k-step kb from shared memory (lane layout as in the paged kernel).
#pragma unroll
            for (int kb = 0; kb < 2; ++kb) {
                uint4 vr[4][HD / 64];
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int key = kb * 16 + 2 * t + (r & 1) + (r >> 1) * 8;
                    const Raw* vrow = reinterpret_cast<const Raw*>(&vs[b][key * ROW + gid * (HD / 8)]);
#pragma unroll
                    for (int u = 0; u < HD / 64; ++u) vr[r][u] = KvElem<C>::frag8(vrow[u]);
                }
                pv_kstep<HD, true, C>(o, sc, kb, vr);
            }
        }
        __syncthreads();  // buffer b is refilled by the next iteration's issue
    }

    // Lane (gid, t) holds row gid (position pa, head ha) in o[.][0..1] and row 8 + gid (pb, hb)
    // in o[.][2..3], dims (HD/8)*2t + jj and (HD/8)*(2t+1) + jj.
    if (has_a) {
        __nv_bfloat16* oa = out + ((size_t)(s0 + pa) * nh + kvh * g + ha) * HD;
        const float inv = 1.f / l0;
#pragma unroll
        for (int jj = 0; jj < NT; ++jj) {
            oa[(HD / 8) * (2 * t) + jj] = __float2bfloat16(o[jj][0] * inv);
            oa[(HD / 8) * (2 * t + 1) + jj] = __float2bfloat16(o[jj][1] * inv);
        }
    }
    if (has_b) {
        __nv_bfloat16* ob = out + ((size_t)(s0 + pb) * nh + kvh * g + hb) * HD;
        const float inv = 1.f / l1;
#pragma unroll
        for (int jj = 0; jj < NT; ++jj) {
            ob[(HD / 8) * (2 * t) + jj] = __float2bfloat16(o[jj][2] * inv);
            ob[(HD / 8) * (2 * t + 1) + jj] = __float2bfloat16(o[jj][3] * inv);
        }
    }
}

#define PREFILL_ATTENTION_ENTRY(NAME, HD, C, MINB)                                                \
    extern "C" __global__ void __launch_bounds__(PF_THREADS, MINB) NAME(                          \
        const __nv_bfloat16* __restrict__ q, const C* __restrict__ kc,                            \
        const C* __restrict__ vc, const uint32_t* __restrict__ tables,                            \
        const uint32_t* __restrict__ table_rows, const uint32_t* __restrict__ ctx_lens,           \
        const uint32_t* __restrict__ items, __nv_bfloat16* __restrict__ out, int nh, int nkv,     \
        int block_size, int max_blocks, float scale) {                                            \
        prefill_attention_mma<HD, C>(q, kc, vc, tables, table_rows, ctx_lens, items, out, nh, nkv,   \
                                  block_size, max_blocks, scale);                                 \
    }

PREFILL_ATTENTION_ENTRY(prefill_attention_mma_bf16_hd64, 64, __nv_bfloat16, 2)
PREFILL_ATTENTION_ENTRY(prefill_attention_mma_bf16_hd128, 128, __nv_bfloat16, 1)
PREFILL_ATTENTION_ENTRY(prefill_attention_mma_e4m3_hd64, 64, __nv_fp8_storage_t, 2)
PREFILL_ATTENTION_ENTRY(prefill_attention_mma_e4m3_hd128, 128, __nv_fp8_storage_t, 1)

// MINB: blocks per SM the registers must allow (3 keeps hd <= 64 spill-free at 12 warps/SM).
#define PAGED_ATTENTION_ENTRY(NAME, HD, C, MINB)                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS, MINB) NAME(                             \
        const __nv_bfloat16* __restrict__ q, const C* __restrict__ kc,                            \
        const C* __restrict__ vc, const uint32_t* __restrict__ tables,                            \
        const uint32_t* __restrict__ table_rows, const uint32_t* __restrict__ ctx_lens,           \
        __nv_bfloat16* __restrict__ out, int nh, int nkv, int block_size, int max_blocks,         \
        float scale) {                                                                            \
        paged_attention<HD, C>(q, kc, vc, tables, table_rows, ctx_lens, out, nh, nkv, block_size, \
                               max_blocks, scale);                                                \
    }

PAGED_ATTENTION_ENTRY(paged_attention_bf16_hd16, 16, __nv_bfloat16, 3)
PAGED_ATTENTION_ENTRY(paged_attention_bf16_hd32, 32, __nv_bfloat16, 3)
PAGED_ATTENTION_ENTRY(paged_attention_bf16_hd64, 64, __nv_bfloat16, 3)
PAGED_ATTENTION_ENTRY(paged_attention_bf16_hd128, 128, __nv_bfloat16, 1)
PAGED_ATTENTION_ENTRY(paged_attention_bf16_hd256, 256, __nv_bfloat16, 1)
// FP8 E4M3 cache (`kv_cache_dtype: fp8`): half the bytes per key read.
PAGED_ATTENTION_ENTRY(paged_attention_e4m3_hd16, 16, __nv_fp8_storage_t, 3)
PAGED_ATTENTION_ENTRY(paged_attention_e4m3_hd32, 32, __nv_fp8_storage_t, 3)
PAGED_ATTENTION_ENTRY(paged_attention_e4m3_hd64, 64, __nv_fp8_storage_t, 3)
PAGED_ATTENTION_ENTRY(paged_attention_e4m3_hd128, 128, __nv_fp8_storage_t, 1)
PAGED_ATTENTION_ENTRY(paged_attention_e4m3_hd256, 256, __nv_fp8_storage_t, 1)

// SwiGLU: out[r, c] = silu(x[r, c]) * x[r, inter + c] for x [n, 2 * inter] -> out [n, inter].
// One thread per 8 outputs (16-byte loads and stores), grid-stride. inter % 8 == 0.
// rs, cs (both or neither null): x is an FP8 GEMM's unscaled output (cuBLASLt with unit scales)
// and each element is first scaled to x[r, c] * rs[r] * cs[c] and rounded to bf16, as
// scale_rows_cols_bf16 would leave it (rs: [n], cs: [2 * inter] f32), saving that kernel's pass.
extern "C" __global__ void silu_mul_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ rs,
                                         const float* __restrict__ cs, __nv_bfloat16* __restrict__ out, int n,
                                         int inter) {
    const int chunks = inter / 8;
    const size_t total = (size_t)n * chunks;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / chunks;
        const size_t c = (i % chunks) * 8;
        float g[8], u[8];
        load8(x + r * 2 * inter + c, g);
        load8(x + r * 2 * inter + inter + c, u);
        if (rs != nullptr) {
            const float s = rs[r];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                g[j] = __bfloat162float(__float2bfloat16(g[j] * s * cs[c + j]));
                u[j] = __bfloat162float(__float2bfloat16(u[j] * s * cs[inter + c + j]));
            }
        }
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

// Projections of a few rows (decode at small batch): y[r, c] = sum_j x[r, j] * w[c, j] for x
// [m, k], w [n, k] bf16 (k % 8 == 0, m <= GEMV_ROWS), f32 accumulation rounded once to bf16.
// `tpc` threads (a multiple of 32 dividing the block) take one output column, its weight row
// read once for all m rows in 16-byte chunks strided across them (the host picks tpc so each
// thread has a few chunks: a warp walking a long row alone was latency-bound); partial sums
// meet in shared memory. The rows of x come from L1/L2. SILU: w is [gate; up] ([2n, k]) and
// y[r, c] = silu(g) * u of the two columns' results, each rounded to bf16 first as the unfused
// GEMM + silu_mul_bf16 round them.
#define GEMV_ROWS 8
#define GEMV_WARPS 8
template <bool SILU>
__device__ __forceinline__ void gemv_rows(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                          __nv_bfloat16* __restrict__ y, int m, int n, int k, int tpc) {
    __shared__ float red[GEMV_WARPS][2][GEMV_ROWS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int cols = blockDim.x / tpc;
    const int lc = threadIdx.x / tpc, lt = threadIdx.x % tpc;
    const int c = blockIdx.x * cols + lc;
    float acc[GEMV_ROWS], acc2[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) acc[r] = acc2[r] = 0.f;
    if (c < n) {
        const __nv_bfloat16* wg = w + (size_t)c * k;
        const __nv_bfloat16* wu = w + (size_t)(n + c) * k;  // SILU only
#pragma unroll 4
        for (int j = lt * 8; j < k; j += tpc * 8) {
            float a[8], b[8];
            load8(wg + j, a);
            if (SILU) load8(wu + j, b);
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) {
                if (r < m) {
                    float xf[8];
                    load8(x + (size_t)r * k + j, xf);
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        acc[r] += xf[e] * a[e];
                        if (SILU) acc2[r] += xf[e] * b[e];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r) {
        const float g = warp_sum(acc[r]);
        const float u = SILU ? warp_sum(acc2[r]) : 0.f;
        if (lane == 0) {
            red[warp][0][r] = g;
            red[warp][1][r] = u;
        }
    }
    __syncthreads();
    if (c >= n || lt >= m) return;
    // Thread lt of the column writes row lt: the column's warps' partial sums.
    const int r = lt, w0 = lc * (tpc / 32);
    float g = 0.f, u = 0.f;
    for (int i = 0; i < tpc / 32; ++i) {
        g += red[w0 + i][0][r];
        u += red[w0 + i][1][r];
    }
    float v = g;
    if (SILU) {
        const float gb = __bfloat162float(__float2bfloat16(g));
        const float ub = __bfloat162float(__float2bfloat16(u));
        v = gb / (1.f + __expf(-gb)) * ub;
    }
    y[(size_t)r * n + c] = __float2bfloat16(v);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_bf16(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y, int m,
    int n, int k, int tpc) {
    gemv_rows<false>(x, w, y, m, n, k, tpc);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_silu_mul_bf16(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ y, int m,
    int n, int k, int tpc) {
    gemv_rows<true>(x, w, y, m, n, k, tpc);
}

// After the QKV projection: adds the bias (if any), applies rotate-half RoPE at each token's
// position to the query and key heads, writes the rotated queries to q_out and the keys and
// values straight into their cache slots. One thread per (token, head, two adjacent i < hd/2):
// bf16x2 / float2 accesses and 32-bit index arithmetic (the host checks the count fits).
// qkv: [n, (nh + 2 nkv) * hd]; bias: [(nh + 2 nkv) * hd] or null; pos, slots: [n];
// cos, sin: [max_len, hd/2] f32; q_out: [n, nh, hd]; kc, vc: the paged caches (kv_row's layout,
// blocks of block_size slots). hd % 4 == 0.
// rs, cs (both or neither null): qkv is an FP8 GEMM's unscaled output and each element is
// first scaled to qkv[t, c] * rs[t] * cs[c] and rounded to bf16, as scale_rows_cols_bf16 would
// leave it (rs: [n], cs: [(nh + 2 nkv) * hd] f32), saving that kernel's pass.
template <typename C>
__device__ __forceinline__ void rope_qkv_cache(
    const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ bias,
    const float* __restrict__ rs, const float* __restrict__ cs,
    const uint32_t* __restrict__ pos, const float* __restrict__ cos_t,
    const float* __restrict__ sin_t, __nv_bfloat16* __restrict__ q_out,
    C* __restrict__ kc, C* __restrict__ vc,
    const uint32_t* __restrict__ slots, int n, int nh, int nkv, int hd, int block_size) {
    const uint32_t half = hd / 2;
    const uint32_t quarter = hd / 4;  // i pairs per head
    const uint32_t heads = nh + 2 * nkv;
    const uint32_t total = (uint32_t)n * heads * quarter;
    for (uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gridDim.x * blockDim.x) {
        const uint32_t i = (idx % quarter) * 2;
        const uint32_t rest = idx / quarter;
        const uint32_t hh = rest % heads;
        const uint32_t t = rest / heads;
        const size_t base = (size_t)t * heads * hd + (size_t)hh * hd;
        float2 x1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(qkv + base + i));
        float2 x2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(qkv + base + i + half));
        if (rs != nullptr) {
            const float r = rs[t];
            const float* c = cs + hh * hd + i;
            x1 = __bfloat1622float2(__floats2bfloat162_rn(x1.x * r * c[0], x1.y * r * c[1]));
            x2 = __bfloat1622float2(__floats2bfloat162_rn(x2.x * r * c[half], x2.y * r * c[half + 1]));
        }
        if (bias != nullptr) {
            // Round after the bias add, as the separate bias add would.
            const float2 b1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(bias + hh * hd + i));
            const float2 b2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(bias + hh * hd + i + half));
            x1 = __bfloat1622float2(__floats2bfloat162_rn(x1.x + b1.x, x1.y + b1.y));
            x2 = __bfloat1622float2(__floats2bfloat162_rn(x2.x + b2.x, x2.y + b2.y));
        }
        if (hh < (uint32_t)(nh + nkv)) {
            const size_t p = (size_t)pos[t] * half + i;
            const float2 c = *reinterpret_cast<const float2*>(cos_t + p);
            const float2 s = *reinterpret_cast<const float2*>(sin_t + p);
            const float2 y1 = make_float2(x1.x * c.x - x2.x * s.x, x1.y * c.y - x2.y * s.y);
            const float2 y2 = make_float2(x2.x * c.x + x1.x * s.x, x2.y * c.y + x1.y * s.y);
            x1 = y1;
            x2 = y2;
        }
        if (hh < (uint32_t)nh) {
            __nv_bfloat16* dst = q_out + ((size_t)t * nh + hh) * hd;
            KvElem<__nv_bfloat16>::store2(dst + i, x1.x, x1.y);
            KvElem<__nv_bfloat16>::store2(dst + i + half, x2.x, x2.y);
        } else {
            const bool is_k = hh < (uint32_t)(nh + nkv);
            const int kvh = (int)hh - nh - (is_k ? 0 : nkv);
            const uint32_t slot = slots[t];
            const size_t row = kv_row(slot / block_size, kvh, nkv, block_size, slot % block_size);
            C* dst = (is_k ? kc : vc) + row * hd;
            KvElem<C>::store2(dst + i, x1.x, x1.y);
            KvElem<C>::store2(dst + i + half, x2.x, x2.y);
        }
    }
}

#define ROPE_QKV_CACHE_ENTRY(NAME, C)                                                                    \
    extern "C" __global__ void NAME(const __nv_bfloat16* __restrict__ qkv,                              \
                                    const __nv_bfloat16* __restrict__ bias, const float* __restrict__ rs,   \
                                    const float* __restrict__ cs, const uint32_t* __restrict__ pos,     \
                                    const float* __restrict__ cos_t, const float* __restrict__ sin_t,  \
                                    __nv_bfloat16* __restrict__ q_out, C* __restrict__ kc,             \
                                    C* __restrict__ vc, const uint32_t* __restrict__ slots, int n,     \
                                    int nh, int nkv, int hd, int block_size) {                         \
        rope_qkv_cache<C>(qkv, bias, rs, cs, pos, cos_t, sin_t, q_out, kc, vc, slots, n, nh, nkv, hd,  \
                          block_size);                                                                 \
    }

ROPE_QKV_CACHE_ENTRY(rope_qkv_cache_bf16, __nv_bfloat16)
ROPE_QKV_CACHE_ENTRY(rope_qkv_cache_e4m3, __nv_fp8_storage_t)

#define NORM_THREADS 128
#define NORM_VEC 4  // 16-byte chunks per thread the vectorised path keeps (h <= 4096)

// Residual add + RMSNorm: out[0] = x + r (rounded to bf16), out[1] = RMSNorm(out[0]) * w.
// x, r: [n, h] (r may be null: a plain RMSNorm, out[0] = x); w: [h]; out: [2, n, h]. One block
// per row; f32 statistics. rs, cs (both or neither null, and only with r): r is an FP8 GEMM's
// unscaled output, each element first scaled to r[row, c] * rs[row] * cs[c] and rounded to bf16
// as scale_rows_cols_bf16 would leave it (rs: [n], cs: [h] f32).
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    add_rms_norm_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ r,
                      const float* __restrict__ rs, const float* __restrict__ cs,
                      const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ out, int n,
                      int h, float eps) {
    const size_t row = blockIdx.x;
    const __nv_bfloat16* xr = x + row * h;
    const __nv_bfloat16* rr = r != nullptr ? r + row * h : nullptr;  // null: no residual (plain RMSNorm)
    __nv_bfloat16* sum_out = out + row * h;
    __nv_bfloat16* norm_out = out + ((size_t)n + row) * h;
    const float rrs = rs != nullptr ? rs[row] : 1.f;
    // Rows of h % 8 == 0 up to NORM_VEC chunks of 8 per thread: 16-byte accesses, the rounded
    // sums kept in registers for the second pass.
    const bool vec = h % 8 == 0 && h <= NORM_THREADS * 8 * NORM_VEC;
    float v[NORM_VEC][8];
    float ss = 0.f;
    if (vec) {
#pragma unroll
        for (int k = 0; k < NORM_VEC; ++k) {
            const int c = (threadIdx.x + k * NORM_THREADS) * 8;
            if (c < h) {
                float a[8], b[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
                load8(xr + c, a);
                if (rr != nullptr) load8(rr + c, b);
                if (rs != nullptr) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) b[j] = __bfloat162float(__float2bfloat16(b[j] * rrs * cs[c + j]));
                }
                uint4 raw;
                __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    o[j] = __floats2bfloat162_rn(a[2 * j] + b[2 * j], a[2 * j + 1] + b[2 * j + 1]);
                    const float2 f = __bfloat1622float2(o[j]);
                    v[k][2 * j] = f.x;
                    v[k][2 * j + 1] = f.y;
                    ss += f.x * f.x + f.y * f.y;
                }
                *reinterpret_cast<uint4*>(sum_out + c) = raw;
            }
        }
    } else {
        for (int c = threadIdx.x; c < h; c += NORM_THREADS) {
            float rv = rr != nullptr ? __bfloat162float(rr[c]) : 0.f;
            if (rs != nullptr) rv = __bfloat162float(__float2bfloat16(rv * rrs * cs[c]));
            const __nv_bfloat16 b = __float2bfloat16(__bfloat162float(xr[c]) + rv);
            sum_out[c] = b;
            const float f = __bfloat162float(b);
            ss += f * f;
        }
    }
    ss = warp_sum(ss);
    __shared__ float part[NORM_THREADS / 32];
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
    __syncthreads();
    float tot = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_THREADS / 32; ++i) tot += part[i];
    const float inv_rms = rsqrtf(tot / h + eps);
    if (vec) {
#pragma unroll
        for (int k = 0; k < NORM_VEC; ++k) {
            const int c = (threadIdx.x + k * NORM_THREADS) * 8;
            if (c < h) {
                float wf[8];
                load8(w + c, wf);
                uint4 raw;
                __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    o[j] = __floats2bfloat162_rn(v[k][2 * j] * inv_rms * wf[2 * j], v[k][2 * j + 1] * inv_rms * wf[2 * j + 1]);
                *reinterpret_cast<uint4*>(norm_out + c) = raw;
            }
        }
        return;
    }
    for (int c = threadIdx.x; c < h; c += NORM_THREADS) {
        const float f = __bfloat162float(sum_out[c]);
        norm_out[c] = __float2bfloat16(f * inv_rms * __bfloat162float(w[c]));
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

// Token ids of the next step whose values the step in flight is still sampling: an id with the
// top bit set is a placeholder for prev[id & 0x7fffffff] (that step's argmax rows). Lets the
// host enqueue step N+1 before it has read step N's tokens back.
extern "C" __global__ void resolve_tokens_u32(const uint32_t* __restrict__ ids, const uint32_t* __restrict__ prev,
                                              uint32_t* __restrict__ out, int n, int prev_rows) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint32_t t = ids[i];
    if (t & 0x80000000u) {
        const uint32_t r = t & 0x7fffffffu;
        t = r < (uint32_t)prev_rows ? prev[r] : 0u;  // the host checks the rows; never read out of bounds
    }
    out[i] = t;
}

// FP8 projections: each row of x (bf16 [rows, cols]) scaled by s = max(amax(row), 1e-12) / 448
// and rounded to E4M3 (nearest even, saturating), q = x / s; s goes to scale_out[row]. One
// block per row. The host side (cuda_ops::Fp8Gemm) multiplies the FP8 GEMM's result by the
// row scales of both operands; the CPU path (engine/fp8.rs) emulates the same rounding.
#define QUANT_THREADS 256
extern "C" __global__ void __launch_bounds__(QUANT_THREADS)
quant_rows_e4m3(const __nv_bfloat16* __restrict__ x, __nv_fp8_storage_t* __restrict__ q,
                float* __restrict__ scale_out, int cols) {
    const size_t base = (size_t)blockIdx.x * cols;
    const __nv_bfloat16* row = x + base;
    float m = 0.f;
    for (int c = threadIdx.x; c < cols; c += QUANT_THREADS) m = fmaxf(m, fabsf(__bfloat162float(row[c])));
    __shared__ float part[QUANT_THREADS / 32];
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = m;
    __syncthreads();
    float amax = 0.f;
#pragma unroll
    for (int w = 0; w < QUANT_THREADS / 32; ++w) amax = fmaxf(amax, part[w]);
    const float s = fmaxf(amax, 1e-12f) / 448.f;
    if (threadIdx.x == 0) scale_out[blockIdx.x] = s;
    for (int c = threadIdx.x; c < cols; c += QUANT_THREADS)
        q[base + c] = __nv_cvt_float_to_fp8(__bfloat162float(row[c]) / s, __NV_SATFINITE, __NV_E4M3);
}

// The FP8 GEMM's scales when cuBLASLt runs it with unit (scalar) scales, on a GPU or library
// that refuses outer-vector scaling, or when the consumer of a deferred product does not take
// them: y[r, c] = x[r, c] * rs[r] * cs[c] in f32, rounded once to bf16. x, y: [rows, cols] bf16
// (cols % 2 == 0, distinct buffers); rs: [rows], cs: [cols] f32. Grid-stride, bf16x2.
extern "C" __global__ void scale_rows_cols_bf16(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ y,
                                                const float* __restrict__ rs, const float* __restrict__ cs,
                                                int rows, int cols) {
    const size_t pairs = (size_t)rows * cols / 2;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += (size_t)gridDim.x * blockDim.x) {
        const size_t e = i * 2;
        const int r = (int)(e / cols);
        const int c = (int)(e % cols);
        const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(x + e));
        const float s = rs[r];
        *reinterpret_cast<__nv_bfloat162*>(y + e) = __floats2bfloat162_rn(v.x * s * cs[c], v.y * s * cs[c + 1]);
    }
}
