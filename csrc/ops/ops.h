// The op implementations that csrc/torch_bindings.cpp registers, one CPU and one CUDA per op.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace tkpy::ops {

void apply_rope_cpu(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                    const at::Tensor& sin, const std::optional<at::Tensor>& positions, bool interleaved);
void apply_rope_3d_cpu(const at::Tensor& q, const std::optional<at::Tensor>& k, at::IntArrayRef grid_thw,
                       const at::Tensor& freqs_t, const at::Tensor& freqs_h, const at::Tensor& freqs_w);

at::Tensor gemm_cpu(const at::Tensor& a, const at::Tensor& b, bool trans_b);

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const std::optional<at::Tensor>& cu_seqlens_q,
                                                         const std::optional<at::Tensor>& cu_seqlens_k,
                                                         int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                         double softmax_scale, int64_t window_left,
                                                         int64_t window_right, double softcap);

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const at::Tensor& head_mask_type, const at::Tensor& streaming_info,
    const at::Tensor& sparse_index, const std::optional<at::Tensor>& block_indices,
    const std::optional<at::Tensor>& block_counts, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    bool is_causal, bool exact_streaming);

// torch.ops.tkpy_selftest: the tile library's host index math and self-test kernels.
at::Tensor tk_tile_offsets(int64_t rows, int64_t cols, int64_t elem_bytes, int64_t swizzle);
at::Tensor gemm_tile_order(int64_t tiles_m, int64_t tiles_n, int64_t group_m);

#if defined(TKPY_WITH_CUDA)
void tk_tma_roundtrip(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, int64_t swizzle, int64_t row,
                      int64_t col);
std::vector<at::Tensor> tk_register_ops(const at::Tensor& x);
at::Tensor tk_wgmma(const at::Tensor& a, const at::Tensor& b, int64_t variant);
at::Tensor gemm_cuda(const at::Tensor& a, const at::Tensor& b, bool trans_b);
std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                          const std::optional<at::Tensor>& cu_seqlens_q,
                                                          const std::optional<at::Tensor>& cu_seqlens_k,
                                                          int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                          double softmax_scale, int64_t window_left,
                                                          int64_t window_right, double softcap);
std::tuple<at::Tensor, at::Tensor> block_sparse_attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const at::Tensor& head_mask_type, const at::Tensor& streaming_info,
    const at::Tensor& sparse_index, const std::optional<at::Tensor>& block_indices,
    const std::optional<at::Tensor>& block_counts, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    bool is_causal, bool exact_streaming);
void apply_rope_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                     const at::Tensor& sin, const std::optional<at::Tensor>& positions, bool interleaved);
void apply_rope_3d_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k, at::IntArrayRef grid_thw,
                        const at::Tensor& freqs_t, const at::Tensor& freqs_h, const at::Tensor& freqs_w);
#endif

}  // namespace tkpy::ops
