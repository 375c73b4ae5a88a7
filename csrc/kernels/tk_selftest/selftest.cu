// Self-test kernels of the tk tile library (see include/tkpy/tk_selftest.h).
#include <type_traits>

#include "stuck_wait.cuh"
#include "tk/tk.cuh"
#include "tkpy/tk_selftest.h"

namespace tkpy::tk_selftest {
namespace {

// ---- TMA, swizzled shared tiles, warpgroup shared<->register moves, store and store-add --------

template <int Swizzle>
struct RoundtripKernel {
    using tile = tk::st_bf<64, 128, Swizzle>;
    struct params {
        tk::tma_gl<tile> x;
        tk::tma_gl<tile> y;
        tk::tma_gl<tile> z;
        int row;
        int col;
    };
    struct smem {
        tile in;
        tile out;
        tk::barrier loaded;
    };
};

template <int Swizzle>
__global__ void __launch_bounds__(tk::kWarpgroupThreads) tma_roundtrip_kernel(
    const __grid_constant__ typename RoundtripKernel<Swizzle>::params p) {
    using K = RoundtripKernel<Swizzle>;
    extern __shared__ char raw_smem[];
    tk::smem_allocator alloc(raw_smem);
    auto& s = *alloc.allocate<typename K::smem>();
    if (threadIdx.x == 0) {
        tk::init_barrier(s.loaded, 1);
        tk::fence_barrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        tk::arrive_expect_tx(s.loaded, K::tile::bytes);
        tk::tma::load_async(s.in, p.x, p.row, p.col, s.loaded);
    }
    tk::wait(s.loaded, 0);

    tk::rt_fl<16, 128> values;
    tk::warpgroup::load(values, s.in);
    tk::warp::mul(values, values, 2.f);
    tk::warpgroup::store(s.out, values);
    tk::fence_async_shared();
    tk::warpgroup::sync(0);
    if (threadIdx.x == 0) {
        tk::tma::store_async(p.y, s.out, p.row, p.col);
        tk::tma::store_add_async(p.z, s.out, p.row, p.col);
        tk::tma::store_commit_group();
        tk::tma::store_wait<0>();
    }
}

template <int Swizzle>
cudaError_t roundtrip_typed(const TmaRoundtripParams& g, cudaStream_t stream) {
    using K = RoundtripKernel<Swizzle>;
    typename K::params p{};
    const auto view = [&](const void* data) {
        return tk::gl<tk::bf16>{static_cast<tk::bf16*>(const_cast<void*>(data)), g.rows, g.cols, g.cols};
    };
    for (cudaError_t err : {tk::make_tma_gl(p.x, view(g.x)), tk::make_tma_gl(p.y, view(g.y)),
                            tk::make_tma_gl(p.z, view(g.z))}) {
        if (err != cudaSuccess) return err;
    }
    p.row = g.row;
    p.col = g.col;
    constexpr int smem = int(sizeof(typename K::smem)) + tk::layout::kTileAlignment;
    const cudaError_t attr =
        cudaFuncSetAttribute(tma_roundtrip_kernel<Swizzle>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (attr != cudaSuccess) return attr;
    tma_roundtrip_kernel<Swizzle><<<1, tk::kWarpgroupThreads, smem, stream>>>(p);
    return cudaGetLastError();
}

// ---- register tiles: masked global loads, reductions, broadcasts, exp2, conversions -------------

__global__ void __launch_bounds__(tk::kWarpThreads) register_ops_kernel(RegisterOpsParams p) {
    const tk::gl<float> x{const_cast<float*>(p.x), p.rows, p.cols, p.cols};
    tk::rt_fl<32, 64> tile;
    tk::warp::load(tile, x, 0, 0);

    tk::rv_rows<float, 32> row_max, row_sum;
    tk::rv_cols<float, 64> col_max, col_sum;
    tk::warp::row_max(row_max, tile);
    tk::warp::row_sum(row_sum, tile);
    tk::warp::col_max(col_max, tile);
    tk::warp::col_sum(col_sum, tile);
    tk::warp::store(p.row_max, row_max, 0, 32);
    tk::warp::store(p.row_sum, row_sum, 0, 32);
    tk::warp::store(p.col_max, col_max, 0, 64);
    tk::warp::store(p.col_sum, col_sum, 0, 64);

    tk::rt_fl<32, 64> shifted;
    tk::warp::sub_row(shifted, tile, row_max);
    tk::rt_bf<32, 64> y;
    tk::warp::exp2(y, shifted);
    tk::warp::store(tk::gl<tk::bf16>{static_cast<tk::bf16*>(p.y), p.rows, p.cols, p.cols}, y, 0, 0);

    tk::rt_fl<32, 64> z;
    tk::warp::add_col(z, tile, col_max);
    tk::warp::store(tk::gl<float>{p.z, p.rows, p.cols, p.cols}, z, 0, 0);
}

// ---- the online softmax vocabulary: state, softcap, row masks, rescale, finish ----------------

// The columns [0, hi) a row sees.
struct ColumnsBelow {
    int hi;
    __device__ bool contains(int col) const { return col < hi; }
};

__global__ void __launch_bounds__(tk::kWarpThreads) online_softmax_kernel(OnlineSoftmaxParams p) {
    constexpr int kBlock = 32;
    const tk::gl<float> x{const_cast<float*>(p.x), 16, p.cols, p.cols};
    tk::row_values<ColumnsBelow, 16> rows;
    tk::warp::make_rows(rows, [&](int r) { return ColumnsBelow{p.keys[r]}; });
    const bool capped = p.softcap > 0.f;
    tk::softmax_state<16> st;
    tk::warp::softmax_init(st, capped ? tk::kLog2e : p.scale * tk::kLog2e);
    tk::rt_fl<16, kBlock> o;
    tk::warp::zero(o);
    for (int c0 = 0; c0 < p.cols; c0 += kBlock) {
        tk::rt_fl<16, kBlock> s;
        tk::warp::load(s, x, 0, c0);
        if (capped) tk::warp::softcap(s, s, p.scale, p.softcap);
        tk::warp::mask(s, s, rows, c0, -INFINITY);
        tk::warp::softmax_update(st, s);
        tk::warp::softmax_rescale(o, st);
        tk::warp::add(o, o, s);
    }
    tk::rv_rows<float, 16> lse;
    tk::warp::softmax_finish(o, lse, st);
    tk::warp::store(tk::gl<float>{p.o, 16, kBlock, kBlock}, o, 0, 0);
    tk::warp::store(p.lse, lse, 0, 16);
}

// ---- UltraViCo's score ops: row_dot and the three decays -----------------------------------------

__global__ void __launch_bounds__(tk::kWarpThreads) decay_ops_kernel(DecayOpsParams p) {
    __shared__ tk::st_bf<16, 128> q;
    tk::warp::load(q, tk::gl<tk::bf16>{static_cast<tk::bf16*>(const_cast<void*>(p.q)), 16, 128, 128}, 0, 0);
    __syncwarp();
    tk::rv_rows<float, 16> dot;
    tk::warp::row_dot(dot, q, 0, p.vec);
    tk::warp::store(p.dot, dot, 0, 16);

    tk::rv_rows<float, 16> centre;
    for (int h = 0; h < 2; ++h) centre.data[0][h] = p.centre[tk::laneid() / 4 + 8 * h];
    tk::rt_fl<16, 64> x, y;
    tk::warp::load(x, tk::gl<float>{const_cast<float*>(p.x), 16, 64, 64}, 0, 0);
    tk::warp::decay_above(y, x, centre, p.factor);
    tk::warp::store(tk::gl<float>{p.uniform, 16, 64, 64}, y, 0, 0);
    tk::warp::decay_above_where(y, x, centre, p.factor, [](int r, int c) { return (r + c) % 3 == 0; });
    tk::warp::store(tk::gl<float>{p.where, 16, 64, 64}, y, 0, 0);
    tk::warp::decay_above_each(y, x, centre, [&](int r, int c) { return p.factors[r * 64 + c]; });
    tk::warp::store(tk::gl<float>{p.each, 16, 64, 64}, y, 0, 0);
}

// ---- wgmma: every operand layout, A from shared memory or registers ----------------------------

template <typename T, int N, int K, WgmmaVariant V>
struct WgmmaKernel {
    static constexpr bool a_transposed = V == WgmmaVariant::AtB || V == WgmmaVariant::AtBt;
    static constexpr bool b_transposed =
        V == WgmmaVariant::ABt || V == WgmmaVariant::AtBt || V == WgmmaVariant::reg_ABt;
    using a_tile = std::conditional_t<a_transposed, tk::st<T, K, 64>, tk::st_widest<T, 64, K>>;
    using b_tile = std::conditional_t<b_transposed, tk::st<T, N, K>, tk::st_widest<T, K, N>>;
    struct params {
        tk::tma_gl<a_tile> a;
        tk::tma_gl<b_tile> b;
        float* d;
    };
    struct smem {
        a_tile a;
        b_tile b;
        tk::barrier loaded;
    };
};

template <typename T, int N, int K, WgmmaVariant V>
__global__ void __launch_bounds__(tk::kWarpgroupThreads) wgmma_kernel(
    const __grid_constant__ typename WgmmaKernel<T, N, K, V>::params p) {
    using W = WgmmaKernel<T, N, K, V>;
    extern __shared__ char raw_smem[];
    tk::smem_allocator alloc(raw_smem);
    auto& s = *alloc.allocate<typename W::smem>();
    if (threadIdx.x == 0) {
        tk::init_barrier(s.loaded, 1);
        tk::fence_barrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        tk::arrive_expect_tx(s.loaded, W::a_tile::bytes + W::b_tile::bytes);
        tk::tma::load_async(s.a, p.a, 0, 0, s.loaded);
        tk::tma::load_async(s.b, p.b, 0, 0, s.loaded);
    }
    tk::wait(s.loaded, 0);

    tk::rt_fl<16, N> d;
    tk::warpgroup::mma_fence(d);
    if constexpr (V == WgmmaVariant::ABt) tk::warpgroup::mm_ABt(d, s.a, s.b);
    else if constexpr (V == WgmmaVariant::AB) tk::warpgroup::mm_AB(d, s.a, s.b);
    else if constexpr (V == WgmmaVariant::AtB) tk::warpgroup::mm_AtB(d, s.a, s.b);
    else if constexpr (V == WgmmaVariant::AtBt) tk::warpgroup::mm_AtBt(d, s.a, s.b);
    else {
        tk::rt<T, 16, K> a;
        tk::warpgroup::load(a, s.a);
        tk::warpgroup::mma_fence(d);
        if constexpr (V == WgmmaVariant::reg_ABt) tk::warpgroup::mm_ABt(d, a, s.b);
        else tk::warpgroup::mm_AB(d, a, s.b);
    }
    tk::warpgroup::mma_commit_group();
    tk::warpgroup::mma_async_wait<0>(d);
    tk::warp::store(tk::gl<float>{p.d, 64, N, N}, d, 16 * tk::warpid_in_warpgroup(), 0);
}

template <typename T, int N, int K, WgmmaVariant V>
cudaError_t wgmma_typed(const WgmmaParams& g, cudaStream_t stream) {
    using W = WgmmaKernel<T, N, K, V>;
    typename W::params p{};
    const auto view = [](const void* data, int rows, int cols) {
        return tk::gl<T>{static_cast<T*>(const_cast<void*>(data)), rows, cols, cols};
    };
    const cudaError_t ea = tk::make_tma_gl(p.a, W::a_transposed ? view(g.a, K, 64) : view(g.a, 64, K));
    const cudaError_t eb = tk::make_tma_gl(p.b, W::b_transposed ? view(g.b, N, K) : view(g.b, K, N));
    if (ea != cudaSuccess) return ea;
    if (eb != cudaSuccess) return eb;
    p.d = g.d;
    constexpr int smem = int(sizeof(typename W::smem)) + tk::layout::kTileAlignment;
    const cudaError_t attr =
        cudaFuncSetAttribute(wgmma_kernel<T, N, K, V>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (attr != cudaSuccess) return attr;
    wgmma_kernel<T, N, K, V><<<1, tk::kWarpgroupThreads, smem, stream>>>(p);
    return cudaGetLastError();
}

template <typename T, int N, int K>
cudaError_t wgmma_variant(const WgmmaParams& g, cudaStream_t stream) {
    switch (g.variant) {
        case WgmmaVariant::ABt: return wgmma_typed<T, N, K, WgmmaVariant::ABt>(g, stream);
        case WgmmaVariant::AB: return wgmma_typed<T, N, K, WgmmaVariant::AB>(g, stream);
        case WgmmaVariant::AtB: return wgmma_typed<T, N, K, WgmmaVariant::AtB>(g, stream);
        case WgmmaVariant::AtBt: return wgmma_typed<T, N, K, WgmmaVariant::AtBt>(g, stream);
        case WgmmaVariant::reg_ABt: return wgmma_typed<T, N, K, WgmmaVariant::reg_ABt>(g, stream);
        case WgmmaVariant::reg_AB: return wgmma_typed<T, N, K, WgmmaVariant::reg_AB>(g, stream);
    }
    return cudaErrorInvalidValue;
}

template <typename T, int N, int K>
cudaError_t wgmma_plain_b(const WgmmaParams& g, cudaStream_t stream) {
    return g.variant == WgmmaVariant::ABt ? wgmma_typed<T, N, K, WgmmaVariant::ABt>(g, stream)
                                          : wgmma_typed<T, N, K, WgmmaVariant::AB>(g, stream);
}

}  // namespace

cudaError_t launch_tma_roundtrip(const TmaRoundtripParams& p, cudaStream_t stream) {
    switch (p.swizzle) {
        case 32: return roundtrip_typed<32>(p, stream);
        case 64: return roundtrip_typed<64>(p, stream);
        case 128: return roundtrip_typed<128>(p, stream);
    }
    return cudaErrorInvalidValue;
}

cudaError_t launch_register_ops(const RegisterOpsParams& p, cudaStream_t stream) {
    register_ops_kernel<<<1, tk::kWarpThreads, 0, stream>>>(p);
    return cudaGetLastError();
}

cudaError_t launch_online_softmax(const OnlineSoftmaxParams& p, cudaStream_t stream) {
    if (p.cols <= 0 || p.cols % 32 != 0 || p.cols > 256) return cudaErrorInvalidValue;
    online_softmax_kernel<<<1, tk::kWarpThreads, 0, stream>>>(p);
    return cudaGetLastError();
}

cudaError_t launch_decay_ops(const DecayOpsParams& p, cudaStream_t stream) {
    decay_ops_kernel<<<1, tk::kWarpThreads, 0, stream>>>(p);
    return cudaGetLastError();
}

cudaError_t launch_wgmma(const WgmmaParams& g, cudaStream_t stream) {
    if (!wgmma_supported(g.dtype, g.n, g.k, g.variant)) return cudaErrorInvalidValue;
    if (g.dtype == DType::fp16) return wgmma_plain_b<tk::half, 64, 64>(g, stream);
    if (g.k == 128) return wgmma_plain_b<tk::bf16, 64, 128>(g, stream);
    if (g.k == 32) {
        return g.n == 64 ? wgmma_typed<tk::bf16, 64, 32, WgmmaVariant::reg_AB>(g, stream)
                         : wgmma_typed<tk::bf16, 128, 32, WgmmaVariant::reg_AB>(g, stream);
    }
    switch (g.n) {
        case 16: return wgmma_variant<tk::bf16, 16, 64>(g, stream);
        case 32: return wgmma_variant<tk::bf16, 32, 64>(g, stream);
        case 64: return wgmma_variant<tk::bf16, 64, 64>(g, stream);
        case 128: return wgmma_variant<tk::bf16, 128, 64>(g, stream);
        case 256: return wgmma_variant<tk::bf16, 256, 64>(g, stream);
    }
    return cudaErrorInvalidValue;
}

cudaError_t launch_stuck_wait(const StuckWaitParams& p, cudaStream_t stream) {
    // The library's own configuration: trap only, unless the whole build reports (TKPY_WATCHDOG_REPORT).
    return p.report ? launch_stuck_wait_report(p.reached, stream)
                    : launch_stuck_wait_kernel<bool(TK_WAIT_WATCHDOG_REPORT)>(p.reached, stream);
}

}  // namespace tkpy::tk_selftest
