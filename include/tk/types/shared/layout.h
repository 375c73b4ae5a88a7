// Byte layout of a swizzled shared tile. Plain C++ (no CUDA), so host code and the CPU tests can
// compute the same offsets the kernels use.
//
// A tile of Rows x Cols elements is stored as Cols / chunk_cols column chunks, each a row-major
// [Rows][chunk_cols] block whose rows are exactly `swizzle` bytes (32, 64 or 128). Inside the
// tile, 16-byte units are XOR-swizzled on absolute address bits: bits [4, 4 + log2(swizzle/16))
// ^= bits [7, ...), the pattern TMA's SWIZZLE_{32,64,128}B and wgmma's descriptor modes share.
// The tile must start on a 1024-byte boundary (every swizzle pattern repeats within 1024 bytes).
#pragma once

#include <cstdint>

namespace tk::layout {

inline constexpr int kTileAlignment = 1024;

constexpr bool valid_swizzle(int swizzle_bytes) {
    return swizzle_bytes == 32 || swizzle_bytes == 64 || swizzle_bytes == 128;
}

// XOR-swizzle of a byte offset from a kTileAlignment-aligned base.
constexpr uint32_t swizzle(uint32_t byte, int swizzle_bytes) {
    return byte ^ (((byte % (8u * swizzle_bytes)) >> 7) << 4);
}

// Byte offset of element (row, col) in a tile of `rows` rows, elem_bytes per element.
constexpr uint32_t tile_offset(int row, int col, int rows, int elem_bytes, int swizzle_bytes) {
    const int chunk_cols = swizzle_bytes / elem_bytes;
    const int chunk = col / chunk_cols;
    const uint32_t linear = uint32_t(chunk) * rows * swizzle_bytes + uint32_t(row) * swizzle_bytes +
                            uint32_t(col % chunk_cols) * elem_bytes;
    return swizzle(linear, swizzle_bytes);
}

}  // namespace tk::layout
