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

// Inputs first, then options with their defaults; the Python API passes every option by keyword.
// (Not keyword-only: torch.library.register_autograd refuses keyword-only tensors.)
// softmax_scale=None is 1/sqrt(head_dim); window edges of -1 are unbounded.
TORCH_LIBRARY(tkpy, m) {
    m.def("apply_rope_(Tensor(a!) q, Tensor(b!)? k, Tensor cos, Tensor sin, Tensor? positions=None, "
          "bool interleaved=False) -> ()");
    m.def("apply_rope_3d_(Tensor(a!) q, Tensor(b!)? k, int[] grid_thw, Tensor freqs_t, Tensor freqs_h, "
          "Tensor freqs_w) -> ()");
    m.def("gemm(Tensor a, Tensor b, bool trans_b=False) -> Tensor");
    m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q=None, "
          "Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0, float? softmax_scale=None, "
          "int window_left=-1, int window_right=-1, float softcap=0.0, bool deterministic=False) -> (Tensor out, Tensor lse)");
    // UltraViCo (tkpy.ultravico): the decay's settings in latent frames and tokens, as its config.
    m.def("ultravico_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q=None, "
          "Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0, float? softmax_scale=None, "
          "int tokens_per_frame=1, int train_frames=1, float alpha=1.0, float beta=1.0, int band_period=0, "
          "int band_width=0, int band_count=0, bool first_frame_mask=False, int text_tokens=0) -> (Tensor out, Tensor lse)");
    // The block lists come from tkpy.block_sparse.plan(base_blockmask): built once per layer and
    // step, they let a CUDA graph replay the launch without re-sorting the mask.
    m.def("block_sparse_attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
          "Tensor head_mask_type, Tensor streaming_info, Tensor sparse_index, int max_seqlen_q, int max_seqlen_k, "
          "Tensor? block_indices=None, Tensor? block_counts=None, float? softmax_scale=None, bool is_causal=False, "
          "bool exact_streaming=False, bool deterministic=False) -> (Tensor out, Tensor lse)");
    // The backwards, from the forward's out and lse; `deterministic` is the forward's flag, which
    // only they use (the forward is deterministic anyway), so autograd hands it on.
    m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
          "Tensor? dlse=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, "
          "int max_seqlen_k=0, float? softmax_scale=None, int window_left=-1, int window_right=-1, float softcap=0.0, "
          "bool deterministic=False) -> (Tensor dq, Tensor dk, Tensor dv)");
    m.def("block_sparse_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
          "Tensor? dlse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor head_mask_type, Tensor streaming_info, "
          "Tensor sparse_index, int max_seqlen_q, int max_seqlen_k, Tensor? block_indices=None, "
          "Tensor? block_counts=None, float? softmax_scale=None, bool is_causal=False, bool exact_streaming=False, "
          "bool deterministic=False) -> (Tensor dq, Tensor dk, Tensor dv)");
    // Dense decode over a paged (block_table) or contiguous (cache_batch_idx) cache; kv_head_slot
    // with the ring pools makes it LServe's decode (streaming and retrieval heads, selected pages).
    m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table=None, "
          "Tensor? cache_batch_idx=None, Tensor? kv_head_slot=None, Tensor? k_ring=None, Tensor? v_ring=None, "
          "Tensor? ring_table=None, int sink=0, int local=0, Tensor? page_indices=None, Tensor? page_counts=None, "
          "Tensor? head_bits=None, float k_scale=1.0, float v_scale=1.0, float? softmax_scale=None, "
          "int window_left=-1, int window_right=-1, float softcap=0.0, int num_splits=0) -> (Tensor out, Tensor lse)");
    m.def("kv_append_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor cache_seqlens, "
          "Tensor? block_table=None, Tensor? cache_batch_idx=None, Tensor(c!)? k_min=None, Tensor(d!)? k_max=None, "
          "Tensor? rotary_cos=None, Tensor? rotary_sin=None, bool rotary_interleaved=False, float k_scale=1.0, "
          "float v_scale=1.0, Tensor? kv_head_slot=None, Tensor(e!)? k_ring=None, Tensor(f!)? v_ring=None, "
          "Tensor? ring_table=None, int sink=0, int local=0) -> ()");
}

namespace {

// One implementation per op serves the CPU, CUDA and Meta keys (ops/ops.h): the Meta kernel is the
// op's fake for torch.compile, with the same checks as a real call.
void register_implementations(torch::Library& m) {
    m.impl("apply_rope_", &tkpy::ops::apply_rope_);
    m.impl("apply_rope_3d_", &tkpy::ops::apply_rope_3d_);
    m.impl("gemm", &tkpy::ops::gemm);
    m.impl("attention_forward", &tkpy::ops::attention_forward);
    m.impl("ultravico_attention_forward", &tkpy::ops::ultravico_attention_forward);
    m.impl("block_sparse_attention_forward", &tkpy::ops::block_sparse_attention_forward);
    m.impl("attention_backward", &tkpy::ops::attention_backward);
    m.impl("block_sparse_attention_backward", &tkpy::ops::block_sparse_attention_backward);
    m.impl("decode_attention", &tkpy::ops::decode_attention);
    m.impl("kv_append_", &tkpy::ops::kv_append_);
}

}  // namespace

TORCH_LIBRARY_IMPL(tkpy, CPU, m) { register_implementations(m); }
TORCH_LIBRARY_IMPL(tkpy, Meta, m) { register_implementations(m); }
#if defined(TKPY_WITH_CUDA)
TORCH_LIBRARY_IMPL(tkpy, CUDA, m) { register_implementations(m); }
#endif

namespace {

// _C.set_attention_kernel(name): "baseline", "pipelined", or None for the environment's choice;
// returns the choice it replaces, in the same terms.
PyObject* set_attention_kernel(PyObject*, PyObject* arg) {
    tkpy::attention::Kernel kernel = tkpy::attention::Kernel::automatic;
    if (arg != Py_None) {
        const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
        if (name == nullptr || !tkpy::attention::parse_kernel(name, &kernel)) {
            PyErr_SetString(PyExc_ValueError, "set_attention_kernel: expected 'baseline', 'pipelined' or None");
            return nullptr;
        }
    }
    const tkpy::attention::Kernel previous = tkpy::ops::set_attention_kernel(kernel);
    if (previous == tkpy::attention::Kernel::automatic) Py_RETURN_NONE;
    return PyUnicode_FromString(tkpy::attention::kernel_name(previous));
}

// _C.attention_kernel(): the name of the kernel CUDA attention calls run now.
PyObject* attention_kernel(PyObject*, PyObject*) {
    try {
        return PyUnicode_FromString(tkpy::attention::kernel_name(tkpy::ops::selected_attention_kernel()));
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_ValueError, e.what());
        return nullptr;
    }
}

PyMethodDef module_methods[] = {
    {"set_attention_kernel", set_attention_kernel, METH_O, "Select the Hopper attention forward kernel."},
    {"attention_kernel", attention_kernel, METH_NOARGS, "The Hopper attention forward kernel in use."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tkpy's compiled ops (torch.ops.tkpy)", -1, module_methods};

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
