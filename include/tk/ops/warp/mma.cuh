// Warp-scope tensor-core ops: mma.sync m16n8k16 on 16x16 base tiles, and the ldmatrix loads that
// fill its operands from shared tiles.
//
// For small-M work (decode: a handful of query rows against a long run of keys) a 64-row wgmma
// tile would be mostly padding; mma.sync lets each warp own 16 rows and its own keys.
//
// Operand convention: every operand is an rt_base (16x16, the fragment layout of rt.cuh) holding a
// matrix with the reduction dimension K along its columns. mma_ABt(d, a, b) is d += a · bᵀ with
// a = [M=16][K=16] and b = [N=16][K=16]; registers 0/2 of b are the first n8 half, 1/3 the second.
#pragma once

#include "../../types/register/rt.cuh"
#include "../../types/shared/st.cuh"

namespace tk {
namespace detail {

template <mma_input T>
__device__ inline uint32_t as_b32(const packed_t<T>& v) {
    return *reinterpret_cast<const uint32_t*>(&v);
}

template <mma_input T>
__device__ inline void mma_m16n8k16(float2& d_lo, float2& d_hi, const rt_base<T>& a, uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same_v<T, bf16>) {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d_lo.x), "+f"(d_lo.y), "+f"(d_hi.x), "+f"(d_hi.y)
            : "r"(as_b32<T>(a.data[0])), "r"(as_b32<T>(a.data[1])), "r"(as_b32<T>(a.data[2])),
              "r"(as_b32<T>(a.data[3])), "r"(b0), "r"(b1));
    } else {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d_lo.x), "+f"(d_lo.y), "+f"(d_hi.x), "+f"(d_hi.y)
            : "r"(as_b32<T>(a.data[0])), "r"(as_b32<T>(a.data[1])), "r"(as_b32<T>(a.data[2])),
              "r"(as_b32<T>(a.data[3])), "r"(b0), "r"(b1));
    }
}

}  // namespace detail

// A thread's shared address in a 128-byte-swizzled tile of 16-bit elements, walking its row 16
// columns per step. Made at column 0 or 8 of a column chunk (col % 64 < 16): the 16-byte unit is
// then 0 or 1 of its chunk, step k adds 2k % 8 units (disjoint bits, so the swizzle XOR passes
// through) and every 4 steps move one column chunk on. Unrolled, every step is the same register
// with immediates, where per-step addresses would each hold a register across a loop.
template <shared_tile ST>
struct row_cursor {
    static_assert(ST::swizzle == 128 && sizeof(typename ST::dtype) == 2,
                  "row_cursor: walks 128-byte-swizzled tiles of 16-bit elements");
    uint32_t addr;

    __device__ inline uint32_t at(int step) const {
        return (addr ^ uint32_t((step % 4) * 32)) + uint32_t(step / 4) * uint32_t(ST::chunk_bytes);
    }
};

template <shared_tile ST>
__device__ inline row_cursor<ST> make_row_cursor(const ST& tile, int row, int col) {
    return {smem_addr(tile.ptr(row, col))};
}

namespace warp {

// d += a · bᵀ on 16x16 base tiles (fp32 accumulate): two m16n8k16 mmas, one per n8 half of b.
template <mma_input T>
__device__ inline void mma_ABt(rt_base<float>& d, const rt_base<T>& a, const rt_base<T>& b) {
    detail::mma_m16n8k16(d.data[0], d.data[1], a, detail::as_b32<T>(b.data[0]), detail::as_b32<T>(b.data[2]));
    detail::mma_m16n8k16(d.data[2], d.data[3], a, detail::as_b32<T>(b.data[1]), detail::as_b32<T>(b.data[3]));
}

// The lane's cursor over the 16x16 blocks at rows row0.., columns col0 + 16 k (col0 % 64 == 0).
// Lane l addresses row l % 16, columns 8 * (l / 16): ldmatrix puts matrices (rows 0-7 | 8-15) x
// (cols 0-7 | 8-15) in data[0..3], rt_base order.
template <shared_tile ST>
__device__ inline row_cursor<ST> ldsm_rows(const ST& src, int row0, int col0) {
    const int lane = laneid();
    return make_row_cursor(src, row0 + lane % 16, col0 + 8 * (lane / 16));
}

// The lane's cursor over the transposes of those blocks, for a [K][N] row-major tile (e.g. V of
// P·V) read as the [N][K] operand b of mma_ABt. Lane l addresses row (l % 8) + 8 * (l / 16),
// columns 8 * ((l / 8) % 2), so ldmatrix.trans gives (n 0-7, k 0-7), (n 8-15, k 0-7),
// (n 0-7, k 8-15), (n 8-15, k 8-15) of the transpose: rt_base order again.
template <shared_tile ST>
__device__ inline row_cursor<ST> ldsm_rows_transposed(const ST& src, int row0, int col0) {
    const int lane = laneid();
    return make_row_cursor(src, row0 + lane % 8 + 8 * (lane / 16), col0 + 8 * ((lane / 8) % 2));
}

// dst = block `step` of a cursor made by ldsm_rows: one ldmatrix.x4.
template <mma_input T, shared_tile ST>
__device__ inline void load_base(rt_base<T>& dst, const row_cursor<ST>& src, int step) {
    static_assert(std::is_same_v<typename ST::dtype, T>, "warp::load_base: shared and register tiles differ in type");
    uint32_t* r = reinterpret_cast<uint32_t*>(dst.data);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(src.at(step)));
}

// dst = the transpose of block `step` of a cursor made by ldsm_rows_transposed: ldmatrix.x4.trans.
template <mma_input T, shared_tile ST>
__device__ inline void load_base_transposed(rt_base<T>& dst, const row_cursor<ST>& src, int step) {
    static_assert(std::is_same_v<typename ST::dtype, T>,
                  "warp::load_base_transposed: shared and register tiles differ in type");
    uint32_t* r = reinterpret_cast<uint32_t*>(dst.data);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(src.at(step)));
}

}  // namespace warp
}  // namespace tk
