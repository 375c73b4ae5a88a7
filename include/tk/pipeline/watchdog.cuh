// The deadlock watchdog of tk::wait (sync.cuh). A wait whose phase has not completed within a
// cycle budget traps, so a deadlocked kernel fails within seconds instead of hanging until an
// outer timeout; with the report switched on it first prints where it was stuck.
//
// Compile-time switches (per translation unit: without -rdc each one is its own device module):
//   TK_WAIT_WATCHDOG_CYCLES  the budget in SM clock cycles (clock64), counted from the first failed
//       try_wait of a wait. Default 2^33: about 4.3 s at H100/H200 boost clocks (1.98 GHz), far
//       longer than any wait of a live pipeline. 0 compiles the watchdog out.
//   TK_WAIT_WATCHDOG_REPORT  1: before trapping, the stuck warp prints the wait's call site, block,
//       warp, barrier address and parity. Default 0, because printf is a call into the CUDA
//       runtime and ptxas serialises every wgmma of a kernel that contains such a call (C7510):
//       a switch for hunting a deadlock, not for production builds.
// Either way only the retry loop reads the clock: the fast path, a first try_wait that succeeds,
// is the same instructions as with the watchdog compiled out (tests/test_tk_compile.py).
#pragma once

#include <cstdio>

#include "../common/base.cuh"

#ifndef TK_WAIT_WATCHDOG_CYCLES
#define TK_WAIT_WATCHDOG_CYCLES (1ull << 33)
#endif

#ifndef TK_WAIT_WATCHDOG_REPORT
#define TK_WAIT_WATCHDOG_REPORT 0
#endif

namespace tk::detail {

// Messages are printed as printf's format string with no arguments: printf with arguments builds
// them in local memory, and without separate compilation ptxas places a __noinline__ function's
// code and stack frame inside every kernel that calls it. A global buffer holds the messages of
// the first kWatchdogReports reporting warps of a module.
inline constexpr int kWatchdogReports = 16;
inline constexpr int kWatchdogMessageBytes = 512;

// Append to a message that must end before `end` (the buffer's last byte is kept for the NUL),
// dropping what does not fit, and return the message's new end. Plain values in and out, so the
// message never lives in local memory; not inlined and not unrolled, since the code is copied
// into every reporting kernel and runs at most once.
__device__ __forceinline__ char* append_char(char* at, const char* end, char c) {
    if (at < end) *at++ = c;
    return at;
}

// printf reads the message as a format string: a '%' (say, in a path) is doubled.
__device__ __noinline__ inline char* append_text(char* at, const char* end, const char* s) {
#pragma unroll 1
    for (; *s != '\0'; ++s) {
        if (*s == '%') at = append_char(at, end, '%');
        at = append_char(at, end, *s);
    }
    return at;
}

// Digits go in last to first, so that only division by the constant base is needed.
__device__ __noinline__ inline char* append_decimal(char* at, const char* end, uint64_t v) {
    int digits = 1;
#pragma unroll 1
    for (uint64_t rest = v; rest >= 10; rest /= 10) ++digits;
    char* const after = at + digits;
#pragma unroll 1
    for (char* p = after; p-- != at; v /= 10) {
        if (p < end) *p = char('0' + v % 10);
    }
    return after < end ? after : const_cast<char*>(end);
}

__device__ __noinline__ inline char* append_hex(char* at, const char* end, uint32_t v) {
    int digits = 1;
#pragma unroll 1
    for (uint32_t rest = v; rest >= 16; rest >>= 4) ++digits;
    char* const after = at + digits;
#pragma unroll 1
    for (char* p = after; p-- != at; v >>= 4) {
        if (p < end) *p = "0123456789abcdef"[v & 15];
    }
    return after < end ? after : const_cast<char*>(end);
}

// Prints, from the lowest active lane of each stuck warp, the wait's call site, block, warp,
// barrier address, parity and budget; then traps. The host's next synchronisation flushes the
// printf buffer and fails with cudaErrorLaunchFailure.
[[noreturn]] __device__ __noinline__ inline void report_stuck_wait(uint32_t bar_addr, uint32_t parity, uint64_t budget,
                                                                   const char* file, int line,
                                                                   const char* function) {
    static char messages[kWatchdogReports][kWatchdogMessageBytes];
    static unsigned int reports;
    const unsigned int lanes = __activemask();
    if (laneid() == __ffs(lanes) - 1) {
        const unsigned int slot = atomicAdd(&reports, 1u);
        if (slot < kWatchdogReports) {
            char* at = messages[slot];
            const char* end = messages[slot] + kWatchdogMessageBytes - 1;
            at = append_text(at, end, file);
            at = append_char(at, end, ':');
            at = append_decimal(at, end, line);
            at = append_text(at, end, ": in ");
            at = append_text(at, end, function);
            at = append_text(at, end, ": tk::wait watchdog: block (");
            at = append_decimal(at, end, blockIdx.x);
            at = append_text(at, end, ", ");
            at = append_decimal(at, end, blockIdx.y);
            at = append_text(at, end, ", ");
            at = append_decimal(at, end, blockIdx.z);
            at = append_text(at, end, ") warp ");
            at = append_decimal(at, end, warpid());
            at = append_text(at, end, ": the mbarrier at shared address 0x");
            at = append_hex(at, end, bar_addr);
            at = append_text(at, end, " has not completed the phase of parity ");
            at = append_decimal(at, end, parity);
            at = append_text(at, end, " within ");
            at = append_decimal(at, end, budget);
            at = append_text(at, end, " cycles (TK_WAIT_WATCHDOG_CYCLES); trapping\n");
            *at = '\0';
            printf(messages[slot]);
        }
    }
    __syncwarp(lanes);  // the warp's report is out before any of its lanes ends the kernel
    __trap();
}

}  // namespace tk::detail
