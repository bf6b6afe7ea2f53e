// train_compare: one distillation task, four ways of training the student's expert tables, in
// one run (issue 6). A reader reruns it with the printed command and gets the same table.
//
// Task. The teacher is a PEER layer (SPEC §2) with random fp32 expert tables and a random
// router. The student has the teacher's router, frozen, so both route every token to the same
// experts, and only the expert tables train: a regression per expert, whose loss floor is 0 in
// fp32 and the int4 grid's distance from the teacher in int4. The student's tables start from
// independent random values packed to int4 (Q4_0 rule); all four methods start from those
// values (fp32 from their dequantization), see the same inputs (gaussian, fresh every step from
// one seeded generator), the same loss (mean squared error; dy = 2(y - y_t) / (T * D_out)) and
// the same optimizer step Δ (row-wise Adagrad, as kernels/train.h step 1):
//
//   fp32   tables in fp32 records; w <- w + Δ.
//   ours   the int4 training view: int8 code b at scale d/16, train_update_records
//          (kernels/cpu/train.h), exported to int4 records (train_export_records) for the
//          forward. What is trained is what is served. SPEC §7's rule: a group that saturates
//          doubles its scale.
//   ours T=64 the same kernel with TrainStep::saturation_tolerance = --tolerance (64): a group
//          that overshoots the code range by at most that many codes is clamped instead.
//   sr4    stochastic rounding straight into the int4 codes: q <- clamp(floor(q + Δ/d + u),
//          -8, 7), u from the same counter-based hash as ours (kernels/train.h sr_uniform).
//   rtn4   round to nearest straight into the int4 codes: q <- clamp(round(q + Δ/d), -8, 7).
//
// Scales of sr4 and rtn4 stay at their initial value (there is no accumulator to rescale; a
// group whose scale is 0 cannot move and is left as it is, which never happens with gaussian
// starts). Reported: the relative error ||y_s - y_t||_F / ||y_t||_F on a fixed held-out batch,
// every --eval-every steps (the curve, in --json) and at the end, plus two references that
// do not train: the teacher's own tables packed to int4 (what the int4 grid alone costs), and
// the trained fp32 student packed to int4 after training (post-training quantization).
//
//   train_compare [--steps 2000] [--batch 128] [--lr 0.01] [--experts 4096] [--dim 128]
//                 [--heads 4] [--topk 8] [--dim-key 32] [--seed 1] [--eval-every 100]
//                 [--eval-tokens 1024] [--optimizer adagrad|sgd] [--threads 0] [--json PATH]
//                 [--init-noise 0.5] [--headroom 1] [--tolerance 64] [--accum-init 0]
//                 [--ablate all|NAME,...]
//
// --ablate adds variants of ours simulated in this file, each changing one ingredient (the
// kVariants table below: exact accumulator, fine-code forward, round-to-nearest, fp32 STE QAT,
// clamp / grow / shrink on saturation); --accum-init starts every method's Adagrad row
// accumulators at that value.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/half.h"
#include "base/status.h"
#include "base/strings.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/train.h"
#include "kernels/peer.h"
#include "kernels/peer_config.h"
#include "kernels/record.h"
#include "kernels/train.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/tiers/expert_source.h"

namespace trove {
namespace {

struct Options {
  int64_t steps = 1000;
  int64_t batch = 128;
  float lr = 0.01f;
  int64_t experts = 4096;
  int64_t dim = 128;
  int64_t heads = 4;
  int64_t topk = 8;
  int64_t dim_key = 32;
  uint64_t seed = 1;
  int64_t eval_every = 50;
  int64_t eval_tokens = 1024;
  // Student start = teacher + init_noise * N(0, w_std^2); < 0: independent random tables.
  float init_noise = 0.5f;
  float headroom = 1.0f;    // int4 start scales = headroom * the Q4_0 scale
  int tolerance = 64;       // the second "ours": TrainStep::saturation_tolerance
  float accum_init = 0.0f;  // every method's Adagrad row accumulators start here
  std::string ablate;       // comma list of ablation variants (kVariants), or "all"
  TrainOptimizer optimizer = TrainOptimizer::kAdagrad;
  int threads = 0;
  std::string json;
};

// A portable gaussian stream (splitmix64 + Box-Muller), so a rerun on any platform and standard
// library sees the same numbers.
class Gaussian {
 public:
  explicit Gaussian(uint64_t seed) : state_(seed) {}
  float next() {
    if (have_spare_) {
      have_spare_ = false;
      return spare_;
    }
    const double u1 = (static_cast<double>(bits() >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
    const double u2 = static_cast<double>(bits() >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = static_cast<float>(r * std::sin(2.0 * M_PI * u2));
    have_spare_ = true;
    return static_cast<float>(r * std::cos(2.0 * M_PI * u2));
  }
  std::vector<float> vec(size_t n, float stddev) {
    std::vector<float> v(n);
    for (float& x : v) x = stddev * next();
    return v;
  }

 private:
  uint64_t bits() { return sr_mix(state_ += 0x9e3779b97f4a7c15ull); }
  uint64_t state_;
  float spare_ = 0;
  bool have_spare_ = false;
};

// Hands out pointers into a record buffer the caller owns and updates between batches
// (MemoryExpertSource owns its bytes and exposes them read-only).
class BorrowedExpertSource final : public ExpertSource {
 public:
  BorrowedExpertSource(const RecordLayout& layout, const std::vector<uint8_t>* records)
      : layout_(layout), records_(records) {}
  const RecordLayout& layout() const override { return layout_; }
  int64_t num_experts() const override {
    return static_cast<int64_t>(records_->size() / layout_.stride);
  }
  std::string describe() const override { return "train_compare records"; }
  Status acquire(std::span<const int64_t> ids, std::span<const uint8_t*> records) override {
    for (size_t i = 0; i < ids.size(); ++i) {
      records[i] = records_->data() + static_cast<size_t>(ids[i]) * layout_.stride;
    }
    return Status::ok_status();
  }
  void release(std::span<const int64_t>) override {}

 private:
  RecordLayout layout_;
  const std::vector<uint8_t>* records_;
};

// The optimizer step of one row, shared by fp32, sr4 and rtn4 (ours computes the same inside
// train_update_records): SGD a = lr; Adagrad G += mean(g^2), a = lr / (sqrt(G) + eps).
// delta[i] = -(a * g[i]).
void row_step(const TrainStep& step, const float* g, int64_t n, float* accum, float* delta) {
  float a = step.lr;
  if (step.optimizer == TrainOptimizer::kAdagrad) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(g[i]) * g[i];
    *accum += static_cast<float>(s / static_cast<double>(n));
    a = step.lr / (std::sqrt(*accum) + step.eps);
  }
  for (int64_t i = 0; i < n; ++i) delta[i] = -(a * g[i]);
}

enum class Rounding { kStochastic, kNearest };

// Adds delta to one int4 row in place (codes at `codes`, fp16 scales at `scales`), rounding
// each code as `rounding` says; `element0` is the row's first record element index (the hash
// counter, as in kernels/train.h).
void int4_row_add(const float* delta, int64_t n, uint8_t* scales, uint8_t* codes, Rounding rounding,
                  uint64_t prefix, uint64_t element0) {
  for (int64_t g0 = 0; g0 < n; g0 += 32) {
    uint16_t h;
    std::memcpy(&h, scales + (g0 / 32) * 2, 2);
    const float d = fp16_to_fp32(h);
    if (d == 0.0f) continue;
    uint8_t* block = codes + (g0 / 32) * 16;
    for (int64_t j = 0; j < 32 && g0 + j < n; ++j) {
      uint8_t& byte = block[j % 16];
      const int shift = j < 16 ? 0 : 4;
      const int q = ((byte >> shift) & 0xf) - 8;
      const float v = static_cast<float>(q) + delta[g0 + j] / d;
      float r;
      if (rounding == Rounding::kNearest) {
        r = std::nearbyint(v);
      } else {
        const float u = sr_uniform_from_prefix(prefix, element0 + static_cast<uint64_t>(g0 + j));
        r = std::floor(v + u);
      }
      const int nq = static_cast<int>(std::clamp(r, -8.0f, 7.0f));
      byte = static_cast<uint8_t>((byte & ~(0xf << shift)) | ((nq + 8) << shift));
    }
  }
}

// Re-quantizes one int4 row of x at scales widened by `headroom` (the Q4_0 rule puts the
// group's largest element on the edge of the code range, so the first outward step of it
// saturates the training view and doubles the scale; a wider start scale leaves room).
void regrid_int4_row(const float* x, int64_t n, float headroom, uint8_t* scales, uint8_t* codes) {
  for (int64_t g0 = 0; g0 < n; g0 += 32) {
    uint16_t h;
    std::memcpy(&h, scales + (g0 / 32) * 2, 2);
    h = fp32_to_fp16(fp16_to_fp32(h) * headroom);
    std::memcpy(scales + (g0 / 32) * 2, &h, 2);
    const float d = fp16_to_fp32(h);
    uint8_t* block = codes + (g0 / 32) * 16;
    for (int64_t j = 0; j < 32 && g0 + j < n; ++j) {
      const int q =
          d == 0.0f ? 0 : static_cast<int>(std::clamp(std::nearbyint(x[g0 + j] / d), -8.0f, 7.0f));
      const int shift = j < 16 ? 0 : 4;
      block[j % 16] = static_cast<uint8_t>((block[j % 16] & ~(0xf << shift)) | ((q + 8) << shift));
    }
  }
}

// ---- ablations (--ablate) ----------------------------------------------------------------------
//
// Variants of ours simulated in this file (not the kernel) so that one ingredient changes at a
// time. State per element: a value f in units of the training LSB (d/16) - an integer for the
// 8-bit code views, any float for the exact view - and per group the scale d (kept an fp16
// value). The step Δ is the kernel's (row-wise Adagrad with its 32-lane sum); the hash counters
// are the kernel's, so "sim-ours" retraces ours up to the forward's float rounding (it serves f32
// records holding the int4 values q·d). The student's forward reads the weights the variant says.
enum class SimView : uint8_t { kSr8, kRtn8, kExact, kQatFp32 };
enum class SimFwd : uint8_t { kInt4, kFine };
// kShrink: kDouble, and after the update, while every b of the group is in [-64, 63],
// d <- d/2 and b <- 2b (exact: no rounding).
// kClampTol: clamp when no element overshoots the code range by more than `grow` codes (16: one
// int4 LSB), else kDouble.
enum class SimSat : uint8_t { kDouble, kClamp, kGrow, kShrink, kClampTol };

struct Variant {
  const char* name;
  SimView view;
  SimFwd fwd;
  SimSat sat;
  float grow;  // kGrow: the scale grows by max(grow, what the update needs), rounded up in fp16;
               // kClampTol: the overshoot (codes) that still clamps
  const char* what;
};

constexpr Variant kVariants[] = {
    {"sim-ours", SimView::kSr8, SimFwd::kInt4, SimSat::kDouble, 2, "ours re-implemented here"},
    {"a-exact-view", SimView::kExact, SimFwd::kInt4, SimSat::kDouble, 2,
     "fp32 accumulator (no SR), int4 forward, d<-2d"},
    {"b-fine-fwd", SimView::kSr8, SimFwd::kFine, SimSat::kDouble, 2,
     "8-bit SR code, forward reads b*d/16"},
    {"ab-exact-fine", SimView::kExact, SimFwd::kFine, SimSat::kDouble, 2,
     "fp32 accumulator, forward reads it, d<-2d"},
    {"c-rtn-view", SimView::kRtn8, SimFwd::kInt4, SimSat::kDouble, 2,
     "8-bit code, round to nearest, int4 forward"},
    {"d-qat-fp32", SimView::kQatFp32, SimFwd::kInt4, SimSat::kDouble, 2,
     "fp32 weights, forward = Q4_0 repack each step (STE)"},
    {"f-exact-clamp", SimView::kExact, SimFwd::kInt4, SimSat::kClamp, 2,
     "fp32 accumulator, scales fixed, clamp"},
    {"f-clamp", SimView::kSr8, SimFwd::kInt4, SimSat::kClamp, 2,
     "ours, saturation clamps b (scales fixed)"},
    {"f-grow1.25", SimView::kSr8, SimFwd::kInt4, SimSat::kGrow, 1.25f,
     "ours, d<-d*max(1.25,need), b<-SR(b*d/d')"},
    {"f-grow1.0625", SimView::kSr8, SimFwd::kInt4, SimSat::kGrow, 1.0625f,
     "ours, d<-d*max(1.0625,need), b<-SR(b*d/d')"},
    {"f-clamp-tol16", SimView::kSr8, SimFwd::kInt4, SimSat::kClampTol, 16,
     "ours, clamp overshoots <= 16 codes, else d<-2d"},
    {"f-clamp-tol64", SimView::kSr8, SimFwd::kInt4, SimSat::kClampTol, 64,
     "ours, clamp overshoots <= 64 codes, else d<-2d"},
    {"f-shrink", SimView::kSr8, SimFwd::kInt4, SimSat::kShrink, 2,
     "ours, plus exact d<-d/2, b<-2b while all b in [-64,63]"},
    {"f-exact-shrink", SimView::kExact, SimFwd::kInt4, SimSat::kShrink, 2,
     "fp32 accumulator, d<-2d, exact shrink"},
};

// Adagrad's step size exactly as kernels/train.h step 1 (32 double lanes, warp fold).
float adagrad_lanes(const float* g, int64_t n, float lr, float eps, float* accum) {
  double lane[32] = {};
  for (int64_t i = 0; i < n; ++i) lane[i % 32] += static_cast<double>(g[i]) * g[i];
  for (int o = 16; o >= 1; o /= 2) {
    for (int l = 0; l < o; ++l) lane[l] += lane[l + o];
  }
  *accum = *accum + static_cast<float>(lane[0] / static_cast<double>(n));
  return lr / (std::sqrt(*accum) + eps);
}

// One row of a simulated variant: f [n] (LSB units), d [groups], out [n] the forward's weights.
void sim_row(const Variant& v, const float* delta, int64_t n, float* f, float* d, float* out,
             uint64_t prefix, uint64_t element0) {
  if (v.view == SimView::kQatFp32) {
    for (int64_t i = 0; i < n; ++i) f[i] += delta[i];
    return;  // the forward is the Q4_0 repack of f, done per record by the caller
  }
  auto round_to = [&](float x, uint64_t counter) {
    switch (v.view) {
      case SimView::kSr8: {
        const float k = std::floor(x);
        return k + (sr_uniform_from_prefix(prefix, counter) < x - k ? 1.0f : 0.0f);
      }
      case SimView::kRtn8:
        return std::nearbyint(x);
      default:
        return x;
    }
  };
  for (int64_t g0 = 0; g0 < n; g0 += 32) {
    const int real = static_cast<int>(std::min<int64_t>(32, n - g0));
    float& dg = d[g0 / 32];
    float* fg = f + g0;
    if (dg == 0.0f) continue;  // never with gaussian starts
    float c[32];
    for (uint64_t round = 1;; ++round) {
      bool fits = true;
      float need = 1.0f, over = 0.0f;
      for (int j = 0; j < real; ++j) {
        const uint64_t e = element0 + static_cast<uint64_t>(g0 + j);
        const float x = (16.0f * delta[g0 + j]) / dg;
        // SR of the increment alone (the kernel's ⌊b + v + u⌋ with b an integer).
        c[j] = v.view == SimView::kExact
                   ? fg[j] + x
                   : (v.view == SimView::kSr8 ? fg[j] + round_to(x, e) : std::nearbyint(fg[j] + x));
        if (c[j] > 127.0f || c[j] < -128.0f) {
          fits = false;
          need = std::max(need, c[j] > 0 ? c[j] / 127.0f : c[j] / -128.0f);
          over = std::max(over, c[j] > 0 ? c[j] - 127.0f : -128.0f - c[j]);
        }
      }
      if (fits || v.sat == SimSat::kClamp || (v.sat == SimSat::kClampTol && over <= v.grow)) {
        for (int j = 0; j < real; ++j) fg[j] = std::clamp(c[j], -128.0f, 127.0f);
        while (v.sat == SimSat::kShrink &&
               std::all_of(fg, fg + real, [](float b) { return b >= -64.0f && b <= 63.0f; }) &&
               std::fabs(dg) >= 0x1.0p-13f) {
          dg = 0.5f * dg;
          for (int j = 0; j < real; ++j) fg[j] = 2.0f * fg[j];
        }
        break;
      }
      float nd = 2.0f * dg;
      if (v.sat == SimSat::kGrow) {  // the next fp16 at or above |d| * max(grow, need)
        const float want = dg * std::max(v.grow, need);
        uint16_t h = fp32_to_fp16(want);
        while (std::fabs(fp16_to_fp32(h)) < std::fabs(want)) ++h;  // sign-magnitude: ++|h|
        nd = fp16_to_fp32(h);
      }
      for (int j = 0; j < real; ++j) {
        const uint64_t e = element0 + static_cast<uint64_t>(g0 + j);
        const float x = fg[j] * (dg / nd);
        fg[j] = round_to(x, sr_rescale_element(e, round));
      }
      dg = nd;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const float dg = d[i / 32];
    if (v.fwd == SimFwd::kFine) {
      out[i] = f[i] * dg / 16.0f;
    } else {
      const float q = std::clamp(std::floor((f[i] + 8.0f) / 16.0f), -8.0f, 7.0f);
      out[i] = q * dg;
    }
  }
}

struct Method {
  std::string name;
  RecordLayout serving;                // what the student's forward reads
  std::vector<uint8_t> records;        // serving records, N * serving.stride
  RecordLayout training;               // ours only: the int8 training view
  std::vector<uint8_t> train_records;  // ours only
  int tolerance = 0;                   // ours only: TrainStep::saturation_tolerance
  std::vector<float> accum;            // [N][2] row-wise Adagrad accumulators
  const Variant* variant = nullptr;    // --ablate variants: serving is f32, state below
  std::vector<float> sim_f;            // [N][D + D_out] values (LSB units; QAT: weights)
  std::vector<float> sim_d;            // [N][groups of down + groups of up] scales
  std::unique_ptr<PeerLayer> layer;
  std::vector<std::pair<int64_t, double>> curve;
  TrainStats stats;
  double seconds = 0;
};

double rel_error(std::span<const float> y, std::span<const float> yt) {
  double num = 0, den = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double e = static_cast<double>(y[i]) - yt[i];
    num += e * e;
    den += static_cast<double>(yt[i]) * yt[i];
  }
  return std::sqrt(num / den);
}

// Updates the U experts of `grads` in `m` with the step `step`.
Status update(Method& m, const TrainStep& step, const PeerGrads& grads, int threads) {
  const int64_t u_count = static_cast<int64_t>(grads.expert_ids.size());
  const int64_t dim = m.serving.dim, dim_out = m.serving.dim_out;
  if (!m.train_records.empty()) {  // ours, with its saturation tolerance
    TrainStep ours_step = step;
    ours_step.saturation_tolerance = m.tolerance;
    const size_t ts = m.training.stride, ss = m.serving.stride;
    std::vector<uint8_t> gathered(static_cast<size_t>(u_count) * ts);
    std::vector<float> accum(static_cast<size_t>(u_count) * 2);
    for (int64_t r = 0; r < u_count; ++r) {
      const auto e = static_cast<size_t>(grads.expert_ids[static_cast<size_t>(r)]);
      std::memcpy(gathered.data() + static_cast<size_t>(r) * ts, m.train_records.data() + e * ts,
                  ts);
      accum[2 * static_cast<size_t>(r)] = m.accum[2 * e];
      accum[2 * static_cast<size_t>(r) + 1] = m.accum[2 * e + 1];
    }
    TROVE_ASSIGN_OR_RETURN(
        TrainStats st,
        train_update_records(m.training, ours_step, grads.expert_ids.data(), u_count,
                             grads.d_down.data(), grads.d_up.data(), gathered.data(),
                             step.optimizer == TrainOptimizer::kAdagrad ? accum.data() : nullptr,
                             threads));
    m.stats.merge(st);
    for (int64_t r = 0; r < u_count; ++r) {
      const auto e = static_cast<size_t>(grads.expert_ids[static_cast<size_t>(r)]);
      std::memcpy(m.train_records.data() + e * ts, gathered.data() + static_cast<size_t>(r) * ts,
                  ts);
      m.accum[2 * e] = accum[2 * static_cast<size_t>(r)];
      m.accum[2 * e + 1] = accum[2 * static_cast<size_t>(r) + 1];
      TROVE_RETURN_IF_ERROR(train_export_records(
          m.serving, m.training, m.train_records.data() + e * ts, 1, m.records.data() + e * ss, 1));
    }
    return Status::ok_status();
  }
  std::vector<float> delta(static_cast<size_t>(std::max(dim, dim_out)));
  if (m.variant != nullptr) {
    const int64_t gd = (dim + 31) / 32, gu = (dim_out + 31) / 32;
    for (int64_t r = 0; r < u_count; ++r) {
      const int64_t e = grads.expert_ids[static_cast<size_t>(r)];
      uint8_t* rec = m.records.data() + static_cast<size_t>(e) * m.serving.stride;
      auto* w_down = reinterpret_cast<float*>(rec + m.serving.down_codes_offset);
      auto* w_up = reinterpret_cast<float*>(rec + m.serving.up_codes_offset);
      float* f = m.sim_f.data() + e * (dim + dim_out);
      float* d = m.sim_d.data() + e * (gd + gu);
      float* acc = m.accum.data() + 2 * e;
      const uint64_t prefix = sr_prefix(step.seed, step.step, step.table, static_cast<uint64_t>(e));
      const float* gdn = grads.d_down.data() + r * dim;
      const float* gup = grads.d_up.data() + r * dim_out;
      float a = step.optimizer == TrainOptimizer::kAdagrad
                    ? adagrad_lanes(gdn, dim, step.lr, step.eps, acc)
                    : step.lr;
      for (int64_t i = 0; i < dim; ++i) delta[static_cast<size_t>(i)] = -(a * gdn[i]);
      sim_row(*m.variant, delta.data(), dim, f, d, w_down, prefix, 0);
      a = step.optimizer == TrainOptimizer::kAdagrad
              ? adagrad_lanes(gup, dim_out, step.lr, step.eps, acc + 1)
              : step.lr;
      for (int64_t i = 0; i < dim_out; ++i) delta[static_cast<size_t>(i)] = -(a * gup[i]);
      sim_row(*m.variant, delta.data(), dim_out, f + dim, d + gd, w_up, prefix,
              static_cast<uint64_t>(dim));
      if (m.variant->view == SimView::kQatFp32) {
        std::vector<uint8_t> packed(m.training.stride);  // training = the int4 layout here
        pack_records(m.training, f, f + dim, 1, packed.data(), 1);
        unpack_records(m.training, packed.data(), 1, w_down, w_up, 1);
      }
    }
    return Status::ok_status();
  }
  for (int64_t r = 0; r < u_count; ++r) {
    const int64_t e = grads.expert_ids[static_cast<size_t>(r)];
    uint8_t* rec = m.records.data() + static_cast<size_t>(e) * m.serving.stride;
    const float* gd = grads.d_down.data() + r * dim;
    const float* gu = grads.d_up.data() + r * dim_out;
    float* acc = m.accum.data() + 2 * e;
    if (m.serving.dtype == DType::kF32) {
      auto* w_down = reinterpret_cast<float*>(rec + m.serving.down_codes_offset);
      auto* w_up = reinterpret_cast<float*>(rec + m.serving.up_codes_offset);
      row_step(step, gd, dim, acc, delta.data());
      for (int64_t i = 0; i < dim; ++i) w_down[i] += delta[static_cast<size_t>(i)];
      row_step(step, gu, dim_out, acc + 1, delta.data());
      for (int64_t i = 0; i < dim_out; ++i) w_up[i] += delta[static_cast<size_t>(i)];
      continue;
    }
    const Rounding rounding = m.name == "sr4" ? Rounding::kStochastic : Rounding::kNearest;
    const uint64_t prefix = sr_prefix(step.seed, step.step, step.table, static_cast<uint64_t>(e));
    row_step(step, gd, dim, acc, delta.data());
    int4_row_add(delta.data(), dim, rec + m.serving.down_scales_offset,
                 rec + m.serving.down_codes_offset, rounding, prefix, 0);
    row_step(step, gu, dim_out, acc + 1, delta.data());
    int4_row_add(delta.data(), dim_out, rec + m.serving.up_scales_offset,
                 rec + m.serving.up_codes_offset, rounding, prefix, static_cast<uint64_t>(dim));
  }
  return Status::ok_status();
}

Result<int64_t> parse_int(const char* flag, const char* v, int64_t lo) {
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (*v == '\0' || *end != '\0' || x < lo) {
    return Status::invalid_argument(
        str_printf("%s wants an integer >= %lld (got '%s')", flag, static_cast<long long>(lo), v));
  }
  return static_cast<int64_t>(x);
}

Result<Options> parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      return Status::invalid_argument("help");
    }
    if (i + 1 >= argc) return Status::invalid_argument(a + " wants a value");
    const char* v = argv[++i];
    if (a == "--steps") {
      TROVE_ASSIGN_OR_RETURN(o.steps, parse_int("--steps", v, 0));
    } else if (a == "--batch") {
      TROVE_ASSIGN_OR_RETURN(o.batch, parse_int("--batch", v, 1));
    } else if (a == "--experts") {
      TROVE_ASSIGN_OR_RETURN(o.experts, parse_int("--experts", v, 1));
    } else if (a == "--dim") {
      TROVE_ASSIGN_OR_RETURN(o.dim, parse_int("--dim", v, 1));
    } else if (a == "--heads") {
      TROVE_ASSIGN_OR_RETURN(o.heads, parse_int("--heads", v, 1));
    } else if (a == "--topk") {
      TROVE_ASSIGN_OR_RETURN(o.topk, parse_int("--topk", v, 1));
    } else if (a == "--dim-key") {
      TROVE_ASSIGN_OR_RETURN(o.dim_key, parse_int("--dim-key", v, 1));
    } else if (a == "--eval-every") {
      TROVE_ASSIGN_OR_RETURN(o.eval_every, parse_int("--eval-every", v, 1));
    } else if (a == "--eval-tokens") {
      TROVE_ASSIGN_OR_RETURN(o.eval_tokens, parse_int("--eval-tokens", v, 1));
    } else if (a == "--threads") {
      TROVE_ASSIGN_OR_RETURN(const int64_t t, parse_int("--threads", v, 0));
      o.threads = static_cast<int>(t);
    } else if (a == "--seed") {
      TROVE_ASSIGN_OR_RETURN(const int64_t s, parse_int("--seed", v, 0));
      o.seed = static_cast<uint64_t>(s);
    } else if (a == "--lr") {
      char* end = nullptr;
      o.lr = std::strtof(v, &end);
      if (*end != '\0' || !(o.lr > 0) || !std::isfinite(o.lr)) {
        return Status::invalid_argument(str_printf("--lr wants a number > 0 (got '%s')", v));
      }
    } else if (a == "--tolerance") {
      TROVE_ASSIGN_OR_RETURN(const int64_t t, parse_int("--tolerance", v, 0));
      if (t > 128) return Status::invalid_argument("--tolerance wants 0..128 codes");
      o.tolerance = static_cast<int>(t);
    } else if (a == "--headroom") {
      char* end = nullptr;
      o.headroom = std::strtof(v, &end);
      if (*end != '\0' || !(o.headroom >= 1.0f) || !std::isfinite(o.headroom)) {
        return Status::invalid_argument(str_printf("--headroom wants a number >= 1 (got '%s')", v));
      }
    } else if (a == "--init-noise") {
      char* end = nullptr;
      o.init_noise = std::strtof(v, &end);
      if (*end != '\0' || !std::isfinite(o.init_noise)) {
        return Status::invalid_argument(str_printf("--init-noise wants a number (got '%s')", v));
      }
    } else if (a == "--optimizer") {
      if (std::string(v) == "adagrad") {
        o.optimizer = TrainOptimizer::kAdagrad;
      } else if (std::string(v) == "sgd") {
        o.optimizer = TrainOptimizer::kSgd;
      } else {
        return Status::invalid_argument(str_printf("--optimizer is adagrad or sgd (got '%s')", v));
      }
    } else if (a == "--accum-init") {
      char* end = nullptr;
      o.accum_init = std::strtof(v, &end);
      if (*end != '\0' || !(o.accum_init >= 0) || !std::isfinite(o.accum_init)) {
        return Status::invalid_argument(
            str_printf("--accum-init wants a number >= 0 (got '%s')", v));
      }
    } else if (a == "--ablate") {
      o.ablate = v;
    } else if (a == "--json") {
      o.json = v;
    } else {
      return Status::invalid_argument("unknown option " + a);
    }
  }
  const auto n = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(o.experts))));
  if (n * n != o.experts) {
    return Status::invalid_argument(
        str_printf("--experts must be a square (got %lld)", static_cast<long long>(o.experts)));
  }
  return o;
}

Status run(const Options& o) {
  PeerConfig cfg;
  cfg.dim = o.dim;
  cfg.heads = o.heads;
  cfg.n_keys = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(o.experts))));
  cfg.dim_key = o.dim_key;
  cfg.topk = o.topk;
  cfg.activation = Activation::kSilu;
  cfg.gate = Gate::kRelu;
  TROVE_RETURN_IF_ERROR(cfg.validate_and_fill());
  const int64_t n_exp = cfg.num_experts(), dim = cfg.dim, dim_out = cfg.dim_out;
  PeerLayerOptions lopt;
  lopt.threads = o.threads;

  // Weights at 1/sqrt(D) so z = <u, x> and the query are ~N(0, 1) for x ~ N(0, 1); keys at
  // 1/sqrt(dk) so sub-scores are ~N(0, 1).
  Gaussian init(o.seed);
  PeerDenseParams router;
  router.query_weight =
      init.vec(static_cast<size_t>(cfg.query_rows() * dim), 1.0f / std::sqrt(float(dim)));
  router.keys = init.vec(static_cast<size_t>(cfg.key_heads() * 2 * cfg.n_keys * cfg.dim_key),
                         1.0f / std::sqrt(float(cfg.dim_key)));
  const float w_std = 1.0f / std::sqrt(static_cast<float>(dim));
  const std::vector<float> t_down = init.vec(static_cast<size_t>(n_exp * dim), w_std);
  const std::vector<float> t_up = init.vec(static_cast<size_t>(n_exp * dim_out), w_std);
  std::vector<float> s_down0 = init.vec(static_cast<size_t>(n_exp * dim), w_std);
  std::vector<float> s_up0 = init.vec(static_cast<size_t>(n_exp * dim_out), w_std);
  if (o.init_noise >= 0) {
    for (size_t i = 0; i < s_down0.size(); ++i) s_down0[i] = t_down[i] + o.init_noise * s_down0[i];
    for (size_t i = 0; i < s_up0.size(); ++i) s_up0[i] = t_up[i] + o.init_noise * s_up0[i];
  }

  TROVE_ASSIGN_OR_RETURN(const RecordLayout f32, RecordLayout::make(DType::kF32, dim, dim_out));
  TROVE_ASSIGN_OR_RETURN(const RecordLayout i4, RecordLayout::make(DType::kI4, dim, dim_out));
  TROVE_ASSIGN_OR_RETURN(const RecordLayout i8, RecordLayout::make(DType::kI8, dim, dim_out));

  auto make_layer = [&](const RecordLayout& layout,
                        const std::vector<uint8_t>* recs) -> Result<std::unique_ptr<PeerLayer>> {
    TROVE_ASSIGN_OR_RETURN(
        PeerLayer layer,
        PeerLayer::create(cfg, router, std::make_unique<BorrowedExpertSource>(layout, recs), lopt));
    return std::make_unique<PeerLayer>(std::move(layer));
  };

  // Teacher and references.
  std::vector<uint8_t> teacher_recs(static_cast<size_t>(n_exp) * f32.stride);
  pack_records(f32, t_down.data(), t_up.data(), n_exp, teacher_recs.data(), o.threads);
  TROVE_ASSIGN_OR_RETURN(auto teacher, make_layer(f32, &teacher_recs));
  std::vector<uint8_t> teacher_i4(static_cast<size_t>(n_exp) * i4.stride);
  pack_records(i4, t_down.data(), t_up.data(), n_exp, teacher_i4.data(), o.threads);
  TROVE_ASSIGN_OR_RETURN(auto teacher_q, make_layer(i4, &teacher_i4));

  // The common int4 start, and its dequantization for fp32.
  std::vector<uint8_t> start_i4(static_cast<size_t>(n_exp) * i4.stride);
  pack_records(i4, s_down0.data(), s_up0.data(), n_exp, start_i4.data(), o.threads);
  if (o.headroom != 1.0f) {
    for (int64_t e = 0; e < n_exp; ++e) {
      uint8_t* rec = start_i4.data() + static_cast<size_t>(e) * i4.stride;
      regrid_int4_row(s_down0.data() + e * dim, dim, o.headroom, rec + i4.down_scales_offset,
                      rec + i4.down_codes_offset);
      regrid_int4_row(s_up0.data() + e * dim_out, dim_out, o.headroom, rec + i4.up_scales_offset,
                      rec + i4.up_codes_offset);
    }
  }
  std::vector<float> deq_down(s_down0.size()), deq_up(s_up0.size());
  unpack_records(i4, start_i4.data(), n_exp, deq_down.data(), deq_up.data(), o.threads);

  std::vector<Method> methods(5);
  methods[0].name = "fp32";
  methods[0].serving = f32;
  methods[0].records.resize(static_cast<size_t>(n_exp) * f32.stride);
  pack_records(f32, deq_down.data(), deq_up.data(), n_exp, methods[0].records.data(), o.threads);
  methods[1].name = "ours";
  methods[2].name = "sr4";
  methods[3].name = "rtn4";
  methods[4].name = str_printf("ours T=%d", o.tolerance);
  for (int i = 1; i < 5; ++i) {
    methods[static_cast<size_t>(i)].serving = i4;
    methods[static_cast<size_t>(i)].records = start_i4;
  }
  methods[1].training = i8;
  methods[1].train_records.resize(static_cast<size_t>(n_exp) * i8.stride);
  TROVE_RETURN_IF_ERROR(train_import_records(i4, i8, start_i4.data(), n_exp,
                                             methods[1].train_records.data(), o.threads));
  methods[4].training = i8;
  methods[4].train_records = methods[1].train_records;
  methods[4].tolerance = o.tolerance;
  if (!o.ablate.empty()) {
    // Start state of the variants: f = 16 q, d = the start scales (QAT: the dequantized start).
    const int64_t gd = (dim + 31) / 32, gu = (dim_out + 31) / 32;
    std::string list = o.ablate + ",";
    for (size_t p = 0; p < list.size();) {
      const size_t c = list.find(',', p);
      const std::string name = list.substr(p, c - p);
      p = c + 1;
      bool found = false;
      for (const Variant& v : kVariants) {
        if (name != "all" && name != v.name) continue;
        Method m;
        m.name = v.name;
        m.variant = &v;
        m.serving = f32;
        m.training = i4;
        m.records.resize(static_cast<size_t>(n_exp) * f32.stride);
        pack_records(f32, deq_down.data(), deq_up.data(), n_exp, m.records.data(), o.threads);
        m.sim_f.resize(static_cast<size_t>(n_exp * (dim + dim_out)));
        m.sim_d.resize(static_cast<size_t>(n_exp * (gd + gu)));
        for (int64_t e = 0; e < n_exp; ++e) {
          const uint8_t* rec = start_i4.data() + static_cast<size_t>(e) * i4.stride;
          float* f = m.sim_f.data() + e * (dim + dim_out);
          for (int64_t g = 0; g < gd + gu; ++g) {
            uint16_t h;
            std::memcpy(&h, rec + i4.down_scales_offset + 2 * static_cast<size_t>(g), 2);
            m.sim_d[static_cast<size_t>(e * (gd + gu) + g)] = fp16_to_fp32(h);
          }
          for (int64_t i = 0; i < dim + dim_out; ++i) {
            const bool down = i < dim;
            const int64_t j = down ? i : i - dim;
            const float w = down ? deq_down[static_cast<size_t>(e * dim + j)]
                                 : deq_up[static_cast<size_t>(e * dim_out + j)];
            const float dg = m.sim_d[static_cast<size_t>(e * (gd + gu) + (down ? 0 : gd) + j / 32)];
            f[i] = v.view == SimView::kQatFp32 ? w : (dg == 0.0f ? 0.0f : 16.0f * (w / dg));
          }
        }
        methods.push_back(std::move(m));
        found = true;
      }
      if (!found) return Status::invalid_argument("--ablate: no variant named " + name);
    }
  }
  for (Method& m : methods) {
    m.accum.assign(static_cast<size_t>(n_exp) * 2, o.accum_init);
    TROVE_ASSIGN_OR_RETURN(m.layer, make_layer(m.serving, &m.records));
  }

  // Held-out batch.
  Gaussian eval_gen(o.seed ^ 0xe7a1ull);
  const std::vector<float> x_eval = eval_gen.vec(static_cast<size_t>(o.eval_tokens * dim), 1.0f);
  std::vector<float> y_eval_t(static_cast<size_t>(o.eval_tokens * dim_out));
  std::vector<float> y_eval(y_eval_t.size());
  TROVE_RETURN_IF_ERROR(teacher->forward(x_eval, o.eval_tokens, y_eval_t));
  TROVE_RETURN_IF_ERROR(teacher_q->forward(x_eval, o.eval_tokens, y_eval));
  const double teacher_int4_err = rel_error(y_eval, y_eval_t);
  auto evaluate = [&](Method& m, int64_t step) -> Status {
    TROVE_RETURN_IF_ERROR(m.layer->forward(x_eval, o.eval_tokens, y_eval));
    m.curve.emplace_back(step, rel_error(y_eval, y_eval_t));
    return Status::ok_status();
  };

  const auto t0 = std::chrono::steady_clock::now();
  Gaussian data(o.seed ^ 0xda7aull);
  const size_t tx = static_cast<size_t>(o.batch * dim), ty = static_cast<size_t>(o.batch * dim_out);
  std::vector<float> y_t(ty), y(ty), dy(ty);
  PeerGrads grads;
  TrainStep step;
  step.optimizer = o.optimizer;
  step.lr = o.lr;
  step.seed = o.seed;
  TROVE_RETURN_IF_ERROR(check_train_step(step));
  const float dy_scale = 2.0f / static_cast<float>(o.batch * dim_out);
  for (int64_t s = 0; s <= o.steps; ++s) {
    if (s % o.eval_every == 0 || s == o.steps) {
      for (Method& m : methods) TROVE_RETURN_IF_ERROR(evaluate(m, s));
    }
    if (s == o.steps) break;
    const std::vector<float> x = data.vec(tx, 1.0f);
    TROVE_RETURN_IF_ERROR(teacher->forward(x, o.batch, y_t));
    step.step = static_cast<uint64_t>(s);
    for (Method& m : methods) {
      const auto m0 = std::chrono::steady_clock::now();
      TROVE_RETURN_IF_ERROR(m.layer->forward(x, o.batch, y));
      for (size_t i = 0; i < ty; ++i) dy[i] = dy_scale * (y[i] - y_t[i]);
      TROVE_RETURN_IF_ERROR(m.layer->backward(x, o.batch, dy, &grads));
      TROVE_RETURN_IF_ERROR(update(m, step, grads, o.threads).with_context(m.name));
      m.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - m0).count();
    }
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // Post-training quantization of the fp32 student.
  std::vector<float> f_down(deq_down.size()), f_up(deq_up.size());
  unpack_records(f32, methods[0].records.data(), n_exp, f_down.data(), f_up.data(), o.threads);
  std::vector<uint8_t> ptq(static_cast<size_t>(n_exp) * i4.stride);
  pack_records(i4, f_down.data(), f_up.data(), n_exp, ptq.data(), o.threads);
  TROVE_ASSIGN_OR_RETURN(auto ptq_layer, make_layer(i4, &ptq));
  TROVE_RETURN_IF_ERROR(ptq_layer->forward(x_eval, o.eval_tokens, y_eval));
  const double ptq_err = rel_error(y_eval, y_eval_t);

  const double fp32_final = methods[0].curve.back().second;
  std::printf(
      "train_compare: N = %lld experts, D = %lld, h = %lld, k = %lld, dk = %lld, silu, relu gate; "
      "%lld steps of %lld tokens, %s lr %g, seed %llu; held-out %lld tokens\n",
      static_cast<long long>(n_exp), static_cast<long long>(dim), static_cast<long long>(cfg.heads),
      static_cast<long long>(cfg.topk), static_cast<long long>(cfg.dim_key),
      static_cast<long long>(o.steps), static_cast<long long>(o.batch),
      o.optimizer == TrainOptimizer::kAdagrad ? "row-wise Adagrad" : "SGD",
      static_cast<double>(o.lr), static_cast<unsigned long long>(o.seed),
      static_cast<long long>(o.eval_tokens));
  std::printf("%-34s %12s %12s %12s %10s\n", "method", "start_err", "final_err", "vs_fp32",
              "train_s");
  for (const Method& m : methods) {
    std::printf("%-34s %12.4f %12.4f %12.3f %10.2f\n", m.name.c_str(), m.curve.front().second,
                m.curve.back().second, m.curve.back().second / fp32_final, m.seconds);
  }
  std::printf("%-34s %12s %12.4f %12.3f\n", "ref: teacher packed to int4", "", teacher_int4_err,
              teacher_int4_err / fp32_final);
  std::printf("%-34s %12s %12.4f %12.3f\n", "ref: fp32 student packed to int4", "", ptq_err,
              ptq_err / fp32_final);
  // Groups whose scale ours changed (each doubling halves that group's int4 resolution).
  int64_t groups = 0, groups_rescaled = 0;
  for (int64_t e = 0; e < n_exp; ++e) {
    const size_t off = static_cast<size_t>(e) * i4.stride;
    for (size_t b = 0; b < i4.down_codes_offset; b += 2) {
      ++groups;
      groups_rescaled += std::memcmp(&start_i4[off + b], &methods[1].records[off + b], 2) != 0;
    }
  }
  std::printf(
      "ours: %lld elements changed, %lld rescales, %lld scale inits, %lld of %lld groups "
      "rescaled; int4 start scale %.3g x Q4_0; total %.1f s\n",
      static_cast<long long>(methods[1].stats.elements_changed),
      static_cast<long long>(methods[1].stats.rescales),
      static_cast<long long>(methods[1].stats.scale_inits), static_cast<long long>(groups_rescaled),
      static_cast<long long>(groups), static_cast<double>(o.headroom), total);

  std::printf("%s: %lld elements changed, %lld rescales, %lld groups clamped\n",
              methods[4].name.c_str(), static_cast<long long>(methods[4].stats.elements_changed),
              static_cast<long long>(methods[4].stats.rescales),
              static_cast<long long>(methods[4].stats.clamps));

  double acc_mean = 0;
  for (float a : methods[0].accum) acc_mean += a;
  std::printf("fp32: mean Adagrad row accumulator after training %.3g (start %.3g)\n",
              acc_mean / static_cast<double>(methods[0].accum.size()),
              static_cast<double>(o.accum_init));
  for (const Method& m : methods) {
    if (m.variant == nullptr) continue;
    const int64_t gpe = static_cast<int64_t>(i4.down_codes_offset / 2);
    int64_t grown = 0;
    double log2_growth = 0;
    for (int64_t e = 0; e < n_exp; ++e) {
      const uint8_t* rec = start_i4.data() + static_cast<size_t>(e) * i4.stride;
      for (int64_t g = 0; g < gpe; ++g) {
        uint16_t h;
        std::memcpy(&h, rec + 2 * static_cast<size_t>(g), 2);
        const float d0 = fp16_to_fp32(h), d1 = m.sim_d[static_cast<size_t>(e * gpe + g)];
        if (d0 != d1 && d0 != 0.0f) {
          ++grown;
          log2_growth += std::log2(d1 / d0);
        }
      }
    }
    std::printf("%s: %s; %lld of %lld groups grew their scale, mean log2 growth of all %.3f\n",
                m.name.c_str(), m.variant->what, static_cast<long long>(grown),
                static_cast<long long>(n_exp * gpe),
                log2_growth / static_cast<double>(n_exp * gpe));
  }

  if (!o.json.empty()) {
    std::FILE* f = std::fopen(o.json.c_str(), "w");
    if (f == nullptr) return Status::io_error("cannot write " + o.json);
    std::fprintf(f,
                 "{\n  \"config\": {\"experts\": %lld, \"dim\": %lld, \"heads\": %lld, "
                 "\"topk\": %lld, \"dim_key\": %lld, \"steps\": %lld, \"batch\": %lld, "
                 "\"optimizer\": \"%s\", \"lr\": %g, \"seed\": %llu, \"eval_tokens\": %lld},\n",
                 static_cast<long long>(n_exp), static_cast<long long>(dim),
                 static_cast<long long>(cfg.heads), static_cast<long long>(cfg.topk),
                 static_cast<long long>(cfg.dim_key), static_cast<long long>(o.steps),
                 static_cast<long long>(o.batch),
                 o.optimizer == TrainOptimizer::kAdagrad ? "adagrad" : "sgd",
                 static_cast<double>(o.lr), static_cast<unsigned long long>(o.seed),
                 static_cast<long long>(o.eval_tokens));
    std::fprintf(f, "  \"teacher_int4_rel_err\": %.6g,\n  \"fp32_ptq_int4_rel_err\": %.6g,\n",
                 teacher_int4_err, ptq_err);
    std::fprintf(f, "  \"seconds\": %.3f,\n  \"methods\": [\n", total);
    for (size_t i = 0; i < methods.size(); ++i) {
      const Method& m = methods[i];
      std::fprintf(f, "    {\"name\": \"%s\", \"final_rel_err\": %.6g, \"seconds\": %.3f, ",
                   m.name.c_str(), m.curve.back().second, m.seconds);
      std::fprintf(f, "\"curve\": [");
      for (size_t c = 0; c < m.curve.size(); ++c) {
        std::fprintf(f, "%s[%lld, %.6g]", c ? ", " : "", static_cast<long long>(m.curve[c].first),
                     m.curve[c].second);
      }
      std::fprintf(f, "]}%s\n", i + 1 < methods.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    if (std::fclose(f) != 0) return Status::io_error("cannot write " + o.json);
  }
  return Status::ok_status();
}

}  // namespace
}  // namespace trove

int main(int argc, char** argv) {
  auto opts = trove::parse_args(argc, argv);
  if (!opts.ok()) {
    std::fprintf(stderr,
                 "%s\nusage: train_compare [--steps N] [--batch T] [--lr LR] [--experts N (a "
                 "square)] [--dim D] [--heads h] [--topk k] [--dim-key dk] [--seed S] "
                 "[--eval-every K] [--eval-tokens T] [--optimizer adagrad|sgd] [--threads n] "
                 "[--json PATH] [--init-noise s] [--headroom f] [--tolerance T] [--accum-init G0] "
                 "[--ablate all|NAME,...]\n",
                 opts.status().to_string().c_str());
    return 2;
  }
  const trove::Status st = trove::run(opts.value());
  if (!st.ok()) {
    std::fprintf(stderr, "train_compare: %s\n", st.to_string().c_str());
    return 1;
  }
  return 0;
}
