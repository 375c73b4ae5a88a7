// Launcher of apply_rope_3d_ (per-axis tables, (t, h, w) token grid, interleaved pairs).
#include "rope.cuh"

namespace tkpy::rope {
namespace {

template <typename T>
cudaError_t launch_typed(const Rope3dParams& p, cudaStream_t stream) {
    const Angles3d angles{p.table[0], p.table[1], p.table[2],
                          p.table_row_stride[0], p.table_row_stride[1], p.table_row_stride[2],
                          p.pairs[0], p.pairs[1], p.grid[1], p.grid[2]};
    return launch_rope<T, true>(p.x, angles, stream);
}

}  // namespace

cudaError_t launch_rope_3d(const Rope3dParams& p, cudaStream_t stream) {
    switch (p.x.dtype) {
        case DType::bf16: return launch_typed<__nv_bfloat16>(p, stream);
        case DType::fp16: return launch_typed<__half>(p, stream);
        case DType::fp32: return launch_typed<float>(p, stream);
        case DType::int8: break;
    }
    return cudaErrorInvalidValue;
}

}  // namespace tkpy::rope
