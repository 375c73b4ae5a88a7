// CPU implementations, called by the bindings with the same params structs the CUDA launchers take.
#pragma once

#include <c10/core/ScalarType.h>

#include <type_traits>

#include "tkpy/attention.h"
#include "tkpy/decode.h"
#include "tkpy/rope.h"

namespace tkpy::cpu {

// The ATen dtype of a params struct's DType, for the views the CPU paths compute on.
inline at::ScalarType scalar_type(DType dtype) {
    switch (dtype) {
        case DType::bf16: return at::kBFloat16;
        case DType::fp16: return at::kHalf;
        case DType::int8: return at::kChar;
        case DType::fp64: return at::kDouble;
        case DType::fp32: break;
    }
    return at::kFloat;
}

// The CPU attention paths compute in T, double for fp64 inputs and float otherwise, and read and
// write lse (and its gradient) in T: the params' fp64 pointers for fp64 inputs.
template <typename T>
T* lse_data(const attention::AttentionParams& p) {
    if constexpr (std::is_same_v<T, double>) {
        return p.lse_fp64;
    } else {
        return p.lse;
    }
}

// The softmax scale and softcap in T (as given, for double).
template <typename T>
T softmax_scale_of(const attention::AttentionParams& p) {
    return std::is_same_v<T, double> ? T(p.softmax_scale_fp64) : T(p.softmax_scale);
}

template <typename T>
T softcap_of(const attention::AttentionParams& p) {
    return std::is_same_v<T, double> ? T(p.softcap_fp64) : T(p.softcap);
}

template <typename T>
const T* dlse_data(const attention::AttentionBackwardParams& p) {
    if constexpr (std::is_same_v<T, double>) {
        return p.dlse_fp64;
    } else {
        return p.dlse;
    }
}

void rope_1d(const rope::Rope1dParams& params);
void rope_3d(const rope::Rope3dParams& params);

// Tiled online-softmax attention forward, parallel over (batch, head, query tile); cu_seqlens (if
// any) are host pointers. Computes in fp64 for fp64 inputs (lse in params.lse_fp64), else in fp32.
void attention_forward(const attention::AttentionParams& params);

// Attention backward on the forward's index math, parallel over (sequence, kv head); deterministic.
// Computes in the forward's precision (fp64 for fp64 inputs, else fp32).
void attention_backward(const attention::AttentionBackwardParams& params);

// Decode attention over a paged or contiguous KV cache (dense, or LServe's retrieval and streaming
// heads), parallel over (sequence, kv head, split) with the kernel's lse merge of splits; all
// pointers are host pointers.
void decode_attention(const decode::DecodeParams& params);

// Appends new tokens into the pools (rotary, page stats, int8 quantisation, the streaming ring),
// parallel over (sequence, kv head).
void kv_append(const decode::AppendParams& params);

}  // namespace tkpy::cpu
