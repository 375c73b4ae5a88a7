// Attention backward: the preprocessing (lse, delta) and conversion (dq) kernels around the
// key-block-stationary kernel (attention_bwd.cuh), and the head-dim dispatch.
#include "attention_bwd.cuh"

namespace tkpy::attention {
namespace {

constexpr int kWarpsPerBlock = 8;

// Query row r (of batch * seqlen_q rows, or total_q packed ones): its batch and token.
struct QueryRow {
    int64_t batch;
    int64_t token;
};

__device__ inline QueryRow query_row(const AttentionParams& p, int64_t r) {
    if (p.cu_seqlens_q != nullptr) return QueryRow{0, r};
    return QueryRow{r / p.seqlen_q, r % p.seqlen_q};
}

// Per (sequence, head, query) of the padded layout, one warp each: lse · log2(e) and
// delta = rowsum(dO ∘ O) - dlse in fp32; 0 and 0 past the sequence's end, where the kernel's masks
// drop them (finite, so that a masked weight of 0 times them stays 0).
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) bwd_row_stats_kernel(const __grid_constant__ AttentionBackwardParams bp) {
    const AttentionParams& p = bp.fwd;
    const int64_t padded = padded_query_rows(p);
    const int64_t item = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;  // (batch, head, row)
    if (item >= int64_t(p.batch) * p.heads_q * padded) return;
    const int i = int(item % padded);
    const int head = int(item / padded % p.heads_q);
    const int batch = int(item / padded / p.heads_q);
    const detail::Sequence seq = detail::sequence(p.cu_seqlens_q, batch, p.seqlen_q, p.total_q);
    float lse = 0.f, delta = 0.f;
    if (i < seq.len) {
        const int64_t b = p.cu_seqlens_q != nullptr ? 0 : batch;
        const int64_t token = seq.start + i;
        const T* out = static_cast<const T*>(p.out) + b * p.o_batch_stride + token * p.o_token_stride +
                       head * p.o_head_stride;
        const T* dout = static_cast<const T*>(bp.dout) + b * bp.do_batch_stride + token * bp.do_token_stride +
                        head * bp.do_head_stride;
        for (int d = 2 * tk::laneid(); d < p.head_dim; d += 64) {
            const float2 o = tk::to_float2<T>(*reinterpret_cast<const tk::packed_t<T>*>(out + d));
            const float2 g = tk::to_float2<T>(*reinterpret_cast<const tk::packed_t<T>*>(dout + d));
            delta += o.x * g.x + o.y * g.y;
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) delta += __shfl_xor_sync(0xffffffffu, delta, offset);
        const int64_t at = batch * p.lse_batch_stride + head * p.lse_head_stride + token;
        lse = p.lse[at] * tk::kLog2e;
        if (bp.dlse != nullptr) delta -= bp.dlse[at];
    }
    if (tk::laneid() == 0) {
        bp.lse_log2[item] = lse;
        bp.delta[item] = delta;
    }
}

// Each block-sparse list's count cut to the list's ascending prefix, as the forward's walk cuts
// it (detail::ascending_prefix), one thread per list row: the backward's binary searches then see
// exactly the blocks the forward visited, even in lists nobody checked.
__global__ void bwd_ascending_counts_kernel(const __grid_constant__ detail::SparseHeads heads, int64_t rows,
                                            int32_t* counts) {
    const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const int32_t listed = heads.block_counts[row];
    const int limit = listed < 0 ? 0 : (listed > heads.mask_k_blocks ? heads.mask_k_blocks : listed);
    counts[row] = detail::ascending_prefix(heads.block_indices + row * heads.mask_k_blocks, limit);
}

// dq = dq_accum · scale, converted; two columns per thread.
template <typename T>
__global__ void bwd_dq_kernel(const __grid_constant__ AttentionBackwardParams bp, int64_t rows) {
    const AttentionParams& p = bp.fwd;
    const int pairs = p.head_dim / 2;
    const int64_t count = rows * p.heads_q * pairs;
    const int64_t acc_rows = p.cu_seqlens_q != nullptr ? p.total_q : p.seqlen_q;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
        const int d = int(i % pairs) * 2;
        const int head = int(i / pairs % p.heads_q);
        const QueryRow q = query_row(p, i / pairs / p.heads_q);
        const float2 acc = *reinterpret_cast<const float2*>(
            bp.dq_accum + ((q.batch * p.heads_q + head) * acc_rows + q.token) * p.head_dim + d);
        T* dq = static_cast<T*>(bp.dq) + q.batch * bp.dq_batch_stride + q.token * bp.dq_token_stride +
                head * bp.dq_head_stride + d;
        *reinterpret_cast<tk::packed_t<T>*>(dq) =
            tk::from_float2<T>(make_float2(acc.x * p.softmax_scale, acc.y * p.softmax_scale));
    }
}

template <typename T>
cudaError_t launch_typed(const AttentionBackwardParams& given, cudaStream_t stream) {
    AttentionBackwardParams bp = given;
    const AttentionParams& p = bp.fwd;
    const int64_t rows = p.cu_seqlens_q != nullptr ? p.total_q : int64_t(p.batch) * p.seqlen_q;
    const AttentionBackwardWorkspace ws = attention_backward_workspace(p, bp.deterministic);
    if (bp.deterministic != (bp.dq_semaphore != nullptr)) return cudaErrorInvalidValue;
    if (ws.ascending_counts > 0 && bp.ascending_counts == nullptr) return cudaErrorInvalidValue;
    cudaError_t err = cudaMemsetAsync(bp.dq_accum, 0, size_t(ws.dq_accum) * sizeof(float), stream);
    if (err == cudaSuccess && bp.deterministic) {
        err = cudaMemsetAsync(bp.dq_semaphore, 0, size_t(ws.dq_semaphore) * sizeof(int32_t), stream);
    }
    if (err != cudaSuccess) return err;
    if (ws.ascending_counts > 0) {
        const int64_t blocks = (ws.ascending_counts + 255) / 256;
        if (blocks > INT32_MAX) return cudaErrorInvalidValue;
        bwd_ascending_counts_kernel<<<unsigned(blocks), 256, 0, stream>>>(p.sparse, ws.ascending_counts,
                                                                         bp.ascending_counts);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
        bp.fwd.sparse.block_counts = bp.ascending_counts;
    }
    const int64_t stats = ws.row_stats;
    if (stats > 0) {
        const int64_t blocks = (stats + kWarpsPerBlock - 1) / kWarpsPerBlock;
        if (blocks > INT32_MAX) return cudaErrorInvalidValue;
        bwd_row_stats_kernel<T><<<unsigned(blocks), kWarpsPerBlock * 32, 0, stream>>>(bp);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    switch (p.head_dim) {
        case 64: err = launch_bwd_d64(bp, stream); break;
        case 128: err = launch_bwd_d128(bp, stream); break;
        case 256: err = launch_bwd_d256(bp, stream); break;
        default: return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess || rows == 0) return err;
    const int sms = tk::sm_count();
    bwd_dq_kernel<T><<<(sms > 0 ? sms : 132) * 4, 256, 0, stream>>>(bp, rows);
    return cudaGetLastError();
}

}  // namespace

cudaError_t launch_attention_backward(const AttentionBackwardParams& bp, cudaStream_t stream) {
    if (bp.fwd.dtype == DType::bf16) return launch_typed<tk::bf16>(bp, stream);
    if (bp.fwd.dtype == DType::fp16) return launch_typed<tk::half>(bp, stream);
    return cudaErrorInvalidValue;
}

}  // namespace tkpy::attention
