// The op implementations that csrc/torch_bindings.cpp registers, one CPU and one CUDA per op.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace tkpy::ops {

void apply_rope_cpu(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                    const at::Tensor& sin, const std::optional<at::Tensor>& positions, bool interleaved);
void apply_rope_3d_cpu(const at::Tensor& q, const std::optional<at::Tensor>& k, at::IntArrayRef grid_thw,
                       const at::Tensor& freqs_t, const at::Tensor& freqs_h, const at::Tensor& freqs_w);

#if defined(TKPY_WITH_CUDA)
void apply_rope_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                     const at::Tensor& sin, const std::optional<at::Tensor>& positions, bool interleaved);
void apply_rope_3d_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k, at::IntArrayRef grid_thw,
                        const at::Tensor& freqs_t, const at::Tensor& freqs_h, const at::Tensor& freqs_w);
#endif

}  // namespace tkpy::ops
