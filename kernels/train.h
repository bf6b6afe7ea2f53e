// The int4 training view and its stochastic-rounding update (SPEC §3, §7), shared by every
// backend. The oracle (kernels/cpu/ref/train_ref.h) is the definition; the CPU and CUDA paths
// must equal it bit for bit on codes, scales and accumulators.
//
// Training view. A trained int4 table is stored as int8-layout records (RecordLayout with
// DType::kI8, same dim/dim_out/width as the serving int4 layout): per group of 32 an fp16
// scale d and int8 codes b, meaning weight = d/16 · b. One LSB of the 8-bit code is d/16; one
// int4 LSB is d. The served int4 value of b is q = clamp((b + 8) >> 4, -8, 7) (arithmetic
// shift: round to nearest, ties up), weight_served = q · d.
//   import (serving -> training): b = 16 q, same d. Exact.
//   export (training -> serving): q = train_code_to_int4(b), same d. export(import(r)) == r
//   byte for byte (padding elements of a serving record are stored 8, i.e. q = 0, b = 0).
//
// The update of one record, given the segment-summed fp32 gradients of its m down rows ([D])
// and m up rows ([D_out]). All arithmetic is IEEE fp32 (round to nearest even) unless it says
// double; no step can be changed by FMA contraction (the only products are exact or stand
// alone). Rows r = 0..m-1 are the down rows, r = m..2m-1 the up rows; element index e (the
// hash's `element`) is r·D + i for down row r, m·D + (r-m)·D_out + i for up rows.
//
//   1. Per row, step size a:
//        SGD:     a = lr.
//        Adagrad: s = sum of g_i² (each square exact in double) over 32 double lanes, lane
//                 i mod 32, each lane summed in increasing i, then the lanes folded as a
//                 warp reduction: for o = 16, 8, 4, 2, 1: lane[l] += lane[l + o] (l < o);
//                 mean = float(s / double(n)); G = G + mean (the row's fp32 accumulator);
//                 a = lr / (sqrtf(G) + eps).
//      Δ_i = -(a · g_i).
//   2. Per group (32 elements; in the last group only the row's real elements, i < n, take
//      part: padding codes are carried unchanged), with d = the fp16 scale widened to fp32:
//      a. If d == 0 and some Δ_i != 0: every real b ← 0 (they meant 0) and
//         d ← fp16(max_i |Δ_i| / 7) (so the update lands near ±112 codes), at least the
//         smallest fp16 subnormal 2^-24. Counted in scale_inits.
//      b. For each real element: v = (16 · Δ_i) / d, k = floorf(v),
//         up = sr_uniform(seed, step, table, expert, e) < v - k (v - k is exact),
//         c = b + k + up (the spec's ⌊b + 16Δ/d + u⌋, evaluated without rounding).
//      c. If every c is in [-128, 127]: b ← c; done. If the group's overshoot
//         o = max_j max(c_j - 127, -128 - c_j) (infinite when some |k| > 256) is at most the
//         step's saturation_tolerance T (0..128 codes): b ← clamp(c, -128, 127), the scale
//         unchanged; counted in clamps; done. Otherwise the group saturates: if 2d is
//         not a finite fp16 (|2d| > 65504) the update fails (kOutOfRange, record unchanged);
//         else d ← 2d (exact) and, for round t = 1, 2, ... of this group, every real
//         b ← SR(b / 2) = floor(b / 2) + [u < frac(b / 2)] with
//         u = sr_uniform(seed, step, table, expert, e + t·2^48); counted in rescales; then
//         back to b (the update's u stays the one of round 0). This terminates: d doubles
//         each round and overflows fp16 after at most ~40 rounds.
//   With T = 0 (SPEC §7 as written) the result never needs the clamp of the spec's formula: c
//   is in range when written. T > 0 trades the doubling, which coarsens the group's int4 grid
//   for good, for a clamp of the few elements that overshoot by a little (Q4_0 starts each
//   group's largest weight on the code range's edge, where noisy gradients push it outward
//   early; bench/train_compare measures the difference).
//
// Stats: elements_changed counts real elements whose final b differs from the initial one
// (rescale included), rescales counts doublings, clamps counts groups clamped in 2c,
// scale_inits counts step 2a.
//
// This header is C++17 and marks the hash and the code conversions TROVE_HD, because the CUDA
// update (kernels/cuda/train_update.cu, compiled as C++17) calls the very same functions: one
// definition of the bits for every backend.
#pragma once

#include <cstdint>

#include "base/host_device.h"
#include "base/status.h"
#include "kernels/record.h"

namespace trove {

enum class TrainOptimizer : uint8_t { kSgd, kAdagrad };

// What one update step needs besides the gradients; identical for every record of the step.
struct TrainStep {
  TrainOptimizer optimizer = TrainOptimizer::kAdagrad;
  float lr = 0.0f;     // > 0, finite
  float eps = 1e-8f;   // Adagrad only: > 0, finite
  uint64_t seed = 0;   // the run's seed
  uint64_t step = 0;   // the optimizer step
  uint32_t table = 0;  // which expert table (layer) this is
  // Step 2c: a group whose candidates overshoot [-128, 127] by at most this many codes is
  // clamped instead of rescaled. 0..128; 0 is SPEC §7's rule (always rescale).
  int32_t saturation_tolerance = 0;
};

struct TrainStats {
  int64_t elements_changed = 0;
  int64_t rescales = 0;
  int64_t scale_inits = 0;
  int64_t clamps = 0;

  void merge(const TrainStats& o) {
    elements_changed += o.elements_changed;
    rescales += o.rescales;
    scale_inits += o.scale_inits;
    clamps += o.clamps;
  }
  // Spelled out rather than defaulted: CUDA translation units include this header as C++17.
  bool operator==(const TrainStats& o) const {
    return elements_changed == o.elements_changed && rescales == o.rescales &&
           scale_inits == o.scale_inits && clamps == o.clamps;
  }
};

// ---- the counter-based hash -----------------------------------------------------------------
//
// splitmix64's finalizer, chained over the five inputs:
//   h = mix(seed ^ 0x9e3779b97f4a7c15); h = mix(h ^ step); h = mix(h ^ table);
//   h = mix(h ^ expert); h = mix(h ^ element); u = (h >> 40) · 2^-24.
// Every stage is a bijection of h and of its input, so changing any one input changes h;
// u is a multiple of 2^-24 in [0, 1), exact in fp32. Only 64-bit integer arithmetic: the same
// bits on every platform, backend and thread count. constexpr and TROVE_HD so host, device and
// static_assert all evaluate the one definition.

TROVE_HD constexpr uint64_t sr_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The hash state after the first four inputs (a record's prefix, reusable per element).
TROVE_HD constexpr uint64_t sr_prefix(uint64_t seed, uint64_t step, uint32_t table,
                                      uint64_t expert) {
  uint64_t h = sr_mix(seed ^ 0x9e3779b97f4a7c15ull);
  h = sr_mix(h ^ step);
  h = sr_mix(h ^ table);
  return sr_mix(h ^ expert);
}

TROVE_HD constexpr float sr_uniform_from_prefix(uint64_t prefix, uint64_t element) {
  return static_cast<float>(sr_mix(prefix ^ element) >> 40) * (1.0f / 16777216.0f);
}

TROVE_HD constexpr float sr_uniform(uint64_t seed, uint64_t step, uint32_t table, uint64_t expert,
                                    uint64_t element) {
  return sr_uniform_from_prefix(sr_prefix(seed, step, table, expert), element);
}

// The hash counter of rescale round t (>= 1) of element e; the update itself uses e (t = 0).
inline constexpr int kSrRoundShift = 48;
TROVE_HD constexpr uint64_t sr_rescale_element(uint64_t e, uint64_t t) {
  return e + (t << kSrRoundShift);
}

// ---- the training view ------------------------------------------------------------------------

// The served int4 value of a training code: clamp((b + 8) >> 4, -8, 7).
TROVE_HD constexpr int train_code_to_int4(int8_t b) {
  const int q = (static_cast<int>(b) + 8) >> 4;  // arithmetic shift (C++20 defines it)
  return q < -8 ? -8 : (q > 7 ? 7 : q);
}
// The training code of a served int4 value q in [-8, 7].
TROVE_HD constexpr int8_t int4_to_train_code(int q) {
  return static_cast<int8_t>(16 * q);
}

// OK when `training` is DType::kI8 and `serving` DType::kI4 with the same dim, dim_out and
// width; otherwise an error naming what differs.
Status check_train_layouts(const RecordLayout& serving, const RecordLayout& training);
// OK when `training` is a kI8 layout with fewer than 2^48 elements per record.
Status check_train_layout(const RecordLayout& training);
// OK when lr > 0 and finite, and for Adagrad eps > 0 and finite.
Status check_train_step(const TrainStep& step);
// The per-record input checks every backend makes before it changes anything: expert >= 0;
// every gradient finite (else an error naming the expert, the row - "down row 2" / "up row 0" -
// the element within the row, the record element index e and the value); every scale of
// `record` finite; for Adagrad `accum` (2m floats) present, finite and >= 0.
// REQUIRES: check_train_layout(training) is OK.
Status check_train_record(const RecordLayout& training, const TrainStep& step, int64_t expert,
                          const float* down_grad, const float* up_grad, const uint8_t* record,
                          const float* accum);

}  // namespace trove
