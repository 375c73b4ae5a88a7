// Warpgroup-scope moves between shared tiles and register tiles: the warpgroup holds a tile of
// 4 * R rows, warp w its rows [w * R, (w + 1) * R) -- the split wgmma uses for its 64-row operands.
#pragma once

#include "../warp/memory.cuh"

namespace tk::warpgroup {

template <tile_element T, int R, int C, shared_tile ST>
__device__ inline void load(rt<T, R, C>& dst, const ST& src) {
    static_assert(ST::rows == 4 * R, "warpgroup::load: the shared tile must have 4x the warp tile's rows");
    warp::load(dst, src, warpid_in_warpgroup() * R);
}

template <shared_tile ST, tile_element T, int R, int C>
__device__ inline void store(ST& dst, const rt<T, R, C>& src) {
    static_assert(ST::rows == 4 * R, "warpgroup::store: the shared tile must have 4x the warp tile's rows");
    warp::store(dst, src, warpid_in_warpgroup() * R);
}

}  // namespace tk::warpgroup
