// Launcher of apply_rope_ (1D cos/sin table). Dispatches dtype, table dtype and pair layout.
#include "rope.cuh"

namespace tkpy::rope {
namespace {

template <typename T, typename TableT>
cudaError_t launch_typed(const Rope1dParams& p, cudaStream_t stream) {
    const Angles1d<TableT> angles{static_cast<const TableT*>(p.cos), static_cast<const TableT*>(p.sin),
                                  p.cos_row_stride, p.sin_row_stride, p.table_rows, p.positions,
                                  p.positions_int64, p.positions_batch_stride};
    return p.interleaved ? launch_rope<T, true>(p.x, angles, stream) : launch_rope<T, false>(p.x, angles, stream);
}

template <typename T>
cudaError_t launch_dtype(const Rope1dParams& p, cudaStream_t stream) {
    return p.table_dtype == DType::fp32 ? launch_typed<T, float>(p, stream) : launch_typed<T, T>(p, stream);
}

}  // namespace

cudaError_t launch_rope_1d(const Rope1dParams& p, cudaStream_t stream) {
    switch (p.x.dtype) {
        case DType::bf16: return launch_dtype<__nv_bfloat16>(p, stream);
        case DType::fp16: return launch_dtype<__half>(p, stream);
        case DType::fp32: return launch_typed<float, float>(p, stream);
        case DType::int8: break;
    }
    return cudaErrorInvalidValue;
}

}  // namespace tkpy::rope
