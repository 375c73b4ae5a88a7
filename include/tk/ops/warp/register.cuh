// Warp-scope operations on register tiles and vectors: fill, element-wise maps, exp2, conversions,
// row and column reductions and broadcasts. All are destination first and work in fp32 internally.
#pragma once

#include "../../types/register/rv.cuh"
#include "../../types/shared/st.cuh"

namespace tk {
namespace ops {

struct sum {
    __device__ static float identity() { return 0.f; }
    __device__ static float apply(float a, float b) { return a + b; }
};
struct max {
    __device__ static float identity() { return -__int_as_float(0x7f800000); }  // -inf
    __device__ static float apply(float a, float b) { return fmaxf(a, b); }
};
struct min {
    __device__ static float identity() { return __int_as_float(0x7f800000); }
    __device__ static float apply(float a, float b) { return fminf(a, b); }
};

}  // namespace ops

namespace warp {

// dst[i] = f(src[i]) for every element, with f taking and returning float. Also converts types.
template <tile_element TD, tile_element TS, int R, int C, typename F>
__device__ inline void map(rt<TD, R, C>& dst, const rt<TS, R, C>& src, F f) {
#pragma unroll
    for (int i = 0; i < dst.height; ++i)
#pragma unroll
        for (int j = 0; j < dst.width; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 v = to_float2<TS>(src.tiles[i][j].data[k]);
                dst.tiles[i][j].data[k] = from_float2<TD>(make_float2(f(v.x), f(v.y)));
            }
}

// dst[i] = f(a[i], b[i]).
template <tile_element T, int R, int C, typename F>
__device__ inline void map(rt<T, R, C>& dst, const rt<T, R, C>& a, const rt<T, R, C>& b, F f) {
#pragma unroll
    for (int i = 0; i < dst.height; ++i)
#pragma unroll
        for (int j = 0; j < dst.width; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 x = to_float2<T>(a.tiles[i][j].data[k]);
                const float2 y = to_float2<T>(b.tiles[i][j].data[k]);
                dst.tiles[i][j].data[k] = from_float2<T>(make_float2(f(x.x, y.x), f(x.y, y.y)));
            }
}

template <tile_element T, int R, int C>
__device__ inline void fill(rt<T, R, C>& dst, float value) {
    map(dst, dst, [value](float) { return value; });
}

template <tile_element T, int R, int C>
__device__ inline void zero(rt<T, R, C>& dst) { fill(dst, 0.f); }

// Element type conversion (e.g. fp32 accumulator to a bf16 A operand).
template <tile_element TD, tile_element TS, int R, int C>
__device__ inline void copy(rt<TD, R, C>& dst, const rt<TS, R, C>& src) {
    map(dst, src, [](float v) { return v; });
}

template <tile_element TD, tile_element TS, int R, int C>
__device__ inline void exp2(rt<TD, R, C>& dst, const rt<TS, R, C>& src) {
    map(dst, src, [](float v) { return exp2f(v); });
}

template <tile_element T, int R, int C>
__device__ inline void mul(rt<T, R, C>& dst, const rt<T, R, C>& src, float scalar) {
    map(dst, src, [scalar](float v) { return v * scalar; });
}

template <tile_element T, int R, int C>
__device__ inline void add(rt<T, R, C>& dst, const rt<T, R, C>& a, const rt<T, R, C>& b) {
    map(dst, a, b, [](float x, float y) { return x + y; });
}

template <tile_element T, int R, int C>
__device__ inline void sub(rt<T, R, C>& dst, const rt<T, R, C>& a, const rt<T, R, C>& b) {
    map(dst, a, b, [](float x, float y) { return x - y; });
}

template <tile_element T, int R, int C>
__device__ inline void mul(rt<T, R, C>& dst, const rt<T, R, C>& a, const rt<T, R, C>& b) {
    map(dst, a, b, [](float x, float y) { return x * y; });
}

// Per-row vectors: every lane holds its rows' values (rows g and g + 8 of each 16-row band).
template <tile_element T, int R, typename F>
__device__ inline void map(rv_rows<T, R>& dst, const rv_rows<T, R>& src, F f) {
#pragma unroll
    for (int i = 0; i < R / 16; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) dst.data[i][h] = from_float<T>(f(to_float(src.data[i][h])));
}

template <tile_element T, int R, typename F>
__device__ inline void map(rv_rows<T, R>& dst, const rv_rows<T, R>& a, const rv_rows<T, R>& b, F f) {
#pragma unroll
    for (int i = 0; i < R / 16; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) dst.data[i][h] = from_float<T>(f(to_float(a.data[i][h]), to_float(b.data[i][h])));
}

template <tile_element T, int R>
__device__ inline void fill(rv_rows<T, R>& dst, float value) {
    map(dst, dst, [value](float) { return value; });
}

template <tile_element T, int R>
__device__ inline void copy(rv_rows<T, R>& dst, const rv_rows<T, R>& src) {
    map(dst, src, [](float v) { return v; });
}

// vec[r] = Op over the columns of row r. Register k of a base tile is in row g + 8 * (k & 1);
// the 4 lanes of a quad (same g) hold the row's other columns, so a quad shuffle finishes it.
// With `accum`, vec[r] = Op(accum[r], that); without `Quad`, each lane keeps its own columns' part
// (a running sum can add the quad's parts once, at the end: complete_row_sum).
template <typename Op, bool Quad = true, tile_element TV, tile_element T, int R, int C>
__device__ inline void row_reduce(rv_rows<TV, R>& vec, const rt<T, R, C>& src, const rv_rows<TV, R>* accum = nullptr) {
#pragma unroll
    for (int i = 0; i < src.height; ++i) {
        float acc[2] = {Op::identity(), Op::identity()};
#pragma unroll
        for (int j = 0; j < src.width; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 v = to_float2<T>(src.tiles[i][j].data[k]);
                acc[k & 1] = Op::apply(acc[k & 1], Op::apply(v.x, v.y));
            }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if constexpr (Quad) {
                acc[h] = Op::apply(acc[h], __shfl_xor_sync(0xffffffff, acc[h], 1));
                acc[h] = Op::apply(acc[h], __shfl_xor_sync(0xffffffff, acc[h], 2));
            }
            if (accum != nullptr) acc[h] = Op::apply(to_float(accum->data[i][h]), acc[h]);
            vec.data[i][h] = from_float<TV>(acc[h]);
        }
    }
}

// vec[c] = Op over the rows of column c. Lanes with the same t (lane % 4) hold the column's
// other rows: shuffles across g (lane bits 2..4) finish it.
template <typename Op, tile_element TV, tile_element T, int R, int C>
__device__ inline void col_reduce(rv_cols<TV, C>& vec, const rt<T, R, C>& src) {
#pragma unroll
    for (int j = 0; j < src.width; ++j) {
        float acc[4] = {Op::identity(), Op::identity(), Op::identity(), Op::identity()};
#pragma unroll
        for (int i = 0; i < src.height; ++i)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 v = to_float2<T>(src.tiles[i][j].data[k]);
                const int c = 2 * (k >> 1);  // registers 0,1 hold cols 2t,2t+1; 2,3 hold 2t+8,2t+9
                acc[c] = Op::apply(acc[c], v.x);
                acc[c + 1] = Op::apply(acc[c + 1], v.y);
            }
#pragma unroll
        for (int c = 0; c < 4; ++c) {
#pragma unroll
            for (int mask = 4; mask < 32; mask <<= 1) acc[c] = Op::apply(acc[c], __shfl_xor_sync(0xffffffff, acc[c], mask));
            vec.data[j][c] = from_float<TV>(acc[c]);
        }
    }
}

template <typename V, typename RT>
__device__ inline void row_max(V& vec, const RT& src) { row_reduce<ops::max>(vec, src); }
template <typename V, typename RT>
__device__ inline void row_sum(V& vec, const RT& src) { row_reduce<ops::sum>(vec, src); }
// Accumulating forms: vec = max(accum, row max of src), vec = accum + row sum of src.
template <typename V, typename RT>
__device__ inline void row_max(V& vec, const RT& src, const V& accum) { row_reduce<ops::max>(vec, src, &accum); }
template <typename V, typename RT>
__device__ inline void row_sum(V& vec, const RT& src, const V& accum) { row_reduce<ops::sum>(vec, src, &accum); }
// vec = accum + this lane's part of the row sum of src: no shuffle. A running sum built this way
// is whole only after complete_row_sum.
template <typename V, typename RT>
__device__ inline void row_partial_sum(V& vec, const RT& src, const V& accum) {
    row_reduce<ops::sum, false>(vec, src, &accum);
}
// Adds up the quad's parts of a row sum made by row_partial_sum.
template <tile_element T, int R>
__device__ inline void complete_row_sum(rv_rows<T, R>& vec) {
#pragma unroll
    for (int i = 0; i < R / 16; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float v = to_float(vec.data[i][h]);
            v += __shfl_xor_sync(0xffffffff, v, 1);
            v += __shfl_xor_sync(0xffffffff, v, 2);
            vec.data[i][h] = from_float<T>(v);
        }
}
template <typename V, typename RT>
__device__ inline void col_max(V& vec, const RT& src) { col_reduce<ops::max>(vec, src); }
template <typename V, typename RT>
__device__ inline void col_sum(V& vec, const RT& src) { col_reduce<ops::sum>(vec, src); }

// dst[r][c] = f(src[r][c], vec[r]).
template <tile_element T, tile_element TV, int R, int C, typename F>
__device__ inline void broadcast_rows(rt<T, R, C>& dst, const rt<T, R, C>& src, const rv_rows<TV, R>& vec, F f) {
#pragma unroll
    for (int i = 0; i < dst.height; ++i)
#pragma unroll
        for (int j = 0; j < dst.width; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 v = to_float2<T>(src.tiles[i][j].data[k]);
                const float s = to_float(vec.data[i][k & 1]);
                dst.tiles[i][j].data[k] = from_float2<T>(make_float2(f(v.x, s), f(v.y, s)));
            }
}

// dst[r][c] = f(src[r][c], vec[c]).
template <tile_element T, tile_element TV, int R, int C, typename F>
__device__ inline void broadcast_cols(rt<T, R, C>& dst, const rt<T, R, C>& src, const rv_cols<TV, C>& vec, F f) {
#pragma unroll
    for (int i = 0; i < dst.height; ++i)
#pragma unroll
        for (int j = 0; j < dst.width; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 v = to_float2<T>(src.tiles[i][j].data[k]);
                const int c = 2 * (k >> 1);
                dst.tiles[i][j].data[k] = from_float2<T>(
                    make_float2(f(v.x, to_float(vec.data[j][c])), f(v.y, to_float(vec.data[j][c + 1]))));
            }
}

// dst[r][c] = f(a[r][c], b[r][c], vec[c]) with vec a shared vector (one value per column): each
// lane reads its 4 columns of a 16-column band as it goes, so no per-column register vector is
// held across the tile (for kernels whose accumulators leave no room for one).
template <tile_element T, tile_element TV, int R, int C, typename F>
__device__ inline void broadcast_cols(rt<T, R, C>& dst, const rt<T, R, C>& a, const rt<T, R, C>& b,
                                      const sv<TV, C>& vec, F f) {
#pragma unroll
    for (int j = 0; j < dst.width; ++j) {
        const int col = 16 * j + 2 * (laneid() % 4);
        const float2 lo = to_float2<TV>(*reinterpret_cast<const packed_t<TV>*>(&vec.data[col]));
        const float2 hi = to_float2<TV>(*reinterpret_cast<const packed_t<TV>*>(&vec.data[col + 8]));
#pragma unroll
        for (int i = 0; i < dst.height; ++i)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 x = to_float2<T>(a.tiles[i][j].data[k]);
                const float2 y = to_float2<T>(b.tiles[i][j].data[k]);
                const float2 v = k >> 1 ? hi : lo;
                dst.tiles[i][j].data[k] = from_float2<T>(make_float2(f(x.x, y.x, v.x), f(x.y, y.y, v.y)));
            }
    }
}

// dst[r][c] = f(src[r][c], vec[c]) with vec a shared vector, as above.
template <tile_element T, tile_element TV, int R, int C, typename F>
__device__ inline void broadcast_cols(rt<T, R, C>& dst, const rt<T, R, C>& src, const sv<TV, C>& vec, F f) {
    broadcast_cols(dst, src, src, vec, [f](float x, float, float v) { return f(x, v); });
}

// rows[r] = f(r) for each row r (0 .. R - 1, tile-relative) this lane holds: 2 per 16-row band.
template <typename X, int R, typename F>
__device__ inline void make_rows(row_values<X, R>& rows, F f) {
#pragma unroll
    for (int i = 0; i < R / 16; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) rows.data[i][h] = f(16 * i + laneid() / 4 + 8 * h);
}

// dst[r] = f(src[r]) for each row this lane holds.
template <typename Y, typename X, int R, typename F>
__device__ inline void map_rows(row_values<Y, R>& dst, const row_values<X, R>& src, F f) {
#pragma unroll
    for (int i = 0; i < R / 16; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) dst.data[i][h] = f(src.data[i][h]);
}

// dst = src where rows[r].contains(col0 + c), `fill` elsewhere: a mask described row by row (e.g.
// the keys a query row sees), so the per-row work is done once per row, not per element.
template <tile_element T, int R, int C, typename X>
__device__ inline void mask(rt<T, R, C>& dst, const rt<T, R, C>& src, const row_values<X, R>& rows, int col0,
                            float fill) {
#pragma unroll
    for (int i = 0; i < dst.height; ++i)
#pragma unroll
        for (int j = 0; j < dst.width; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const X& row = rows.data[i][k & 1];
                const int col = col0 + 16 * j + 2 * (laneid() % 4) + 8 * (k >> 1);
                const float2 v = to_float2<T>(src.tiles[i][j].data[k]);
                dst.tiles[i][j].data[k] =
                    from_float2<T>(make_float2(row.contains(col) ? v.x : fill, row.contains(col + 1) ? v.y : fill));
            }
}

template <typename RT, typename V>
__device__ inline void sub_row(RT& dst, const RT& src, const V& vec) {
    broadcast_rows(dst, src, vec, [](float x, float s) { return x - s; });
}
template <typename RT, typename V>
__device__ inline void mul_row(RT& dst, const RT& src, const V& vec) {
    broadcast_rows(dst, src, vec, [](float x, float s) { return x * s; });
}
template <typename RT, typename V>
__device__ inline void div_row(RT& dst, const RT& src, const V& vec) {
    broadcast_rows(dst, src, vec, [](float x, float s) { return x / s; });
}
template <typename RT, typename V>
__device__ inline void add_col(RT& dst, const RT& src, const V& vec) {
    broadcast_cols(dst, src, vec, [](float x, float s) { return x + s; });
}
template <typename RT, typename V>
__device__ inline void mul_col(RT& dst, const RT& src, const V& vec) {
    broadcast_cols(dst, src, vec, [](float x, float s) { return x * s; });
}

}  // namespace warp
}  // namespace tk
