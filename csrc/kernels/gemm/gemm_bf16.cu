// bf16 instantiations of the GEMM (one translation unit per dtype, so they compile in parallel).
#include "gemm.cuh"

namespace tkpy::gemm {

cudaError_t launch_gemm_bf16(const GemmParams& p, cudaStream_t stream) {
    return p.trans_b ? launch_typed<tk::bf16, true>(p, stream) : launch_typed<tk::bf16, false>(p, stream);
}

}  // namespace tkpy::gemm
