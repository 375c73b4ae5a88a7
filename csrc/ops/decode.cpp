// Bindings of decode attention over a KV cache (flash-attn's flash_attn_with_kvcache layout, and
// LServe's sparse decode) and of the KV append that feeds it: validation, output and split-KV
// workspace allocation, CPU or CUDA dispatch. The index tensors' values are checked under the
// validation policy of ops/validate.h (CPU always, CUDA with TKPY_CHECK_VALUES=1); otherwise the
// kernels guard their own reads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "cpu/cpu_ops.h"
#include "ops/ops.h"
#include "ops/validate.h"
#include "tkpy/decode.h"
#include "tkpy/detail/paged_index.h"

#if defined(TKPY_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "tk/common/device.h"
#endif

namespace tkpy::ops {
namespace {

constexpr const char* kDecodeOp = "decode_attention";
constexpr const char* kAppendOp = "kv_append_";
// The most query heads that share one kv head: head_bits has one bit per query head of a group.
constexpr int64_t kMaxGroup = 32;

// t on the reference tensor's device (q for decode, k for append).
void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name) {
    TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": expected ", name, " on ", ref_name, "'s device ", ref.device(),
                      ", got ", t.device());
}

const char* reference_name(const char* op) { return std::string_view(op) == kDecodeOp ? "q" : "k"; }

bool is_head_dim_supported(int64_t d) { return d == 64 || d == 128 || d == 256; }

DType kv_dtype_of(at::ScalarType t) { return t == at::kChar ? DType::int8 : to_dtype(t); }

// A tensor the kernels read in 16-byte vectors: aligned start, strides in whole 16-byte units.
void check_vector_rows(const char* op, const char* name, const at::Tensor& t) {
    check_last_dim_contiguous(op, name, t);
    check_sizes_fit_int(op, name, t);
    const int64_t per_16_bytes = 16 / int64_t(t.element_size());
    TORCH_CHECK_VALUE(address_of(t) % 16 == 0 || t.numel() == 0, op, ": expected ", name,
                      " to start on a 16-byte boundary, got a view at an odd offset; call .contiguous()");
    for (int64_t d = 0; d < t.dim() - 1; ++d) {
        TORCH_CHECK_VALUE(t.stride(d) % per_16_bytes == 0 || t.size(d) <= 1, op, ": expected ", name,
                          "'s strides to be multiples of 16 bytes (", per_16_bytes, " elements), got ", t.strides());
    }
}

// A contiguous int32 index tensor of an exact shape, on q's device.
void check_index_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                        at::IntArrayRef shape, const char* shape_names) {
    check_device(op, name, t, q, reference_name(op));
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, op, ": expected ", name, " to be int32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == shape, op, ": expected ", name, " of shape ", shape_names, " = ", shape, ", got ",
                      t.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": expected ", name, " to be contiguous, got strides ", t.strides());
    check_sizes_fit_int(op, name, t);
}

void check_block_table(const char* op, const at::Tensor& t, const at::Tensor& q, int64_t batch) {
    check_device(op, "block_table", t, q, reference_name(op));
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt && t.dim() == 2 && t.size(0) == batch && t.size(1) >= 1, op,
                      ": expected block_table int32 [batch=", batch, ", max_pages >= 1], got ", t.scalar_type(), " ",
                      t.sizes());
    check_last_dim_contiguous(op, "block_table", t);
    check_sizes_fit_int(op, "block_table", t);
}

// ---- the main pool ------------------------------------------------------------------------------

struct MainPool {
    decode::KVPool pool;
    detail::PageTable table;
    int64_t capacity;  // tokens per sequence: table.max_pages * page_size
    bool paged = false;  // a block_table (table.table is null for a Meta call)
};

// k_cache/v_cache: paged [num_pages, page_size, Hc, D] with block_table, or contiguous
// [B_cache, S_cache, Hc, D] (one page of S_cache tokens per sequence) with cache_batch_idx.
MainPool main_pool(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& cache_batch_idx,
                   const at::Tensor& q, int64_t batch, int64_t head_dim) {
    for (const auto& [name, t] : {std::pair{"k_cache", &k_cache}, std::pair{"v_cache", &v_cache}}) {
        check_device(op, name, *t, q, reference_name(op));
        TORCH_CHECK_VALUE(t->scalar_type() == q.scalar_type() || t->scalar_type() == at::kChar, op, ": expected ", name,
                          " to have ", reference_name(op), "'s dtype ", q.scalar_type(), " or int8, got ", t->scalar_type());
        TORCH_CHECK_VALUE(t->dim() == 4, op, ": expected ", name, " to be 4-D (",
                          block_table ? "[num_pages, page_size, heads, head_dim]" : "[batch_cache, seqlen_cache, heads, head_dim]",
                          "), got ", t->sizes());
        TORCH_CHECK_VALUE(t->size(3) == head_dim, op, ": expected ", name, " with head_dim ", head_dim, ", got ",
                          t->sizes());
        check_vector_rows(op, name, *t);
    }
    TORCH_CHECK_VALUE(k_cache.scalar_type() == v_cache.scalar_type(), op,
                      ": expected k_cache and v_cache of one dtype, got ",
                      k_cache.scalar_type(), " and ", v_cache.scalar_type());
    TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(), op,
                      ": expected k_cache and v_cache of one shape and strides, got ", k_cache.sizes(), " ",
                      k_cache.strides(), " and ", v_cache.sizes(), " ", v_cache.strides());
    // Keys and values in one memory can only be a mistake, and an append would write both into it.
    TORCH_CHECK_VALUE(!shares_memory(k_cache, v_cache), op,
                      ": k_cache and v_cache share memory; pass separate key and value caches");

    MainPool m;
    m.pool.k = data_of(k_cache);
    m.pool.v = data_of(v_cache);
    m.pool.page_stride = k_cache.stride(0);
    m.pool.token_stride = k_cache.stride(1);
    m.pool.head_stride = k_cache.stride(2);
    m.pool.heads = int(k_cache.size(2));
    m.pool.num_pages = k_cache.size(0);
    m.table = detail::PageTable{nullptr, 0, int(k_cache.size(1)), nullptr};
    if (block_table.has_value()) {
        TORCH_CHECK_VALUE(!cache_batch_idx.has_value(), op,
                          ": cache_batch_idx picks rows of a contiguous cache; with block_table pass None");
        check_block_table(op, *block_table, q, batch);
        TORCH_CHECK_VALUE(k_cache.size(1) % 16 == 0 && k_cache.size(1) > 0, op,
                          ": expected a paged cache's page_size (k_cache.shape[1]) to be a positive multiple of 16, got ",
                          k_cache.size(1));
        m.paged = true;
        m.table.table = data_of<int32_t>(*block_table);
        m.table.table_stride = block_table->stride(0);
        m.table.max_pages = int(block_table->size(1));
    } else {
        if (cache_batch_idx.has_value()) {
            check_index_tensor(op, "cache_batch_idx", *cache_batch_idx, q, {batch}, "[batch]");
            m.table.batch_idx = data_of<int32_t>(*cache_batch_idx);
        } else {
            TORCH_CHECK_VALUE(k_cache.size(0) >= batch, op, ": expected a contiguous cache with at least batch=", batch,
                              " rows (or pass cache_batch_idx), got ", k_cache.sizes());
        }
        m.table.max_pages = 1;
    }
    m.capacity = int64_t(m.table.max_pages) * m.table.page_size;
    return m;
}

// Decode reads a contiguous cache whose rows are dense in memory as 64-token pages, so that a long
// row is a plan of many pages that split-KV can share among CTAs (one page per row would leave a
// single CTA per (sequence, kv head)). Rows of other lengths or layouts stay one page.
void page_contiguous_rows(MainPool& m) {
    constexpr int64_t page = detail::kLServePage;
    const int64_t row_tokens = m.table.page_size;
    if (m.paged || row_tokens <= page || row_tokens % page != 0 ||
        m.pool.page_stride != row_tokens * m.pool.token_stride) {
        return;
    }
    const int64_t pages_per_row = row_tokens / page;
    m.table.page_size = int(page);
    m.table.max_pages = int(pages_per_row);
    m.pool.page_stride = page * m.pool.token_stride;
    m.pool.num_pages *= pages_per_row;
}

// ---- LServe heads ------------------------------------------------------------------------------

struct LServeHeads {
    detail::DecodeHeads heads{};
    decode::KVPool ring;
    int64_t heads_kv = 0;
    int64_t ring_pool_pages = 0;
};

// kv_head_slot [Hkv] with the ring pools and their table; None everywhere: every head dense.
LServeHeads lserve_heads(const char* op, const std::optional<at::Tensor>& kv_head_slot,
                         const std::optional<at::Tensor>& k_ring, const std::optional<at::Tensor>& v_ring,
                         const std::optional<at::Tensor>& ring_table, int64_t sink, int64_t local,
                         const at::Tensor& q, const MainPool& main, const at::Tensor& k_cache, int64_t batch,
                         int64_t head_dim) {
    LServeHeads l;
    l.heads_kv = main.pool.heads;
    const bool any_ring = k_ring.has_value() || v_ring.has_value() || ring_table.has_value();
    if (!kv_head_slot.has_value()) {
        TORCH_CHECK_VALUE(!any_ring, op,
                          ": k_ring, v_ring and ring_table are LServe's streaming heads; pass kv_head_slot "
                          "with them, or None for all three");
        return l;
    }
    TORCH_CHECK_VALUE(k_ring.has_value() && v_ring.has_value() && ring_table.has_value(), op,
                      ": with kv_head_slot, pass k_ring, v_ring and ring_table (the streaming heads' ring)");
    TORCH_CHECK_VALUE(main.paged && main.table.page_size == detail::kLServePage, op,
                      ": with kv_head_slot (LServe), expected a paged cache with block_table and page_size ",
                      detail::kLServePage, ", got ", main.paged ? "page_size " : "a contiguous cache of seqlen ",
                      main.table.page_size);
    TORCH_CHECK_VALUE(sink >= 0 && local >= 0 && sink % detail::kLServePage == 0 && local % detail::kLServePage == 0,
                      op,
                      ": expected sink and local to be multiples of ", detail::kLServePage, " and >= 0, got sink=", sink,
                      ", local=", local);
    TORCH_CHECK_VALUE(sink <= (int64_t(1) << 30) && local <= (int64_t(1) << 30), op, ": sink/local too large: ", sink,
                      ", ",
                      local);
    const at::Tensor& slot = *kv_head_slot;
    check_device(op, "kv_head_slot", slot, q, reference_name(op));
    TORCH_CHECK_VALUE(slot.scalar_type() == at::kInt && slot.dim() == 1 && slot.numel() >= 1 && slot.is_contiguous(),
                      op,
                      ": expected kv_head_slot to be a contiguous int32 [heads_kv], got ", slot.scalar_type(), " ",
                      slot.sizes());
    l.heads_kv = slot.numel();

    for (const auto& [name, t] : {std::pair{"k_ring", &*k_ring}, std::pair{"v_ring", &*v_ring}}) {
        check_device(op, name, *t, q, reference_name(op));
        TORCH_CHECK_VALUE(t->scalar_type() == k_cache.scalar_type(), op, ": expected ", name,
                          " to have k_cache's dtype ",
                          k_cache.scalar_type(), ", got ", t->scalar_type());
        TORCH_CHECK_VALUE(t->dim() == 4 && t->size(1) == detail::kLServePage && t->size(3) == head_dim, op,
                          ": expected ",
                          name, " of shape [ring_pool_pages, ", detail::kLServePage, ", streaming_heads, ", head_dim,
                          "], got ", t->sizes());
        check_vector_rows(op, name, *t);
    }
    TORCH_CHECK_VALUE(k_ring->sizes() == v_ring->sizes() && k_ring->strides() == v_ring->strides(), op,
                      ": expected k_ring and v_ring of one shape and strides, got ", k_ring->sizes(), " ", k_ring->strides(),
                      " and ", v_ring->sizes(), " ", v_ring->strides());
    TORCH_CHECK_VALUE(!shares_memory(*k_ring, *v_ring), op,
                      ": k_ring and v_ring share memory; pass separate key and value rings");

    detail::DecodeHeads& h = l.heads;
    h.kv_head_slot = data_of<int32_t>(slot);
    h.ring = detail::Ring{int(sink), int(local)};
    check_index_tensor(op, "ring_table", *ring_table, q, {batch, h.ring.pages()},
                       "[batch, sink/64 + local/64 + 1]");
    h.ring_table = data_of<int32_t>(*ring_table);
    l.ring.k = data_of(*k_ring);
    l.ring.v = data_of(*v_ring);
    l.ring.page_stride = k_ring->stride(0);
    l.ring.token_stride = k_ring->stride(1);
    l.ring.head_stride = k_ring->stride(2);
    l.ring.heads = int(k_ring->size(2));
    l.ring.num_pages = k_ring->size(0);
    l.ring_pool_pages = k_ring->size(0);
    return l;
}

// kv_head_slot names heads that exist, and ring_table names ring pages that exist (host pointers).
void check_lserve_values(const char* op, const LServeHeads& l, const MainPool& main, int64_t batch) {
    if (l.heads.kv_head_slot == nullptr) return;
    std::vector<int32_t> slots(l.heads.kv_head_slot, l.heads.kv_head_slot + l.heads_kv);
    std::sort(slots.begin(), slots.end());
    const auto repeated = std::adjacent_find(slots.begin(), slots.end());
    TORCH_CHECK_VALUE(repeated == slots.end(), op, ": kv_head_slot names slot ", repeated == slots.end() ? 0 : *repeated,
                      " for two kv heads; each kv head needs a pool or ring head of its own");
    for (int64_t h = 0; h < l.heads_kv; ++h) {
        const int32_t slot = l.heads.kv_head_slot[h];
        if (slot >= 0) {
            TORCH_CHECK_VALUE(slot < main.pool.heads, op, ": kv_head_slot[", h, "] = ", slot,
                              " names a retrieval head, but k_cache holds ", main.pool.heads, " heads");
        } else {
            TORCH_CHECK_VALUE(-1 - int64_t(slot) < l.ring.heads, op, ": kv_head_slot[", h, "] = ", slot,
                              " names streaming head ", -1 - int64_t(slot), ", but k_ring holds ", l.ring.heads, " heads");
        }
    }
    const int64_t entries = batch * l.heads.ring.pages();
    for (int64_t i = 0; i < entries; ++i) {
        const int32_t page = l.heads.ring_table[i];
        TORCH_CHECK_VALUE(page >= 0 && page < l.ring_pool_pages, op, ": ring_table[", i / l.heads.ring.pages(), ", ",
                          i % l.heads.ring.pages(), "] = ", page, " is outside the ring pool's ", l.ring_pool_pages,
                          " pages");
    }
}

// Where a sequence's capacity comes from, for messages.
std::string capacity_source(const MainPool& main) {
    if (!main.paged) return "the contiguous cache's seqlen";
    return "block_table's " + std::to_string(main.table.max_pages) + " columns x page_size " +
           std::to_string(main.table.page_size);
}

// Sequence b's cache row or the page-table entries of its pages [first_page, end_page) (host pointers).
void check_pages_in_pool(const char* op, const MainPool& main, int64_t b, int64_t first_page, int64_t end_page) {
    if (main.table.table == nullptr) {
        if (main.table.batch_idx != nullptr) {
            const int64_t rows = main.pool.num_pages / main.table.max_pages;
            const int32_t row = main.table.batch_idx[b];
            TORCH_CHECK_VALUE(row >= 0 && row < rows, op, ": cache_batch_idx[", b, "] = ", row,
                              " is outside the cache's ",
                              rows, " rows");
        }
        return;
    }
    for (int64_t n = first_page; n < end_page; ++n) {
        const int32_t page = main.table.table[b * main.table.table_stride + n];
        TORCH_CHECK_VALUE(page >= 0 && page < main.pool.num_pages, op, ": block_table[", b, ", ", n, "] = ", page,
                          " is outside the pool's ", main.pool.num_pages, " pages (sequence ", b, " uses its first ",
                          end_page, " entries)");
    }
}

void check_seqlens_tensor(const char* op, const at::Tensor& seqlens, const at::Tensor& q, int64_t batch) {
    check_index_tensor(op, "cache_seqlens", seqlens, q, {batch}, "[batch]");
}

// ---- decode_attention ---------------------------------------------------------------------------

struct DecodePrepared {
    decode::DecodeParams params;
    at::Tensor out;
    at::Tensor lse;
    at::Tensor workspace;  // split-KV partials; held until the launch is queued
    MainPool main;
    LServeHeads lserve;
};


// The split count (num_splits = 0: from the plans' lengths and `workers`, SMs or CPU threads) and
// the split-KV workspace, planned by include/tkpy/decode.h as a server without torch would.
void plan_workspace(DecodePrepared& prep, int workers) {
    decode::plan_splits(prep.params, workers);
    const size_t bytes = decode::workspace_bytes(prep.params);
    if (bytes == 0) return;
    prep.workspace = at::empty({int64_t(bytes / sizeof(float))}, prep.out.options().dtype(at::kFloat));
    decode::set_workspace(prep.params, data_of(prep.workspace));
}

// Every index the plans will read is in range (host pointers: see HostIndices).
void check_decode_values(const DecodePrepared& prep) {
    constexpr const char* op = kDecodeOp;
    const decode::DecodeParams& p = prep.params;
    check_lserve_values(op, prep.lserve, prep.main, p.batch);
    const detail::DecodeHeads& heads = p.heads;
    for (int b = 0; b < p.batch; ++b) {
        const int32_t len = p.seqlens[b];
        TORCH_CHECK_VALUE(len >= 0 && len <= prep.main.capacity, op, ": cache_seqlens[", b, "] = ", len,
                          " is outside [0, ", prep.main.capacity, "], the tokens the cache holds per sequence (",
                          capacity_source(prep.main), ")");
        check_pages_in_pool(op, prep.main, b, 0, detail::ceil_div_int(len, p.table.page_size));
        if (heads.page_indices == nullptr) continue;
        for (int h = 0; h < p.heads_kv; ++h) {
            if (heads.kv_head_slot[h] < 0) continue;  // streaming heads ignore their rows
            const int64_t row = int64_t(b) * p.heads_kv + h;
            const int32_t count = heads.page_counts[row];
            TORCH_CHECK_VALUE(count >= 0 && count <= heads.max_selected, op, ": page_counts[", b, ", ", h, "] = ",
                              count,
                              " is outside [0, ", heads.max_selected, "] (page_indices' last dim)");
            const int32_t* list = heads.page_indices + row * heads.max_selected;
            for (int32_t n = 0; n < count; ++n) {
                TORCH_CHECK_VALUE(list[n] >= 0 && list[n] < prep.main.table.max_pages, op, ": page_indices[", b, ", ",
                                  h, ", ", n,
                                  "] = ", list[n], " is outside the sequence's ", prep.main.table.max_pages,
                                  " pages (block_table's columns)");
                TORCH_CHECK_VALUE(n == 0 || list[n] > list[n - 1], op, ": page_indices[", b, ", ", h,
                                  "] must list ascending, distinct pages; got ", list[n - 1], " then ", list[n]);
            }
        }
    }
}

// ---- kv_append_ ---------------------------------------------------------------------------------

struct AppendPrepared {
    decode::AppendParams params;
    MainPool main;
    LServeHeads lserve;
};

void check_stats(const char* name, const at::Tensor& t, const at::Tensor& k, const MainPool& main) {
    constexpr const char* op = kAppendOp;
    check_device(op, name, t, k, "k");
    const int64_t page_size = main.table.page_size;
    TORCH_CHECK_VALUE(page_size % detail::kLogicalPage == 0, op, ": page stats cover logical pages of ",
                      detail::kLogicalPage, " tokens; the cache's page (", page_size, " tokens) must be a multiple");
    const std::vector<int64_t> shape{main.pool.num_pages, page_size / detail::kLogicalPage, main.pool.heads,
                                     k.size(3)};
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.sizes() == at::IntArrayRef(shape), op, ": expected ", name,
                      " float32 [num_pages, page_size/16, heads, head_dim] = ", at::IntArrayRef(shape), ", got ",
                      t.scalar_type(), " ", t.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": expected ", name, " to be contiguous, got strides ", t.strides());
}


using NamedTensor = std::pair<const char*, const at::Tensor*>;

const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

// What an append writes (the pools, rings and page stats) neither overlaps itself (an expanded
// view) nor any other argument: a write must not land in another pool or in what the op reads.
void check_append_aliasing(std::initializer_list<NamedTensor> written, std::initializer_list<NamedTensor> read) {
    for (auto w = written.begin(); w != written.end(); ++w) {
        if (w->second == nullptr) continue;
        check_no_internal_overlap(kAppendOp, w->first, *w->second);
        for (auto other = std::next(w); other != written.end(); ++other) {
            if (other->second != nullptr) check_not_aliased(kAppendOp, w->first, *w->second, other->first, *other->second);
        }
        for (const auto& [name, t] : read) {
            if (t != nullptr) check_not_aliased(kAppendOp, w->first, *w->second, name, *t);
        }
    }
}

// The tokens land inside the cache, on pages and rotary rows that exist (host pointers). Two
// sequences may write one page or cache row: padding rows that share a scratch page are a serving
// pattern (tkpy.runtime's CUDA-graph warm-up), and which row's tokens land there is unspecified.
void check_append_values(const AppendPrepared& prep) {
    constexpr const char* op = kAppendOp;
    const decode::AppendParams& p = prep.params;
    check_lserve_values(op, prep.lserve, prep.main, p.batch);
    for (int b = 0; b < p.batch; ++b) {
        const int64_t old_len = p.seqlens[b];
        const int64_t new_len = old_len + p.seqlen_new;
        TORCH_CHECK_VALUE(old_len >= 0 && new_len <= prep.main.capacity, op, ": cache_seqlens[", b, "] = ", old_len,
                          " plus ", p.seqlen_new, " new tokens must fit in [0, ", prep.main.capacity,
                          "], the tokens the cache holds per sequence (", capacity_source(prep.main), ")");
        if (p.seqlen_new == 0) continue;
        // Every page up to the new end, not only those written: a decode after the append reads
        // them all, and flash_attn_with_kvcache must refuse before the append writes anything.
        check_pages_in_pool(op, prep.main, b, 0, detail::ceil_div_int(int(new_len), p.table.page_size));
        TORCH_CHECK_VALUE(p.rotary_cos == nullptr || new_len <= p.rotary_rows, op, ": sequence ", b,
                          " writes positions up to ",
                          new_len - 1, " but rotary_cos/sin have ", p.rotary_rows, " rows");
    }
}

// The value checks read through the prepared pointers. Under the validation policy (validate.h)
// they run on the host: CPU tensors in place, CUDA ones as host copies that this holds, with the
// pointers of a copy of the prepared call redirected to them.
class HostIndices {
   public:
    const int32_t* operator()(const at::Tensor& t) {
        held_.push_back(host_values(t));
        return held_.back().data_ptr<int32_t>();
    }
    const int32_t* operator()(const std::optional<at::Tensor>& t) { return t ? (*this)(*t) : nullptr; }

    // A copy of a prepared call whose index pointers lead to host memory (page selections aside).
    template <class Prepared>
    Prepared redirect(const Prepared& prep, const at::Tensor& seqlens, const std::optional<at::Tensor>& block_table,
                      const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& kv_head_slot,
                      const std::optional<at::Tensor>& ring_table) {
        Prepared copy = prep;
        if (block_table) {
            copy.main.table.table = (*this)(*block_table);
            copy.main.table.table_stride = held_.back().stride(0);
        }
        copy.main.table.batch_idx = (*this)(cache_batch_idx);
        copy.lserve.heads.kv_head_slot = (*this)(kv_head_slot);
        copy.lserve.heads.ring_table = (*this)(ring_table);
        copy.params.seqlens = (*this)(seqlens);
        copy.params.table = copy.main.table;
        copy.params.heads.kv_head_slot = copy.lserve.heads.kv_head_slot;
        copy.params.heads.ring_table = copy.lserve.heads.ring_table;
        return copy;
    }

   private:
    std::vector<at::Tensor> held_;
};


}  // namespace

// One path for CPU, CUDA and Meta (torch.compile's fake tensors: the checks and the outputs' shapes,
// no launch).
std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens,
                              const std::optional<at::Tensor>& block_table,
                              const std::optional<at::Tensor>& cache_batch_idx,
                              const std::optional<at::Tensor>& kv_head_slot, const std::optional<at::Tensor>& k_ring,
                              const std::optional<at::Tensor>& v_ring, const std::optional<at::Tensor>& ring_table,
                              int64_t sink, int64_t local, const std::optional<at::Tensor>& page_indices,
                              const std::optional<at::Tensor>& page_counts, const std::optional<at::Tensor>& head_bits,
                              double k_scale, double v_scale, std::optional<double> softmax_scale,
                              int64_t window_left, int64_t window_right, double softcap, int64_t num_splits) {
    constexpr const char* op = kDecodeOp;
    TORCH_CHECK_VALUE(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
                      ": expected q to be bfloat16 or float16, got ", q.scalar_type());
    TORCH_CHECK_VALUE(q.dim() == 4, op, ": expected q to be 4-D [batch, seqlen_q, heads_q, head_dim], got ", q.sizes());
    const int64_t batch = q.size(0), seqlen_q = q.size(1), heads_q = q.size(2), head_dim = q.size(3);
    TORCH_CHECK_VALUE(is_head_dim_supported(head_dim), op, ": expected head_dim 64, 128 or 256, got ", head_dim);
    check_vector_rows(op, "q", q);
    TORCH_CHECK_VALUE(seqlen_q >= 1 && heads_q >= 1, op, ": expected q with seqlen_q >= 1 and heads_q >= 1, got ",
                      q.sizes());

    DecodePrepared prep;
    prep.main = main_pool(op, k_cache, v_cache, block_table, cache_batch_idx, q, batch, head_dim);
    prep.lserve = lserve_heads(op, kv_head_slot, k_ring, v_ring, ring_table, sink, local, q, prep.main, k_cache,
                               batch, head_dim);
    page_contiguous_rows(prep.main);
    const int64_t heads_kv = prep.lserve.heads_kv;
    TORCH_CHECK_VALUE(heads_kv >= 1 && heads_q % heads_kv == 0, op, ": expected q's heads (", heads_q,
                      ") to be a multiple of the kv heads (", heads_kv, kv_head_slot ? ", kv_head_slot's length" : ", k_cache's heads",
                      ") for GQA/MQA");
    TORCH_CHECK_VALUE(heads_q / heads_kv <= kMaxGroup, op, ": expected at most ", kMaxGroup,
                      " query heads per kv head, got ", heads_q / heads_kv);
    TORCH_CHECK_VALUE(!kv_head_slot.has_value() || seqlen_q == 1, op,
                      ": LServe decode (kv_head_slot given) takes one query row per sequence, got seqlen_q = ", seqlen_q);
    check_seqlens_tensor(op, seqlens, q, batch);

    const bool selected = page_indices.has_value() || page_counts.has_value() || head_bits.has_value();
    detail::DecodeHeads& heads = prep.lserve.heads;
    if (selected) {
        TORCH_CHECK_VALUE(kv_head_slot.has_value(), op,
                          ": page_indices, page_counts and head_bits select retrieval heads' pages; pass kv_head_slot too");
        TORCH_CHECK_VALUE(page_indices.has_value() && page_counts.has_value() && head_bits.has_value(), op,
                          ": pass page_indices, page_counts and head_bits together, or none of them");
        TORCH_CHECK_VALUE(page_indices->dim() == 3, op,
                          ": expected page_indices int32 [batch, heads_kv, max_selected], got ",
                          page_indices->sizes());
        const int64_t max_selected = page_indices->size(2);
        check_index_tensor(op, "page_indices", *page_indices, q, {batch, heads_kv, max_selected},
                           "[batch, heads_kv, max_selected]");
        check_index_tensor(op, "page_counts", *page_counts, q, {batch, heads_kv}, "[batch, heads_kv]");
        check_index_tensor(op, "head_bits", *head_bits, q, {batch, heads_kv, max_selected},
                           "[batch, heads_kv, max_selected] (page_indices' shape)");
        heads.page_indices = data_of<int32_t>(*page_indices);
        heads.page_counts = data_of<int32_t>(*page_counts);
        heads.head_bits = data_of<int32_t>(*head_bits);
        heads.max_selected = int(max_selected);
    }

    const bool int8 = k_cache.scalar_type() == at::kChar;
    TORCH_CHECK_VALUE(!int8 || (positive_as_float(k_scale) && positive_as_float(v_scale)), op,
                      ": an int8 cache needs k_scale, v_scale finite and > 0 as float32, got ", k_scale, ", ", v_scale);
    TORCH_CHECK_VALUE(int8 || (k_scale == 1.0 && v_scale == 1.0), op, ": k_scale/v_scale dequantise an int8 cache; a ",
                      k_cache.scalar_type(), " cache needs 1.0, got ", k_scale, ", ", v_scale);
    TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, op, ": window sizes must be >= -1, got (", window_left,
                      ", ",
                      window_right, ")");
    check_softcap(op, softcap);
    const double scale = checked_softmax_scale(op, softmax_scale, head_dim);
    TORCH_CHECK_VALUE(num_splits >= 0 && num_splits <= detail::kMaxSplits, op, ": expected num_splits in [0, ",
                      detail::kMaxSplits, "] (0 = auto), got ", num_splits);

    prep.out = at::empty(q.sizes(), q.options());
    prep.lse = at::empty({batch, heads_q, seqlen_q}, q.options().dtype(at::kFloat));
    decode::DecodeParams& p = prep.params;
    p.q = data_of(q);
    p.out = data_of(prep.out);
    p.lse = data_of<float>(prep.lse);
    p.q_batch_stride = q.stride(0);
    p.q_token_stride = q.stride(1);
    p.q_head_stride = q.stride(2);
    p.batch = int(batch);
    p.seqlen_q = int(seqlen_q);
    p.heads_q = int(heads_q);
    p.heads_kv = int(heads_kv);
    p.head_dim = int(head_dim);
    p.seqlens = data_of<int32_t>(seqlens);
    p.cache = prep.main.pool;
    p.table = prep.main.table;
    p.heads = heads;
    p.ring = prep.lserve.ring;
    p.dtype = to_dtype(q.scalar_type());
    p.kv_dtype = kv_dtype_of(k_cache.scalar_type());
    p.k_scale = float(k_scale);
    p.v_scale = float(v_scale);
    p.softmax_scale = float(scale);
    p.softcap = float(softcap);
    p.window_left = clamp_window(window_left);
    p.window_right = clamp_window(window_right);
    p.num_splits = int(num_splits);
    if (values_checked(seqlens)) {
        HostIndices host;
        DecodePrepared on_host = host.redirect(prep, seqlens, block_table, cache_batch_idx, kv_head_slot, ring_table);
        on_host.params.heads.page_indices = host(page_indices);
        on_host.params.heads.page_counts = host(page_counts);
        on_host.params.heads.head_bits = host(head_bits);
        check_decode_values(on_host);
    }
    if (q.is_cpu()) {
        plan_workspace(prep, at::get_num_threads());
        cpu::decode_attention(prep.params);
    } else if (q.is_cuda()) {
#if defined(TKPY_WITH_CUDA)
        const c10::cuda::CUDAGuard guard(q.device());
        const int sms = tk::sm_count();  // q's device: the guard made it current
        TORCH_CHECK(sms > 0, kDecodeOp, ": could not query the SM count of ", q.device());
        plan_workspace(prep, sms);
        check_launch(kDecodeOp, decode::launch_decode_attention(prep.params, c10::cuda::getCurrentCUDAStream()));
#endif
    }
    return {prep.out, prep.lse};
}

void kv_append_(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& seqlens, const std::optional<at::Tensor>& block_table,
                              const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& k_min,
                              const std::optional<at::Tensor>& k_max, const std::optional<at::Tensor>& rotary_cos,
                              const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved, double k_scale,
                              double v_scale, const std::optional<at::Tensor>& kv_head_slot,
                              const std::optional<at::Tensor>& k_ring, const std::optional<at::Tensor>& v_ring,
                              const std::optional<at::Tensor>& ring_table, int64_t sink, int64_t local) {
    constexpr const char* op = kAppendOp;
    for (const auto& [name, t] : {std::pair{"k", &k}, std::pair{"v", &v}}) {
        check_device(op, name, *t, k, "k");
        TORCH_CHECK_VALUE(t->scalar_type() == at::kBFloat16 || t->scalar_type() == at::kHalf, op, ": expected ", name,
                          " to be bfloat16 or float16, got ", t->scalar_type());
        TORCH_CHECK_VALUE(t->dim() == 4, op, ": expected ", name,
                          " to be 4-D [batch, seqlen_new, heads_kv, head_dim], got ",
                          t->sizes());
        check_vector_rows(op, name, *t);
    }
    TORCH_CHECK_VALUE(k.scalar_type() == v.scalar_type() && k.sizes() == v.sizes(), op,
                      ": expected k and v of one dtype and shape, got ", k.scalar_type(), " ", k.sizes(), " and ",
                      v.scalar_type(), " ", v.sizes());
    const int64_t batch = k.size(0), seqlen_new = k.size(1), heads_kv = k.size(2), head_dim = k.size(3);
    TORCH_CHECK_VALUE(is_head_dim_supported(head_dim), op, ": expected head_dim 64, 128 or 256, got ", head_dim);

    AppendPrepared prep;
    prep.main = main_pool(op, k_cache, v_cache, block_table, cache_batch_idx, k, batch, head_dim);
    prep.lserve = lserve_heads(op, kv_head_slot, k_ring, v_ring, ring_table, sink, local, k, prep.main, k_cache,
                               batch, head_dim);
    TORCH_CHECK_VALUE(prep.lserve.heads_kv == heads_kv, op, ": expected k/v with ", prep.lserve.heads_kv, " heads (",
                      kv_head_slot ? "kv_head_slot's length" : "k_cache's heads", "), got ", heads_kv);
    check_seqlens_tensor(op, seqlens, k, batch);

    const bool int8 = k_cache.scalar_type() == at::kChar;
    TORCH_CHECK_VALUE(!int8 || (positive_as_float(k_scale) && positive_as_float(v_scale)), op,
                      ": an int8 cache needs k_scale, v_scale finite and > 0 as float32, got ", k_scale, ", ", v_scale);
    TORCH_CHECK_VALUE(int8 || (k_scale == 1.0 && v_scale == 1.0), op,
                      ": k_scale/v_scale quantise into an int8 cache; a ",
                      k_cache.scalar_type(), " cache needs 1.0, got ", k_scale, ", ", v_scale);

    decode::AppendParams& p = prep.params;
    TORCH_CHECK_VALUE(k_min.has_value() == k_max.has_value(), op, ": pass both k_min and k_max, or neither");
    if (k_min.has_value()) {
        check_stats("k_min", *k_min, k, prep.main);
        check_stats("k_max", *k_max, k, prep.main);
        p.k_min = data_of<float>(*k_min);
        p.k_max = data_of<float>(*k_max);
    }
    TORCH_CHECK_VALUE(rotary_cos.has_value() == rotary_sin.has_value(), op,
                      ": pass both rotary_cos and rotary_sin, or neither");
    if (rotary_cos.has_value()) {
        const at::Tensor& cos = *rotary_cos;
        const at::Tensor& sin = *rotary_sin;
        for (const auto& [name, t] : {std::pair{"rotary_cos", &cos}, std::pair{"rotary_sin", &sin}}) {
            check_device(op, name, *t, k, "k");
            TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat || t->scalar_type() == k.scalar_type(), op, ": expected ",
                              name,
                              " to be float32 or k's dtype ", k.scalar_type(), ", got ", t->scalar_type());
            TORCH_CHECK_VALUE(t->dim() == 2 && t->size(1) >= 1 && 2 * t->size(1) <= head_dim, op, ": expected ", name,
                              " of shape [rows, rotary_dim/2] with an even rotary_dim <= head_dim ", head_dim, ", got ",
                              t->sizes());
            TORCH_CHECK_VALUE(t->is_contiguous(), op, ": expected ", name, " to be contiguous, got strides ",
                              t->strides());
        }
        TORCH_CHECK_VALUE(cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type(), op,
                          ": expected rotary_cos and rotary_sin of one shape and dtype, got ", cos.sizes(), " ",
                          cos.scalar_type(), " and ", sin.sizes(), " ", sin.scalar_type());
        p.rotary_cos = data_of(cos);
        p.rotary_sin = data_of(sin);
        p.rotary_rows = int(cos.size(0));
        p.rotary_dim = int(2 * cos.size(1));
        p.rotary_dtype = to_dtype(cos.scalar_type());
    }
    p.rotary_interleaved = rotary_interleaved;
    check_append_aliasing({{"k_cache", &k_cache}, {"v_cache", &v_cache}, {"k_min", opt(k_min)}, {"k_max", opt(k_max)},
                           {"k_ring", opt(k_ring)}, {"v_ring", opt(v_ring)}},
                          {{"k", &k}, {"v", &v}, {"cache_seqlens", &seqlens}, {"block_table", opt(block_table)},
                           {"cache_batch_idx", opt(cache_batch_idx)}, {"rotary_cos", opt(rotary_cos)},
                           {"rotary_sin", opt(rotary_sin)}, {"kv_head_slot", opt(kv_head_slot)},
                           {"ring_table", opt(ring_table)}});

    p.k = data_of(k);
    p.v = data_of(v);
    p.k_batch_stride = k.stride(0);
    p.k_token_stride = k.stride(1);
    p.k_head_stride = k.stride(2);
    p.v_batch_stride = v.stride(0);
    p.v_token_stride = v.stride(1);
    p.v_head_stride = v.stride(2);
    p.batch = int(batch);
    p.seqlen_new = int(seqlen_new);
    p.heads_kv = int(heads_kv);
    p.head_dim = int(head_dim);
    p.seqlens = data_of<int32_t>(seqlens);
    p.cache = prep.main.pool;
    p.table = prep.main.table;
    p.heads = prep.lserve.heads;
    p.ring = prep.lserve.ring;
    p.dtype = to_dtype(k.scalar_type());
    p.kv_dtype = kv_dtype_of(k_cache.scalar_type());
    p.k_scale = float(k_scale);
    p.v_scale = float(v_scale);
    if (values_checked(seqlens)) {
        HostIndices host;
        check_append_values(host.redirect(prep, seqlens, block_table, cache_batch_idx, kv_head_slot, ring_table));
    }
    if (k.is_cpu()) {
        cpu::kv_append(prep.params);
    } else if (k.is_cuda()) {
#if defined(TKPY_WITH_CUDA)
        const c10::cuda::CUDAGuard guard(k.device());
        check_launch(kAppendOp, decode::launch_kv_append(prep.params, c10::cuda::getCurrentCUDAStream()));
#endif
    }
}

}  // namespace tkpy::ops
