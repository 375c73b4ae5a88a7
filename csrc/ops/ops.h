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

// decode_attention / kv_append_: see csrc/torch_bindings.cpp for the schemas, include/tkpy/decode.h
// for the semantics.
#define TKPY_DECODE_ATTENTION_ARGS                                                                                   \
    const at::Tensor &q, const at::Tensor &k_cache, const at::Tensor &v_cache,                                       \
        const std::optional<at::Tensor>&block_table, const at::Tensor &seqlens,                                       \
        const std::optional<at::Tensor>&cache_batch_idx, const std::optional<at::Tensor>&kv_head_slot,               \
        const std::optional<at::Tensor>&k_ring, const std::optional<at::Tensor>&v_ring,                               \
        const std::optional<at::Tensor>&ring_table, int64_t sink, int64_t local,                                      \
        const std::optional<at::Tensor>&page_indices, const std::optional<at::Tensor>&page_counts,                    \
        const std::optional<at::Tensor>&head_bits, double k_scale, double v_scale, double softmax_scale,              \
        int64_t window_left, int64_t window_right, double softcap, int64_t num_splits
#define TKPY_KV_APPEND_ARGS                                                                                          \
    const at::Tensor &k_cache, const at::Tensor &v_cache, const at::Tensor &k, const at::Tensor &v,                  \
        const std::optional<at::Tensor>&block_table, const at::Tensor &seqlens,                                       \
        const std::optional<at::Tensor>&cache_batch_idx, const std::optional<at::Tensor>&k_min,                       \
        const std::optional<at::Tensor>&k_max, const std::optional<at::Tensor>&rotary_cos,                            \
        const std::optional<at::Tensor>&rotary_sin, bool rotary_interleaved, double k_scale, double v_scale,          \
        const std::optional<at::Tensor>&kv_head_slot, const std::optional<at::Tensor>&k_ring,                         \
        const std::optional<at::Tensor>&v_ring, const std::optional<at::Tensor>&ring_table, int64_t sink, int64_t local

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(TKPY_DECODE_ATTENTION_ARGS);
void kv_append_cpu(TKPY_KV_APPEND_ARGS);

// torch.ops.tkpy_selftest: the tile library's host index math and self-test kernels.
at::Tensor tk_tile_offsets(int64_t rows, int64_t cols, int64_t elem_bytes, int64_t swizzle);
at::Tensor gemm_tile_order(int64_t tiles_m, int64_t tiles_n, int64_t group_m);

#if defined(TKPY_WITH_CUDA)
void tk_tma_roundtrip(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, int64_t swizzle, int64_t row,
                      int64_t col);
std::vector<at::Tensor> tk_register_ops(const at::Tensor& x);
at::Tensor tk_wgmma(const at::Tensor& a, const at::Tensor& b, int64_t variant);
at::Tensor tk_warp_mma(const at::Tensor& a, const at::Tensor& b, int64_t variant, int64_t b_valid_rows);
void tk_stuck_wait(const at::Tensor& reached, bool report);
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
std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(TKPY_DECODE_ATTENTION_ARGS);
void kv_append_cuda(TKPY_KV_APPEND_ARGS);
void apply_rope_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                     const at::Tensor& sin, const std::optional<at::Tensor>& positions, bool interleaved);
void apply_rope_3d_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k, at::IntArrayRef grid_thw,
                        const at::Tensor& freqs_t, const at::Tensor& freqs_h, const at::Tensor& freqs_w);
#endif

}  // namespace tkpy::ops
