// Bindings of torch.ops.tkpy_selftest: the tile library's self-test kernels (CUDA) and its host
// index math (CPU), for tests/test_tk.py. Test instruments, not product API.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "ops/ops.h"
#include "ops/validate.h"
#include "tk/types/shared/layout.h"
#include "tkpy/detail/attention_bwd_index.h"
#include "tkpy/detail/attention_index.h"
#include "tkpy/detail/gemm_index.h"
#include "tkpy/tk_selftest.h"

#if defined(TKPY_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace tkpy::ops {

at::Tensor tk_tile_offsets(int64_t rows, int64_t cols, int64_t elem_bytes, int64_t swizzle) {
    TORCH_CHECK(tk::layout::valid_swizzle(int(swizzle)), "tk_tile_offsets: swizzle must be 32, 64 or 128, got ", swizzle);
    TORCH_CHECK(elem_bytes == 2 || elem_bytes == 4, "tk_tile_offsets: elem_bytes must be 2 or 4, got ", elem_bytes);
    TORCH_CHECK(rows > 0 && rows % 8 == 0 && cols > 0 && (cols * elem_bytes) % swizzle == 0,
                "tk_tile_offsets: rows must be a multiple of 8 and a row a whole number of swizzle widths");
    at::Tensor out = at::empty({rows, cols}, at::kLong);
    auto o = out.accessor<int64_t, 2>();
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
            o[r][c] = tk::layout::tile_offset(int(r), int(c), int(rows), int(elem_bytes), int(swizzle));
    return out;
}

at::Tensor gemm_tile_order(int64_t tiles_m, int64_t tiles_n, int64_t group_m) {
    TORCH_CHECK(tiles_m > 0 && tiles_n > 0 && group_m > 0, "gemm_tile_order: expected positive sizes");
    at::Tensor out = at::empty({tiles_m * tiles_n, 2}, at::kLong);
    auto o = out.accessor<int64_t, 2>();
    for (int64_t t = 0; t < tiles_m * tiles_n; ++t) {
        const detail::TileCoord c = detail::gemm_tile_coord(int(t), int(tiles_m), int(tiles_n), int(group_m));
        o[t][0] = c.m;
        o[t][1] = c.n;
    }
    return out;
}

int64_t attention_section_heads(int64_t heads_q, int64_t heads_kv, int64_t batch, int64_t seqlen_k, int64_t head_dim,
                                int64_t elem_bytes, int64_t l2_bytes) {
    TORCH_CHECK(heads_q > 0 && heads_kv > 0 && heads_q % heads_kv == 0 && batch > 0 && seqlen_k >= 0 && head_dim > 0 &&
                    elem_bytes > 0 && l2_bytes >= 0,
                "attention_section_heads: expected positive sizes, heads_q a multiple of heads_kv");
    return detail::attention_section_heads(int(heads_q), int(heads_kv), int(batch), int(seqlen_k), int(head_dim),
                                           int(elem_bytes), l2_bytes);
}

at::Tensor attention_task_order(int64_t q_tiles, int64_t heads_q, int64_t batch, int64_t section_heads) {
    TORCH_CHECK(q_tiles > 0 && heads_q > 0 && batch > 0 && section_heads > 0,
                "attention_task_order: expected positive sizes");
    const int64_t tasks = q_tiles * heads_q * batch;
    at::Tensor out = at::empty({tasks, 3}, at::kLong);
    auto o = out.accessor<int64_t, 2>();
    for (int64_t t = 0; t < tasks; ++t) {
        const detail::TaskCoord c =
            detail::attention_task(int(t), int(q_tiles), int(heads_q), int(batch), int(section_heads));
        o[t][0] = c.batch;
        o[t][1] = c.head;
        o[t][2] = c.q_tile;
    }
    return out;
}

namespace {

// Host copies of sparse-head tensors, kept alive for a SparseHeads that points into them.
struct HostSparseHeads {
    at::Tensor types, info, index, indices, counts;
    detail::SparseHeads heads{};
};

HostSparseHeads host_sparse_heads(const at::Tensor& head_mask_type, const at::Tensor& streaming_info,
                                  const at::Tensor& sparse_index, const std::optional<at::Tensor>& block_indices,
                                  const std::optional<at::Tensor>& block_counts, int64_t sq, int64_t sk, bool causal,
                                  bool exact) {
    HostSparseHeads h;
    const auto host = [](const at::Tensor& t) { return t.to(at::kCPU, at::kInt).contiguous(); };
    h.types = host(head_mask_type);
    h.info = host(streaming_info);
    h.index = host(sparse_index);
    h.heads.head_mask_type = h.types.data_ptr<int32_t>();
    h.heads.streaming_info = h.info.data_ptr<int32_t>();
    h.heads.sparse_index = h.index.data_ptr<int32_t>();
    h.heads.causal = causal;
    h.heads.exact_streaming = exact;
    h.heads.mask_q_blocks = detail::ceil_blocks(int(sq));
    h.heads.mask_k_blocks = detail::ceil_blocks(int(sk));
    if (block_indices.has_value()) {
        h.indices = host(*block_indices);
        h.counts = host(*block_counts);
        TORCH_CHECK(h.indices.dim() == 4 && h.indices.size(2) == h.heads.mask_q_blocks &&
                        h.indices.size(3) == h.heads.mask_k_blocks,
                    "attention_bwd: block_indices must be [B, n_sparse, ceil(sq/128), ceil(sk/128)]");
        h.heads.block_indices = h.indices.data_ptr<int32_t>();
        h.heads.block_counts = h.counts.data_ptr<int32_t>();
        h.heads.n_sparse = int(h.indices.size(1));
    }
    return h;
}

}  // namespace

// The backward's walk over key blocks of `key_rows` keys for (batch, head): [key blocks, query
// blocks + 2], each row visit_rank of every query block, then the candidates [lo, hi).
// Dense attention (the window) without head_mask_type, else sparse heads.
at::Tensor attention_bwd_walk(int64_t sq, int64_t sk, int64_t window_left, int64_t window_right, int64_t key_rows,
                              const std::optional<at::Tensor>& head_mask_type,
                              const std::optional<at::Tensor>& streaming_info,
                              const std::optional<at::Tensor>& sparse_index,
                              const std::optional<at::Tensor>& block_indices,
                              const std::optional<at::Tensor>& block_counts, bool causal, bool exact, int64_t batch,
                              int64_t head) {
    TORCH_CHECK(sq >= 0 && sk >= 0 && (key_rows == 64 || key_rows == 128), "attention_bwd_walk: bad sizes");
    HostSparseHeads h;
    if (head_mask_type.has_value()) {
        h = host_sparse_heads(*head_mask_type, *streaming_info, *sparse_index, block_indices, block_counts, sq, sk,
                              causal, exact);
    }
    const int64_t key_blocks = (sk + key_rows - 1) / key_rows;
    const int64_t query_blocks = (sq + detail::kBwdQueryBlock - 1) / detail::kBwdQueryBlock;
    at::Tensor out = at::empty({key_blocks, query_blocks + 2}, at::kLong);
    auto o = out.accessor<int64_t, 2>();
    for (int64_t n = 0; n < key_blocks; ++n) {
        const detail::BwdWalk w = detail::bwd_walk(int(n), int(key_rows), int(sq), int(sk), int(window_left),
                                                   int(window_right), h.heads, int(batch), int(head));
        for (int64_t m = 0; m < query_blocks; ++m) o[n][m] = w.visit_rank(int(m));
        o[n][query_blocks] = w.candidates.lo;
        o[n][query_blocks + 1] = w.candidates.hi;
    }
    return out;
}

// The backward's per-key mask: ([sk, 2] the queries [lo, hi) that see each key, [query blocks,
// ceil(sk / 16)] whether each query block x 16-key tile is fully visible). Dense attention's window
// when head_type is None, else a sparse head's token rule.
std::tuple<at::Tensor, at::Tensor> attention_bwd_key_rule(int64_t sq, int64_t sk, int64_t window_left,
                                                          int64_t window_right, std::optional<int64_t> head_type,
                                                          int64_t sink, int64_t local, bool causal, bool exact) {
    detail::SparseHeads heads{};
    heads.causal = causal;
    heads.exact_streaming = exact;
    const detail::KeyRule rule = head_type.has_value()
                                     ? detail::sparse_key_rule(int32_t(*head_type), int(sink), int(local), heads)
                                     : detail::dense_key_rule(int(window_left), int(window_right));
    at::Tensor queries = at::empty({sk, 2}, at::kLong);
    auto q = queries.accessor<int64_t, 2>();
    for (int64_t j = 0; j < sk; ++j) {
        const detail::Range r = rule.queries(int(j), int(sq), int(sk));
        q[j][0] = r.lo;
        q[j][1] = r.hi;
    }
    const int64_t query_blocks = (sq + detail::kBwdQueryBlock - 1) / detail::kBwdQueryBlock;
    at::Tensor full = at::empty({query_blocks, (sk + 15) / 16}, at::kBool);
    auto f = full.accessor<bool, 2>();
    for (int64_t m = 0; m < query_blocks; ++m)
        for (int64_t t = 0; t < full.size(1); ++t)
            f[m][t] = rule.tile_fully_visible(int(m * detail::kBwdQueryBlock), detail::kBwdQueryBlock, int(t * 16), 16,
                                              int(sq), int(sk));
    return {queries, full};
}

#if defined(TKPY_WITH_CUDA)
namespace {

void check_cuda_input(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t dims) {
    TORCH_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.dim() == dims && t.is_contiguous(), op, ": expected ",
                name, " to be a contiguous ", dims, "-D CUDA ", dtype, " tensor, got ", t.scalar_type(), " ",
                t.sizes(), " on ", t.device());
}

}  // namespace

void tk_tma_roundtrip(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z, int64_t swizzle, int64_t row,
                      int64_t col) {
    constexpr const char* op = "tk_tma_roundtrip";
    for (const auto& [name, t] : {std::pair{"x", &x}, std::pair{"y", &y}, std::pair{"z", &z}}) {
        check_cuda_input(op, name, *t, at::kBFloat16, 2);
        TORCH_CHECK(t->sizes() == x.sizes(), op, ": x, y and z must have one shape");
    }
    const c10::cuda::CUDAGuard guard(x.device());
    tk_selftest::TmaRoundtripParams p;
    p.x = x.data_ptr();
    p.y = y.data_ptr();
    p.z = z.data_ptr();
    p.rows = x.size(0);
    p.cols = x.size(1);
    p.row = int(row);
    p.col = int(col);
    p.swizzle = int(swizzle);
    check_launch(op, tk_selftest::launch_tma_roundtrip(p, c10::cuda::getCurrentCUDAStream()));
}

std::vector<at::Tensor> tk_online_softmax(const at::Tensor& x, const at::Tensor& keys, double scale, double softcap) {
    constexpr const char* op = "tk_online_softmax";
    check_cuda_input(op, "x", x, at::kFloat, 2);
    check_cuda_input(op, "keys", keys, at::kInt, 1);
    TORCH_CHECK(x.size(0) == 16 && x.size(1) % 32 == 0 && x.size(1) >= 32 && x.size(1) <= 256 && keys.size(0) == 16,
                op, ": x must be [16, 32..256 (a multiple of 32)] and keys [16], got ", x.sizes(), " and ",
                keys.sizes());
    const c10::cuda::CUDAGuard guard(x.device());
    std::vector<at::Tensor> out = {at::empty({16, 32}, x.options()), at::empty({16}, x.options())};
    tk_selftest::OnlineSoftmaxParams p;
    p.x = x.data_ptr<float>();
    p.keys = keys.data_ptr<int>();
    p.cols = int(x.size(1));
    p.scale = float(scale);
    p.softcap = float(softcap);
    p.o = out[0].data_ptr<float>();
    p.lse = out[1].data_ptr<float>();
    check_launch(op, tk_selftest::launch_online_softmax(p, c10::cuda::getCurrentCUDAStream()));
    return out;
}

std::vector<at::Tensor> tk_decay_ops(const at::Tensor& x, const at::Tensor& centre, const at::Tensor& factors,
                                     const at::Tensor& q, const at::Tensor& vec, double factor) {
    constexpr const char* op = "tk_decay_ops";
    check_cuda_input(op, "x", x, at::kFloat, 2);
    check_cuda_input(op, "centre", centre, at::kFloat, 1);
    check_cuda_input(op, "factors", factors, at::kFloat, 2);
    check_cuda_input(op, "q", q, at::kBFloat16, 2);
    check_cuda_input(op, "vec", vec, at::kFloat, 1);
    TORCH_CHECK(x.sizes() == at::IntArrayRef({16, 64}) && factors.sizes() == x.sizes() && centre.size(0) == 16 &&
                    q.sizes() == at::IntArrayRef({16, 128}) && vec.size(0) == 128,
                op, ": expected x and factors [16, 64], centre [16], q [16, 128] and vec [128]");
    const c10::cuda::CUDAGuard guard(x.device());
    std::vector<at::Tensor> out = {at::empty({16}, x.options()), at::empty_like(x), at::empty_like(x),
                                   at::empty_like(x)};
    tk_selftest::DecayOpsParams p;
    p.x = x.data_ptr<float>();
    p.centre = centre.data_ptr<float>();
    p.factors = factors.data_ptr<float>();
    p.q = q.data_ptr();
    p.vec = vec.data_ptr<float>();
    p.factor = float(factor);
    p.dot = out[0].data_ptr<float>();
    p.uniform = out[1].data_ptr<float>();
    p.where = out[2].data_ptr<float>();
    p.each = out[3].data_ptr<float>();
    check_launch(op, tk_selftest::launch_decay_ops(p, c10::cuda::getCurrentCUDAStream()));
    return out;
}

std::vector<at::Tensor> tk_register_ops(const at::Tensor& x) {
    constexpr const char* op = "tk_register_ops";
    check_cuda_input(op, "x", x, at::kFloat, 2);
    TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 32 && x.size(1) >= 2 && x.size(1) <= 64 && x.size(1) % 2 == 0, op,
                ": x must be [1..32, 2..64 (even)], got ", x.sizes());
    const c10::cuda::CUDAGuard guard(x.device());
    const auto f32 = x.options();
    std::vector<at::Tensor> out = {at::empty({32}, f32), at::empty({32}, f32), at::empty({64}, f32),
                                   at::empty({64}, f32), at::empty(x.sizes(), f32.dtype(at::kBFloat16)),
                                   at::empty(x.sizes(), f32)};
    tk_selftest::RegisterOpsParams p;
    p.x = x.data_ptr<float>();
    p.rows = x.size(0);
    p.cols = x.size(1);
    p.row_max = out[0].data_ptr<float>();
    p.row_sum = out[1].data_ptr<float>();
    p.col_max = out[2].data_ptr<float>();
    p.col_sum = out[3].data_ptr<float>();
    p.y = out[4].data_ptr();
    p.z = out[5].data_ptr<float>();
    check_launch(op, tk_selftest::launch_register_ops(p, c10::cuda::getCurrentCUDAStream()));
    return out;
}

at::Tensor tk_wgmma(const at::Tensor& a, const at::Tensor& b, int64_t variant) {
    constexpr const char* op = "tk_wgmma";
    TORCH_CHECK(variant >= 0 && variant <= 5, op, ": variant must be 0..5, got ", variant);
    const auto v = static_cast<tk_selftest::WgmmaVariant>(variant);
    const bool a_t = v == tk_selftest::WgmmaVariant::AtB || v == tk_selftest::WgmmaVariant::AtBt;
    const bool b_t = v == tk_selftest::WgmmaVariant::ABt || v == tk_selftest::WgmmaVariant::AtBt ||
                     v == tk_selftest::WgmmaVariant::reg_ABt;
    check_cuda_input(op, "a", a, a.scalar_type(), 2);
    check_cuda_input(op, "b", b, a.scalar_type(), 2);
    const int64_t k = a_t ? a.size(0) : a.size(1);
    const int64_t n = b_t ? b.size(0) : b.size(1);
    TORCH_CHECK((a_t ? a.size(1) : a.size(0)) == 64 && (b_t ? b.size(1) : b.size(0)) == k, op,
                ": shapes do not fit variant ", variant, ": a ", a.sizes(), ", b ", b.sizes());
    const DType dtype = to_dtype(a.scalar_type());
    TORCH_CHECK(tk_selftest::wgmma_supported(dtype, int(n), int(k), v), op, ": no kernel for ", a.scalar_type(),
                " n=", n, " k=", k, " variant ", variant);
    const c10::cuda::CUDAGuard guard(a.device());
    at::Tensor d = at::empty({64, n}, a.options().dtype(at::kFloat));
    tk_selftest::WgmmaParams p;
    p.a = a.data_ptr();
    p.b = b.data_ptr();
    p.d = d.data_ptr<float>();
    p.n = int(n);
    p.k = int(k);
    p.variant = v;
    p.dtype = dtype;
    check_launch(op, tk_selftest::launch_wgmma(p, c10::cuda::getCurrentCUDAStream()));
    return d;
}

at::Tensor tk_warp_mma(const at::Tensor& a, const at::Tensor& b, int64_t variant, int64_t b_valid_rows) {
    constexpr const char* op = "tk_warp_mma";
    TORCH_CHECK(variant == 0 || variant == 1, op, ": variant must be 0 (a · bᵀ, b [n, k]) or 1 (a · b, b [k, n]), got ",
                variant);
    TORCH_CHECK(a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf, op,
                ": expected a to be bfloat16 or float16, got ", a.scalar_type());
    check_cuda_input(op, "a", a, a.scalar_type(), 2);
    check_cuda_input(op, "b", b, a.scalar_type(), 2);
    TORCH_CHECK(b.device() == a.device(), op, ": expected b on a's device ", a.device(), ", got ", b.device());
    const bool ab = variant == 1;
    const int64_t rows = a.size(0);
    const int64_t k = a.size(1);
    const int64_t n = ab ? b.size(1) : b.size(0);
    TORCH_CHECK((ab ? b.size(0) : b.size(1)) == k, op, ": b must be ", ab ? "[k, n]" : "[n, k]", " with a's k = ", k,
                " for variant ", variant, ", got b ", b.sizes());
    const DType dtype = to_dtype(a.scalar_type());
    TORCH_CHECK(tk_selftest::warp_mma_supported(dtype, int(rows), int(n), int(k)), op,
                ": no kernel for a ", a.sizes(), " and b ", b.sizes(), ": a's rows must be 16, 32, 48 or 64 and n, k ",
                "each 16, 64 or 128");
    const int64_t b_rows = b.size(0);
    const int64_t valid = b_valid_rows < 0 ? b_rows : b_valid_rows;
    TORCH_CHECK(b_valid_rows >= -1 && valid <= b_rows, op, ": b_valid_rows must be -1 (all) or 0..", b_rows,
                " (b's rows), got ", b_valid_rows);
    // cp.async moves 16-byte units; contiguous rows of 16..128 16-bit elements keep them aligned
    // once the base is (a storage offset may not be).
    for (const auto& [name, t] : {std::pair{"a", &a}, std::pair{"b", &b}}) {
        TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, op, ": ", name,
                    "'s data must be 16-byte aligned (a view at an odd offset?); pass .clone()");
    }
    const c10::cuda::CUDAGuard guard(a.device());
    at::Tensor c = at::empty({rows, n}, a.options().dtype(at::kFloat));
    tk_selftest::WarpMmaParams p;
    p.a = a.data_ptr();
    p.b = b.data_ptr();
    p.c = c.data_ptr<float>();
    p.rows = int(rows);
    p.n = int(n);
    p.k = int(k);
    p.b_valid_rows = int(valid);
    p.variant = static_cast<tk_selftest::WarpMmaVariant>(variant);
    p.dtype = dtype;
    check_launch(op, tk_selftest::launch_warp_mma(p, c10::cuda::getCurrentCUDAStream()));
    return c;
}

void tk_stuck_wait(const at::Tensor& reached, bool report) {
    constexpr const char* op = "tk_stuck_wait";
    check_cuda_input(op, "reached", reached, at::kInt, 1);
    TORCH_CHECK(reached.numel() == 1, op, ": expected reached to hold one element, got ", reached.numel());
    const c10::cuda::CUDAGuard guard(reached.device());
    tk_selftest::StuckWaitParams p;
    p.reached = reached.data_ptr<int>();
    p.report = report;
    check_launch(op, tk_selftest::launch_stuck_wait(p, c10::cuda::getCurrentCUDAStream()));
}
#endif

}  // namespace tkpy::ops

// Registered here, not in torch_bindings.cpp, so that this file and the self-test kernels are the
// whole of the test instruments: the TKPY_BUILD_SELFTEST option leaves them out of the product.
TORCH_LIBRARY(tkpy_selftest, m) {
    m.def("tk_tile_offsets(int rows, int cols, int elem_bytes, int swizzle) -> Tensor");
    m.def("gemm_tile_order(int tiles_m, int tiles_n, int group_m) -> Tensor");
    m.def("attention_section_heads(int heads_q, int heads_kv, int batch, int seqlen_k, int head_dim, int elem_bytes, "
          "int l2_bytes) -> int");
    m.def("attention_task_order(int q_tiles, int heads_q, int batch, int section_heads) -> Tensor");
    m.def("attention_bwd_walk(int sq, int sk, int window_left, int window_right, int key_rows, Tensor? head_mask_type, "
          "Tensor? streaming_info, Tensor? sparse_index, Tensor? block_indices, Tensor? block_counts, bool causal, "
          "bool exact, int batch, int head) -> Tensor");
    m.def("attention_bwd_key_rule(int sq, int sk, int window_left, int window_right, int? head_type, int sink, "
          "int local, bool causal, bool exact) -> (Tensor, Tensor)");
    m.def("tk_tma_roundtrip(Tensor x, Tensor(a!) y, Tensor(b!) z, int swizzle, int row, int col) -> ()");
    m.def("tk_register_ops(Tensor x) -> Tensor[]");
    m.def("tk_online_softmax(Tensor x, Tensor keys, float scale, float softcap) -> Tensor[]");
    m.def("tk_decay_ops(Tensor x, Tensor centre, Tensor factors, Tensor q, Tensor vec, float factor) -> Tensor[]");
    m.def("tk_wgmma(Tensor a, Tensor b, int variant) -> Tensor");
    m.def("tk_warp_mma(Tensor a, Tensor b, int variant, int b_valid_rows=-1) -> Tensor");
    m.def("tk_stuck_wait(Tensor(a!) reached, bool report) -> ()");
}

TORCH_LIBRARY_IMPL(tkpy_selftest, CompositeExplicitAutograd, m) {
    m.impl("tk_tile_offsets", &tkpy::ops::tk_tile_offsets);
    m.impl("gemm_tile_order", &tkpy::ops::gemm_tile_order);
    m.impl("attention_section_heads", &tkpy::ops::attention_section_heads);
    m.impl("attention_task_order", &tkpy::ops::attention_task_order);
    m.impl("attention_bwd_walk", &tkpy::ops::attention_bwd_walk);
    m.impl("attention_bwd_key_rule", &tkpy::ops::attention_bwd_key_rule);
}

#if defined(TKPY_WITH_CUDA)
TORCH_LIBRARY_IMPL(tkpy_selftest, CUDA, m) {
    m.impl("tk_tma_roundtrip", &tkpy::ops::tk_tma_roundtrip);
    m.impl("tk_register_ops", &tkpy::ops::tk_register_ops);
    m.impl("tk_online_softmax", &tkpy::ops::tk_online_softmax);
    m.impl("tk_decay_ops", &tkpy::ops::tk_decay_ops);
    m.impl("tk_wgmma", &tkpy::ops::tk_wgmma);
    m.impl("tk_warp_mma", &tkpy::ops::tk_warp_mma);
    m.impl("tk_stuck_wait", &tkpy::ops::tk_stuck_wait);
}
#endif
