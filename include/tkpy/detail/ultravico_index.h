// Shared index math of UltraViCo's attention-logit decay (arXiv 2511.20123) for video tokens laid
// out frame-major (token = t·HW + h·W + w), video first and text after it in each sequence:
//   - a video pair farther apart than half the training window (2|i − j| > T_train·HW) whose
//     logit s is above the row's centre c_i = q_i·k̄ becomes c_i + α(s − c_i);
//   - inside a harmonic band, |i − j| in [m·P − G, m·P + G] (m = 1..M; P = N_k·HW and G = γ·HW,
//     both ends included), β replaces α;
//   - with the first-frame mask, queries of latent frame 0 do not see the video keys of frames
//     T_train and later;
//   - text queries and keys are never decayed.
// The decay is a factor f in [0, 1] per (query, key) pair, applied as s' = min(s, f·s + (1 − f)·c_i),
// which is c_i + f(s − c_i) above c_i and s below it, and s itself for f = 1. The CPU path and the
// CUDA kernels both call these functions, so the CPU tests exercise the GPU's rules, its tile
// classification and the pipelined kernel's window test.
#pragma once

#include <cstdint>

#include "tkpy/detail/attention_index.h"
#include "tkpy/detail/block_sparse_index.h"
#include "tkpy/detail/hd.h"

namespace tkpy::detail {

// One call's decay, in tokens, as the bindings validated it (every product fits in int32).
struct Decay {
    bool enabled;
    const float* key_mean;  // fp32 [batch, heads_kv, head_dim]: k̄ of each sequence and kv head
    int frame_tokens;       // HW
    int window_edge;        // the first distance decayed: 2|i − j| > T_train·HW ⟺ |i − j| >= T_train·HW / 2 + 1
    int first_frame_keys;   // first-frame mask: frame-0 queries see video keys < this (T_train·HW); -1: off
    int band_period;        // P = N_k·HW tokens (bands off when band_count is 0)
    int band_half_width;    // G = γ·HW tokens
    int band_count;         // M
    int text_tokens;        // the last text_tokens tokens of each sequence are text
    float alpha;
    float beta;
};

// Video tokens of a sequence of `len` tokens: all but its trailing text.
TKPY_HD int video_tokens(int len, const Decay& d) { return len > d.text_tokens ? len - d.text_tokens : 0; }

// The factor of a video pair `dist` tokens apart: β in a band, else α beyond the window, else 1.
TKPY_HD float decay_at(int dist, const Decay& d) {
    if (d.band_count > 0) {
        // The smallest m >= 1 with m·P >= dist − G; dist is in a band iff m <= M and m·P <= dist + G.
        // (int32 division: a kernel's int64 one is a subroutine call.)
        const int low = dist - d.band_half_width;
        const int m = low <= 0 ? 1 : (low - 1) / d.band_period + 1;
        if (m <= d.band_count && int64_t(m) * d.band_period <= int64_t(dist) + d.band_half_width) return d.beta;
    }
    return dist >= d.window_edge ? d.alpha : 1.f;
}

// The factor of query i and key j of a sequence pair with len_q queries and len_k keys.
TKPY_HD float decay_factor(int i, int j, int len_q, int len_k, const Decay& d) {
    if (i >= video_tokens(len_q, d) || j >= video_tokens(len_k, d)) return 1.f;
    return decay_at(i > j ? i - j : j - i, d);
}

// The keys query i sees: all len_k of them, except the video keys of frames T_train and later for
// a video query of frame 0 under the first-frame mask.
TKPY_HD KeyRanges decay_visible_keys(int i, int len_q, int len_k, const Decay& d) {
    const int video_k = video_tokens(len_k, d);
    const bool first_frame = d.first_frame_keys >= 0 && i < d.frame_tokens && i < video_tokens(len_q, d);
    if (!first_frame || d.first_frame_keys >= video_k) return KeyRanges{Range{0, len_k}, Range{0, 0}};
    return KeyRanges{Range{0, d.first_frame_keys}, Range{video_k, len_k}};
}

// decay_visible_keys without text (decay_window_only) as the one range it is then.
TKPY_HD Range decay_visible_video_keys(int i, int len_k, const Decay& d) {
    const bool first_frame = d.first_frame_keys >= 0 && i < d.frame_tokens;
    return Range{0, first_frame && d.first_frame_keys < len_k ? d.first_frame_keys : len_k};
}

// True when every pair of the tile [q0, q0 + rows) x [k0, k0 + cols) is in range and visible.
TKPY_HD bool decay_tile_fully_visible(int q0, int rows, int k0, int cols, int len_q, int len_k, const Decay& d) {
    if (q0 + rows > len_q || k0 + cols > len_k) return false;
    if (d.first_frame_keys < 0) return true;
    // Hidden pairs: video queries below HW against video keys in [first_frame_keys, video_k).
    const int q_hi = d.frame_tokens < video_tokens(len_q, d) ? d.frame_tokens : video_tokens(len_q, d);
    const int k_hi = video_tokens(len_k, d);
    const bool rows_hit = q0 < q_hi;
    const bool cols_hit = k0 < k_hi && k0 + cols > d.first_frame_keys;
    return !(rows_hit && cols_hit);
}

// The factor shared by every in-range pair of the tile [q0, q0 + rows) x [k0, k0 + cols), or -1
// when the pairs' factors differ. 1 for a tile entirely inside the window: it needs no work.
TKPY_HD float decay_tile_factor(int q0, int rows, int k0, int cols, int len_q, int len_k, const Decay& d) {
    const int q_end = q0 + rows < len_q ? q0 + rows : len_q;
    const int k_end = k0 + cols < len_k ? k0 + cols : len_k;
    if (q_end <= q0 || k_end <= k0) return 1.f;
    const int vq = video_tokens(len_q, d);
    const int vk = video_tokens(len_k, d);
    const int vq_end = q_end < vq ? q_end : vq;
    const int vk_end = k_end < vk ? k_end : vk;
    if (vq_end <= q0 || vk_end <= k0) return 1.f;  // every pair has a text token
    // The video pairs' distances span [lo, hi].
    const int a = k0 - (vq_end - 1);
    const int b = q0 - (vk_end - 1);
    const int lo = a > 0 ? a : (b > 0 ? b : 0);
    const int hi = (vk_end - 1 - q0) > (vq_end - 1 - k0) ? (vk_end - 1 - q0) : (vq_end - 1 - k0);
    const float f = decay_at(lo, d);
    // The factor only changes at the window's edge and the bands' edges.
    const int edge = d.window_edge;
    bool uniform = !(lo < edge && edge <= hi);
    for (int m = 1; m <= d.band_count && uniform; ++m) {
        const int64_t start = int64_t(m) * d.band_period - d.band_half_width;
        const int64_t after = int64_t(m) * d.band_period + d.band_half_width + 1;
        uniform = !(lo < start && start <= hi) && !(lo < after && after <= hi);
    }
    if (!uniform) return -1.f;
    // Text pairs (factor 1) in the tile too: uniform only if the video pairs' factor is 1 as well.
    const bool has_text = q_end > vq_end || k_end > vk_end;
    return has_text && f != 1.f ? -1.f : f;
}

// Whether a pair's factor is α beyond the window and 1 inside it, beyond_window telling which: no
// text and no bands. A kernel can then decay every block alike, without looking at its tile.
TKPY_HD bool decay_window_only(const Decay& d) { return d.text_tokens == 0 && d.band_count == 0; }

// |i − j| >= window_edge as one unsigned comparison: i − j + edge − 1 lands in [0, 2·edge − 2]
// exactly inside the window and wraps past it below (edge <= 2^30, the bindings' bound). A kernel
// tests a tile's elements with one add and one compare each, the add folding row and column.
TKPY_HD bool beyond_window(int i, int j, const Decay& d) {
    return uint32_t(i) - uint32_t(j) + uint32_t(d.window_edge - 1) >= 2u * uint32_t(d.window_edge) - 1u;
}

}  // namespace tkpy::detail
