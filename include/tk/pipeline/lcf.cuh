// Load -> compute -> finish: a warp-specialised, persistent producer/consumer kernel template.
//
// Warpgroup 0 is the producer: it drops to few registers and one thread issues TMA loads into a
// ring of shared-memory stages. Warpgroups 1..C are consumers: they take the registers back,
// wait for each stage, compute on it and release it; after a task's last stage they finish it
// (e.g. write an output tile). CTAs walk tasks blockIdx.x, blockIdx.x + gridDim.x, ... Ring
// protocol: HOPPER_NOTES.md §6 (full barrier: 1 arrival + the stage's bytes; empty barrier: one
// arrival per consumer warpgroup).
//
// A kernel supplies a Layout:
//   struct Layout {
//     struct params;          // by value in parameter space: may hold tma_gl maps
//     struct stage;           // one ring stage of shared memory, filled by load()
//     struct scratch;         // the rest of shared memory, e.g. output staging tiles
//     struct consumer_state;  // one consumer warpgroup's registers (accumulators)
//     static constexpr int consumer_warpgroups, stages, producer_registers, consumer_registers;
//     static int num_tasks(const params&);
//     static int iterations(const params&, int task);             // stages one task consumes
//     // One thread. Must arrive_expect_tx(full, bytes) and issue the TMA loads completing on it.
//     static void load(const params&, stage&, barrier& full, int task, int iter);
//     // A whole consumer warpgroup. Must leave no wgmma reading `stage` when it returns.
//     static void compute(const params&, consumer_state&, const stage&, int task, int iter, int consumer);
//     static void finish(const params&, consumer_state&, scratch&, int task, int consumer);
//   };
#pragma once

#include "../ops/tma.cuh"
#include "../types/shared/st.cuh"
#include "sync.cuh"

namespace tk::pipeline {

template <class L>
inline constexpr int threads = (L::consumer_warpgroups + 1) * kWarpgroupThreads;

// Dynamic shared memory a launch needs, with slack for aligning the base to 1024 bytes.
template <class L>
inline constexpr size_t smem_bytes = layout::kTileAlignment + sizeof(typename L::stage) * L::stages +
                                     sizeof(typename L::scratch) + 2 * L::stages * sizeof(barrier) + 64;

template <class L>
constexpr void check_layout() {
    static_assert(L::consumer_warpgroups >= 1 && L::consumer_warpgroups <= 3, "1 to 3 consumer warpgroups");
    static_assert(L::stages >= 2, "a pipeline ring needs at least 2 stages to overlap loads with compute");
    static_assert(smem_bytes<L> <= 227 * 1024, "shared memory budget exceeded: stages + scratch > 227 KiB");
    // setmaxnreg moves registers within the CTA's pool: threads x the per-thread count ptxas gives
    // at launch (65536 / threads, rounded down to a multiple of 8, at most 255).
    constexpr int per_thread_at_launch = (65536 / threads<L>) / 8 * 8 < 255 ? (65536 / threads<L>) / 8 * 8 : 255;
    static_assert(L::producer_registers * kWarpgroupThreads +
                          L::consumer_warpgroups * L::consumer_registers * kWarpgroupThreads <=
                      threads<L> * per_thread_at_launch,
                  "register budget exceeded: producer + consumer setmaxnreg counts exceed the CTA's register pool");
}

template <class L>
__global__ void __launch_bounds__(threads<L>, 1) lcf_kernel(const __grid_constant__ typename L::params params) {
    check_layout<L>();
    extern __shared__ char raw_smem[];
    smem_allocator alloc(raw_smem);
    auto* stages = alloc.allocate<typename L::stage, L::stages>();
    auto* scratch = alloc.allocate<typename L::scratch>();
    auto* full = alloc.allocate<barrier, L::stages>();
    auto* empty = alloc.allocate<barrier, L::stages>();

    if (threadIdx.x == 0) {
        for (int s = 0; s < L::stages; ++s) {
            init_barrier(full[s], 1);
            init_barrier(empty[s], L::consumer_warpgroups);
        }
        fence_barrier_init();
    }
    __syncthreads();

    const int tasks = L::num_tasks(params);
    ring_position<L::stages> pos;
    if (warpgroupid() == 0) {
        warpgroup::decrease_registers<L::producer_registers>();
        if (threadIdx.x != 0) return;
        for (int task = blockIdx.x; task < tasks; task += gridDim.x) {
            const int iters = L::iterations(params, task);
            for (int it = 0; it < iters; ++it, pos.advance()) {
                wait(empty[pos.stage], pos.parity ^ 1);
                L::load(params, stages[pos.stage], full[pos.stage], task, it);
            }
        }
    } else {
        warpgroup::increase_registers<L::consumer_registers>();
        const int consumer = warpgroupid() - 1;
        const bool leader = threadIdx.x % kWarpgroupThreads == 0;
        typename L::consumer_state state;
        for (int task = blockIdx.x; task < tasks; task += gridDim.x) {
            const int iters = L::iterations(params, task);
            for (int it = 0; it < iters; ++it, pos.advance()) {
                wait(full[pos.stage], pos.parity);
                L::compute(params, state, stages[pos.stage], task, it, consumer);
                if (leader) arrive(empty[pos.stage]);
            }
            L::finish(params, state, *scratch, task, consumer);
        }
        // TMA stores issued by finish() must finish reading shared memory before the CTA exits.
        if (leader) tma::store_wait<0>();
    }
}

}  // namespace tk::pipeline
