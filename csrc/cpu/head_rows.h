// One head of one sequence of an attention tensor (q, k, v, out and their gradients) as ATen views
// that share its memory: what the CPU attention paths compute on.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>

namespace tkpy::cpu {

// One head of one sequence of q, k, v or out: row s is at data + s * token_stride elements.
struct HeadRows {
    void* data;
    int64_t token_stride;
    at::ScalarType dtype;

    // Rows [first, first + count) as a [count, head_dim] view that shares the memory.
    at::Tensor rows(int first, int count, int head_dim) const {
        const int64_t element_bytes = int64_t(c10::elementSize(dtype));
        void* start = static_cast<char*>(data) + first * token_stride * element_bytes;
        return at::from_blob(start, {count, head_dim}, {token_stride, 1}, at::TensorOptions().dtype(dtype));
    }
};

// from_blob takes a mutable pointer; q, k and v views are only ever read.
inline HeadRows head_rows(const void* base, int64_t batch_offset, int64_t token_start, int64_t token_stride,
                          int64_t head_offset, at::ScalarType dtype) {
    char* const bytes = static_cast<char*>(const_cast<void*>(base));
    const int64_t offset = batch_offset + token_start * token_stride + head_offset;
    return HeadRows{bytes + offset * int64_t(c10::elementSize(dtype)), token_stride, dtype};
}

}  // namespace tkpy::cpu
