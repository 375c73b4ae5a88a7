// Self-test of the warp-scope tensor-core path (see include/tkpy/tk_selftest.h, launch_warp_mma):
// cp.async into swizzled tiles through row_cursor, ldmatrix (plain and transposed) and
// mma.sync m16n8k16, each used the way csrc/kernels/decode/decode_attention.cu uses it, so a wrong
// fragment mapping or zero-fill shows up here on its own rather than inside decode's numbers.
// Its own translation unit: 36 small instantiations build in parallel with selftest.cu.
#include <cstdint>
#include <type_traits>

#include "tk/tk.cuh"
#include "tkpy/tk_selftest.h"

namespace tkpy::tk_selftest {
namespace {

inline constexpr int kMaxWarps = kWarpMmaMaxRows / 16;

template <typename T, int K, int N, bool Transposed>
struct WarpMmaKernel {
    // 128-byte swizzle (what row_cursor walks) needs rows of 64 16-bit elements; a 16-wide operand
    // sits in the first 16 columns of such a tile, the rest never copied nor read.
    static constexpr int k_cols = K < 64 ? 64 : K;
    static constexpr int n_cols = N < 64 ? 64 : N;
    using a_tile = tk::st<T, kWarpMmaMaxRows, k_cols>;  // rows past p.rows never read
    // b as the decode kernel holds K ([keys][d], read by ldsm_rows) or V ([keys][d], read by
    // ldsm_rows_transposed as the [d][keys] operand of P·V).
    using b_tile = std::conditional_t<Transposed, tk::st<T, K, n_cols>, tk::st<T, N, k_cols>>;
    using eye_tile = tk::st<T, 16, 64>;  // I (16x16) in its first 16 columns: AB's first product
    struct smem {
        a_tile a;
        b_tile b;
        eye_tile eye;
    };
    static constexpr int smem_bytes = int(sizeof(smem)) + tk::layout::kTileAlignment;
};

// Rows [0, rows) of the row-major [*, Cols] src into dst, rows at and past `valid` zero-filled by
// cp.async without reading src: decode's issue_chunk, two threads per row taking alternate 16-byte
// units, a thread's units one row_cursor apart (step u = 16 columns on).
template <int Cols, typename ST>
__device__ inline void copy_rows(ST& dst, const typename ST::dtype* src, int rows, int valid) {
    constexpr int unit_elems = 16 / int(sizeof(typename ST::dtype));
    static_assert(Cols % (2 * unit_elems) == 0, "copy_rows: two threads per row, whole 16-byte units each");
    for (int i = threadIdx.x; i < 2 * rows; i += blockDim.x) {
        const int r = i / 2;
        const int unit = i % 2;
        const bool ok = r < valid;
        // A zero-filled row passes src itself: cp.async with src-size 0 reads nothing there.
        const typename ST::dtype* row_src = src + (ok ? int64_t(r) * Cols + unit * unit_elems : 0);
        const auto cursor = tk::make_row_cursor(dst, r, unit * unit_elems);
#pragma unroll
        for (int u = 0; u < Cols / (2 * unit_elems); ++u) {
            tk::cp_async::copy16(cursor.at(u), row_src + (ok ? 2 * unit_elems * u : 0), ok);
        }
    }
}

template <typename T, int K, int N, bool Transposed>
__global__ void __launch_bounds__(kMaxWarps * tk::kWarpThreads) warp_mma_kernel(const WarpMmaParams p) {
    using W = WarpMmaKernel<T, K, N, Transposed>;
    extern __shared__ char raw_smem[];
    tk::smem_allocator alloc(raw_smem);
    auto& s = *alloc.allocate<typename W::smem>();

    copy_rows<K>(s.a, static_cast<const T*>(p.a), p.rows, p.rows);
    copy_rows<Transposed ? N : K>(s.b, static_cast<const T*>(p.b), Transposed ? K : N, p.b_valid_rows);
    tk::cp_async::commit();
    if constexpr (Transposed) {
        for (int i = threadIdx.x; i < 16 * 16; i += blockDim.x) {
            *s.eye.ptr(i / 16, i % 16) = tk::from_float<T>(i / 16 == i % 16 ? 1.f : 0.f);
        }
    }
    tk::cp_async::wait<0>();
    __syncthreads();  // every thread's copies (and the identity) have landed

    const int warp = tk::warpid();
    const auto a_rows = tk::warp::ldsm_rows(s.a, 16 * warp, 0);  // decode's q_rows
    tk::rt_fl<16, N> c;
    if constexpr (!Transposed) {
        // S = Q·Kᵀ: per 16 columns of c (16 keys), reduce over k 16 at a time.
        tk::warp::zero(c);
#pragma unroll
        for (int n = 0; n < N / 16; ++n) {
            tk::rt_base<float>& x = c.tiles[0][n];
            const auto b_rows = tk::warp::ldsm_rows(s.b, 16 * n, 0);
#pragma unroll
            for (int kk = 0; kk < K / 16; ++kk) {
                tk::rt_base<T> qa, kb;
                tk::warp::load_base(qa, a_rows, kk);
                tk::warp::load_base(kb, b_rows, kk);
                tk::warp::mma_ABt(x, qa, kb);
            }
        }
    } else {
        // O += P·V: per 16 columns of a (decode's 16-key group), an fp32 accumulator x made by the
        // S path (a's block times Iᵀ, exact), repacked register for register into a 16-bit A
        // fragment exactly as decode packs P, then times b's 16 rows through ldmatrix.trans.
        tk::warp::zero(c);
        tk::rt_base<T> eye;
        tk::warp::load_base(eye, tk::warp::ldsm_rows(s.eye, 0, 0), 0);
#pragma unroll
        for (int kk = 0; kk < K / 16; ++kk) {
            tk::rt_fl<16, 16> x;
            tk::warp::zero(x);
            tk::rt_base<T> qa;
            tk::warp::load_base(qa, a_rows, kk);
            tk::warp::mma_ABt(x.tiles[0][0], qa, eye);
            tk::rt<T, 16, 16> prob;
            tk::warp::copy(prob, x);
            const auto v_cols = tk::warp::ldsm_rows_transposed(s.b, 16 * kk, 0);
#pragma unroll
            for (int n = 0; n < N / 16; ++n) {
                tk::rt_base<T> vb;
                tk::warp::load_base_transposed(vb, v_cols, n);
                tk::warp::mma_ABt(c.tiles[0][n], prob.tiles[0][0], vb);
            }
        }
    }
    tk::warp::store(tk::gl<float>{p.c, p.rows, N, N}, c, 16 * warp, 0);
}

template <typename T, int K, int N, bool Transposed>
cudaError_t warp_mma_typed(const WarpMmaParams& p, cudaStream_t stream) {
    using W = WarpMmaKernel<T, K, N, Transposed>;
    auto* kernel = warp_mma_kernel<T, K, N, Transposed>;
    const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, W::smem_bytes);
    if (attr != cudaSuccess) return attr;
    kernel<<<1, (p.rows / 16) * tk::kWarpThreads, W::smem_bytes, stream>>>(p);
    return cudaGetLastError();
}

template <typename T, int K, int N>
cudaError_t warp_mma_variant(const WarpMmaParams& p, cudaStream_t stream) {
    return p.variant == WarpMmaVariant::AB ? warp_mma_typed<T, K, N, true>(p, stream)
                                           : warp_mma_typed<T, K, N, false>(p, stream);
}

template <typename T, int K>
cudaError_t warp_mma_n(const WarpMmaParams& p, cudaStream_t stream) {
    switch (p.n) {
        case 16: return warp_mma_variant<T, K, 16>(p, stream);
        case 64: return warp_mma_variant<T, K, 64>(p, stream);
        case 128: return warp_mma_variant<T, K, 128>(p, stream);
    }
    return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t warp_mma_k(const WarpMmaParams& p, cudaStream_t stream) {
    switch (p.k) {
        case 16: return warp_mma_n<T, 16>(p, stream);
        case 64: return warp_mma_n<T, 64>(p, stream);
        case 128: return warp_mma_n<T, 128>(p, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_warp_mma(const WarpMmaParams& p, cudaStream_t stream) {
    if (!warp_mma_supported(p.dtype, p.rows, p.n, p.k)) return cudaErrorInvalidValue;
    if (p.variant != WarpMmaVariant::ABt && p.variant != WarpMmaVariant::AB) return cudaErrorInvalidValue;
    const int b_rows = p.variant == WarpMmaVariant::AB ? p.k : p.n;
    if (p.b_valid_rows < 0 || p.b_valid_rows > b_rows) return cudaErrorInvalidValue;
    const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
    if (!aligned(p.a) || !aligned(p.b)) return cudaErrorMisalignedAddress;
    return p.dtype == DType::fp16 ? warp_mma_k<tk::half>(p, stream) : warp_mma_k<tk::bf16>(p, stream);
}

}  // namespace tkpy::tk_selftest
