// Public, torch-free C++ API of the RoPE kernels: a params struct and a launcher per op.
// A C++ server can fill these from raw device pointers and call the launchers on its own stream.
#pragma once

#include <cstdint>

#include "tkpy/types.h"

#if defined(TKPY_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace tkpy::rope {

// One rotated tensor, [batch, seqlen, heads, head_dim] with a contiguous last dim.
struct RotatedTensor {
    void* data = nullptr;  // null: absent (k is optional)
    int64_t batch_stride = 0;  // elements
    int64_t token_stride = 0;  // elements
    int64_t head_stride = 0;   // elements
    int heads = 0;
};

// What both RoPE ops share: q and k in one dtype, the token grid and the rotated dims.
struct RopeTensors {
    RotatedTensor q;
    RotatedTensor k;
    DType dtype = DType::bf16;
    int64_t batch = 0;
    int64_t seqlen = 0;
    int head_dim = 0;
    int rotary_dim = 0;  // even, <= head_dim; dims [rotary_dim, head_dim) are left alone
};

// apply_rope_: angles from a [rows, rotary_dim / 2] cos and sin table, row = position of the token.
struct Rope1dParams {
    RopeTensors x;
    const void* cos = nullptr;
    const void* sin = nullptr;
    DType table_dtype = DType::fp32;  // fp32 or x.dtype
    int64_t cos_row_stride = 0;       // elements
    int64_t sin_row_stride = 0;
    int64_t table_rows = 0;
    const void* positions = nullptr;  // null: position = token index
    bool positions_int64 = false;
    int64_t positions_batch_stride = 0;  // 0 when one position row serves every batch
    bool interleaved = false;
};

// apply_rope_3d_: angles from three fp32 [len, dims / 2, 2] (cos, sin) tables, one per axis,
// for tokens laid out as a (t, h, w) grid. Pairs are interleaved.
struct Rope3dParams {
    RopeTensors x;
    const float* table[3] = {nullptr, nullptr, nullptr};  // t, h, w
    int64_t table_row_stride[3] = {0, 0, 0};               // floats between rows
    int pairs[3] = {0, 0, 0};                              // dims / 2 of each axis
    int grid[3] = {0, 0, 0};                               // T, H, W
};

#if defined(TKPY_WITH_CUDA)
// Launch on `stream`. Returns the launch's cudaError_t (cudaSuccess when it was queued).
cudaError_t launch_rope_1d(const Rope1dParams& params, cudaStream_t stream);
cudaError_t launch_rope_3d(const Rope3dParams& params, cudaStream_t stream);
#endif

}  // namespace tkpy::rope
