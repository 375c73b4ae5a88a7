// Shared index math of the attention backward, which runs key-block-stationary: a task owns a block
// of keys (its dK and dV) and walks the query blocks that see it, for each query head of its kv
// head. The walk is the forward's plans read the other way round: a (query block m, key block n)
// pair is visited exactly when the forward's plan of m's rows contains n, so that the backward
// visits what the forward summed. The CPU path and the CUDA kernel both walk it, and the
// deterministic kernel orders its dQ additions by `rank` (the pair's place among m's key blocks).
#pragma once

#include <cstdint>

#include "tkpy/detail/attention_index.h"
#include "tkpy/detail/block_sparse_index.h"
#include "tkpy/detail/hd.h"

namespace tkpy::detail {

// Query rows per block of the backward's walk: the kernel's stage (the N of its Sᵀ = K Qᵀ, so that
// Sᵀ and dPᵀ are 16 registers each beside dK and dV).
inline constexpr int kBwdQueryBlock = 32;

// The queries that see key j (dense attention), the transpose of visible_keys: i sees j iff
// j + sq - sk - right <= i <= j + sq - sk + left, with 0 <= i < sq; -1 is unbounded. A key
// outside [0, sk) is seen by none.
TKPY_HD Range visible_queries(int j, int sq, int sk, int window_left, int window_right) {
    if (j < 0 || j >= sk) return Range{0, 0};
    const int64_t anti = int64_t(j) + sq - sk;  // the query whose diagonal is j
    int64_t lo = window_right >= 0 ? anti - window_right : 0;
    int64_t hi = window_left >= 0 ? anti + window_left + 1 : sq;
    lo = lo < 0 ? 0 : lo;
    hi = hi > sq ? sq : hi;
    return Range{int(lo < hi ? lo : hi), int(hi)};
}

// The first key that any query sees: keys left of every window (left edge past them) are unseen.
TKPY_HD int first_key_seen(int sq, int sk, int window_left) {
    const int64_t first = window_left >= 0 ? int64_t(sk) - sq - window_left : 0;
    return first < 0 ? 0 : (first > sk ? sk : int(first));
}

// Query blocks of `block` rows that see any key of [k0, k1) (clipped to sk): the transpose of
// key_blocks, exact in the same way (consecutive keys' query ranges touch).
TKPY_HD Range query_blocks(int k0, int k1, int sq, int sk, int window_left, int window_right, int block) {
    k1 = k1 < sk ? k1 : sk;
    const int first = first_key_seen(sq, sk, window_left);
    k0 = k0 > first ? k0 : first;
    if (k1 <= k0 || sq <= 0) return Range{0, 0};
    const int lo = visible_queries(k0, sq, sk, window_left, window_right).lo;
    const int hi = visible_queries(k1 - 1, sq, sk, window_left, window_right).hi;
    if (hi <= lo) return Range{0, 0};
    return Range{lo / block, (hi + block - 1) / block};
}

// Which queries see a key, as the backward masks each key: visible_queries with the window
// (left, right), where keys past `sink` take `left_past_sink` instead of `left`, and are seen by
// none when `none_past_sink`. Dense attention's window is one; so is each sparse head type's token
// rule (causal: right = 0; exact streaming: the sink sees every later query, a key past it the
// `local` queries from its diagonal on).
struct KeyRule {
    int left;
    int right;
    int sink;
    int left_past_sink;
    bool none_past_sink;

    TKPY_HD Range queries(int j, int sq, int sk) const {
        if (j >= sink && none_past_sink) return Range{0, 0};
        return visible_queries(j, sq, sk, j < sink ? left : left_past_sink, right);
    }

    // True when every query of [q0, q0 + rows) sees every key of [k0, k0 + keys): a kernel can skip
    // the mask. Query ranges only move right as j grows, so the first key's hi and the last key's
    // lo bound them, unless the tile straddles the sink (then it is taken as not fully visible).
    TKPY_HD bool tile_fully_visible(int q0, int rows, int k0, int keys, int sq, int sk) const {
        const int last = k0 + keys - 1;
        if (q0 + rows > sq || last >= sk || (k0 < sink && last >= sink)) return false;
        return queries(last, sq, sk).lo <= q0 && queries(k0, sq, sk).hi >= q0 + rows;
    }
};

TKPY_HD KeyRule dense_key_rule(int window_left, int window_right) {
    return KeyRule{window_left, window_right, 0, window_left, false};
}

// A sparse head's token rule (sparse_visible_keys, transposed).
TKPY_HD KeyRule sparse_key_rule(int32_t type, int sink, int local, const SparseHeads& h) {
    const int right = h.causal ? 0 : -1;
    if (type != kStreamingHead || !h.exact_streaming) return KeyRule{-1, right, 0, -1, false};
    return KeyRule{-1, right, sink, local > 0 ? local - 1 : 0, local <= 0};
}

// The first of list[0, count) (ascending) that is >= value, or count.
TKPY_HD int lower_bound(const int32_t* list, int count, int value) {
    int lo = 0, hi = count;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (list[mid] < value) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// Where a range plan (dense and streaming heads: no list) visits key block `blk`: its position
// among the plan's visited blocks, or -1.
TKPY_HD int plan_rank(const KeyBlockPlan& plan, int blk) {
    const int in_first = plan.first.hi - plan.first.lo;
    if (blk >= plan.first.lo && blk < plan.first.hi) return blk - plan.first.lo;
    if (blk >= plan.second.lo && blk < plan.second.hi) return in_first + (blk - plan.second.lo);
    return -1;
}

// plan_rank(sparse_plan(heads, b, h, qb, sq, sk), blk), without walking a block-sparse list (the
// walk is as long as the list, and the backward asks for every query block): a binary search in
// its first block_counts entries, which must be ascending. The bindings check that where they read
// the lists; the CUDA backward, which does not, first cuts each count to its list's ascending
// prefix (ascending_prefix, as the forward's walk does), so that both visit the same blocks and the
// ranks have no gaps.
TKPY_HD int sparse_plan_rank(const SparseHeads& heads, int b, int h, int qb, int sq, int sk, int blk) {
    if (heads.head_mask_type[h] != kBlockSparseHead) return plan_rank(sparse_plan(heads, b, h, qb, sq, sk), blk);
    const Range reach = reachable_blocks(qb, sq, sk, heads.causal);
    int limit;
    const int32_t* blocks = block_list(heads, b, h, qb, &limit);
    if (blocks == nullptr || blk < reach.lo || blk >= reach.hi) return -1;
    const int at = lower_bound(blocks, limit, blk);
    if (at == limit || blocks[at] != blk) return -1;
    return at - lower_bound(blocks, limit, reach.lo);  // entries below the reach are not visited
}

// The backward's walk for one task: key block n (of `key_rows` keys) of sequence b, query head h.
// Query blocks are kBwdQueryBlock rows; sparse heads' plans are per 128-row block and 128-key
// block, which the kernel's key blocks divide. visit_rank(m) is the pair's rank among the key
// blocks query block m visits (-1: not visited); [candidates) holds every visited m.
struct BwdWalk {
    int n;
    int key_rows;
    int sq;
    int sk;
    bool sparse;
    // Dense attention.
    int window_left;
    int window_right;
    // Sparse heads.
    const SparseHeads* heads;
    int batch;
    int head;
    Range candidates;

    TKPY_HD int visit_rank(int m) const { return sparse ? sparse_visit_rank(m) : dense_visit_rank(m); }

    // The two halves of visit_rank, for a kernel that knows which it runs.
    TKPY_HD int dense_visit_rank(int m) const {
        const Range r =
            key_blocks(m * kBwdQueryBlock, (m + 1) * kBwdQueryBlock, sq, sk, window_left, window_right, key_rows);
        return n >= r.lo && n < r.hi ? n - r.lo : -1;
    }
    TKPY_HD int sparse_visit_rank(int m) const {
        constexpr int kQueryBlocksPerPlan = kSparseBlock / kBwdQueryBlock;
        const int sub = kSparseBlock / key_rows;  // key blocks per 128-key plan block
        const int rank = sparse_plan_rank(*heads, batch, head, m / kQueryBlocksPerPlan, sq, sk, n / sub);
        return rank < 0 ? -1 : rank * sub + n % sub;
    }
};

TKPY_HD BwdWalk bwd_walk(int n, int key_rows, int sq, int sk, int window_left, int window_right,
                         const SparseHeads& heads, int batch, int head) {
    BwdWalk w{n, key_rows, sq, sk, heads.head_mask_type != nullptr, window_left, window_right, &heads, batch, head,
              Range{0, 0}};
    const int k0 = n * key_rows;
    if (!w.sparse) {
        w.candidates = query_blocks(k0, k0 + key_rows, sq, sk, window_left, window_right, kBwdQueryBlock);
    } else if (k0 < sk && sq > 0) {
        // Plans only visit blocks their rows can reach; causal rows reach a 128-key block from its
        // first key's diagonal on. Plans are per 128-row block: each query block in it visits its list.
        const int lo = heads.causal ? visible_queries(k0 / kSparseBlock * kSparseBlock, sq, sk, -1, 0).lo : 0;
        w.candidates = Range{lo / kSparseBlock * (kSparseBlock / kBwdQueryBlock),
                             (sq + kBwdQueryBlock - 1) / kBwdQueryBlock};
    }
    return w;
}

}  // namespace tkpy::detail
