// The TMA view of one attention tensor (q, k, v, out, dout), shared by the forward and backward
// launchers.
#pragma once

#include <cstdint>

#include "tk/tk.cuh"

namespace tkpy::attention {

// A [batch, rows, heads, D] tensor with its strides; varlen tensors are one "batch" of packed
// tokens. A dim of size 1 may carry any stride in torch; TMA wants every stride a multiple of 16
// bytes, so those get the stride a packed layout would have.
template <typename T, int D>
tk::gl4<T> tma_view(const void* data, bool varlen, int batch, int64_t rows, int heads, int64_t batch_stride,
                    int64_t token_stride, int64_t head_stride) {
    const int64_t batches = varlen ? 1 : batch;
    return tk::gl4<T>{static_cast<T*>(const_cast<void*>(data)), batches, rows, heads, D,
                      batches == 1 ? rows * token_stride : batch_stride, token_stride,
                      heads == 1 ? int64_t(D) : head_stride};
}

}  // namespace tkpy::attention
