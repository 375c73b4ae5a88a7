// The H100 GEMM on tk's load/compute/finish pipeline: TMA loads of A and B into a 3-stage ring,
// two consumer warpgroups each computing 64 x 256 of a 128 x 256 output tile with wgmma, and a TMA
// store of each consumer's half through shared memory. Persistent grid, one CTA per SM.
//
// Tails need no code: TMA fills out-of-range loads with zeros (so a partial K block adds 0) and
// clips out-of-range stores.
#pragma once

#include <type_traits>

#include "tk/tk.cuh"
#include "tkpy/detail/gemm_index.h"
#include "tkpy/gemm.h"

namespace tkpy::gemm {

template <typename T, bool TransB>
struct GemmLayout {
    static constexpr int kBlockM = 128;
    static constexpr int kBlockN = 256;
    static constexpr int kBlockK = 64;
    static constexpr int consumer_warpgroups = 2;
    static constexpr int stages = 3;
    // 384 threads at 168 registers: 40 + 2 x 232 = 3 x 168.
    static constexpr int producer_registers = 40;
    static constexpr int consumer_registers = 232;

    using a_tile = tk::st<T, kBlockM, kBlockK>;
    // trans_b: B is [N, K] (K contiguous); otherwise [K, N] (N contiguous).
    using b_tile = std::conditional_t<TransB, tk::st<T, kBlockN, kBlockK>, tk::st<T, kBlockK, kBlockN>>;
    using c_tile = tk::st<T, kBlockM / consumer_warpgroups, kBlockN>;

    struct params {
        tk::tma_gl<a_tile> a;
        tk::tma_gl<b_tile> b;
        tk::tma_gl<c_tile> c;
        int k_blocks;
        int tiles_m;
        int tiles_n;
    };
    struct stage {
        a_tile a;
        b_tile b;
    };
    struct scratch {
        c_tile c[consumer_warpgroups];
    };
    struct consumer_state {
        tk::rt_fl<16, kBlockN> acc;
    };

    __device__ static int num_tasks(const params& p) { return p.tiles_m * p.tiles_n; }
    __device__ static int iterations(const params& p, int) { return p.k_blocks; }

    __device__ static detail::TileCoord tile(const params& p, int task) {
        return detail::gemm_tile_coord(task, p.tiles_m, p.tiles_n, kGroupM);
    }

    __device__ static void load(const params& p, stage& s, tk::barrier& full, int task, int iter) {
        const detail::TileCoord t = tile(p, task);
        tk::arrive_expect_tx(full, a_tile::bytes + b_tile::bytes);
        tk::tma::load_async(s.a, p.a, t.m * kBlockM, iter * kBlockK, full);
        if constexpr (TransB) {
            tk::tma::load_async(s.b, p.b, t.n * kBlockN, iter * kBlockK, full);
        } else {
            tk::tma::load_async(s.b, p.b, iter * kBlockK, t.n * kBlockN, full);
        }
    }

    __device__ static void compute(const params&, consumer_state& st, const stage& s, int, int iter, int consumer) {
        const int a_row = consumer * (kBlockM / consumer_warpgroups);
        tk::warpgroup::mma_fence(st.acc);
        // The first K block overwrites the accumulator, so it never needs zeroing.
        if constexpr (TransB) {
            tk::warpgroup::mma_ABt(st.acc, s.a, s.b, a_row, iter > 0);
        } else {
            tk::warpgroup::mma_AB(st.acc, s.a, s.b, a_row, iter > 0);
        }
        tk::warpgroup::mma_commit_group();
        tk::warpgroup::mma_async_wait<0>(st.acc);
    }

    __device__ static void finish(const params& p, consumer_state& st, scratch& sc, int task, int consumer) {
        const detail::TileCoord t = tile(p, task);
        const bool leader = threadIdx.x % tk::kWarpgroupThreads == 0;
        c_tile& c = sc.c[consumer];
        if (leader) tk::tma::store_wait_read<0>();  // the previous tile's store has left c
        tk::warpgroup::sync(consumer);
        tk::warpgroup::store(c, st.acc);
        tk::fence_async_shared();
        tk::warpgroup::sync(consumer);
        if (leader) {
            tk::tma::store_async(p.c, c, t.m * kBlockM + consumer * c_tile::rows, t.n * kBlockN);
            tk::tma::store_commit_group();
        }
    }
};

template <typename T, bool TransB>
cudaError_t launch_typed(const GemmParams& g, cudaStream_t stream) {
    using L = GemmLayout<T, TransB>;
    typename L::params p{};
    const auto a = tk::gl<T>{static_cast<T*>(const_cast<void*>(g.a)), g.m, g.k, g.lda};
    const auto b = TransB ? tk::gl<T>{static_cast<T*>(const_cast<void*>(g.b)), g.n, g.k, g.ldb}
                          : tk::gl<T>{static_cast<T*>(const_cast<void*>(g.b)), g.k, g.n, g.ldb};
    const auto c = tk::gl<T>{static_cast<T*>(g.c), g.m, g.n, g.ldc};
    for (cudaError_t err : {tk::make_tma_gl(p.a, a), tk::make_tma_gl(p.b, b), tk::make_tma_gl(p.c, c)}) {
        if (err != cudaSuccess) return err;
    }
    p.k_blocks = detail::ceil_div(g.k, L::kBlockK);
    p.tiles_m = detail::ceil_div(g.m, L::kBlockM);
    p.tiles_n = detail::ceil_div(g.n, L::kBlockN);

    return tk::pipeline::launch<L>(p, p.tiles_m * p.tiles_n, stream);
}

}  // namespace tkpy::gemm
