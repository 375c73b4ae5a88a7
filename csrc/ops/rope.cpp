// Bindings of the RoPE ops: validate every input once, fill the torch-free params struct, dispatch
// to the CPU implementation or the CUDA launcher.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>
#include <utility>
#include <optional>

#include "cpu/cpu_ops.h"
#include "ops/ops.h"
#include "ops/validate.h"
#include "tkpy/rope.h"

#if defined(TKPY_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace tkpy::ops {
namespace {

// head_dim <= 512 keeps a token's angle row within the kernel's shared-memory row.
constexpr int64_t kMaxHeadDim = 512;

using rope::RopeTensors;
using rope::RotatedTensor;

// q as [B, S, H, D] (or [T, H, D], seen as B = 1) and the optional k beside it.
RopeTensors rope_tensors(const char* op, const at::Tensor& q, const std::optional<at::Tensor>& k, int64_t rotary_dim,
                         bool allow_3d_q) {
    check_float_dtype(op, "q", q);
    TORCH_CHECK_VALUE(q.dim() == 4 || (allow_3d_q && q.dim() == 3), op, ": expected q of shape ",
                      allow_3d_q ? "[B, S, H, D] or [T, H, D]" : "[B, S, H, D]", ", got ", q.sizes());
    check_last_dim_contiguous(op, "q", q);
    check_no_internal_overlap(op, "q", q);
    check_sizes_fit_int(op, "q", q);
    const int64_t head_dim = q.size(-1);
    TORCH_CHECK_VALUE(head_dim <= kMaxHeadDim, op, ": expected head_dim <= ", kMaxHeadDim, ", got ", head_dim);
    TORCH_CHECK_VALUE(rotary_dim % 2 == 0 && rotary_dim <= head_dim, op, ": expected an even rotary dim (twice cos/sin's columns, or the freqs tables' dims together) <= head_dim ",
                      head_dim, ", got ", rotary_dim);

    const bool batched = q.dim() == 4;
    const auto describe = [&](const at::Tensor& t) {
        return RotatedTensor{data_of(t), batched ? t.stride(0) : 0, t.stride(-3), t.stride(-2),
                             static_cast<int>(t.size(-2))};
    };
    RopeTensors x;
    x.q = describe(q);
    x.dtype = to_dtype(q.scalar_type());
    x.batch = batched ? q.size(0) : 1;
    x.seqlen = q.size(-3);
    x.head_dim = static_cast<int>(head_dim);
    x.rotary_dim = static_cast<int>(rotary_dim);
    if (k.has_value()) {
        const at::Tensor& kt = *k;
        check_same_device(op, "k", kt, q);
        TORCH_CHECK_VALUE(kt.scalar_type() == q.scalar_type(), op, ": expected k to have q's dtype ", q.scalar_type(),
                          ", got ", kt.scalar_type());
        TORCH_CHECK_VALUE(kt.dim() == q.dim() && kt.size(-1) == head_dim && kt.size(-3) == q.size(-3) &&
                        (!batched || kt.size(0) == q.size(0)),
                          op, ": expected k with q's token dims and head_dim (q ", q.sizes(), "), got ", kt.sizes());
        check_last_dim_contiguous(op, "k", kt);
        check_no_internal_overlap(op, "k", kt);
        check_sizes_fit_int(op, "k", kt);
        // q and k sliced out of one qkv buffer are fine; an element in both would be rotated twice.
        check_not_aliased(op, "q", q, "k", kt);
        x.k = describe(kt);
    }
    return x;
}

// q and k are rotated in place: the tables they are rotated with must not be part of them.
void check_tables_not_rotated(const char* op, const at::Tensor& q, const std::optional<at::Tensor>& k,
                              std::initializer_list<std::pair<const char*, const at::Tensor*>> tables) {
    for (const auto& [name, table] : tables) {
        if (table == nullptr) continue;
        check_not_aliased(op, "q", q, name, *table);
        if (k.has_value()) check_not_aliased(op, "k", *k, name, *table);
    }
}

rope::Rope1dParams rope_1d_params(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                                  const at::Tensor& sin, const std::optional<at::Tensor>& positions, bool interleaved) {
    constexpr const char* op = "apply_rope_";
    for (const auto& [name, table] : {std::pair{"cos", &cos}, std::pair{"sin", &sin}}) {
        check_same_device(op, name, *table, q);
        TORCH_CHECK_VALUE(table->dim() == 2, op, ": expected ", name, " of shape [max_pos, rotary_dim/2], got ",
                          table->sizes());
        TORCH_CHECK_VALUE(table->scalar_type() == at::kFloat || table->scalar_type() == q.scalar_type(), op,
                          ": expected ",
                          name, " to be float32 or q's dtype ", q.scalar_type(), ", got ", table->scalar_type());
        check_last_dim_contiguous(op, name, *table);
    }
    TORCH_CHECK_VALUE(cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type(), op,
                      ": expected cos and sin of one shape and dtype, got ", cos.sizes(), " ", cos.scalar_type(), " and ",
                      sin.sizes(), " ", sin.scalar_type());
    TORCH_CHECK_VALUE(cos.size(1) >= 1, op, ": expected cos/sin with at least one column, got ", cos.sizes());

    rope::Rope1dParams p;
    p.x = rope_tensors(op, q, k, 2 * cos.size(1), /*allow_3d_q=*/true);
    check_tables_not_rotated(op, q, k, {{"cos", &cos}, {"sin", &sin}, {"positions", positions ? &*positions : nullptr}});
    p.cos = data_of(cos);
    p.sin = data_of(sin);
    p.table_dtype = to_dtype(cos.scalar_type());
    p.cos_row_stride = cos.stride(0);
    p.sin_row_stride = sin.stride(0);
    p.table_rows = cos.size(0);
    p.interleaved = interleaved;
    if (positions.has_value()) {
        const at::Tensor& pos = *positions;
        check_same_device(op, "positions", pos, q);
        TORCH_CHECK_VALUE(pos.scalar_type() == at::kInt || pos.scalar_type() == at::kLong, op,
                          ": expected positions to be int32 or int64, got ", pos.scalar_type());
        const bool per_batch = pos.dim() == 2;
        TORCH_CHECK_VALUE((pos.dim() == 1 && pos.size(0) == p.x.seqlen) ||
                        (per_batch && q.dim() == 4 && pos.size(0) == p.x.batch && pos.size(1) == p.x.seqlen),
                          op, ": expected positions of shape [S] or [B, S] matching q ", q.sizes(), ", got ", pos.sizes());
        TORCH_CHECK_VALUE(pos.is_contiguous(), op, ": expected contiguous positions");
        p.positions = data_of(pos);
        p.positions_int64 = pos.scalar_type() == at::kLong;
        p.positions_batch_stride = per_batch ? pos.stride(0) : 0;
    } else {
        TORCH_CHECK_VALUE(p.x.seqlen <= p.table_rows, op, ": seqlen ", p.x.seqlen, " exceeds the ", p.table_rows,
                          " rows of cos/sin (pass positions to pick rows)");
    }
    return p;
}

rope::Rope3dParams rope_3d_params(const at::Tensor& q, const std::optional<at::Tensor>& k, at::IntArrayRef grid_thw,
                                  const at::Tensor& freqs_t, const at::Tensor& freqs_h, const at::Tensor& freqs_w) {
    constexpr const char* op = "apply_rope_3d_";
    TORCH_CHECK_VALUE(grid_thw.size() == 3, op, ": expected grid_thw = (T, H, W), got ", grid_thw);
    TORCH_CHECK_VALUE(grid_thw[0] > 0 && grid_thw[1] > 0 && grid_thw[2] > 0, op, ": expected a positive grid_thw, got ",
                      grid_thw);
    TORCH_CHECK_VALUE(grid_thw[0] <= kMaxIndex && grid_thw[1] <= kMaxIndex && grid_thw[2] <= kMaxIndex, op,
                      ": expected grid_thw entries <= ", kMaxIndex, ", got ", grid_thw);

    rope::Rope3dParams p;
    const at::Tensor* tables[3] = {&freqs_t, &freqs_h, &freqs_w};
    const char* names[3] = {"freqs_t", "freqs_h", "freqs_w"};
    int64_t rotary_dim = 0;
    for (int axis = 0; axis < 3; ++axis) {
        const at::Tensor& table = *tables[axis];
        check_same_device(op, names[axis], table, q);
        TORCH_CHECK_VALUE(table.scalar_type() == at::kFloat && table.dim() == 3 && table.size(2) == 2, op,
                          ": expected ",
                          names[axis], " as complex [L, d/2] or float32 [L, d/2, 2], got ", table.scalar_type(), " ",
                          table.sizes());
        TORCH_CHECK_VALUE(table.stride(2) == 1 && table.stride(1) == 2, op, ": expected ", names[axis],
                          " with contiguous (cos, sin) pairs, got strides ", table.strides());
        TORCH_CHECK_VALUE(table.size(0) >= grid_thw[axis], op, ": ", names[axis], " has ", table.size(0),
                          " rows but the grid needs ", grid_thw[axis]);
        p.table[axis] = data_of<float>(table);
        p.table_row_stride[axis] = table.stride(0);
        p.pairs[axis] = static_cast<int>(table.size(1));
        p.grid[axis] = static_cast<int>(grid_thw[axis]);
        rotary_dim += 2 * table.size(1);
    }
    p.x = rope_tensors(op, q, k, rotary_dim, /*allow_3d_q=*/false);
    check_tables_not_rotated(op, q, k, {{"freqs_t", &freqs_t}, {"freqs_h", &freqs_h}, {"freqs_w", &freqs_w}});
    // Each entry is within int32, so the frame (H * W) and, once the frame is at most seqlen,
    // T * frame stay within int64.
    const int64_t frame = grid_thw[1] * grid_thw[2];
    TORCH_CHECK_VALUE(frame <= p.x.seqlen && grid_thw[0] * frame == p.x.seqlen, op, ": grid_thw ", grid_thw,
                      " must hold q's seqlen ", p.x.seqlen, " tokens (T * H * W == seqlen)");
    return p;
}

}  // namespace

// One path for CPU, CUDA and Meta (torch.compile's fake tensors: the checks, no launch).
void apply_rope_(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos, const at::Tensor& sin,
                 const std::optional<at::Tensor>& positions, bool interleaved) {
    const rope::Rope1dParams p = rope_1d_params(q, k, cos, sin, positions, interleaved);
    // Checked before any write, so that a bad position never leaves q half rotated.
    if (positions.has_value() && positions->numel() > 0 && values_checked(*positions)) {
        const at::Tensor host = host_values(*positions).to(at::kLong);
        const auto [lo, hi] = std::minmax_element(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
        TORCH_CHECK_VALUE(*lo >= 0 && *hi < p.table_rows, "apply_rope_: expected positions in [0, ", p.table_rows,
                          ") (the rows of cos/sin), got values in [", *lo, ", ", *hi, "]");
    }
    if (q.is_cpu()) {
        cpu::rope_1d(p);
    } else if (q.is_cuda()) {
#if defined(TKPY_WITH_CUDA)
        const c10::cuda::CUDAGuard guard(q.device());
        check_launch("apply_rope_", rope::launch_rope_1d(p, c10::cuda::getCurrentCUDAStream()));
#endif
    }
}

void apply_rope_3d_(const at::Tensor& q, const std::optional<at::Tensor>& k, at::IntArrayRef grid_thw,
                    const at::Tensor& freqs_t, const at::Tensor& freqs_h, const at::Tensor& freqs_w) {
    const rope::Rope3dParams p = rope_3d_params(q, k, grid_thw, freqs_t, freqs_h, freqs_w);
    if (q.is_cpu()) {
        cpu::rope_3d(p);
    } else if (q.is_cuda()) {
#if defined(TKPY_WITH_CUDA)
        const c10::cuda::CUDAGuard guard(q.device());
        check_launch("apply_rope_3d_", rope::launch_rope_3d(p, c10::cuda::getCurrentCUDAStream()));
#endif
    }
}

}  // namespace tkpy::ops
