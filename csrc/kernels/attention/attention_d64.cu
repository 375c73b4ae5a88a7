// Dense attention forward, head dim 64 (bf16 and fp16).
#include "attention_fwd.cuh"

namespace tkpy::attention {

cudaError_t launch_d64(const AttentionParams& p, cudaStream_t stream) { return launch_head_dim<64>(p, stream); }

}  // namespace tkpy::attention
