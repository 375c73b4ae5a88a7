// CPU implementations, called by the bindings with the same params structs the CUDA launchers take.
#pragma once

#include "tkpy/rope.h"

namespace tkpy::cpu {

void rope_1d(const rope::Rope1dParams& params);
void rope_3d(const rope::Rope3dParams& params);

}  // namespace tkpy::cpu
