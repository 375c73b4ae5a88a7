// KV append: writes k/v [B, S_new, Hkv, D] into the pools at positions seqlens[b] + i, with
// optional RoPE on k, INT8 quantisation, streaming heads into their ring, and the min/max key stats
// of the main pool's logical pages.
//
// Two kernels on the stream, independent of each other (the stats never read the cache):
//   - store_kernel: one thread per (token, kv head, 8 channels): rotate, quantise or convert, one
//     16-byte (T) or 8-byte (int8) access each way when the layout allows it;
//   - stats_kernel: one thread per (sequence, touched logical page, main-pool head, channel): it
//     recomputes the rotated keys of the page's new tokens (at most 16) and folds in the stored
//     stats only when the page held tokens before the append; a page this append starts is reset.
//     Every output element has exactly one writer and a fixed order: deterministic, no atomics.
// Out-of-range positions or physical pages are skipped, never written; a position without a
// rotary table row stores NaN keys (the CPU path raises; a launch cannot sync to do so).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "tk/common/base.cuh"
#include "tkpy/decode.h"
#include "tkpy/detail/paged_index.h"
#include "tkpy/detail/rope_index.h"

namespace tkpy::decode {
namespace {

inline constexpr int kThreads = 256;
inline constexpr int kVec = 8;  // channels per store thread: 16 bytes of bf16/fp16

// kVec consecutive elements moved as one access when Vectorized, element by element otherwise.
template <typename T, bool Vectorized>
struct alignas(Vectorized ? kVec * sizeof(T) : sizeof(T)) Pack {
    T v[kVec];
};

// A pool pointer picked at run time (main pool or ring) is not known to be global, so plain stores
// through it would be generic: the vector path says st.global explicitly.
template <typename KV, bool Vectorized>
__device__ inline void store_global(Pack<KV, Vectorized>* dst, const Pack<KV, Vectorized>& x) {
    if constexpr (Vectorized && sizeof(x) == 16) {
        __stcg(reinterpret_cast<int4*>(dst), *reinterpret_cast<const int4*>(&x));
    } else if constexpr (Vectorized && sizeof(x) == 8) {
        __stcg(reinterpret_cast<uint2*>(dst), *reinterpret_cast<const uint2*>(&x));
    } else {
        *dst = x;
    }
}

template <typename T>
__device__ inline float table_value(const AppendParams& p, const void* table, int64_t index) {
    return p.rotary_dtype == DType::fp32 ? static_cast<const float*>(table)[index]
                                         : tk::to_float(static_cast<const T*>(table)[index]);
}

// Channel e of a new key row after RoPE at position pos (flash-attn's rotary_cos/sin rows, the
// pair layout of detail::rope_pair_elems); NaN when the table has no row for pos.
template <typename T>
__device__ inline float rotated_key(const AppendParams& p, const T* row, int e, int64_t pos) {
    if (p.rotary_cos == nullptr || e >= p.rotary_dim) return tk::to_float(row[e]);
    if (pos >= p.rotary_rows) return NAN;
    const int half = p.rotary_dim / 2;
    const int pair = p.rotary_interleaved ? e / 2 : (e < half ? e : e - half);
    const detail::PairElems pe = detail::rope_pair_elems(pair, p.rotary_dim, p.rotary_interleaved);
    const float c = table_value<T>(p, p.rotary_cos, pos * half + pair);
    const float s = table_value<T>(p, p.rotary_sin, pos * half + pair);
    float y0, y1;
    detail::rope_rotate(tk::to_float(row[pe.first]), tk::to_float(row[pe.second]), c, s, y0, y1);
    // The rotated key in k's dtype, as the CPU path keeps it: stats (and int8 codes) then come
    // from the key a bf16/fp16 pool stores.
    return tk::to_float(tk::from_float<T>(e == pe.first ? y0 : y1));
}

// Where token `pos` of sequence b's kv head h goes: its pool's k and v and the element offset, or
// offset -1 when it is not stored (a streaming token its ring no longer keeps, a page outside the
// table or the pool). Pools are copied by value: pointers read through the address of a kernel
// parameter would compile to generic, not global, accesses.
struct Destination {
    void* k;
    void* v;
    int64_t offset;
};

__device__ inline Destination destination(const AppendParams& p, int b, int64_t pos, int new_len, int h) {
    const int slot = p.heads.kv_head_slot != nullptr ? p.heads.kv_head_slot[h] : h;
    int64_t phys;
    int64_t in_page;
    int head;
    KVPool pool;
    if (slot < 0) {
        if (!p.heads.ring.keeps(int(pos), new_len)) return Destination{nullptr, nullptr, -1};
        pool = p.ring;
        phys = detail::ring_physical_page(p.heads, b, int(pos / detail::kLServePage));
        in_page = pos % detail::kLServePage;
        head = -1 - slot;
    } else {
        pool = p.cache;
        const int n = int(pos / p.table.page_size);
        if (!detail::page_in_table(p.table, n)) return Destination{nullptr, nullptr, -1};
        phys = detail::physical_page(p.table, b, n);
        in_page = pos - int64_t(n) * p.table.page_size;
        head = slot;
    }
    if (phys < 0 || phys >= pool.num_pages || head < 0 || head >= pool.heads) return Destination{nullptr, nullptr, -1};
    return Destination{pool.k, pool.v, phys * pool.page_stride + in_page * pool.token_stride + int64_t(head) * pool.head_stride};
}

template <typename T, typename KV, bool Vectorized>
__global__ void __launch_bounds__(kThreads) store_kernel(const __grid_constant__ AppendParams p) {
    const int vecs = p.head_dim / kVec;
    const int64_t total = int64_t(p.batch) * p.seqlen_new * p.heads_kv * vecs;
    const int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x;
    if (idx >= total) return;
    const int e0 = int(idx % vecs) * kVec;
    int64_t rest = idx / vecs;
    const int h = int(rest % p.heads_kv);
    rest /= p.heads_kv;
    const int i = int(rest % p.seqlen_new);
    const int b = int(rest / p.seqlen_new);
    const int old_len = p.seqlens[b];
    const int64_t pos = int64_t(old_len) + i;
    const Destination dst = destination(p, b, pos, old_len + p.seqlen_new, h);
    if (dst.offset < 0) return;

    const T* k_row = static_cast<const T*>(p.k) + b * p.k_batch_stride + i * p.k_token_stride + h * p.k_head_stride;
    const T* v_row = static_cast<const T*>(p.v) + b * p.v_batch_stride + i * p.v_token_stride + h * p.v_head_stride;
    const Pack<T, Vectorized> k_in = *reinterpret_cast<const Pack<T, Vectorized>*>(k_row + e0);
    const Pack<T, Vectorized> v_in = *reinterpret_cast<const Pack<T, Vectorized>*>(v_row + e0);
    Pack<KV, Vectorized> k_out, v_out;
    const bool rotary = p.rotary_cos != nullptr;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
        const float kf = rotary && e0 + e < p.rotary_dim ? rotated_key(p, k_row, e0 + e, pos) : tk::to_float(k_in.v[e]);
        const float vf = tk::to_float(v_in.v[e]);
        if constexpr (std::is_same_v<KV, int8_t>) {
            k_out.v[e] = detail::quantize_int8(kf, 1.f / p.k_scale);
            v_out.v[e] = detail::quantize_int8(vf, 1.f / p.v_scale);
        } else {
            k_out.v[e] = tk::from_float<T>(kf);
            v_out.v[e] = tk::from_float<T>(vf);
        }
    }
    store_global(reinterpret_cast<Pack<KV, Vectorized>*>(static_cast<KV*>(dst.k) + dst.offset + e0), k_out);
    store_global(reinterpret_cast<Pack<KV, Vectorized>*>(static_cast<KV*>(dst.v) + dst.offset + e0), v_out);
}

// min / max that keep a NaN (a key without a rotary row), where fminf / fmaxf would drop it.
__device__ inline float min_keep_nan(float a, float b) { return (a != a || a < b) ? a : b; }
__device__ inline float max_keep_nan(float a, float b) { return (a != a || a > b) ? a : b; }

template <typename T>
__global__ void __launch_bounds__(kThreads) stats_kernel(const __grid_constant__ AppendParams p, int max_touched) {
    const int64_t total = int64_t(p.batch) * max_touched * p.heads_kv * p.head_dim;
    const int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x;
    if (idx >= total) return;
    const int c = int(idx % p.head_dim);
    int64_t rest = idx / p.head_dim;
    const int h = int(rest % p.heads_kv);
    rest /= p.heads_kv;
    const int u = int(rest % max_touched);
    const int b = int(rest / max_touched);
    const int slot = p.heads.kv_head_slot != nullptr ? p.heads.kv_head_slot[h] : h;
    if (slot < 0 || slot >= p.cache.heads) return;  // streaming heads keep no stats
    const int old_len = p.seqlens[b];
    const int new_len = old_len + p.seqlen_new;
    const detail::Range touched = detail::touched_logical_pages(old_len, new_len);
    const int logical = touched.lo + u;
    if (logical >= touched.hi) return;

    const int first = logical * detail::kLogicalPage;
    const int ps = p.table.page_size;
    const int n = first / ps;
    if (!detail::page_in_table(p.table, n)) return;
    const int64_t phys = detail::physical_page(p.table, b, n);
    if (phys < 0 || phys >= p.cache.num_pages) return;
    const int per_page = ps / detail::kLogicalPage;
    const int64_t at = ((phys * per_page + (first - n * ps) / detail::kLogicalPage) * p.cache.heads + slot) * p.head_dim + c;

    const int lo = old_len > first ? old_len : first;
    const int hi = new_len < first + detail::kLogicalPage ? new_len : first + detail::kLogicalPage;
    float mn = INFINITY;
    float mx = -INFINITY;
    for (int pos = lo; pos < hi; ++pos) {
        const T* row = static_cast<const T*>(p.k) + b * p.k_batch_stride + (pos - old_len) * p.k_token_stride +
                       h * p.k_head_stride;
        const float x = rotated_key(p, row, c, pos);
        mn = min_keep_nan(mn, x);
        mx = max_keep_nan(mx, x);
    }
    if (old_len > first) {  // the page already held keys: their stats are stored
        mn = min_keep_nan(mn, p.k_min[at]);
        mx = max_keep_nan(mx, p.k_max[at]);
    }
    p.k_min[at] = mn;
    p.k_max[at] = mx;
}

// 16-byte (8-byte for int8 pools) accesses need aligned bases and strides in whole vectors.
bool can_vectorize(const AppendParams& p, int kv_bytes) {
    const auto aligned = [](const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
    const auto whole = [](int64_t stride) { return stride % kVec == 0; };
    const auto pool_ok = [&](const KVPool& pool) {
        return pool.k == nullptr || (aligned(pool.k, kVec * kv_bytes) && aligned(pool.v, kVec * kv_bytes) &&
                                     whole(pool.page_stride) && whole(pool.token_stride) && whole(pool.head_stride));
    };
    return aligned(p.k, 16) && aligned(p.v, 16) && whole(p.k_batch_stride) && whole(p.k_token_stride) &&
           whole(p.k_head_stride) && whole(p.v_batch_stride) && whole(p.v_token_stride) && whole(p.v_head_stride) &&
           pool_ok(p.cache) && (p.heads.kv_head_slot == nullptr || pool_ok(p.ring));
}

template <typename T, typename KV>
cudaError_t launch_store(const AppendParams& p, cudaStream_t stream) {
    const int64_t total = int64_t(p.batch) * p.seqlen_new * p.heads_kv * (p.head_dim / kVec);
    const unsigned grid = unsigned((total + kThreads - 1) / kThreads);
    if (can_vectorize(p, int(sizeof(KV)))) {
        store_kernel<T, KV, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
        store_kernel<T, KV, false><<<grid, kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const AppendParams& p, cudaStream_t stream) {
    cudaError_t err = p.kv_dtype == DType::int8 ? launch_store<T, int8_t>(p, stream)
                      : p.kv_dtype == p.dtype   ? launch_store<T, T>(p, stream)
                                                : cudaErrorInvalidValue;
    if (err != cudaSuccess || p.k_min == nullptr || p.k_max == nullptr) return err;
    // An append of S tokens touches at most ceil(S / 16) + 1 logical pages (one more when it
    // starts inside a page).
    const int max_touched = (p.seqlen_new + detail::kLogicalPage - 1) / detail::kLogicalPage + 1;
    const int64_t total = int64_t(p.batch) * max_touched * p.heads_kv * p.head_dim;
    stats_kernel<T><<<unsigned((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p, max_touched);
    return cudaGetLastError();
}

}  // namespace

cudaError_t launch_kv_append(const AppendParams& p, cudaStream_t stream) {
    if (p.head_dim % kVec != 0 || p.heads_kv <= 0 || p.table.page_size <= 0) return cudaErrorInvalidValue;
    if (p.k_min != nullptr && p.table.page_size % detail::kLogicalPage != 0) return cudaErrorInvalidValue;
    if (p.batch == 0 || p.seqlen_new == 0) return cudaSuccess;
    switch (p.dtype) {
        case DType::bf16: return launch_typed<__nv_bfloat16>(p, stream);
        case DType::fp16: return launch_typed<__half>(p, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace tkpy::decode
