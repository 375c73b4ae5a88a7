// Warpgroup matrix multiply-accumulate on wgmma: D (64 x N, fp32, in registers, 16 rows per warp)
// op= A (64 x K) * B (K x N).
//
// Naming follows ThunderKittens: mma_* accumulates (D += A*B; pass accumulate = false to overwrite
// instead, decided at run time), mm_* overwrites (D = A*B); a t
// after an operand says it is stored transposed: mma_ABt takes B as an [N][K] tile (K contiguous,
// "K-major"), mma_AB takes B as a [K][N] tile (N contiguous, "N-major"). A comes from a shared tile
// (rows a_row .. a_row + 63 of it) or from registers (rt<T, 16, K> per warp).
//
// wgmma is asynchronous: call mma_fence(d) before the first wgmma that touches D after other code
// wrote or read it, mma_commit_group() after issuing, and mma_async_wait<N>(d) before reading D or
// reusing the operands' shared memory. Descriptor bits: HOPPER_NOTES.md §2.
#pragma once

#include "../../../types/register/rt.cuh"
#include "../../../types/shared/st.cuh"
#include "wgmma_shapes.cuh"

namespace tk {
namespace detail {

__device__ inline uint64_t desc_encode(uint64_t x) { return (x & 0x3FFFF) >> 4; }

template <int Swizzle>
constexpr uint64_t desc_layout_type() {
    return Swizzle == 128 ? 1 : Swizzle == 64 ? 2 : 3;
}

// Descriptor of k-slice `k16` (16 columns) of a K-major tile, starting at row `row0` (a multiple of 8).
// The shared address of a tile, recomputed where it is used: the compiler cannot hoist the
// descriptors made from it out of a loop, where 16 of them (K = 256) would hold 16-32 registers
// across the whole loop.
template <shared_tile ST>
__device__ inline uint32_t opaque_addr(const ST& tile) {
    uint32_t addr = smem_addr(tile.data);
    asm volatile("" : "+r"(addr));
    return addr;
}

template <shared_tile ST>
__device__ inline uint64_t kmajor_desc(const ST& tile, int row0, int k16, uint32_t base) {
    const int col = 16 * k16;
    const uint32_t addr = base + (col / ST::chunk_cols) * ST::chunk_bytes + row0 * ST::swizzle +
                          (col % ST::chunk_cols) * sizeof(typename ST::dtype);
    return desc_encode(addr) | (uint64_t(1) << 16) | (desc_encode(8 * ST::swizzle) << 32) |
           (desc_layout_type<ST::swizzle>() << 62);
}

// Descriptor of k-slice `k16` (16 rows) of an MN-major tile [K][MN]: MN blocks of one swizzle width
// are ST::chunk_bytes apart (leading byte offset), 8-row groups 8 * swizzle bytes apart.
template <shared_tile ST>
__device__ inline uint64_t mnmajor_desc(const ST& tile, int k16, uint32_t base) {
    const uint32_t addr = base + 16 * k16 * ST::swizzle;
    return desc_encode(addr) | (desc_encode(ST::chunk_bytes) << 16) | (desc_encode(8 * ST::swizzle) << 32) |
           (desc_layout_type<ST::swizzle>() << 62);
}

template <shared_tile A, shared_tile B>
constexpr void check_operands() {
    static_assert(std::is_same_v<typename A::dtype, typename B::dtype>, "wgmma: A and B must share one element type");
    static_assert(mma_input<typename A::dtype>, "wgmma: inputs must be bf16 or half (fp32 accumulates)");
}

// The four bf16/half pairs of k-slice j of a register A operand.
template <tile_element T, int K>
__device__ inline void a_fragment(uint32_t (&out)[4], const rt<T, 16, K>& a, int j) {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = *reinterpret_cast<const uint32_t*>(&a.tiles[0][j].data[k]);
}

// Ties the accumulator registers to this point of the program, so the compiler neither reads
// nor writes them across it (CUTLASS's warpgroup_fence_operand).
template <int N>
__device__ inline void pin_accumulator(rt<float, 16, N>& d) {
#pragma unroll
    for (int j = 0; j < d.width; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) asm volatile("" : "+f"(d.tiles[0][j].data[k].x), "+f"(d.tiles[0][j].data[k].y)::"memory");
}

}  // namespace detail

namespace warpgroup {

// Must precede a wgmma whose accumulator or register A was touched by ordinary code.
template <int N>
__device__ inline void mma_fence(rt<float, 16, N>& d) {
    detail::pin_accumulator(d);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

// The same, for a wgmma that also reads A from registers: the code that wrote `a` (e.g. packing
// P to bf16) must not sink past the fence.
template <int N, tile_element T, int K>
__device__ inline void mma_fence(rt<float, 16, N>& d, rt<T, 16, K>& a) {
#pragma unroll
    for (int j = 0; j < a.width; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) asm volatile("" : "+r"(*reinterpret_cast<uint32_t*>(&a.tiles[0][j].data[k]))::"memory");
    mma_fence(d);
}

// Computes a register tile's pending values here: the compiler may neither sink their computation
// past this point nor hoist later reads above it. Between a wait for one wgmma group and the wait
// for the next, it keeps work meant to overlap the second (a softmax) ahead of its wait.
template <int R, int N>
__device__ inline void pin(rt<float, R, N>& x) {
    static_assert(R == 16, "pin: a warp's 16-row tile");
    detail::pin_accumulator(x);
}

__device__ inline void mma_commit_group() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Waits until at most N committed wgmma groups are still running, then pins d so that no read of
// the accumulator can be scheduled before the wait.
template <int N = 0, int Cols>
__device__ inline void mma_async_wait(rt<float, 16, Cols>& d) {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
    detail::pin_accumulator(d);
}

// D op= A * B^T: A [64+ rows][K] K-major (rows a_row..a_row+63), B [N][K] K-major.
template <int N, shared_tile A, shared_tile B>
__device__ inline void mma_ABt(rt<float, 16, N>& d, const A& a, const B& b, int a_row = 0, bool accumulate = true) {
    detail::check_operands<A, B>();
    static_assert(A::cols == B::cols, "mma_ABt: A and B must have the same K (columns)");
    static_assert(B::rows == N, "mma_ABt: B must have N rows");
    const uint32_t a_base = detail::opaque_addr(a), b_base = detail::opaque_addr(b);
#pragma unroll
    for (int k = 0; k < A::cols / 16; ++k) {
        detail::wgmma<typename A::dtype, N>::template ss<0, 0>(d, detail::kmajor_desc(a, a_row, k, a_base),
                                                                detail::kmajor_desc(b, 0, k, b_base), accumulate || k > 0);
    }
}

// D op= A * B: A [64+ rows][K] K-major, B [K][N] N-major.
template <int N, shared_tile A, shared_tile B>
__device__ inline void mma_AB(rt<float, 16, N>& d, const A& a, const B& b, int a_row = 0, bool accumulate = true) {
    detail::check_operands<A, B>();
    static_assert(A::cols == B::rows, "mma_AB: A's columns must equal B's rows (K)");
    static_assert(B::cols == N, "mma_AB: B must have N columns");
    const uint32_t a_base = detail::opaque_addr(a), b_base = detail::opaque_addr(b);
#pragma unroll
    for (int k = 0; k < A::cols / 16; ++k) {
        detail::wgmma<typename A::dtype, N>::template ss<0, 1>(d, detail::kmajor_desc(a, a_row, k, a_base),
                                                                detail::mnmajor_desc(b, k, b_base), accumulate || k > 0);
    }
}

// D op= A^T * B^T: A stored [K][64] M-major, B [N][K] K-major.
template <int N, shared_tile A, shared_tile B>
__device__ inline void mma_AtBt(rt<float, 16, N>& d, const A& a, const B& b, bool accumulate = true) {
    detail::check_operands<A, B>();
    static_assert(A::cols == 64, "mma_AtBt: A stored transposed must be [K][64]");
    static_assert(A::rows == B::cols && B::rows == N, "mma_AtBt: shapes must be A [K][64], B [N][K]");
    const uint32_t a_base = detail::opaque_addr(a), b_base = detail::opaque_addr(b);
#pragma unroll
    for (int k = 0; k < A::rows / 16; ++k) {
        detail::wgmma<typename A::dtype, N>::template ss<1, 0>(d, detail::mnmajor_desc(a, k, a_base),
                                                                detail::kmajor_desc(b, 0, k, b_base), accumulate || k > 0);
    }
}

// D op= A^T * B: A stored [K][64] M-major, B [K][N] N-major.
template <int N, shared_tile A, shared_tile B>
__device__ inline void mma_AtB(rt<float, 16, N>& d, const A& a, const B& b, bool accumulate = true) {
    detail::check_operands<A, B>();
    static_assert(A::cols == 64, "mma_AtB: A stored transposed must be [K][64]");
    static_assert(A::rows == B::rows && B::cols == N, "mma_AtB: shapes must be A [K][64], B [K][N]");
    const uint32_t a_base = detail::opaque_addr(a), b_base = detail::opaque_addr(b);
#pragma unroll
    for (int k = 0; k < A::rows / 16; ++k) {
        detail::wgmma<typename A::dtype, N>::template ss<1, 1>(d, detail::mnmajor_desc(a, k, a_base),
                                                                detail::mnmajor_desc(b, k, b_base), accumulate || k > 0);
    }
}

// D op= A * B^T with A in registers (this warp's 16 rows of the 64), B [N][K] K-major.
template <int N, tile_element T, int K, shared_tile B>
__device__ inline void mma_ABt(rt<float, 16, N>& d, const rt<T, 16, K>& a, const B& b, bool accumulate = true) {
    static_assert(std::is_same_v<T, typename B::dtype> && mma_input<T>, "wgmma: A and B must both be bf16 or half");
    static_assert(B::cols == K && B::rows == N, "mma_ABt: B must be [N][K]");
    const uint32_t b_base = detail::opaque_addr(b);
#pragma unroll
    for (int k = 0; k < K / 16; ++k) {
        uint32_t frag[4];
        detail::a_fragment(frag, a, k);
        detail::wgmma<T, N>::template rs<0>(d, frag, detail::kmajor_desc(b, 0, k, b_base), accumulate || k > 0);
    }
}

// D op= A * B with A in registers, B [K][N] N-major (P * V in attention).
template <int N, tile_element T, int K, shared_tile B>
__device__ inline void mma_AB(rt<float, 16, N>& d, const rt<T, 16, K>& a, const B& b, bool accumulate = true) {
    static_assert(std::is_same_v<T, typename B::dtype> && mma_input<T>, "wgmma: A and B must both be bf16 or half");
    static_assert(B::rows == K && B::cols == N, "mma_AB: B must be [K][N]");
    const uint32_t b_base = detail::opaque_addr(b);
#pragma unroll
    for (int k = 0; k < K / 16; ++k) {
        uint32_t frag[4];
        detail::a_fragment(frag, a, k);
        detail::wgmma<T, N>::template rs<1>(d, frag, detail::mnmajor_desc(b, k, b_base), accumulate || k > 0);
    }
}

// The overwriting forms: D = A * B (no zeroing of D needed).
template <int N, shared_tile A, shared_tile B>
__device__ inline void mm_ABt(rt<float, 16, N>& d, const A& a, const B& b, int a_row = 0) { mma_ABt(d, a, b, a_row, false); }
template <int N, shared_tile A, shared_tile B>
__device__ inline void mm_AB(rt<float, 16, N>& d, const A& a, const B& b, int a_row = 0) { mma_AB(d, a, b, a_row, false); }
template <int N, tile_element T, int K, shared_tile B>
__device__ inline void mm_ABt(rt<float, 16, N>& d, const rt<T, 16, K>& a, const B& b) { mma_ABt(d, a, b, false); }
template <int N, tile_element T, int K, shared_tile B>
__device__ inline void mm_AB(rt<float, 16, N>& d, const rt<T, 16, K>& a, const B& b) { mma_AB(d, a, b, false); }
template <int N, shared_tile A, shared_tile B>
__device__ inline void mm_AtB(rt<float, 16, N>& d, const A& a, const B& b) { mma_AtB(d, a, b, false); }
template <int N, shared_tile A, shared_tile B>
__device__ inline void mm_AtBt(rt<float, 16, N>& d, const A& a, const B& b) { mma_AtBt(d, a, b, false); }

}  // namespace warpgroup
}  // namespace tk
