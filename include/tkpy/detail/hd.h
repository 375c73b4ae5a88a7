// TKPY_HD marks index math that runs on both the host (CPU path, tests) and the device.
#pragma once

#if defined(__CUDACC__)
#define TKPY_HD __host__ __device__ __forceinline__
#else
#define TKPY_HD inline
#endif
