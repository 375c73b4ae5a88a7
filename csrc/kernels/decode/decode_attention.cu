// Decode attention over a paged (or contiguous) KV cache: split-KV flash-decoding, dense and LServe
// (retrieval heads over selected pages, streaming heads over their ring) in one launch.
//
// One CTA per (sequence x row chunk, kv head, split). Its rows are the query rows of the kv head's
// GQA group, row = i * group + j for query i and query head h * group + j, up to 16 * MTiles per
// CTA. It walks entries detail::split_range(plan.size(), num_splits, split) of
// detail::decode_plan(...) as one stream of key slots (entry after entry, each entry's tokens in
// order; only the sequence's newest page can be partial, and it is the plan's last entry), cut into
// 64-slot chunks:
//   - four threads describe each chunk's 16-slot key groups a few chunks ahead (page lookup,
//     physical page, pool offset, head bits) into shared memory, so page-table latency never
//     stalls the loads; a 16-slot group never straddles a page (page_size % 16 == 0, or one page);
//   - every thread gathers K and V of a chunk with 16-byte cp.async into a ring of shared-memory
//     stages (multi-stage, so loads of later chunks overlap compute); slots past the sequence are
//     zero-filled, never read;
//   - each page is therefore read once per CTA and serves all the group's query heads and rows;
//   - warp w owns 16 rows (tile w % MTiles) and key groups w / MTiles, w / MTiles + 4 / MTiles, ...
//     of every chunk, with its own fp32 online softmax (tk::softmax_state) and O;
//   - at the end the warps of a row tile are combined through shared memory and written: out / lse
//     (one split), or fp32 partials that merge_kernel combines by lse.
// Tensor cores (mma.sync m16n8k16, tk::warp::mma_ABt) rather than CUDA-core FMAs: a group of 32
// query heads does 32 FMAs per loaded K or V element, about 55 TFMA/s at full HBM bandwidth, more
// than the CUDA cores sustain; with mma.sync the math stays far below the memory time at any group
// size, and Sq > 1 (speculative decode) costs nothing extra.
// INT8 pools are converted in shared memory to q's type (exact: |x| <= 127); k_scale is folded into
// the score scale and v_scale into the final normalisation.
// A physical page outside its pool is never read: the (sequence, kv head)'s rows become NaN.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "tk/tk.cuh"
#include "tkpy/decode.h"
#include "tkpy/detail/attention_index.h"
#include "tkpy/detail/paged_index.h"

namespace tkpy::decode {
namespace {

inline constexpr int kWarps = 4;
inline constexpr int kThreads = kWarps * tk::kWarpThreads;
inline constexpr int kChunkSlots = 64;  // key slots per pipeline stage
inline constexpr int kGroupSlots = 16;  // keys of one warp mma step
inline constexpr int kGroups = kChunkSlots / kGroupSlots;
inline constexpr int kMergeThreads = 128;
static_assert(kGroups == kWarps, "decode: each warp of a row tile takes whole 16-key groups of a chunk");

// Per-head-dim pipeline depth: 64-key stages of K and V (16, 32, 64 KiB at D = 64, 128, 256) keep
// 48-96 KiB in flight per CTA, several times what one SM needs to cover HBM latency at its share
// of the bandwidth, while D <= 128 still fits two CTAs per SM.
template <int D>
struct decode_tile;
template <>
struct decode_tile<64> {
    static constexpr int stages = 4;
};
template <>
struct decode_tile<128> {
    static constexpr int stages = 3;
};
template <>
struct decode_tile<256> {
    static constexpr int stages = 2;
};

// A 16-slot group of a chunk: `count` consecutive tokens from token0 (0: empty), at `offset`
// elements into the pool (K and V alike), attended by the query heads in `heads`.
struct KeyGroup {
    int64_t offset;
    int token0;
    int count;
    uint32_t heads;
};

// What a CTA attends: its plan, entry range, pool and key-slot stream.
struct Walk {
    detail::DecodePlan plan;
    detail::Range entries;
    KVPool pool;
    int slots;  // key slots of the stream: whole entries, the last one up to the sequence's end
};

__device__ inline Walk make_walk(const DecodeParams& p, int b, int h, int split) {
    Walk w;
    w.plan = detail::decode_plan(p.heads, b, h, p.heads_kv, p.seqlens[b], p.table.page_size, p.seqlen_q,
                                 p.window_left, p.window_right);
    w.entries = detail::split_range(w.plan.size(), p.num_splits, split);
    w.pool = w.plan.kind == detail::PlanKind::streaming ? p.ring : p.cache;
    w.slots = 0;
    const int ps = p.table.page_size;
    if (w.entries.hi > w.entries.lo) {
        const int64_t last_start = int64_t(w.plan.page(w.entries.hi - 1)) * ps;
        const int64_t last = w.plan.len - last_start;
        w.slots = (w.entries.hi - w.entries.lo - 1) * ps + int(last < 0 ? 0 : (last > ps ? ps : last));
    }
    return w;
}

template <typename T, typename KV, int D, int MTiles>
struct DecodeKernel {
    static_assert(D == 64 || D == 128 || D == 256, "decode: head_dim must be 64, 128 or 256");
    static_assert(MTiles == 1 || MTiles == 2 || MTiles == 4, "decode: a CTA holds 1, 2 or 4 tiles of 16 rows");
    static constexpr bool quantized = std::is_same_v<KV, int8_t>;
    static_assert(quantized || std::is_same_v<KV, T>, "decode: the KV pool holds q's dtype or int8");
    static constexpr int stages = decode_tile<D>::stages;
    static constexpr int rows = 16 * MTiles;
    static constexpr int units = D * int(sizeof(KV)) / 16;  // 16-byte units per token row
    static constexpr int unit_elems = 16 / int(sizeof(KV));
    static constexpr int threads_per_slot = kThreads / kChunkSlots;
    static_assert(threads_per_slot == 2 && units % threads_per_slot == 0,
                  "decode: two threads load each key slot, in alternate 16-byte units (row_cursor's step)");

    using kv_tile = tk::st<T, kChunkSlots, D>;  // swizzled: conflict-free ldmatrix
    using q_tile = tk::st<T, rows, D>;

    struct tile_stage {
        kv_tile k, v;
    };
    struct raw_stage {  // int8 as loaded, row-major; converted into a tile_stage before the mmas
        alignas(16) int8_t k[kChunkSlots * D];
        alignas(16) int8_t v[kChunkSlots * D];
    };
    using stage_t = std::conditional_t<quantized, raw_stage, tile_stage>;
    struct no_conversion {};
    using converted_t = std::conditional_t<quantized, tile_stage, no_conversion>;

    static constexpr int o_pitch = D + 4;  // padding spreads the fragment rows over the banks
    struct smem {
        q_tile q;
        union {
            struct {
                stage_t stage[stages];
                converted_t converted;
            } kv;
            float o[kWarps][16][o_pitch];  // each warp's O, once the key loop is done
        };
        float row_max[kWarps][16];
        float row_sum[kWarps][16];
        KeyGroup groups[stages + 1][kGroups];  // chunk c's groups at c % (stages + 1)
        // The CTA's plan and pool, read from here rather than held in registers across the key
        // loop, where O (D / 2 floats per thread) needs them.
        Walk walk;
        int poisoned;
    };
    static constexpr size_t smem_bytes = sizeof(smem) + tk::layout::kTileAlignment;
    static_assert(smem_bytes <= 227 * 1024, "decode: shared memory budget exceeded");
};

// Group g of chunk c. A page outside the sequence or a physical page outside the pool is never
// read: the group is left empty and the CTA marked poisoned.
__device__ inline KeyGroup describe_group(const DecodeParams& p, const Walk& w, int b, int c, int g, int* poisoned) {
    KeyGroup kg{0, 0, 0, 0u};
    const int q0 = c * kChunkSlots + g * kGroupSlots;
    if (q0 >= w.slots) return kg;
    const int ps = p.table.page_size;
    const int e = q0 / ps;
    const int in_page = q0 - e * ps;
    const int entry = w.entries.lo + e;
    const int page = w.plan.page(entry);
    // A page past the table's columns (or past a contiguous row's pages) or a head outside the
    // pool comes from a seqlens / kv_head_slot the host could not check: never read, poisoned.
    const bool in_table = w.plan.kind == detail::PlanKind::streaming ||
                          detail::page_in_table(p.table, page);
    if (page < 0 || page >= w.plan.n_pages || !in_table || w.plan.pool_head < 0 ||
        w.plan.pool_head >= w.pool.heads) {
        *poisoned = 1;
        return kg;
    }
    const int64_t phys = detail::plan_physical_page(w.plan, p.heads, p.table, b, page);
    if (phys < 0 || phys >= w.pool.num_pages) {
        *poisoned = 1;
        return kg;
    }
    const int token0 = page * ps + in_page;
    int count = kGroupSlots;
    count = count < w.plan.len - token0 ? count : w.plan.len - token0;
    count = count < ps - in_page ? count : ps - in_page;
    count = count < w.slots - q0 ? count : w.slots - q0;
    kg.offset = phys * w.pool.page_stride + int64_t(in_page) * w.pool.token_stride +
                int64_t(w.plan.pool_head) * w.pool.head_stride;
    kg.token0 = token0;
    kg.count = count > 0 ? count : 0;
    kg.heads = w.plan.heads(entry);
    return kg;
}

// One query row of the CTA, as a thread's accumulator fragment sees it.
struct RowMask {
    detail::Range keys;  // window and length (empty for padding rows)
    int head;            // index j inside the group: bit j of an entry's head bits
};

__device__ inline bool row_sees(const RowMask& r, uint32_t heads, int token, bool streaming,
                                const detail::Ring& ring, int len) {
    const bool head_on = heads == 0xffffffffu || ((heads >> r.head) & 1u);
    return head_on && token >= r.keys.lo && token < r.keys.hi && (!streaming || ring.visible(token, len));
}

// Which of a key group's 16 slots one row sees: what tk::warp::mask asks of each row.
struct GroupRow {
    RowMask row;
    KeyGroup group;
    bool streaming;
    const detail::Ring* ring;
    int len;

    __device__ bool contains(int slot) const {
        return slot < group.count && row_sees(row, group.heads, group.token0 + slot, streaming, *ring, len);
    }
};

template <typename T, typename KV, int D, int MTiles>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(const __grid_constant__ DecodeParams p, int row_chunks) {
    using K = DecodeKernel<T, KV, D, MTiles>;
    constexpr int stages = K::stages;
    // Aligned by an offset from the array itself (not through an integer round trip, as
    // tk::smem_allocator does), so the compiler still sees shared memory and emits LDS/STS rather
    // than generic accesses. The swizzled tiles need the 1024-byte alignment in the shared window.
    extern __shared__ char raw_smem[];
    const uint32_t misalignment = tk::smem_addr(raw_smem) % tk::layout::kTileAlignment;
    auto& s = *reinterpret_cast<typename K::smem*>(
        raw_smem + (misalignment == 0 ? 0 : tk::layout::kTileAlignment - misalignment));

    const int tid = threadIdx.x;
    const int warp = tk::warpid();
    const int lane = tk::laneid();
    const int b = blockIdx.x / row_chunks;
    const int row0 = (blockIdx.x % row_chunks) * K::rows;
    const int h = blockIdx.y;
    const int split = blockIdx.z;
    const int group = p.heads_q / p.heads_kv;
    const int rows_total = group * p.seqlen_q;

    if (tid == 0) {
        s.walk = make_walk(p, b, h, split);
        s.poisoned = 0;
    }
    __syncthreads();
    const int chunks = (s.walk.slots + kChunkSlots - 1) / kChunkSlots;
    if (tid < kGroups * stages && tid / kGroups < chunks) {
        s.groups[tid / kGroups][tid % kGroups] =
            describe_group(p, s.walk, b, tid / kGroups, tid % kGroups, &s.poisoned);
    }
    for (int i = tid; i < K::rows * D; i += kThreads) {
        const int r = i / D;
        const int c = i - r * D;
        const int row = row0 + r;
        T value = tk::from_float<T>(0.f);
        if (row < rows_total) {
            const int qi = row / group;
            const int qh = h * group + (row - qi * group);
            value = static_cast<const T*>(p.q)[b * p.q_batch_stride + qi * p.q_token_stride + qh * p.q_head_stride + c];
        }
        *s.q.ptr(r, c) = value;
    }
    __syncthreads();

    // Two threads per key slot, taking alternate 16-byte units of its row: each warp request still
    // covers whole 32-byte sectors, a thread looks up one key group per chunk, and its unit
    // addresses are one register plus immediates (row_cursor).
    const int load_slot = tid / K::threads_per_slot;
    const int load_unit = tid % K::threads_per_slot;
    const auto issue_chunk = [&](int c) {
        const KeyGroup kg = s.groups[c % (stages + 1)][load_slot / kGroupSlots];
        const int i = load_slot % kGroupSlots;
        const bool valid = i < kg.count;
        const int64_t row = valid ? kg.offset + int64_t(i) * s.walk.pool.token_stride + load_unit * K::unit_elems : 0;
        const KV* const k_src = static_cast<const KV*>(s.walk.pool.k) + row;
        const KV* const v_src = static_cast<const KV*>(s.walk.pool.v) + row;
        auto& st = s.kv.stage[c % stages];
        constexpr int step = K::threads_per_slot * K::unit_elems;  // elements between a thread's units
#pragma unroll
        for (int u = 0; u < K::units / K::threads_per_slot; ++u) {
            const int col = u * step;
            if constexpr (K::quantized) {
                const int at = load_slot * D + load_unit * K::unit_elems + col;
                tk::cp_async::copy16(&st.k[at], k_src + (valid ? col : 0), valid);
                tk::cp_async::copy16(&st.v[at], v_src + (valid ? col : 0), valid);
            } else {
                const auto k_dst = tk::make_row_cursor(st.k, load_slot, load_unit * K::unit_elems);
                const auto v_dst = tk::make_row_cursor(st.v, load_slot, load_unit * K::unit_elems);
                tk::cp_async::copy16(k_dst.at(u), k_src + (valid ? col : 0), valid);
                tk::cp_async::copy16(v_dst.at(u), v_src + (valid ? col : 0), valid);
            }
        }
    };
#pragma unroll
    for (int c = 0; c < stages - 1; ++c) {
        if (c < chunks) issue_chunk(c);
        tk::cp_async::commit();  // empty groups too: the wait count below stays uniform
    }

    // The rows of this warp's row tile, as each lane holds them.
    const int tile = warp % MTiles;
    tk::row_values<RowMask, 16> rows;
    tk::warp::make_rows(rows, [&](int r) {
        const int row = row0 + 16 * tile + r;
        const int qi = row / group;
        return RowMask{row < rows_total ? detail::visible_keys(qi, p.seqlen_q, s.walk.plan.len, p.window_left,
                                                               p.window_right)
                                        : detail::Range{0, 0},
                       row - qi * group};
    });
    // Scores: q·k scaled by the softmax scale and int8's k_scale, or soft-capped (tk::softmax_state).
    const float qk_scale = p.softmax_scale * (K::quantized ? p.k_scale : 1.f);
    const bool capped = p.softcap > 0.f;

    const auto q_rows = tk::warp::ldsm_rows(s.q, 16 * tile, 0);
    tk::rt_fl<16, D> o;
    tk::warp::zero(o);
    tk::softmax_state<16> st;
    tk::warp::softmax_init(st, capped ? tk::kLog2e : qk_scale * tk::kLog2e);

    for (int c = 0; c < chunks; ++c) {
        tk::cp_async::wait<stages - 2>();
        __syncthreads();  // chunk c has landed for every thread; stage (c - 1) % stages is free
        if (c + stages - 1 < chunks) issue_chunk(c + stages - 1);
        tk::cp_async::commit();
        if (tid < kGroups && c + stages < chunks) {
            s.groups[(c + stages) % (stages + 1)][tid] = describe_group(p, s.walk, b, c + stages, tid, &s.poisoned);
        }
        const typename K::kv_tile* kt;
        const typename K::kv_tile* vt;
        if constexpr (K::quantized) {
            const auto& raw = s.kv.stage[c % stages];
#pragma unroll
            for (int it = 0; it < kChunkSlots * D / 16 / kThreads; ++it) {
                const int u = tid + it * kThreads;
                const int slot = u / (D / 16);
                const int col = (u - slot * (D / 16)) * 16;
                const int4 kq = *reinterpret_cast<const int4*>(&raw.k[slot * D + col]);
                const int4 vq = *reinterpret_cast<const int4*>(&raw.v[slot * D + col]);
                const int8_t* k8 = reinterpret_cast<const int8_t*>(&kq);
                const int8_t* v8 = reinterpret_cast<const int8_t*>(&vq);
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    alignas(16) T kx[8], vx[8];
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        kx[e] = tk::from_float<T>(float(k8[8 * half + e]));
                        vx[e] = tk::from_float<T>(float(v8[8 * half + e]));
                    }
                    *reinterpret_cast<int4*>(s.kv.converted.k.ptr(slot, col + 8 * half)) = *reinterpret_cast<const int4*>(kx);
                    *reinterpret_cast<int4*>(s.kv.converted.v.ptr(slot, col + 8 * half)) = *reinterpret_cast<const int4*>(vx);
                }
            }
            __syncthreads();
            kt = &s.kv.converted.k;
            vt = &s.kv.converted.v;
        } else {
            kt = &s.kv.stage[c % stages].k;
            vt = &s.kv.stage[c % stages].v;
        }

        const bool streaming = s.walk.plan.kind == detail::PlanKind::streaming;
        const int len = s.walk.plan.len;
        for (int g = warp / MTiles; g < kGroups; g += kWarps / MTiles) {
            const KeyGroup kg = s.groups[c % (stages + 1)][g];
            if (kg.count == 0) continue;
            tk::rt_fl<16, kGroupSlots> x;
            tk::warp::zero(x);
            const auto k_rows = tk::warp::ldsm_rows(*kt, g * kGroupSlots, 0);
#pragma unroll 4
            for (int kk = 0; kk < D / 16; ++kk) {
                tk::rt_base<T> qa, kb;
                tk::warp::load_base(qa, q_rows, kk);
                tk::warp::load_base(kb, k_rows, kk);
                tk::warp::mma_ABt(x.tiles[0][0], qa, kb);
            }
            if (capped) tk::warp::softcap(x, x, qk_scale, p.softcap);
            tk::row_values<GroupRow, 16> sees;
            tk::warp::map_rows(sees, rows, [&](const RowMask& r) { return GroupRow{r, kg, streaming, &p.heads.ring, len}; });
            tk::warp::mask(x, x, sees, 0, -INFINITY);
            tk::warp::softmax_update(st, x);
            tk::warp::softmax_rescale(o, st);
            tk::rt<T, 16, kGroupSlots> prob;
            tk::warp::copy(prob, x);
            const auto v_cols = tk::warp::ldsm_rows_transposed(*vt, g * kGroupSlots, 0);
#pragma unroll
            for (int n = 0; n < D / 16; ++n) {
                tk::rt_base<T> vb;
                tk::warp::load_base_transposed(vb, v_cols, n);
                tk::warp::mma_ABt(o.tiles[0][n], prob.tiles[0][0], vb);
            }
        }
    }
    tk::cp_async::wait<0>();
    __syncthreads();  // every warp is done with the stages: their memory now holds the warps' O

    tk::rv_rows<float, 16> max_log2, sum;
    tk::warp::softmax_partials(max_log2, sum, st);
    tk::warp::store(s.row_max[warp], max_log2, 0, 16);
    tk::warp::store(s.row_sum[warp], sum, 0, 16);
    tk::warp::store(tk::gl<float>{&s.o[warp][0][0], 16, D, K::o_pitch}, o, 0, 0);
    __syncthreads();

    // Combine the warps of each row tile and write 8 columns per thread.
    const bool poisoned = s.poisoned != 0;
    const float v_scale = K::quantized ? p.v_scale : 1.f;
    for (int i = tid; i < K::rows * (D / 8); i += kThreads) {
        const int r = i / (D / 8);
        const int col = (i - r * (D / 8)) * 8;
        const int row = row0 + r;
        if (row >= rows_total) continue;
        const int t = r / 16;
        const int rr = r % 16;
        float mx = -INFINITY;
#pragma unroll
        for (int wi = t; wi < kWarps; wi += MTiles) mx = fmaxf(mx, s.row_max[wi][rr]);
        float sum = 0.f;
        float acc[8] = {};
#pragma unroll
        for (int wi = t; wi < kWarps; wi += MTiles) {
            const float wt = tk::softmax_weight(s.row_max[wi][rr], mx);
            sum += s.row_sum[wi][rr] * wt;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += s.o[wi][rr][col + e] * wt;
        }
        const float norm = sum > 0.f ? v_scale / sum : 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = poisoned ? NAN : acc[e] * norm;
        const float lse = poisoned ? NAN : tk::softmax_lse(mx, sum);
        const int qi = row / group;
        const int qh = h * group + (row - qi * group);
        const int64_t out_row = (int64_t(b) * p.seqlen_q + qi) * p.heads_q + qh;
        const int64_t lse_index = (int64_t(b) * p.heads_q + qh) * p.seqlen_q + qi;
        if (p.num_splits == 1) {
            alignas(16) T packed[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) packed[e] = tk::from_float<T>(acc[e]);
            *reinterpret_cast<int4*>(static_cast<T*>(p.out) + out_row * D + col) = *reinterpret_cast<const int4*>(packed);
            if (col == 0) p.lse[lse_index] = lse;
        } else {
            const int64_t rows_all = int64_t(p.batch) * p.seqlen_q * p.heads_q;
            float4* dst = reinterpret_cast<float4*>(p.partial_out + (split * rows_all + out_row) * D + col);
            dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
            dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
            if (col == 0) p.partial_lse[split * rows_all + lse_index] = lse;
        }
    }
}

// out = the lse-weighted sum of the splits' normalised partials. A split that saw no key (lse
// -inf) weighs 0; a row no split saw gives 0 and -inf; a NaN lse (a poisoned split) gives NaN.
template <typename T, int D>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const __grid_constant__ DecodeParams p) {
    constexpr int lanes = D / 4;  // threads per row, 4 columns each
    static_assert(kMergeThreads % lanes == 0, "decode merge: a CTA holds whole rows");
    const int64_t rows_all = int64_t(p.batch) * p.seqlen_q * p.heads_q;
    const int64_t row = int64_t(blockIdx.x) * (kMergeThreads / lanes) + threadIdx.x / lanes;
    if (row >= rows_all) return;
    const int col = (threadIdx.x % lanes) * 4;
    const int qh = int(row % p.heads_q);
    const int64_t bi = row / p.heads_q;  // b * Sq + i
    const int qi = int(bi % p.seqlen_q);
    const int64_t b = bi / p.seqlen_q;
    const int64_t lse_index = (b * p.heads_q + qh) * p.seqlen_q + qi;

    float mx = -INFINITY;
    bool poisoned = false;
    for (int sp = 0; sp < p.num_splits; ++sp) {
        const float x = p.partial_lse[sp * rows_all + lse_index];
        poisoned |= isnan(x);
        mx = fmaxf(mx, x * tk::kLog2e);
    }
    float sum = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int sp = 0; sp < p.num_splits; ++sp) {
        const float wt = tk::softmax_weight(p.partial_lse[sp * rows_all + lse_index] * tk::kLog2e, mx);
        if (wt == 0.f) continue;  // nothing seen (or negligible): its partial is not read
        const float4 part = *reinterpret_cast<const float4*>(p.partial_out + (sp * rows_all + row) * D + col);
        sum += wt;
        acc.x += wt * part.x;
        acc.y += wt * part.y;
        acc.z += wt * part.z;
        acc.w += wt * part.w;
    }
    const float norm = sum > 0.f ? 1.f / sum : 0.f;
    const float out[4] = {acc.x * norm, acc.y * norm, acc.z * norm, acc.w * norm};
    alignas(8) T packed[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) packed[e] = tk::from_float<T>(poisoned ? NAN : out[e]);
    *reinterpret_cast<uint2*>(static_cast<T*>(p.out) + row * D + col) = *reinterpret_cast<const uint2*>(packed);
    if (col == 0) p.lse[lse_index] = poisoned ? NAN : tk::softmax_lse(mx, sum);
}

// cp.async moves 16-byte units: the pool's base and strides must keep every token row aligned
// (the stride of a dim of size 1 is never multiplied by anything but 0).
bool pool_aligned(const KVPool& pool, int elem_bytes) {
    const int64_t vec = 16 / elem_bytes;
    return reinterpret_cast<uintptr_t>(pool.k) % 16 == 0 && reinterpret_cast<uintptr_t>(pool.v) % 16 == 0 &&
           (pool.num_pages <= 1 || pool.page_stride % vec == 0) && pool.token_stride % vec == 0 &&
           (pool.heads <= 1 || pool.head_stride % vec == 0);
}

template <typename T, typename KV, int D, int MTiles>
cudaError_t launch_rows(const DecodeParams& p, cudaStream_t stream) {
    using K = DecodeKernel<T, KV, D, MTiles>;
    const int rows_total = p.heads_q / p.heads_kv * p.seqlen_q;
    const int row_chunks = (rows_total + K::rows - 1) / K::rows;
    auto* kernel = decode_kernel<T, KV, D, MTiles>;
    const cudaError_t attr =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(K::smem_bytes));
    if (attr != cudaSuccess) return attr;
    const dim3 grid(unsigned(p.batch * row_chunks), unsigned(p.heads_kv), unsigned(p.num_splits));
    kernel<<<grid, kThreads, K::smem_bytes, stream>>>(p, row_chunks);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || p.num_splits == 1) return err;
    const int64_t rows_all = int64_t(p.batch) * p.seqlen_q * p.heads_q;
    constexpr int rows_per_cta = kMergeThreads / (D / 4);
    merge_kernel<T, D><<<unsigned((rows_all + rows_per_cta - 1) / rows_per_cta), kMergeThreads, 0, stream>>>(p);
    return cudaGetLastError();
}

// Row tiles per CTA: enough for the group's rows (16 each), at most 4; more rows take more CTAs.
template <typename T, typename KV, int D>
cudaError_t launch_dim(const DecodeParams& p, cudaStream_t stream) {
    const int tiles = (p.heads_q / p.heads_kv * p.seqlen_q + 15) / 16;
    if (tiles <= 1) return launch_rows<T, KV, D, 1>(p, stream);
    if (tiles == 2) return launch_rows<T, KV, D, 2>(p, stream);
    return launch_rows<T, KV, D, 4>(p, stream);
}

template <typename T, typename KV>
cudaError_t launch_kv(const DecodeParams& p, cudaStream_t stream) {
    switch (p.head_dim) {
        case 64: return launch_dim<T, KV, 64>(p, stream);
        case 128: return launch_dim<T, KV, 128>(p, stream);
        case 256: return launch_dim<T, KV, 256>(p, stream);
    }
    return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_typed(const DecodeParams& p, cudaStream_t stream) {
    if (p.kv_dtype == DType::int8) return launch_kv<T, int8_t>(p, stream);
    if (p.kv_dtype == p.dtype) return launch_kv<T, T>(p, stream);
    return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_decode_attention(const DecodeParams& p, cudaStream_t stream) {
    if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return cudaErrorInvalidValue;
    if (p.num_splits < 1 || p.num_splits > detail::kMaxSplits) return cudaErrorInvalidValue;
    if (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)) return cudaErrorInvalidValue;
    if (p.batch == 0 || p.seqlen_q == 0 || p.heads_q == 0) return cudaSuccess;
    const int kv_bytes = p.kv_dtype == DType::int8 ? 1 : 2;
    if (!pool_aligned(p.cache, kv_bytes)) return cudaErrorMisalignedAddress;
    if (p.heads.kv_head_slot != nullptr && p.ring.k != nullptr && !pool_aligned(p.ring, kv_bytes)) {
        return cudaErrorMisalignedAddress;
    }
    switch (p.dtype) {
        case DType::bf16: return launch_typed<__nv_bfloat16>(p, stream);
        case DType::fp16: return launch_typed<__half>(p, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace tkpy::decode
