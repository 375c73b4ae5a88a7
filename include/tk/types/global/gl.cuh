// Global layouts: a row-major 2D view of global memory and, for a given shared tile type, the TMA
// tensor map that moves whole tiles between them.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../shared/st.cuh"

namespace tk {

// A row-major [rows, cols] matrix in global memory; row_stride is in elements.
template <tile_element T>
struct gl {
    T* data;
    int64_t rows;
    int64_t cols;
    int64_t row_stride;

    __host__ __device__ T* ptr(int64_t row, int64_t col) const { return data + row * row_stride + col; }
};

namespace detail {

template <tile_element T>
constexpr CUtensorMapDataType tma_dtype() {
    if constexpr (std::is_same_v<T, bf16>) return CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    else if constexpr (std::is_same_v<T, half>) return CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    else return CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
}

constexpr CUtensorMapSwizzle tma_swizzle(int bytes) {
    return bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_32B;
}

// cuTensorMapEncodeTiled through the runtime's driver entry point, so nothing links libcuda.
inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled_fn() {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
        void* ptr = nullptr;
        cudaDriverEntryPointQueryResult found{};
        const cudaError_t err =
            cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found);
        return (err == cudaSuccess && found == cudaDriverEntryPointSuccess)
                   ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr)
                   : nullptr;
    }();
    return fn;
}

}  // namespace detail

// A global matrix with the TMA map for tiles of type ST (box = one swizzle chunk: ST::chunk_cols
// columns by ST::rows rows; a whole tile is ST::chunks boxes side by side). Built on the host and
// passed to kernels by value inside a __grid_constant__ params struct, so the map lives in
// parameter space where TMA instructions can address it.
template <shared_tile ST>
struct tma_gl {
    using T = typename ST::dtype;
    CUtensorMap map;
    int64_t rows;
    int64_t cols;
};

// Encodes the map. Returns cudaErrorInvalidValue for layouts TMA cannot express: a base not 16-byte
// aligned or a row stride that is not a multiple of 16 bytes.
template <shared_tile ST>
cudaError_t make_tma_gl(tma_gl<ST>& out, const gl<typename ST::dtype>& g) {
    using T = typename ST::dtype;
    if (reinterpret_cast<uintptr_t>(g.data) % 16 != 0 || (g.row_stride * sizeof(T)) % 16 != 0 || g.rows <= 0 ||
        g.cols <= 0) {
        return cudaErrorInvalidValue;
    }
    const auto encode = detail::encode_tiled_fn();
    if (encode == nullptr) return cudaErrorNotSupported;
    const cuuint64_t dims[2] = {cuuint64_t(g.cols), cuuint64_t(g.rows)};         // innermost first
    const cuuint64_t strides[1] = {cuuint64_t(g.row_stride) * sizeof(T)};         // bytes, dims 1..
    const cuuint32_t box[2] = {cuuint32_t(ST::chunk_cols), cuuint32_t(ST::rows)};
    const cuuint32_t element_strides[2] = {1, 1};
    const CUresult res = encode(&out.map, detail::tma_dtype<T>(), 2, g.data, dims, strides, box, element_strides,
                                CU_TENSOR_MAP_INTERLEAVE_NONE, detail::tma_swizzle(ST::swizzle),
                                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    out.rows = g.rows;
    out.cols = g.cols;
    return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// A 4-D global tensor [batch][rows][heads][cols] (cols contiguous), as attention's
// [B, S, H, D] q/k/v/o are, with the TMA map for tiles of type ST taken from one (batch, head):
// box = ST::chunk_cols columns x 1 head x ST::rows rows x 1 batch. Rows past the end of a batch
// load as zeros and are clipped on store, without reaching into the next batch.
template <tile_element T>
struct gl4 {
    T* data;
    int64_t batch, rows, heads, cols;
    int64_t batch_stride, row_stride, head_stride;  // elements
};

template <shared_tile ST>
struct tma_gl4 {
    CUtensorMap map;
};

template <shared_tile ST>
cudaError_t make_tma_gl4(tma_gl4<ST>& out, const gl4<typename ST::dtype>& g) {
    using T = typename ST::dtype;
    const bool aligned = reinterpret_cast<uintptr_t>(g.data) % 16 == 0 && (g.row_stride * sizeof(T)) % 16 == 0 &&
                         (g.head_stride * sizeof(T)) % 16 == 0 && (g.batch_stride * sizeof(T)) % 16 == 0;
    if (!aligned || g.batch <= 0 || g.rows <= 0 || g.heads <= 0 || g.cols <= 0) return cudaErrorInvalidValue;
    const auto encode = detail::encode_tiled_fn();
    if (encode == nullptr) return cudaErrorNotSupported;
    const cuuint64_t dims[4] = {cuuint64_t(g.cols), cuuint64_t(g.heads), cuuint64_t(g.rows), cuuint64_t(g.batch)};
    const cuuint64_t strides[3] = {cuuint64_t(g.head_stride) * sizeof(T), cuuint64_t(g.row_stride) * sizeof(T),
                                   cuuint64_t(g.batch_stride) * sizeof(T)};
    const cuuint32_t box[4] = {cuuint32_t(ST::chunk_cols), 1, cuuint32_t(ST::rows), 1};
    const cuuint32_t element_strides[4] = {1, 1, 1, 1};
    const CUresult res = encode(&out.map, detail::tma_dtype<T>(), 4, g.data, dims, strides, box, element_strides,
                                CU_TENSOR_MAP_INTERLEAVE_NONE, detail::tma_swizzle(ST::swizzle),
                                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace tk
