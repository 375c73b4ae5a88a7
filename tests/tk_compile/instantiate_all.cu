// Compile test of the tk tile library (tests/test_tk_compile.py builds it for sm_90a): every
// primitive instantiated at least once -- all wgmma shapes N = 16..256 for bf16 and half, in every
// operand layout, A from shared memory and from registers; all three swizzles; TMA load, store and
// store-add for 16- and 32-bit tiles; cooperative global<->shared copies; every register op on
// float, bf16 and half tiles; mma.sync with ldmatrix cursors over cp.async-filled tiles.
#include <array>
#include <utility>

#include "tk/tk.cuh"

namespace {

template <typename T, int N>
__global__ void __launch_bounds__(tk::kWarpgroupThreads) every_mma(float* out) {
    extern __shared__ char raw_smem[];
    tk::smem_allocator alloc(raw_smem);
    auto& a = *alloc.allocate<tk::st<T, 64, 64>>();          // A [M][K]
    auto& a_t = *alloc.allocate<tk::st<T, 64, 64>>();        // A stored [K][M]
    auto& b_t = *alloc.allocate<tk::st<T, N, 64>>();         // B stored [N][K]
    auto& b = *alloc.allocate<tk::st_widest<T, 64, N>>();    // B [K][N]
    tk::rt_fl<16, N> d;
    tk::rt<T, 16, 64> a_regs;
    tk::warpgroup::load(a_regs, a);
    tk::warpgroup::mma_fence(d);
    tk::warpgroup::mm_ABt(d, a, b_t);
    tk::warpgroup::mma_AB(d, a, b);
    tk::warpgroup::mma_AtB(d, a_t, b);
    tk::warpgroup::mma_AtBt(d, a_t, b_t);
    tk::warpgroup::mma_ABt(d, a_regs, b_t);
    tk::warpgroup::mma_AB(d, a_regs, b);
    tk::warpgroup::mma_commit_group();
    tk::warpgroup::mma_async_wait<0>(d);
    tk::warp::store(tk::gl<float>{out, 64, N, N}, d, 16 * tk::warpid_in_warpgroup(), 0);
}

template <typename T, int Swizzle>
struct TmaParams {
    using tile = tk::st<T, 64, 2 * Swizzle / int(sizeof(T)), Swizzle>;
    tk::tma_gl<tile> src;
    tk::tma_gl<tile> dst;
};

template <typename T, int Swizzle>
__global__ void every_tma(const __grid_constant__ TmaParams<T, Swizzle> p) {
    using tile = typename TmaParams<T, Swizzle>::tile;
    extern __shared__ char raw_smem[];
    tk::smem_allocator alloc(raw_smem);
    auto& t = *alloc.allocate<tile>();
    auto& bar = *alloc.allocate<tk::barrier>();
    if (threadIdx.x == 0) {
        tk::init_barrier(bar, 1);
        tk::fence_barrier_init();
        tk::tma::prefetch_map(&p.src.map);
        tk::arrive_expect_tx(bar, tile::bytes);
        tk::tma::load_async(t, p.src, 0, 0, bar);
    }
    __syncthreads();
    tk::wait(bar, 0);
    if (threadIdx.x == 0) {
        tk::tma::store_async(p.dst, t, 0, 0);
        tk::tma::store_add_async(p.dst, t, 0, 0);
        tk::tma::store_commit_group();
        tk::tma::store_wait_read<0>();
        tk::tma::store_wait<0>();
        tk::arrive(bar);
    }
}

template <typename T>
__global__ void every_cooperative_copy(const T* in, float* out) {
    extern __shared__ char raw_smem[];
    tk::smem_allocator alloc(raw_smem);
    auto& t = *alloc.allocate<tk::st_widest<T, 32, 48>>();
    const tk::gl<T> src{const_cast<T*>(in), 40, 40, 40};
    const tk::gl<float> dst{out, 40, 40, 40};
    tk::warpgroup::load(t, src, 8, 0);
    tk::warpgroup::sync(0);
    tk::warpgroup::store(dst, t, 8, 0);
    tk::warp::load(t, src, 0, 8);
    tk::warp::store(dst, t, 0, 8);
}

template <typename T>
__global__ void every_register_op(const T* in, T* out, float* vec_out) {
    const tk::gl<T> src{const_cast<T*>(in), 48, 40, 40};
    tk::rt<T, 48, 48> x, y;
    tk::warp::load(x, src, 0, 0);
    tk::rv_rows<float, 48> rows;
    tk::rv_cols<T, 48> cols;
    tk::warp::row_max(rows, x);
    tk::warp::row_sum(rows, x);
    tk::warp::col_max(cols, x);
    tk::warp::col_sum(cols, x);
    tk::warp::sub_row(y, x, rows);
    tk::warp::mul_row(y, y, rows);
    tk::warp::div_row(y, y, rows);
    tk::warp::add_col(y, y, cols);
    tk::warp::mul_col(y, y, cols);
    tk::warp::exp2(y, y);
    tk::warp::mul(y, y, 0.5f);
    tk::warp::add(y, y, x);
    tk::warp::sub(y, y, x);
    tk::warp::mul(y, y, x);
    tk::rt_fl<48, 48> f;
    tk::warp::copy(f, y);
    tk::warp::zero(x);
    tk::warp::fill(y, 1.f);
    tk::warp::store(tk::gl<T>{out, 48, 40, 40}, f, 0, 0);
    tk::warp::store(vec_out, rows, 0, 48);
}

// mma.sync through ldmatrix cursors (plain and transposed) over tiles filled by cp.async.
template <typename T>
__global__ void __launch_bounds__(tk::kWarpThreads) every_warp_mma(const T* in, float* out) {
    extern __shared__ char raw_smem[];
    tk::smem_allocator alloc(raw_smem);
    auto& a = *alloc.allocate<tk::st<T, 16, 128>>();
    auto& b = *alloc.allocate<tk::st<T, 16, 128>>();
    for (int i = tk::laneid(); i < 16 * 16; i += tk::kWarpThreads) {
        const int r = i / 16;
        const int c = 8 * (i % 16);
        tk::cp_async::copy16(a.ptr(r, c), in + r * 128 + c, true);
        tk::cp_async::copy16(b.ptr(r, c), in + r * 128 + c, r < 8);
    }
    tk::cp_async::commit();
    tk::cp_async::wait<0>();
    __syncwarp();
    tk::rt_fl<16, 16> d;
    tk::warp::zero(d);
    const auto a_rows = tk::warp::ldsm_rows(a, 0, 0);
    const auto b_rows = tk::warp::ldsm_rows(b, 0, 0);
    const auto b_cols = tk::warp::ldsm_rows_transposed(b, 0, 0);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        tk::rt_base<T> x, y, z;
        tk::warp::load_base(x, a_rows, k);
        tk::warp::load_base(y, b_rows, k);
        tk::warp::load_base_transposed(z, b_cols, k);
        tk::warp::mma_ABt(d.tiles[0][0], x, y);
        tk::warp::mma_ABt(d.tiles[0][0], x, z);
    }
    tk::warp::store(tk::gl<float>{out, 16, 16, 16}, d, 0, 0);
}

template <typename T, int... I>
constexpr auto mma_kernels(std::integer_sequence<int, I...>) {
    return std::array<const void*, sizeof...(I)>{reinterpret_cast<const void*>(&every_mma<T, 16 * (I + 1)>)...};
}

}  // namespace

// Taking each kernel's address instantiates it.
[[maybe_unused]] const void* const kAllKernels[] = {
    reinterpret_cast<const void*>(&every_tma<tk::bf16, 32>),
    reinterpret_cast<const void*>(&every_tma<tk::bf16, 64>),
    reinterpret_cast<const void*>(&every_tma<tk::bf16, 128>),
    reinterpret_cast<const void*>(&every_tma<float, 128>),
    reinterpret_cast<const void*>(&every_tma<tk::half, 64>),
    reinterpret_cast<const void*>(&every_cooperative_copy<float>),
    reinterpret_cast<const void*>(&every_cooperative_copy<tk::bf16>),
    reinterpret_cast<const void*>(&every_cooperative_copy<tk::half>),
    reinterpret_cast<const void*>(&every_register_op<float>),
    reinterpret_cast<const void*>(&every_register_op<tk::bf16>),
    reinterpret_cast<const void*>(&every_register_op<tk::half>),
    reinterpret_cast<const void*>(&every_warp_mma<tk::bf16>),
    reinterpret_cast<const void*>(&every_warp_mma<tk::half>),
};
[[maybe_unused]] const auto kBf16MmaKernels = mma_kernels<tk::bf16>(std::make_integer_sequence<int, 16>());
[[maybe_unused]] const auto kHalfMmaKernels = mma_kernels<tk::half>(std::make_integer_sequence<int, 16>());
