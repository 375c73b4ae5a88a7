// Input checks shared by every binding. Each message names the op and the argument, and says what
// was expected and what was received. A refused argument throws c10::ValueError (Python ValueError,
// which the Python API raises as tkpy.ArgumentError); a failed launch, c10::Error (RuntimeError).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

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
        case at::kDouble: return DType::fp64;
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

// The params structs and kernels index sizes with int: a size past INT32_MAX (a stride-0 view can
// have one without the memory) would be truncated, so it is refused.
constexpr int64_t kMaxIndex = std::numeric_limits<int32_t>::max();

inline void check_sizes_fit_int(const char* op, const char* name, const at::Tensor& t) {
    for (int64_t d = 0; d < t.dim(); ++d) {
        TORCH_CHECK_VALUE(t.size(d) <= kMaxIndex, op, ": ", name, " has a dim of ", t.size(d),
                          " elements, more than the kernels' int32 indices address (", kMaxIndex, "); got shape ",
                          t.sizes());
    }
}

inline void check_int_range(const char* op, const char* name, int64_t value, int64_t lo, int64_t hi) {
    TORCH_CHECK_VALUE(value >= lo && value <= hi, op, ": expected ", name, " in [", lo, ", ", hi, "], got ", value);
}

// The kernels take their scalars as float: a double that is finite and > 0 may still round to 0 or
// overflow to inf there.
inline bool positive_as_float(double x) {
    const float used = float(x);
    return std::isfinite(used) && used > 0;
}

// softmax_scale: finite and > 0 as the float the kernels use (NaN, inf, 0 or a negative scale can
// only give a meaningless softmax).
inline double checked_softmax_scale(const char* op, std::optional<double> scale, int64_t head_dim) {
    if (!scale.has_value()) return 1.0 / std::sqrt(double(head_dim));
    TORCH_CHECK_VALUE(positive_as_float(*scale), op,
                      ": expected softmax_scale finite and > 0 (as a float32), got ", *scale);
    return *scale;
}

// softcap: 0 (off) or finite and > 0 as the float the kernels use.
inline void check_softcap(const char* op, double softcap) {
    TORCH_CHECK_VALUE(softcap == 0 || positive_as_float(softcap), op,
                      ": expected softcap finite and >= 0 (0 turns it off) as a float32, got ", softcap);
}

namespace overlap {

// One unknown of the overlap equation: coef * x with x in [0, bound].
struct Term {
    int64_t coef;
    int64_t bound;
};

// Beyond this many search nodes, sharing is assumed rather than proven absent.
constexpr int64_t kMaxWork = 1 << 16;

// Whether sum(terms[i:].coef * x) == target has a solution; `reach[i]` is the largest sum of
// terms[i:]. Terms are sorted by descending coef, so each level leaves few candidates for x.
inline bool solvable(const std::vector<Term>& terms, const std::vector<int64_t>& reach, size_t i, int64_t target,
                     int64_t& work) {
    if (++work > kMaxWork) return true;
    if (i == terms.size()) return target == 0;
    const auto [c, u] = terms[i];
    const int64_t rest = reach[i + 1];
    const int64_t lo = std::max<int64_t>(0, target > rest ? (target - rest + c - 1) / c : 0);
    const int64_t hi = std::min<int64_t>(u, target / c);
    for (int64_t x = lo; x <= hi; ++x) {
        if (solvable(terms, reach, i + 1, target - c * x, work)) return true;
    }
    return false;
}

// a's elements and bytes as terms (coef in bytes, bound = size - 1); its dims of one element or
// stride 0 add no address.
inline void add_terms(std::vector<Term>& terms, const at::Tensor& t) {
    const int64_t bytes = int64_t(t.element_size());
    for (int64_t d = 0; d < t.dim(); ++d) {
        if (t.size(d) > 1 && t.stride(d) != 0) terms.push_back({t.stride(d) * bytes, t.size(d) - 1});
    }
    if (bytes > 1) terms.push_back({1, bytes - 1});
}

inline int64_t last_byte(const at::Tensor& t) {
    int64_t extent = int64_t(t.element_size()) - 1;
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d) * int64_t(t.element_size());
    return extent;
}

}  // namespace overlap

// Whether two tensors share a byte of memory. Views of different storages never do. ATen's
// at::get_overlap_status gives up (TooHard) on any strided view, such as q and k sliced from one
// qkv buffer, and needs data pointers that fake tensors lack; this solves
//   start_a + sum(i_d * stride_a_d) + byte_a = start_b + sum(j_d * stride_b_d) + byte_b
// exactly instead (as numpy's shares_memory does), from storage offsets, with j_d written as
// size - 1 - j'_d so that every coefficient is positive.
inline bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
    if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage()) return false;
    if (!a.storage().is_alias_of(b.storage())) return false;
    const int64_t start_a = a.storage_offset() * int64_t(a.element_size());
    const int64_t start_b = b.storage_offset() * int64_t(b.element_size());
    if (start_a + overlap::last_byte(a) < start_b || start_b + overlap::last_byte(b) < start_a) return false;
    std::vector<overlap::Term> terms;
    overlap::add_terms(terms, a);
    const size_t a_terms = terms.size();
    overlap::add_terms(terms, b);
    int64_t target = start_b - start_a;
    for (size_t i = a_terms; i < terms.size(); ++i) target += terms[i].coef * terms[i].bound;
    // Equal coefficients merge: x + y over [0, u] x [0, v] covers exactly [0, u + v].
    std::sort(terms.begin(), terms.end(), [](const auto& l, const auto& r) { return l.coef > r.coef; });
    std::vector<overlap::Term> merged;
    for (const overlap::Term& t : terms) {
        if (!merged.empty() && merged.back().coef == t.coef) {
            merged.back().bound += t.bound;
        } else {
            merged.push_back(t);
        }
    }
    std::vector<int64_t> reach(merged.size() + 1, 0);
    for (size_t i = merged.size(); i-- > 0;) reach[i] = reach[i + 1] + merged[i].coef * merged[i].bound;
    int64_t work = 0;
    return target >= 0 && overlap::solvable(merged, reach, 0, target, work);
}

// An in-place op's written tensor must not share memory with any other argument: the op would read
// what it already wrote (rotate twice) or write one element from two places.
inline void check_not_aliased(const char* op, const char* written, const at::Tensor& w, const char* other,
                              const at::Tensor& t) {
    TORCH_CHECK_VALUE(!shares_memory(w, t), op, ": ", written, " and ", other,
                      " share memory; the op writes ", written, " in place, so pass tensors that do not overlap "
                      "(e.g. .clone() one)");
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

// t's address for alignment checks: its data pointer, or, for a meta tensor, its byte offset into
// its storage (a real storage starts at least 16-byte aligned), so that torch.compile's fake
// tensors and a dry run on meta tensors refuse the views a real call refuses.
inline uintptr_t address_of(const at::Tensor& t) {
    if (t.is_meta()) return uintptr_t(t.storage_offset()) * t.element_size();
    return reinterpret_cast<uintptr_t>(t.data_ptr());
}

// t's values in host memory, contiguous: t itself on the CPU, a copy (a host sync) otherwise.
inline at::Tensor host_values(const at::Tensor& t) { return t.to(at::kCPU).contiguous(); }

#if defined(TKPY_WITH_CUDA)
inline void check_launch(const char* op, cudaError_t err) {
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace tkpy::ops
