// The two consumer loops of the attention forward (attention_fwd.cuh): one warpgroup's 64 query
// rows of a task, from its Q tile (task inputs) and the task's K and V stages.
#pragma once

namespace tkpy::attention {

// UltraViCo's centre of each of the warp's rows, q_i·k̄ in raw score units, once per task from the
// consumer's Q tile and the task's mean key (zeros without decay, or without keys to visit).
template <typename L>
__device__ inline tk::rv_rows<float, 16> decay_centre(const AttentionParams& p, const Task& t,
                                                     const typename L::q_tile& q, int iterations) {
    tk::rv_rows<float, 16> centre;
    tk::warp::fill(centre, 0.f);
    if constexpr (L::rule.decay) {
        constexpr int D = L::q_tile::cols;
        const int kv_head = t.head / (p.heads_q / p.heads_kv);
        const float* key_mean = p.decay.key_mean + (int64_t(t.batch) * p.heads_kv + kv_head) * D;
        if (iterations > 0) tk::warp::row_dot(centre, q, 16 * tk::warpid_in_warpgroup(), key_mean);
    }
    return centre;
}

// Baseline: per key block, S = Q·Kᵀ, wait, softmax, O += P·V, wait. Nothing overlaps inside the
// warpgroup; the other consumers' wgmma fill the gaps.
template <typename L>
__device__ inline void consume_baseline(const typename L::params& prm, typename L::task_inputs& in, int iterations,
                                        tk::pipeline::stage_reader<L> (&readers)[2], int index, int c) {
    using T = typename L::q_tile::dtype;
    constexpr int D = L::q_tile::cols;
    const AttentionParams& p = prm.p;
    const Task t = L::make(prm, index);
    if (!t.has_rows()) return;  // a varlen sequence shorter than this tile
    const int row0 = t.q0 + c * kConsumerRows + 16 * tk::warpid_in_warpgroup();  // this warp's first row

    tk::rt_fl<16, D> o;
    tk::rt_fl<16, L::kv_rows> s;
    tk::rt<T, 16, L::kv_rows> prob;
    tk::softmax_state<16> st;
    tk::warp::softmax_init(st, score_scale_log2(p));
    tk::warp::zero(o);
    const tk::rv_rows<float, 16> centre = decay_centre<L>(p, t, in.q[c], iterations);
    auto& keys = readers[L::kKey];
    auto& values = readers[L::kValue];
    for (int it = 0; it < iterations; ++it) {
        const typename L::stage& kv = keys.wait();
        const int kv_block = kv.kv_block;
        tk::warpgroup::mma_fence(s);
        tk::warpgroup::mm_ABt(s, in.q[c], kv.k);
        tk::warpgroup::mma_commit_group();
        tk::warpgroup::mma_async_wait<0>(s);
        keys.release();

        mask_scores<L::rule>(s, p, t, row0, kv_block * L::kv_rows, centre);
        tk::warp::softmax_update(st, s);
        tk::warp::softmax_rescale(o, st);
        tk::warp::copy(prob, s);

        values.wait();
        tk::warpgroup::mma_fence(o, prob);
        tk::warpgroup::mma_AB(o, prob, kv.v);
        tk::warpgroup::mma_commit_group();
        tk::warpgroup::mma_async_wait<0>(o);
        values.release();
    }
    store_output<L, T, D>(prm, t, in.q[c], o, st, iterations > 0, c);
}

// Pipelined (FlashAttention-3's two overlaps).
//   Ping-pong: consumer c issues its wgmma only in its turn, which named barrier kTurnBarrier + c
//   gives and the consumer before it (cyclically) passes on once its own wgmma are issued; the
//   softmax of one warpgroup then runs while another's wgmma occupy the tensor cores. Every
//   consumer of a task takes the same number of turns, so the turns stay in step across tasks;
//   the last consumer gives the very first turn.
//   In-warpgroup: S_j+1 = Q·K_j+1ᵀ and O += P_j·V_j are issued together,
//   S first; waiting with depth 1 returns S_j+1 while P_j·V_j still runs, and its softmax overlaps
//   that wgmma. O is rescaled once P_j·V_j is done; the first P·V overwrites O, so O is never
//   zeroed. The loop body exists once and is branch-free between the two waits (ScoreRule).
inline constexpr int kTurnBarrier = 4;  // named barriers 4.. (0: __syncthreads, 1..3: warpgroup::sync)

template <int Consumers>
__device__ inline void wait_turn(int c) {
    tk::named_barrier_sync<2 * tk::kWarpgroupThreads>(kTurnBarrier + c);
}

template <int Consumers>
__device__ inline void pass_turn(int c) {
    tk::named_barrier_arrive<2 * tk::kWarpgroupThreads>(kTurnBarrier + (c + 1) % Consumers);
}

// S = Q·Kᵀ of the task's next key block, issued in the warpgroup's turn and waited for, then
// masked and folded into the softmax: S holds the block's weights. Returns the block's stage.
template <typename L, int N>
__device__ inline const typename L::stage& scores_in_turn(tk::rt_fl<16, N>& s, tk::softmax_state<16>& st,
                                                          const typename L::q_tile& q,
                                                          tk::pipeline::stage_reader<L>& keys,
                                                          const AttentionParams& p, const Task& t, int row0, int c,
                                                          const tk::rv_rows<float, 16>& centre) {
    constexpr int C = L::consumer_warpgroups;
    const typename L::stage& kv = keys.wait();
    const int kv_block = kv.kv_block;
    wait_turn<C>(c);
    tk::warpgroup::mma_fence(s);
    tk::warpgroup::mm_ABt(s, q, kv.k);
    tk::warpgroup::mma_commit_group();
    pass_turn<C>(c);
    tk::warpgroup::mma_async_wait<0>(s);
    keys.release();
    mask_scores<L::rule>(s, p, t, row0, kv_block * L::kv_rows, centre);
    tk::warp::softmax_update(st, s);
    return kv;
}

template <typename L>
__device__ inline void consume_pipelined(const typename L::params& prm, typename L::consumer_state& state,
                                         typename L::task_inputs& in, int iterations,
                                         tk::pipeline::stage_reader<L> (&readers)[2], int index, int c) {
    using T = typename L::q_tile::dtype;
    constexpr int D = L::q_tile::cols;
    constexpr int C = L::consumer_warpgroups;
    const AttentionParams& p = prm.p;
    if (!state.took_first_turn) {
        if (c == C - 1) pass_turn<C>(c);
        state.took_first_turn = true;
    }
    const Task t = L::make(prm, index);
    if (!t.has_rows()) return;  // a varlen sequence shorter than this tile
    const int row0 = t.q0 + c * kConsumerRows + 16 * tk::warpid_in_warpgroup();  // this warp's first row
    const typename L::q_tile& q = in.q[c];

    tk::rt_fl<16, D> o;
    tk::rt_fl<16, L::kv_rows> s;
    tk::rt<T, 16, L::kv_rows> prob;
    tk::softmax_state<16> st;
    tk::warp::softmax_init(st, score_scale_log2(p));
    auto& keys = readers[L::kKey];
    auto& values = readers[L::kValue];
    if (iterations == 0) {
        tk::warp::zero(o);
        store_output<L, T, D>(prm, t, in.q[c], o, st, false, c);
        return;
    }

    const tk::rv_rows<float, 16> centre = decay_centre<L>(p, t, q, iterations);
    scores_in_turn<L>(s, st, q, keys, p, t, row0, c, centre);  // block 0: S_0 alone, then its softmax
    tk::warp::copy(prob, s);

    for (int it = 1; it < iterations; ++it) {
        const typename L::stage& next = keys.wait();
        const int kv_block = next.kv_block;
        const typename L::stage& current = values.wait();
        wait_turn<C>(c);
        tk::warpgroup::mma_fence(s);
        tk::warpgroup::mm_ABt(s, q, next.k);
        tk::warpgroup::mma_commit_group();
        tk::warpgroup::mma_fence(o, prob);
        tk::warpgroup::mma_AB(o, prob, current.v, it > 1);
        tk::warpgroup::mma_commit_group();
        pass_turn<C>(c);

        tk::warpgroup::mma_async_wait<1>(s);  // S_it is in, P·V still runs
        keys.release();
        mask_scores<L::rule>(s, p, t, row0, kv_block * L::kv_rows, centre);
        tk::warp::softmax_update(st, s);
        tk::warpgroup::pin(s);  // the softmax is computed here, under P·V

        tk::warpgroup::mma_async_wait<0>(o);
        values.release();
        tk::warp::softmax_rescale(o, st);
        tk::warp::copy(prob, s);
    }

    // The last block's P·V.
    const typename L::stage& last = values.wait();
    wait_turn<C>(c);
    tk::warpgroup::mma_fence(o, prob);
    tk::warpgroup::mma_AB(o, prob, last.v, iterations > 1);
    tk::warpgroup::mma_commit_group();
    pass_turn<C>(c);
    tk::warpgroup::mma_async_wait<0>(o);
    values.release();
    store_output<L, T, D>(prm, t, in.q[c], o, st, true, c);
}

template <typename T, int D, int Consumers, Kernel Which, ScoreRule Rule>
__device__ inline void AttnLayout<T, D, Consumers, Which, Rule>::consume(
    const params& prm, consumer_state& state, task_inputs& in, int iterations,
    tk::pipeline::stage_reader<AttnLayout> (&readers)[parts], scratch&, int index, int consumer) {
    if constexpr (Which == Kernel::baseline) {
        consume_baseline<AttnLayout>(prm, in, iterations, readers, index, consumer);
    } else {
        consume_pipelined<AttnLayout>(prm, state, in, iterations, readers, index, consumer);
    }
}

}  // namespace tkpy::attention
