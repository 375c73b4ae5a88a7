// Dense attention forward: head-dim dispatch of the launcher.
#include "attention_fwd.cuh"

namespace tkpy::attention {

cudaError_t launch_attention_forward(const AttentionParams& p, cudaStream_t stream) {
    if (p.dtype == DType::fp32) return cudaErrorInvalidValue;
    switch (p.head_dim) {
        case 64: return launch_d64(p, stream);
        case 128: return launch_d128(p, stream);
        case 256: return launch_d256(p, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace tkpy::attention
