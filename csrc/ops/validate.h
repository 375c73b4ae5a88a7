// Input checks shared by every binding. Each message names the op and the argument, and says what
// was expected and what was received. A refused argument throws c10::ValueError (Python ValueError,
// which the Python API raises as tkpy.ArgumentError); a failed launch, c10::Error (RuntimeError).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "tkpy/types.h"

#if defined(TKPY_WITH_CUDA)
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cuda_runtime_api.h>
#endif

namespace tkpy::ops {

inline DType to_dtype(at::ScalarType t) {
    switch (t) {
        case at::kBFloat16: return DType::bf16;
        case at::kHalf: return DType::fp16;
        case at::kFloat: return DType::fp32;
        default: TORCH_CHECK_VALUE(false, "tkpy: no kernel for dtype ", t);
    }
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
    const auto s = t.scalar_type();
    TORCH_CHECK_VALUE(s == at::kBFloat16 || s == at::kHalf || s == at::kFloat, op, ": expected ", name,
                      " to be bfloat16, float16 or float32, got ", s);
}

inline void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.dim() >= 1 && (t.stride(-1) == 1 || t.size(-1) <= 1), op, ": expected ", name,
                      " to have a contiguous last dim (stride 1), got strides ", t.strides(),
                      "; call .contiguous() first");
}

// An in-place op on an expanded (broadcast) view would write one element several times.
inline void check_no_internal_overlap(const char* op, const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
                      " has elements that share memory (an expanded view?); pass a tensor that owns each element, "
                      "e.g. .clone()");
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
    TORCH_CHECK_VALUE(t.device() == q.device(), op, ": expected ", name, " on q's device ", q.device(), ", got ",
                      t.device());
}

// A window edge (-1 unbounded) as the params structs hold it: edges wider than any sequence are
// unbounded anyway, and clamping keeps position + edge in int range.
inline int clamp_window(int64_t edge) { return int(std::min<int64_t>(edge, int64_t(1) << 30)); }

// The one validation policy. Shapes, dtypes and devices are always checked (above and in each
// binding). Values that only the host can check (cu_seqlens monotone, page ids inside the pool,
// head types) are read on the host:
//   CPU tensors:  always; their values cost no sync, and the CPU paths rely on the checks.
//   CUDA tensors: only with TKPY_CHECK_VALUES=1 (one sync per call), and never while a CUDA graph
//                 is being captured, where a sync is illegal. Otherwise the kernels guard their
//                 own reads.
// Meta tensors (torch.compile's fake tensors) have no values. python/tkpy/validation.py applies
// the same policy to the few value checks made in Python.
inline bool values_checked(const at::Tensor& t) {
    if (t.is_cpu()) return true;
    const char* mode = std::getenv("TKPY_CHECK_VALUES");
    if (t.is_meta() || mode == nullptr || std::strcmp(mode, "1") != 0) return false;
#if defined(TKPY_WITH_CUDA)
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
#else
    return true;
#endif
}

// t's data for a params struct; null for a meta tensor: torch.compile's fake tensors forbid the
// access, and a Meta call only checks and shapes, it launches nothing.
template <class T = void>
T* data_of(const at::Tensor& t) {
    if (t.is_meta()) return nullptr;
    if constexpr (std::is_void_v<T>) {
        return t.data_ptr();
    } else {
        return t.data_ptr<T>();
    }
}

// t's values in host memory, contiguous: t itself on the CPU, a copy (a host sync) otherwise.
inline at::Tensor host_values(const at::Tensor& t) { return t.to(at::kCPU).contiguous(); }

#if defined(TKPY_WITH_CUDA)
inline void check_launch(const char* op, cudaError_t err) {
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace tkpy::ops
