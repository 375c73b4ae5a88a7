// The online softmax of attention (FlashAttention 2/3), as warp-scope ops on register tiles: one
// definition for every kernel that normalises scores block by block (prefill, decode).
//
// Scores stay raw (the unscaled q·k, or the soft-capped score) and the state keeps each row's
// running max of them; exponents are formed as one FFMA per element, score · c - max · c with
// c = softmax scale · log2(e), and exp2. That needs c > 0, which the ops' validation guarantees
// (softmax_scale, k_scale > 0). A row that has seen no key yet has max -inf: its exponent offset
// is 0, so exp2 never meets inf - inf, and a masked score (-inf) weighs 0.
//
//   softmax_state<16> st;   warp::softmax_init(st, scale * kLog2e);
//   per block:  S = Q Kᵀ;  mask S;  warp::softmax_update(st, S);      // S now holds exp2 weights
//               warp::softmax_rescale(O, st);  P = S (to bf16);  O += P V
//   at the end: warp::softmax_finish(O, lse, st);                     // O / l, and lse (base e)
#pragma once

#include "register.cuh"

namespace tk {

// The weight of a base-2 exponent x in a sum normalised at max_log2 (also base 2): exp2(x - max),
// with offset 0 for a max of -inf (nothing seen yet). Combining partial softmaxes (the warps or
// splits of a decode) weighs each part's max with it.
__device__ inline float softmax_weight(float x, float max_log2) {
    return exp2f(x - (max_log2 == -INFINITY ? 0.f : max_log2));
}

// lse (base e) of a row whose weights, normalised at max_log2, sum to `sum`; -inf when it saw no key.
__device__ inline float softmax_lse(float max_log2, float sum) {
    return sum > 0.f ? (max_log2 + log2f(sum)) * kLn2 : -INFINITY;
}

// The running softmax of a Rows-row score stream.
template <int Rows>
struct softmax_state {
    rv_rows<float, Rows> max;      // running max of each row's raw scores; -inf before any key
    rv_rows<float, Rows> sum;      // this lane's part of the running sum of weights (the quad's parts are added at the end)
    rv_rows<float, Rows> rescale;  // what the latest update multiplied the sum by; O needs the same
    float scale_log2;              // c: raw score -> base-2 exponent, c > 0
};

namespace warp {

template <int R>
__device__ inline void softmax_init(softmax_state<R>& st, float scale_log2) {
    fill(st.max, -INFINITY);
    fill(st.sum, 0.f);
    fill(st.rescale, 1.f);
    st.scale_log2 = scale_log2;
}

// tanh(x) = 1 - 2 / (exp2(2 x log2 e) + 1): two SFU operations (MUFU.EX2, MUFU.RCP) and no branch,
// so it can sit between two wgmma waits. Its absolute error is below 3e-7, where the SFU's own
// tanh.approx has a relative one of 2^-11, which a softcap of 30-50 would turn into logit errors
// of 0.02; tanhf's expansion needs a dozen registers per element, which attention does not have.
// Saturates to +-1 (exp2 gives inf or 0).
__device__ inline float fast_tanh(float x) {
    return 1.f - __fdividef(2.f, exp2f(2.f * kLog2e * x) + 1.f);
}

// Scores of a soft-capped softmax: dst = cap · tanh(src · scale / cap), the logit cap of Gemma and
// Grok (with the state's c = log2(e), since the scale is already applied).
template <int R, int C>
__device__ inline void softcap(rt_fl<R, C>& dst, const rt_fl<R, C>& src, float scale, float cap) {
    const float pre = scale / cap;
    map(dst, src, [pre, cap](float v) { return cap * fast_tanh(v * pre); });
}

// Each row's dot product with a vector: dst[r] = src[row0 + r] · vec for the rows this lane holds
// (a register tile's layout), vec a global fp32 vector of src's C values. The 4 lanes of a quad,
// which hold the same rows, each take a quarter of the columns and add their parts. Once per
// task, e.g. a query tile's logits against the mean key (UltraViCo's centre).
template <int R, shared_tile ST>
__device__ inline void row_dot(rv_rows<float, R>& dst, const ST& src, int row0, const float* vec) {
    static_assert(ST::cols % 4 == 0 && R <= ST::rows, "row_dot: the rows must be in the tile, the columns split in 4");
    constexpr int part = ST::cols / 4;
    const int c0 = part * (laneid() % 4);
#pragma unroll
    for (int i = 0; i < R / 16; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = row0 + 16 * i + base_row(h);  // h is k & 1
            float acc = 0.f;
#pragma unroll 8
            for (int c = c0; c < c0 + part; ++c) acc = fmaf(to_float(*src.ptr(row, c)), __ldg(vec + c), acc);
            acc += __shfl_xor_sync(0xffffffff, acc, 1);
            acc += __shfl_xor_sync(0xffffffff, acc, 2);
            dst.data[i][h] = acc;
        }
}

// UltraViCo's logit decay: a score x above its row's centre c is pulled toward it,
// x > c ? c + f·(x − c) : x, computed as min(x, f·x + (1 − f)·c), which is that for f in [0, 1]
// (x itself for f = 1). `pull` is the row's (1 − f)·c.
__device__ inline float decay_above(float x, float f, float pull) { return fminf(x, fmaf(f, x, pull)); }

// Every score of the tile decayed by one factor f.
template <int R, int C>
__device__ inline void decay_above(rt_fl<R, C>& dst, const rt_fl<R, C>& src, const rv_rows<float, R>& centre, float f) {
    rv_rows<float, R> pull;
    map(pull, centre, [f](float c) { return (1.f - f) * c; });
    broadcast_rows(dst, src, pull, [f](float x, float p) { return decay_above(x, f, p); });
}

// Scores decayed by f where where(r, c) holds (tile-relative row and column, e.g. the keys beyond a
// row's window), kept elsewhere. Row and column are compile-time offsets from the lane's first
// ones, so a test of their difference costs a few integer operations and no registers.
template <int R, int C, typename W>
__device__ inline void decay_above_where(rt_fl<R, C>& dst, const rt_fl<R, C>& src, const rv_rows<float, R>& centre,
                                         float f, W where) {
#pragma unroll
    for (int i = 0; i < dst.height; ++i)
#pragma unroll
        for (int j = 0; j < dst.width; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int r = 16 * i + base_row(k);
                const int c = 16 * j + base_col(k);
                const float pull = (1.f - f) * centre.data[i][k & 1];
                const float2 v = src.tiles[i][j].data[k];
                dst.tiles[i][j].data[k] = make_float2(where(r, c) ? decay_above(v.x, f, pull) : v.x,
                                                      where(r, c + 1) ? decay_above(v.y, f, pull) : v.y);
            }
}

// Each score decayed by its own factor, factor(r, c) in [0, 1] at tile-relative row r and column c:
// for the tiles whose factors differ (a window's or band's edge inside them).
template <int R, int C, typename F>
__device__ inline void decay_above_each(rt_fl<R, C>& dst, const rt_fl<R, C>& src, const rv_rows<float, R>& centre,
                                        F factor) {
#pragma unroll
    for (int i = 0; i < dst.height; ++i)
#pragma unroll
        for (int j = 0; j < dst.width; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int r = 16 * i + base_row(k);
                const int c = 16 * j + base_col(k);
                const float centre_r = centre.data[i][k & 1];
                const float fx = factor(r, c), fy = factor(r, c + 1);
                const float2 v = src.tiles[i][j].data[k];
                dst.tiles[i][j].data[k] = make_float2(decay_above(v.x, fx, (1.f - fx) * centre_r),
                                                      decay_above(v.y, fy, (1.f - fy) * centre_r));
            }
}

// Folds one block of raw scores (masked entries -inf) into the state, replacing them by their
// weights exp2(s · c - max · c) at the new max. st.rescale is set to exp2((old max - new max) · c),
// the factor the sum was multiplied by and O must be (softmax_rescale).
template <int R, int C>
__device__ inline void softmax_update(softmax_state<R>& st, rt_fl<R, C>& scores) {
    rv_rows<float, R> new_max;
    row_max(new_max, scores, st.max);
    const float c = st.scale_log2;
#pragma unroll
    for (int i = 0; i < R / 16; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float m = new_max.data[i][h];
            // -inf - -inf never happens: a row still without keys keeps factor 1 (its sum and O are 0).
            const float rescale = m == -INFINITY ? 1.f : exp2f((st.max.data[i][h] - m) * c);
            st.rescale.data[i][h] = rescale;
            st.sum.data[i][h] *= rescale;
            st.max.data[i][h] = m;
            new_max.data[i][h] = m == -INFINITY ? 0.f : m * c;  // the exponent offset
        }
    broadcast_rows(scores, scores, new_max, [c](float v, float offset) { return exp2f(fmaf(v, c, -offset)); });
    row_partial_sum(st.sum, scores, st.sum);
}

// O *= the latest update's rescale factor, row by row.
template <int R, int C>
__device__ inline void softmax_rescale(rt_fl<R, C>& o, const softmax_state<R>& st) {
    mul_row(o, o, st.rescale);
}

// Each row's max (base 2: max · c, -inf before any key) and whole sum: the state of a partial
// softmax, for combining several with softmax_weight (decode's warps and splits).
template <int R>
__device__ inline void softmax_partials(rv_rows<float, R>& max_log2, rv_rows<float, R>& sum, const softmax_state<R>& st) {
    copy(sum, st.sum);
    complete_row_sum(sum);
    const float c = st.scale_log2;
#pragma unroll
    for (int i = 0; i < R / 16; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float m = st.max.data[i][h];
            max_log2.data[i][h] = m == -INFINITY ? -INFINITY : m * c;
        }
}

// O = O · out_scale / l (0 for a row that saw no key) and lse (base e; -inf for such a row).
template <int R, int C>
__device__ inline void softmax_finish(rt_fl<R, C>& o, rv_rows<float, R>& lse, const softmax_state<R>& st,
                                      float out_scale = 1.f) {
    rv_rows<float, R> max_log2, sum;
    softmax_partials(max_log2, sum, st);
#pragma unroll
    for (int i = 0; i < R / 16; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float l = sum.data[i][h];
            lse.data[i][h] = softmax_lse(max_log2.data[i][h], l);
            sum.data[i][h] = l > 0.f ? out_scale / l : 0.f;
        }
    mul_row(o, o, sum);
}

}  // namespace warp
}  // namespace tk
