// A C++ server's use of tkpy without torch: the launchers of include/tkpy on raw device buffers,
// through the CUDA runtime alone, checked against a host reference. One serving step:
//   1. prefill: causal GQA attention over a batch of prompts (tkpy::attention);
//   2. decode: each sequence's newest key and value appended to a paged KV cache, then one query
//      row per sequence attending to its cache, split-KV planned and its workspace sized by
//      tkpy::decode (tkpy::decode).
// Exits 0 when both match the reference. The kernels are sm_90a: it runs on a Hopper GPU only.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "tkpy/attention.h"
#include "tkpy/decode.h"

namespace {

void check(cudaError_t status, const char* what) {
    if (status != cudaSuccess) {
        std::fprintf(stderr, "%s failed: %s\n", what, cudaGetErrorString(status));
        std::exit(1);
    }
}

// bf16 is the top half of an fp32; rounding to nearest even, as __float2bfloat16 does.
uint16_t to_bf16(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return uint16_t(bits >> 16);
}

float from_bf16(uint16_t x) {
    const uint32_t bits = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

std::vector<uint16_t> random_bf16(size_t n, std::mt19937& rng) {
    std::normal_distribution<float> normal;
    std::vector<uint16_t> v(n);
    for (auto& x : v) x = to_bf16(normal(rng));
    return v;
}

// Device memory owned like a std::vector: allocated on construction, freed on destruction.
template <typename T>
class DeviceBuffer {
  public:
    explicit DeviceBuffer(size_t count) : count_(count) {
        check(cudaMalloc(reinterpret_cast<void**>(&data_), std::max<size_t>(count, 1) * sizeof(T)), "cudaMalloc");
    }
    explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
        check(cudaMemcpy(data_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy to device");
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() { cudaFree(data_); }

    T* get() const { return data_; }
    std::vector<T> download() const {
        std::vector<T> host(count_);
        check(cudaMemcpy(host.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy to host");
        return host;
    }

  private:
    T* data_ = nullptr;
    size_t count_;
};

// One query row against `keys` rows of k and v ([keys][d], fp32): softmax(scale * q·kᵀ) · v and the
// row's natural-log sum of exp(scale * q·k), in double.
void attend(const float* q, const std::vector<float>& k, const std::vector<float>& v, int keys, int d, double scale,
            float* out, float* lse) {
    std::vector<double> scores(keys);
    double max_score = -INFINITY;
    for (int j = 0; j < keys; ++j) {
        double s = 0;
        for (int i = 0; i < d; ++i) s += double(q[i]) * k[size_t(j) * d + i];
        scores[j] = s * scale;
        max_score = std::max(max_score, scores[j]);
    }
    double sum = 0;
    std::vector<double> acc(d, 0.0);
    for (int j = 0; j < keys; ++j) {
        const double p = std::exp(scores[j] - max_score);
        sum += p;
        for (int i = 0; i < d; ++i) acc[i] += p * v[size_t(j) * d + i];
    }
    for (int i = 0; i < d; ++i) out[i] = float(acc[i] / sum);
    *lse = float(max_score + std::log(sum));
}

// ||got - want|| / ||want||, with the bf16 output decoded.
double relative_error(const std::vector<uint16_t>& got, const std::vector<float>& want) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double g = from_bf16(got[i]);
        if (!std::isfinite(g)) return INFINITY;
        diff += (g - want[i]) * (g - want[i]);
        norm += double(want[i]) * want[i];
    }
    return std::sqrt(diff / std::max(norm, 1e-30));
}

double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        if (!std::isfinite(got[i])) return INFINITY;
        diff += double(got[i] - want[i]) * (got[i] - want[i]);
        norm += double(want[i]) * want[i];
    }
    return std::sqrt(diff / std::max(norm, 1e-30));
}

// bf16 rounding of P and of the output keeps a correct kernel near 0.4%; a wrong tile is off by O(1).
constexpr double kOutTolerance = 1e-2;
constexpr double kLseTolerance = 1e-3;

bool report(const char* what, double out_error, double lse_error) {
    const bool ok = out_error <= kOutTolerance && lse_error <= kLseTolerance;
    std::printf("%s: out relative error %.2e (tolerance %.0e), lse %.2e (tolerance %.0e): %s\n", what, out_error,
                kOutTolerance, lse_error, kLseTolerance, ok ? "ok" : "MISMATCH");
    return ok;
}

// ---- prefill: causal attention forward over [B, S, H, D] ------------------------------------------

bool prefill(cudaStream_t stream, std::mt19937& rng) {
    constexpr int batch = 2, seqlen = 200, heads_q = 8, heads_kv = 2, d = 128;
    const size_t q_elems = size_t(batch) * seqlen * heads_q * d, kv_elems = size_t(batch) * seqlen * heads_kv * d;
    const std::vector<uint16_t> q = random_bf16(q_elems, rng), k = random_bf16(kv_elems, rng),
                                v = random_bf16(kv_elems, rng);
    DeviceBuffer<uint16_t> q_dev(q), k_dev(k), v_dev(v), out_dev(q_elems);
    DeviceBuffer<float> lse_dev(size_t(batch) * heads_q * seqlen);

    tkpy::attention::AttentionParams p;
    p.q = q_dev.get();
    p.k = k_dev.get();
    p.v = v_dev.get();
    p.out = out_dev.get();
    p.lse = lse_dev.get();
    p.q_batch_stride = p.o_batch_stride = int64_t(seqlen) * heads_q * d;
    p.q_token_stride = p.o_token_stride = int64_t(heads_q) * d;
    p.q_head_stride = p.o_head_stride = d;
    p.k_batch_stride = p.v_batch_stride = int64_t(seqlen) * heads_kv * d;
    p.k_token_stride = p.v_token_stride = int64_t(heads_kv) * d;
    p.k_head_stride = p.v_head_stride = d;
    p.lse_batch_stride = int64_t(heads_q) * seqlen;
    p.lse_head_stride = seqlen;
    p.batch = batch;
    p.heads_q = heads_q;
    p.heads_kv = heads_kv;
    p.head_dim = d;
    p.seqlen_q = p.seqlen_k = seqlen;
    p.softmax_scale = float(1.0 / std::sqrt(double(d)));
    p.window_right = 0;  // causal
    p.dtype = tkpy::DType::bf16;
    check(tkpy::attention::launch_attention_forward(p, stream), "launch_attention_forward");
    check(cudaStreamSynchronize(stream), "prefill");

    std::vector<float> want_out(q_elems), want_lse(size_t(batch) * heads_q * seqlen);
    std::vector<float> keys(size_t(seqlen) * d), values(size_t(seqlen) * d), row(d);
    for (int b = 0; b < batch; ++b) {
        for (int h = 0; h < heads_q; ++h) {
            const int hk = h / (heads_q / heads_kv);
            for (int t = 0; t < seqlen; ++t) {
                for (int i = 0; i < d; ++i) {
                    const size_t at = ((size_t(b) * seqlen + t) * heads_kv + hk) * d + i;
                    keys[size_t(t) * d + i] = from_bf16(k[at]);
                    values[size_t(t) * d + i] = from_bf16(v[at]);
                }
            }
            for (int t = 0; t < seqlen; ++t) {
                const size_t at = ((size_t(b) * seqlen + t) * heads_q + h) * d;
                for (int i = 0; i < d; ++i) row[i] = from_bf16(q[at + i]);
                attend(row.data(), keys, values, t + 1, d, p.softmax_scale, &want_out[at],
                       &want_lse[(size_t(b) * heads_q + h) * seqlen + t]);
            }
        }
    }
    return report("prefill attention", relative_error(out_dev.download(), want_out),
                  relative_error(lse_dev.download(), want_lse));
}

// ---- decode: append one token per sequence to a paged cache, then attend to the cache ------------

bool decode(cudaStream_t stream, int sm_count, std::mt19937& rng) {
    constexpr int heads_q = 8, heads_kv = 2, d = 128, page_size = 16;
    const std::vector<int32_t> cached = {37, 300, 1000};  // tokens in the cache before this step
    const int batch = int(cached.size());
    std::vector<int32_t> lengths(batch);  // after the append
    for (int b = 0; b < batch; ++b) lengths[b] = cached[b] + 1;
    const int max_pages = (*std::max_element(lengths.begin(), lengths.end()) + page_size - 1) / page_size;

    // Each sequence's pages are scattered over the pool, as an allocator leaves them.
    const int num_pages = batch * max_pages;
    std::vector<int32_t> table(num_pages);  // [batch, max_pages]
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng);

    const size_t token_elems = size_t(heads_kv) * d, pool_elems = size_t(num_pages) * page_size * token_elems;
    std::vector<uint16_t> k_pool = random_bf16(pool_elems, rng), v_pool = random_bf16(pool_elems, rng);
    const std::vector<uint16_t> k_new = random_bf16(batch * token_elems, rng),
                                v_new = random_bf16(batch * token_elems, rng),
                                q = random_bf16(size_t(batch) * heads_q * d, rng);
    DeviceBuffer<uint16_t> k_pool_dev(k_pool), v_pool_dev(v_pool), k_new_dev(k_new), v_new_dev(v_new), q_dev(q);
    DeviceBuffer<uint16_t> out_dev(q.size());
    DeviceBuffer<float> lse_dev(size_t(batch) * heads_q);
    DeviceBuffer<int32_t> table_dev(table), cached_dev(cached), lengths_dev(lengths);

    tkpy::decode::KVPool pool;
    pool.k = k_pool_dev.get();
    pool.v = v_pool_dev.get();
    pool.page_stride = int64_t(page_size) * token_elems;
    pool.token_stride = token_elems;
    pool.head_stride = d;
    pool.heads = heads_kv;
    pool.num_pages = num_pages;
    tkpy::detail::PageTable paging{table_dev.get(), max_pages, page_size, nullptr, max_pages};

    tkpy::decode::AppendParams append;
    append.k = k_new_dev.get();
    append.v = v_new_dev.get();
    append.k_batch_stride = append.v_batch_stride = token_elems;  // [B, 1, Hkv, D]
    append.k_token_stride = append.v_token_stride = token_elems;
    append.k_head_stride = append.v_head_stride = d;
    append.batch = batch;
    append.seqlen_new = 1;
    append.heads_kv = heads_kv;
    append.head_dim = d;
    append.seqlens = cached_dev.get();
    append.cache = pool;
    append.table = paging;
    check(tkpy::decode::launch_kv_append(append, stream), "launch_kv_append");

    tkpy::decode::DecodeParams p;
    p.q = q_dev.get();
    p.out = out_dev.get();
    p.lse = lse_dev.get();
    p.q_batch_stride = p.q_token_stride = int64_t(heads_q) * d;  // [B, 1, Hq, D]
    p.q_head_stride = d;
    p.batch = batch;
    p.seqlen_q = 1;
    p.heads_q = heads_q;
    p.heads_kv = heads_kv;
    p.head_dim = d;
    p.seqlens = lengths_dev.get();
    p.cache = pool;
    p.table = paging;
    p.softmax_scale = float(1.0 / std::sqrt(double(d)));
    p.num_splits = 0;  // plan_splits picks the count for this GPU
    tkpy::decode::plan_splits(p, sm_count);
    DeviceBuffer<unsigned char> workspace(tkpy::decode::workspace_bytes(p));
    tkpy::decode::set_workspace(p, workspace.get());
    check(tkpy::decode::launch_decode_attention(p, stream), "launch_decode_attention");
    check(cudaStreamSynchronize(stream), "decode");

    // The reference cache: the history, then the appended token at position cached[b].
    for (int b = 0; b < batch; ++b) {
        const int32_t t = cached[b];
        const size_t at = (size_t(table[size_t(b) * max_pages + t / page_size]) * page_size + t % page_size) * token_elems;
        std::copy_n(&k_new[b * token_elems], token_elems, &k_pool[at]);
        std::copy_n(&v_new[b * token_elems], token_elems, &v_pool[at]);
    }
    std::vector<float> want_out(q.size()), want_lse(size_t(batch) * heads_q), row(d);
    for (int b = 0; b < batch; ++b) {
        std::vector<float> keys(size_t(lengths[b]) * d), values(size_t(lengths[b]) * d);
        for (int h = 0; h < heads_q; ++h) {
            const int hk = h / (heads_q / heads_kv);
            for (int t = 0; t < lengths[b]; ++t) {
                const size_t page = table[size_t(b) * max_pages + t / page_size];
                const size_t at = (page * page_size + t % page_size) * token_elems + size_t(hk) * d;
                for (int i = 0; i < d; ++i) {
                    keys[size_t(t) * d + i] = from_bf16(k_pool[at + i]);
                    values[size_t(t) * d + i] = from_bf16(v_pool[at + i]);
                }
            }
            const size_t at = (size_t(b) * heads_q + h) * d;
            for (int i = 0; i < d; ++i) row[i] = from_bf16(q[at + i]);
            attend(row.data(), keys, values, lengths[b], d, p.softmax_scale, &want_out[at],
                   &want_lse[size_t(b) * heads_q + h]);
        }
    }
    // The appended tokens must be in the pool as the reference placed them.
    const bool appended = k_pool_dev.download() == k_pool && v_pool_dev.download() == v_pool;
    std::printf("kv append: %s\n", appended ? "ok" : "MISMATCH");
    char what[96];
    std::snprintf(what, sizeof what, "decode attention (%d splits for %d SMs)", p.num_splits, sm_count);
    return report(what, relative_error(out_dev.download(), want_out), relative_error(lse_dev.download(), want_lse)) &&
           appended;
}

}  // namespace

int main() {
    int device = 0, major = 0, minor = 0, sm_count = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    if (major != 9) {
        std::fprintf(stderr, "tkpy's kernels are built for sm_90a; device %d is sm_%d%d\n", device, major, minor);
        return 1;
    }
    cudaStream_t stream;
    check(cudaStreamCreate(&stream), "cudaStreamCreate");
    std::mt19937 rng(2024);
    const bool prefill_ok = prefill(stream, rng);
    const bool decode_ok = decode(stream, sm_count, rng);
    check(cudaStreamDestroy(stream), "cudaStreamDestroy");
    return prefill_ok && decode_ok ? 0 : 1;
}
