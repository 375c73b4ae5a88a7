// Shared index math of dense attention: which keys a query sees (causal, sliding window, lengths),
// which key blocks a query tile needs, and where a sequence lives. The CPU path and the CUDA
// kernel both call these, so the CPU tests exercise the code the GPU runs.
#pragma once

#include <cstdint>

#include "tkpy/detail/hd.h"

namespace tkpy::detail {

// Half-open range [lo, hi); empty when hi <= lo.
struct Range {
    int lo;
    int hi;
    // Bitwise, not short-circuit: no branch (as KeyRanges::contains).
    TKPY_HD bool contains(int i) const { return (i >= lo) & (i < hi); }
};

// Keys visible to query i of a (sq, sk) pair, aligned bottom-right: i sees j iff
// i + sk - sq - left <= j <= i + sk - sq + right, with -1 meaning unbounded on that side, and
// 0 <= j < sk. Causal is right = 0.
TKPY_HD Range visible_keys(int i, int sq, int sk, int window_left, int window_right) {
    const int diag = i + sk - sq;
    int lo = window_left >= 0 ? diag - window_left : 0;
    int hi = window_right >= 0 ? diag + window_right + 1 : sk;
    lo = lo < 0 ? 0 : lo;
    hi = hi > sk ? sk : hi;
    return Range{lo, hi};
}

TKPY_HD bool key_visible(int i, int j, int sq, int sk, int window_left, int window_right) {
    const Range r = visible_keys(i, sq, sk, window_left, window_right);
    return j >= r.lo && j < r.hi;
}

// The first query that sees any key: rows above it (a right window edge left of key 0) see none.
// Every row from it on sees at least one (its window contains its diagonal, clipped into [0, sk)).
TKPY_HD int first_row_with_keys(int sq, int sk, int window_right) {
    const int64_t first = window_right >= 0 ? int64_t(sq) - sk - window_right : 0;
    return first < 0 ? 0 : (first > sq ? sq : int(first));
}

// Key blocks of `block` keys that queries [q0, q1) (clipped to sq) need, as a block-index range:
// exactly the blocks holding a key some row sees. Visible ranges only move right as i grows and
// consecutive rows' ranges touch, so the union over the rows that see keys is [lo(a), hi(q1 - 1)).
TKPY_HD Range key_blocks(int q0, int q1, int sq, int sk, int window_left, int window_right, int block) {
    q1 = q1 < sq ? q1 : sq;
    const int first = first_row_with_keys(sq, sk, window_right);
    q0 = q0 > first ? q0 : first;
    if (q1 <= q0 || sk <= 0) return Range{0, 0};
    const int lo = visible_keys(q0, sq, sk, window_left, window_right).lo;
    const int hi = visible_keys(q1 - 1, sq, sk, window_left, window_right).hi;
    if (hi <= lo) return Range{0, 0};
    return Range{lo / block, (hi + block - 1) / block};
}

// True when every (query, key) pair of the tile [q0, q0 + rows) x [k0, k0 + cols) is visible and
// in range, so the kernel can skip per-element masking for it.
TKPY_HD bool block_fully_visible(int q0, int rows, int k0, int cols, int sq, int sk, int window_left, int window_right) {
    if (q0 + rows > sq || k0 + cols > sk) return false;
    const Range first = visible_keys(q0, sq, sk, window_left, window_right);
    const Range last = visible_keys(q0 + rows - 1, sq, sk, window_left, window_right);
    // lo and hi are non-decreasing in i: the tightest bounds are last.lo and first.hi.
    return last.lo <= k0 && k0 + cols <= first.hi;
}

// Sequence b: its first token's index along the token dimension and its length. Varlen: from
// cu_seqlens, in the packed tensor of `total` tokens. Batched: token 0 of batch b (batches are
// addressed through the batch stride), length fixed_len. Element (b, s) is at
// b * batch_stride + (start + s) * token_stride.
struct Sequence {
    int64_t start;
    int len;
};

// cu_seqlens' values are not read on the host by default on CUDA (a sync per call), so a varlen
// sequence is clamped into [0, total) and to fixed_len (max_seqlen) tokens: bad values give wrong
// rows, never an access outside the packed tensors or past the tiles the launch covers.
TKPY_HD Sequence sequence(const int32_t* cu_seqlens, int b, int fixed_len, int64_t total) {
    if (cu_seqlens == nullptr) return Sequence{0, fixed_len};
    const int64_t start = cu_seqlens[b] < 0 ? 0 : (cu_seqlens[b] > total ? total : cu_seqlens[b]);
    const int64_t end = cu_seqlens[b + 1] < start ? start : (cu_seqlens[b + 1] > total ? total : cu_seqlens[b + 1]);
    return Sequence{start, int(end - start < fixed_len ? end - start : fixed_len)};
}

// The order a persistent attention kernel takes its tasks (batch, query head, query tile) in.
// Query heads are grouped into sections of `section_heads` (batch, head) pairs, heads varying
// fastest so a kv head's query heads sit next to each other; a section covers whole kv heads
// whose K and V fit in L2 together (attention_section_heads). Inside a section the query tiles
// go heaviest first (the last ones, under bottom-right causal masks), and for each tile every
// head of the section. The CTAs running at one time therefore read the K/V of a few kv heads,
// which stay hot in L2, and the long causal tiles start first.
struct TaskCoord {
    int batch;
    int head;
    int q_tile;
};

TKPY_HD TaskCoord attention_task(int index, int q_tiles, int heads_q, int batch, int section_heads) {
    const int pairs = heads_q * batch;
    const int per_section = section_heads * q_tiles;
    const int section = index / per_section;
    const int pair0 = section * section_heads;
    const int width = pairs - pair0 < section_heads ? pairs - pair0 : section_heads;  // the last may be narrower
    const int rank = index - section * per_section;
    const int pair = pair0 + rank % width;
    return TaskCoord{pair / heads_q, pair % heads_q, q_tiles - 1 - rank / width};
}

// (batch, head) pairs per section of attention_task: as many whole kv heads (with all their query
// heads) as fit in half of L2 with both their K and V of seqlen_k x head_dim, at least one.
TKPY_HD int attention_section_heads(int heads_q, int heads_kv, int batch, int seqlen_k, int head_dim,
                                    int elem_bytes, int64_t l2_bytes) {
    const int group = heads_q / heads_kv;
    const int64_t kv_head_bytes = 2 * int64_t(seqlen_k) * head_dim * elem_bytes;
    int64_t kv_heads = kv_head_bytes > 0 ? (l2_bytes / 2) / kv_head_bytes : int64_t(heads_kv) * batch;
    kv_heads = kv_heads < 1 ? 1 : kv_heads;
    const int64_t pairs = int64_t(heads_q) * batch;
    const int64_t heads = kv_heads * group;
    return int(heads < pairs ? heads : pairs);
}

}  // namespace tkpy::detail
