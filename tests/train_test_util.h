// Helpers the training-update tests share (tests/train_update_test.cc, tests/cuda_train_test.cc):
// int8 training records with random scales and codes, the rows inside one, gradients, and the
// steps of both optimizers.
#pragma once

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "base/check.h"
#include "base/half.h"
#include "kernels/quant.h"
#include "kernels/record.h"
#include "kernels/train.h"

namespace trove::testing {

inline RecordLayout layout_of(DType t, int64_t dim, int64_t dim_out, int64_t width) {
  auto l = RecordLayout::make(t, dim, dim_out, width);
  TROVE_CHECK(l.ok());
  return *l;
}

// Row r (0..2m-1: down rows, then up rows) of a training record.
struct Row {
  uint16_t* scales;
  int8_t* codes;
  int64_t n;
};
inline Row row_of(const RecordLayout& l, uint8_t* rec, int64_t r) {
  const bool down = r < l.width;
  const int64_t i = down ? r : r - l.width;
  const int64_t n = down ? l.dim : l.dim_out;
  return {reinterpret_cast<uint16_t*>(rec + (down ? l.down_scales_offset : l.up_scales_offset)) +
              i * quant_groups(n),
          reinterpret_cast<int8_t*>(rec + (down ? l.down_codes_offset : l.up_codes_offset) +
                                    static_cast<size_t>(i) *
                                        (down ? l.down_row_code_bytes : l.up_row_code_bytes)),
          n};
}

// Random training records: scales of either sign spanning a few octaves, some exactly 0;
// codes anywhere in [-128, 127] (padding codes 0); every byte after record_bytes `tail`.
inline std::vector<uint8_t> random_training_records(const RecordLayout& l, int64_t count,
                                                    std::mt19937& rng, double zero_scale_rate = 0.1,
                                                    uint8_t tail = 0) {
  std::vector<uint8_t> recs(static_cast<size_t>(count) * l.stride, 0);
  std::uniform_real_distribution<float> mag(0.01f, 2.0f);
  std::uniform_int_distribution<int> code(-128, 127);
  std::bernoulli_distribution zero(zero_scale_rate), neg(0.5);
  for (int64_t i = 0; i < count; ++i) {
    uint8_t* rec = recs.data() + static_cast<size_t>(i) * l.stride;
    std::memset(rec + l.record_bytes, tail, l.stride - l.record_bytes);
    for (int64_t r = 0; r < 2 * l.width; ++r) {
      Row row = row_of(l, rec, r);
      for (int64_t g = 0; g < quant_groups(row.n); ++g) {
        row.scales[g] = zero(rng) ? 0 : fp32_to_fp16(neg(rng) ? -mag(rng) : mag(rng));
      }
      for (int64_t j = 0; j < row.n; ++j) row.codes[j] = static_cast<int8_t>(code(rng));
    }
  }
  return recs;
}

inline std::vector<float> normal(size_t n, float sigma, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

inline TrainStep sgd(float lr, uint64_t step = 0) {
  TrainStep s;
  s.optimizer = TrainOptimizer::kSgd;
  s.lr = lr;
  s.seed = 0x5eed;
  s.step = step;
  s.table = 3;
  return s;
}
inline TrainStep adagrad(float lr, uint64_t step = 0) {
  TrainStep s = sgd(lr, step);
  s.optimizer = TrainOptimizer::kAdagrad;
  s.eps = 1e-6f;
  return s;
}

}  // namespace trove::testing
