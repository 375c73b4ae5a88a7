// cp.async: per-thread 16-byte copies from global to shared memory that complete asynchronously,
// in commit groups. For gathers TMA cannot express as one box (paged KV caches, where every page
// has its own address); TMA remains the path for regular tiles.
#pragma once

#include "../common/base.cuh"

namespace tk::cp_async {

// 16 bytes from src to dst (both 16-byte aligned; dst as a pointer or a shared-window address). With valid false nothing is read (src may be
// any address) and dst is zero-filled, so masked rows need no separate clearing pass.
__device__ inline void copy16(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ inline void copy16(void* dst, const void* src, bool valid) { copy16(smem_addr(dst), src, valid); }

// Closes the group of copies issued by this thread since the last commit.
__device__ inline void commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight. Other threads'
// copies need a CTA barrier after this before they may be read.
template <int N>
__device__ inline void wait() {
    static_assert(N >= 0 && N <= 7, "cp_async::wait: at most 7 pending groups can be named");
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace tk::cp_async
