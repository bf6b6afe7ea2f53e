// The oracle of kernels/train.h. Deliberately plain: the full five-input hash per element, one
// group at a time, every step in the order the header writes it down.
#include "kernels/cpu/ref/train_ref.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "base/half.h"
#include "base/strings.h"
#include "kernels/quant.h"

namespace trove {

namespace {

uint16_t load_scale(const uint8_t* p) {
  uint16_t h = 0;
  std::memcpy(&h, p, sizeof h);
  return h;
}
void store_scale(uint8_t* p, uint16_t h) {
  std::memcpy(p, &h, sizeof h);
}

// Rows of one record in update order: down rows, then up rows.
struct RowView {
  int64_t n;             // real elements
  const float* grad;     // [n]
  uint8_t* scales;       // quant_groups(n) fp16
  int8_t* codes;         // 32 · quant_groups(n)
  int64_t element_base;  // record element index of element 0
  const char* kind;
  int64_t index;  // row within its kind
};

RowView row_view(const RecordLayout& l, const float* down_grad, const float* up_grad,
                 uint8_t* record, int64_t r) {
  const int64_t m = l.width;
  if (r < m) {
    return {l.dim,
            down_grad + r * l.dim,
            record + l.down_scales_offset + 2 * static_cast<size_t>(r * quant_groups(l.dim)),
            reinterpret_cast<int8_t*>(record + l.down_codes_offset +
                                      static_cast<size_t>(r) * l.down_row_code_bytes),
            r * l.dim,
            "down",
            r};
  }
  const int64_t u = r - m;
  return {l.dim_out,
          up_grad + u * l.dim_out,
          record + l.up_scales_offset + 2 * static_cast<size_t>(u * quant_groups(l.dim_out)),
          reinterpret_cast<int8_t*>(record + l.up_codes_offset +
                                    static_cast<size_t>(u) * l.up_row_code_bytes),
          m * l.dim + u * l.dim_out,
          "up",
          u};
}

// Adagrad's step size for one row; updates its accumulator G.
float adagrad_step_size(const float* g, int64_t n, float lr, float eps, float* accum) {
  double lane[kQuantGroup] = {};
  for (int64_t i = 0; i < n; ++i) {
    lane[i % kQuantGroup] += static_cast<double>(g[i]) * static_cast<double>(g[i]);
  }
  for (int o = kQuantGroup / 2; o >= 1; o /= 2) {
    for (int l = 0; l < o; ++l) lane[l] += lane[l + o];
  }
  const float mean = static_cast<float>(lane[0] / static_cast<double>(n));
  *accum = *accum + mean;
  return lr / (std::sqrt(*accum) + eps);
}

// floor(x / 2) + [u < frac(x / 2)] for an integer x.
int sr_half(int x, float u) {
  const int fl = x >> 1;  // floor
  const bool odd = (x & 1) != 0;
  return fl + ((odd && u < 0.5f) ? 1 : 0);
}

Status update_group(const TrainStep& st, int64_t expert, const RowView& row, int64_t group,
                    const float* delta, TrainStats* stats) {
  const int64_t first = group * kQuantGroup;
  const int real = static_cast<int>(std::min<int64_t>(kQuantGroup, row.n - first));
  int8_t* b = row.codes + first;
  uint8_t* scale_ptr = row.scales + 2 * group;
  float d = fp16_to_fp32(load_scale(scale_ptr));
  int8_t before[kQuantGroup];
  std::memcpy(before, b, static_cast<size_t>(real));

  if (d == 0.0f) {
    float max_abs = 0.0f;
    for (int j = 0; j < real; ++j) max_abs = std::max(max_abs, std::fabs(delta[j]));
    if (max_abs == 0.0f) return Status::ok_status();  // nothing to represent
    if (!(max_abs / 7.0f <= kFp16Max)) {
      return Status::out_of_range(
          str_printf("expert %lld: %s row %lld group %lld: an update of %g does not fit an fp16 "
                     "scale (lower the learning rate)",
                     static_cast<long long>(expert), row.kind, static_cast<long long>(row.index),
                     static_cast<long long>(group), static_cast<double>(max_abs)));
    }
    uint16_t h = fp32_to_fp16(max_abs / 7.0f);
    if (h == 0) h = 1;  // smallest subnormal, 2^-24
    store_scale(scale_ptr, h);
    d = fp16_to_fp32(h);
    for (int j = 0; j < real; ++j) b[j] = 0;
    ++stats->scale_inits;
  }

  for (uint64_t round = 1;; ++round) {
    int64_t c[kQuantGroup];
    double overshoot = 0.0;  // max over the group of the distance outside [-128, 127]
    for (int j = 0; j < real; ++j) {
      const float v = (16.0f * delta[j]) / d;
      const float k = std::floor(v);
      const float u = sr_uniform(st.seed, st.step, st.table, static_cast<uint64_t>(expert),
                                 static_cast<uint64_t>(row.element_base + first + j));
      const bool up = u < v - k;
      // k may be huge or infinite: beyond |k| = 256 the overshoot counts as infinite.
      const double cand = static_cast<double>(b[j]) + static_cast<double>(k) + (up ? 1.0 : 0.0);
      if (!(std::fabs(k) <= 256.0f)) {
        overshoot = INFINITY;
        c[j] = 0;
      } else {
        overshoot = std::max({overshoot, cand - 127.0, -128.0 - cand});
        c[j] = static_cast<int64_t>(std::clamp(cand, -128.0, 127.0));
      }
    }
    if (overshoot <= static_cast<double>(st.saturation_tolerance)) {
      for (int j = 0; j < real; ++j) b[j] = static_cast<int8_t>(c[j]);
      if (overshoot > 0.0) ++stats->clamps;
      break;
    }
    if (!(std::fabs(2.0f * d) <= kFp16Max)) {
      return Status::out_of_range(str_printf(
          "expert %lld: %s row %lld group %lld saturates with its scale at %g, and doubling it "
          "would overflow fp16 (the update is too large: lower the learning rate)",
          static_cast<long long>(expert), row.kind, static_cast<long long>(row.index),
          static_cast<long long>(group), static_cast<double>(d)));
    }
    d = 2.0f * d;
    store_scale(scale_ptr, fp32_to_fp16(d));
    for (int j = 0; j < real; ++j) {
      const uint64_t e = static_cast<uint64_t>(row.element_base + first + j);
      const float u = sr_uniform(st.seed, st.step, st.table, static_cast<uint64_t>(expert),
                                 sr_rescale_element(e, round));
      b[j] = static_cast<int8_t>(sr_half(b[j], u));
    }
    ++stats->rescales;
  }
  for (int j = 0; j < real; ++j) stats->elements_changed += (b[j] != before[j]) ? 1 : 0;
  return Status::ok_status();
}

// The update with inputs already checked. On error `record` and `accum` may be half-written:
// callers pass copies.
Result<TrainStats> update_checked(const RecordLayout& l, const TrainStep& st, int64_t expert,
                                  const float* down_grad, const float* up_grad, uint8_t* record,
                                  float* accum) {
  TrainStats stats;
  for (int64_t r = 0; r < 2 * l.width; ++r) {
    const RowView row = row_view(l, down_grad, up_grad, record, r);
    const float a = st.optimizer == TrainOptimizer::kAdagrad
                        ? adagrad_step_size(row.grad, row.n, st.lr, st.eps, &accum[r])
                        : st.lr;
    std::vector<float> delta(static_cast<size_t>(row.n));
    for (int64_t i = 0; i < row.n; ++i) delta[static_cast<size_t>(i)] = -(a * row.grad[i]);
    for (int64_t g = 0; g < quant_groups(row.n); ++g) {
      TROVE_RETURN_IF_ERROR(
          update_group(st, expert, row, g, delta.data() + g * kQuantGroup, &stats));
    }
  }
  return stats;
}

Result<TrainStats> update_into_copy(const RecordLayout& l, const TrainStep& st, int64_t expert,
                                    const float* down_grad, const float* up_grad, uint8_t* record,
                                    float* accum) {
  std::vector<uint8_t> work(record, record + l.stride);
  std::vector<float> acc;
  if (st.optimizer == TrainOptimizer::kAdagrad) acc.assign(accum, accum + 2 * l.width);
  auto stats = update_checked(l, st, expert, down_grad, up_grad, work.data(), acc.data());
  if (!stats.ok()) return stats;
  std::memcpy(record, work.data(), l.stride);
  if (!acc.empty()) std::memcpy(accum, acc.data(), acc.size() * sizeof(float));
  return stats;
}

// Maps each 32-element group of every row: fn(in_group, out_group, real elements).
template <typename Fn>
void for_each_group(const RecordLayout& serving, const RecordLayout& training, Fn fn) {
  for (int64_t r = 0; r < 2 * serving.width; ++r) {
    const bool down = r < serving.width;
    const int64_t row = down ? r : r - serving.width;
    const int64_t n = down ? serving.dim : serving.dim_out;
    const size_t s_codes =
        (down ? serving.down_codes_offset : serving.up_codes_offset) +
        static_cast<size_t>(row) * (down ? serving.down_row_code_bytes : serving.up_row_code_bytes);
    const size_t t_codes = (down ? training.down_codes_offset : training.up_codes_offset) +
                           static_cast<size_t>(row) *
                               (down ? training.down_row_code_bytes : training.up_row_code_bytes);
    for (int64_t g = 0; g < quant_groups(n); ++g) {
      fn(s_codes + static_cast<size_t>(g) * (kQuantGroup / 2),
         t_codes + static_cast<size_t>(g) * kQuantGroup);
    }
  }
}

}  // namespace

Status train_import_record_ref(const RecordLayout& serving, const RecordLayout& training,
                               const uint8_t* in, uint8_t* out) {
  TROVE_RETURN_IF_ERROR(check_train_layouts(serving, training));
  std::memset(out, 0, training.stride);
  // The scales sit first and have the same count and order in both layouts.
  std::memcpy(out, in, serving.down_codes_offset);
  for_each_group(serving, training, [&](size_t s, size_t t) {
    for (int j = 0; j < kQuantGroup; ++j) {
      const uint8_t byte = in[s + static_cast<size_t>(j % (kQuantGroup / 2))];
      const int stored = j < kQuantGroup / 2 ? (byte & 0x0f) : (byte >> 4);
      out[t + static_cast<size_t>(j)] = static_cast<uint8_t>(int4_to_train_code(stored - 8));
    }
  });
  return Status::ok_status();
}

Status train_export_record_ref(const RecordLayout& serving, const RecordLayout& training,
                               const uint8_t* in, uint8_t* out) {
  TROVE_RETURN_IF_ERROR(check_train_layouts(serving, training));
  std::memset(out, 0, serving.stride);
  std::memcpy(out, in, training.down_codes_offset);
  for_each_group(serving, training, [&](size_t s, size_t t) {
    for (int j = 0; j < kQuantGroup; ++j) {
      const int q = train_code_to_int4(static_cast<int8_t>(in[t + static_cast<size_t>(j)]));
      const auto stored = static_cast<uint8_t>(q + 8);
      uint8_t& byte = out[s + static_cast<size_t>(j % (kQuantGroup / 2))];
      byte = static_cast<uint8_t>(j < kQuantGroup / 2 ? (byte & 0xf0) | stored
                                                      : (byte & 0x0f) | (stored << 4));
    }
  });
  return Status::ok_status();
}

Result<TrainStats> train_update_record_ref(const RecordLayout& training, const TrainStep& step,
                                           int64_t expert, const float* down_grad,
                                           const float* up_grad, uint8_t* record, float* accum) {
  TROVE_RETURN_IF_ERROR(check_train_layout(training));
  TROVE_RETURN_IF_ERROR(check_train_step(step));
  TROVE_RETURN_IF_ERROR(
      check_train_record(training, step, expert, down_grad, up_grad, record, accum));
  return update_into_copy(training, step, expert, down_grad, up_grad, record, accum);
}

Result<TrainStats> train_update_records_ref(const RecordLayout& training, const TrainStep& step,
                                            const int64_t* experts, int64_t count,
                                            const float* down_grad, const float* up_grad,
                                            uint8_t* records, float* accum) {
  TROVE_RETURN_IF_ERROR(check_train_layout(training));
  TROVE_RETURN_IF_ERROR(check_train_step(step));
  if (count < 0) return Status::invalid_argument("record count must be >= 0");
  const int64_t m = training.width;
  const bool adagrad = step.optimizer == TrainOptimizer::kAdagrad;
  auto at = [&](int64_t i) {
    return std::tuple{down_grad + i * m * training.dim, up_grad + i * m * training.dim_out,
                      records + static_cast<size_t>(i) * training.stride,
                      adagrad ? accum + i * 2 * m : nullptr};
  };
  if (adagrad && accum == nullptr && count > 0) {
    return Status::invalid_argument("Adagrad needs the row accumulators (got none)");
  }
  for (int64_t i = 0; i < count; ++i) {
    auto [dg, ug, rec, acc] = at(i);
    TROVE_RETURN_IF_ERROR(check_train_record(training, step, experts[i], dg, ug, rec, acc));
  }
  TrainStats total;
  Status first_error;
  for (int64_t i = 0; i < count; ++i) {
    auto [dg, ug, rec, acc] = at(i);
    auto stats = update_into_copy(training, step, experts[i], dg, ug, rec, acc);
    if (stats.ok()) {
      total.merge(*stats);
    } else if (first_error.ok()) {
      first_error = stats.status();
    }
  }
  if (!first_error.ok()) return first_error;
  return total;
}

}  // namespace trove
