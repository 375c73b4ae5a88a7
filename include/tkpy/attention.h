// Public, torch-free C++ API of dense attention forward (flash-attn layout and semantics).
//
// Batched: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], out like q, lse fp32 [B, Hq, Sq].
// Varlen (cu_seqlens_q/k set): q [total_q, Hq, D], k/v [total_k, Hkv, D], lse fp32 [Hq, total_q];
// sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b + 1] - 1.
// The CUDA kernels take bf16 and fp16; the CPU path also fp32 and fp64 (for which lse is fp64).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "tkpy/detail/attention_bwd_index.h"
#include "tkpy/detail/block_sparse_index.h"
#include "tkpy/detail/ultravico_index.h"
#include "tkpy/types.h"

#if defined(TKPY_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace tkpy::attention {

// Which Hopper forward kernel runs (DESIGN.md §5). Both compute the same attention, with the same
// masks and plans:
//   pipelined: FlashAttention-3's overlaps: consumer warpgroups take turns issuing wgmma
//              (ping-pong), and each issues the next block's Q·Kᵀ before the softmax of the current
//              one; 3 consumer warpgroups (192-row tiles) at head_dim 64 for dense attention;
//   baseline:  one wgmma at a time per warpgroup, 2 consumer warpgroups (128-row tiles).
// automatic: the TKPY_ATTENTION_KERNEL environment variable (baseline | pipelined), read once per
// process; pipelined when it is unset or empty.
enum class Kernel : int { automatic = 0, baseline = 1, pipelined = 2 };

// The kernel a name selects: true and *kernel set for "baseline" and "pipelined", false otherwise.
inline bool parse_kernel(const char* name, Kernel* kernel) {
    const auto equals = [](const char* a, const char* b) {
        while (*a != 0 && *a == *b) ++a, ++b;
        return *a == *b;
    };
    if (equals(name, "baseline")) *kernel = Kernel::baseline;
    else if (equals(name, "pipelined")) *kernel = Kernel::pipelined;
    else return false;
    return true;
}

// TKPY_ATTENTION_KERNEL as the process started with it (read on first use, then kept), "" if unset.
inline const char* kernel_environment() {
    static const std::string value = [] {
        const char* v = std::getenv("TKPY_ATTENTION_KERNEL");
        return std::string(v == nullptr ? "" : v);
    }();
    return value.c_str();
}

// The kernel `requested` means: itself, or for automatic the environment's choice (pipelined when
// unset or empty). False when the environment names no kernel.
inline bool resolve_kernel(Kernel requested, Kernel* kernel) {
    if (requested != Kernel::automatic) {
        *kernel = requested;
        return true;
    }
    const char* env = kernel_environment();
    if (*env == 0) {
        *kernel = Kernel::pipelined;
        return true;
    }
    return parse_kernel(env, kernel);
}

inline const char* kernel_name(Kernel kernel) {
    return kernel == Kernel::baseline ? "baseline" : kernel == Kernel::pipelined ? "pipelined" : "automatic";
}

struct AttentionParams {
    const void* q = nullptr;
    const void* k = nullptr;
    const void* v = nullptr;
    void* out = nullptr;
    float* lse = nullptr;        // fp32; null for fp64 inputs
    double* lse_fp64 = nullptr;  // fp64 inputs (CPU only): lse in float64
    // Strides in elements. Batch strides are unused (0) in varlen mode.
    int64_t q_batch_stride = 0, q_token_stride = 0, q_head_stride = 0;
    int64_t k_batch_stride = 0, k_token_stride = 0, k_head_stride = 0;
    int64_t v_batch_stride = 0, v_token_stride = 0, v_head_stride = 0;
    int64_t o_batch_stride = 0, o_token_stride = 0, o_head_stride = 0;
    // lse element of (batch b, head h, query token t) is lse[b * lse_batch_stride + h * lse_head_stride + t],
    // with t the token's index in its sequence (batched) or in the packed tensor (varlen).
    int64_t lse_batch_stride = 0, lse_head_stride = 0;
    int batch = 0;
    int heads_q = 0;
    int heads_kv = 0;
    int head_dim = 0;
    int seqlen_q = 0;  // batched: Sq; varlen: max_seqlen_q
    int seqlen_k = 0;  // batched: Sk; varlen: max_seqlen_k
    int64_t total_q = 0;  // varlen: tokens in the packed q (and out); unused when batched
    int64_t total_k = 0;  // varlen: tokens in the packed k and v
    const int32_t* cu_seqlens_q = nullptr;  // [batch + 1], device memory for CUDA; null when batched
    const int32_t* cu_seqlens_k = nullptr;
    float softmax_scale = 1.f;
    float softcap = 0.f;   // > 0: scores = softcap * tanh(scores / softcap)
    // The same two as given, in double: the CPU's float64 path computes with these (the kernels
    // and the other CPU paths with the floats).
    double softmax_scale_fp64 = 1.0;
    double softcap_fp64 = 0.0;
    int window_left = -1;  // keys visible to query i: [i + Sk - Sq - left, i + Sk - Sq + right];
    int window_right = -1; // -1 is unbounded; causal is window_right = 0
    DType dtype = DType::bf16;
    // LServe unified sparse prefill (block_sparse_attn_func and its streaming variants): per-head
    // types and block lists, in 128-token blocks. head_mask_type == nullptr: plain dense attention
    // with the window above. Otherwise varlen only, and the window fields are unused.
    detail::SparseHeads sparse{};
    // UltraViCo's logit decay (tkpy/detail/ultravico_index.h), for dense attention without a window
    // or softcap, bf16/fp16 (fp32 on the CPU). decay.key_mean must hold k̄ (launch_key_mean) first.
    detail::Decay decay{};
    Kernel kernel = Kernel::automatic;
};

// The backward of a forward call: gradients of q, k and v from dout (and, optionally, of lse).
// `fwd` is the forward's params as it ran (q, k, v, out, lse, sizes, masks, plans; kernel unused).
// dq is laid out like q, dk and dv like k (strides below); for GQA, dk and dv are summed over
// each kv head's query heads. A query that saw no key gets no gradient and gives none.
struct AttentionBackwardParams {
    AttentionParams fwd;
    const void* dout = nullptr;  // like out
    int64_t do_batch_stride = 0, do_token_stride = 0, do_head_stride = 0;
    const float* dlse = nullptr;  // gradient of lse, laid out like lse; null: none
    const double* dlse_fp64 = nullptr;  // fp64 inputs (CPU only): dlse in float64, dlse null
    void* dq = nullptr;
    void* dk = nullptr;
    void* dv = nullptr;
    int64_t dq_batch_stride = 0, dq_token_stride = 0, dq_head_stride = 0;
    int64_t dk_batch_stride = 0, dk_token_stride = 0, dk_head_stride = 0;
    int64_t dv_batch_stride = 0, dv_token_stride = 0, dv_head_stride = 0;
    // CUDA workspace, from attention_backward_workspace(), all written by the launch itself:
    // per query, lse · log2(e) and delta = rowsum(dout * out) - dlse, laid out [batch, heads_q,
    // seqlen_q rounded up to 64] (varlen too, with max_seqlen_q) so that each block of queries is
    // one aligned bulk copy; dQ's fp32 accumulator [batch or 1, heads_q, rows, head_dim] with rows
    // = seqlen_q (batched) or total_q (varlen); for deterministic, one int32 counter per (batch,
    // query head, block of detail::kBwdQueryBlock queries); and with block-sparse lists, each
    // list's block_counts entry cut to the list's ascending prefix (what the forward walks), one
    // int32 per entry. Buffers from the caching allocator (or cudaMalloc) are aligned enough: the
    // statistics are read by 16-byte bulk copies.
    float* lse_log2 = nullptr;
    float* delta = nullptr;
    float* dq_accum = nullptr;
    int32_t* dq_semaphore = nullptr;  // used exactly when `deterministic`, then required
    int32_t* ascending_counts = nullptr;
    // Bitwise-identical gradients run to run: dQ's additions from different key blocks are made in
    // a fixed order (each waits for the key blocks before it), at some cost in speed. The CPU path
    // is deterministic either way.
    bool deterministic = false;
};

// Elements of each CUDA workspace buffer the backward of `p` needs (fwd filled in).
struct AttentionBackwardWorkspace {
    int64_t row_stats;         // floats, each of lse_log2 and delta
    int64_t dq_accum;          // floats
    int64_t dq_semaphore;      // int32s (0 unless deterministic)
    int64_t ascending_counts;  // int32s (0 without block-sparse lists)
};

TKPY_HD int64_t padded_query_rows(const AttentionParams& p) { return (int64_t(p.seqlen_q) + 63) / 64 * 64; }

inline AttentionBackwardWorkspace attention_backward_workspace(const AttentionParams& p, bool deterministic) {
    const bool varlen = p.cu_seqlens_q != nullptr;
    const int64_t rows = varlen ? p.total_q : int64_t(p.batch) * p.seqlen_q;
    const int64_t stats = int64_t(p.batch) * p.heads_q * padded_query_rows(p);
    const int64_t list_rows =
        p.sparse.block_counts != nullptr ? int64_t(p.batch) * p.sparse.n_sparse * p.sparse.mask_q_blocks : 0;
    return AttentionBackwardWorkspace{stats, rows * p.heads_q * p.head_dim,
                                      deterministic ? stats / detail::kBwdQueryBlock : 0, list_rows};
}

// UltraViCo's k̄: floats of the workspace launch_key_mean needs for `p` (the first of its two
// passes sums chunks of kKeyMeanChunk keys).
inline constexpr int kKeyMeanChunk = 512;
inline int64_t key_mean_workspace(const AttentionParams& p) {
    return int64_t(p.batch) * p.heads_kv * ((int64_t(p.seqlen_k) + kKeyMeanChunk - 1) / kKeyMeanChunk) * p.head_dim;
}

#if defined(TKPY_WITH_CUDA)
// UltraViCo's k̄: key_mean[b, h, :] = the mean of sequence b's keys of kv head h, in fp32 (0 for a
// sequence without keys), from p's k, sizes and cu_seqlens_k. Two passes in a fixed order (chunk
// sums into `workspace`, key_mean_workspace(p) floats, then their sum), so it is deterministic.
cudaError_t launch_key_mean(const AttentionParams& p, float* workspace, float* key_mean, cudaStream_t stream);

// cudaErrorInvalidValue when params.kernel is automatic and TKPY_ATTENTION_KERNEL names no kernel.
cudaError_t launch_attention_forward(const AttentionParams& params, cudaStream_t stream);

// The backward: fills delta, zeroes dq_accum (and the semaphores), runs the key-block-stationary
// kernel and converts dq_accum into dq. Head dims 64, 128 and 256, bf16 and fp16.
cudaError_t launch_attention_backward(const AttentionBackwardParams& params, cudaStream_t stream);
#endif

}  // namespace tkpy::attention
