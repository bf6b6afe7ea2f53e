// Internal to the CPU training update (kernels/cpu/train.cc): the per-group inner loops it
// dispatches to, AVX2 versions here and portable scalar versions in train.cc. Plain C++ with no
// intrinsics, so any translation unit may include it; only train_avx2.cc is compiled for AVX2.
//
// Every kernel computes exactly what kernels/train.h defines, with the same IEEE fp32/double
// operations in the same order per element; vector lanes only run elements side by side.
#pragma once

#include <cstdint>

namespace trove::train_internal {

// A `top` scratch whose first entry is this holds no hashes yet (hashes are < 2^24).
inline constexpr uint32_t kNoTops = 0xffffffffu;

// The inner loops of one CPU path. A "full group" is 32 consecutive real elements of one row,
// element 0 at record element index e0.
struct TrainKernels {
  // lane[l] += g[32 q + l]² (in double, each square exact) for q < groups, q increasing:
  // Adagrad's 32 lanes over the row's full groups.
  void (*sum_square_lanes)(const float* g, int64_t groups, double* lane);
  // Steps 2b/2c: candidates c = b + k + [u < v - k] with v = (16 · delta) / d, k = floor(v),
  // u = sr_uniform_from_prefix(prefix, e0 + j). Returns -1, b untouched, when the group must
  // rescale (some |k| > 256, NaN included, or the overshoot exceeds `tolerance`); otherwise
  // writes b = clamp(c, -128, 127) and returns 1 if that clamped something, else 0. `top`
  // (32 entries, top[0] = kNoTops on the group's first call) may cache the group's hashes
  // between calls: they do not change when d does.
  int (*try_full_group)(const float* delta, float d, uint64_t prefix, uint64_t e0, int tolerance,
                        uint32_t* top, int8_t* b);
  // One rescale round: b ← floor(b / 2) + [u < frac(b / 2)], u of counter base + j, where
  // base = sr_rescale_element(e0, t).
  void (*halve_full_group)(uint64_t prefix, uint64_t base, int8_t* b);
};

}  // namespace trove::train_internal

namespace trove::avx2 {

// REQUIRES: the CPU supports AVX2.
const train_internal::TrainKernels& train_kernels();

}  // namespace trove::avx2
