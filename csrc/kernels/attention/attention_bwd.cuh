// Attention backward on H100/H200: FlashAttention-2's recurrence as a warp-specialised kernel on
// tk's pipeline (task form, tk/pipeline/lcf.cuh), key-block-stationary.
//
// A task is one key block of one kv head of one sequence (tkpy/detail/attention_bwd_index.h): its
// K and V tiles are the task inputs, and the ring streams the (Q, dO) tiles of every 32-query
// block that sees it, for each query head of the kv head, in two parts (Q with the queries' lse and
// delta, then dO), each behind its own full/empty pair. The producer warpgroup gives registers away
// (setmaxnreg); one thread walks the task's query blocks and TMA-loads them, writing each stage's
// coordinates beside it (StageCoords). Two consumer warpgroups take the registers; per stage,
// each computes on its 64 keys:
//   Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (wgmma, both operands in shared memory); Pᵀ = exp2(Sᵀ·c - lse·log2e)
//   (soft-capped first if asked), masked per key with the forward's rules; dSᵀ = Pᵀ ∘ (dPᵀ - delta)
//   (∘ 1 - tanh² under a softcap); dV += Pᵀ dO and dK += dSᵀ Q (wgmma, A from registers);
//   dQᵀ = Kᵀ dSᵀ (wgmma, K read transposed, dSᵀ staged in shared memory), added into an fp32
//   accumulator in global memory by RED.
// 32-query stages keep Sᵀ and dPᵀ at 16 registers each beside dK and dV (128 at D = 128), so
// nothing spills; wgmma's M of 64 is then the keys (Sᵀ, dPᵀ, dV, dK) and the head dim (dQᵀ).
// dK and dV stay in registers for the whole task (GQA: summed over the kv head's query heads), so
// they need no atomics; each task writes them once. dQ's additions from different key blocks race;
// with `deterministic` each waits on a counter per (sequence, query head, query block) until the
// key blocks before it (visit_rank) have added theirs, so every dQ element sums in one order.
// A preprocessing kernel computes lse · log2(e) and delta = rowsum(dO ∘ O) - dlse, and a last one
// converts the accumulator (times the softmax scale) into dq (attention_bwd.cu).
//
// Tiles per head dim (bwd_tile): at D = 64 and 128 the consumers own 64 keys each (128-key
// tasks) with their whole head dim; at D = 256 both take the same 64 keys, and each half of the
// head dim for dK, dV and dQ: dK and dV of 64 x 256 fp32 are 256 registers per thread, which no
// warpgroup has. They both compute Sᵀ and dPᵀ then, which costs 2 of the 5 products twice.
#pragma once

#include <cmath>

#include "tk/tk.cuh"
#include "tkpy/attention.h"
#include "tkpy/detail/attention_bwd_index.h"

namespace tkpy::attention {

inline constexpr int kBwdRows = detail::kBwdQueryBlock;  // query rows per stage
inline constexpr int kBwdKeys = 64;                      // keys per consumer (wgmma's M)

template <int D>
struct bwd_tile;
template <>
struct bwd_tile<64> {
    static constexpr int key_tiles = 2;  // 64-key tiles per task, one per consumer
    static constexpr int stages = 6;
    // dQ: each consumer its own keys' part, whole rows; both add it. (A 32-column slice would not
    // be whole swizzle chunks of K.)
    static constexpr bool split_dq = false;
};
template <>
struct bwd_tile<128> {
    static constexpr int key_tiles = 2;
    static constexpr int stages = 4;
    // dQ: each consumer half the head dim over the task's 128 keys, as FlashAttention-3 splits it.
    static constexpr bool split_dq = true;
};
template <>
struct bwd_tile<256> {
    static constexpr int key_tiles = 1;  // both consumers on the same keys, half the head dim each
    static constexpr int stages = 4;
    static constexpr bool split_dq = true;
};

// One task's coordinates, computed identically by the producer and the consumers.
struct BwdTask {
    int batch;
    int kv_head;
    int n;  // key block, of key_rows keys
    detail::Sequence seq_q;
    detail::Sequence seq_k;

    __device__ bool has_keys(int key_rows) const { return n * key_rows < seq_k.len; }
};

// What a launch's scores need, fixed at compile time: sparse heads' plans and token rules (else
// dense attention's window), and a softcap.
struct BwdRule {
    bool sparse;
    bool capped;
};

// What the consumers need of a stage besides its tiles, from the producer's walk, so that they
// hold none of it in registers across stages.
struct StageCoords {
    int head;         // query head
    int q0;           // first query of the block, in its sequence
    int sq;           // the sequence's queries and keys
    int sk;
    int64_t dq_row;   // the block's first row of the dQ accumulator
    int64_t counter;  // deterministic: the block's dQ counter, and this key block's rank among the
    int rank;         // block's key blocks (visit_rank); -1 when not deterministic
    detail::KeyRule keys;  // sparse heads: which queries see each key (the head type's rule)
};

template <typename T, int D, BwdRule Rule>
struct BwdLayout {
    using cfg = bwd_tile<D>;
    static constexpr int consumer_warpgroups = 2;
    static constexpr int stages = cfg::stages;
    static constexpr int parts = 2;  // Q (with the stage's coordinates), then dO
    static constexpr int kQuery = 0, kGrad = 1;
    // Dense attention's producer walks a range; a sparse head's walks its plans, which takes more.
    // A sparse head's producer walks its plans, which takes more registers than dense attention's
    // range; the consumers need about 200 either way.
    static constexpr int producer_registers = Rule.sparse ? 40 : 24;
    static constexpr int consumer_registers = Rule.sparse ? 232 : 240;
    static constexpr int key_tiles = cfg::key_tiles;
    static constexpr int key_rows = key_tiles * kBwdKeys;
    static constexpr int slices = consumer_warpgroups / key_tiles;  // dK/dV head-dim slices per key tile
    static constexpr int slice_cols = D / slices;
    static constexpr int dq_cols = cfg::split_dq ? D / consumer_warpgroups : D;  // one consumer's dQ
    static constexpr int kDqChunk = 64;  // dQ columns per product: the M of dQᵀ = Kᵀ dSᵀ
    static constexpr bool reads_other_ds = cfg::split_dq && key_tiles == 2;  // D = 128: both tiles' dSᵀ

    using key_tile = tk::st<T, kBwdKeys, D>;          // K, V (task inputs)
    using query_tile = tk::st<T, kBwdRows, D>;        // Q, dO (a stage)
    using ds_tile = tk::st_widest<T, kBwdKeys, kBwdRows>;  // one consumer's dSᵀ [keys][queries]

    struct params {
        tk::tma_gl4<query_tile> q;
        tk::tma_gl4<key_tile> k;
        tk::tma_gl4<key_tile> v;
        tk::tma_gl4<query_tile> dout;
        AttentionBackwardParams p;
        int key_blocks;  // per (sequence, kv head)
        int tasks;
        float log2_scale;  // turns scores (soft-capped ones: scale applied) into exp2's exponents
    };
    struct task_inputs {
        key_tile k[key_tiles];
        key_tile v[key_tiles];
    };
    struct stage {
        query_tile q;
        query_tile dout;
        tk::sv<float, kBwdRows> lse_log2;  // the queries' statistics, with Q
        tk::sv<float, kBwdRows> delta;
        StageCoords at;  // written before Q's arrival publishes them
    };
    struct scratch {
        ds_tile ds[consumer_warpgroups];
    };
    struct consumer_state {};

    // The producer's cursor: the task, its visit count, and the next (head, query block); dense
    // attention visits the same query blocks [lo, hi) for every head.
    struct task {
        BwdTask t;
        int visits;
        int head;
        int m;
        int lo;
        int hi;
    };

    __device__ static int num_tasks(const params& prm) { return prm.tasks; }

    // Tasks go (sequence, kv head, key block), key blocks ascending: the deterministic dQ order
    // waits only on lower key blocks, which every CTA reaches first.
    __device__ static BwdTask make(const params& prm, int index) {
        const AttentionParams& p = prm.p.fwd;
        BwdTask t;
        t.n = index % prm.key_blocks;
        t.kv_head = index / prm.key_blocks % p.heads_kv;
        t.batch = index / prm.key_blocks / p.heads_kv;
        t.seq_q = detail::sequence(p.cu_seqlens_q, t.batch, p.seqlen_q, p.total_q);
        t.seq_k = detail::sequence(p.cu_seqlens_k, t.batch, p.seqlen_k, p.total_k);
        return t;
    }

    __device__ static detail::BwdWalk walk(const params& prm, const BwdTask& t, int head) {
        const AttentionParams& p = prm.p.fwd;
        return detail::bwd_walk(t.n, key_rows, t.seq_q.len, t.seq_k.len, p.window_left, p.window_right, p.sparse,
                                t.batch, head);
    }

    __device__ static int visit_rank(const detail::BwdWalk& w, int m) {
        return Rule.sparse ? w.sparse_visit_rank(m) : w.dense_visit_rank(m);
    }

    __device__ static int group(const params& prm) { return prm.p.fwd.heads_q / prm.p.fwd.heads_kv; }

    __device__ static task begin(const params& prm, int index) {
        task c{make(prm, index), 0, 0, -1, 0, 0};
        if (!c.t.has_keys(key_rows)) return c;
        const int h0 = c.t.kv_head * group(prm);
        c.head = h0;
        if constexpr (!Rule.sparse) {  // the window's query blocks, all visited (query_blocks is exact)
            const detail::Range r = walk(prm, c.t, h0).candidates;
            c.lo = r.lo;
            c.hi = r.hi;
            c.m = r.lo - 1;
            c.visits = group(prm) * (r.hi - r.lo);
        } else {
            for (int h = h0; h < h0 + group(prm); ++h) {
                // Counted with the test advance() skips by, so the two can never disagree.
                const detail::BwdWalk w = walk(prm, c.t, h);
                for (int m = w.candidates.lo; m < w.candidates.hi; ++m) c.visits += visit_rank(w, m) >= 0;
            }
        }
        return c;
    }

    __device__ static int iterations(const task& c) { return c.visits; }

    __device__ static int tensor_batch(const params& prm, const BwdTask& t) {
        return prm.p.fwd.cu_seqlens_q != nullptr ? 0 : t.batch;
    }

    __device__ static void load_inputs(const params& prm, task_inputs& in, tk::barrier& full, const task& c) {
        if (c.visits == 0) {  // no query sees these keys: dK = dV = 0, written without K or V
            tk::arrive(full);
            return;
        }
        tk::arrive_expect_tx(full, 2 * key_tiles * key_tile::bytes);
        for (int i = 0; i < key_tiles; ++i) {
            const int row = int(c.t.seq_k.start) + c.t.n * key_rows + i * kBwdKeys;
            tk::tma::load_async(in.k[i], prm.k, tensor_batch(prm, c.t), row, c.t.kv_head, full);
            tk::tma::load_async(in.v[i], prm.v, tensor_batch(prm, c.t), row, c.t.kv_head, full);
        }
    }

    // Where the cursor's stage is, for the consumers.
    __device__ static StageCoords coords(const params& prm, const task& c) {
        const AttentionParams& p = prm.p.fwd;
        const bool varlen = p.cu_seqlens_q != nullptr;
        const int64_t acc_rows = varlen ? p.total_q : p.seqlen_q;
        const int64_t acc_head = (int64_t(varlen ? 0 : c.t.batch) * p.heads_q + c.head) * acc_rows;
        StageCoords at;
        at.head = c.head;
        at.q0 = c.m * kBwdRows;
        at.sq = c.t.seq_q.len;
        at.sk = c.t.seq_k.len;
        at.dq_row = acc_head + c.t.seq_q.start + at.q0;
        at.counter = 0;
        at.rank = -1;
        if constexpr (Rule.sparse) {
            at.keys = detail::sparse_key_rule(p.sparse.head_mask_type[c.head], p.sparse.streaming_info[2 * c.head],
                                              p.sparse.streaming_info[2 * c.head + 1], p.sparse);
        }
        if (prm.p.deterministic) {
            const int m_blocks = (p.seqlen_q + kBwdRows - 1) / kBwdRows;
            at.counter = (int64_t(c.t.batch) * p.heads_q + c.head) * m_blocks + c.m;
            at.rank = visit_rank(walk(prm, c.t, c.head), c.m);
        }
        return at;
    }

    // The next visited (head, query block) after the cursor's.
    __device__ static void advance(const params& prm, task& c) {
        if constexpr (!Rule.sparse) {
            if (++c.m >= c.hi) ++c.head, c.m = c.lo;
        } else {
            const int h_end = (c.t.kv_head + 1) * group(prm);
            for (;; ++c.head, c.m = -1) {
                const detail::BwdWalk w = walk(prm, c.t, c.head);
                c.m = c.m < w.candidates.lo ? w.candidates.lo : c.m + 1;
                while (c.m < w.candidates.hi && visit_rank(w, c.m) < 0) ++c.m;
                if (c.m < w.candidates.hi || c.head + 1 >= h_end) return;
            }
        }
    }

    __device__ static void load(const params& prm, stage& s, int part, tk::barrier& full, task& c, int) {
        if (part == kQuery) {
            advance(prm, c);
            s.at = coords(prm, c);
        }
        const int row = int(c.t.seq_q.start) + c.m * kBwdRows;
        if (part == kGrad) {
            tk::arrive_expect_tx(full, query_tile::bytes);
            tk::tma::load_async(s.dout, prm.dout, tensor_batch(prm, c.t), row, c.head, full);
            return;
        }
        const AttentionParams& p = prm.p.fwd;
        const int64_t stats = (int64_t(c.t.batch) * p.heads_q + c.head) * padded_query_rows(p) + c.m * kBwdRows;
        tk::arrive_expect_tx(full, query_tile::bytes + 2 * sizeof(s.delta));
        tk::tma::load_async(s.q, prm.q, tensor_batch(prm, c.t), row, c.head, full);
        tk::tma::load_async(s.lse_log2, prm.p.lse_log2 + stats, full);
        tk::tma::load_async(s.delta, prm.p.delta + stats, full);
    }

    __device__ static void consume(const params& prm, consumer_state&, task_inputs& in, int iterations,
                                   tk::pipeline::stage_reader<BwdLayout> (&readers)[parts], scratch& scr, int index,
                                   int consumer);
};

// Sᵀ (scores, soft-capped if asked) of one warp's 16 keys x the stage's 64 queries becomes Pᵀ:
// exp2(s · c - lse · log2(e)), 0 where the query does not see the key.
// (Dense attention's rule is the launch's window, from the parameters; a sparse head's comes
// with the stage.)
template <bool Sparse, typename Stage>
__device__ inline void probabilities(tk::rt_fl<16, kBwdRows>& s, const Stage& st, const AttentionParams& p, int row0,
                                     float log2_scale) {
    tk::warp::broadcast_cols(s, s, st.lse_log2,
                             [log2_scale](float x, float l) { return exp2f(fmaf(x, log2_scale, -l)); });
    const StageCoords at = st.at;
    const detail::KeyRule keys = Sparse ? at.keys : detail::dense_key_rule(p.window_left, p.window_right);
    if (keys.tile_fully_visible(at.q0, kBwdRows, row0, 16, at.sq, at.sk)) return;
    tk::row_values<detail::Range, 16> seen;
    tk::warp::make_rows(seen, [&](int r) { return keys.queries(row0 + r, at.sq, at.sk); });
    tk::warp::mask(s, s, seen, at.q0, 0.f);  // after exp2: a query that saw no key has lse -inf
}

// Synchronises the two consumer warpgroups (named barrier 4: 0 is __syncthreads', 1..3 are
// warpgroup::sync's), which read each other's dSᵀ.
__device__ inline void consumers_sync() { tk::named_barrier_sync<2 * tk::kWarpgroupThreads>(4); }

// The barrier around a stage's dSᵀ tiles: both consumers' when one reads the other's (dQ split by
// head dim over two key tiles), else the consumer's own warpgroup.
template <bool ReadsOther>
__device__ inline void sync_ds(int consumer) {
    if constexpr (ReadsOther) {
        consumers_sync();
    } else {
        tk::warpgroup::sync(consumer);
    }
}

// Deterministic dQ: a consumer adds its part of a query block's dQ once the counter says every
// part before it in the order has been added (the counter counts parts added), and then counts
// its own. One thread waits and counts; the warpgroup's barrier orders the rest around it.
__device__ inline void wait_dq_turn(const int32_t* counter, int32_t parts_before, int consumer) {
    if (threadIdx.x % tk::kWarpgroupThreads == 0) tk::wait_counter_at_least(counter, parts_before);
    tk::warpgroup::sync(consumer);
}

__device__ inline void pass_dq_turn(int32_t* counter, int consumer) {
    __threadfence();  // this thread's adds, before the barrier makes the group's one release
    tk::warpgroup::sync(consumer);
    if (threadIdx.x % tk::kWarpgroupThreads == 0) tk::counter_release_add(counter, 1);
}

template <typename T, int D, BwdRule Rule>
__device__ inline void BwdLayout<T, D, Rule>::consume(const params& prm, consumer_state&, task_inputs& in,
                                                        int iterations,
                                                        tk::pipeline::stage_reader<BwdLayout> (&readers)[parts],
                                                        scratch& scr, int index, int consumer) {
    const AttentionBackwardParams& bp = prm.p;
    const AttentionParams& p = bp.fwd;
    if (!make(prm, index).has_keys(key_rows)) return;  // a varlen sequence shorter than this key block
    const int c = consumer;
    const int kt = c % key_tiles;     // this consumer's key tile
    const int slice = c / key_tiles;  // and head-dim slice
    const int warp = tk::warpid_in_warpgroup();
    const int row0 = index % prm.key_blocks * key_rows + kt * kBwdKeys + 16 * warp;  // this warp's first key

    tk::rt_fl<16, slice_cols> dk, dv;
    tk::warp::zero(dk);
    tk::warp::zero(dv);
    auto& stages = readers[kQuery];  // both parts are taken in step: one position for both
    for (int it = 0; it < iterations; ++it) {
        const stage& st = stages.wait();
        // Products that overwrite their accumulator are declared per stage, so that nothing holds
        // their registers across stages (wgmma names its accumulator as an input too).
        tk::rt_fl<16, kBwdRows> s, dp;  // Sᵀ, dPᵀ: this warp's 16 keys x the stage's queries
        tk::rt<T, 16, kBwdRows> prob, ds;
        tk::warpgroup::mma_fence(s);
        tk::warpgroup::mm_ABt(s, in.k[kt], st.q);
        tk::warpgroup::mma_commit_group();
        stages.wait_part(kGrad);
        tk::warpgroup::mma_fence(dp);
        tk::warpgroup::mm_ABt(dp, in.v[kt], st.dout);
        tk::warpgroup::mma_commit_group();
        tk::warpgroup::mma_async_wait<0>(dp);
        tk::warpgroup::pin(s);  // Sᵀ is in too: no read of it may move above the wait

        // dS = P ∘ (dP - delta) (∘ 1 - tanh² under a softcap), with P from Sᵀ and the forward's lse,
        // masked with the forward's rules. The statistics are read from the stage column by column,
        // so that no vector of them holds registers beside dK and dV; both products are done before
        // any of this, so that no accumulator is in flight while it runs.
        if constexpr (Rule.capped) {
            const float pre = p.softmax_scale / p.softcap;
            tk::warp::broadcast_cols(dp, dp, s, st.delta, [pre](float g, float x, float d) {
                const float t = tk::warp::fast_tanh(x * pre);
                return (g - d) * (1.f - t * t);
            });
            tk::warp::softcap(s, s, p.softmax_scale, p.softcap);
        } else {
            tk::warp::broadcast_cols(dp, dp, st.delta, [](float g, float d) { return g - d; });
        }
        probabilities<Rule.sparse>(s, st, p, row0, prm.log2_scale);
        tk::warp::mul(dp, dp, s);
        tk::warp::copy(prob, s);
        tk::warp::copy(ds, dp);
        // dSᵀ to shared memory for dQ now, before the wgmma that reads ds's registers is issued
        // (registers of an A operand in flight must not be touched).
        tk::warpgroup::store(scr.ds[c], ds);
        tk::fence_async_shared();

        tk::warpgroup::mma_fence(dv, prob);
        tk::warpgroup::mma_AB(dv, prob, tk::col_slice<slice_cols>(st.dout, slice));
        tk::warpgroup::mma_fence(dk, ds);
        tk::warpgroup::mma_AB(dk, ds, tk::col_slice<slice_cols>(st.q, slice));
        tk::warpgroup::mma_commit_group();

        // dQ = dS K, as dQᵀ = Kᵀ dSᵀ (wgmma's M is 64: the head dim, 64 columns at a time, not the
        // stage's 32 queries), with Kᵀ read transposed and dSᵀ from shared memory. dV and dK finish
        // first, so that P and dS no longer hold registers beside dQ; then the stage is free (no
        // product reads it after them).
        tk::warpgroup::mma_async_wait<0>(dk);
        tk::warpgroup::pin(dv);
        const StageCoords at = st.at;
        stages.release_all();
        sync_ds<reads_other_ds>(c);  // the dSᵀ this consumer's dQ reads are in
        const tk::gl<float> acc{bp.dq_accum + at.dq_row * D, at.sq - at.q0, D, D};
#pragma unroll
        for (int chunk = 0; chunk < dq_cols / kDqChunk; ++chunk) {
            const int col0 = (cfg::split_dq ? c * dq_cols : 0) + chunk * kDqChunk;  // in the head dim
            tk::rt_fl<16, kBwdRows> dq_t;  // dQᵀ of 64 head-dim columns x the stage's queries
            tk::warpgroup::mma_fence(dq_t);
            if constexpr (cfg::split_dq) {  // this consumer's head-dim slice, over every key tile
#pragma unroll
                for (int i = 0; i < key_tiles; ++i) {
                    tk::warpgroup::mma_AtB(dq_t, tk::col_slice<kDqChunk>(in.k[i], col0 / kDqChunk),
                                           scr.ds[key_tiles == 1 ? c : i], i > 0);
                }
            } else {  // this consumer's keys, whole rows
                tk::warpgroup::mm_AtB(dq_t, in.k[kt], scr.ds[c]);
            }
            tk::warpgroup::mma_commit_group();
            tk::warpgroup::mma_async_wait<0>(dq_t);
            // Deterministic: its turn is taken once the first product is in, not before it. The
            // consumers' parts are disjoint columns when dQ is split, else in consumer order.
            if (chunk == 0 && at.rank >= 0) {
                const int parts_before = at.rank * consumer_warpgroups + (cfg::split_dq ? 0 : c);
                wait_dq_turn(bp.dq_semaphore + at.counter, parts_before, c);
            }
            tk::warp::atomic_add_transposed(acc, dq_t, 0, col0 + 16 * warp);
        }
        if (at.rank >= 0) pass_dq_turn(bp.dq_semaphore + at.counter, c);
        sync_ds<reads_other_ds>(c);  // every product that read this stage's dSᵀ is done with it
    }

    // dK (times the scale) and dV of this consumer's keys and head-dim slice.
    const BwdTask t = make(prm, index);
    const int64_t kv_batch = p.cu_seqlens_k != nullptr ? 0 : t.batch;
    tk::warp::mul(dk, dk, p.softmax_scale);
    const tk::gl<T> dk_rows{static_cast<T*>(bp.dk) + bp.dk_batch_stride * kv_batch + bp.dk_head_stride * t.kv_head +
                                bp.dk_token_stride * t.seq_k.start,
                            t.seq_k.len, D, bp.dk_token_stride};
    const tk::gl<T> dv_rows{static_cast<T*>(bp.dv) + bp.dv_batch_stride * kv_batch + bp.dv_head_stride * t.kv_head +
                                bp.dv_token_stride * t.seq_k.start,
                            t.seq_k.len, D, bp.dv_token_stride};
    tk::warp::store(dk_rows, dk, row0, slice * slice_cols);
    tk::warp::store(dv_rows, dv, row0, slice * slice_cols);
}

}  // namespace tkpy::attention

#include "attention_tma.cuh"

namespace tkpy::attention {

// The key-block-stationary kernel for one dtype and head dim (delta and the dQ accumulator ready).
template <typename T, int D, BwdRule Rule>
cudaError_t launch_bwd_layout(const AttentionBackwardParams& bp, cudaStream_t stream) {
    using L = BwdLayout<T, D, Rule>;
    const AttentionParams& p = bp.fwd;
    typename L::params prm{};
    prm.p = bp;
    prm.key_blocks = (p.seqlen_k + L::key_rows - 1) / L::key_rows;
    prm.log2_scale = Rule.capped ? tk::kLog2e : p.softmax_scale * tk::kLog2e;
    const int64_t tasks = int64_t(prm.key_blocks) * p.heads_kv * p.batch;
    if (tasks == 0) return cudaSuccess;
    if (tasks > INT32_MAX) return cudaErrorInvalidValue;
    prm.tasks = int(tasks);
    const bool varlen = p.cu_seqlens_q != nullptr;
    const int64_t rows_q = varlen ? p.total_q : p.seqlen_q;
    const int64_t rows_k = varlen ? p.total_k : p.seqlen_k;
    const auto view = [&](const void* data, int64_t batch_stride, int64_t token_stride, int64_t head_stride,
                          int heads, int64_t rows) {
        return tma_view<T, D>(data, varlen, p.batch, rows, heads, batch_stride, token_stride, head_stride);
    };
    // Without queries no task loads Q or dO (dK = dV = 0), and TMA has no empty maps.
    cudaError_t err = tk::make_tma_gl4(prm.k, view(p.k, p.k_batch_stride, p.k_token_stride, p.k_head_stride, p.heads_kv, rows_k));
    if (err == cudaSuccess) err = tk::make_tma_gl4(prm.v, view(p.v, p.v_batch_stride, p.v_token_stride, p.v_head_stride, p.heads_kv, rows_k));
    if (err == cudaSuccess && rows_q > 0) {
        err = tk::make_tma_gl4(prm.q, view(p.q, p.q_batch_stride, p.q_token_stride, p.q_head_stride, p.heads_q, rows_q));
        if (err == cudaSuccess) {
            err = tk::make_tma_gl4(prm.dout, view(bp.dout, bp.do_batch_stride, bp.do_token_stride, bp.do_head_stride,
                                                  p.heads_q, rows_q));
        }
    }
    if (err != cudaSuccess) return err;
    return tk::pipeline::launch<L>(prm, prm.tasks, stream);
}

template <typename T, int D>
cudaError_t launch_bwd_rule(const AttentionBackwardParams& bp, cudaStream_t stream) {
    if (bp.fwd.sparse.head_mask_type != nullptr) return launch_bwd_layout<T, D, BwdRule{true, false}>(bp, stream);
    if (bp.fwd.softcap > 0.f) return launch_bwd_layout<T, D, BwdRule{false, true}>(bp, stream);
    return launch_bwd_layout<T, D, BwdRule{false, false}>(bp, stream);
}

template <int D>
cudaError_t launch_bwd_head_dim(const AttentionBackwardParams& bp, cudaStream_t stream) {
    return bp.fwd.dtype == DType::fp16 ? launch_bwd_rule<tk::half, D>(bp, stream)
                                       : launch_bwd_rule<tk::bf16, D>(bp, stream);
}

cudaError_t launch_bwd_d64(const AttentionBackwardParams& bp, cudaStream_t stream);
cudaError_t launch_bwd_d128(const AttentionBackwardParams& bp, cudaStream_t stream);
cudaError_t launch_bwd_d256(const AttentionBackwardParams& bp, cudaStream_t stream);

}  // namespace tkpy::attention
