// Shared index math of LServe's unified block-sparse prefill (Block-Sparse-Attention semantics):
// which 128-token key blocks a (sequence, head, 128-row query block) visits and which keys inside
// them a query sees, for dense, streaming and block-sparse heads. The CUDA kernel and the CPU path
// both iterate a KeyBlockPlan, so the CPU tests exercise the exact block lists the GPU visits.
#pragma once

#include <cstdint>

#include "tkpy/detail/attention_index.h"
#include "tkpy/detail/hd.h"

namespace tkpy::detail {

inline constexpr int kSparseBlock = 128;

enum HeadType : int32_t { kStreamingHead = -1, kDenseHead = 0, kBlockSparseHead = 1 };

// Per-head configuration, as the bindings validated it. Pointers are host memory for the CPU
// path and device memory for the kernel.
struct SparseHeads {
    const int32_t* head_mask_type;  // [Hq]: 0 dense, -1 streaming, 1 block-sparse
    const int32_t* streaming_info;  // [2 * Hq]: (sink, local) per head
    const int32_t* sparse_index;    // [Hq]: column of base_blockmask for block-sparse heads, else -1
    const int32_t* block_indices;   // [B, n_sparse, QB, KB]: active key blocks of each row block, ascending
    const int32_t* block_counts;    // [B, n_sparse, QB]: how many of those are active
    int n_sparse;
    int mask_q_blocks;  // QB = ceil(max_seqlen_q / 128)
    int mask_k_blocks;  // KB = ceil(max_seqlen_k / 128)
    bool causal;           // every head type: bottom-right causal (the call's is_causal)
    bool exact_streaming;  // streaming_info in tokens (exact mask), not 128-token blocks; needs causal
};

// Written so that no intermediate overflows for any tokens >= 0.
TKPY_HD int ceil_blocks(int tokens) { return tokens / kSparseBlock + (tokens % kSparseBlock != 0); }

TKPY_HD int diagonal(int i, int sq, int sk) { return i + sk - sq; }

// The first key of the exact local window of a query on `diag`: diag - (local - 1), or 0 when that
// is not positive (which also keeps a huge `local` from overflowing).
TKPY_HD int local_window_start(int diag, int local) { return local - 1 >= diag ? 0 : diag - (local - 1); }

// The keys query i (of a sequence with sq queries, sk keys) sees, given its head type: at most two
// ranges. Block selection is the plan's job; this is the token-level part: causality (the call's
// is_causal, for every head type), lengths and, for exact streaming heads, the sink and the local
// window (which includes the query's own position).
struct KeyRanges {
    Range a;
    Range b;

    // Bitwise, not short-circuit: no branch, so a kernel can mask between two wgmma waits.
    TKPY_HD bool contains(int j) const { return ((j >= a.lo) & (j < a.hi)) | ((j >= b.lo) & (j < b.hi)); }
};

TKPY_HD KeyRanges sparse_visible_keys(int i, int sq, int sk, int32_t type, int sink, int local, const SparseHeads& h) {
    const Range all = visible_keys(i, sq, sk, -1, h.causal ? 0 : -1);
    if (type != kStreamingHead || !h.exact_streaming) return KeyRanges{all, Range{0, 0}};
    const Range sink_keys{all.lo, sink < all.hi ? sink : all.hi};
    const int local_lo = local_window_start(diagonal(i, sq, sk), local);
    return KeyRanges{sink_keys, Range{local_lo > all.lo ? local_lo : all.lo, all.hi}};
}

TKPY_HD bool sparse_key_visible(int i, int j, int sq, int sk, int32_t type, int sink, int local, const SparseHeads& h) {
    return sparse_visible_keys(i, sq, sk, type, sink, local, h).contains(j);
}

// The key blocks of one (sequence b, head, query block qb): up to two ranges, or an ascending
// list (block-sparse heads) clipped to `clip`. Iterate n in [0, size()), visiting block(n)
// unless it is -1.
struct KeyBlockPlan {
    Range first;
    Range second;
    const int32_t* list;
    int count;
    Range clip;

    TKPY_HD int size() const { return list ? count : (first.hi - first.lo) + (second.hi - second.lo); }

    TKPY_HD int block(int n) const {
        if (list) {
            const int blk = list[n];
            return blk >= clip.lo && blk < clip.hi ? blk : -1;
        }
        const int in_first = first.hi - first.lo;
        return n < in_first ? first.lo + n : second.lo + (n - in_first);
    }
};

TKPY_HD Range clamp(Range r, Range to) {
    const int lo = r.lo > to.lo ? r.lo : to.lo;
    const int hi = r.hi < to.hi ? r.hi : to.hi;
    return hi > lo ? Range{lo, hi} : Range{0, 0};
}

// Blocks that the token-level rules can reach at all: in range and, if causal, not past the
// diagonal of the block's last query row.
TKPY_HD Range reachable_blocks(int qb, int sq, int sk, bool causal) {
    return key_blocks(qb * kSparseBlock, (qb + 1) * kSparseBlock, sq, sk, -1, causal ? 0 : -1, kSparseBlock);
}

// True when every query of [q0, q0 + rows) sees every key of [k0, k0 + cols), so a kernel can skip
// the per-element mask for that tile.
TKPY_HD bool sparse_tile_fully_visible(int q0, int rows, int k0, int cols, int sq, int sk, int32_t type, int sink,
                                       int local, const SparseHeads& h) {
    if (q0 + rows > sq || k0 + cols > sk) return false;
    const int last_key = k0 + cols - 1;
    if (h.causal && last_key > diagonal(q0, sq, sk)) return false;  // the first row sees the least
    if (type != kStreamingHead || !h.exact_streaming) return true;
    return last_key < sink || k0 >= local_window_start(diagonal(q0 + rows - 1, sq, sk), local);
}

// One past the last key block of block streaming's local window for row block qb
// (Block-Sparse-Attention's fwdStreaming). Causal: m = ceil(max(sk - sq, 0) / 128) + 1 + qb -
// floor(max(sq - sk, 0) / 128), the block after the one holding the diagonal of the row block's
// last row counted as if the block had all 128 rows; m <= 0 where no row of the block sees a key.
// Not causal: m = ceil(sk / 128), the same for every row block.
TKPY_HD int streaming_window_end(int qb, int sq, int sk, bool causal) {
    if (!causal) return ceil_blocks(sk);
    const int behind = sk > sq ? ceil_blocks(sk - sq) : 0;
    const int ahead = sq > sk ? (sq - sk) / kSparseBlock : 0;
    return behind + 1 + qb - ahead;
}

// Block streaming: row block qb sees [0, sink) u [m - local, m) with m = streaming_window_end.
// Exact streaming (causal): the blocks holding keys [0, sink) and [diag(q0) - (local - 1),
// diag(q1 - 1)]. Both are clamped to the blocks the token-level rules can reach.
TKPY_HD KeyBlockPlan streaming_plan(int qb, int sq, int sk, int sink, int local, bool causal, bool exact) {
    const Range reach = reachable_blocks(qb, sq, sk, causal);
    Range first, second;
    if (exact) {
        const int q0 = qb * kSparseBlock;
        const int q1 = (q0 + kSparseBlock < sq ? q0 + kSparseBlock : sq) - 1;
        first = Range{0, ceil_blocks(sink)};
        const int local_lo = local_window_start(diagonal(q0, sq, sk), local);
        second = Range{local_lo / kSparseBlock, diagonal(q1, sq, sk) / kSparseBlock + 1};
    } else {
        const int m = streaming_window_end(qb, sq, sk, causal);
        first = Range{0, sink};
        second = Range{local >= m ? 0 : m - local, m};
    }
    first = clamp(first, reach);
    second = clamp(second, reach);
    if (second.lo < first.hi) second.lo = first.hi;  // overlapping ranges: visit each block once
    if (second.hi <= second.lo) second = Range{0, 0};
    return KeyBlockPlan{first, second, nullptr, 0, reach};
}

// How many of a list's first `limit` entries a plan walks: up to where the list stops ascending
// (a block listed twice must not be counted twice; unchecked values, CUDA's default policy).
TKPY_HD int ascending_prefix(const int32_t* blocks, int limit) {
    int count = limit > 0 ? 1 : 0;
    while (count < limit && blocks[count] > blocks[count - 1]) ++count;
    return count;
}

// A block-sparse head's list for (sequence b, query block qb) and, in *limit, its block_counts
// entry clamped into the list; nullptr when the head has no list there. Unchecked values (CUDA's
// default policy): a head without a list of its own, or a count past the list's length, must not
// send a walk outside the lists.
TKPY_HD const int32_t* block_list(const SparseHeads& heads, int b, int h, int qb, int* limit) {
    const int32_t list = heads.sparse_index[h];
    *limit = 0;
    if (heads.block_indices == nullptr || list < 0 || list >= heads.n_sparse || qb >= heads.mask_q_blocks) {
        return nullptr;
    }
    const int64_t row = (int64_t(b) * heads.n_sparse + list) * heads.mask_q_blocks + qb;
    const int32_t listed = heads.block_counts[row];
    *limit = listed < 0 ? 0 : (listed > heads.mask_k_blocks ? heads.mask_k_blocks : listed);
    return heads.block_indices + row * heads.mask_k_blocks;
}

// The plan of sequence b, head h, query block qb.
TKPY_HD KeyBlockPlan sparse_plan(const SparseHeads& heads, int b, int h, int qb, int sq, int sk) {
    const int32_t type = heads.head_mask_type[h];
    if (type == kStreamingHead) {
        return streaming_plan(qb, sq, sk, heads.streaming_info[2 * h], heads.streaming_info[2 * h + 1],
                              heads.causal, heads.exact_streaming);
    }
    const Range reach = reachable_blocks(qb, sq, sk, heads.causal);
    if (type == kBlockSparseHead) {
        int limit;
        const int32_t* blocks = block_list(heads, b, h, qb, &limit);
        if (blocks == nullptr) return KeyBlockPlan{Range{0, 0}, Range{0, 0}, nullptr, 0, reach};
        return KeyBlockPlan{Range{0, 0}, Range{0, 0}, blocks, ascending_prefix(blocks, limit), reach};
    }
    return KeyBlockPlan{reach, Range{0, 0}, nullptr, 0, reach};
}

}  // namespace tkpy::detail
