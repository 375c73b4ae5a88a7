// Attention backward, head dim 128 (bf16 and fp16, with and without a softcap).
#include "attention_bwd.cuh"

namespace tkpy::attention {

cudaError_t launch_bwd_d128(const AttentionBackwardParams& bp, cudaStream_t stream) {
    return launch_bwd_head_dim<128>(bp, stream);
}

}  // namespace tkpy::attention
