// The online softmax of the CPU attention paths (prefill tiles and decode tasks): running row max and
// sum over blocks of scores, with the accumulator rescaled as the max grows. max, exp and sum run as
// ATen ops, which are vectorised for the host CPU; the per-row bookkeeping is plain loops. T is the
// compute type: float, or double for the fp64 attention path.
#pragma once

#include <ATen/CPUFunctions.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace tkpy::cpu {

template <typename T>
class OnlineSoftmax {
public:
    explicit OnlineSoftmax(int max_rows)
        : block_max_(at::empty({max_rows}, c10::CppTypeToScalarType<T>::value)),
          block_sum_(at::empty({max_rows}, c10::CppTypeToScalarType<T>::value)),
          row_max_(max_rows),
          row_sum_(max_rows),
          rescale_(max_rows) {}

    // Starts `rows` rows that have seen no key.
    void reset(int rows) {
        std::fill_n(row_max_.begin(), rows, kNegInf);
        std::fill_n(row_sum_.begin(), rows, T(0));
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
        T* const s = scores.data_ptr<T>();
        const T* const maxes = block_max.data_ptr<T>();
        for (int r = 0; r < rows; ++r) {
            const T new_max = std::max(row_max_[r], maxes[r]);
            const T pivot = new_max == kNegInf ? T(0) : new_max;
            T* row = s + int64_t(r) * cols;
            for (int c = 0; c < cols; ++c) row[c] -= pivot;
            rescale_[r] = std::exp(row_max_[r] - pivot);
            row_max_[r] = new_max;
        }
        scores.exp_();
        at::cpu::sum_out(block_sum, scores, at::IntArrayRef{1});
        const T* const sums = block_sum.data_ptr<T>();
        T* const acc_data = acc.data_ptr<T>();
        const int64_t head_dim = acc.size(1);
        for (int r = 0; r < rows; ++r) {
            row_sum_[r] = row_sum_[r] * rescale_[r] + sums[r];
            if (rescale_[r] == T(1)) continue;
            T* acc_row = acc_data + r * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) acc_row[d] *= rescale_[r];
        }
    }

    // Divides accumulator row r (head_dim values) by its sum and returns the row's natural-log lse.
    // A row that saw no key has sum 0: its output is 0 and its lse -inf.
    T finish_row(int r, T* acc_row, int64_t head_dim) const {
        const T sum = row_sum_[r];
        const T inv_sum = sum > T(0) ? T(1) / sum : T(0);
        for (int64_t d = 0; d < head_dim; ++d) acc_row[d] *= inv_sum;
        return sum > T(0) ? row_max_[r] + std::log(sum) : kNegInf;
    }

private:
    static constexpr T kNegInf = -std::numeric_limits<T>::infinity();

    at::Tensor block_max_;  // per row of the current block
    at::Tensor block_sum_;
    std::vector<T> row_max_;  // running max over the blocks so far
    std::vector<T> row_sum_;  // running sum of exp(score - row_max)
    std::vector<T> rescale_;  // exp(old row_max - new row_max) of the current block
};

}  // namespace tkpy::cpu
