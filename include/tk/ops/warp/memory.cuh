// Warp-scope moves between register tiles and global or shared memory. Global accesses are masked
// at the matrix edge: loads read 0 there, stores skip it, so tails need no padding.
#pragma once

#include "../../types/global/gl.cuh"
#include "../../types/register/rt.cuh"
#include "../../types/shared/st.cuh"

namespace tk {
namespace detail {

// Threads threads copy a global tile into a shared tile, element by element, converting the type
// and reading 0 past the matrix edge. For tiles TMA cannot move (unaligned strides) or that are
// too small to be worth a tensor map.
template <int Threads, shared_tile ST, tile_element U>
__device__ inline void cooperative_load(ST& dst, const gl<U>& src, int64_t row0, int64_t col0, int thread) {
    using T = typename ST::dtype;
    for (int i = thread; i < ST::rows * ST::cols; i += Threads) {
        const int r = i / ST::cols;
        const int c = i % ST::cols;
        const bool inside = row0 + r < src.rows && col0 + c < src.cols;
        *dst.ptr(r, c) = from_float<T>(inside ? to_float(*src.ptr(row0 + r, col0 + c)) : 0.f);
    }
}

template <int Threads, tile_element U, shared_tile ST>
__device__ inline void cooperative_store(const gl<U>& dst, const ST& src, int64_t row0, int64_t col0, int thread) {
    for (int i = thread; i < ST::rows * ST::cols; i += Threads) {
        const int r = i / ST::cols;
        const int c = i % ST::cols;
        if (row0 + r < dst.rows && col0 + c < dst.cols) *dst.ptr(row0 + r, col0 + c) = from_float<U>(to_float(*src.ptr(r, c)));
    }
}

}  // namespace detail

namespace warp {

// A shared tile = the global tile at (row0, col0), by this warp's 32 threads (masked at the edge).
template <shared_tile ST, tile_element U>
__device__ inline void load(ST& dst, const gl<U>& src, int64_t row0, int64_t col0) {
    detail::cooperative_load<kWarpThreads>(dst, src, row0, col0, laneid());
}

template <tile_element U, shared_tile ST>
__device__ inline void store(const gl<U>& dst, const ST& src, int64_t row0, int64_t col0) {
    detail::cooperative_store<kWarpThreads>(dst, src, row0, col0, laneid());
}

// dst = src[row0 .., col0 ..], converted to dst's element type.
template <tile_element T, int R, int C, tile_element U>
__device__ inline void load(rt<T, R, C>& dst, const gl<U>& src, int64_t row0, int64_t col0) {
#pragma unroll
    for (int i = 0; i < dst.height; ++i)
#pragma unroll
        for (int j = 0; j < dst.width; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int64_t r = row0 + 16 * i + base_row(k);
                const int64_t c = col0 + 16 * j + base_col(k);
                const bool row_in = r < src.rows;
                const float x = row_in && c < src.cols ? to_float(*src.ptr(r, c)) : 0.f;
                const float y = row_in && c + 1 < src.cols ? to_float(*src.ptr(r, c + 1)) : 0.f;
                dst.tiles[i][j].data[k] = from_float2<T>(make_float2(x, y));
            }
}

template <tile_element U, tile_element T, int R, int C>
__device__ inline void store(const gl<U>& dst, const rt<T, R, C>& src, int64_t row0, int64_t col0) {
#pragma unroll
    for (int i = 0; i < src.height; ++i)
#pragma unroll
        for (int j = 0; j < src.width; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int64_t r = row0 + 16 * i + base_row(k);
                const int64_t c = col0 + 16 * j + base_col(k);
                if (r >= dst.rows) continue;
                const float2 v = to_float2<T>(src.tiles[i][j].data[k]);
                if (c < dst.cols) *dst.ptr(r, c) = from_float<U>(v.x);
                if (c + 1 < dst.cols) *dst.ptr(r, c + 1) = from_float<U>(v.y);
            }
}

// dst = rows row0 .. row0 + R - 1 of a shared tile, converted to dst's element type.
template <tile_element T, int R, int C, shared_tile ST>
__device__ inline void load(rt<T, R, C>& dst, const ST& src, int row0 = 0) {
    using S = typename ST::dtype;
    static_assert(C == ST::cols && R <= ST::rows, "warp::load: the register tile must fit the shared tile");
#pragma unroll
    for (int i = 0; i < dst.height; ++i)
#pragma unroll
        for (int j = 0; j < dst.width; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                // Two adjacent even/odd columns never straddle a 16-byte swizzle unit.
                const packed_t<S> v =
                    *reinterpret_cast<const packed_t<S>*>(src.ptr(row0 + 16 * i + base_row(k), 16 * j + base_col(k)));
                dst.tiles[i][j].data[k] = from_float2<T>(to_float2<S>(v));
            }
}

// Rows row0 .. row0 + R - 1 of a shared tile = src, converted to the tile's element type.
template <shared_tile ST, tile_element T, int R, int C>
__device__ inline void store(ST& dst, const rt<T, R, C>& src, int row0 = 0) {
    using S = typename ST::dtype;
    static_assert(C == ST::cols && R <= ST::rows, "warp::store: the register tile must fit the shared tile");
#pragma unroll
    for (int i = 0; i < src.height; ++i)
#pragma unroll
        for (int j = 0; j < src.width; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                *reinterpret_cast<packed_t<S>*>(dst.ptr(row0 + 16 * i + base_row(k), 16 * j + base_col(k))) =
                    from_float2<S>(to_float2<T>(src.tiles[i][j].data[k]));
            }
}

// dst += srcᵀ element-wise in global memory: dst(row0 + c, col0 + r) += src(r, c), by fp32
// reductions (RED, nothing comes back): for a product computed transposed (e.g. dQᵀ) that several
// CTAs add into. Rows of dst past dst.rows are skipped; the columns must lie inside dst.
template <int R, int C>
__device__ inline void atomic_add_transposed(const gl<float>& dst, const rt<float, R, C>& src, int64_t row0,
                                             int64_t col0) {
    static_assert(R == 16, "warp::atomic_add_transposed: a warp's 16 rows");
#pragma unroll
    for (int j = 0; j < src.width; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int64_t r = row0 + 16 * j + base_col(k);  // src's columns are dst's rows
            float* const at = dst.ptr(r, col0 + base_row(k));
            const float2 v = src.tiles[0][j].data[k];
            if (r < dst.rows) asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(at), "f"(v.x) : "memory");
            if (r + 1 < dst.rows) {
                asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(at + dst.row_stride), "f"(v.y) : "memory");
            }
        }
}

// A per-row vector to global memory (one lane per quad writes; rows past `rows` are skipped).
template <tile_element U, tile_element T, int R>
__device__ inline void store(U* dst, const rv_rows<T, R>& src, int64_t row0, int64_t rows) {
    if (laneid() % 4 != 0) return;
#pragma unroll
    for (int i = 0; i < R / 16; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t r = row0 + 16 * i + laneid() / 4 + 8 * h;
            if (r < rows) dst[r] = from_float<U>(to_float(src.data[i][h]));
        }
}

// A per-column vector to global memory (lanes 0..3 hold every column once; columns past `cols`
// are skipped).
template <tile_element U, tile_element T, int C>
__device__ inline void store(U* dst, const rv_cols<T, C>& src, int64_t col0, int64_t cols) {
    if (laneid() >= 4) return;
#pragma unroll
    for (int j = 0; j < C / 16; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int64_t c = col0 + 16 * j + 2 * laneid() + 8 * (k >> 1) + (k & 1);
            if (c < cols) dst[c] = from_float<U>(to_float(src.data[j][k]));
        }
}

}  // namespace warp
}  // namespace tk
