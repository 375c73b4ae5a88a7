// UltraViCo's mean key k̄ (tkpy/detail/ultravico_index.h): for each (sequence, kv head), the mean of
// its keys in fp32, computed before the attention launch. Two passes in a fixed order, so that the
// result is the same run to run: each block of the first sums kKeyMeanChunk keys of one sequence
// and kv head (one thread per head dim, so each key row is read coalesced), the second adds a
// sequence's chunk sums in order and divides by its length.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "tkpy/attention.h"
#include "tkpy/detail/attention_index.h"

namespace tkpy::attention {
namespace {

__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline float to_float(__half x) { return __half2float(x); }

// Grid (chunks, heads_kv, batch), blockDim head_dim: workspace[b, h, chunk, d].
template <typename T>
__global__ void key_chunk_sums(const AttentionParams p, float* workspace) {
    const int chunk = blockIdx.x, h = blockIdx.y, b = blockIdx.z, d = threadIdx.x;
    const detail::Sequence seq = detail::sequence(p.cu_seqlens_k, b, p.seqlen_k, p.total_k);
    const int64_t batch_offset = p.cu_seqlens_k != nullptr ? 0 : b * p.k_batch_stride;
    const T* k = static_cast<const T*>(p.k) + batch_offset + seq.start * p.k_token_stride + h * p.k_head_stride + d;
    const int first = chunk * kKeyMeanChunk;
    const int last = seq.len < first + kKeyMeanChunk ? seq.len : first + kKeyMeanChunk;
    float sum = 0.f;
#pragma unroll 8
    for (int s = first; s < last; ++s) sum += to_float(k[s * p.k_token_stride]);
    workspace[((int64_t(b) * p.heads_kv + h) * gridDim.x + chunk) * p.head_dim + d] = sum;
}

// Grid (heads_kv, batch), blockDim head_dim: key_mean[b, h, d].
__global__ void key_mean_from_chunks(const AttentionParams p, const float* workspace, int chunks, float* key_mean) {
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const detail::Sequence seq = detail::sequence(p.cu_seqlens_k, b, p.seqlen_k, p.total_k);
    const float* sums = workspace + (int64_t(b) * p.heads_kv + h) * chunks * p.head_dim + d;
    float sum = 0.f;
    for (int c = 0; c < chunks; ++c) sum += sums[int64_t(c) * p.head_dim];
    key_mean[(int64_t(b) * p.heads_kv + h) * p.head_dim + d] = seq.len > 0 ? sum / float(seq.len) : 0.f;
}

template <typename T>
cudaError_t launch_typed(const AttentionParams& p, float* workspace, float* key_mean, cudaStream_t stream) {
    const int64_t chunks = (int64_t(p.seqlen_k) + kKeyMeanChunk - 1) / kKeyMeanChunk;
    if (p.batch == 0 || p.heads_kv == 0) return cudaSuccess;
    if (p.batch > 65535 || p.heads_kv > 65535) return cudaErrorInvalidValue;
    if (chunks > 0) {
        key_chunk_sums<T><<<dim3(unsigned(chunks), p.heads_kv, p.batch), p.head_dim, 0, stream>>>(p, workspace);
        if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    }
    key_mean_from_chunks<<<dim3(p.heads_kv, p.batch), p.head_dim, 0, stream>>>(p, workspace, int(chunks), key_mean);
    return cudaGetLastError();
}

}  // namespace

cudaError_t launch_key_mean(const AttentionParams& p, float* workspace, float* key_mean, cudaStream_t stream) {
    if (p.head_dim <= 0 || p.head_dim > 1024) return cudaErrorInvalidValue;
    switch (p.dtype) {
        case DType::bf16: return launch_typed<__nv_bfloat16>(p, workspace, key_mean, stream);
        case DType::fp16: return launch_typed<__half>(p, workspace, key_mean, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace tkpy::attention
