// CPU decode attention and KV append on the same params structs and index math as the CUDA kernels.
//
// Decode: one task per (sequence, kv head, split), as the GPU has one CTA. A task walks the entries
// split_range gives it of the (sequence, kv head)'s decode_plan, reads each page's tokens once for
// every query row of the group (query heads x Sq rows), masks them exactly as the kernel does, and
// runs an online softmax in fp32. With more than one split the tasks write fp32 partials that a
// second pass merges by lse, as the kernel's merge does. Products, exp and row reductions run as
// ATen ops on fp32 buffers (vectorised for the host CPU); the masks and bookkeeping are plain loops.
//
// Append: one task per (sequence, kv head), walking the new tokens in order, so the page stats can
// reset a logical page at its first token and combine after it.
#include "cpu/cpu_ops.h"
#include "cpu/online_softmax.h"

#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "tkpy/detail/attention_index.h"
#include "tkpy/detail/paged_index.h"
#include "tkpy/detail/rope_index.h"

namespace tkpy::cpu {
namespace {

using decode::AppendParams;
using decode::DecodeParams;
using decode::KVPool;

// Tokens of a page scored at once: bounds the fp32 buffers when a page is long (a contiguous cache
// is one page of S_cache tokens) while keeping the matmuls large enough to run near the BLAS peak.
constexpr int kKeyChunk = 256;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows [first, first + count) of a strided [rows, head_dim] block as a view sharing the memory;
// from_blob takes a mutable pointer, and q, k and v views are only ever read.
at::Tensor rows_view(const void* base, int64_t element_offset, int64_t row_stride, int count, int head_dim,
                     at::ScalarType dtype) {
    char* start = static_cast<char*>(const_cast<void*>(base)) + element_offset * int64_t(c10::elementSize(dtype));
    return at::from_blob(start, {count, head_dim}, {row_stride, 1}, at::TensorOptions().dtype(dtype));
}

int64_t pool_offset(const KVPool& pool, int64_t page, int64_t token_in_page, int head) {
    return page * pool.page_stride + token_in_page * pool.token_stride + int64_t(head) * pool.head_stride;
}

// ---- decode -------------------------------------------------------------------------------------

struct DecodeTask {
    int batch;
    int kv_head;
    int split;
};

// fp32 buffers of one worker, reused across its tasks. Row r of q/acc is query head
// kv_head * group + r / Sq at query row r % Sq.
struct DecodeWorkspace {
    at::Tensor q;       // [rows, D], pre-multiplied by the score multiplier
    at::Tensor k;       // [kKeyChunk, D]
    at::Tensor v;       // [kKeyChunk, D]
    at::Tensor scores;  // [rows * kKeyChunk]; a chunk of n keys is viewed densely as [rows, n]
    at::Tensor acc;     // [rows, D]
    OnlineSoftmax<float> softmax;

    DecodeWorkspace(int rows, int head_dim)
        : q(at::empty({rows, head_dim}, at::kFloat)),
          k(at::empty({kKeyChunk, head_dim}, at::kFloat)),
          v(at::empty({kKeyChunk, head_dim}, at::kFloat)),
          scores(at::empty({int64_t(rows) * kKeyChunk}, at::kFloat)),
          acc(at::empty({rows, head_dim}, at::kFloat)),
          softmax(rows) {}
};

// q is multiplied once per task so that q·k comes out scaled: by the softmax scale, or, with a
// softcap, by scale / softcap so that tanh and one multiply finish the capped score.
float score_multiplier(const DecodeParams& p) { return p.softcap > 0.f ? p.softmax_scale / p.softcap : p.softmax_scale; }

// Keys [t0, t0 + cols) of plan entry n: scored, soft-capped and masked as the kernel masks them (the
// window aligned bottom-right, the entry's query-head bits, a streaming head's sink + local rule).
void score_chunk(at::Tensor& scores, const DecodeParams& p, const detail::DecodePlan& plan, int n, int t0,
                 const DecodeWorkspace& ws) {
    const int cols = int(scores.size(1));
    at::cpu::mm_out(scores, ws.q, ws.k.narrow(0, 0, cols).t());
    if (p.softcap > 0.f) scores.tanh_().mul_(p.softcap);
    const uint32_t heads = plan.heads(n);
    float* const s = scores.data_ptr<float>();
    const int group = p.heads_q / p.heads_kv;
    for (int j = 0; j < group; ++j) {
        const bool head_attends = (heads >> j) & 1u;
        for (int i = 0; i < p.seqlen_q; ++i) {
            const detail::Range window = detail::visible_keys(i, p.seqlen_q, plan.len, p.window_left, p.window_right);
            float* row = s + int64_t(j * p.seqlen_q + i) * cols;
            for (int c = 0; c < cols; ++c) {
                const int t = t0 + c;
                bool visible = head_attends && t >= window.lo && t < window.hi;
                if (plan.kind == detail::PlanKind::streaming) visible = visible && p.heads.ring.visible(t, plan.len);
                if (!visible) row[c] = kNegInf;
            }
        }
    }
}

// Tokens [t0, t0 + cols) of page `page` (physical `physical`) of the task's pool, dequantised to
// fp32 into the workspace's k and v.
void load_chunk(const DecodeParams& p, const KVPool& pool, int64_t physical, int page_size, int page, int t0, int cols,
                int pool_head, DecodeWorkspace& ws) {
    const at::ScalarType dtype = scalar_type(p.kv_dtype);
    const int64_t offset = pool_offset(pool, physical, t0 - int64_t(page) * page_size, pool_head);
    at::Tensor k = ws.k.narrow(0, 0, cols);
    at::Tensor v = ws.v.narrow(0, 0, cols);
    k.copy_(rows_view(pool.k, offset, pool.token_stride, cols, p.head_dim, dtype));
    v.copy_(rows_view(pool.v, offset, pool.token_stride, cols, p.head_dim, dtype));
    if (p.kv_dtype == DType::int8) {
        k.mul_(p.k_scale);
        v.mul_(p.v_scale);
    }
}

// Where a task's rows go: out and lse (one split), or the split's fp32 partials. Both are laid out
// [B, Sq, Hq, D] and [B, Hq, Sq].
void write_rows(const DecodeParams& p, const DecodeTask& task, DecodeWorkspace& ws) {
    const int group = p.heads_q / p.heads_kv;
    const int64_t out_rows = int64_t(p.batch) * p.seqlen_q * p.heads_q;
    const int64_t lse_rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
    const bool partial = p.num_splits > 1;
    float* const acc = ws.acc.data_ptr<float>();
    for (int j = 0; j < group; ++j) {
        const int head = task.kv_head * group + j;
        for (int i = 0; i < p.seqlen_q; ++i) {
            const int r = j * p.seqlen_q + i;
            float* acc_row = acc + int64_t(r) * p.head_dim;
            const float lse = ws.softmax.finish_row(r, acc_row, p.head_dim);
            const int64_t lse_index = (int64_t(task.batch) * p.heads_q + head) * p.seqlen_q + i;
            const int64_t out_index = ((int64_t(task.batch) * p.seqlen_q + i) * p.heads_q + head) * p.head_dim;
            if (partial) {
                p.partial_lse[task.split * lse_rows + lse_index] = lse;
                std::copy_n(acc_row, p.head_dim, p.partial_out + task.split * out_rows * p.head_dim + out_index);
            } else {
                p.lse[lse_index] = lse;
                rows_view(p.out, out_index, p.head_dim, 1, p.head_dim, scalar_type(p.dtype))
                    .copy_(ws.acc.narrow(0, r, 1));
            }
        }
    }
}

void run_decode_task(const DecodeParams& p, const DecodeTask& task, DecodeWorkspace& ws) {
    const int group = p.heads_q / p.heads_kv;
    const at::ScalarType dtype = scalar_type(p.dtype);
    for (int j = 0; j < group; ++j) {
        const int64_t offset = task.batch * p.q_batch_stride + int64_t(task.kv_head * group + j) * p.q_head_stride;
        ws.q.narrow(0, int64_t(j) * p.seqlen_q, p.seqlen_q)
            .copy_(rows_view(p.q, offset, p.q_token_stride, p.seqlen_q, p.head_dim, dtype));
    }
    ws.q.mul_(score_multiplier(p));
    ws.acc.zero_();
    ws.softmax.reset(int(ws.q.size(0)));

    const detail::DecodePlan plan =
        detail::decode_plan(p.heads, task.batch, task.kv_head, p.heads_kv, p.seqlens[task.batch], p.table.page_size,
                            p.seqlen_q, p.window_left, p.window_right);
    const bool streaming = plan.kind == detail::PlanKind::streaming;
    const KVPool& pool = streaming ? p.ring : p.cache;
    // Keys any row of the window can see: the plan's pages hold more when the window cuts a page.
    const detail::Range reach{detail::visible_keys(0, p.seqlen_q, plan.len, p.window_left, p.window_right).lo,
                              detail::visible_keys(p.seqlen_q - 1, p.seqlen_q, plan.len, p.window_left,
                                                   p.window_right).hi};
    const detail::Range entries = detail::split_range(plan.size(), p.num_splits, task.split);
    for (int n = entries.lo; n < entries.hi; ++n) {
        const int page = plan.page(n);
        const int first = std::max(page * p.table.page_size, reach.lo);
        const int end = std::min((page + 1) * p.table.page_size, reach.hi);
        if (first >= end) continue;  // a listed page past the sequence's end, or outside the window
        const int64_t physical = detail::plan_physical_page(plan, p.heads, p.table, task.batch, page);
        for (int t0 = first; t0 < end; t0 += kKeyChunk) {
            const int cols = std::min(kKeyChunk, end - t0);
            load_chunk(p, pool, physical, p.table.page_size, page, t0, cols, plan.pool_head, ws);
            at::Tensor scores = ws.scores.narrow(0, 0, ws.q.size(0) * cols).view({ws.q.size(0), cols});
            score_chunk(scores, p, plan, n, t0, ws);
            ws.softmax.step(scores, ws.acc);
            at::cpu::addmm_out(ws.acc, ws.acc, scores, ws.v.narrow(0, 0, cols));
        }
    }
    write_rows(p, task, ws);
}

// Combines the splits' partials of every (sequence, query head, query row) by their lse: out =
// sum_s exp(lse_s - lse) * out_s with lse = log sum_s exp(lse_s). Rows no split saw stay 0 / -inf.
void merge_splits(const DecodeParams& p) {
    const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
    const int64_t out_rows = rows;
    const at::ScalarType dtype = scalar_type(p.dtype);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> merged(p.head_dim);
        for (int64_t lse_index = begin; lse_index < end; ++lse_index) {
            const int64_t i = lse_index % p.seqlen_q;
            const int64_t head = (lse_index / p.seqlen_q) % p.heads_q;
            const int64_t b = lse_index / (int64_t(p.seqlen_q) * p.heads_q);
            const int64_t out_index = ((b * p.seqlen_q + i) * p.heads_q + head) * p.head_dim;
            float max_lse = kNegInf;
            for (int s = 0; s < p.num_splits; ++s) max_lse = std::max(max_lse, p.partial_lse[s * rows + lse_index]);
            std::fill(merged.begin(), merged.end(), 0.f);
            float lse = kNegInf;
            if (max_lse != kNegInf) {
                float sum = 0.f;
                for (int s = 0; s < p.num_splits; ++s) sum += std::exp(p.partial_lse[s * rows + lse_index] - max_lse);
                lse = max_lse + std::log(sum);
                for (int s = 0; s < p.num_splits; ++s) {
                    const float weight = std::exp(p.partial_lse[s * rows + lse_index] - lse);
                    if (weight == 0.f) continue;
                    const float* part = p.partial_out + s * out_rows * p.head_dim + out_index;
                    for (int d = 0; d < p.head_dim; ++d) merged[d] += weight * part[d];
                }
            }
            p.lse[lse_index] = lse;
            rows_view(p.out, out_index, p.head_dim, 1, p.head_dim, dtype)
                .copy_(at::from_blob(merged.data(), {1, p.head_dim}, at::kFloat));
        }
    });
}

// ---- append -------------------------------------------------------------------------------------

template <typename T>
float to_float(T x) {
    return static_cast<float>(x);
}

// Rotates a key row in place (fp32) by row `position` of the rotary tables.
template <typename TableT>
void rotate(float* key, const AppendParams& p, int64_t position) {
    const int pairs = p.rotary_dim / 2;
    const auto* cos = static_cast<const TableT*>(p.rotary_cos) + position * pairs;
    const auto* sin = static_cast<const TableT*>(p.rotary_sin) + position * pairs;
    for (int q = 0; q < pairs; ++q) {
        const detail::PairElems e = detail::rope_pair_elems(q, p.rotary_dim, p.rotary_interleaved);
        float y0, y1;
        detail::rope_rotate(key[e.first], key[e.second], to_float(cos[q]), to_float(sin[q]), y0, y1);
        key[e.first] = y0;
        key[e.second] = y1;
    }
}

// Stores a row of fp32 values into a pool slot: rounded to T, or quantised for an int8 pool.
template <typename T>
void store_row(void* pool_base, int64_t offset, const float* row, int head_dim, DType kv_dtype, float scale) {
    if (kv_dtype == DType::int8) {
        int8_t* dst = static_cast<int8_t*>(pool_base) + offset;
        const float inv_scale = 1.f / scale;
        for (int d = 0; d < head_dim; ++d) dst[d] = detail::quantize_int8(row[d], inv_scale);
    } else {
        T* dst = static_cast<T*>(pool_base) + offset;
        for (int d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(row[d]);
    }
}

// Token t of sequence b's kv head h: rotated (the key), its stats folded in, stored.
template <typename T>
void append_head(const AppendParams& p, int b, int h) {
    const int old_len = p.seqlens[b];
    const int new_len = old_len + p.seqlen_new;
    const int32_t slot = p.heads.kv_head_slot != nullptr ? p.heads.kv_head_slot[h] : h;
    const bool streaming = slot < 0;
    const KVPool& pool = streaming ? p.ring : p.cache;
    const int pool_head = streaming ? -1 - slot : slot;
    const int page_size = streaming ? detail::kLServePage : p.table.page_size;
    const int logical_per_page = page_size / detail::kLogicalPage;
    std::vector<float> key(p.head_dim), value(p.head_dim);
    for (int i = 0; i < p.seqlen_new; ++i) {
        const int t = old_len + i;
        if (streaming && !p.heads.ring.keeps(t, new_len)) continue;
        const T* k_row = static_cast<const T*>(p.k) + b * p.k_batch_stride + i * p.k_token_stride + h * p.k_head_stride;
        const T* v_row = static_cast<const T*>(p.v) + b * p.v_batch_stride + i * p.v_token_stride + h * p.v_head_stride;
        for (int d = 0; d < p.head_dim; ++d) {
            key[d] = to_float(k_row[d]);
            value[d] = to_float(v_row[d]);
        }
        if (p.rotary_cos != nullptr) {
            if (p.rotary_dtype == DType::fp32) {
                rotate<float>(key.data(), p, t);
            } else {
                rotate<T>(key.data(), p, t);
            }
            // The key is the rotated row in k's dtype, as a cache of that dtype would hold it: the
            // stats of a bf16/fp16 pool then equal a recomputation over the stored keys.
            for (int d = 0; d < p.head_dim; ++d) key[d] = to_float(static_cast<T>(key[d]));
        }
        const int page = t / page_size;
        const int64_t physical =
            streaming ? p.heads.ring_table[int64_t(b) * p.heads.ring.pages() + p.heads.ring.slot(page)]
                      : detail::physical_page(p.table, b, page);
        const int in_page = t - page * page_size;
        const int64_t offset = pool_offset(pool, physical, in_page, pool_head);
        store_row<T>(pool.k, offset, key.data(), p.head_dim, p.kv_dtype, p.k_scale);
        store_row<T>(pool.v, offset, value.data(), p.head_dim, p.kv_dtype, p.v_scale);
        if (streaming || p.k_min == nullptr) continue;
        // A logical page's first token resets its stats; later tokens combine with them.
        const int64_t stats = ((physical * logical_per_page + in_page / detail::kLogicalPage) * pool.heads + pool_head) *
                              p.head_dim;
        float* const k_min = p.k_min + stats;
        float* const k_max = p.k_max + stats;
        const bool reset = t % detail::kLogicalPage == 0;
        for (int d = 0; d < p.head_dim; ++d) {
            k_min[d] = reset ? key[d] : std::min(k_min[d], key[d]);
            k_max[d] = reset ? key[d] : std::max(k_max[d], key[d]);
        }
    }
}

}  // namespace

void decode_attention(const DecodeParams& p) {
    const int group = p.heads_q / p.heads_kv;
    const int64_t tasks = int64_t(p.batch) * p.heads_kv * p.num_splits;
    // Grain 1: a task is a whole pass over a split of a sequence's pages.
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        DecodeWorkspace ws(group * p.seqlen_q, p.head_dim);
        for (int64_t index = begin; index < end; ++index) {
            const DecodeTask task{int(index / (int64_t(p.heads_kv) * p.num_splits)),
                                  int(index / p.num_splits % p.heads_kv), int(index % p.num_splits)};
            run_decode_task(p, task, ws);
        }
    });
    if (p.num_splits > 1) merge_splits(p);
}

void kv_append(const AppendParams& p) {
    if (p.seqlen_new == 0) return;
    at::parallel_for(0, int64_t(p.batch) * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
        for (int64_t index = begin; index < end; ++index) {
            const int b = int(index / p.heads_kv);
            const int h = int(index % p.heads_kv);
            if (p.dtype == DType::bf16) {
                append_head<c10::BFloat16>(p, b, h);
            } else {
                append_head<c10::Half>(p, b, h);
            }
        }
    });
}

}  // namespace tkpy::cpu
