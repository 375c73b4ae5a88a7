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

// Key blocks of `block` keys that queries [q0, q1) (clipped to sq) need, as a block-index range.
// Visible ranges only move right as i grows, so the union is [lo(q0), hi(q1 - 1)).
TKPY_HD Range key_blocks(int q0, int q1, int sq, int sk, int window_left, int window_right, int block) {
    q1 = q1 < sq ? q1 : sq;
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

}  // namespace tkpy::detail
