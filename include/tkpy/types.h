// Plain types shared by every launcher's params struct.
#pragma once

namespace tkpy {

enum class DType { fp32, fp16, bf16 };

}  // namespace tkpy
