// Public, torch-free C++ API of the GEMM kernel: C[M, N] = A[M, K] * B (B[K, N], or B[N, K] when
// trans_b), bf16 or fp16 in and out, fp32 accumulation. Row-major with 16-byte aligned bases and
// row strides (multiples of 8 elements), as TMA requires.
#pragma once

#include <cstdint>

#include "tkpy/types.h"

#if defined(TKPY_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace tkpy::gemm {

struct GemmParams {
    const void* a = nullptr;
    const void* b = nullptr;
    void* c = nullptr;
    int64_t m = 0;
    int64_t n = 0;
    int64_t k = 0;  // > 0
    int64_t lda = 0;  // row strides, elements
    int64_t ldb = 0;
    int64_t ldc = 0;
    bool trans_b = false;
    DType dtype = DType::bf16;  // bf16 or fp16
};

// The persistent kernel's tile order (exposed for tests): band height in tiles.
inline constexpr int kGroupM = 8;

#if defined(TKPY_WITH_CUDA)
cudaError_t launch_gemm(const GemmParams& params, cudaStream_t stream);
#endif

}  // namespace tkpy::gemm
