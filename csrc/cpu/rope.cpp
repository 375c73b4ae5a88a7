// CPU implementations of the RoPE ops, on the same params structs and index math as the kernels.
#include "cpu/cpu_ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <utility>
#include <vector>

#include "tkpy/detail/rope_index.h"

namespace tkpy::cpu {
namespace {

using rope::RopeTensors;
using rope::RotatedTensor;

// Tokens per parallel task: enough work per task to hide scheduling overhead.
constexpr int64_t kGrainTokens = 16;

template <typename T>
void rotate_head(T* head, const std::vector<std::pair<float, float>>& angles, int rotary_dim, bool interleaved) {
    for (int p = 0; p < rotary_dim / 2; ++p) {
        const detail::PairElems e = detail::rope_pair_elems(p, rotary_dim, interleaved);
        float y0, y1;
        detail::rope_rotate(static_cast<float>(head[e.first]), static_cast<float>(head[e.second]), angles[p].first,
                            angles[p].second, y0, y1);
        head[e.first] = static_cast<T>(y0);
        head[e.second] = static_cast<T>(y1);
    }
}

template <typename T>
void rotate_token_heads(const RotatedTensor& r, int64_t b, int64_t s,
                        const std::vector<std::pair<float, float>>& angles, int rotary_dim, bool interleaved) {
    T* const base = static_cast<T*>(r.data) + b * r.batch_stride + s * r.token_stride;
    for (int h = 0; h < r.heads; ++h) rotate_head(base + h * r.head_stride, angles, rotary_dim, interleaved);
}

// Runs `fill(b, s, angles)` then rotates every q and k head of the token, for every token.
template <typename T, typename Fill>
void rope_loop(const RopeTensors& x, bool interleaved, const Fill& fill) {
    at::parallel_for(0, x.batch * x.seqlen, kGrainTokens, [&](int64_t begin, int64_t end) {
        std::vector<std::pair<float, float>> angles(x.rotary_dim / 2);
        for (int64_t token = begin; token < end; ++token) {
            const int64_t b = token / x.seqlen;
            const int64_t s = token % x.seqlen;
            fill(b, s, angles);
            rotate_token_heads<T>(x.q, b, s, angles, x.rotary_dim, interleaved);
            if (x.k.data != nullptr) rotate_token_heads<T>(x.k, b, s, angles, x.rotary_dim, interleaved);
        }
    });
}

template <typename T, typename TableT>
void rope_1d_typed(const rope::Rope1dParams& p) {
    const auto* cos = static_cast<const TableT*>(p.cos);
    const auto* sin = static_cast<const TableT*>(p.sin);
    rope_loop<T>(p.x, p.interleaved, [&](int64_t b, int64_t s, std::vector<std::pair<float, float>>& angles) {
        const int64_t pos =
            p.positions_int64
                ? detail::rope_position(static_cast<const int64_t*>(p.positions), p.positions_batch_stride, b, s, p.table_rows)
                : detail::rope_position(static_cast<const int32_t*>(p.positions), p.positions_batch_stride, b, s, p.table_rows);
        TORCH_CHECK_VALUE(pos >= 0, "apply_rope_: position of token (batch ", b, ", seq ", s,
                          ") is outside the cos/sin table of ", p.table_rows, " rows");
        for (size_t i = 0; i < angles.size(); ++i) {
            angles[i] = {static_cast<float>(cos[pos * p.cos_row_stride + i]),
                         static_cast<float>(sin[pos * p.sin_row_stride + i])};
        }
    });
}

template <typename T>
void rope_1d_dtype(const rope::Rope1dParams& p) {
    if (p.table_dtype == DType::fp32) {
        rope_1d_typed<T, float>(p);
    } else {
        rope_1d_typed<T, T>(p);
    }
}

template <typename T>
void rope_3d_typed(const rope::Rope3dParams& p) {
    rope_loop<T>(p.x, /*interleaved=*/true, [&](int64_t, int64_t s, std::vector<std::pair<float, float>>& angles) {
        const detail::GridCoord c = detail::rope_grid_coord(s, p.grid[1], p.grid[2]);
        const int coord[3] = {c.t, c.h, c.w};
        for (int i = 0; i < static_cast<int>(angles.size()); ++i) {
            const detail::AxisPair ap = detail::rope_3d_axis_pair(i, p.pairs[0], p.pairs[1]);
            const float* entry = p.table[ap.axis] + coord[ap.axis] * p.table_row_stride[ap.axis] + 2 * ap.index;
            angles[i] = {entry[0], entry[1]};
        }
    });
}

}  // namespace

void rope_1d(const rope::Rope1dParams& p) {
    switch (p.x.dtype) {
        case DType::bf16: return rope_1d_dtype<c10::BFloat16>(p);
        case DType::fp16: return rope_1d_dtype<c10::Half>(p);
        case DType::fp32: return rope_1d_typed<float, float>(p);
        case DType::int8:
        case DType::fp64: break;
    }
    TORCH_CHECK(false, "rope: the bindings pass only bf16, fp16 and fp32 tensors");
}

void rope_3d(const rope::Rope3dParams& p) {
    switch (p.x.dtype) {
        case DType::bf16: return rope_3d_typed<c10::BFloat16>(p);
        case DType::fp16: return rope_3d_typed<c10::Half>(p);
        case DType::fp32: return rope_3d_typed<float>(p);
        case DType::int8:
        case DType::fp64: break;
    }
    TORCH_CHECK(false, "rope: the bindings pass only bf16, fp16 and fp32 tensors");
}

}  // namespace tkpy::cpu
