// Plain types shared by every launcher's params struct.
#pragma once

namespace tkpy {

// int8: LServe's KV cache storage (per-tensor symmetric, dequantised inside the kernels).
// fp64: the CPU attention path only, which computes in float64 for it (gradcheck); no kernel takes it.
enum class DType { fp32, fp16, bf16, int8, fp64 };

}  // namespace tkpy
