// Dense attention forward, head dim 128 (bf16 and fp16).
#include "attention_fwd.cuh"

namespace tkpy::attention {

cudaError_t launch_d128(const AttentionParams& p, cudaStream_t stream) { return launch_head_dim<128>(p, stream); }

}  // namespace tkpy::attention
