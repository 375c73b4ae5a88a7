// Dense attention forward on H100 (DESIGN.md §5), on the tk tile library.
//
// One CTA = 3 warpgroups, persistent over tasks (batch, query head, 128-row query tile), the
// heaviest query tiles (the last ones, under bottom-right causal masks) first:
//   - warpgroup 0, the producer, gives registers away (setmaxnreg); one thread TMA-loads the
//     task's two 64-row Q tiles, then K and V blocks into a ring of shared-memory stages
//     (full/empty mbarriers), walking the task's key-block plan;
//   - warpgroups 1 and 2, the consumers, take the registers and own 64 query rows each:
//     S = Q Kᵀ (wgmma, both operands in shared memory), masks and softcap in registers, an exp2
//     online softmax, O += P V (wgmma, P from registers), then O / l and lse, with O staged in the
//     consumer's Q tile and TMA-stored (element-wise, masked, for a varlen tile that ends inside
//     its tensor, where TMA could not clip it).
// Which keys a row sees, and which key blocks a tile needs, come from tkpy/detail/attention_index.h
// (dense, with windows) and tkpy/detail/block_sparse_index.h (LServe's dense, streaming and
// block-sparse heads in one launch), the same functions the CPU path runs.
#pragma once

#include <cmath>

#include "tk/tk.cuh"
#include "tkpy/attention.h"
#include "tkpy/detail/attention_index.h"

namespace tkpy::attention {

// Per-head-dim tiles: key/value block rows and ring stages, as ThunderKittens sizes them
// (128-row KV blocks; 4 stages at D = 64, 2 at D = 128; 64-row blocks at D = 256 so that the
// 128-float O accumulator and S fit), and the setmaxnreg split of the CTA's 3 x 168 registers per
// thread between the producer and the two consumers (at D = 256 the producer's block-plan walk
// needs 56 to stay out of local memory).
template <int D>
struct attn_tile;
template <>
struct attn_tile<64> {
    static constexpr int kv_rows = 128;
    static constexpr int stages = 4;
    static constexpr int producer_registers = 40;
    static constexpr int consumer_registers = 232;
};
template <>
struct attn_tile<128> {
    static constexpr int kv_rows = 128;
    static constexpr int stages = 2;
    static constexpr int producer_registers = 40;
    static constexpr int consumer_registers = 232;
};
template <>
struct attn_tile<256> {
    static constexpr int kv_rows = 64;
    static constexpr int stages = 2;
    static constexpr int producer_registers = 56;
    static constexpr int consumer_registers = 224;
};

inline constexpr int kConsumers = 2;
inline constexpr int kConsumerRows = 64;
inline constexpr int kTileRows = kConsumers * kConsumerRows;
inline constexpr int kThreads = (kConsumers + 1) * tk::kWarpgroupThreads;
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

template <typename T, int D>
struct AttnKernel {
    using cfg = attn_tile<D>;
    static constexpr int kv_rows = cfg::kv_rows;
    static constexpr int stages = cfg::stages;
    using q_tile = tk::st<T, kConsumerRows, D>;  // one consumer's Q, later its O
    using kv_tile = tk::st<T, kv_rows, D>;        // K as Bᵀ of Q Kᵀ; V as B of P V

    struct params {
        tk::tma_gl4<q_tile> q;
        tk::tma_gl4<q_tile> o;
        tk::tma_gl4<kv_tile> k;
        tk::tma_gl4<kv_tile> v;
        AttentionParams p;  // sizes, strides and pointers for what TMA does not move
        int q_tiles;        // 128-row tiles per (batch, head): ceil(seqlen_q / 128)
    };

    struct smem {
        q_tile q[kConsumers];
        kv_tile k[stages];
        kv_tile v[stages];
        tk::barrier q_full, q_empty;
        tk::barrier kv_full[stages], kv_empty[stages];
        // Written by the producer before the barrier arrival that publishes them, so consumers
        // never walk a block plan themselves (it would cost registers they need for O).
        int task_kv_blocks;       // kv blocks of the task whose Q is loaded, with q_full
        int kv_block[stages];     // which kv block a stage holds, with kv_full[stage]
    };

    static constexpr size_t smem_bytes = sizeof(smem) + tk::layout::kTileAlignment;
    static_assert(cfg::producer_registers + kConsumers * cfg::consumer_registers <= 3 * 168,
                  "attention: setmaxnreg counts exceed the CTA's register pool (3 x 168 per thread)");
    static_assert(smem_bytes <= 227 * 1024, "attention: shared memory budget exceeded");
};

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
    __device__ bool loads_q() const { return has_rows() && plan.size() > 0; }
};

template <int KvRows>
__device__ inline Task make_task(const AttentionParams& p, int q_tiles, int index) {
    // Longest first: with bottom-right causal masks the last query tiles see the most keys.
    const int heads_batches = p.heads_q * p.batch;
    Task t;
    t.q0 = (q_tiles - 1 - index / heads_batches) * kTileRows;
    t.head = (index % heads_batches) % p.heads_q;
    t.batch = (index % heads_batches) / p.heads_q;
    t.seq_q = detail::sequence(p.cu_seqlens_q, t.batch, p.seqlen_q, p.total_q);
    t.seq_k = detail::sequence(p.cu_seqlens_k, t.batch, p.seqlen_k, p.total_k);
    t.type = detail::kDenseHead;
    t.sink = t.local = 0;
    t.plan = detail::KeyBlockPlan{};
    t.sub = 1;
    if (!t.has_rows()) return t;
    if (p.sparse.head_mask_type == nullptr) {
        const detail::Range r = detail::key_blocks(t.q0, t.q0 + kTileRows, t.seq_q.len, t.seq_k.len, p.window_left,
                                                   p.window_right, KvRows);
        t.plan = detail::KeyBlockPlan{r, detail::Range{0, 0}, nullptr, 0, r};
    } else {
        static_assert(detail::kSparseBlock % KvRows == 0 && kTileRows == detail::kSparseBlock,
                      "sparse attention: query tiles must be the 128-token blocks, kv blocks must divide them");
        t.plan = detail::sparse_plan(p.sparse, t.batch, t.head, t.q0 / kTileRows, t.seq_q.len, t.seq_k.len);
        t.sub = detail::kSparseBlock / KvRows;
        t.type = p.sparse.head_mask_type[t.head];
        t.sink = p.sparse.streaming_info[2 * t.head];
        t.local = p.sparse.streaming_info[2 * t.head + 1];
    }
    return t;
}

template <typename T, int D>
__device__ inline void producer(const typename AttnKernel<T, D>::params& prm, typename AttnKernel<T, D>::smem& s) {
    using K = AttnKernel<T, D>;
    const AttentionParams& p = prm.p;
    const int tasks = prm.q_tiles * p.heads_q * p.batch;
    const int group = p.heads_q / p.heads_kv;
    tk::ring_position<K::stages> ring;
    uint32_t q_parity = 0;
    // Varlen tensors are one "batch" of packed tokens; batched ones are addressed per batch.
    const bool varlen = p.cu_seqlens_q != nullptr;
    for (int index = blockIdx.x; index < tasks; index += gridDim.x) {
        const Task t = make_task<K::kv_rows>(p, prm.q_tiles, index);
        if (!t.loads_q()) continue;
        const int b = varlen ? 0 : t.batch;
        tk::wait(s.q_empty, q_parity ^ 1);
        int kv_blocks = 0;
        for (int n = 0; n < t.plan.size(); ++n) kv_blocks += t.plan.block(n) >= 0 ? t.sub : 0;
        s.task_kv_blocks = kv_blocks;
        tk::arrive_expect_tx(s.q_full, kConsumers * K::q_tile::bytes);
        for (int c = 0; c < kConsumers; ++c) {
            tk::tma::load_async(s.q[c], prm.q, b, int(t.seq_q.start) + t.q0 + c * kConsumerRows, t.head, s.q_full);
        }
        q_parity ^= 1;
        const int kv_head = t.head / group;
        for (int n = 0; n < t.plan.size(); ++n) {
            const int blk = t.plan.block(n);
            if (blk < 0) continue;
            for (int sb = 0; sb < t.sub; ++sb, ring.advance()) {
                tk::wait(s.kv_empty[ring.stage], ring.parity ^ 1);
                const int kv_blk = blk * t.sub + sb;
                s.kv_block[ring.stage] = kv_blk;
                tk::arrive_expect_tx(s.kv_full[ring.stage], 2 * K::kv_tile::bytes);
                const int row = int(t.seq_k.start) + kv_blk * K::kv_rows;
                tk::tma::load_async(s.k[ring.stage], prm.k, b, row, kv_head, s.kv_full[ring.stage]);
                tk::tma::load_async(s.v[ring.stage], prm.v, b, row, kv_head, s.kv_full[ring.stage]);
            }
        }
    }
}

// The keys query i sees, for the task's head (dense attention: the window; sparse heads: their
// type's token rules), as at most two ranges.
__device__ inline detail::KeyRanges task_visible_keys(const AttentionParams& p, const Task& t, int i) {
    if (p.sparse.head_mask_type == nullptr) {
        return detail::KeyRanges{detail::visible_keys(i, t.seq_q.len, t.seq_k.len, p.window_left, p.window_right),
                                 detail::Range{0, 0}};
    }
    return detail::sparse_visible_keys(i, t.seq_q.len, t.seq_k.len, t.type, t.sink, t.local, p.sparse);
}

__device__ inline bool task_tile_fully_visible(const AttentionParams& p, const Task& t, int q0, int rows, int k0, int cols) {
    if (p.sparse.head_mask_type == nullptr) {
        return detail::block_fully_visible(q0, rows, k0, cols, t.seq_q.len, t.seq_k.len, p.window_left, p.window_right);
    }
    return detail::sparse_tile_fully_visible(q0, rows, k0, cols, t.seq_q.len, t.seq_k.len, t.type, t.sink, t.local,
                                             p.sparse);
}

// Scores of one key block in base-2 units (scale, softcap and log2(e) applied), -inf where the
// key is not visible to the row. Skips the per-element work for blocks entirely inside the mask.
template <int N>
__device__ inline void scale_and_mask(tk::rt_fl<16, N>& x, const AttentionParams& p, const Task& t, int row0, int k0) {
    const float scale = p.softmax_scale;
    const float softcap = p.softcap;
    if (softcap > 0.f) {
        tk::warp::map(x, x, [scale, softcap](float s) { return softcap * tanhf(s * scale / softcap) * kLog2e; });
    } else {
        tk::warp::mul(x, x, scale * kLog2e);
    }
    if (task_tile_fully_visible(p, t, row0, 16, k0, N)) return;
    // A lane holds two rows of the warp's 16: g and g + 8.
    const detail::KeyRanges rows[2] = {task_visible_keys(p, t, row0 + tk::base_row(0)),
                                       task_visible_keys(p, t, row0 + tk::base_row(1))};
    const float neg_inf = -INFINITY;
#pragma unroll
    for (int j = 0; j < x.width; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const detail::KeyRanges& keys = rows[k & 1];
            const int key = k0 + 16 * j + tk::base_col(k);
            if (!keys.contains(key)) x.tiles[0][j].data[k].x = neg_inf;
            if (!keys.contains(key + 1)) x.tiles[0][j].data[k].y = neg_inf;
        }
}

template <typename T, int D>
__device__ inline void consumer(const typename AttnKernel<T, D>::params& prm, typename AttnKernel<T, D>::smem& s,
                                int c) {
    using K = AttnKernel<T, D>;
    const AttentionParams& p = prm.p;
    const int tasks = prm.q_tiles * p.heads_q * p.batch;
    const bool leader = threadIdx.x % tk::kWarpgroupThreads == 0;
    const bool varlen = p.cu_seqlens_q != nullptr;
    const int warp = tk::warpid_in_warpgroup();
    tk::ring_position<K::stages> ring;
    uint32_t q_parity = 0;

    tk::rt_fl<16, D> o;
    tk::rt_fl<16, K::kv_rows> x;
    tk::rt<T, 16, K::kv_rows> prob;
    tk::rv_rows<float, 16> m, l, block_max, alpha;

    for (int index = blockIdx.x; index < tasks; index += gridDim.x) {
        const Task t = make_task<K::kv_rows>(p, prm.q_tiles, index);
        if (!t.has_rows()) continue;  // a varlen sequence shorter than this tile
        const int rows0 = t.q0 + c * kConsumerRows;  // this consumer's first row in the sequence

        tk::warp::zero(o);
        tk::warp::fill(m, -INFINITY);
        tk::warp::fill(l, 0.f);
        const bool any_block = t.loads_q();
        if (any_block) {
            tk::wait(s.q_full, q_parity);
            const int kv_blocks = s.task_kv_blocks;
            for (int it = 0; it < kv_blocks; ++it, ring.advance()) {
                tk::wait(s.kv_full[ring.stage], ring.parity);
                const int kv_blk = s.kv_block[ring.stage];
                tk::warpgroup::mma_fence(x);
                tk::warpgroup::mm_ABt(x, s.q[c], s.k[ring.stage]);
                tk::warpgroup::mma_commit_group();
                tk::warpgroup::mma_async_wait<0>(x);

                scale_and_mask(x, p, t, rows0 + 16 * warp, kv_blk * K::kv_rows);
                tk::warp::row_max(block_max, x);
                // m_new = max(m, block max); rows that have seen no key yet keep -inf and use 0
                // as the exponent offset, so exp2 never meets inf - inf.
                tk::warp::map(block_max, m, block_max, [](float a, float b) { return fmaxf(a, b); });
                tk::warp::map(alpha, m, block_max, [](float old, float cur) {
                    return cur == -INFINITY ? 1.f : exp2f(old - cur);
                });
                tk::warp::copy(m, block_max);
                tk::warp::broadcast_rows(x, x, m, [](float v, float mx) { return exp2f(v - (mx == -INFINITY ? 0.f : mx)); });
                tk::warp::row_sum(block_max, x);
                tk::warp::map(l, l, alpha, [](float a, float b) { return a * b; });
                tk::warp::map(l, l, block_max, [](float a, float b) { return a + b; });
                tk::warp::mul_row(o, o, alpha);
                tk::warp::copy(prob, x);

                tk::warpgroup::mma_fence(o, prob);
                tk::warpgroup::mma_AB(o, prob, s.v[ring.stage]);
                tk::warpgroup::mma_commit_group();
                tk::warpgroup::mma_async_wait<0>(o);
                if (leader) tk::arrive(s.kv_empty[ring.stage]);
            }
            q_parity ^= 1;
        }

        // Output addresses are formed only now, so they hold no registers during the loop above.
        const int64_t row_base = p.o_batch_stride * (varlen ? 0 : t.batch) + p.o_head_stride * t.head;
        const tk::gl<T> out_rows{static_cast<T*>(p.out) + row_base + p.o_token_stride * (t.seq_q.start + rows0),
                                 t.seq_q.len - rows0, D, p.o_token_stride};
        float* lse = p.lse + p.lse_batch_stride * t.batch + p.lse_head_stride * t.head + t.seq_q.start;

        // O / l, and lse = ln(sum exp(s)) = (m + log2 l) ln 2; a row that saw nothing: 0 and -inf.
        tk::warp::map(m, m, l, [](float mx, float sum) { return sum > 0.f ? (mx + log2f(sum)) * kLn2 : -INFINITY; });
        tk::warp::map(l, l, [](float sum) { return sum > 0.f ? 1.f / sum : 0.f; });
        tk::warp::mul_row(o, o, l);
        tk::warp::store(lse, m, rows0 + 16 * warp, t.seq_q.len);

        if (!any_block) {  // no Q was loaded: write the zeros straight from registers
            tk::warp::store(out_rows, o, 16 * warp, 0);
            continue;
        }
        // Stage O in this consumer's Q tile (its last Q Kᵀ is done), then store it.
        tk::warpgroup::store(s.q[c], o);
        tk::fence_async_shared();
        tk::warpgroup::sync(c);
        const bool tile_inside = rows0 + kConsumerRows <= t.seq_q.len;
        if (!varlen || tile_inside) {
            // Batched: TMA clips rows past Sq at the batch's end. Varlen: the tile is whole.
            if (leader) {
                tk::tma::store_async(prm.o, s.q[c], varlen ? 0 : t.batch, int(t.seq_q.start) + rows0, t.head);
                tk::tma::store_commit_group();
                tk::tma::store_wait_read<0>();
            }
        } else {
            // The tile runs past its sequence into the next one's rows: masked element-wise copy.
            tk::warpgroup::store(out_rows, s.q[c], 0, 0);
        }
        tk::warpgroup::sync(c);  // s.q[c] is free again
        if (leader) tk::arrive(s.q_empty);
    }
    if (leader) tk::tma::store_wait<0>();
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(const __grid_constant__ typename AttnKernel<T, D>::params prm) {
    using K = AttnKernel<T, D>;
    extern __shared__ char raw_smem[];
    tk::smem_allocator alloc(raw_smem);
    auto& s = *alloc.allocate<typename K::smem>();
    if (threadIdx.x == 0) {
        tk::init_barrier(s.q_full, 1);
        tk::init_barrier(s.q_empty, kConsumers);
        for (int i = 0; i < K::stages; ++i) {
            tk::init_barrier(s.kv_full[i], 1);
            tk::init_barrier(s.kv_empty[i], kConsumers);
        }
        tk::fence_barrier_init();
    }
    __syncthreads();
    if (tk::warpgroupid() == 0) {
        tk::warpgroup::decrease_registers<K::cfg::producer_registers>();
        if (threadIdx.x == 0) producer<T, D>(prm, s);
    } else {
        tk::warpgroup::increase_registers<K::cfg::consumer_registers>();
        consumer<T, D>(prm, s, tk::warpgroupid() - 1);
    }
}

inline int sm_count() {
    int device = 0, count = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
    return count;
}

template <typename T, int D>
cudaError_t launch_typed(const AttentionParams& p, cudaStream_t stream) {
    using K = AttnKernel<T, D>;
    typename K::params prm{};
    prm.p = p;
    prm.q_tiles = (p.seqlen_q + kTileRows - 1) / kTileRows;
    const int64_t tasks = int64_t(prm.q_tiles) * p.heads_q * p.batch;
    if (tasks == 0) return cudaSuccess;
    const bool varlen = p.cu_seqlens_q != nullptr;
    // Varlen: one "batch" of packed tokens, as many rows as the packed tensors have.
    // A dim of size 1 may carry any stride in torch; TMA wants every stride a multiple of 16 bytes,
    // so those get the stride a packed layout would have.
    const auto view = [&](const void* data, int64_t batch_stride, int64_t token_stride, int64_t head_stride,
                          int heads, int64_t rows) {
        const int64_t batches = varlen ? 1 : p.batch;
        return tk::gl4<T>{static_cast<T*>(const_cast<void*>(data)), batches, rows, heads, D,
                          batches == 1 ? rows * token_stride : batch_stride, token_stride,
                          heads == 1 ? int64_t(D) : head_stride};
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
    auto* kernel = attention_fwd_kernel<T, D>;
    const cudaError_t attr =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(K::smem_bytes));
    if (attr != cudaSuccess) return attr;
    const int sms = sm_count();
    const int grid = int(sms > 0 && sms < tasks ? sms : tasks);
    kernel<<<grid, kThreads, K::smem_bytes, stream>>>(prm);
    return cudaGetLastError();
}

// One translation unit per head dim (attention_d64.cu, ...), both dtypes in each.
template <int D>
cudaError_t launch_head_dim(const AttentionParams& p, cudaStream_t stream) {
    return p.dtype == DType::fp16 ? launch_typed<tk::half, D>(p, stream) : launch_typed<tk::bf16, D>(p, stream);
}

cudaError_t launch_d64(const AttentionParams& p, cudaStream_t stream);
cudaError_t launch_d128(const AttentionParams& p, cudaStream_t stream);
cudaError_t launch_d256(const AttentionParams& p, cudaStream_t stream);

}  // namespace tkpy::attention
