// Helpers the PEER kernel tests share (tests/peer_ref_test.cc, tests/peer_parity_test.cc).
#pragma once

#include <random>
#include <vector>

#include "base/check.h"
#include "kernels/record.h"

namespace trove::testing {

inline RecordLayout layout_of(DType dtype, int64_t dim, int64_t dim_out) {
  Result<RecordLayout> l = RecordLayout::make(dtype, dim, dim_out);
  TROVE_CHECK_MSG(l.ok(), "%s", l.status().to_string().c_str());
  return *l;
}

inline std::vector<float> normal_values(size_t n, double stddev, std::mt19937* rng) {
  std::normal_distribution<double> dist(0.0, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(dist(*rng));
  return v;
}

}  // namespace trove::testing
