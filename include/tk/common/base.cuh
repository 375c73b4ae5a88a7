// Basic types and thread-index helpers of the tile library. CUDA C++20, no torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
// wgmma, setmaxnreg and TMA need the arch-specific sm_90a target; a plain sm_90 build would
// otherwise compile into kernels that trap at run time.
#error "tk needs -gencode=arch=compute_90a,code=sm_90a (wgmma, setmaxnreg and TMA are sm_90a features)"
#endif

namespace tk {

using bf16 = __nv_bfloat16;
using half = __half;
using bf16_2 = __nv_bfloat162;
using half_2 = __half2;

inline constexpr int kWarpThreads = 32;
// log2(e) and ln(2): softmax runs in base 2 (exp2 is one MUFU.EX2), lse is reported in base e.
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;
inline constexpr int kWarpgroupWarps = 4;
inline constexpr int kWarpgroupThreads = kWarpThreads * kWarpgroupWarps;

template <typename T>
concept tile_element = std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, half>;

template <typename T>
concept mma_input = std::is_same_v<T, bf16> || std::is_same_v<T, half>;

// The two-element vector type of an element type: the unit a thread holds in a tile fragment.
template <tile_element T>
struct packed;
template <>
struct packed<float> { using type = float2; };
template <>
struct packed<bf16> { using type = bf16_2; };
template <>
struct packed<half> { using type = half_2; };
template <tile_element T>
using packed_t = typename packed<T>::type;

// Conversions between element types, through float.
template <tile_element T>
__host__ __device__ inline float to_float(T v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else if constexpr (std::is_same_v<T, bf16>) return __bfloat162float(v);
    else return __half2float(v);
}

template <tile_element T>
__host__ __device__ inline T from_float(float v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else if constexpr (std::is_same_v<T, bf16>) return __float2bfloat16_rn(v);
    else return __float2half_rn(v);
}

template <tile_element T>
__device__ inline float2 to_float2(packed_t<T> v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else if constexpr (std::is_same_v<T, bf16>) return __bfloat1622float2(v);
    else return __half22float2(v);
}

template <tile_element T>
__device__ inline packed_t<T> from_float2(float2 v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else if constexpr (std::is_same_v<T, bf16>) return __float22bfloat162_rn(v);
    else return __float22half2_rn(v);
}

__device__ inline int laneid() { return threadIdx.x % kWarpThreads; }
__device__ inline int warpid() { return threadIdx.x / kWarpThreads; }
__device__ inline int warpgroupid() { return threadIdx.x / kWarpgroupThreads; }
// The warp's index inside its warpgroup (0..3): which 16 rows of a 64-row wgmma tile it holds.
__device__ inline int warpid_in_warpgroup() { return warpid() % kWarpgroupWarps; }

// A shared-memory address in the shared window, as PTX's .shared instructions take it.
__device__ inline uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

}  // namespace tk
