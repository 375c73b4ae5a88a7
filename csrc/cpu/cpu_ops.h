// CPU implementations, called by the bindings with the same params structs the CUDA launchers take.
#pragma once

#include "tkpy/attention.h"
#include "tkpy/rope.h"

namespace tkpy::cpu {

void rope_1d(const rope::Rope1dParams& params);
void rope_3d(const rope::Rope3dParams& params);

// Tiled online-softmax attention forward, parallel over (batch, head, query tile); cu_seqlens (if
// any) are host pointers.
void attention_forward(const attention::AttentionParams& params);

}  // namespace tkpy::cpu
