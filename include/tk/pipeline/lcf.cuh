// Load -> compute -> finish: a warp-specialised, persistent producer/consumer kernel template.
//
// Warpgroup 0 is the producer: it drops to few registers and one thread issues TMA loads into a
// ring of shared-memory stages. Warpgroups 1..C are consumers: they take the registers back,
// wait for each stage, compute on it and release it. CTAs walk tasks blockIdx.x,
// blockIdx.x + gridDim.x, ... Ring protocol: HOPPER_NOTES.md §6 (full barrier: 1 arrival + the
// stage's bytes; empty barrier: one arrival per consumer warpgroup).
//
// A kernel supplies a Layout, in one of two forms.
//
// The stage form (the GEMM): the pipeline runs the consumers' loop.
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
//
// The task form (attention): each task first loads its own inputs (Q) behind a barrier pair of
// their own, the producer publishes with them how many stages the task has (it alone walks the
// task's plan), each stage is loaded and released in `parts` (K, then V), each part with its own
// full/empty pair, and the consumers drive the ring themselves, so they can hold one part of a
// stage while waiting for the next stage's other part (software pipelining).
//   struct Layout {
//     params, stage, scratch, consumer_state, consumer_warpgroups, stages, producer_registers,
//     consumer_registers, num_tasks: as above;
//     static constexpr int parts;
//     struct task_inputs;     // shared memory loaded once per task
//     struct task;            // the producer's cursor over one task
//     static task begin(const params&, int index);
//     static int iterations(const task&);
//     // One thread. Must arrive on full (arrive_expect_tx with the bytes it loads, 0 for none).
//     static void load_inputs(const params&, task_inputs&, barrier& full, const task&);
//     // One thread. Part p of stage `iter` of the task; may advance the task's cursor.
//     static void load(const params&, stage&, int part, barrier& full, task&, int iter);
//     // A whole consumer warpgroup: the task, from its inputs and `iterations` stages read
//     // through one stage_reader per part. Must leave no wgmma reading shared memory.
//     static void consume(const params&, consumer_state&, task_inputs&, int iterations,
//                         stage_reader<Layout> (&readers)[parts], scratch&, int index, int consumer);
//   };
#pragma once

#include "../common/device.h"
#include "../ops/tma.cuh"
#include "../types/shared/st.cuh"
#include "sync.cuh"

namespace tk::pipeline {

template <class L>
concept task_layout = requires { typename L::task_inputs; };

template <class L>
constexpr int parts_of() {
    if constexpr (task_layout<L>) {
        return L::parts;
    } else {
        return 1;
    }
}

template <class L>
inline constexpr int threads = (L::consumer_warpgroups + 1) * kWarpgroupThreads;

// The ring: its stages and one full/empty barrier pair per part of each stage.
template <class L>
struct ring {
    static constexpr int parts = parts_of<L>();
    typename L::stage stages[L::stages];
    barrier full[parts][L::stages];
    barrier empty[parts][L::stages];
};

// What a task form's producer publishes per task: its inputs' barrier pair and its stage count.
struct task_slot {
    barrier full, empty;
    int iterations;  // written before the arrival on `full` that publishes it
};

struct no_task_inputs {};
template <class L>
struct task_inputs_of {
    using type = no_task_inputs;
};
template <task_layout L>
struct task_inputs_of<L> {
    using type = typename L::task_inputs;
};

// Dynamic shared memory a launch needs: the base aligned to 1024 bytes, and up to 1023 bytes of
// padding before each of the three members after the ring (the allocator aligns each to its type).
template <class L>
inline constexpr size_t smem_bytes = layout::kTileAlignment + sizeof(ring<L>) + sizeof(typename L::scratch) +
                                     sizeof(typename task_inputs_of<L>::type) + sizeof(task_slot) + 3 * 1024;

// A consumer warpgroup's view of one part of the ring: it waits for the part's stages in order and
// releases them in order (one arrival per warpgroup, by its first thread).
template <class L>
struct stage_reader {
    ring<L>* r;
    int part;
    ring_position<L::stages> pos;

    __device__ const typename L::stage& wait(const char* file = __builtin_FILE(), int line = __builtin_LINE(),
                                             const char* function = __builtin_FUNCTION()) const {
        tk::wait(r->full[part][pos.stage], pos.parity, file, line, function);
        return r->stages[pos.stage];
    }
    __device__ void release() {
        if (threadIdx.x % kWarpgroupThreads == 0) arrive(r->empty[part][pos.stage]);
        pos.advance();
    }

    // For consumers that take a stage's parts in step: one reader (one position in registers)
    // waits for each part of its stage, then releases them all at once.
    __device__ const typename L::stage& wait_part(int other, const char* file = __builtin_FILE(),
                                                  int line = __builtin_LINE(),
                                                  const char* function = __builtin_FUNCTION()) const {
        tk::wait(r->full[other][pos.stage], pos.parity, file, line, function);
        return r->stages[pos.stage];
    }
    __device__ void release_all() {
        if (threadIdx.x % kWarpgroupThreads == 0) {
#pragma unroll
            for (int p = 0; p < ring<L>::parts; ++p) arrive(r->empty[p][pos.stage]);
        }
        pos.advance();
    }
};

template <class L>
constexpr void check_layout() {
    static_assert(L::consumer_warpgroups >= 1 && L::consumer_warpgroups <= 3, "1 to 3 consumer warpgroups");
    static_assert(L::stages >= 2, "a pipeline ring needs at least 2 stages to overlap loads with compute");
    static_assert(parts_of<L>() >= 1 && parts_of<L>() <= 4, "a stage loads in 1 to 4 parts");
    static_assert(smem_bytes<L> <= 227 * 1024, "shared memory budget exceeded: stages + scratch + task inputs > 227 KiB");
    // setmaxnreg moves registers within the CTA's pool: threads x the per-thread count ptxas gives
    // at launch (65536 / threads, rounded down to a multiple of 8, at most 255).
    constexpr int per_thread_at_launch = (65536 / threads<L>) / 8 * 8 < 255 ? (65536 / threads<L>) / 8 * 8 : 255;
    static_assert(L::producer_registers * kWarpgroupThreads +
                          L::consumer_warpgroups * L::consumer_registers * kWarpgroupThreads <=
                      threads<L> * per_thread_at_launch,
                  "register budget exceeded: producer + consumer setmaxnreg counts exceed the CTA's register pool");
}

// One producer thread: every task's inputs (task form) and stages, as the ring frees them.
template <class L>
__device__ inline void produce(const typename L::params& params, ring<L>& r, task_slot& slot,
                               typename task_inputs_of<L>::type& inputs) {
    const int tasks = L::num_tasks(params);
    ring_position<L::stages> pos;
    uint32_t slot_parity = 0;
    for (int index = blockIdx.x; index < tasks; index += gridDim.x) {
        if constexpr (task_layout<L>) {
            typename L::task task = L::begin(params, index);
            const int iters = L::iterations(task);
            wait(slot.empty, slot_parity ^ 1);
            slot.iterations = iters;
            L::load_inputs(params, inputs, slot.full, task);
            slot_parity ^= 1;
            for (int it = 0; it < iters; ++it, pos.advance()) {
#pragma unroll
                for (int part = 0; part < L::parts; ++part) {
                    wait(r.empty[part][pos.stage], pos.parity ^ 1);
                    L::load(params, r.stages[pos.stage], part, r.full[part][pos.stage], task, it);
                }
            }
        } else {
            const int iters = L::iterations(params, index);
            for (int it = 0; it < iters; ++it, pos.advance()) {
                wait(r.empty[0][pos.stage], pos.parity ^ 1);
                L::load(params, r.stages[pos.stage], r.full[0][pos.stage], index, it);
            }
        }
    }
}

// One consumer warpgroup: every task of the CTA.
template <class L>
__device__ inline void consume(const typename L::params& params, ring<L>& r, task_slot& slot,
                               typename task_inputs_of<L>::type& inputs, typename L::scratch& scratch) {
    const int tasks = L::num_tasks(params);
    const int consumer = warpgroupid() - 1;
    const bool leader = threadIdx.x % kWarpgroupThreads == 0;
    typename L::consumer_state state;
    if constexpr (task_layout<L>) {
        stage_reader<L> readers[L::parts];
#pragma unroll
        for (int part = 0; part < L::parts; ++part) readers[part] = stage_reader<L>{&r, part, {}};
        // One counter across a task (the index and the slot's phase derive from it), so that the
        // consumers' registers go to their work.
        for (int n = 0;; ++n) {
            const int index = blockIdx.x + n * gridDim.x;
            if (index >= tasks) break;
            wait(slot.full, uint32_t(n) & 1u);
            const int iters = slot.iterations;
            L::consume(params, state, inputs, iters, readers, scratch, index, consumer);
            // Every warp has read the count and is done with the inputs before the one arrival
            // frees them: consume may return early in some warps (a task with nothing to do).
            warpgroup::sync(consumer);
            if (leader) arrive(slot.empty);
        }
    } else {
        stage_reader<L> reader{&r, 0, {}};
        for (int index = blockIdx.x; index < tasks; index += gridDim.x) {
            const int iters = L::iterations(params, index);
            for (int it = 0; it < iters; ++it) {
                L::compute(params, state, reader.wait(), index, it, consumer);
                reader.release();
            }
            L::finish(params, state, scratch, index, consumer);
        }
    }
    // TMA stores issued by the consumers must finish reading shared memory before the CTA exits.
    if (leader) tma::store_wait<0>();
}

template <class L>
__global__ void __launch_bounds__(threads<L>, 1) lcf_kernel(const __grid_constant__ typename L::params params) {
    check_layout<L>();
    extern __shared__ char raw_smem[];
    smem_allocator alloc(raw_smem);
    auto& r = *alloc.allocate<ring<L>>();
    auto& scratch = *alloc.allocate<typename L::scratch>();
    auto& inputs = *alloc.allocate<typename task_inputs_of<L>::type>();
    auto& slot = *alloc.allocate<task_slot>();

    if (threadIdx.x == 0) {
        for (int part = 0; part < ring<L>::parts; ++part)
            for (int s = 0; s < L::stages; ++s) {
                init_barrier(r.full[part][s], 1);
                init_barrier(r.empty[part][s], L::consumer_warpgroups);
            }
        init_barrier(slot.full, 1);
        init_barrier(slot.empty, L::consumer_warpgroups);
        fence_barrier_init();
    }
    __syncthreads();

    if (warpgroupid() == 0) {
        warpgroup::decrease_registers<L::producer_registers>();
        if (threadIdx.x == 0) produce<L>(params, r, slot, inputs);
    } else {
        warpgroup::increase_registers<L::consumer_registers>();
        consume<L>(params, r, slot, inputs, scratch);
    }
}

// Launches lcf_kernel<L> over `tasks` tasks (> 0), persistent: one CTA per SM, or per task if
// there are fewer. The shared-memory attribute is set per call: it belongs to the current device,
// and setting it is a cheap host call.
template <class L>
cudaError_t launch(const typename L::params& params, int tasks, cudaStream_t stream) {
    constexpr size_t smem = smem_bytes<L>;
    auto* kernel = lcf_kernel<L>;
    const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (attr != cudaSuccess) return attr;
    const int sms = sm_count();
    const int grid = sms > 0 && sms < tasks ? sms : tasks;
    kernel<<<grid, threads<L>, smem, stream>>>(params);
    return cudaGetLastError();
}

}  // namespace tk::pipeline
