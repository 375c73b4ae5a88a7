// The ops that csrc/torch_bindings.cpp declares and registers. Each is one function for the CPU, CUDA
// and Meta dispatch keys: it validates (ops/validate.h), then runs the CPU path, launches the CUDA
// kernel, or, for Meta (torch.compile's fake tensors), only returns the outputs' shapes. Arguments
// follow the schemas in csrc/torch_bindings.cpp, in order.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "tkpy/attention.h"

namespace tkpy::ops {

void apply_rope_(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos, const at::Tensor& sin,
                 const std::optional<at::Tensor>& positions, bool interleaved);
void apply_rope_3d_(const at::Tensor& q, const std::optional<at::Tensor>& k, at::IntArrayRef grid_thw,
                    const at::Tensor& freqs_t, const at::Tensor& freqs_h, const at::Tensor& freqs_w);

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, bool trans_b);

// The Hopper forward kernel CUDA calls run: set_attention_kernel's choice, else TKPY_ATTENTION_KERNEL's
// (read once), else pipelined. A ValueError names the variable when it names no kernel.
// set_attention_kernel returns the choice it replaces (automatic: none).
attention::Kernel set_attention_kernel(attention::Kernel kernel);
attention::Kernel selected_attention_kernel();

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& cu_seqlens_q,
                                                     const std::optional<at::Tensor>& cu_seqlens_k,
                                                     int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                     std::optional<double> softmax_scale, int64_t window_left,
                                                     int64_t window_right, double softcap, bool deterministic);

// Dense attention with UltraViCo's logit decay (tkpy/detail/ultravico_index.h): no window,
// softcap or backward; settings in latent frames, as tkpy.ultravico.UltraViCoConfig.
std::tuple<at::Tensor, at::Tensor> ultravico_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    std::optional<double> softmax_scale, int64_t tokens_per_frame, int64_t train_frames, double alpha, double beta,
    int64_t band_period, int64_t band_width, int64_t band_count, bool first_frame_mask, int64_t text_tokens);

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const at::Tensor& head_mask_type, const at::Tensor& streaming_info,
    const at::Tensor& sparse_index, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& block_indices, const std::optional<at::Tensor>& block_counts,
    std::optional<double> softmax_scale, bool is_causal, bool exact_streaming, bool deterministic);

// The backwards of the two above, from the forward's inputs, out and softmax_lse (never
// recomputed): (dq, dk, dv), with dlse the gradient of softmax_lse if it has one. `deterministic`
// (the forward's flag, which the forward itself ignores) makes CUDA's gradients bitwise
// reproducible; include/tkpy/attention.h, AttentionBackwardParams.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& softmax_lse, const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    std::optional<double> softmax_scale, int64_t window_left, int64_t window_right, double softcap, bool deterministic);

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& softmax_lse, const std::optional<at::Tensor>& dlse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const at::Tensor& head_mask_type, const at::Tensor& streaming_info,
    const at::Tensor& sparse_index, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& block_indices, const std::optional<at::Tensor>& block_counts,
    std::optional<double> softmax_scale, bool is_causal, bool exact_streaming, bool deterministic);

// Semantics: include/tkpy/decode.h.
std::tuple<at::Tensor, at::Tensor> decode_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& cache_batch_idx,
    const std::optional<at::Tensor>& kv_head_slot, const std::optional<at::Tensor>& k_ring,
    const std::optional<at::Tensor>& v_ring, const std::optional<at::Tensor>& ring_table, int64_t sink, int64_t local,
    const std::optional<at::Tensor>& page_indices, const std::optional<at::Tensor>& page_counts,
    const std::optional<at::Tensor>& head_bits, double k_scale, double v_scale, std::optional<double> softmax_scale,
    int64_t window_left, int64_t window_right, double softcap, int64_t num_splits);

void kv_append_(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& seqlens, const std::optional<at::Tensor>& block_table,
                const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& k_min,
                const std::optional<at::Tensor>& k_max, const std::optional<at::Tensor>& rotary_cos,
                const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved, double k_scale, double v_scale,
                const std::optional<at::Tensor>& kv_head_slot, const std::optional<at::Tensor>& k_ring,
                const std::optional<at::Tensor>& v_ring, const std::optional<at::Tensor>& ring_table, int64_t sink,
                int64_t local);

}  // namespace tkpy::ops
