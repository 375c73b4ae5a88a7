// Shared RoPE index math: which dims form a rotated pair, which axis a 3D pair belongs to, where a
// token sits in the (t, h, w) grid, and the rotation itself. The CUDA kernel and the CPU path both
// call these, so the CPU tests exercise the exact code the GPU runs.
#pragma once

#include <cstdint>

#include "tkpy/detail/hd.h"

namespace tkpy::detail {

// The two element indices of rotated pair p (0 <= p < rotary_dim / 2).
// Neox style pairs i with i + R/2; GPT-J (interleaved) style pairs 2p with 2p + 1.
struct PairElems {
    int first;
    int second;
};

TKPY_HD PairElems rope_pair_elems(int p, int rotary_dim, bool interleaved) {
    return interleaved ? PairElems{2 * p, 2 * p + 1} : PairElems{p, p + rotary_dim / 2};
}

// (x0, x1) rotated by the angle whose cosine and sine are (c, s).
TKPY_HD void rope_rotate(float x0, float x1, float c, float s, float& y0, float& y1) {
    y0 = x0 * c - x1 * s;
    y1 = x1 * c + x0 * s;
}

// Token s of a (T, H, W) grid laid out t-major, then h, then w.
struct GridCoord {
    int t;
    int h;
    int w;
};

TKPY_HD GridCoord rope_grid_coord(int64_t s, int grid_h, int grid_w) {
    const int64_t hw = int64_t(grid_h) * grid_w;
    const int t = int(s / hw);
    const int64_t rem = s - int64_t(t) * hw;
    return GridCoord{t, int(rem / grid_w), int(rem % grid_w)};
}

// Which axis (0 = t, 1 = h, 2 = w) rotated pair p of a 3D RoPE belongs to, and the pair's index
// inside that axis's table. pairs_t / pairs_h are the t and h dims divided by 2.
struct AxisPair {
    int axis;
    int index;
};

TKPY_HD AxisPair rope_3d_axis_pair(int p, int pairs_t, int pairs_h) {
    if (p < pairs_t) return AxisPair{0, p};
    if (p < pairs_t + pairs_h) return AxisPair{1, p - pairs_t};
    return AxisPair{2, p - pairs_t - pairs_h};
}

// Position of a token for 1D RoPE: its row in positions, or its index in the sequence.
// Returns -1 when the position is outside [0, table_rows), which the callers turn into an error
// (CPU) or NaN (CUDA, where a host sync is not allowed).
template <typename PosT>
TKPY_HD int64_t rope_position(const PosT* positions, int64_t batch_stride, int64_t b, int64_t s, int64_t table_rows) {
    const int64_t pos = positions ? int64_t(positions[b * batch_stride + s]) : s;
    return (pos >= 0 && pos < table_rows) ? pos : -1;
}

}  // namespace tkpy::detail
