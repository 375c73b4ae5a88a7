// Register tiles: a tile held by one warp, in the fragment layout of mma and wgmma.
//
// A tile is a grid of 16x16 base tiles. In each base tile, lane l (g = l / 4, t = l % 4) holds
//   data[0] = (row g,     cols 2t, 2t+1)    data[2] = (row g,     cols 2t+8, 2t+9)
//   data[1] = (row g + 8, cols 2t, 2t+1)    data[3] = (row g + 8, cols 2t+8, 2t+9)
// which is exactly the m64nNk16 wgmma accumulator of the warp's 16 rows (registers 8j..8j+7 of
// base tile j), and, packed to bf16/half pairs, wgmma's register A operand for k-slice j.
#pragma once

#include "../../common/base.cuh"

namespace tk {

template <tile_element T>
struct rt_base {
    using dtype = T;
    using T2 = packed_t<T>;
    T2 data[4];
};

template <tile_element T, int Rows, int Cols>
struct rt {
    static_assert(Rows > 0 && Rows % 16 == 0, "a register tile's rows must be a positive multiple of 16");
    static_assert(Cols > 0 && Cols % 16 == 0, "a register tile's columns must be a positive multiple of 16");
    using dtype = T;
    static constexpr int rows = Rows;
    static constexpr int cols = Cols;
    static constexpr int height = Rows / 16;  // base tiles down
    static constexpr int width = Cols / 16;   // base tiles across
    rt_base<T> tiles[height][width];
};

template <int R, int C>
using rt_fl = rt<float, R, C>;
template <int R, int C>
using rt_bf = rt<bf16, R, C>;
template <int R, int C>
using rt_hf = rt<half, R, C>;

template <typename X>
inline constexpr bool is_rt = false;
template <tile_element T, int R, int C>
inline constexpr bool is_rt<rt<T, R, C>> = true;

template <typename X>
concept register_tile = is_rt<X>;

// Where base-tile register k (0..3) of a lane sits inside its 16x16 base tile.
__device__ inline int base_row(int k) { return laneid() / 4 + 8 * (k & 1); }
__device__ inline int base_col(int k) { return 2 * (laneid() % 4) + 8 * (k >> 1); }

}  // namespace tk
