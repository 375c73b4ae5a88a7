// Shared index math of decode over a paged KV cache (flash-attn's layout) and of LServe's decode:
// page-table translation, the streaming heads' ring of pages, which pages a (sequence, kv head)
// visits, split-KV partitioning, page-stats granularity and INT8 quantisation. The CUDA kernels and
// the CPU path both call these, so the CPU tests exercise the exact pages and slots the GPU uses.
#pragma once

#include <cstdint>

#include "tkpy/detail/attention_index.h"
#include "tkpy/detail/hd.h"

namespace tkpy::detail {

// LServe's physical page and the logical page its min/max key statistics cover.
inline constexpr int kLServePage = 64;
inline constexpr int kLogicalPage = 16;
inline constexpr int kLogicalPerPage = kLServePage / kLogicalPage;
// Split-KV: the most splits one (sequence, kv head) is cut into (the merge keeps them in registers).
inline constexpr int kMaxSplits = 64;

TKPY_HD int ceil_div_int(int a, int b) { return (a + b - 1) / b; }

// ---- paged pools --------------------------------------------------------------------------------

// A K/V pool as the index math sees it. Paged: [num_pages, page_size, H, D] with a page table row
// per sequence. A contiguous cache [B_cache, S_cache, H, D] is the same thing without a table: cache
// row r (r = b, or batch_idx[b] as flash-attn's cache_batch_idx) is max_pages consecutive pages of
// S_cache / max_pages tokens, so split-KV can cut a long row like a paged sequence.
struct PageTable {
    const int32_t* table;  // [B, >= max_pages] with row stride table_stride; null for a contiguous cache
    int64_t table_stride;
    int page_size;
    const int32_t* batch_idx;  // contiguous cache only: the cache row of sequence b; null is b
    int max_pages = 1;         // pages a sequence can have: the table's columns, or a row's pages
};

// Whether page n of a sequence exists (a kernel checks before following the table).
TKPY_HD bool page_in_table(const PageTable& t, int n) { return n >= 0 && n < t.max_pages; }

// Physical page holding page n (n = token / page_size) of sequence b.
TKPY_HD int64_t physical_page(const PageTable& t, int b, int n) {
    if (t.table != nullptr) return t.table[int64_t(b) * t.table_stride + n];
    const int64_t row = t.batch_idx != nullptr ? t.batch_idx[b] : b;
    return row * t.max_pages + n;
}

// ---- streaming heads' ring ----------------------------------------------------------------------

// Streaming heads keep sink tokens and the newest local tokens in a constant-size ring per
// sequence: sink / 64 pages for the sink, local / 64 + 1 pages for the window (one more than the
// window needs, since a window of `local` tokens that does not start on a page boundary spans
// local / 64 + 1 pages). sink and local are multiples of kLServePage.
struct Ring {
    int sink;   // tokens
    int local;  // tokens

    TKPY_HD int sink_pages() const { return sink / kLServePage; }
    TKPY_HD int local_pages() const { return local / kLServePage + 1; }
    TKPY_HD int pages() const { return sink_pages() + local_pages(); }

    // Slot of logical page n: sink pages stay put, window pages rotate through the rest.
    TKPY_HD int slot(int n) const {
        const int s = sink_pages();
        return n < s ? n : s + (n - s) % local_pages();
    }

    // True when token t still has its slot once the sequence holds `len` tokens: in a sink page or in
    // one of the newest local_pages() pages. A writer skips tokens this rejects, so a long prefill
    // written in parallel leaves each slot to exactly one page.
    TKPY_HD bool keeps(int t, int len) const {
        const int n = t / kLServePage;
        return n < sink_pages() || n > (len - 1) / kLServePage - local_pages();
    }

    // Decode: the query at position len - 1 sees [0, sink) and its last `local` tokens, itself included.
    TKPY_HD bool visible(int t, int len) const { return t >= 0 && t < len && (t < sink || t >= len - local); }
};

// ---- what one (sequence, kv head) visits ----------------------------------------------------------

// Per-kv-head roles of LServe decode. kv_head_slot == null: every kv head is dense over the main
// pool. Otherwise kv_head_slot[h] >= 0 is head h's index in the main (retrieval) pool and
// kv_head_slot[h] < 0 is a streaming head at index -1 - kv_head_slot[h] of the ring pool.
struct DecodeHeads {
    const int32_t* kv_head_slot;  // [Hkv] or null
    const int32_t* ring_table;    // [B, ring.pages()]: physical ring page of each slot
    Ring ring;
    // Retrieval heads' selected pages (null: every page). Row (b, h) of [B, Hkv, max_selected] holds
    // page_counts[b, h] ascending page numbers; bit j of head_bits says whether query head
    // h * group + j selected that page. The sequence's newest page is always visited, by every head.
    const int32_t* page_indices;
    const int32_t* page_counts;  // [B, Hkv]
    const int32_t* head_bits;    // [B, Hkv, max_selected]
    int max_selected;
};

enum class PlanKind { dense, selected, streaming };

// The pages that sequence b's kv head visits, in order: `size()` entries, entry n being page
// `page(n)` of the sequence. A page's tokens are then masked per query head by `heads(n)` (a bit per
// query head of the group) and, for streaming heads, by Ring::visible.
struct DecodePlan {
    PlanKind kind;
    int len;        // keys of the sequence
    int n_pages;    // pages that hold them
    int pool_head;  // head index inside its pool
    Range first;    // dense: [0, n_pages); streaming: the sink pages and the window's pages
    Range second;
    const int32_t* list;  // selected: pages other than the newest, then the newest
    const int32_t* bits;
    int listed;

    TKPY_HD int size() const {
        if (kind == PlanKind::selected) return listed + (n_pages > 0 ? 1 : 0);
        return (first.hi - first.lo) + (second.hi - second.lo);
    }

    TKPY_HD int page(int n) const {
        if (kind == PlanKind::selected) return n < listed ? list[n] : n_pages - 1;
        const int in_first = first.hi - first.lo;
        return n < in_first ? first.lo + n : second.lo + (n - in_first);
    }

    // Query heads of the group that attend entry n: bit j for query head pool_group_first + j. A
    // listed copy of the newest page (possible only in a list that is not ascending, which the
    // CPU path refuses and CUDA cannot check) attends nobody: that page is the last entry's.
    TKPY_HD uint32_t heads(int n) const {
        if (kind == PlanKind::selected && n < listed) return list[n] == n_pages - 1 ? 0u : uint32_t(bits[n]);
        return 0xffffffffu;
    }
};

// Dense plans skip the pages that no query row of the window can see (sq query rows, aligned
// bottom-right as in attention_index.h); the LServe kinds are for one query row.
TKPY_HD DecodePlan decode_plan(const DecodeHeads& heads, int b, int h, int heads_kv, int len, int page_size, int sq,
                               int window_left, int window_right) {
    DecodePlan plan{};
    plan.len = len > 0 ? len : 0;
    plan.n_pages = ceil_div_int(plan.len, page_size);
    plan.pool_head = h;
    plan.kind = PlanKind::dense;
    plan.first = key_blocks(0, sq, sq, plan.len, window_left, window_right, page_size);
    plan.second = Range{0, 0};
    if (heads.kv_head_slot == nullptr) return plan;
    const int32_t slot = heads.kv_head_slot[h];
    if (slot < 0) {
        // Streaming: pages of [0, sink) and of [len - local, len), each visited once.
        plan.kind = PlanKind::streaming;
        plan.pool_head = -1 - slot;
        const int sink_end = heads.ring.sink < plan.len ? heads.ring.sink : plan.len;
        const int window_lo = plan.len - heads.ring.local > 0 ? plan.len - heads.ring.local : 0;
        plan.first = Range{0, ceil_div_int(sink_end, page_size)};
        plan.second = Range{window_lo / page_size, plan.n_pages};
        if (plan.second.lo < plan.first.hi) plan.second.lo = plan.first.hi;
        if (plan.second.hi <= plan.second.lo) plan.second = Range{0, 0};
        return plan;
    }
    plan.pool_head = slot;
    if (heads.page_indices == nullptr) return plan;
    // Selected: the listed pages other than the current newest (a reused selection may list an
    // older newest page, or this one), then the newest page.
    plan.kind = PlanKind::selected;
    const int64_t row = int64_t(b) * heads_kv + h;
    plan.list = heads.page_indices + row * heads.max_selected;
    plan.bits = heads.head_bits + row * heads.max_selected;
    int listed = heads.page_counts[row];
    listed = listed < 0 ? 0 : (listed > heads.max_selected ? heads.max_selected : listed);  // never read past the row
    while (listed > 0 && plan.list[listed - 1] >= plan.n_pages - 1) --listed;
    plan.listed = listed;
    return plan;
}

// Physical ring page holding page n of sequence b's streaming heads.
TKPY_HD int64_t ring_physical_page(const DecodeHeads& heads, int b, int n) {
    return heads.ring_table[int64_t(b) * heads.ring.pages() + heads.ring.slot(n)];
}

// Physical page of entry `page` of a plan: the main table, or the ring for streaming heads.
TKPY_HD int64_t plan_physical_page(const DecodePlan& plan, const DecodeHeads& heads, const PageTable& main, int b,
                                   int page) {
    if (plan.kind != PlanKind::streaming) return physical_page(main, b, page);
    return ring_physical_page(heads, b, page);
}

// ---- split-KV ---------------------------------------------------------------------------------------

// Entries [lo, hi) of a plan of `n` entries that split s of `splits` takes: contiguous, sizes
// differing by at most one, so every split of a long plan has work.
TKPY_HD Range split_range(int n, int splits, int s) {
    return Range{int(int64_t(n) * s / splits), int(int64_t(n) * (s + 1) / splits)};
}

// num_splits = 0: enough splits that (sequences x kv heads x splits) CTAs fill the SMs about twice,
// but no split shorter than 4 pages, at most kMaxSplits, and 1 when the work already fills the GPU.
TKPY_HD int choose_num_splits(int64_t work_items, int max_plan_pages, int num_sms) {
    if (work_items <= 0 || max_plan_pages <= 0) return 1;
    int64_t splits = (2 * int64_t(num_sms) + work_items - 1) / work_items;
    const int64_t by_length = max_plan_pages / 4 > 1 ? max_plan_pages / 4 : 1;
    if (splits > by_length) splits = by_length;
    if (splits > kMaxSplits) splits = kMaxSplits;
    return splits < 1 ? 1 : int(splits);
}

// ---- page stats and INT8 --------------------------------------------------------------------------

// Logical pages [lo, hi) of a sequence that an append of tokens [old_len, new_len) touches.
TKPY_HD Range touched_logical_pages(int old_len, int new_len) {
    if (new_len <= old_len) return Range{0, 0};
    return Range{old_len / kLogicalPage, ceil_div_int(new_len, kLogicalPage)};
}

// Per-tensor symmetric INT8: round to nearest, clamp to [-127, 127]; x ~= q * scale.
TKPY_HD int8_t quantize_int8(float x, float inv_scale) {
    float r = x * inv_scale;
    r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
    return int8_t(r >= 0.f ? int(r + 0.5f) : -int(-r + 0.5f));
}

}  // namespace tkpy::detail
