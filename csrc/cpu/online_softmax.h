// The online softmax of the CPU attention paths (prefill tiles and decode tasks): running row max and
// sum over blocks of scores, with the accumulator rescaled as the max grows. max, exp and sum run as
// ATen ops, which are vectorised for the host CPU; the per-row bookkeeping is plain loops.
#pragma once

#include <ATen/CPUFunctions.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace tkpy::cpu {

class OnlineSoftmax {
public:
    explicit OnlineSoftmax(int max_rows)
        : block_max_(at::empty({max_rows}, at::kFloat)),
          block_sum_(at::empty({max_rows}, at::kFloat)),
          row_max_(max_rows),
          row_sum_(max_rows),
          rescale_(max_rows) {}

    // Starts `rows` rows that have seen no key.
    void reset(int rows) {
        std::fill_n(row_max_.begin(), rows, kNegInf);
        std::fill_n(row_sum_.begin(), rows, 0.f);
    }

    // Turns a block's scores [rows, cols] into exp(score - new running max), in place, and rescales
    // each row's running sum and its accumulator row (acc [>= rows, D]) to that max. A row that has
    // seen no visible key yet keeps max -inf; its exponentials are taken against 0 so that they come
    // out 0, not NaN.
    void step(at::Tensor& scores, at::Tensor& acc) {
        const int rows = int(scores.size(0));
        const int cols = int(scores.size(1));
        at::Tensor block_max = block_max_.narrow(0, 0, rows);
        at::Tensor block_sum = block_sum_.narrow(0, 0, rows);
        at::cpu::amax_out(block_max, scores, {1});
        float* const s = scores.data_ptr<float>();
        const float* const maxes = block_max.data_ptr<float>();
        for (int r = 0; r < rows; ++r) {
            const float new_max = std::max(row_max_[r], maxes[r]);
            const float pivot = new_max == kNegInf ? 0.f : new_max;
            float* row = s + int64_t(r) * cols;
            for (int c = 0; c < cols; ++c) row[c] -= pivot;
            rescale_[r] = std::exp(row_max_[r] - pivot);
            row_max_[r] = new_max;
        }
        scores.exp_();
        at::cpu::sum_out(block_sum, scores, at::IntArrayRef{1});
        const float* const sums = block_sum.data_ptr<float>();
        float* const acc_data = acc.data_ptr<float>();
        const int64_t head_dim = acc.size(1);
        for (int r = 0; r < rows; ++r) {
            row_sum_[r] = row_sum_[r] * rescale_[r] + sums[r];
            if (rescale_[r] == 1.f) continue;
            float* acc_row = acc_data + r * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) acc_row[d] *= rescale_[r];
        }
    }

    // Divides accumulator row r (head_dim floats) by its sum and returns the row's natural-log lse.
    // A row that saw no key has sum 0: its output is 0 and its lse -inf.
    float finish_row(int r, float* acc_row, int64_t head_dim) const {
        const float sum = row_sum_[r];
        const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t d = 0; d < head_dim; ++d) acc_row[d] *= inv_sum;
        return sum > 0.f ? row_max_[r] + std::log(sum) : kNegInf;
    }

private:
    static constexpr float kNegInf = -std::numeric_limits<float>::infinity();

    at::Tensor block_max_;  // per row of the current block
    at::Tensor block_sum_;
    std::vector<float> row_max_;  // running max over the blocks so far
    std::vector<float> row_sum_;  // running sum of exp(score - row_max)
    std::vector<float> rescale_;  // exp(old row_max - new row_max) of the current block
};

}  // namespace tkpy::cpu
