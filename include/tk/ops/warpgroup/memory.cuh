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

// A shared tile = the global tile at (row0, col0), by the warpgroup's 128 threads. Callers sync
// (warpgroup::sync) before reading it, and fence_async_shared() first if wgmma or TMA reads it.
template <shared_tile ST, tile_element U>
__device__ inline void load(ST& dst, const gl<U>& src, int64_t row0, int64_t col0) {
    detail::cooperative_load<kWarpgroupThreads>(dst, src, row0, col0, threadIdx.x % kWarpgroupThreads);
}

template <tile_element U, shared_tile ST>
__device__ inline void store(const gl<U>& dst, const ST& src, int64_t row0, int64_t col0) {
    detail::cooperative_store<kWarpgroupThreads>(dst, src, row0, col0, threadIdx.x % kWarpgroupThreads);
}

}  // namespace tk::warpgroup
