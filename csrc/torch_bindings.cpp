// The one place tkpy's ops are declared (schemas) and their CPU and CUDA kernels registered.
// The Python module tkpy._C has no functions: importing it runs these registrations, and it
// carries the build's facts (CUDA on or off, compiled architectures, where ptxas's report is) for
// `python -m tkpy info` and the static checks.
#include <Python.h>
#include <torch/library.h>

#include "ops/ops.h"

#ifndef TKPY_CUDA_ARCHS
#define TKPY_CUDA_ARCHS ""
#endif
#ifndef TKPY_CUDA_VERSION
#define TKPY_CUDA_VERSION ""
#endif
#ifndef TKPY_PTXAS_REPORT
#define TKPY_PTXAS_REPORT ""
#endif

TORCH_LIBRARY(tkpy, m) {
    m.def("apply_rope_(Tensor(a!) q, Tensor(b!)? k, Tensor cos, Tensor sin, Tensor? positions=None, "
          "bool interleaved=False) -> ()");
    m.def("apply_rope_3d_(Tensor(a!) q, Tensor(b!)? k, int[] grid_thw, Tensor freqs_t, Tensor freqs_h, "
          "Tensor freqs_w) -> ()");
    m.def("gemm(Tensor a, Tensor b, bool trans_b=False) -> Tensor");
    m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
          "int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, int window_right, "
          "float softcap) -> (Tensor out, Tensor lse)");
    m.def("block_sparse_attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
          "Tensor head_mask_type, Tensor streaming_info, Tensor sparse_index, Tensor? block_indices, "
          "Tensor? block_counts, int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool is_causal, "
          "bool exact_streaming) -> (Tensor out, Tensor lse)");
    m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? block_table, Tensor seqlens, "
          "Tensor? cache_batch_idx, Tensor? kv_head_slot, Tensor? k_ring, Tensor? v_ring, Tensor? ring_table, "
          "int sink, int local, Tensor? page_indices, Tensor? page_counts, Tensor? head_bits, float k_scale, "
          "float v_scale, float softmax_scale, int window_left, int window_right, float softcap, int num_splits) "
          "-> (Tensor out, Tensor lse)");
    m.def("kv_append_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor? block_table, "
          "Tensor seqlens, Tensor? cache_batch_idx, Tensor(c!)? k_min, Tensor(d!)? k_max, Tensor? rotary_cos, "
          "Tensor? rotary_sin, bool rotary_interleaved, float k_scale, float v_scale, Tensor? kv_head_slot, "
          "Tensor(e!)? k_ring, Tensor(f!)? v_ring, Tensor? ring_table, int sink, int local) -> ()");
}

TORCH_LIBRARY_IMPL(tkpy, CPU, m) {
    m.impl("apply_rope_", &tkpy::ops::apply_rope_cpu);
    m.impl("apply_rope_3d_", &tkpy::ops::apply_rope_3d_cpu);
    m.impl("gemm", &tkpy::ops::gemm_cpu);
    m.impl("attention_forward", &tkpy::ops::attention_forward_cpu);
    m.impl("block_sparse_attention_forward", &tkpy::ops::block_sparse_attention_forward_cpu);
    m.impl("decode_attention", &tkpy::ops::decode_attention_cpu);
    m.impl("kv_append_", &tkpy::ops::kv_append_cpu);
}

#if defined(TKPY_WITH_CUDA)
TORCH_LIBRARY_IMPL(tkpy, CUDA, m) {
    m.impl("apply_rope_", &tkpy::ops::apply_rope_cuda);
    m.impl("apply_rope_3d_", &tkpy::ops::apply_rope_3d_cuda);
    m.impl("gemm", &tkpy::ops::gemm_cuda);
    m.impl("attention_forward", &tkpy::ops::attention_forward_cuda);
    m.impl("block_sparse_attention_forward", &tkpy::ops::block_sparse_attention_forward_cuda);
    m.impl("decode_attention", &tkpy::ops::decode_attention_cuda);
    m.impl("kv_append_", &tkpy::ops::kv_append_cuda);
}
#endif

// Test instruments for tests/test_tk.py: the tile library's index math on the host and one
// self-test kernel per class of primitives. Kept out of the tkpy namespace (and `tkpy info`).
TORCH_LIBRARY(tkpy_selftest, m) {
    m.def("tk_tile_offsets(int rows, int cols, int elem_bytes, int swizzle) -> Tensor");
    m.def("gemm_tile_order(int tiles_m, int tiles_n, int group_m) -> Tensor");
    m.def("tk_tma_roundtrip(Tensor x, Tensor(a!) y, Tensor(b!) z, int swizzle, int row, int col) -> ()");
    m.def("tk_register_ops(Tensor x) -> Tensor[]");
    m.def("tk_wgmma(Tensor a, Tensor b, int variant) -> Tensor");
    m.def("tk_warp_mma(Tensor a, Tensor b, int variant, int b_valid_rows=-1) -> Tensor");
    m.def("tk_stuck_wait(Tensor(a!) reached, bool report) -> ()");
}

TORCH_LIBRARY_IMPL(tkpy_selftest, CompositeExplicitAutograd, m) {
    m.impl("tk_tile_offsets", &tkpy::ops::tk_tile_offsets);
    m.impl("gemm_tile_order", &tkpy::ops::gemm_tile_order);
}

#if defined(TKPY_WITH_CUDA)
TORCH_LIBRARY_IMPL(tkpy_selftest, CUDA, m) {
    m.impl("tk_tma_roundtrip", &tkpy::ops::tk_tma_roundtrip);
    m.impl("tk_register_ops", &tkpy::ops::tk_register_ops);
    m.impl("tk_wgmma", &tkpy::ops::tk_wgmma);
    m.impl("tk_warp_mma", &tkpy::ops::tk_warp_mma);
    m.impl("tk_stuck_wait", &tkpy::ops::tk_stuck_wait);
}
#endif

namespace {

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tkpy's compiled ops (torch.ops.tkpy)", -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
    PyObject* module = PyModule_Create(&module_def);
    if (module == nullptr) return nullptr;
#if defined(TKPY_WITH_CUDA)
    const long cuda_enabled = 1;
#else
    const long cuda_enabled = 0;
#endif
    // A build whose deadlocked waits print their call site (TKPY_WATCHDOG_REPORT=1): its wgmma are
    // serialised, so gpu_run.py refuses to time it.
#if defined(TKPY_WATCHDOG_REPORT_BUILD)
    const long watchdog_report = 1;
#else
    const long watchdog_report = 0;
#endif
    if (PyModule_AddIntConstant(module, "cuda_enabled", cuda_enabled) < 0 ||
        PyModule_AddIntConstant(module, "watchdog_report", watchdog_report) < 0 ||
        PyModule_AddStringConstant(module, "cuda_archs", TKPY_CUDA_ARCHS) < 0 ||
        PyModule_AddStringConstant(module, "cuda_version", TKPY_CUDA_VERSION) < 0 ||
        PyModule_AddStringConstant(module, "ptxas_report", TKPY_PTXAS_REPORT) < 0) {
        Py_DECREF(module);
        return nullptr;
    }
    return module;
}
