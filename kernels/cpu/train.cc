// The CPU training-view kernels. Against the oracle this saves the hash's first four mixing
// stages per record (sr_prefix), keeps each group's step in registers, decides saturation
// with integer arithmetic, never allocates per row, and updates in place with one backup copy
// per record (restored only when a scale would overflow). Threads split the records; each
// record's arithmetic is the oracle's, in its order, so the thread count cannot change a bit.
//
// The per-group inner loops (Adagrad's lane sums, steps 2b/2c, a rescale round) are the one
// dispatch point: AVX2 (kernels/cpu/train_avx2.cc) when kernels/cpu/quant.h's CpuPath says
// so, the portable scalar loops below otherwise and for a row's partial last group. Both
// compute the oracle's bits; tests/train_update_test.cc runs the parity sweep on each.
#include "kernels/cpu/train.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "base/half.h"
#include "base/strings.h"
#include "base/thread_pool.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/train_avx2.h"
#include "kernels/quant.h"

namespace trove {

namespace {

using train_internal::TrainKernels;

constexpr int kHalfGroup = kQuantGroup / 2;

uint16_t load_scale(const uint8_t* p) {
  uint16_t h = 0;
  std::memcpy(&h, p, sizeof h);
  return h;
}
void store_scale(uint8_t* p, uint16_t h) {
  std::memcpy(p, &h, sizeof h);
}

// The row geometry both record kinds share, resolved once per layout.
struct RowKind {
  int64_t n;
  int64_t groups;
  size_t scales_offset;
  size_t codes_offset;
  size_t row_code_bytes;
  const char* name;
};

// ---- scalar inner loops --------------------------------------------------------------------

void scalar_sum_square_lanes(const float* g, int64_t groups, double* lane) {
  for (int64_t i = 0; i < groups; ++i, g += kQuantGroup) {
    for (int l = 0; l < kQuantGroup; ++l) {
      const double x = g[l];
      lane[l] += x * x;
    }
  }
}

// Step 2b/2c of the first `real` elements of a group, as TrainKernels::try_full_group. The hash
// is drawn element by element and the loop leaves at the first |k| > 256: a saturating group
// usually fails on its first elements, before most of its hashes would be needed.
int scalar_try_group(const float* delta, int real, float d, uint64_t prefix, uint64_t e0,
                     int tolerance, int8_t* b) {
  int32_t c[kQuantGroup];
  int32_t overshoot = 0;
  for (int j = 0; j < real; ++j) {
    const float v = (16.0f * delta[j]) / d;
    const float k = std::floor(v);
    // |k| <= 256 (NaN excluded) keeps the int conversion defined; anything further out
    // overshoots more than any tolerance.
    if (!(std::fabs(k) <= 256.0f)) return -1;
    const float u = sr_uniform_from_prefix(prefix, e0 + static_cast<uint64_t>(j));
    c[j] = static_cast<int32_t>(b[j]) + static_cast<int32_t>(k) + (u < v - k ? 1 : 0);
    overshoot = std::max({overshoot, c[j] - 127, -128 - c[j]});
  }
  if (overshoot > tolerance) return -1;
  for (int j = 0; j < real; ++j) b[j] = static_cast<int8_t>(std::clamp(c[j], -128, 127));
  return overshoot > 0 ? 1 : 0;
}

int scalar_try_full_group(const float* delta, float d, uint64_t prefix, uint64_t e0, int tolerance,
                          uint32_t* /*top*/, int8_t* b) {
  return scalar_try_group(delta, kQuantGroup, d, prefix, e0, tolerance, b);
}

// b ← SR(b / 2) for the first `real` elements, with the counters of rescale round t (base =
// sr_rescale_element(e0, t)).
void scalar_halve_group(uint64_t prefix, uint64_t base, int real, int8_t* b) {
  for (int j = 0; j < real; ++j) {
    const float u = sr_uniform_from_prefix(prefix, base + static_cast<uint64_t>(j));
    const int x = b[j];
    b[j] = static_cast<int8_t>((x >> 1) + (((x & 1) != 0 && u < 0.5f) ? 1 : 0));
  }
}

void scalar_halve_full_group(uint64_t prefix, uint64_t base, int8_t* b) {
  scalar_halve_group(prefix, base, kQuantGroup, b);
}

constexpr TrainKernels kScalarKernels = {scalar_sum_square_lanes, scalar_try_full_group,
                                         scalar_halve_full_group};

const TrainKernels& kernels() {
  return cpu_path_has_avx2(active_cpu_path()) ? avx2::train_kernels() : kScalarKernels;
}

// ---- the update ------------------------------------------------------------------------------

Status update_row(const TrainKernels& kern, const TrainStep& st, int64_t expert, uint64_t prefix,
                  const RowKind& kind, int64_t row, const float* g, uint64_t element_base,
                  uint8_t* record, float* accum, TrainStats* stats) {
  const int64_t n = kind.n;
  float a = st.lr;
  if (st.optimizer == TrainOptimizer::kAdagrad) {
    double lane[kQuantGroup] = {};
    const int64_t full = n / kQuantGroup;
    kern.sum_square_lanes(g, full, lane);
    for (int64_t i = full * kQuantGroup, l = 0; i < n; ++i, ++l) {
      lane[l] += static_cast<double>(g[i]) * g[i];
    }
    for (int o = kHalfGroup; o >= 1; o /= 2) {
      for (int l = 0; l < o; ++l) lane[l] += lane[l + o];
    }
    *accum = *accum + static_cast<float>(lane[0] / static_cast<double>(n));
    a = st.lr / (std::sqrt(*accum) + st.eps);
  }

  uint8_t* scales = record + kind.scales_offset + 2 * static_cast<size_t>(row * kind.groups);
  auto* codes = reinterpret_cast<int8_t*>(record + kind.codes_offset +
                                          static_cast<size_t>(row) * kind.row_code_bytes);
  for (int64_t grp = 0; grp < kind.groups; ++grp) {
    const int64_t first = grp * kQuantGroup;
    const int real = static_cast<int>(std::min<int64_t>(kQuantGroup, n - first));
    const uint64_t e0 = element_base + static_cast<uint64_t>(first);
    float delta[kQuantGroup];
    for (int j = 0; j < real; ++j) delta[j] = -(a * g[first + j]);
    int8_t* b = codes + first;
    int8_t before[kQuantGroup];
    std::memcpy(before, b, static_cast<size_t>(real));
    uint8_t* scale_ptr = scales + 2 * grp;
    float d = fp16_to_fp32(load_scale(scale_ptr));

    if (d == 0.0f) {
      float max_abs = 0.0f;
      for (int j = 0; j < real; ++j) max_abs = std::max(max_abs, std::fabs(delta[j]));
      if (max_abs == 0.0f) continue;
      if (!(max_abs / 7.0f <= kFp16Max)) {
        return Status::out_of_range(str_printf(
            "expert %lld: %s row %lld group %lld: an update of %g does not fit an fp16 scale "
            "(lower the learning rate)",
            static_cast<long long>(expert), kind.name, static_cast<long long>(row),
            static_cast<long long>(grp), static_cast<double>(max_abs)));
      }
      uint16_t h = fp32_to_fp16(max_abs / 7.0f);
      if (h == 0) h = 1;
      store_scale(scale_ptr, h);
      d = fp16_to_fp32(h);
      std::memset(b, 0, static_cast<size_t>(real));
      ++stats->scale_inits;
    }

    // The update's u (round 0) serves every retry: a kernel may keep its hashes in `top`.
    uint32_t top[kQuantGroup];
    top[0] = train_internal::kNoTops;
    auto try_group = [&] {
      return real == kQuantGroup
                 ? kern.try_full_group(delta, d, prefix, e0, st.saturation_tolerance, top, b)
                 : scalar_try_group(delta, real, d, prefix, e0, st.saturation_tolerance, b);
    };
    int clamped = 0;
    for (uint64_t round = 1; (clamped = try_group()) < 0; ++round) {
      if (!(std::fabs(2.0f * d) <= kFp16Max)) {
        return Status::out_of_range(str_printf(
            "expert %lld: %s row %lld group %lld saturates with its scale at %g, and doubling "
            "it would overflow fp16 (the update is too large: lower the learning rate)",
            static_cast<long long>(expert), kind.name, static_cast<long long>(row),
            static_cast<long long>(grp), static_cast<double>(d)));
      }
      d = 2.0f * d;
      store_scale(scale_ptr, fp32_to_fp16(d));
      const uint64_t base = sr_rescale_element(e0, round);
      if (real == kQuantGroup) {
        kern.halve_full_group(prefix, base, b);
      } else {
        scalar_halve_group(prefix, base, real, b);
      }
      ++stats->rescales;
    }
    stats->clamps += clamped;
    for (int j = 0; j < real; ++j) stats->elements_changed += b[j] != before[j] ? 1 : 0;
  }
  return Status::ok_status();
}

// Runs fn(i) for i in [0, count) over the pool; returns the error of the lowest failing i.
template <typename Fn>
Status parallel_records(int64_t count, int threads, Fn fn) {
  std::vector<Status> errors(static_cast<size_t>(count));
  std::vector<char> failed(static_cast<size_t>(count), 0);
  parallel_for(count, threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Status s = fn(i);
      if (!s.ok()) {
        errors[static_cast<size_t>(i)] = std::move(s);
        failed[static_cast<size_t>(i)] = 1;
      }
    }
  });
  for (int64_t i = 0; i < count; ++i) {
    if (failed[static_cast<size_t>(i)] != 0) {
      return errors[static_cast<size_t>(i)];
    }
  }
  return Status::ok_status();
}

// Group-wise conversion of every row: fn(serving codes, training codes) per group.
template <typename Fn>
void for_each_group(const RecordLayout& serving, const RecordLayout& training, Fn fn) {
  for (int kind = 0; kind < 2; ++kind) {
    const bool down = kind == 0;
    const int64_t groups = quant_groups(down ? serving.dim : serving.dim_out);
    const size_t s_off = down ? serving.down_codes_offset : serving.up_codes_offset;
    const size_t t_off = down ? training.down_codes_offset : training.up_codes_offset;
    // Rows of one kind are contiguous whole groups in both layouts.
    for (int64_t g = 0; g < serving.width * groups; ++g) {
      fn(s_off + static_cast<size_t>(g) * kHalfGroup, t_off + static_cast<size_t>(g) * kQuantGroup);
    }
  }
}

}  // namespace

Status train_import_records(const RecordLayout& serving, const RecordLayout& training,
                            const uint8_t* in, int64_t count, uint8_t* out, int threads) {
  TROVE_RETURN_IF_ERROR(check_train_layouts(serving, training));
  parallel_for(count, threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* src = in + static_cast<size_t>(i) * serving.stride;
      uint8_t* dst = out + static_cast<size_t>(i) * training.stride;
      std::memcpy(dst, src, serving.down_codes_offset);  // the scales
      std::memset(dst + training.record_bytes, 0, training.stride - training.record_bytes);
      for_each_group(serving, training, [&](size_t s, size_t t) {
        for (int j = 0; j < kHalfGroup; ++j) {
          const uint8_t byte = src[s + j];
          dst[t + j] = static_cast<uint8_t>(((byte & 0x0f) - 8) * 16);
          dst[t + kHalfGroup + j] = static_cast<uint8_t>(((byte >> 4) - 8) * 16);
        }
      });
    }
  });
  return Status::ok_status();
}

Status train_export_records(const RecordLayout& serving, const RecordLayout& training,
                            const uint8_t* in, int64_t count, uint8_t* out, int threads) {
  TROVE_RETURN_IF_ERROR(check_train_layouts(serving, training));
  parallel_for(count, threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* src = in + static_cast<size_t>(i) * training.stride;
      uint8_t* dst = out + static_cast<size_t>(i) * serving.stride;
      std::memcpy(dst, src, training.down_codes_offset);
      std::memset(dst + serving.record_bytes, 0, serving.stride - serving.record_bytes);
      for_each_group(serving, training, [&](size_t s, size_t t) {
        for (int j = 0; j < kHalfGroup; ++j) {
          const int lo = train_code_to_int4(static_cast<int8_t>(src[t + j])) + 8;
          const int hi = train_code_to_int4(static_cast<int8_t>(src[t + kHalfGroup + j])) + 8;
          dst[s + j] = static_cast<uint8_t>(lo | (hi << 4));
        }
      });
    }
  });
  return Status::ok_status();
}

Result<TrainStats> train_update_records(const RecordLayout& training, const TrainStep& step,
                                        const int64_t* experts, int64_t count,
                                        const float* down_grad, const float* up_grad,
                                        uint8_t* records, float* accum, int threads) {
  TROVE_RETURN_IF_ERROR(check_train_layout(training));
  TROVE_RETURN_IF_ERROR(check_train_step(step));
  if (count < 0) return Status::invalid_argument("record count must be >= 0");
  const bool adagrad = step.optimizer == TrainOptimizer::kAdagrad;
  if (adagrad && accum == nullptr && count > 0) {
    return Status::invalid_argument("Adagrad needs the row accumulators (got none)");
  }
  const int64_t m = training.width;
  const int64_t down_n = m * training.dim;
  const int64_t up_n = m * training.dim_out;
  auto acc_of = [&](int64_t i) { return adagrad ? accum + i * 2 * m : nullptr; };
  auto rec_of = [&](int64_t i) { return records + static_cast<size_t>(i) * training.stride; };

  TROVE_RETURN_IF_ERROR(parallel_records(count, threads, [&](int64_t i) {
    return check_train_record(training, step, experts[i], down_grad + i * down_n,
                              up_grad + i * up_n, rec_of(i), acc_of(i));
  }));

  const RowKind kinds[2] = {
      {training.dim, quant_groups(training.dim), training.down_scales_offset,
       training.down_codes_offset, training.down_row_code_bytes, "down"},
      {training.dim_out, quant_groups(training.dim_out), training.up_scales_offset,
       training.up_codes_offset, training.up_row_code_bytes, "up"}};
  const TrainKernels& kern = kernels();
  std::vector<TrainStats> stats(static_cast<size_t>(count));
  Status status = parallel_records(count, threads, [&](int64_t i) -> Status {
    uint8_t* rec = rec_of(i);
    float* acc = acc_of(i);
    // Restored if a scale would overflow: the record and its accumulators stay as they were.
    thread_local std::vector<uint8_t> backup;
    backup.assign(rec, rec + training.record_bytes);
    thread_local std::vector<float> acc_backup;
    if (acc != nullptr) acc_backup.assign(acc, acc + 2 * m);
    const uint64_t prefix =
        sr_prefix(step.seed, step.step, step.table, static_cast<uint64_t>(experts[i]));
    TrainStats s;
    Status st;
    for (int64_t r = 0; r < 2 * m && st.ok(); ++r) {
      const bool down = r < m;
      const int64_t row = down ? r : r - m;
      const RowKind& kind = kinds[down ? 0 : 1];
      const float* g = down ? down_grad + i * down_n + row * training.dim
                            : up_grad + i * up_n + row * training.dim_out;
      const auto base =
          static_cast<uint64_t>(down ? row * training.dim : down_n + row * training.dim_out);
      st = update_row(kern, step, experts[i], prefix, kind, row, g, base, rec,
                      acc != nullptr ? acc + r : nullptr, &s);
    }
    if (!st.ok()) {
      std::memcpy(rec, backup.data(), backup.size());
      if (acc != nullptr) std::memcpy(acc, acc_backup.data(), acc_backup.size() * sizeof(float));
      return st;
    }
    stats[static_cast<size_t>(i)] = s;
    return Status::ok_status();
  });
  if (!status.ok()) return status;
  TrainStats total;
  for (const TrainStats& s : stats) total.merge(s);
  return total;
}

}  // namespace trove
