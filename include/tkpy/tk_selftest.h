// Launchers of the tile library's self-test kernels: tiny kernels that each exercise one class of
// tk primitives on the GPU, so tests/test_tk.py can check them against a host reference. They are
// test instruments, registered under torch.ops.tkpy_selftest, not part of the product API.
#pragma once

#include <cstdint>

#include "tkpy/types.h"

#if defined(TKPY_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace tkpy::tk_selftest {

// TMA-load the bf16 tile [64 rows x 128 cols] at (row, col) of x into a shared tile with the given
// swizzle (32, 64 or 128 bytes), read it into registers as fp32, double it, write it to a second
// shared tile, then TMA-store it into y and TMA-add it into z at the same place. All three are
// row-major [rows, cols] bf16 with row stride `cols`.
struct TmaRoundtripParams {
    const void* x = nullptr;
    void* y = nullptr;
    void* z = nullptr;
    int64_t rows = 0;
    int64_t cols = 0;
    int row = 0;
    int col = 0;
    int swizzle = 128;
};

// One warp: x is fp32 [rows <= 32, cols <= 64] (row stride cols), read as a 32x64 tile with zeros
// outside. Writes row_max/row_sum [32], col_max/col_sum [64] and y = exp2(x - row_max) (bf16,
// [rows, cols]), z = x + col_max (fp32, [rows, cols]).
struct RegisterOpsParams {
    const float* x = nullptr;
    int64_t rows = 0;
    int64_t cols = 0;
    float* row_max = nullptr;
    float* row_sum = nullptr;
    float* col_max = nullptr;
    float* col_sum = nullptr;
    void* y = nullptr;
    float* z = nullptr;
};

// One warp, tk's online softmax (tk/ops/warp/softmax.cuh) over x, fp32 [16, cols] (cols a multiple
// of 32, at most 256, row stride cols), in blocks of 32 columns: row r sees columns [0, keys[r])
// (tk::warp::mask); scores are x · scale, or cap · tanh(x · scale / cap) for softcap > 0. Each
// block's weights are added column for column into o (fp32 [16, 32]), as O += P·V with V a stack
// of identities, so o[r][c] = sum over blocks b of softmax(row r)[32 b + c]; lse [16] is natural.
// A row that sees nothing gets o = 0 and lse = -inf.
struct OnlineSoftmaxParams {
    const float* x = nullptr;
    const int* keys = nullptr;
    int cols = 0;
    float scale = 1.f;
    float softcap = 0.f;
    float* o = nullptr;
    float* lse = nullptr;
};

// One warp, UltraViCo's score ops (tk/ops/warp/softmax.cuh): dot[r] = q[r] · vec (row_dot, q bf16
// [16, 128] through a shared tile, vec fp32 [128]); and for x fp32 [16, 64] and centre fp32 [16],
// the decay x > c ? c + f·(x − c) : x with f = factor everywhere (uniform), where (r + c) % 3 == 0
// (where; x elsewhere), and f = factors[r][c] (each, factors fp32 [16, 64]).
struct DecayOpsParams {
    const float* x = nullptr;
    const float* centre = nullptr;
    const float* factors = nullptr;
    const void* q = nullptr;
    const float* vec = nullptr;
    float factor = 1.f;
    float* dot = nullptr;
    float* uniform = nullptr;
    float* where = nullptr;
    float* each = nullptr;
};

// One warpgroup: d (fp32 [64, n]) = A * B with A and B in shared memory (TMA-loaded), or A read
// into registers first. a is [64, k] (or [k, 64] for the A-transposed variants), b is [n, k] for
// the B-transposed variants and [k, n] otherwise; all row-major.
enum class WgmmaVariant : int { ABt = 0, AB = 1, AtB = 2, AtBt = 3, reg_ABt = 4, reg_AB = 5 };

struct WgmmaParams {
    const void* a = nullptr;
    const void* b = nullptr;
    float* d = nullptr;
    int n = 0;
    int k = 0;
    WgmmaVariant variant = WgmmaVariant::ABt;
    DType dtype = DType::bf16;
};

// Whether launch_wgmma has a kernel for (dtype, n, k, variant): every variant at bf16, k = 64 and
// n in {16, 64, 128, 256}; plus k = 128 (two swizzle chunks) and fp16 for ABt and AB at n = 64.
inline bool wgmma_supported(DType dtype, int n, int k, WgmmaVariant variant) {
    const bool plain_b = variant == WgmmaVariant::ABt || variant == WgmmaVariant::AB;
    if (dtype == DType::bf16 && k == 64) return n == 16 || n == 32 || n == 64 || n == 128 || n == 256;
    // The attention backward's dV += Pᵀ dO and dK += dSᵀ Q: A from registers, K = 32 queries.
    if (dtype == DType::bf16 && k == 32) return variant == WgmmaVariant::reg_AB && (n == 64 || n == 128);
    return n == 64 && plain_b && ((dtype == DType::bf16 && k == 128) || (dtype == DType::fp16 && k == 64));
}

// One warp per 16 rows, the decode kernel's path (csrc/kernels/decode/decode_attention.cu): a
// [rows, k] and b are copied into 128-byte-swizzled shared tiles with 16-byte cp.async (two threads
// per row, alternate units, through row_cursor), rows of b at and past b_valid_rows zero-filled
// (never read); then mma.sync m16n8k16 on ldmatrix-loaded fragments:
//   ABt: c = a · bᵀ, b [n, k] read with ldsm_rows / load_base (S = Q·Kᵀ);
//   AB:  c = a · b,  b [k, n]: per 16 columns of a, an fp32 accumulator x = a_blk · Iᵀ (= a_blk,
//        exact) by the ABt path, repacked in registers to a 16-bit A fragment, times b's 16 rows
//        read with ldsm_rows_transposed / load_base_transposed (O += P·V).
// c is fp32 [rows, n]. All row-major, 16-byte aligned.
enum class WarpMmaVariant : int { ABt = 0, AB = 1 };

struct WarpMmaParams {
    const void* a = nullptr;
    const void* b = nullptr;
    float* c = nullptr;
    int rows = 0;  // 16, 32, 48 or 64: one warp per 16 rows
    int n = 0;
    int k = 0;
    int b_valid_rows = 0;  // rows of b copied from memory; the rest read as zero
    WarpMmaVariant variant = WarpMmaVariant::ABt;
    DType dtype = DType::bf16;
};

inline constexpr int kWarpMmaMaxRows = 64;

// Whether launch_warp_mma has a kernel for (dtype, rows, n, k): bf16 or fp16, rows a multiple of
// 16 up to 64, n and k each 16, 64 or 128.
inline bool warp_mma_supported(DType dtype, int rows, int n, int k) {
    const auto size_ok = [](int x) { return x == 16 || x == 64 || x == 128; };
    return (dtype == DType::bf16 || dtype == DType::fp16) && rows > 0 && rows <= kWarpMmaMaxRows && rows % 16 == 0 &&
           size_ok(n) && size_ok(k);
}

// Two blocks of two warps wait on an mbarrier that no thread arrives at, so the wait watchdog must
// end the kernel with a trap; `reached` (one int on the device) is set to 1 if the wait ever
// returns. report false: the kernel as the library builds by default (trap only, after
// TK_WAIT_WATCHDOG_CYCLES = 2^33 cycles, about 4 s); true: built with TK_WAIT_WATCHDOG_REPORT and a
// 2^24-cycle budget, so each stuck warp first prints the wait's call site. The trap leaves the
// CUDA context unusable: run it in a process of its own.
struct StuckWaitParams {
    int* reached = nullptr;
    bool report = false;
};

#if defined(TKPY_WITH_CUDA)
cudaError_t launch_tma_roundtrip(const TmaRoundtripParams& p, cudaStream_t stream);
cudaError_t launch_register_ops(const RegisterOpsParams& p, cudaStream_t stream);
cudaError_t launch_online_softmax(const OnlineSoftmaxParams& p, cudaStream_t stream);
cudaError_t launch_decay_ops(const DecayOpsParams& p, cudaStream_t stream);
cudaError_t launch_wgmma(const WgmmaParams& p, cudaStream_t stream);
cudaError_t launch_warp_mma(const WarpMmaParams& p, cudaStream_t stream);
cudaError_t launch_stuck_wait(const StuckWaitParams& p, cudaStream_t stream);
// The report = true kernel, in its own translation unit (stuck_wait_report.cu).
cudaError_t launch_stuck_wait_report(int* reached, cudaStream_t stream);
#endif

}  // namespace tkpy::tk_selftest
