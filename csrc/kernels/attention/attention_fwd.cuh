// Dense attention forward on H100/H200 (DESIGN.md §5): two kernels on tk's pipeline (task form,
// tk/pipeline/lcf.cuh), one producer and one set of masks and plans, two ways to consume.
//
// One CTA = a producer warpgroup and 2 or 3 consumer warpgroups, persistent over tasks (batch,
// query head, query tile of 64 rows per consumer) in detail::attention_task's order (K/V kept hot
// in L2, heavy causal tiles first):
//   - the producer gives registers away (setmaxnreg); one thread TMA-loads the task's Q tiles
//     (the task inputs, behind their own barrier pair, published with the task's kv block count),
//     then K and V blocks into a ring of stages, K and V each behind their own full/empty pair so
//     V lands while Q·Kᵀ runs; it alone walks the task's key-block plan;
//   - each consumer takes the registers and owns 64 query rows: S = Q·Kᵀ (wgmma, both operands
//     in shared memory), softcap and masks in registers, tk's online softmax (exp2, the scale in
//     one FFMA), O += P·V (wgmma, P from registers), then O / l and lse, with O staged in the
//     consumer's Q tile and TMA-stored (element-wise, masked, for a varlen tile that ends inside
//     its tensor, where TMA could not clip it).
// The consumers (attention_consumers.cuh): `baseline` runs one wgmma at a time; `pipelined`
// follows FlashAttention-3: the consumers take turns issuing their wgmmas (named barriers), and
// each issues block j+1's Q·Kᵀ and block j's P·V together, running block j+1's softmax while P·V
// is in flight.
// Which keys a row sees and which key blocks a tile needs come from tkpy/detail/attention_index.h
// (dense, with windows) and tkpy/detail/block_sparse_index.h (LServe's dense, streaming and
// block-sparse heads in one launch), the same functions the CPU path runs.
#pragma once

#include <cmath>

#include "tk/tk.cuh"
#include "tkpy/attention.h"
#include "tkpy/detail/attention_index.h"
#include "attention_tma.cuh"

namespace tkpy::attention {

inline constexpr int kConsumerRows = 64;

// Per-head-dim tiles of each kernel: key/value block rows and ring stages (ThunderKittens' sizes
// for the baseline: 128-row KV blocks, 4 stages at D = 64, 2 at D = 128; 64-row blocks at D = 256
// so that the 128-float O accumulator and S fit), dense attention's consumer warpgroups (sparse
// heads always take 2: their query tiles are LServe's 128-token blocks) and, under `sparse_`, the
// pipelined kernel's KV blocks for sparse heads, which must divide those 128-token blocks. The
// pipelined kernel holds O, S and the previous block's P at once (in-warpgroup overlap); its KV
// blocks are as large as that leaves registers for, without a spill.
template <int D, Kernel K>
struct attn_tile;
template <Kernel K>
struct attn_tile<64, K> {
    // Pipelined, dense: 3 x 64 query rows, as ThunderKittens runs D = 64; at 152 registers O, S
    // and P fit with 64-row KV blocks (32 + 32 + 16), not with 128-row ones (32 + 64 + 32).
    static constexpr int kv_rows = K == Kernel::pipelined ? 64 : 128;
    static constexpr int stages = K == Kernel::pipelined ? 6 : 4;
    static constexpr int sparse_kv_rows = 128;
    static constexpr int sparse_stages = 4;
    static constexpr int dense_consumers = K == Kernel::pipelined ? 3 : 2;
};
template <Kernel K>
struct attn_tile<128, K> {
    // Pipelined: 2 x 64 query rows at 232 registers, as FlashAttention-3 runs D = 128; 3 consumers'
    // 152 registers could not hold O (64 floats), S (64) and P (32) at once.
    static constexpr int kv_rows = 128;
    static constexpr int stages = 2;
    static constexpr int sparse_kv_rows = 128;
    static constexpr int sparse_stages = 2;
    static constexpr int dense_consumers = 2;
};
template <Kernel K>
struct attn_tile<256, K> {
    // Pipelined: O alone is 128 floats; beside it S and P of 64-row KV blocks spill at 224
    // registers, of 48-row blocks (32 for sparse heads) they do not.
    static constexpr int kv_rows = K == Kernel::pipelined ? 48 : 64;
    static constexpr int stages = K == Kernel::pipelined ? 3 : 2;
    static constexpr int sparse_kv_rows = K == Kernel::pipelined ? 32 : 64;
    static constexpr int sparse_stages = K == Kernel::pipelined ? 4 : 2;
    static constexpr int dense_consumers = 2;
};

// The setmaxnreg split of the CTA's registers: 2 consumers (384 threads at 168 each) or 3 (512 at
// 128, where 40 + 3 x 152 leaves the producer's block-plan walk out of local memory). At D = 256
// that walk needs 56.
template <int D, int Consumers>
struct attn_registers {
    static_assert(Consumers == 2 || Consumers == 3, "attention: 2 or 3 consumer warpgroups");
    static constexpr int producer = Consumers == 3 ? 40 : (D == 256 ? 56 : 40);
    static constexpr int consumer = Consumers == 3 ? 152 : (D == 256 ? 224 : 232);
};

// How a kernel forms a block's scores. Decided per block at run time (`fixed` false): skips the
// mask for blocks entirely inside it (and UltraViCo's decay for blocks inside the window). Or fixed at compile time for a whole launch: the launch's
// sparse-ness and softcap are template arguments and every block is masked, so that the code
// between two wgmma waits is one basic block. ptxas waits for every wgmma in flight at a branch,
// and when the accumulator in flight flows through more than one copy of the loop body, which
// would undo the pipelined kernel's overlap.
// `decay`: UltraViCo's logit decay (dense heads, no softcap), which needs each row's centre.
struct ScoreRule {
    bool fixed;
    bool sparse;
    bool capped;
    bool decay;
};
inline constexpr ScoreRule kScoresPerBlock{false, false, false, false};

// What a task is and what it needs, computed identically by the producer and the consumers.
struct Task {
    int batch;
    int head;
    int q0;  // first query row of the tile, within its sequence
    detail::Sequence seq_q;
    detail::Sequence seq_k;
    // Key blocks to visit: plan.block(n) for n < plan.size() (-1: skip), each `sub` kv blocks of
    // the kernel's kv_rows (dense: plan blocks are kv blocks; sparse: 128-token blocks).
    detail::KeyBlockPlan plan;
    int sub;
    int32_t type;  // sparse head type (dense attention: kDenseHead)
    int sink;
    int local;

    __device__ bool has_rows() const { return q0 < seq_q.len; }
};

// How the launch lays tasks out: detail::attention_task's order, over q_tiles per (batch, head).
struct TaskOrder {
    int tasks;
    int q_tiles;
    int section_heads;
};

// The dense plan: the kv blocks the tile's rows see through the window.
template <int TileRows, int KvRows>
__device__ inline void plan_dense(Task& t, const AttentionParams& p) {
    const detail::Range r =
        detail::key_blocks(t.q0, t.q0 + TileRows, t.seq_q.len, t.seq_k.len, p.window_left, p.window_right, KvRows);
    t.plan = detail::KeyBlockPlan{r, detail::Range{0, 0}, nullptr, 0, r};
}

// A sparse head's plan, in 128-token blocks of `sub` kv blocks, and its type's token rules.
template <int TileRows, int KvRows>
__device__ inline void plan_sparse(Task& t, const AttentionParams& p) {
    static_assert(TileRows == detail::kSparseBlock && detail::kSparseBlock % KvRows == 0,
                  "sparse attention: query tiles must be the 128-token blocks, kv blocks must divide them");
    t.plan = detail::sparse_plan(p.sparse, t.batch, t.head, t.q0 / detail::kSparseBlock, t.seq_q.len, t.seq_k.len);
    t.sub = detail::kSparseBlock / KvRows;
    t.type = p.sparse.head_mask_type[t.head];
    t.sink = p.sparse.streaming_info[2 * t.head];
    t.local = p.sparse.streaming_info[2 * t.head + 1];
}

// A layout with a fixed score rule knows at compile time whether its launches are sparse.
template <int TileRows, int KvRows, ScoreRule Rule>
__device__ inline Task make_task(const AttentionParams& p, const TaskOrder& order, int index) {
    const detail::TaskCoord c = detail::attention_task(index, order.q_tiles, p.heads_q, p.batch, order.section_heads);
    Task t;
    t.q0 = c.q_tile * TileRows;
    t.head = c.head;
    t.batch = c.batch;
    t.seq_q = detail::sequence(p.cu_seqlens_q, t.batch, p.seqlen_q, p.total_q);
    t.seq_k = detail::sequence(p.cu_seqlens_k, t.batch, p.seqlen_k, p.total_k);
    t.type = detail::kDenseHead;
    t.sink = t.local = 0;
    t.plan = detail::KeyBlockPlan{};
    t.sub = 1;
    if (!t.has_rows()) return t;
    if constexpr (Rule.fixed && !Rule.sparse) {
        plan_dense<TileRows, KvRows>(t, p);
    } else if constexpr (Rule.fixed) {
        plan_sparse<TileRows, KvRows>(t, p);
    } else if (p.sparse.head_mask_type == nullptr) {
        plan_dense<TileRows, KvRows>(t, p);
    } else {
        plan_sparse<TileRows, KvRows>(t, p);
    }
    return t;
}

// The keys query i sees, for the task's head (dense attention: the window; sparse heads: their
// type's token rules), as at most two ranges.
template <bool Sparse>
__device__ inline detail::KeyRanges task_visible_keys(const AttentionParams& p, const Task& t, int i) {
    if constexpr (Sparse) {
        return detail::sparse_visible_keys(i, t.seq_q.len, t.seq_k.len, t.type, t.sink, t.local, p.sparse);
    } else {
        return detail::KeyRanges{detail::visible_keys(i, t.seq_q.len, t.seq_k.len, p.window_left, p.window_right),
                                 detail::Range{0, 0}};
    }
}

__device__ inline detail::KeyRanges task_visible_keys(const AttentionParams& p, const Task& t, int i) {
    return p.sparse.head_mask_type == nullptr ? task_visible_keys<false>(p, t, i) : task_visible_keys<true>(p, t, i);
}

__device__ inline bool task_tile_fully_visible(const AttentionParams& p, const Task& t, int q0, int rows, int k0, int cols) {
    if (p.sparse.head_mask_type == nullptr) {
        return detail::block_fully_visible(q0, rows, k0, cols, t.seq_q.len, t.seq_k.len, p.window_left, p.window_right);
    }
    return detail::sparse_tile_fully_visible(q0, rows, k0, cols, t.seq_q.len, t.seq_k.len, t.type, t.sink, t.local,
                                             p.sparse);
}

// The softmax's exponent factor c (tk::softmax_state): scale · log2(e) on raw scores, or log2(e)
// on soft-capped ones, which have the scale applied already.
__device__ inline float score_scale_log2(const AttentionParams& p) {
    return p.softcap > 0.f ? tk::kLog2e : p.softmax_scale * tk::kLog2e;
}

// UltraViCo's decay of a warp's 16 rows of one key block (raw scores; `centre`: each row's q·k̄),
// then -inf where the first-frame rule or the lengths hide a key. A fixed rule decays each row's
// keys beyond the window by α in every block, with one range of visible keys per row (the host
// checked detail::decay_window_only: no text, no bands). Per block, a tile inside the window is
// left alone, a tile of one factor takes it, and a tile across an edge takes each pair's own.
template <ScoreRule Rule, int N>
__device__ inline void decay_scores(tk::rt_fl<16, N>& x, const AttentionParams& p, const Task& t, int row0, int k0,
                                    const tk::rv_rows<float, 16>& centre) {
    const detail::Decay& d = p.decay;
    const int len_q = t.seq_q.len, len_k = t.seq_k.len;
    if constexpr (Rule.fixed) {
        tk::warp::decay_above_where(x, x, centre, d.alpha,
                                    [&](int r, int c) { return detail::beyond_window(row0 + r, k0 + c, d); });
        tk::row_values<detail::Range, 16> visible;
        tk::warp::make_rows(visible, [&](int r) { return detail::decay_visible_video_keys(row0 + r, len_k, d); });
        tk::warp::mask(x, x, visible, k0, -INFINITY);
        return;
    }
    const float f = detail::decay_tile_factor(row0, 16, k0, N, len_q, len_k, d);
    if (f < 0.f) {
        tk::warp::decay_above_each(x, x, centre, [&](int r, int c) {
            return detail::decay_factor(row0 + r, k0 + c, len_q, len_k, d);
        });
    } else if (f != 1.f) {
        tk::warp::decay_above(x, x, centre, f);
    }
    if (detail::decay_tile_fully_visible(row0, 16, k0, N, len_q, len_k, d)) return;
    tk::row_values<detail::KeyRanges, 16> keys;
    tk::warp::make_rows(keys, [&](int r) { return detail::decay_visible_keys(row0 + r, len_q, len_k, d); });
    tk::warp::mask(x, x, keys, k0, -INFINITY);
}

// A warp's 16 rows of one key block, as the softmax takes them: soft-capped if asked, decayed
// (UltraViCo), and -inf where the key is not visible to the row (rows row0.., keys k0..).
template <ScoreRule Rule, int N>
__device__ inline void mask_scores(tk::rt_fl<16, N>& x, const AttentionParams& p, const Task& t, int row0, int k0,
                                   const tk::rv_rows<float, 16>& centre) {
    if constexpr (Rule.decay) {
        decay_scores<Rule>(x, p, t, row0, k0, centre);
        return;
    }
    tk::row_values<detail::KeyRanges, 16> keys;
    if constexpr (Rule.fixed) {
        if constexpr (Rule.capped) tk::warp::softcap(x, x, p.softmax_scale, p.softcap);
        tk::warp::make_rows(keys, [&](int r) { return task_visible_keys<Rule.sparse>(p, t, row0 + r); });
    } else {
        if (p.softcap > 0.f) tk::warp::softcap(x, x, p.softmax_scale, p.softcap);
        if (task_tile_fully_visible(p, t, row0, 16, k0, N)) return;
        tk::warp::make_rows(keys, [&](int r) { return task_visible_keys(p, t, row0 + r); });
    }
    tk::warp::mask(x, x, keys, k0, -INFINITY);
}

template <typename T, int D, int Consumers, Kernel Which, ScoreRule Rule>
struct AttnLayout {
    using cfg = attn_tile<D, Which>;
    static constexpr int consumer_warpgroups = Consumers;
    static constexpr int stages = Rule.sparse ? cfg::sparse_stages : cfg::stages;
    static constexpr int parts = 2;  // K, then V
    static constexpr int producer_registers = attn_registers<D, Consumers>::producer;
    static constexpr int consumer_registers = attn_registers<D, Consumers>::consumer;
    static constexpr int kv_rows = Rule.sparse ? cfg::sparse_kv_rows : cfg::kv_rows;
    static constexpr int tile_rows = Consumers * kConsumerRows;
    static constexpr int kKey = 0, kValue = 1;
    static constexpr ScoreRule rule = Rule;

    using q_tile = tk::st<T, kConsumerRows, D>;  // one consumer's Q, later its O
    using kv_tile = tk::st<T, kv_rows, D>;        // K as Bᵀ of Q Kᵀ; V as B of P V

    struct params {
        tk::tma_gl4<q_tile> q;
        tk::tma_gl4<q_tile> o;
        tk::tma_gl4<kv_tile> k;
        tk::tma_gl4<kv_tile> v;
        AttentionParams p;  // sizes, strides and pointers for what TMA does not move
        TaskOrder order;
    };
    struct task_inputs {
        q_tile q[Consumers];
    };
    struct stage {
        kv_tile k;
        kv_tile v;
        int kv_block;  // which kv block the stage holds: written before K's arrival publishes it
    };
    struct scratch {};  // O is staged in each consumer's Q tile
    struct consumer_state {
        bool took_first_turn = false;  // pipelined: the warpgroup turns have been started
    };

    // The producer's cursor: the task and its next kv block (plan entry n, sub-block sb).
    struct task {
        Task t;
        int blocks;  // kv blocks of the task (iterations)
        int n;
        int sb;
        int kv_block;
    };

    __device__ static int num_tasks(const params& prm) { return prm.order.tasks; }

    __device__ static Task make(const params& prm, int index) {
        return make_task<tile_rows, kv_rows, Rule>(prm.p, prm.order, index);
    }

    // The task and its kv blocks: none for a tile past its sequence's end (nothing is loaded, not
    // even Q). The first load moves to the plan's first block.
    __device__ static task begin(const params& prm, int index) {
        task c{make(prm, index), 0, -1, 0, 0};
        if (c.t.has_rows()) {
            for (int n = 0; n < c.t.plan.size(); ++n) c.blocks += c.t.plan.block(n) >= 0 ? c.t.sub : 0;
        }
        c.sb = c.t.sub;
        return c;
    }

    __device__ static int iterations(const task& c) { return c.blocks; }

    // Varlen tensors are one "batch" of packed tokens; batched ones are addressed per batch.
    __device__ static int tensor_batch(const params& prm, const Task& t) {
        return prm.p.cu_seqlens_q != nullptr ? 0 : t.batch;
    }

    __device__ static void load_inputs(const params& prm, task_inputs& in, tk::barrier& full, const task& c) {
        if (c.blocks == 0) {  // nothing to attend: the consumers write zeros without Q
            tk::arrive(full);
            return;
        }
        tk::arrive_expect_tx(full, Consumers * q_tile::bytes);
        for (int i = 0; i < Consumers; ++i) {
            tk::tma::load_async(in.q[i], prm.q, tensor_batch(prm, c.t), int(c.t.seq_q.start) + c.t.q0 + i * kConsumerRows,
                                c.t.head, full);
        }
    }

    __device__ static void load(const params& prm, stage& s, int part, tk::barrier& full, task& c, int) {
        if (part == kKey) {
            if (++c.sb >= c.t.sub) {
                do {
                    ++c.n;
                } while (c.t.plan.block(c.n) < 0);
                c.sb = 0;
            }
            c.kv_block = c.t.plan.block(c.n) * c.t.sub + c.sb;
            s.kv_block = c.kv_block;
        }
        const int kv_head = c.t.head / (prm.p.heads_q / prm.p.heads_kv);
        const int row = int(c.t.seq_k.start) + c.kv_block * kv_rows;
        tk::arrive_expect_tx(full, kv_tile::bytes);
        tk::tma::load_async(part == kKey ? s.k : s.v, part == kKey ? prm.k : prm.v, tensor_batch(prm, c.t), row,
                            kv_head, full);
    }

    __device__ static void consume(const params& prm, consumer_state& state, task_inputs& in, int iterations,
                                   tk::pipeline::stage_reader<AttnLayout> (&readers)[parts], scratch&, int index,
                                   int consumer);
};

// Writes a consumer's 64 rows of O (unnormalised, with its softmax state) and lse. O is staged
// in the consumer's Q tile, whose last Q·Kᵀ is done, when Q was loaded (`staged`).
template <typename L, typename T, int D>
__device__ inline void store_output(const typename L::params& prm, const Task& t, typename L::q_tile& staging,
                                    tk::rt_fl<16, D>& o, tk::softmax_state<16>& st, bool staged, int consumer) {
    const AttentionParams& p = prm.p;
    const int warp = tk::warpid_in_warpgroup();
    const bool leader = threadIdx.x % tk::kWarpgroupThreads == 0;
    const bool varlen = p.cu_seqlens_q != nullptr;
    const int rows0 = t.q0 + consumer * kConsumerRows;  // this consumer's first row in the sequence
    tk::rv_rows<float, 16> lse_rows;
    tk::warp::softmax_finish(o, lse_rows, st);
    float* lse = p.lse + p.lse_batch_stride * t.batch + p.lse_head_stride * t.head + t.seq_q.start;
    tk::warp::store(lse, lse_rows, rows0 + 16 * warp, t.seq_q.len);

    const int64_t row_base = p.o_batch_stride * (varlen ? 0 : t.batch) + p.o_head_stride * t.head;
    const tk::gl<T> out_rows{static_cast<T*>(p.out) + row_base + p.o_token_stride * (t.seq_q.start + rows0),
                             t.seq_q.len - rows0, D, p.o_token_stride};
    if (!staged) {  // no Q was loaded: write the zeros straight from registers
        tk::warp::store(out_rows, o, 16 * warp, 0);
        return;
    }
    tk::warpgroup::store(staging, o);
    tk::fence_async_shared();
    tk::warpgroup::sync(consumer);
    const bool tile_inside = rows0 + kConsumerRows <= t.seq_q.len;
    if (!varlen || tile_inside) {
        // Batched: TMA clips rows past Sq at the batch's end. Varlen: the tile is whole.
        if (leader) {
            tk::tma::store_async(prm.o, staging, varlen ? 0 : t.batch, int(t.seq_q.start) + rows0, t.head);
            tk::tma::store_commit_group();
            tk::tma::store_wait_read<0>();  // the producer may load the next task's Q into it
        }
    } else {
        // The tile runs past its sequence into the next one's rows: masked element-wise copy.
        tk::warpgroup::store(out_rows, staging, 0, 0);
    }
    tk::warpgroup::sync(consumer);
}

}  // namespace tkpy::attention

#include "attention_consumers.cuh"

namespace tkpy::attention {

template <typename T, int D, int Consumers, Kernel Which, ScoreRule Rule>
cudaError_t launch_layout(const AttentionParams& p, cudaStream_t stream) {
    using L = AttnLayout<T, D, Consumers, Which, Rule>;
    typename L::params prm{};
    prm.p = p;
    prm.order.q_tiles = (p.seqlen_q + L::tile_rows - 1) / L::tile_rows;
    const int64_t tasks = int64_t(prm.order.q_tiles) * p.heads_q * p.batch;
    if (tasks == 0) return cudaSuccess;
    if (tasks > INT32_MAX) return cudaErrorInvalidValue;
    prm.order.tasks = int(tasks);
    prm.order.section_heads = detail::attention_section_heads(p.heads_q, p.heads_kv, p.batch, p.seqlen_k, D,
                                                              int(sizeof(T)), tk::l2_bytes());
    const bool varlen = p.cu_seqlens_q != nullptr;
    const auto view = [&](const void* data, int64_t batch_stride, int64_t token_stride, int64_t head_stride,
                          int heads, int64_t rows) {
        return tma_view<T, D>(data, varlen, p.batch, rows, heads, batch_stride, token_stride, head_stride);
    };
    const int64_t rows_q = varlen ? p.total_q : p.seqlen_q;
    const int64_t rows_k = varlen ? p.total_k : p.seqlen_k;
    if (rows_q == 0) return cudaSuccess;
    cudaError_t err = tk::make_tma_gl4(prm.q, view(p.q, p.q_batch_stride, p.q_token_stride, p.q_head_stride, p.heads_q, rows_q));
    if (err == cudaSuccess) err = tk::make_tma_gl4(prm.o, view(p.out, p.o_batch_stride, p.o_token_stride, p.o_head_stride, p.heads_q, rows_q));
    // Without keys no task loads K or V (every row gets 0 and lse -inf), and TMA has no empty maps.
    if (err == cudaSuccess && rows_k > 0) {
        err = tk::make_tma_gl4(prm.k, view(p.k, p.k_batch_stride, p.k_token_stride, p.k_head_stride, p.heads_kv, rows_k));
        if (err == cudaSuccess) err = tk::make_tma_gl4(prm.v, view(p.v, p.v_batch_stride, p.v_token_stride, p.v_head_stride, p.heads_kv, rows_k));
    }
    if (err != cudaSuccess) return err;
    return tk::pipeline::launch<L>(prm, prm.order.tasks, stream);
}

// Sparse heads take 128-row tiles (2 consumers); dense attention the kernel's own choice. The
// pipelined kernel fixes its score rule per launch.
// UltraViCo's decay: the pipelined kernel with a fixed rule where the window alone decides the
// factor (no text, no bands), else the baseline kernel, which decides per block. At D = 256 the
// decay's registers leave ptxas no room to run the softmax under P·V, so the baseline runs it.
template <typename T, int D, Kernel Which>
cudaError_t launch_kernel(const AttentionParams& p, cudaStream_t stream) {
    constexpr int dense = attn_tile<D, Which>::dense_consumers;
    const bool sparse = p.sparse.head_mask_type != nullptr;
    if (p.decay.enabled) {
        if (sparse || p.softcap > 0.f || p.window_left >= 0 || p.window_right >= 0) return cudaErrorInvalidValue;
        if constexpr (Which == Kernel::pipelined && D != 256) {
            if (detail::decay_window_only(p.decay)) {
                return launch_layout<T, D, dense, Which, ScoreRule{true, false, false, true}>(p, stream);
            }
        }
        return launch_layout<T, D, 2, Kernel::baseline, ScoreRule{false, false, false, true}>(p, stream);
    }
    if constexpr (Which == Kernel::pipelined) {
        const bool capped = p.softcap > 0.f;
        if (sparse) {
            return capped ? launch_layout<T, D, 2, Which, ScoreRule{true, true, true, false}>(p, stream)
                          : launch_layout<T, D, 2, Which, ScoreRule{true, true, false, false}>(p, stream);
        }
        return capped ? launch_layout<T, D, dense, Which, ScoreRule{true, false, true, false}>(p, stream)
                      : launch_layout<T, D, dense, Which, ScoreRule{true, false, false, false}>(p, stream);
    } else {
        if (sparse || dense == 2) return launch_layout<T, D, 2, Which, kScoresPerBlock>(p, stream);
        return launch_layout<T, D, dense, Which, kScoresPerBlock>(p, stream);
    }
}

// One translation unit per head dim (attention_d64.cu, ...), both dtypes and kernels in each.
template <int D>
cudaError_t launch_head_dim(const AttentionParams& p, cudaStream_t stream) {
    Kernel which;
    if (!resolve_kernel(p.kernel, &which)) return cudaErrorInvalidValue;
    const bool half = p.dtype == DType::fp16;
    if (which == Kernel::baseline) {
        return half ? launch_kernel<tk::half, D, Kernel::baseline>(p, stream)
                    : launch_kernel<tk::bf16, D, Kernel::baseline>(p, stream);
    }
    return half ? launch_kernel<tk::half, D, Kernel::pipelined>(p, stream)
                : launch_kernel<tk::bf16, D, Kernel::pipelined>(p, stream);
}

cudaError_t launch_d64(const AttentionParams& p, cudaStream_t stream);
cudaError_t launch_d128(const AttentionParams& p, cudaStream_t stream);
cudaError_t launch_d256(const AttentionParams& p, cudaStream_t stream);

}  // namespace tkpy::attention
