// CPU attention backward: FlashAttention-2's recurrence in the forward's compute type T (fp32, or
// fp64 for fp64 inputs), walked the way the CUDA kernel walks it (tkpy/detail/attention_bwd_index.h):
// key-block-stationary, each key block visiting the query blocks whose forward plan contains it,
// with the kernel's per-key mask. A task owns one kv head of one sequence, so its dK and dV (summed
// over the kv head's query heads) and each query head's dQ accumulate in its own buffers: no two
// tasks write the same gradient, and the sums run in a fixed order, so the result is deterministic.
//
// Per visited (query block, key block) pair, with P from the forward's lse (never recomputed):
//   S = Q Kᵀ · scale (soft-capped: cap · tanh(Q Kᵀ · scale / cap)), P = exp(S - lse), masked;
//   dV += Pᵀ dO;  dP = dO Vᵀ;  dS = P ∘ (dP - delta), delta = rowsum(dO ∘ O) - dlse;
//   soft-capped: dS ∘= 1 - tanh²;  dQ += dS K · scale;  dK += dSᵀ Q · scale.
#include "cpu/cpu_ops.h"
#include "cpu/head_rows.h"

#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <limits>

#include "tkpy/detail/attention_bwd_index.h"

namespace tkpy::cpu {
namespace {

using attention::AttentionBackwardParams;
using attention::AttentionParams;

template <typename T>
constexpr at::ScalarType kCompute = c10::CppTypeToScalarType<T>::value;

// Keys per block of the walk: the CUDA kernel's at head dims 64 and 128 (it takes 64 at 256).
constexpr int kKeyBlock = 128;
constexpr int kQueryBlock = detail::kBwdQueryBlock;

// One task: kv head `kv_head` of sequence `batch`.
struct BackwardTask {
    const AttentionBackwardParams& bp;
    int batch;
    int kv_head;
    detail::Sequence seq_q;
    detail::Sequence seq_k;

    const AttentionParams& p() const { return bp.fwd; }
    at::ScalarType dtype() const { return scalar_type(p().dtype); }
    int64_t batch_of(int64_t stride) const { return p().cu_seqlens_q != nullptr ? 0 : batch * stride; }

    at::Tensor rows(const void* base, int64_t batch_stride, int64_t token_stride, int64_t head_stride, int head,
                    const detail::Sequence& seq) const {
        return head_rows(base, batch_of(batch_stride), seq.start, token_stride, head * head_stride, dtype())
            .rows(0, seq.len, p().head_dim);
    }
    template <typename T>
    const T* lse_row(const T* base, int head) const {
        return base + batch * p().lse_batch_stride + head * p().lse_head_stride + seq_q.start;
    }
};

// delta_i = rowsum(dO_i ∘ O_i) - dlse_i, in T.
template <typename T>
at::Tensor row_deltas(const BackwardTask& t, int head, const at::Tensor& dout) {
    const AttentionParams& p = t.p();
    const at::Tensor out = t.rows(p.out, p.o_batch_stride, p.o_token_stride, p.o_head_stride, head, t.seq_q);
    at::Tensor delta = at::cpu::sum(at::cpu::mul(dout.to(kCompute<T>), out.to(kCompute<T>)), {1});
    if (dlse_data<T>(t.bp) != nullptr) {
        const T* dlse = t.lse_row(dlse_data<T>(t.bp), head);
        T* d = delta.data_ptr<T>();
        for (int i = 0; i < t.seq_q.len; ++i) d[i] -= dlse[i];
    }
    return delta;
}

// Which queries of the sequence see key j: the kernel's per-key mask.
detail::Range visible_queries(const BackwardTask& t, int head, int j) {
    const AttentionParams& p = t.p();
    const detail::KeyRule rule =
        p.sparse.head_mask_type == nullptr
            ? detail::dense_key_rule(p.window_left, p.window_right)
            : detail::sparse_key_rule(p.sparse.head_mask_type[head], p.sparse.streaming_info[2 * head],
                                      p.sparse.streaming_info[2 * head + 1], p.sparse);
    return rule.queries(j, t.seq_q.len, t.seq_k.len);
}

template <typename T>
void run_task(const BackwardTask& t) {
    const AttentionBackwardParams& bp = t.bp;
    const AttentionParams& p = t.p();
    const int group = p.heads_q / p.heads_kv;
    const int sq = t.seq_q.len;
    const int sk = t.seq_k.len;
    const T scale = softmax_scale_of<T>(p);
    const T softcap = softcap_of<T>(p);
    const bool capped = p.softcap > 0.f;
    const T multiplier = capped ? scale / softcap : scale;
    constexpr at::ScalarType compute = kCompute<T>;

    const at::Tensor k = t.rows(p.k, p.k_batch_stride, p.k_token_stride, p.k_head_stride, t.kv_head, t.seq_k)
                             .to(compute);
    const at::Tensor v = t.rows(p.v, p.v_batch_stride, p.v_token_stride, p.v_head_stride, t.kv_head, t.seq_k)
                             .to(compute);
    at::Tensor dk = at::zeros({sk, p.head_dim}, compute);
    at::Tensor dv = at::zeros({sk, p.head_dim}, compute);
    at::Tensor dq = at::empty({sq, p.head_dim}, compute);
    at::Tensor scores = at::empty({kQueryBlock, kKeyBlock}, compute);
    at::Tensor grad = at::empty({kQueryBlock, kKeyBlock}, compute);

    for (int head = t.kv_head * group; head < (t.kv_head + 1) * group; ++head) {
        const at::Tensor dout_rows =
            t.rows(bp.dout, bp.do_batch_stride, bp.do_token_stride, bp.do_head_stride, head, t.seq_q);
        const at::Tensor q = t.rows(p.q, p.q_batch_stride, p.q_token_stride, p.q_head_stride, head, t.seq_q)
                                 .to(compute);
        const at::Tensor dout = dout_rows.to(compute);
        const at::Tensor delta = row_deltas<T>(t, head, dout_rows);
        const T* lse = t.lse_row(lse_data<T>(p), head);
        const T* deltas = delta.data_ptr<T>();
        dq.zero_();

        for (int n = 0; n * kKeyBlock < sk; ++n) {
            const detail::BwdWalk walk = detail::bwd_walk(n, kKeyBlock, sq, sk, p.window_left, p.window_right,
                                                          p.sparse, t.batch, head);
            const int k0 = n * kKeyBlock;
            const int cols = std::min(kKeyBlock, sk - k0);
            const at::Tensor k_block = k.narrow(0, k0, cols);
            const at::Tensor v_block = v.narrow(0, k0, cols);
            for (int m = walk.candidates.lo; m < walk.candidates.hi; ++m) {
                if (walk.visit_rank(m) < 0) continue;
                const int q0 = m * kQueryBlock;
                const int rows = std::min(kQueryBlock, sq - q0);
                const at::Tensor q_block = q.narrow(0, q0, rows);
                const at::Tensor do_block = dout.narrow(0, q0, rows);
                at::Tensor s = scores.narrow(0, 0, rows).narrow(1, 0, cols);  // S, then P
                at::Tensor ds = grad.narrow(0, 0, rows).narrow(1, 0, cols);   // dP, then dS
                at::cpu::mm_out(s, q_block, k_block.t());
                s.mul_(multiplier);
                at::Tensor tanh;
                if (capped) {
                    tanh = s.tanh();
                    s.copy_(tanh).mul_(softcap);
                }
                T* const ps = s.data_ptr<T>();
                const int64_t stride = s.stride(0);
                for (int c = 0; c < cols; ++c) {  // P = exp(S - lse) where the key is seen, else 0
                    const detail::Range seen = visible_queries(t, head, k0 + c);
                    for (int r = 0; r < rows; ++r) {
                        const int i = q0 + r;
                        T& x = ps[r * stride + c];
                        x = i >= seen.lo && i < seen.hi ? std::exp(x - lse[i]) : T(0);
                    }
                }
                at::Tensor dv_block = dv.narrow(0, k0, cols);
                at::cpu::addmm_out(dv_block, dv_block, s.t(), do_block);
                at::cpu::mm_out(ds, do_block, v_block.t());
                T* const pds = ds.data_ptr<T>();
                const T* const ptanh = capped ? tanh.data_ptr<T>() : nullptr;
                for (int r = 0; r < rows; ++r) {
                    for (int c = 0; c < cols; ++c) {
                        const int64_t at = r * stride + c;
                        T g = ps[at] * (pds[at] - deltas[q0 + r]);
                        if (capped) g *= T(1) - ptanh[int64_t(r) * cols + c] * ptanh[int64_t(r) * cols + c];
                        pds[at] = g;
                    }
                }
                at::Tensor dq_block = dq.narrow(0, q0, rows);
                at::cpu::addmm_out(dq_block, dq_block, ds, k_block);
                at::Tensor dk_block = dk.narrow(0, k0, cols);
                at::cpu::addmm_out(dk_block, dk_block, ds.t(), q_block);
            }
        }
        t.rows(bp.dq, bp.dq_batch_stride, bp.dq_token_stride, bp.dq_head_stride, head, t.seq_q).copy_(dq.mul_(scale));
    }
    t.rows(bp.dk, bp.dk_batch_stride, bp.dk_token_stride, bp.dk_head_stride, t.kv_head, t.seq_k).copy_(dk.mul_(scale));
    t.rows(bp.dv, bp.dv_batch_stride, bp.dv_token_stride, bp.dv_head_stride, t.kv_head, t.seq_k).copy_(dv);
}

template <typename T>
void backward(const AttentionBackwardParams& params) {
    const AttentionParams& p = params.fwd;
    // Grain 1: a task is a kv head's whole backward over one sequence.
    at::parallel_for(0, int64_t(p.batch) * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
        for (int64_t index = begin; index < end; ++index) {
            const int batch = int(index / p.heads_kv);
            const BackwardTask task{params, batch, int(index % p.heads_kv),
                                    detail::sequence(p.cu_seqlens_q, batch, p.seqlen_q, p.total_q),
                                    detail::sequence(p.cu_seqlens_k, batch, p.seqlen_k, p.total_k)};
            run_task<T>(task);
        }
    });
}

}  // namespace

void attention_backward(const AttentionBackwardParams& params) {
    if (params.fwd.dtype == DType::fp64) {
        backward<double>(params);
    } else {
        backward<float>(params);
    }
}

}  // namespace tkpy::cpu
