// The wait watchdog's self-test kernel (include/tkpy/tk_selftest.h, launch_stuck_wait): two warps
// in each of two blocks wait on an mbarrier that no thread ever arrives at, so only the watchdog
// can end the kernel. Included by one translation unit per watchdog configuration: selftest.cu
// (the library's default) and stuck_wait_report.cu (the report on, a short budget).
#pragma once

#include "tk/tk.cuh"
#include "tkpy/tk_selftest.h"

namespace tkpy::tk_selftest {
namespace {

inline constexpr int kStuckWaitBlocks = 2;
inline constexpr int kStuckWaitThreads = 2 * tk::kWarpThreads;

// Report names the including unit's TK_WAIT_WATCHDOG_REPORT, so the two kernels have two names.
template <bool Report>
__global__ void __launch_bounds__(kStuckWaitThreads) stuck_wait_kernel(int* reached) {
    static_assert(Report == bool(TK_WAIT_WATCHDOG_REPORT), "instantiate with this unit's TK_WAIT_WATCHDOG_REPORT");
    __shared__ tk::barrier never;
    if (threadIdx.x == 0) {
        tk::init_barrier(never, 1);
        tk::fence_barrier_init();
    }
    __syncthreads();
    tk::wait(never, 0);  // phase 0 needs one arrival, and none comes
    if (threadIdx.x == 0) *reached = 1;
}

template <bool Report>
cudaError_t launch_stuck_wait_kernel(int* reached, cudaStream_t stream) {
    stuck_wait_kernel<Report><<<kStuckWaitBlocks, kStuckWaitThreads, 0, stream>>>(reached);
    return cudaGetLastError();
}

}  // namespace
}  // namespace tkpy::tk_selftest
