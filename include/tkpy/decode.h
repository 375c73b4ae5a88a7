// Public, torch-free C++ API of decode attention over a KV cache (flash-attn's
// flash_attn_with_kvcache layout) and of LServe's sparse decode, plus the KV append that feeds them.
//
// q [B, Sq, Hq, D]; out like q (contiguous); lse fp32 [B, Hq, Sq] (contiguous).
// Main pool k/v: paged [num_pages, page_size, Hc, D] with a page table [B, max_pages], or a
// contiguous cache [B_cache, S_cache, Hc, D] (one page of S_cache tokens per sequence).
// Sequence b attends to keys [0, seqlens[b]), with Sq query rows aligned bottom-right.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tkpy/detail/paged_index.h"
#include "tkpy/types.h"

#if defined(TKPY_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace tkpy::decode {

// One K/V pool: k and v share shape and strides (elements). A page is `page_size` tokens. Decode
// only reads it; append writes it.
struct KVPool {
    void* k = nullptr;
    void* v = nullptr;
    int64_t page_stride = 0, token_stride = 0, head_stride = 0;
    int heads = 0;
    int64_t num_pages = 0;
};

struct DecodeParams {
    const void* q = nullptr;
    void* out = nullptr;
    float* lse = nullptr;
    int64_t q_batch_stride = 0, q_token_stride = 0, q_head_stride = 0;
    int batch = 0;
    int seqlen_q = 0;
    int heads_q = 0;
    int heads_kv = 0;  // kv heads of the model layer (Hq % heads_kv == 0)
    int head_dim = 0;
    const int32_t* seqlens = nullptr;  // [B]
    KVPool cache;                      // dense and retrieval heads
    detail::PageTable table{};
    // LServe: heads.kv_head_slot == null is plain dense decode over `cache`. Otherwise streaming
    // heads read `ring` (64-token pages) and seqlen_q is 1.
    detail::DecodeHeads heads{};
    KVPool ring;
    DType dtype = DType::bf16;     // q and out
    DType kv_dtype = DType::bf16;  // q's dtype, or int8
    float k_scale = 1.f;           // int8: k = stored * k_scale
    float v_scale = 1.f;
    float softmax_scale = 1.f;
    float softcap = 0.f;
    int window_left = -1;
    int window_right = -1;
    // Split-KV: each (sequence, kv head) plan is cut into num_splits ranges (detail::split_range);
    // with num_splits > 1 the splits write fp32 partials that a merge kernel combines by lse:
    // partial_out [num_splits, B, Sq, Hq, D], partial_lse [num_splits, B, Hq, Sq].
    int num_splits = 1;
    float* partial_out = nullptr;
    float* partial_lse = nullptr;
};

// Append S_new tokens per sequence into a pool at positions [seqlens[b], seqlens[b] + S_new): rotate
// k (optional RoPE, flash-attn's rotary_cos/sin [rows, R/2] at row = position), update the min/max
// key stats of the logical pages touched (from the rotated, pre-quantisation keys; a logical page
// whose first token is written is reset first), quantise (int8 pools) and store. With LServe heads,
// streaming heads go to the ring and only tokens that Ring::keeps are written.
struct AppendParams {
    const void* k = nullptr;  // [B, S_new, Hkv, D]
    const void* v = nullptr;
    int64_t k_batch_stride = 0, k_token_stride = 0, k_head_stride = 0;
    int64_t v_batch_stride = 0, v_token_stride = 0, v_head_stride = 0;
    int batch = 0;
    int seqlen_new = 0;
    int heads_kv = 0;
    int head_dim = 0;
    const int32_t* seqlens = nullptr;  // [B]: tokens before the append
    KVPool cache;
    detail::PageTable table{};
    detail::DecodeHeads heads{};  // kv_head_slot / ring_table / ring only
    KVPool ring;
    // Stats of the main pool: [num_pages, page_size / 16, Hc, D] fp32; null: no stats.
    float* k_min = nullptr;
    float* k_max = nullptr;
    const void* rotary_cos = nullptr;  // [rotary_rows, rotary_dim / 2], dtype rotary_dtype; null: no RoPE
    const void* rotary_sin = nullptr;
    int rotary_rows = 0;
    int rotary_dim = 0;
    bool rotary_interleaved = false;
    DType rotary_dtype = DType::fp32;
    DType dtype = DType::bf16;     // k and v
    DType kv_dtype = DType::bf16;  // pools: k's dtype or int8
    float k_scale = 1.f;
    float v_scale = 1.f;
};

// ---- split-KV planning: what a caller does between filling DecodeParams and launching --------------
//
//   DecodeParams p = ...;              // num_splits = 0 picks the split count
//   plan_splits(p, sm_count);          // sm_count: cudaDevAttrMultiProcessorCount
//   void* ws = allocate(workspace_bytes(p));
//   set_workspace(p, ws);              // ws must outlive the kernels queued by the launch
//   launch_decode_attention(p, stream);

// The most pages one (sequence, kv head) plan visits, from shapes alone: dense heads every page of
// the table; retrieval heads their selected list plus the newest page; streaming heads the ring.
inline int max_plan_pages(const DecodeParams& p) {
    int pages = p.table.max_pages;
    if (p.heads.page_indices != nullptr && p.heads.max_selected + 1 < pages) pages = p.heads.max_selected + 1;
    if (p.heads.kv_head_slot != nullptr && p.heads.ring.pages() > pages) pages = p.heads.ring.pages();
    return pages;
}

// Resolves num_splits = 0 against `workers` parallel units (SMs on a GPU, threads on the CPU): enough
// (sequence, kv head) ranges to fill two waves, no range shorter than four pages. A num_splits
// already >= 1 is kept.
inline void plan_splits(DecodeParams& p, int workers) {
    if (p.num_splits == 0) {
        p.num_splits = detail::choose_num_splits(int64_t(p.batch) * p.heads_kv, max_plan_pages(p), workers);
    }
}

// Elements of the fp32 split-KV partials: partial_out [num_splits, B, Sq, Hq, D], then partial_lse
// [num_splits, B, Hq, Sq]. None with a single split.
inline int64_t partial_out_elements(const DecodeParams& p) {
    return p.num_splits <= 1 ? 0 : int64_t(p.num_splits) * p.batch * p.seqlen_q * p.heads_q * p.head_dim;
}
inline int64_t partial_lse_elements(const DecodeParams& p) {
    return p.num_splits <= 1 ? 0 : int64_t(p.num_splits) * p.batch * p.heads_q * p.seqlen_q;
}

// Bytes of workspace the launch needs once plan_splits has run (0: none).
inline size_t workspace_bytes(const DecodeParams& p) {
    return size_t(partial_out_elements(p) + partial_lse_elements(p)) * sizeof(float);
}

// Points the partials into `workspace` (workspace_bytes(p) bytes, 16-byte aligned: the kernels read
// the partials as float4; on the launch's device). Null with a single split.
inline void set_workspace(DecodeParams& p, void* workspace) {
    float* base = p.num_splits <= 1 ? nullptr : static_cast<float*>(workspace);
    p.partial_out = base;
    p.partial_lse = base == nullptr ? nullptr : base + partial_out_elements(p);
}

#if defined(TKPY_WITH_CUDA)
cudaError_t launch_decode_attention(const DecodeParams& params, cudaStream_t stream);
cudaError_t launch_kv_append(const AppendParams& params, cudaStream_t stream);
#endif

}  // namespace tkpy::decode
