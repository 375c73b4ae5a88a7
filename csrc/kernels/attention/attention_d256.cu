// Dense attention forward, head dim 256 (bf16 and fp16).
#include "attention_fwd.cuh"

namespace tkpy::attention {

cudaError_t launch_d256(const AttentionParams& p, cudaStream_t stream) { return launch_head_dim<256>(p, stream); }

}  // namespace tkpy::attention
