// TMA: whole shared tiles to and from global memory, issued by one thread. Loads complete on an
// mbarrier (expect_tx the tile's bytes first, the full box even when it hangs off the matrix:
// out-of-range elements arrive as zeros). Stores clip at the matrix edge.
#pragma once

#include "../pipeline/sync.cuh"
#include "../types/global/gl.cuh"

namespace tk::tma {

__device__ inline void prefetch_map(const CUtensorMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Loads the tile whose top-left element is (row, col) of the global matrix into dst.
template <shared_tile ST>
__device__ inline void load_async(ST& dst, const tma_gl<ST>& src, int row, int col, barrier& bar) {
#pragma unroll
    for (int c = 0; c < ST::chunks; ++c) {
        asm volatile(
            "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
                smem_addr(reinterpret_cast<char*>(dst.data) + c * ST::chunk_bytes)),
            "l"(reinterpret_cast<uint64_t>(&src.map)), "r"(col + c * ST::chunk_cols), "r"(row), "r"(smem_addr(&bar))
            : "memory");
    }
}

// Stores src to the tile of the global matrix whose top-left element is (row, col). Writers of
// src must have run fence_async_shared() and synchronised first.
template <shared_tile ST>
__device__ inline void store_async(const tma_gl<ST>& dst, const ST& src, int row, int col) {
#pragma unroll
    for (int c = 0; c < ST::chunks; ++c) {
        asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.tile.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                         reinterpret_cast<uint64_t>(&dst.map)),
                     "r"(col + c * ST::chunk_cols), "r"(row),
                     "r"(smem_addr(reinterpret_cast<const char*>(src.data) + c * ST::chunk_bytes))
                     : "memory");
    }
}

// Like store_async, but adds src element-wise into global memory.
template <shared_tile ST>
__device__ inline void store_add_async(const tma_gl<ST>& dst, const ST& src, int row, int col) {
#pragma unroll
    for (int c = 0; c < ST::chunks; ++c) {
        asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                         reinterpret_cast<uint64_t>(&dst.map)),
                     "r"(col + c * ST::chunk_cols), "r"(row),
                     "r"(smem_addr(reinterpret_cast<const char*>(src.data) + c * ST::chunk_bytes))
                     : "memory");
    }
}

// Loads a shared vector from contiguous global memory (a 1-D bulk copy: src 16-byte aligned), for
// what has no tensor map, e.g. per-row statistics laid out for it.
template <tile_element T, int N>
__device__ inline void load_async(sv<T, N>& dst, const T* src, barrier& bar) {
    static_assert(sizeof(T) * N % 16 == 0, "a bulk copy moves whole 16-byte units");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     smem_addr(dst.data)),
                 "l"(reinterpret_cast<uint64_t>(src)), "n"(int(sizeof(T) * N)), "r"(smem_addr(&bar))
                 : "memory");
}

// Loads the tile at (batch, row, head) of a 4-D tensor: rows row .. row + ST::rows - 1.
template <shared_tile ST>
__device__ inline void load_async(ST& dst, const tma_gl4<ST>& src, int batch, int row, int head, barrier& bar) {
#pragma unroll
    for (int c = 0; c < ST::chunks; ++c) {
        asm volatile(
            "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(
                smem_addr(reinterpret_cast<char*>(dst.data) + c * ST::chunk_bytes)),
            "l"(reinterpret_cast<uint64_t>(&src.map)), "r"(c * ST::chunk_cols), "r"(head), "r"(row), "r"(batch),
            "r"(smem_addr(&bar))
            : "memory");
    }
}

template <shared_tile ST>
__device__ inline void store_async(const tma_gl4<ST>& dst, const ST& src, int batch, int row, int head) {
#pragma unroll
    for (int c = 0; c < ST::chunks; ++c) {
        asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(
                         reinterpret_cast<uint64_t>(&dst.map)),
                     "r"(c * ST::chunk_cols), "r"(head), "r"(row), "r"(batch),
                     "r"(smem_addr(reinterpret_cast<const char*>(src.data) + c * ST::chunk_bytes))
                     : "memory");
    }
}

// Closes the group of stores issued since the last commit.
__device__ inline void store_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }

// Waits until at most N committed store groups still read shared memory (their tiles are reusable).
template <int N = 0>
__device__ inline void store_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}

// Waits until at most N committed store groups are incomplete (their writes are visible).
template <int N = 0>
__device__ inline void store_wait() {
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace tk::tma
