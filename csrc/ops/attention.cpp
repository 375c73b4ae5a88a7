// Binding of dense attention forward: validation, output allocation, CPU or CUDA dispatch.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>

#include "cpu/cpu_ops.h"
#include "ops/ops.h"
#include "ops/validate.h"
#include "tkpy/attention.h"
#include "tkpy/detail/block_sparse_index.h"

#if defined(TKPY_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace tkpy::ops {

namespace {
// set_attention_kernel's choice; automatic: the environment's.
std::atomic<int> kernel_override{int(attention::Kernel::automatic)};
}  // namespace

attention::Kernel set_attention_kernel(attention::Kernel kernel) {
    return attention::Kernel(kernel_override.exchange(int(kernel)));
}

attention::Kernel selected_attention_kernel() {
    attention::Kernel kernel;
    TORCH_CHECK_VALUE(attention::resolve_kernel(attention::Kernel(kernel_override.load()), &kernel),
                      "TKPY_ATTENTION_KERNEL must be 'baseline' or 'pipelined' (or unset, for 'pipelined'), got '",
                      attention::kernel_environment(), "'");
    return kernel;
}

namespace {

constexpr const char* kOp = "attention_forward";

void check_qkv_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q, int64_t dims) {
    check_same_device(op, name, t, q);
    const at::ScalarType dtype = t.scalar_type();
    const bool half = dtype == at::kBFloat16 || dtype == at::kHalf;
    // The CPU path computes in float32 or, for float64 inputs, float64 (gradcheck runs through it).
    if (t.is_cuda()) {
        TORCH_CHECK_VALUE(half, op, ": expected ", name, " to be bfloat16 or float16 on CUDA, got ", dtype,
                          " (float32 and float64 are taken on the CPU only)");
    } else {
        TORCH_CHECK_VALUE(half || dtype == at::kFloat || dtype == at::kDouble, op, ": expected ", name,
                          " to be bfloat16, float16, float32 or float64, got ", dtype);
    }
    TORCH_CHECK_VALUE(dtype == q.scalar_type(), op, ": expected ", name, " to have q's dtype ", q.scalar_type(),
                      ", got ", dtype);
    TORCH_CHECK_VALUE(t.dim() == dims, op, ": expected ", name, " to be ", dims, "-D (",
                      dims == 4 ? "[batch, seqlen, heads, head_dim]" : "[total_tokens, heads, head_dim]", "), got ",
                      t.sizes());
    TORCH_CHECK_VALUE(t.size(-1) == 64 || t.size(-1) == 128 || t.size(-1) == 256, op, ": expected ", name,
                      " with head_dim 64, 128 or 256, got ", t.size(-1));
    check_last_dim_contiguous(op, name, t);
    check_sizes_fit_int(op, name, t);
    TORCH_CHECK_VALUE(address_of(t) % 16 == 0 || t.numel() == 0, op, ": expected ", name,
                      " to start on a 16-byte boundary (TMA's rule); got a view at an odd offset, call .contiguous()");
    // TMA moves rows of 16-byte units: every stride must be a whole number of them.
    for (int d = 0; d < dims - 1; ++d) {
        TORCH_CHECK_VALUE(t.stride(d) % 8 == 0 || t.size(d) <= 1, op, ": expected ", name,
                          "'s strides to be multiples of 8 elements, got ", t.strides());
    }
}

void check_cu_seqlens(const char* op, const char* name, const at::Tensor& cu, const at::Tensor& q, int64_t batch, int64_t total,
                      int64_t max_seqlen) {
    check_same_device(op, name, cu, q);
    TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.is_contiguous() && cu.numel() >= 1, op,
                      ": expected ", name, " to be a contiguous 1-D int32 tensor of batch + 1 >= 1 entries, got ",
                      cu.scalar_type(), " ", cu.sizes());
    check_sizes_fit_int(op, name, cu);
    TORCH_CHECK_VALUE(cu.numel() == batch + 1, op, ": expected ", name, " of length batch + 1 = ", batch + 1, ", got ",
                      cu.numel());
    if (!values_checked(cu)) return;
    const at::Tensor host = host_values(cu);
    const int32_t* v = host.data_ptr<int32_t>();
    TORCH_CHECK_VALUE(v[0] == 0 && v[batch] == total, op, ": ", name, " must start at 0 and end at the packed length ",
                      total, ", got ", v[0], " .. ", v[batch]);
    for (int64_t b = 0; b < batch; ++b) {
        TORCH_CHECK_VALUE(v[b + 1] >= v[b] && v[b + 1] - v[b] <= max_seqlen, op, ": ", name, " entry ", b,
                          " gives a sequence of ", v[b + 1] - v[b], " tokens; lengths must be in [0, max_seqlen=",
                          max_seqlen, "]");
    }
}

// An attention tensor's batch, token and head strides (elements): [batch, tokens, heads, D], or
// varlen [tokens, heads, D] with batch stride 0.
void token_strides(const at::Tensor& t, bool varlen, int64_t& batch, int64_t& token, int64_t& head) {
    const int first = varlen ? 0 : 1;  // index of the token dim
    batch = varlen ? 0 : t.stride(0);
    token = t.stride(first);
    head = t.stride(first + 1);
}

struct Prepared {
    attention::AttentionParams params;
    at::Tensor out;
    at::Tensor lse;
};

// softmax_lse's dtype (and its gradient's): float32, or float64 for float64 inputs, which the CPU
// path computes in.
at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

const char* lse_dtype_name(at::ScalarType lse_dtype) { return lse_dtype == at::kDouble ? "float64" : "float32"; }

// The forward's out (like q) and lse (lse_dtype, contiguous, `lse_shape`): new, or given and checked.
at::Tensor outputs(const char* op, const at::Tensor& q, const at::Tensor* given_out, const at::Tensor* given_lse,
                   at::IntArrayRef lse_shape, at::Tensor& out) {
    if (given_out == nullptr) {
        out = at::empty(q.sizes(), q.options());
        return at::empty(lse_shape, q.options().dtype(lse_dtype(q)));
    }
    check_qkv_tensor(op, "out", *given_out, q, q.dim());
    TORCH_CHECK_VALUE(given_out->sizes() == q.sizes(), op, ": expected out (the forward's output) of q's shape ",
                      q.sizes(), ", got ", given_out->sizes());
    check_same_device(op, "softmax_lse", *given_lse, q);
    TORCH_CHECK_VALUE(given_lse->scalar_type() == lse_dtype(q) && given_lse->is_contiguous() &&
                          given_lse->sizes() == lse_shape,
                      op, ": expected softmax_lse (the forward's) as a contiguous ", lse_dtype_name(lse_dtype(q)),
                      " tensor ", lse_shape, ", got ", given_lse->scalar_type(), " ", given_lse->sizes());
    out = *given_out;
    return *given_lse;
}

// The params of a forward call. Its out and lse are allocated, or for the backward the forward's,
// which must have the shapes it would have allocated.
Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                 int64_t max_seqlen_q, int64_t max_seqlen_k, std::optional<double> softmax_scale, int64_t window_left,
                 int64_t window_right, double softcap, const at::Tensor* given_out = nullptr,
                 const at::Tensor* given_lse = nullptr) {
    const bool varlen = cu_seqlens_q.has_value() || cu_seqlens_k.has_value();
    TORCH_CHECK_VALUE(!varlen || (cu_seqlens_q.has_value() && cu_seqlens_k.has_value()), op,
                      ": pass both cu_seqlens_q and cu_seqlens_k, or neither");
    const int64_t dims = varlen ? 3 : 4;
    check_qkv_tensor(op, "q", q, q, dims);
    check_qkv_tensor(op, "k", k, q, dims);
    check_qkv_tensor(op, "v", v, q, dims);
    TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": expected k and v of one shape, got ", k.sizes(), " and ",
                      v.sizes());
    const int64_t head_dim = q.size(-1);
    TORCH_CHECK_VALUE(head_dim == 64 || head_dim == 128 || head_dim == 256, op,
                      ": expected head_dim 64, 128 or 256, got ", head_dim);
    TORCH_CHECK_VALUE(k.size(-1) == head_dim, op, ": expected k and v with q's head_dim ", head_dim, ", got ",
                      k.size(-1));
    const int64_t heads_q = q.size(-2);
    const int64_t heads_kv = k.size(-2);
    TORCH_CHECK_VALUE(heads_kv > 0 && heads_q % heads_kv == 0, op, ": expected q's heads (", heads_q,
                      ") to be a multiple of k/v's heads (", heads_kv, ") for GQA/MQA");
    TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, op, ": window sizes must be >= -1, got (", window_left,
                      ", ", window_right, ")");
    check_softcap(op, softcap);
    const double scale = checked_softmax_scale(op, softmax_scale, head_dim);

    Prepared prep;
    attention::AttentionParams& p = prep.params;
    if (varlen) {
        const int64_t batch = cu_seqlens_q->numel() - 1;
        check_int_range(op, "max_seqlen_q", max_seqlen_q, 0, kMaxIndex);
        check_int_range(op, "max_seqlen_k", max_seqlen_k, 0, kMaxIndex);
        check_cu_seqlens(op, "cu_seqlens_q", *cu_seqlens_q, q, batch, q.size(0), max_seqlen_q);
        check_cu_seqlens(op, "cu_seqlens_k", *cu_seqlens_k, q, batch, k.size(0), max_seqlen_k);
        p.batch = int(batch);
        // A loose bound is allowed, as in flash-attn; past the packed tokens it is clamped, since
        // no sequence is longer (and the work is sized by it).
        p.seqlen_q = int(std::min(max_seqlen_q, q.size(0)));
        p.seqlen_k = int(std::min(max_seqlen_k, k.size(0)));
        p.cu_seqlens_q = data_of<int32_t>(*cu_seqlens_q);
        p.cu_seqlens_k = data_of<int32_t>(*cu_seqlens_k);
        p.total_q = q.size(0);
        p.total_k = k.size(0);
        prep.lse = outputs(op, q, given_out, given_lse, {heads_q, q.size(0)}, prep.out);
        p.lse_batch_stride = 0;
        p.lse_head_stride = q.size(0);
    } else {
        TORCH_CHECK_VALUE(k.size(0) == q.size(0), op, ": expected k and v with q's batch ", q.size(0), ", got ",
                          k.size(0));
        p.batch = int(q.size(0));
        p.seqlen_q = int(q.size(1));
        p.seqlen_k = int(k.size(1));
        prep.lse = outputs(op, q, given_out, given_lse, {q.size(0), heads_q, q.size(1)}, prep.out);
        p.lse_batch_stride = heads_q * q.size(1);
        p.lse_head_stride = q.size(1);
    }
    token_strides(q, varlen, p.q_batch_stride, p.q_token_stride, p.q_head_stride);
    token_strides(k, varlen, p.k_batch_stride, p.k_token_stride, p.k_head_stride);
    token_strides(v, varlen, p.v_batch_stride, p.v_token_stride, p.v_head_stride);
    token_strides(prep.out, varlen, p.o_batch_stride, p.o_token_stride, p.o_head_stride);
    p.q = data_of(q);
    p.k = data_of(k);
    p.v = data_of(v);
    p.out = data_of(prep.out);
    if (prep.lse.scalar_type() == at::kDouble) {
        p.lse_fp64 = data_of<double>(prep.lse);
    } else {
        p.lse = data_of<float>(prep.lse);
    }
    p.heads_q = int(heads_q);
    p.heads_kv = int(heads_kv);
    p.head_dim = int(head_dim);
    p.softmax_scale = float(scale);
    p.softcap = float(softcap);
    p.softmax_scale_fp64 = scale;
    p.softcap_fp64 = softcap;
    p.window_left = clamp_window(window_left);
    p.window_right = clamp_window(window_right);
    p.dtype = to_dtype(q.scalar_type());
    return prep;
}

constexpr const char* kSparseOp = "block_sparse_attention_forward";

void check_int32_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q, int64_t length) {
    check_same_device(op, name, t, q);
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous() && t.numel() == length,
                      op,
                      ": expected ", name, " to be a contiguous int32 vector of length ", length, ", got ", t.scalar_type(),
                      " ", t.sizes());
}

// What the plan walk relies on: head types in {-1, 0, 1}, window sizes >= 0, block-sparse heads
// numbered 0, 1, ... in head order (one list each), the others -1.
void check_head_values(const char* op, int64_t heads, const at::Tensor& head_mask_type, const at::Tensor& streaming_info,
                       const at::Tensor& sparse_index, int n_lists) {
    const at::Tensor types_host = host_values(head_mask_type);
    const at::Tensor info_host = host_values(streaming_info);
    const at::Tensor index_host = host_values(sparse_index);
    const int32_t* types = types_host.data_ptr<int32_t>();
    const int32_t* info = info_host.data_ptr<int32_t>();
    const int32_t* index = index_host.data_ptr<int32_t>();
    int n_sparse = 0;
    for (int64_t h = 0; h < heads; ++h) {
        TORCH_CHECK_VALUE(types[h] >= -1 && types[h] <= 1, op, ": head_mask_type[", h, "] = ", types[h],
                          " is not -1 (streaming), 0 (dense) or 1 (block-sparse)");
        TORCH_CHECK_VALUE(info[2 * h] >= 0 && info[2 * h + 1] >= 0, op, ": streaming_info of head ", h,
                          " must be >= 0, got (", info[2 * h], ", ", info[2 * h + 1], ")");
        TORCH_CHECK_VALUE(index[h] == (types[h] == 1 ? n_sparse : -1), op,
                          ": sparse_index must number the block-sparse heads 0, 1, ... in head order and be -1 elsewhere");
        n_sparse += types[h] == 1;
    }
    TORCH_CHECK_VALUE(n_sparse == n_lists, op, ": ", n_sparse,
                      " heads are block-sparse (head_mask_type 1) but there are ", n_lists,
                      " block lists (base_blockmask's dim 1; the streaming functions take none)");
}

// Each list's first block_counts entries are distinct key blocks in ascending order (the plan of a
// mask): a count past the list or a block listed twice would read past it or count a block twice.
void check_block_lists(const char* op, const at::Tensor& block_indices, const at::Tensor& block_counts) {
    const at::Tensor indices_host = host_values(block_indices);
    const at::Tensor counts_host = host_values(block_counts);
    const int32_t* indices = indices_host.data_ptr<int32_t>();
    const int32_t* counts = counts_host.data_ptr<int32_t>();
    const int64_t key_blocks = block_indices.size(3);
    for (int64_t row = 0; row < block_counts.numel(); ++row) {
        const int64_t b = row / (block_counts.size(1) * block_counts.size(2));
        const int64_t list = row / block_counts.size(2) % block_counts.size(1);
        const int64_t qb = row % block_counts.size(2);
        TORCH_CHECK_VALUE(counts[row] >= 0 && counts[row] <= key_blocks, op, ": block_counts[", b, ", ", list,
                          ", ", qb, "] = ", counts[row], " is outside [0, ", key_blocks,
                          "] (block_indices' last dim, the key blocks)");
        const int32_t* blocks = indices + row * key_blocks;
        for (int32_t n = 0; n < counts[row]; ++n) {
            TORCH_CHECK_VALUE(blocks[n] >= 0 && blocks[n] < key_blocks && (n == 0 || blocks[n] > blocks[n - 1]),
                              op, ": block_indices[", b, ", ", list, ", ", qb,
                              "] must start with block_counts = ", counts[row],
                              " distinct key blocks in ascending order, each in [0, ", key_blocks, "); entry ", n,
                              " is ", blocks[n]);
        }
    }
}

// Dense-attention preparation plus LServe's per-head types and block lists (varlen only).
Prepared prepare_sparse(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const at::Tensor& head_mask_type,
                        const at::Tensor& streaming_info, const at::Tensor& sparse_index,
                        int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& block_indices,
                        const std::optional<at::Tensor>& block_counts, std::optional<double> softmax_scale,
                        bool is_causal, bool exact_streaming, const at::Tensor* given_out = nullptr,
                        const at::Tensor* given_lse = nullptr) {
    Prepared prep = prepare(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                            -1, is_causal ? 0 : -1, 0.0, given_out, given_lse);
    TORCH_CHECK_VALUE(is_causal || !exact_streaming, op,
                      ": exact_streaming=True requires is_causal=True (token streaming is causal; Block-Sparse-Attention "
                      "refuses it too)");
    const int64_t heads = q.size(1);
    check_int32_vector(op, "head_mask_type", head_mask_type, q, heads);
    check_int32_vector(op, "streaming_info", streaming_info, q, 2 * heads);
    check_int32_vector(op, "sparse_index", sparse_index, q, heads);
    detail::SparseHeads& sp = prep.params.sparse;
    sp.head_mask_type = data_of<int32_t>(head_mask_type);
    sp.streaming_info = data_of<int32_t>(streaming_info);
    sp.sparse_index = data_of<int32_t>(sparse_index);
    sp.causal = is_causal;
    sp.exact_streaming = exact_streaming;
    sp.mask_q_blocks = int(detail::ceil_blocks(int(max_seqlen_q)));
    sp.mask_k_blocks = int(detail::ceil_blocks(int(max_seqlen_k)));
    TORCH_CHECK_VALUE(block_indices.has_value() == block_counts.has_value(), op,
                      ": pass both block_indices and block_counts, or neither");
    if (block_indices.has_value()) {
        const at::Tensor& idx = *block_indices;
        const at::Tensor& cnt = *block_counts;
        const int64_t batch = prep.params.batch;
        check_same_device(op, "block_indices", idx, q);
        check_same_device(op, "block_counts", cnt, q);
        TORCH_CHECK_VALUE(idx.scalar_type() == at::kInt && idx.dim() == 4 && idx.is_contiguous() && idx.size(0) == batch &&
                        idx.size(2) == sp.mask_q_blocks && idx.size(3) == sp.mask_k_blocks,
                          op, ": expected block_indices (the plan of base_blockmask) int32 [batch=", batch,
                          ", n_sparse, ceil(max_seqlen_q/128)=", sp.mask_q_blocks, ", ceil(max_seqlen_k/128)=",
                          sp.mask_k_blocks, "], got ", idx.scalar_type(), " ", idx.sizes());
        TORCH_CHECK_VALUE(cnt.scalar_type() == at::kInt && cnt.is_contiguous() &&
                        cnt.sizes() == at::IntArrayRef({idx.size(0), idx.size(1), idx.size(2)}),
                          op, ": expected block_counts int32 ", idx.sizes().slice(0, 3), ", got ", cnt.sizes());
        sp.n_sparse = int(idx.size(1));
        sp.block_indices = data_of<int32_t>(idx);
        sp.block_counts = data_of<int32_t>(cnt);
    }
    if (values_checked(head_mask_type)) {
        check_head_values(op, heads, head_mask_type, streaming_info, sparse_index, sp.n_sparse);
        if (block_indices.has_value()) check_block_lists(op, *block_indices, *block_counts);
    }
    return prep;
}

// CPU, CUDA and Meta (torch.compile's fake tensors: the same checks, no launch) share one path.
std::tuple<at::Tensor, at::Tensor> run(const char* op, Prepared prep, const at::Tensor& q) {
    if (q.is_cuda()) prep.params.kernel = selected_attention_kernel();
    if (q.is_cpu()) {
        cpu::attention_forward(prep.params);
    } else if (q.is_cuda()) {
#if defined(TKPY_WITH_CUDA)
        const c10::cuda::CUDAGuard guard(q.device());
        check_launch(op, attention::launch_attention_forward(prep.params, c10::cuda::getCurrentCUDAStream()));
#endif
    }
    return {prep.out, prep.lse};
}

// The backward of a prepared forward: checks dout (and dlse), allocates the gradients (dq like q,
// dk and dv like k, contiguous) and runs the CPU path or the CUDA launch with its workspace.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const char* op, const Prepared& prep, const at::Tensor& dout,
                                                            const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                                                            const at::Tensor& k, bool deterministic) {
    check_qkv_tensor(op, "dout", dout, q, q.dim());
    TORCH_CHECK_VALUE(dout.sizes() == q.sizes(), op, ": expected dout of q's shape ", q.sizes(), ", got ", dout.sizes());
    if (dlse.has_value()) {
        check_same_device(op, "dlse", *dlse, q);
        TORCH_CHECK_VALUE(dlse->scalar_type() == prep.lse.scalar_type() && dlse->is_contiguous() &&
                              dlse->sizes() == prep.lse.sizes(),
                          op, ": expected dlse as a contiguous ", lse_dtype_name(prep.lse.scalar_type()),
                          " tensor of softmax_lse's dtype and shape ", prep.lse.sizes(), ", got ",
                          dlse->scalar_type(), " ", dlse->sizes());
    }
    attention::AttentionBackwardParams bp;
    bp.fwd = prep.params;
    bp.deterministic = deterministic;
    const bool varlen = bp.fwd.cu_seqlens_q != nullptr;
    // Varlen: packed tokens outside every sequence (unchecked cu_seqlens on CUDA) belong to no
    // task, so their gradient is written as 0 here rather than left uninitialised.
    const auto gradient = [&](const at::Tensor& like) {
        return varlen ? at::zeros(like.sizes(), like.options()) : at::empty(like.sizes(), like.options());
    };
    const at::Tensor dq = gradient(q);
    const at::Tensor dk = gradient(k);
    const at::Tensor dv = gradient(k);
    token_strides(dout, varlen, bp.do_batch_stride, bp.do_token_stride, bp.do_head_stride);
    token_strides(dq, varlen, bp.dq_batch_stride, bp.dq_token_stride, bp.dq_head_stride);
    token_strides(dk, varlen, bp.dk_batch_stride, bp.dk_token_stride, bp.dk_head_stride);
    token_strides(dv, varlen, bp.dv_batch_stride, bp.dv_token_stride, bp.dv_head_stride);
    bp.dout = data_of(dout);
    if (dlse.has_value() && dlse->scalar_type() == at::kDouble) {
        bp.dlse_fp64 = data_of<double>(*dlse);
    } else if (dlse.has_value()) {
        bp.dlse = data_of<float>(*dlse);
    }
    bp.dq = data_of(dq);
    bp.dk = data_of(dk);
    bp.dv = data_of(dv);
    if (q.is_cpu()) {
        cpu::attention_backward(bp);
    } else if (q.is_cuda()) {
#if defined(TKPY_WITH_CUDA)
        const c10::cuda::CUDAGuard guard(q.device());
        const attention::AttentionBackwardWorkspace sizes = attention::attention_backward_workspace(bp.fwd, deterministic);
        const at::Tensor stats = at::empty({2, sizes.row_stats}, q.options().dtype(at::kFloat));
        const at::Tensor dq_accum = at::empty({sizes.dq_accum}, q.options().dtype(at::kFloat));
        const at::Tensor counters = at::empty({sizes.dq_semaphore + sizes.ascending_counts}, q.options().dtype(at::kInt));
        bp.lse_log2 = data_of<float>(stats);
        bp.delta = bp.lse_log2 + sizes.row_stats;
        bp.dq_accum = data_of<float>(dq_accum);
        bp.dq_semaphore = deterministic ? data_of<int32_t>(counters) : nullptr;
        bp.ascending_counts = data_of<int32_t>(counters) + sizes.dq_semaphore;
        check_launch(op, attention::launch_attention_backward(bp, c10::cuda::getCurrentCUDAStream()));
#endif
    }
    return {dq, dk, dv};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& softmax_lse, const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    std::optional<double> softmax_scale, int64_t window_left, int64_t window_right, double softcap,
    bool deterministic) {
    constexpr const char* op = "attention_backward";
    const Prepared prep = prepare(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                  window_left, window_right, softcap, &out, &softmax_lse);
    return run_backward(op, prep, dout, dlse, q, k, deterministic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& softmax_lse, const std::optional<at::Tensor>& dlse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const at::Tensor& head_mask_type, const at::Tensor& streaming_info,
    const at::Tensor& sparse_index, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& block_indices, const std::optional<at::Tensor>& block_counts,
    std::optional<double> softmax_scale, bool is_causal, bool exact_streaming, bool deterministic) {
    constexpr const char* op = "block_sparse_attention_backward";
    const Prepared prep = prepare_sparse(op, q, k, v, cu_seqlens_q, cu_seqlens_k, head_mask_type, streaming_info,
                                         sparse_index, max_seqlen_q, max_seqlen_k, block_indices, block_counts,
                                         softmax_scale, is_causal, exact_streaming, &out, &softmax_lse);
    return run_backward(op, prep, dout, dlse, q, k, deterministic);
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& cu_seqlens_q,
                                                     const std::optional<at::Tensor>& cu_seqlens_k,
                                                     int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                     std::optional<double> softmax_scale, int64_t window_left,
                                                     int64_t window_right, double softcap, bool /*deterministic*/) {
    return run(kOp,
               prepare(kOp, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                       window_right, softcap),
               q);
}

namespace {

constexpr const char* kDecayOp = "ultravico_attention_forward";

// UltraViCo's settings, checked and turned into tokens (tkpy/detail/ultravico_index.h): every
// product the index math forms must fit in int32, the factors must be in [0, 1] (a decay: the
// kernels compute it as a min), and the band count stays small enough to test tile by tile.
detail::Decay checked_decay(int64_t tokens_per_frame, int64_t train_frames, double alpha, double beta,
                            int64_t band_period, int64_t band_width, int64_t band_count, bool first_frame_mask,
                            int64_t text_tokens) {
    const char* op = kDecayOp;
    check_int_range(op, "tokens_per_frame", tokens_per_frame, 1, kMaxIndex);
    check_int_range(op, "train_frames", train_frames, 1, kMaxIndex / tokens_per_frame);
    TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, op, ": expected alpha in [0, 1] (a decay), got ", alpha);
    TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, op, ": expected beta in [0, 1] (a decay), got ", beta);
    check_int_range(op, "band_count", band_count, 0, 64);
    check_int_range(op, "text_tokens", text_tokens, 0, kMaxIndex);
    detail::Decay d{};
    d.enabled = true;
    d.frame_tokens = int(tokens_per_frame);
    d.window_edge = int(train_frames * tokens_per_frame / 2 + 1);
    d.first_frame_keys = first_frame_mask ? int(train_frames * tokens_per_frame) : -1;
    d.alpha = float(alpha);
    d.beta = float(beta);
    d.text_tokens = int(text_tokens);
    if (band_count > 0) {
        check_int_range(op, "band_period", band_period, 1, kMaxIndex);
        check_int_range(op, "band_width", band_width, 0, kMaxIndex);
        // The last band ends at (band_period · band_count + band_width) frames.
        TORCH_CHECK_VALUE(band_period <= (kMaxIndex / tokens_per_frame - band_width) / band_count, op,
                          ": the bands reach (band_period * band_count + band_width) * tokens_per_frame = (",
                          band_period, " * ", band_count, " + ", band_width, ") * ", tokens_per_frame,
                          " tokens, more than int32 indices address");
        d.band_count = int(band_count);
        d.band_period = int(band_period * tokens_per_frame);
        d.band_half_width = int(band_width * tokens_per_frame);
    }
    return d;
}

// k̄ of each (sequence, kv head), fp32 [batch, heads_kv, head_dim]: on the CPU from ATen sums, on
// CUDA by launch_key_mean on the current stream (no host sync). Nothing on Meta.
at::Tensor key_mean(const attention::AttentionParams& p, const at::Tensor& k) {
    at::Tensor mean = at::empty({p.batch, p.heads_kv, p.head_dim}, k.options().dtype(at::kFloat));
    if (k.is_cpu()) {
        const bool varlen = p.cu_seqlens_k != nullptr;
        for (int b = 0; b < p.batch; ++b) {
            const detail::Sequence seq = detail::sequence(p.cu_seqlens_k, b, p.seqlen_k, p.total_k);
            const at::Tensor keys = varlen ? k.narrow(0, seq.start, seq.len) : k[b];  // [len, heads_kv, D]
            if (seq.len == 0) {
                mean[b].zero_();
            } else {
                mean[b].copy_(at::sum(keys, {0}, false, at::kFloat).div_(seq.len));
            }
        }
    } else if (k.is_cuda()) {
#if defined(TKPY_WITH_CUDA)
        TORCH_CHECK_VALUE(p.batch <= 65535 && p.heads_kv <= 65535, kDecayOp,
                          ": on CUDA at most 65535 sequences and 65535 kv heads, got ", p.batch, " and ", p.heads_kv);
        const c10::cuda::CUDAGuard guard(k.device());
        const at::Tensor workspace = at::empty({attention::key_mean_workspace(p)}, k.options().dtype(at::kFloat));
        check_launch(kDecayOp, attention::launch_key_mean(p, data_of<float>(workspace), data_of<float>(mean),
                                                          c10::cuda::getCurrentCUDAStream()));
#endif
    }
    return mean;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ultravico_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    std::optional<double> softmax_scale, int64_t tokens_per_frame, int64_t train_frames, double alpha, double beta,
    int64_t band_period, int64_t band_width, int64_t band_count, bool first_frame_mask, int64_t text_tokens) {
    TORCH_CHECK_VALUE(q.scalar_type() != at::kDouble, kDecayOp,
                      ": expected q in bfloat16 or float16 (float32 on the CPU), got float64");
    Prepared prep = prepare(kDecayOp, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                            -1, -1, 0.0);
    const detail::Decay decay = checked_decay(tokens_per_frame, train_frames, alpha, beta, band_period, band_width,
                                              band_count, first_frame_mask, text_tokens);
    prep.params.decay = decay;
    if (!cu_seqlens_q.has_value()) {  // varlen sequences are too short for their text where they are
        TORCH_CHECK_VALUE(text_tokens <= std::min(q.size(1), k.size(1)), kDecayOp, ": expected text_tokens (",
                          text_tokens, ") at most the sequence lengths (", q.size(1), " queries, ", k.size(1), " keys)");
    }
    // Kept alive until the launch is enqueued; the caching allocator orders its reuse on the stream.
    const at::Tensor mean = key_mean(prep.params, k);
    prep.params.decay.key_mean = data_of<float>(mean);
    return run(kDecayOp, prep, q);
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const at::Tensor& head_mask_type, const at::Tensor& streaming_info,
    const at::Tensor& sparse_index, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& block_indices, const std::optional<at::Tensor>& block_counts,
    std::optional<double> softmax_scale, bool is_causal, bool exact_streaming, bool /*deterministic*/) {
    return run(kSparseOp,
               prepare_sparse(kSparseOp, q, k, v, cu_seqlens_q, cu_seqlens_k, head_mask_type, streaming_info,
                              sparse_index, max_seqlen_q, max_seqlen_k, block_indices, block_counts, softmax_scale,
                              is_causal, exact_streaming),
               q);
}

}  // namespace tkpy::ops
