// A kernel that waits on an mbarrier, for tests/test_tk_compile.py, which compiles it with the wait
// watchdog on (the default), off (-DTK_WAIT_WATCHDOG_CYCLES=0) and reporting
// (-DTK_WAIT_WATCHDOG_REPORT=1) and compares the instructions up to the first try_wait and its
// branch. Thread 0 TMA-loads a tile, everyone waits for it, thread 0 TMA-stores it back: the work
// after the wait is all asm that reads the landed tile, so ptxas cannot move any of it above the
// try_wait and the comparison sees exactly what the watchdog puts on the fast path.
#include "tk/tk.cuh"

using tile = tk::st_bf<64, 64>;

struct params {
    tk::tma_gl<tile> src;
    tk::tma_gl<tile> dst;
};

__global__ void __launch_bounds__(tk::kWarpgroupThreads) wait_then_store(const __grid_constant__ params p) {
    extern __shared__ char raw[];
    tk::smem_allocator alloc(raw);
    auto& t = *alloc.allocate<tile>();
    auto& loaded = *alloc.allocate<tk::barrier>();
    if (threadIdx.x == 0) {
        tk::init_barrier(loaded, 1);
        tk::fence_barrier_init();
        tk::arrive_expect_tx(loaded, tile::bytes);
        tk::tma::load_async(t, p.src, 0, 0, loaded);
    }
    __syncthreads();
    tk::wait(loaded, 0);
    if (threadIdx.x == 0) {
        tk::tma::store_async(p.dst, t, 0, 0);
        tk::tma::store_commit_group();
        tk::tma::store_wait<0>();
    }
}
