// Attention backward, head dim 64 (bf16 and fp16, with and without a softcap).
#include "attention_bwd.cuh"

namespace tkpy::attention {

cudaError_t launch_bwd_d64(const AttentionBackwardParams& bp, cudaStream_t stream) {
    return launch_bwd_head_dim<64>(bp, stream);
}

}  // namespace tkpy::attention
