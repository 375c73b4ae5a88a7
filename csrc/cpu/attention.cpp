// CPU attention forward: a tiled online softmax on the same params struct and index math as the
// CUDA kernel, for dense attention (with UltraViCo's decay, params.decay) and for LServe's unified
// sparse prefill (params.sparse). Each task owns one (sequence, query head, query tile) and walks
// that tile's key-block plan, so a skipped block costs nothing. The products, exp and row
// reductions of a block run as ATen ops on buffers of the compute type T (fp32; fp64 for fp64
// inputs, so that gradcheck can run through it), because ATen dispatches them to kernels
// vectorised for the host CPU (this file is built without -march); the per-row bookkeeping is
// plain loops.
#include "cpu/cpu_ops.h"
#include "cpu/head_rows.h"
#include "cpu/online_softmax.h"

#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/mv.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "tkpy/detail/attention_index.h"
#include "tkpy/detail/block_sparse_index.h"
#include "tkpy/detail/ultravico_index.h"

namespace tkpy::cpu {
namespace {

using attention::AttentionParams;

// Large enough that a block's matmuls run near the BLAS peak, its K/V conversion to fp32 is shared
// by many query rows and decode (one query row) pays the per-op overhead on few blocks; small
// enough that a worker's fp32 buffers stay under 1 MB at D = 256 (2 MB in fp64). Measured on 2
// cores over 64..256 x 64..512: the 2x8x1000x128 prefill is within noise from 128 x 128 up, and
// decode over 4000 keys is about 2x faster with 256-key blocks than with 128.
constexpr int kQueryTile = 128;
constexpr int kKeyBlock = 256;
// Sparse heads address keys in the plan's 128-token blocks and query blocks; the workspace, sized
// for kKeyBlock, holds them too.
static_assert(kQueryTile == detail::kSparseBlock && detail::kSparseBlock <= kKeyBlock,
              "sparse attention: query tiles must be the 128-token blocks");

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The unit of parallel work.
struct Task {
    int batch;
    int head;
    int tile;
};

// Numbers the (sequence, query head, query tile) tasks from the real sequence lengths, so that
// varlen batches spend no task on tiles past a sequence's end.
class TaskGrid {
public:
    explicit TaskGrid(const AttentionParams& p) : heads_(p.heads_q), first_task_(p.batch + 1, 0), tiles_(p.batch) {
        for (int b = 0; b < p.batch; ++b) {
            tiles_[b] = ceil_div(detail::sequence(p.cu_seqlens_q, b, p.seqlen_q, p.total_q).len, kQueryTile);
            first_task_[b + 1] = first_task_[b] + int64_t(heads_) * tiles_[b];
        }
    }

    int64_t size() const { return first_task_.back(); }

    Task task(int64_t index) const {
        const int b = int(std::upper_bound(first_task_.begin(), first_task_.end(), index) - first_task_.begin()) - 1;
        const int64_t local = index - first_task_[b];
        return Task{b, int(local / tiles_[b]), int(local % tiles_[b])};
    }

private:
    int heads_;
    std::vector<int64_t> first_task_;
    std::vector<int> tiles_;
};

// Compute-type buffers of one worker, reused across its tasks.
template <typename T>
struct Workspace {
    at::Tensor q;          // [kQueryTile, D], pre-multiplied by score_multiplier
    at::Tensor k;          // [kKeyBlock, D]
    at::Tensor v;          // [kKeyBlock, D]
    at::Tensor scores;     // [kQueryTile * kKeyBlock]; a block of r x n is viewed densely as [r, n]
    at::Tensor acc;        // [kQueryTile, D]
    at::Tensor centre;     // [kQueryTile]: UltraViCo's q_i·k̄ of the tile's rows, scaled like the scores
    OnlineSoftmax<T> softmax;

    explicit Workspace(int head_dim)
        : q(at::empty({kQueryTile, head_dim}, kType)),
          k(at::empty({kKeyBlock, head_dim}, kType)),
          v(at::empty({kKeyBlock, head_dim}, kType)),
          scores(at::empty({kQueryTile * kKeyBlock}, kType)),
          acc(at::empty({kQueryTile, head_dim}, kType)),
          centre(at::empty({kQueryTile}, kType)),
          softmax(kQueryTile) {}

private:
    static constexpr at::ScalarType kType = c10::CppTypeToScalarType<T>::value;
};

// Geometry shared by every block of one task.
struct TileShape {
    int q0;    // first query of the tile, in its sequence
    int rows;  // queries in the tile
    int sq;    // sequence lengths
    int sk;
};

// Which keys a task's rows see and which key blocks it visits, from the shared index math the CUDA
// kernel runs (its make_task and scale_and_mask). Dense attention: the window, over kKeyBlock-key
// blocks. Sparse heads: the head type's token rules, over the 128-token blocks of the head's plan.
struct TaskKeys {
    const AttentionParams& p;
    TileShape tile;
    detail::KeyBlockPlan plan;
    int block_keys;  // keys per plan block
    int32_t type;    // sparse head: its type, sink and local
    int sink;
    int local;

    bool sparse() const { return p.sparse.head_mask_type != nullptr; }

    detail::KeyRanges visible(int i) const {
        if (p.decay.enabled && detail::decay_window_only(p.decay)) {  // as the pipelined kernel
            return detail::KeyRanges{detail::decay_visible_video_keys(i, tile.sk, p.decay), detail::Range{0, 0}};
        }
        if (p.decay.enabled) return detail::decay_visible_keys(i, tile.sq, tile.sk, p.decay);
        if (!sparse()) {
            return detail::KeyRanges{detail::visible_keys(i, tile.sq, tile.sk, p.window_left, p.window_right),
                                     detail::Range{0, 0}};
        }
        return detail::sparse_visible_keys(i, tile.sq, tile.sk, type, sink, local, p.sparse);
    }

    // True when no element of the keys [k0, k0 + cols) x the tile's rows needs masking.
    bool fully_visible(int k0, int cols) const {
        if (p.decay.enabled) {
            return detail::decay_tile_fully_visible(tile.q0, tile.rows, k0, cols, tile.sq, tile.sk, p.decay);
        }
        if (!sparse()) {
            return detail::block_fully_visible(tile.q0, tile.rows, k0, cols, tile.sq, tile.sk, p.window_left,
                                               p.window_right);
        }
        return detail::sparse_tile_fully_visible(tile.q0, tile.rows, k0, cols, tile.sq, tile.sk, type, sink, local,
                                                 p.sparse);
    }
};

TaskKeys task_keys(const AttentionParams& p, const Task& task, const TileShape& tile) {
    if (p.sparse.head_mask_type == nullptr) {
        const detail::Range r = detail::key_blocks(tile.q0, tile.q0 + tile.rows, tile.sq, tile.sk, p.window_left,
                                                   p.window_right, kKeyBlock);
        return TaskKeys{p, tile, detail::KeyBlockPlan{r, detail::Range{0, 0}, nullptr, 0, r}, kKeyBlock,
                        detail::kDenseHead, 0, 0};
    }
    // The query tile is the plan's 128-row block (kQueryTile == kSparseBlock): task.tile is qb.
    const int h = task.head;
    return TaskKeys{p,
                    tile,
                    detail::sparse_plan(p.sparse, task.batch, h, task.tile, tile.sq, tile.sk),
                    detail::kSparseBlock,
                    p.sparse.head_mask_type[h],
                    p.sparse.streaming_info[2 * h],
                    p.sparse.streaming_info[2 * h + 1]};
}

// q is multiplied once per tile so that q·k comes out scaled: by the softmax scale, or, with a
// softcap, by scale / softcap so that tanh and one multiply finish the capped score.
template <typename T>
T score_multiplier(const AttentionParams& p) {
    return p.softcap > 0.f ? softmax_scale_of<T>(p) / softcap_of<T>(p) : softmax_scale_of<T>(p);
}

// UltraViCo's decay of a block's scaled scores [rows, cols] (keys k0..), each row pulled toward its
// centre where above it: min(s, f·s + (1 − f)·c). As the CUDA kernel: a tile inside the window
// is left alone and a tile of one factor takes it at once (ATen ops); otherwise each row decays its
// keys beyond the window by α when that is the whole rule (the pipelined kernel's test), or each
// pair takes its own factor.
template <typename T>
void decay_scores(at::Tensor& scores, const at::Tensor& centre, const TaskKeys& keys, int k0) {
    const detail::Decay& d = keys.p.decay;
    const TileShape& tile = keys.tile;
    const int cols = int(scores.size(1));
    const float f = detail::decay_tile_factor(tile.q0, tile.rows, k0, cols, tile.sq, tile.sk, d);
    if (f == 1.f) return;
    if (f >= 0.f) {
        scores.copy_(at::minimum(scores, scores.mul(T(f)).add_(centre.unsqueeze(1), T(1) - T(f))));
        return;
    }
    T* const s = scores.data_ptr<T>();
    const T* const c = centre.data_ptr<T>();
    const auto pull = [](T x, T factor, T centre_r) { return std::min(x, factor * x + (T(1) - factor) * centre_r); };
    const bool window_only = detail::decay_window_only(d);
    for (int r = 0; r < tile.rows; ++r) {
        const int i = tile.q0 + r;
        T* row = s + int64_t(r) * cols;
        for (int col = 0; col < cols; ++col) {
            const int j = k0 + col;
            if (window_only) {
                if (detail::beyond_window(i, j, d)) row[col] = pull(row[col], T(d.alpha), c[r]);
            } else {
                const T factor = T(detail::decay_factor(i, j, tile.sq, tile.sk, d));
                if (factor != T(1)) row[col] = pull(row[col], factor, c[r]);
            }
        }
    }
}

// Scores of a block of keys [k0, k0 + cols): scaled, soft-capped, decayed (UltraViCo), and -inf
// where the shared index math (so the CUDA kernel's mask) hides a key.
template <typename T>
void compute_scores(at::Tensor& scores, const at::Tensor& q_tile, const at::Tensor& k_block, const TaskKeys& keys,
                    int k0, const at::Tensor& centre) {
    at::cpu::mm_out(scores, q_tile, k_block.t());
    if (keys.p.softcap > 0.f) scores.tanh_().mul_(softcap_of<T>(keys.p));
    if (keys.p.decay.enabled) decay_scores<T>(scores, centre, keys, k0);
    const int cols = int(k_block.size(0));
    if (keys.fully_visible(k0, cols)) return;
    T* const s = scores.data_ptr<T>();
    for (int r = 0; r < keys.tile.rows; ++r) {
        const detail::KeyRanges visible = keys.visible(keys.tile.q0 + r);
        T* row = s + int64_t(r) * cols;
        for (int c = 0; c < cols; ++c) {
            if (!visible.contains(k0 + c)) row[c] = kNegInf<T>;
        }
    }
}

// Divides each accumulator row by its softmax sum and stores out and lse. A row that saw no key
// has sum 0: its output is 0 and its lse -inf.
template <typename T>
void write_tile(const HeadRows& out, T* lse, const TileShape& tile, Workspace<T>& ws) {
    T* const acc = ws.acc.template data_ptr<T>();
    const int64_t head_dim = ws.acc.size(1);
    for (int r = 0; r < tile.rows; ++r) lse[tile.q0 + r] = ws.softmax.finish_row(r, acc + r * head_dim, head_dim);
    out.rows(tile.q0, tile.rows, int(head_dim)).copy_(ws.acc.narrow(0, 0, tile.rows));
}

template <typename T>
void run_task(const AttentionParams& p, const Task& task, Workspace<T>& ws) {
    const at::ScalarType dtype = scalar_type(p.dtype);
    const detail::Sequence seq_q = detail::sequence(p.cu_seqlens_q, task.batch, p.seqlen_q, p.total_q);
    const detail::Sequence seq_k = detail::sequence(p.cu_seqlens_k, task.batch, p.seqlen_k, p.total_k);
    const int kv_head = task.head / (p.heads_q / p.heads_kv);
    const HeadRows q = head_rows(p.q, task.batch * p.q_batch_stride, seq_q.start, p.q_token_stride,
                                 task.head * p.q_head_stride, dtype);
    const HeadRows k = head_rows(p.k, task.batch * p.k_batch_stride, seq_k.start, p.k_token_stride,
                                 kv_head * p.k_head_stride, dtype);
    const HeadRows v = head_rows(p.v, task.batch * p.v_batch_stride, seq_k.start, p.v_token_stride,
                                 kv_head * p.v_head_stride, dtype);
    const HeadRows out = head_rows(p.out, task.batch * p.o_batch_stride, seq_q.start, p.o_token_stride,
                                   task.head * p.o_head_stride, dtype);
    T* const lse = lse_data<T>(p) + task.batch * p.lse_batch_stride + task.head * p.lse_head_stride + seq_q.start;

    const int q0 = task.tile * kQueryTile;
    const TileShape tile{q0, std::min(kQueryTile, seq_q.len - q0), seq_q.len, seq_k.len};
    const at::Tensor q_tile = ws.q.narrow(0, 0, tile.rows);
    at::Tensor acc = ws.acc.narrow(0, 0, tile.rows);
    q_tile.copy_(q.rows(q0, tile.rows, p.head_dim));
    q_tile.mul_(score_multiplier<T>(p));
    at::Tensor centre = ws.centre.narrow(0, 0, tile.rows);
    if (p.decay.enabled) {
        const float* key_mean = p.decay.key_mean + (int64_t(task.batch) * p.heads_kv + kv_head) * p.head_dim;
        const at::Tensor mean = at::from_blob(const_cast<float*>(key_mean), {p.head_dim}, at::kFloat);
        at::mv_out(centre, q_tile, mean.to(centre.scalar_type()));
    }
    acc.zero_();
    ws.softmax.reset(tile.rows);

    const TaskKeys keys = task_keys(p, task, tile);
    for (int n = 0; n < keys.plan.size(); ++n) {
        const int block = keys.plan.block(n);
        if (block < 0) continue;  // a listed block the token rules cannot reach
        const int k0 = block * keys.block_keys;
        const int cols = std::min(keys.block_keys, tile.sk - k0);
        const at::Tensor k_block = ws.k.narrow(0, 0, cols);
        const at::Tensor v_block = ws.v.narrow(0, 0, cols);
        k_block.copy_(k.rows(k0, cols, p.head_dim));
        v_block.copy_(v.rows(k0, cols, p.head_dim));
        at::Tensor scores = ws.scores.narrow(0, 0, int64_t(tile.rows) * cols).view({tile.rows, cols});
        compute_scores<T>(scores, q_tile, k_block, keys, k0, centre);
        ws.softmax.step(scores, acc);
        at::cpu::addmm_out(acc, acc, scores, v_block);
    }
    write_tile(out, lse, tile, ws);
}

template <typename T>
void forward(const AttentionParams& p) {
    const TaskGrid grid(p);
    // Grain 1: a task is a whole pass of a query tile over its keys, far above the cost of
    // scheduling it.
    at::parallel_for(0, grid.size(), 1, [&](int64_t begin, int64_t end) {
        Workspace<T> ws(p.head_dim);
        for (int64_t index = begin; index < end; ++index) run_task(p, grid.task(index), ws);
    });
}

}  // namespace

void attention_forward(const AttentionParams& p) {
    if (p.dtype == DType::fp64) {
        forward<double>(p);
    } else {
        forward<float>(p);
    }
}

}  // namespace tkpy::cpu
