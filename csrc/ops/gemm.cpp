// Binding of the GEMM: validation, output allocation, CPU (ATen) or CUDA (tk pipeline) dispatch.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>

#include "ops/ops.h"
#include "ops/validate.h"
#include "tkpy/gemm.h"

#if defined(TKPY_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace tkpy::ops {
namespace {

constexpr const char* kOp = "gemm";

// The shape and layout rules of the CUDA kernel (TMA needs 16-byte aligned bases and row strides),
// applied on every device so that a call valid on the CPU is valid on the GPU.
void check_gemm_operand(const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, kOp, ": expected ", name,
                      " to be bfloat16 or float16, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2, kOp, ": expected ", name, " to be 2-D, got shape ", t.sizes());
    check_sizes_fit_int(kOp, name, t);
    TORCH_CHECK_VALUE(t.size(0) % 8 == 0 && t.size(1) % 8 == 0, kOp, ": expected ", name,
                      "'s dims to be multiples of 8, got ", t.sizes());
    if (t.numel() == 0) return;  // no memory to address: strides and alignment do not matter
    check_last_dim_contiguous(kOp, name, t);
    TORCH_CHECK_VALUE(t.stride(0) % 8 == 0 && address_of(t) % 16 == 0, kOp, ": expected ",
                      name, " with a 16-byte aligned start and a row stride that is a multiple of 8 elements, got stride ",
                      t.strides());
}

// (M, N, K) of a valid call.
std::array<int64_t, 3> check_gemm(const at::Tensor& a, const at::Tensor& b, bool trans_b) {
    check_gemm_operand("a", a);
    check_gemm_operand("b", b);
    check_same_device(kOp, "b", b, a);
    TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), kOp, ": expected a and b of one dtype, got ", a.scalar_type(),
                      " and ", b.scalar_type());
    const int64_t k_b = trans_b ? b.size(1) : b.size(0);
    TORCH_CHECK_VALUE(a.size(1) == k_b, kOp, ": a is ", a.sizes(), " but b",
                      trans_b ? " (transposed, [N, K])" : " ([K, N])",
                      " is ", b.sizes(), "; their K differ");
    return {a.size(0), trans_b ? b.size(0) : b.size(1), a.size(1)};
}

}  // namespace

// One path for CPU, CUDA and Meta (torch.compile's fake tensors: the checks and the output's shape).
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, bool trans_b) {
    const auto [m, n, k] = check_gemm(a, b, trans_b);
    if (a.is_cpu()) {
        const at::Tensor bf = trans_b ? b.to(at::kFloat).t() : b.to(at::kFloat);
        return at::matmul(a.to(at::kFloat), bf).to(a.scalar_type());
    }
    at::Tensor c = at::empty({m, n}, a.options());
    if (!a.is_cuda()) return c;
#if defined(TKPY_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(a.device());
    if (k == 0) return c.zero_();
    gemm::GemmParams p;
    p.a = data_of(a);
    p.b = data_of(b);
    p.c = data_of(c);
    p.m = m;
    p.n = n;
    p.k = k;
    p.lda = a.stride(0);
    p.ldb = b.stride(0);
    p.ldc = c.stride(0);
    p.trans_b = trans_b;
    p.dtype = to_dtype(a.scalar_type());
    check_launch(kOp, gemm::launch_gemm(p, c10::cuda::getCurrentCUDAStream()));
#endif
    return c;
}

}  // namespace tkpy::ops
