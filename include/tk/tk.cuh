// The tk tile library: everything, in dependency order. See include/tk/README.md.
#pragma once

#include "common/base.cuh"
#include "types/register/rt.cuh"
#include "types/register/rv.cuh"
#include "types/shared/layout.h"
#include "types/shared/st.cuh"
#include "types/global/gl.cuh"
#include "pipeline/sync.cuh"
#include "ops/warp/register.cuh"
#include "ops/warp/memory.cuh"
#include "ops/warp/mma.cuh"
#include "ops/cp_async.cuh"
#include "ops/warpgroup/memory.cuh"
#include "ops/warpgroup/mma/mma.cuh"
#include "ops/tma.cuh"
#include "pipeline/lcf.cuh"
