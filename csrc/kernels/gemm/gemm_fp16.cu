// fp16 instantiations of the GEMM, and the dtype dispatch.
#include "gemm.cuh"

namespace tkpy::gemm {

cudaError_t launch_gemm_bf16(const GemmParams& p, cudaStream_t stream);

cudaError_t launch_gemm(const GemmParams& p, cudaStream_t stream) {
    if (p.m == 0 || p.n == 0) return cudaSuccess;
    if (p.k <= 0) return cudaErrorInvalidValue;
    switch (p.dtype) {
        case DType::bf16: return launch_gemm_bf16(p, stream);
        case DType::fp16:
            return p.trans_b ? launch_typed<tk::half, true>(p, stream) : launch_typed<tk::half, false>(p, stream);
        case DType::fp32:
        case DType::int8: break;
    }
    return cudaErrorInvalidValue;
}

}  // namespace tkpy::gemm
