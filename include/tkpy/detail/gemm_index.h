// Tile order of the persistent GEMM, shared with the CPU tests: task t -> output tile (m, n).
// Tasks go down bands of `group_m` tile rows, column by column, so CTAs running at the same time
// share the same few B column blocks and A row blocks in L2.
#pragma once

#include <cstdint>

#include "tkpy/detail/hd.h"

namespace tkpy::detail {

struct TileCoord {
    int m;
    int n;
};

TKPY_HD TileCoord gemm_tile_coord(int task, int tiles_m, int tiles_n, int group_m) {
    const int band_tasks = group_m * tiles_n;
    const int band = task / band_tasks;
    const int first_m = band * group_m;
    const int band_rows = (tiles_m - first_m) < group_m ? (tiles_m - first_m) : group_m;
    const int in_band = task - band * band_tasks;
    return TileCoord{first_m + in_band % band_rows, in_band / band_rows};
}

TKPY_HD int ceil_div(int64_t a, int b) { return int((a + b - 1) / b); }

}  // namespace tkpy::detail
