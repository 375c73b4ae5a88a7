// Host-side facts about the current CUDA device that launches size grids by, cached per device:
// one attribute query per device and process, never a sync, so launches stay CUDA-graph safe.
// Plain C++ over the CUDA runtime API (no device code), so host-only translation units include it.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>

namespace tk {

namespace detail {

// The attribute of the current device, asked once; 0 when there is no device or the query fails.
template <cudaDeviceAttr Attribute>
inline int cached_device_attribute() {
    constexpr int kMaxDevices = 64;
    static std::atomic<int> values[kMaxDevices] = {};  // launches may come from several host threads
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 0;
    int value = values[device].load(std::memory_order_relaxed);
    if (value == 0) {
        if (cudaDeviceGetAttribute(&value, Attribute, device) != cudaSuccess) return 0;
        values[device].store(value, std::memory_order_relaxed);
    }
    return value;
}

}  // namespace detail

// Streaming multiprocessors of the current device: a persistent kernel's grid.
inline int sm_count() { return detail::cached_device_attribute<cudaDevAttrMultiProcessorCount>(); }

// Bytes of L2 of the current device: how much K/V a persistent attention kernel can keep hot.
inline int l2_bytes() { return detail::cached_device_attribute<cudaDevAttrL2CacheSize>(); }

}  // namespace tk
