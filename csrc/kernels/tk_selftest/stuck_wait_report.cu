// The wait watchdog's self-test kernel built with the report on (see stuck_wait.cuh). A unit of
// its own because the switches apply per translation unit: printf would make ptxas serialise the
// wgmma of the other self-test kernels. The short budget (about 8 ms) keeps the test quick.
#define TK_WAIT_WATCHDOG_CYCLES (1ull << 24)
#define TK_WAIT_WATCHDOG_REPORT 1

#include "stuck_wait.cuh"

namespace tkpy::tk_selftest {

cudaError_t launch_stuck_wait_report(int* reached, cudaStream_t stream) {
    return launch_stuck_wait_kernel<true>(reached, stream);
}

}  // namespace tkpy::tk_selftest
