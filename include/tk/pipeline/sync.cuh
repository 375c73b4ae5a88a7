// Synchronisation: mbarriers with phase tracking (and a deadlock watchdog on waits), named
// barriers, proxy fences and setmaxnreg.
#pragma once

#include "../common/base.cuh"
#include "watchdog.cuh"

namespace tk {

// An mbarrier in shared memory. A phase completes when its expected arrivals have arrived and
// every byte announced by expect_tx has landed; waiting names the phase's parity (0, 1, 0, ...).
struct alignas(8) barrier {
    uint64_t state;
};

__device__ inline void init_barrier(barrier& bar, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(&bar)), "r"(arrivals));
}

// Makes initialised barriers visible to the async proxy (TMA) and the other threads; follow it
// with a CTA-wide barrier.
__device__ inline void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

__device__ inline void arrive(barrier& bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(&bar)) : "memory");
}

// Announces `bytes` that TMA will deliver to this phase, and arrives.
__device__ inline void arrive_expect_tx(barrier& bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(&bar)), "r"(bytes)
                 : "memory");
}

// Tests once whether the phase with this parity has completed (try_wait may first suspend the
// thread for a hardware-defined time).
__device__ inline bool try_wait(barrier& bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%1], %2;\n"
        "selp.u32 %0, 1, 0, done;\n"
        "}\n"
        : "=r"(done)
        : "r"(smem_addr(&bar)), "r"(parity)
        : "memory");
    return done != 0;
}

namespace detail {

// The retry loops of wait(), each one asm block. Without the watchdog: spin until the phase
// completes.
__device__ inline void spin_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "spin:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra spin;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// With it: read the clock once, then trap when a retry finds `budget` cycles gone. The trap in
// the asm keeps calls and C++ control flow out of the waiting kernels: on an H200 the same loop in
// C++ with an out-of-line trap left the GEMM and the head-dim-256 attention forward 1-2% slower
// still, and an inlined __trap() made the latter spill.
__device__ inline void spin_wait_or_trap(uint32_t bar, uint32_t parity, uint64_t budget) {
    asm volatile(
        "{\n"
        ".reg .pred done, expired;\n"
        ".reg .u64 start, elapsed;\n"
        "mov.u64 start, %%clock64;\n"
        "spin:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@done bra waited;\n"
        "mov.u64 elapsed, %%clock64;\n"
        "sub.u64 elapsed, elapsed, start;\n"
        "setp.gt.u64 expired, elapsed, %2;\n"
        "@!expired bra spin;\n"
        "trap;\n"
        "waited:\n"
        "}\n" ::"r"(bar),
        "r"(parity), "l"(budget)
        : "memory");
}

}  // namespace detail

// Blocks until the phase with this parity has completed. On a fresh barrier, wait(0) blocks and
// wait(1) passes. Every mbarrier wait of tk goes through here, with the deadlock watchdog of
// watchdog.cuh: the first try_wait is the fast path, and only once it fails is the clock read; a
// wait still spinning TK_WAIT_WATCHDOG_CYCLES later traps. The defaulted arguments name the call
// site for the watchdog's report (TK_WAIT_WATCHDOG_REPORT); callers never pass them.
__device__ inline void wait(barrier& bar, uint32_t parity, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE(), const char* function = __builtin_FUNCTION()) {
    if (try_wait(bar, parity)) return;
    constexpr uint64_t budget = TK_WAIT_WATCHDOG_CYCLES;
    if constexpr (budget == 0) {
        detail::spin_wait(smem_addr(&bar), parity);
    } else if constexpr (!TK_WAIT_WATCHDOG_REPORT) {
        detail::spin_wait_or_trap(smem_addr(&bar), parity, budget);
    } else {
        const uint64_t start = clock64();
        while (!try_wait(bar, parity)) {
            if (clock64() - start > budget) {
                detail::report_stuck_wait(smem_addr(&bar), parity, budget, file, line, function);
            }
        }
    }
}

// Counters in global memory that order work across CTAs (e.g. a deterministic sum's turns). One
// thread spins until *counter >= target (acquire: what the releasing CTAs wrote before their add
// is visible after), backing off between reads, and traps like wait()'s watchdog if it is still
// spinning TK_WAIT_WATCHDOG_CYCLES later. One asm block, for the reason spin_wait_or_trap is: C++
// control flow with a trap in it made wgmma kernels spill and serialise their wgmma.
__device__ inline void wait_counter_at_least(const int32_t* counter, int32_t target) {
    constexpr uint64_t budget = TK_WAIT_WATCHDOG_CYCLES == 0 ? ~uint64_t(0) : TK_WAIT_WATCHDOG_CYCLES;
    asm volatile(
        "{\n"
        ".reg .pred done, expired;\n"
        ".reg .s32 seen;\n"
        ".reg .u64 start, elapsed;\n"
        "mov.u64 start, %%clock64;\n"
        "poll:\n"
        "ld.acquire.gpu.global.b32 seen, [%0];\n"
        "setp.ge.s32 done, seen, %1;\n"
        "@done bra reached;\n"
        "nanosleep.u32 64;\n"
        "mov.u64 elapsed, %%clock64;\n"
        "sub.u64 elapsed, elapsed, start;\n"
        "setp.gt.u64 expired, elapsed, %2;\n"
        "@!expired bra poll;\n"
        "trap;\n"
        "reached:\n"
        "}\n" ::"l"(counter),
        "r"(target), "l"(budget)
        : "memory");
}

// Adds to a counter with release semantics: this thread's earlier writes (and, after a
// __threadfence and a barrier, its group's) are visible to whoever acquires the new value.
__device__ inline void counter_release_add(int32_t* counter, int32_t value) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(counter), "r"(value) : "memory");
}

// A ring position: stage index and the parity of the phase it is in, advanced in lockstep by
// producers and consumers of a multi-stage pipeline.
template <int Stages>
struct ring_position {
    static_assert(Stages >= 1, "a ring needs at least one stage");
    int stage = 0;
    uint32_t parity = 0;

    __device__ void advance() {
        if (++stage == Stages) {
            stage = 0;
            parity ^= 1;
        }
    }
};

// Named barrier among `Threads` threads (a multiple of 32). Id 0 is __syncthreads'.
template <int Threads>
__device__ inline void named_barrier_sync(int id) {
    static_assert(Threads % kWarpThreads == 0, "a named barrier counts whole warps");
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(Threads) : "memory");
}

// Arrives at a named barrier without waiting: with named_barrier_sync on the same id, one group
// of threads signals another (e.g. whose turn it is to issue tensor-core work).
template <int Threads>
__device__ inline void named_barrier_arrive(int id) {
    static_assert(Threads % kWarpThreads == 0, "a named barrier counts whole warps");
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(Threads) : "memory");
}

// Orders this thread's generic-proxy shared-memory writes before later async-proxy reads
// (TMA stores, wgmma operands). Every writer runs it, then the writers synchronise.
__device__ inline void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

namespace warpgroup {

// Registers per thread of this warpgroup; needs __launch_bounds__(threads, 1) on the kernel.
template <int Registers>
__device__ inline void increase_registers() {
    static_assert(Registers >= 24 && Registers <= 256 && Registers % 8 == 0, "setmaxnreg takes 24..256 in steps of 8");
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Registers));
}

template <int Registers>
__device__ inline void decrease_registers() {
    static_assert(Registers >= 24 && Registers <= 256 && Registers % 8 == 0, "setmaxnreg takes 24..256 in steps of 8");
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Registers));
}

// Synchronises the 4 warps of warpgroup `group` (named barrier 1 + group).
__device__ inline void sync(int group) { named_barrier_sync<kWarpgroupThreads>(1 + group); }

}  // namespace warpgroup
}  // namespace tk
