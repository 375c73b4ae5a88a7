// Shared tiles and vectors. A shared tile's layout serves TMA and wgmma unchanged (layout.h).
#pragma once

#include "../../common/base.cuh"
#include "layout.h"

namespace tk {

template <tile_element T, int Rows, int Cols, int Swizzle = 128>
struct alignas(layout::kTileAlignment) st {
    static_assert(layout::valid_swizzle(Swizzle), "a shared tile's swizzle must be 32, 64 or 128 bytes");
    static_assert(Swizzle % sizeof(T) == 0 && (Cols * sizeof(T)) % Swizzle == 0,
                  "a shared tile's row must be a whole number of swizzle widths");
    static_assert(Rows > 0 && Rows % 8 == 0, "a shared tile's rows must be a positive multiple of 8 (one swizzle atom)");
    static_assert(Rows <= 256, "a shared tile's rows must be <= 256 (one TMA box)");
    using dtype = T;
    static constexpr int rows = Rows;
    static constexpr int cols = Cols;
    static constexpr int swizzle = Swizzle;
    static constexpr int chunk_cols = Swizzle / int(sizeof(T));  // columns per swizzle row
    static constexpr int chunks = Cols / chunk_cols;
    static constexpr int chunk_bytes = Rows * Swizzle;
    static constexpr int bytes = Rows * Cols * int(sizeof(T));

    T data[Rows * Cols];

    __device__ inline T* ptr(int row, int col) {
        return reinterpret_cast<T*>(reinterpret_cast<char*>(data) +
                                    layout::tile_offset(row, col, Rows, sizeof(T), Swizzle));
    }
    __device__ inline const T* ptr(int row, int col) const { return const_cast<st*>(this)->ptr(row, col); }
};

// Columns [index · C2, (index + 1) · C2) of a tile, as a tile of their own: the layout stores a
// tile as column chunks of one swizzle width, so whole chunks are a tile at the chunks' address
// (e.g. half of a 256-column operand as the B of a 128-column wgmma).
template <int C2, tile_element T, int R, int C, int S>
__device__ inline st<T, R, C2, S>& col_slice(st<T, R, C, S>& tile, int index) {
    using slice = st<T, R, C2, S>;
    static_assert(C % C2 == 0 && C2 % slice::chunk_cols == 0, "col_slice: the slice must be whole swizzle chunks");
    return *reinterpret_cast<slice*>(reinterpret_cast<char*>(tile.data) + index * slice::chunks * slice::chunk_bytes);
}
template <int C2, tile_element T, int R, int C, int S>
__device__ inline const st<T, R, C2, S>& col_slice(const st<T, R, C, S>& tile, int index) {
    return col_slice<C2>(const_cast<st<T, R, C, S>&>(tile), index);
}

template <int R, int C, int S = 128>
using st_bf = st<bf16, R, C, S>;
template <int R, int C, int S = 128>
using st_hf = st<half, R, C, S>;
template <int R, int C, int S = 128>
using st_fl = st<float, R, C, S>;

// The widest swizzle (128, 64 or 32 bytes) whose width divides a row of Cols elements of T: what a
// narrow N-major operand (e.g. [K][16] bf16, 32-byte rows) needs.
template <tile_element T, int Cols>
inline constexpr int widest_swizzle = (Cols * sizeof(T)) % 128 == 0 ? 128 : (Cols * sizeof(T)) % 64 == 0 ? 64 : 32;

template <tile_element T, int R, int C>
using st_widest = st<T, R, C, widest_swizzle<T, C>>;

template <typename X>
inline constexpr bool is_st = false;
template <tile_element T, int R, int C, int S>
inline constexpr bool is_st<st<T, R, C, S>> = true;

template <typename X>
concept shared_tile = is_st<X>;

// A shared vector, e.g. one value per row of a tile (softmax statistics, lse).
template <tile_element T, int Length>
struct alignas(16) sv {
    static_assert(Length > 0 && Length % 16 == 0, "a shared vector's length must be a positive multiple of 16");
    using dtype = T;
    static constexpr int length = Length;
    T data[Length];
};

// Carves aligned objects out of dynamic shared memory, in declaration order.
struct smem_allocator {
    char* next;

    __device__ explicit smem_allocator(void* base) : next(static_cast<char*>(base)) {}

    template <typename X, int Count = 1>
    __device__ X* allocate() {
        constexpr uintptr_t align = alignof(X);
        next = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(next) + align - 1) & ~(align - 1));
        X* out = reinterpret_cast<X*>(next);
        next += sizeof(X) * Count;
        return out;
    }
};

}  // namespace tk
