// Plain types shared by every launcher's params struct.
#pragma once

namespace tkpy {

// int8: LServe's KV cache storage (per-tensor symmetric, dequantised inside the kernels).
enum class DType { fp32, fp16, bf16, int8 };

}  // namespace tkpy
