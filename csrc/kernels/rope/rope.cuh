// RoPE kernels: one pass over q and k, 16-byte accesses when the layout allows them.
//
// A CTA takes kTokensPerBlock tokens. It first gathers each token's (cos, sin) row into shared
// memory (from a 1D table or from three per-axis tables), then every thread rotates groups of
// pairs of every q and k head of those tokens. Angles are gathered once per token, not once per
// head, and no [S, D] table ever exists in global memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "tkpy/detail/rope_index.h"
#include "tkpy/rope.h"

namespace tkpy::rope {

inline constexpr int kThreads = 256;
inline constexpr int kTokensPerBlock = 4;
inline constexpr int kMaxPairs = 256;  // head_dim <= 512, checked by the bindings

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N consecutive elements moved as one access: 16 bytes when Vectorized, element by element
// otherwise (odd strides or rotary dims).
template <typename T, int N, bool Vectorized>
struct alignas(Vectorized ? N * sizeof(T) : sizeof(T)) Pack {
    T v[N];
};

// Angles of 1D RoPE: row `position` of a cos and a sin table.
template <typename TableT>
struct Angles1d {
    const TableT* cos;
    const TableT* sin;
    int64_t cos_row_stride;
    int64_t sin_row_stride;
    int64_t table_rows;
    const void* positions;
    bool positions_int64;
    int64_t positions_batch_stride;

    __device__ __forceinline__ float2 operator()(int64_t b, int64_t s, int p) const {
        const int64_t pos = positions_int64
            ? detail::rope_position(static_cast<const int64_t*>(positions), positions_batch_stride, b, s, table_rows)
            : detail::rope_position(static_cast<const int32_t*>(positions), positions_batch_stride, b, s, table_rows);
        if (pos < 0) return make_float2(NAN, NAN);  // out of range: poison, never a plausible value
        return make_float2(to_float(cos[pos * cos_row_stride + p]), to_float(sin[pos * sin_row_stride + p]));
    }
};

// Angles of 3D RoPE: pair p takes its (cos, sin) from the table of its axis, at the token's
// coordinate on that axis. Axes are picked with selects, not array indexing, so the tables stay in
// registers instead of a local-memory copy.
struct Angles3d {
    const float* table_t;
    const float* table_h;
    const float* table_w;
    int64_t stride_t;
    int64_t stride_h;
    int64_t stride_w;
    int pairs_t;
    int pairs_h;
    int grid_h;
    int grid_w;

    __device__ __forceinline__ float2 operator()(int64_t, int64_t s, int p) const {
        const detail::GridCoord c = detail::rope_grid_coord(s, grid_h, grid_w);
        const detail::AxisPair ap = detail::rope_3d_axis_pair(p, pairs_t, pairs_h);
        const float* entry = ap.axis == 0   ? table_t + c.t * stride_t
                             : ap.axis == 1 ? table_h + c.h * stride_h
                                            : table_w + c.w * stride_w;
        entry += 2 * ap.index;
        return make_float2(entry[0], entry[1]);
    }
};

// Rotate pairs [first_pair, first_pair + G) of one head.
template <typename T, int G, bool Vectorized, bool Interleaved>
__device__ __forceinline__ void rotate_group(T* head, const float2* angles, int first_pair, int rotary_dim) {
    if constexpr (Interleaved) {
        using P = Pack<T, 2 * G, Vectorized>;
        P* ptr = reinterpret_cast<P*>(head + 2 * first_pair);
        P x = *ptr;
#pragma unroll
        for (int j = 0; j < G; ++j) {
            const float2 cs = angles[first_pair + j];
            float y0, y1;
            detail::rope_rotate(to_float(x.v[2 * j]), to_float(x.v[2 * j + 1]), cs.x, cs.y, y0, y1);
            x.v[2 * j] = from_float<T>(y0);
            x.v[2 * j + 1] = from_float<T>(y1);
        }
        *ptr = x;
    } else {
        using P = Pack<T, G, Vectorized>;
        P* lo_ptr = reinterpret_cast<P*>(head + first_pair);
        P* hi_ptr = reinterpret_cast<P*>(head + first_pair + rotary_dim / 2);
        P lo = *lo_ptr;
        P hi = *hi_ptr;
#pragma unroll
        for (int j = 0; j < G; ++j) {
            const float2 cs = angles[first_pair + j];
            float y0, y1;
            detail::rope_rotate(to_float(lo.v[j]), to_float(hi.v[j]), cs.x, cs.y, y0, y1);
            lo.v[j] = from_float<T>(y0);
            hi.v[j] = from_float<T>(y1);
        }
        *lo_ptr = lo;
        *hi_ptr = hi;
    }
}

template <typename T, int G, bool Vectorized, bool Interleaved, typename Angles>
__global__ void __launch_bounds__(kThreads) rope_kernel(RopeTensors x, Angles angles) {
    __shared__ float2 rows[kTokensPerBlock][kMaxPairs];
    __shared__ int64_t q_offset[kTokensPerBlock];
    __shared__ int64_t k_offset[kTokensPerBlock];

    const int64_t first_token = int64_t(blockIdx.x) * kTokensPerBlock;
    const int64_t remaining = x.batch * x.seqlen - first_token;
    const int tokens = remaining < kTokensPerBlock ? int(remaining) : kTokensPerBlock;
    const int pairs = x.rotary_dim / 2;

    for (int i = threadIdx.x; i < tokens * pairs; i += blockDim.x) {
        const int t = i / pairs;
        const int p = i - t * pairs;
        const int64_t token = first_token + t;
        const int64_t b = token / x.seqlen;
        const int64_t s = token - b * x.seqlen;
        rows[t][p] = angles(b, s, p);
        if (p == 0) {
            q_offset[t] = b * x.q.batch_stride + s * x.q.token_stride;
            k_offset[t] = b * x.k.batch_stride + s * x.k.token_stride;
        }
    }
    __syncthreads();

    T* const q = static_cast<T*>(x.q.data);
    T* const k = static_cast<T*>(x.k.data);
    const int groups = pairs / G;
    const int heads = x.q.heads + x.k.heads;
    for (int i = threadIdx.x; i < tokens * heads * groups; i += blockDim.x) {
        const int g = i % groups;
        const int rest = i / groups;
        const int h = rest % heads;
        const int t = rest / heads;
        T* head = h < x.q.heads ? q + q_offset[t] + int64_t(h) * x.q.head_stride
                                : k + k_offset[t] + int64_t(h - x.q.heads) * x.k.head_stride;
        rotate_group<T, G, Vectorized, Interleaved>(head, rows[t], g * G, x.rotary_dim);
    }
}

// 16-byte accesses need 16-byte aligned bases and strides that are whole vectors, and whole
// vectors inside each rotated half (neox) or rotated span (interleaved).
inline bool can_vectorize(const RopeTensors& x, int elem_bytes, bool interleaved) {
    const int vec = 16 / elem_bytes;
    const auto aligned = [&](const RotatedTensor& r) {
        if (r.data == nullptr) return true;
        return reinterpret_cast<uintptr_t>(r.data) % 16 == 0 && r.batch_stride % vec == 0 &&
               r.token_stride % vec == 0 && r.head_stride % vec == 0;
    };
    const int span = interleaved ? x.rotary_dim : x.rotary_dim / 2;
    return aligned(x.q) && aligned(x.k) && span % vec == 0;
}

template <typename T, bool Interleaved, typename Angles>
cudaError_t launch_rope(const RopeTensors& x, const Angles& angles, cudaStream_t stream) {
    const int64_t tokens = x.batch * x.seqlen;
    if (tokens == 0 || x.rotary_dim == 0 || x.q.heads + x.k.heads == 0) return cudaSuccess;
    const dim3 grid(unsigned((tokens + kTokensPerBlock - 1) / kTokensPerBlock));
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kVecPairs = Interleaved ? kVec / 2 : kVec;
    if (can_vectorize(x, sizeof(T), Interleaved)) {
        rope_kernel<T, kVecPairs, true, Interleaved><<<grid, kThreads, 0, stream>>>(x, angles);
    } else {
        rope_kernel<T, 1, false, Interleaved><<<grid, kThreads, 0, stream>>>(x, angles);
    }
    return cudaGetLastError();
}

}  // namespace tkpy::rope
