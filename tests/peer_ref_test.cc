// The PEER layer's oracle (kernels/cpu/ref/peer_ref.h) is what every other backend is held to,
// so it is checked here against math written independently in this file: gradients against
// central finite differences of sum(dy * y) for every parameter group, routing against a
// brute force over the k'^2 candidate pairs, gates and the rms norm against their formulas,
// and the forward pass against a double-precision recomputation on the dequantized tables of
// every record dtype.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "base/check.h"
#include "kernels/cpu/ref/peer_ref.h"
#include "kernels/cpu/ref/quant_ref.h"
#include "kernels/peer.h"
#include "kernels/quant.h"
#include "kernels/record.h"
#include "tests/peer_test_util.h"

namespace trove {
namespace {

PeerConfig validated(PeerConfig config) {
  const Status s = config.validate_and_fill();
  TROVE_CHECK_MSG(s.ok(), "%s", s.to_string().c_str());
  return config;
}

using testing::layout_of;
using testing::normal_values;

std::vector<size_t> all_indices(size_t n) {
  std::vector<size_t> i(n);
  std::iota(i.begin(), i.end(), size_t{0});
  return i;
}

// The small shape of the gradient and gate tests: nothing a power of two, k < k'^2 < N.
PeerConfig small_config(Activation activation, Gate gate) {
  PeerConfig c;
  c.dim = 13;
  c.dim_out = 11;
  c.heads = 2;
  c.n_keys = 5;
  c.dim_key = 3;
  c.topk = 4;
  c.topk_per_half = 3;
  c.activation = activation;
  c.gate = gate;
  return c;
}

// A layer's parameters, fp32 and owned by the test, and its expert table packed as records.
struct Layer {
  PeerConfig config;
  RecordLayout layout;
  std::vector<float> query_weight;  // [h*2*dk, D]
  std::vector<float> query_bias;    // [h*2*dk]
  std::vector<float> keys;          // [hk, 2, n, dk]
  std::vector<float> norm_weight;   // [D]
  std::vector<float> down;          // [N, D]
  std::vector<float> up;            // [N, D_out]
  std::vector<uint8_t> table;       // N records of layout.stride bytes

  PeerRouterParams router() const {
    PeerRouterParams p;
    p.query_weight = query_weight.data();
    p.query_bias = config.query_bias ? query_bias.data() : nullptr;
    p.keys = keys.data();
    p.norm_weight = config.input_norm == InputNorm::kRms ? norm_weight.data() : nullptr;
    return p;
  }

  // Repacks expert e's record from down/up (after a change to either).
  void pack(int64_t e) {
    pack_record_ref(layout, &down[static_cast<size_t>(e * config.dim)],
                    &up[static_cast<size_t>(e * config.dim_out)],
                    &table[static_cast<size_t>(e) * layout.stride]);
  }
};

// Scales keep every stage O(1): q ~ N(0, 1) per element, z = <u, xhat> ~ N(0, 1).
Layer random_layer(const PeerConfig& config, DType dtype, uint32_t seed) {
  Layer l;
  l.config = validated(config);
  const PeerConfig& c = l.config;
  l.layout = layout_of(dtype, c.dim, c.dim_out);
  std::mt19937 rng(seed);
  const double row_scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  const size_t rows = static_cast<size_t>(c.query_rows());
  const size_t experts = static_cast<size_t>(c.num_experts());
  l.query_weight = normal_values(rows * static_cast<size_t>(c.dim), row_scale, &rng);
  l.query_bias = normal_values(rows, 0.5, &rng);
  l.keys = normal_values(static_cast<size_t>(c.key_heads() * 2 * c.n_keys * c.dim_key), 1.0, &rng);
  l.norm_weight = normal_values(static_cast<size_t>(c.dim), 0.3, &rng);
  for (float& g : l.norm_weight) g += 1.0f;
  l.down = normal_values(experts * static_cast<size_t>(c.dim), row_scale, &rng);
  l.up = normal_values(experts * static_cast<size_t>(c.dim_out), 1.0, &rng);
  l.table.assign(experts * l.layout.stride, 0);
  for (int64_t e = 0; e < c.num_experts(); ++e) l.pack(e);
  return l;
}

std::vector<const uint8_t*> slot_records(const Layer& layer, const PeerRouting& routing) {
  std::vector<const uint8_t*> records(routing.slots());
  for (size_t s = 0; s < records.size(); ++s) {
    records[s] = layer.table.data() + static_cast<size_t>(routing.ids[s]) * layer.layout.stride;
  }
  return records;
}

struct Forward {
  std::vector<float> xhat;
  std::vector<float> q;
  PeerRouting routing;
  std::vector<float> y;
};

// The forward pass as the runtime composes it: norm -> query -> route -> records -> experts.
Forward run_forward(const Layer& layer, const std::vector<float>& x, int64_t tokens) {
  const PeerConfig& c = layer.config;
  const PeerRouterParams params = layer.router();
  Forward f;
  f.xhat.resize(static_cast<size_t>(tokens * c.dim));
  f.q.resize(static_cast<size_t>(tokens * c.query_rows()));
  f.y.resize(static_cast<size_t>(tokens * c.dim_out));
  peer_norm_ref(c, params.norm_weight, x.data(), tokens, f.xhat.data());
  peer_query_ref(c, params, f.xhat.data(), tokens, f.q.data());
  peer_route_ref(c, params, f.q.data(), tokens, &f.routing);
  const std::vector<const uint8_t*> records = slot_records(layer, f.routing);
  peer_experts_ref(c, layer.layout, f.xhat.data(), f.routing, records.data(), f.y.data());
  return f;
}

// ---- independent math ---------------------------------------------------------------------------

double activation_formula(Activation a, double z) {
  switch (a) {
    case Activation::kRelu:
      return std::max(z, 0.0);
    case Activation::kGelu:
      return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
    case Activation::kGeluTanh:
      return 0.5 * z * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (z + 0.044715 * z * z * z)));
    case Activation::kSilu:
      return z / (1.0 + std::exp(-z));
  }
  return 0.0;
}

std::vector<double> gate_formula(Gate g, const std::vector<double>& scores) {
  std::vector<double> out(scores.size());
  switch (g) {
    case Gate::kSoftmax: {
      const double top = *std::max_element(scores.begin(), scores.end());
      double sum = 0;
      for (size_t i = 0; i < scores.size(); ++i) sum += out[i] = std::exp(scores[i] - top);
      for (double& v : out) v /= sum;
      break;
    }
    case Gate::kRelu:
      for (size_t i = 0; i < scores.size(); ++i) out[i] = std::max(scores[i], 0.0);
      break;
    case Gate::kSigmoid:
      for (size_t i = 0; i < scores.size(); ++i) out[i] = 1.0 / (1.0 + std::exp(-scores[i]));
      break;
  }
  return out;
}

// Indices of the `count` largest values, best first; ties: lower index first.
std::vector<int64_t> top_indices(const std::vector<double>& values, int64_t count) {
  std::vector<int64_t> order(values.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return values[static_cast<size_t>(a)] > values[static_cast<size_t>(b)];
  });
  order.resize(static_cast<size_t>(count));
  return order;
}

struct Selection {
  std::vector<int64_t> ids;
  std::vector<double> scores;
};

// Product-key top-k written out: the k' best sub-keys of each half, all k'^2 pairs (i, j) as
// expert i*n + j with score s0[i] + s1[j], and the k best pairs by (score desc, id asc).
Selection brute_force_select(const std::vector<double>& s0, const std::vector<double>& s1,
                             int64_t n, int64_t k_half, int64_t k) {
  std::vector<std::pair<int64_t, double>> pairs;
  for (int64_t i : top_indices(s0, k_half)) {
    for (int64_t j : top_indices(s1, k_half)) {
      pairs.emplace_back(i * n + j, s0[static_cast<size_t>(i)] + s1[static_cast<size_t>(j)]);
    }
  }
  std::sort(pairs.begin(), pairs.end(), [](const auto& a, const auto& b) {
    return a.second != b.second ? a.second > b.second : a.first < b.first;
  });
  Selection sel;
  for (int64_t r = 0; r < k; ++r) {
    sel.ids.push_back(pairs[static_cast<size_t>(r)].first);
    sel.scores.push_back(pairs[static_cast<size_t>(r)].second);
  }
  return sel;
}

// Sub-scores s_c[i] = <q[head][c], K[hk][c][i]> in double for token t.
std::vector<double> sub_scores(const PeerConfig& c, const float* q_token, const float* keys,
                               int64_t head, int64_t half) {
  const int64_t hk = c.shared_keys ? 0 : head;
  std::vector<double> s(static_cast<size_t>(c.n_keys));
  for (int64_t i = 0; i < c.n_keys; ++i) {
    double acc = 0;
    for (int64_t j = 0; j < c.dim_key; ++j) {
      acc += static_cast<double>(q_token[(head * 2 + half) * c.dim_key + j]) *
             keys[((hk * 2 + half) * c.n_keys + i) * c.dim_key + j];
    }
    s[static_cast<size_t>(i)] = acc;
  }
  return s;
}

// The whole of SPEC §2 in double for T tokens, from the fp32 router parameters and the given
// expert tables (the dequantized record contents).
struct NaiveForward {
  std::vector<int64_t> ids;  // [T, h, k]
  std::vector<double> y;     // [T, D_out]
};

NaiveForward naive_forward(const Layer& layer, const std::vector<float>& down,
                           const std::vector<float>& up, const std::vector<float>& x,
                           int64_t tokens) {
  const PeerConfig& c = layer.config;
  const size_t D = static_cast<size_t>(c.dim);
  const size_t D_out = static_cast<size_t>(c.dim_out);
  NaiveForward out;
  out.y.assign(static_cast<size_t>(tokens) * D_out, 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = &x[static_cast<size_t>(t) * D];
    std::vector<double> xhat(xt, xt + D);
    if (c.input_norm == InputNorm::kRms) {
      double ms = 0;
      for (double v : xhat) ms += v * v;
      const double inv = 1.0 / std::sqrt(ms / static_cast<double>(D) + c.norm_eps);
      for (size_t d = 0; d < D; ++d) xhat[d] *= inv * layer.norm_weight[d];
    }
    std::vector<double> q(static_cast<size_t>(c.query_rows()));
    for (size_t r = 0; r < q.size(); ++r) {
      double acc = c.query_bias ? layer.query_bias[r] : 0.0;
      for (size_t d = 0; d < D; ++d) acc += layer.query_weight[r * D + d] * xhat[d];
      q[r] = acc;
    }
    for (int64_t head = 0; head < c.heads; ++head) {
      const int64_t hk = c.shared_keys ? 0 : head;
      std::array<std::vector<double>, 2> s;
      for (int64_t half = 0; half < 2; ++half) {
        for (int64_t i = 0; i < c.n_keys; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < c.dim_key; ++j) {
            acc +=
                q[static_cast<size_t>((head * 2 + half) * c.dim_key + j)] *
                layer.keys[static_cast<size_t>(((hk * 2 + half) * c.n_keys + i) * c.dim_key + j)];
          }
          s[static_cast<size_t>(half)].push_back(acc);
        }
      }
      const Selection sel = brute_force_select(s[0], s[1], c.n_keys, c.topk_per_half, c.topk);
      const std::vector<double> gates = gate_formula(c.gate, sel.scores);
      for (int64_t slot = 0; slot < c.topk; ++slot) {
        const size_t e = static_cast<size_t>(sel.ids[static_cast<size_t>(slot)]);
        out.ids.push_back(static_cast<int64_t>(e));
        double z = 0;
        for (size_t d = 0; d < D; ++d) z += static_cast<double>(down[e * D + d]) * xhat[d];
        const double ga = gates[static_cast<size_t>(slot)] * activation_formula(c.activation, z);
        for (size_t o = 0; o < D_out; ++o) {
          out.y[static_cast<size_t>(t) * D_out + o] += ga * up[e * D_out + o];
        }
      }
    }
  }
  return out;
}

// What a record of `dtype` holds for fp32 rows of length n: the _ref round trip of each row.
std::vector<float> decoded_rows(DType dtype, const std::vector<float>& rows, int64_t n) {
  const size_t len = static_cast<size_t>(n);
  const size_t groups = static_cast<size_t>(quant_groups(n));
  std::vector<float> out(rows.size());
  std::vector<uint16_t> scales(groups);
  std::vector<int8_t> codes8(groups * kQuantGroup);
  std::vector<uint8_t> codes4(groups * kQuantGroup / 2);
  std::vector<uint8_t> raw(len * 4);
  for (size_t r = 0; r < rows.size() / len; ++r) {
    const float* src = &rows[r * len];
    float* dst = &out[r * len];
    switch (dtype) {
      case DType::kF32:
        std::copy(src, src + len, dst);
        break;
      case DType::kF16:
      case DType::kBF16:
        convert_row_ref(dtype, src, n, raw.data());
        unconvert_row_ref(dtype, raw.data(), n, dst);
        break;
      case DType::kI8:
        quantize_row_int8_ref(src, n, scales.data(), codes8.data());
        dequantize_row_int8_ref(scales.data(), codes8.data(), n, dst);
        break;
      case DType::kI4:
        quantize_row_int4_ref(src, n, scales.data(), codes4.data());
        dequantize_row_int4_ref(scales.data(), codes4.data(), n, dst);
        break;
    }
  }
  return out;
}

// ---- 1. gradients against central finite differences -------------------------------------------

// Step for the central differences. Each perturbed value is rounded to fp32 and the quotient
// divides by the step actually taken, (float(w + eps) - float(w - eps)).
constexpr double kEps = 1e-3;
// Tolerance. The loss is summed in double, but y (and xhat, q, scores, gates before it) are
// stored in fp32, so L carries rounding noise: the rounding of y alone moves L by at most
// 2^-24 * sum|dy_i y_i|, and a central difference by at most that over eps =: noise. noise is
// 8e-5..1.4e-2 across these cases (largest with the unnormalized relu gate, where y ~ 10 and L
// cancels to ~10 of sum|dy y| ~ 200). The truncation error eps^2 f'''/6 is ~1e-7. Allowed:
// 4 noise + 0.1% of the gradient. Observed: |fd - analytic| <= 0.9 noise with these seeds,
// <= 2.9 noise over 1400 reseeded runs (850k coordinates, intermediates' rounding included),
// and scaling any one analytic gradient group by 1.01 fails 15 to 17 of the 17 cases.
constexpr double kNoiseMultiple = 4.0;
constexpr double kGradRelTol = 1e-3;

struct Evaluation {
  double loss = 0;
  double rounding_noise = 0;  // 2^-24 * sum |dy_i y_i|, see kNoiseMultiple
  // Identifies the smooth piece of the loss: per (token, head) the selected experts (as a
  // set: the loss is symmetric in their order) with the sign of z (relu activation) and of
  // the score (relu gate). Central differences across a change of piece are meaningless.
  std::vector<int64_t> piece;
};

Evaluation evaluate(const Layer& layer, const std::vector<float>& x, int64_t tokens,
                    const std::vector<float>& dy) {
  const PeerConfig& c = layer.config;
  const Forward f = run_forward(layer, x, tokens);
  Evaluation ev;
  for (size_t i = 0; i < f.y.size(); ++i) {
    ev.loss += static_cast<double>(dy[i]) * f.y[i];
    ev.rounding_noise += std::abs(static_cast<double>(dy[i]) * f.y[i]) * 0x1p-24;
  }
  for (int64_t th = 0; th < tokens * c.heads; ++th) {
    const int64_t t = th / c.heads;
    std::vector<std::array<int64_t, 3>> slots;
    for (int64_t s = 0; s < c.topk; ++s) {
      const size_t slot = static_cast<size_t>(th * c.topk + s);
      const int64_t e = f.routing.ids[slot];
      int64_t z_sign = 0;
      int64_t score_sign = 0;
      if (c.activation == Activation::kRelu) {
        double z = 0;
        for (int64_t d = 0; d < c.dim; ++d) {
          z += static_cast<double>(f.xhat[static_cast<size_t>(t * c.dim + d)]) *
               layer.down[static_cast<size_t>(e * c.dim + d)];
        }
        z_sign = (z > 0) - (z < 0);
      }
      if (c.gate == Gate::kRelu) {
        score_sign = (f.routing.scores[slot] > 0) - (f.routing.scores[slot] < 0);
      }
      slots.push_back({e, z_sign, score_sign});
    }
    std::sort(slots.begin(), slots.end());
    for (const auto& s : slots) ev.piece.insert(ev.piece.end(), s.begin(), s.end());
  }
  return ev;
}

struct GradTally {
  int64_t checked = 0;
  int64_t skipped = 0;
  int64_t failed = 0;
  double max_abs_err = 0;
  double max_noise_multiple = 0;  // max |fd - analytic| / noise over the compared coordinates
};

// Compares analytic(i) with the central difference of the loss along (*values)[i] for each i
// in `indices`; `changed(i)` is called after each write to (*values)[i] (to repack a record).
void check_group(const std::string& group, std::vector<float>* values,
                 const std::vector<size_t>& indices, const std::function<double(size_t)>& analytic,
                 const std::function<void(size_t)>& changed,
                 const std::function<Evaluation()>& evaluate_now, const Evaluation& base,
                 GradTally* tally) {
  int64_t group_failures = 0;
  for (size_t i : indices) {
    const float original = (*values)[i];
    const float plus = static_cast<float>(original + kEps);
    const float minus = static_cast<float>(original - kEps);
    (*values)[i] = plus;
    changed(i);
    const Evaluation at_plus = evaluate_now();
    (*values)[i] = minus;
    changed(i);
    const Evaluation at_minus = evaluate_now();
    (*values)[i] = original;
    changed(i);

    ++tally->checked;
    if (at_plus.piece != base.piece || at_minus.piece != base.piece) {
      ++tally->skipped;
      continue;
    }
    const double fd =
        (at_plus.loss - at_minus.loss) / (static_cast<double>(plus) - static_cast<double>(minus));
    const double an = analytic(i);
    const double err = std::abs(fd - an);
    const double noise = base.rounding_noise / kEps;
    tally->max_abs_err = std::max(tally->max_abs_err, err);
    tally->max_noise_multiple = std::max(tally->max_noise_multiple, err / noise);
    if (err > kNoiseMultiple * noise + kGradRelTol * std::abs(fd)) {
      ++tally->failed;
      if (++group_failures <= 5) {
        ADD_FAILURE() << "d loss / d " << group << "[" << i << "]: analytic " << an
                      << ", finite difference " << fd << ", noise " << noise;
      }
    }
  }
}

struct GradCase {
  std::string name;
  PeerConfig config;
  int64_t tokens = 3;
  uint32_t seed = 0;
};

// Names the case in gtest's messages instead of a byte dump.
void PrintTo(const GradCase& c, std::ostream* os) {
  *os << c.name;
}

class PeerRefGrad : public ::testing::TestWithParam<GradCase> {};

TEST_P(PeerRefGrad, MatchesFiniteDifferencesForEveryParameter) {
  const GradCase& gc = GetParam();
  Layer layer = random_layer(gc.config, DType::kF32, gc.seed);
  const PeerConfig& c = layer.config;
  const int64_t T = gc.tokens;
  std::mt19937 rng(gc.seed + 1000);
  std::vector<float> x = normal_values(static_cast<size_t>(T * c.dim), 1.0, &rng);
  const std::vector<float> dy = normal_values(static_cast<size_t>(T * c.dim_out), 1.0, &rng);

  const Forward f = run_forward(layer, x, T);
  const std::vector<const uint8_t*> records = slot_records(layer, f.routing);
  PeerGrads grads;
  peer_backward_ref(c, layer.router(), layer.layout, x.data(), T, f.routing, records.data(),
                    dy.data(), &grads);

  ASSERT_EQ(grads.dx.size(), x.size());
  ASSERT_EQ(grads.d_query_weight.size(), layer.query_weight.size());
  ASSERT_EQ(grads.d_query_bias.size(), c.query_bias ? layer.query_bias.size() : 0u);
  ASSERT_EQ(grads.d_keys.size(), layer.keys.size());
  ASSERT_EQ(grads.d_norm_weight.size(),
            c.input_norm == InputNorm::kRms ? layer.norm_weight.size() : 0u);
  // Row-sparse expert gradients: one row per touched expert, ascending; none for the others.
  std::vector<int64_t> touched = f.routing.ids;
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  ASSERT_EQ(grads.expert_ids, touched);
  ASSERT_EQ(grads.d_down.size(), touched.size() * static_cast<size_t>(c.dim));
  ASSERT_EQ(grads.d_up.size(), touched.size() * static_cast<size_t>(c.dim_out));

  const auto evaluate_now = [&] { return evaluate(layer, x, T, dy); };
  const Evaluation base = evaluate_now();
  const auto nothing = [](size_t) {};
  GradTally tally;
  check_group(
      "x", &x, all_indices(x.size()), [&](size_t i) { return grads.dx[i]; }, nothing, evaluate_now,
      base, &tally);
  check_group(
      "query_weight", &layer.query_weight, all_indices(layer.query_weight.size()),
      [&](size_t i) { return grads.d_query_weight[i]; }, nothing, evaluate_now, base, &tally);
  if (c.query_bias) {
    check_group(
        "query_bias", &layer.query_bias, all_indices(layer.query_bias.size()),
        [&](size_t i) { return grads.d_query_bias[i]; }, nothing, evaluate_now, base, &tally);
  }
  check_group(
      "keys", &layer.keys, all_indices(layer.keys.size()),
      [&](size_t i) { return grads.d_keys[i]; }, nothing, evaluate_now, base, &tally);
  if (c.input_norm == InputNorm::kRms) {
    check_group(
        "norm_weight", &layer.norm_weight, all_indices(layer.norm_weight.size()),
        [&](size_t i) { return grads.d_norm_weight[i]; }, nothing, evaluate_now, base, &tally);
  }

  // Expert tables: every element of every touched expert, perturbed in fp32 and repacked (f32
  // records hold the value exactly).
  const auto row_of = [&](int64_t e) {
    return static_cast<size_t>(std::lower_bound(touched.begin(), touched.end(), e) -
                               touched.begin());
  };
  const size_t D = static_cast<size_t>(c.dim);
  const size_t D_out = static_cast<size_t>(c.dim_out);
  std::vector<size_t> down_indices;
  std::vector<size_t> up_indices;
  for (int64_t e : touched) {
    for (size_t d = 0; d < D; ++d) down_indices.push_back(static_cast<size_t>(e) * D + d);
    for (size_t o = 0; o < D_out; ++o) up_indices.push_back(static_cast<size_t>(e) * D_out + o);
  }
  check_group(
      "down", &layer.down, down_indices,
      [&](size_t i) { return grads.d_down[row_of(static_cast<int64_t>(i / D)) * D + i % D]; },
      [&](size_t i) { layer.pack(static_cast<int64_t>(i / D)); }, evaluate_now, base, &tally);
  check_group(
      "up", &layer.up, up_indices,
      [&](size_t i) {
        return grads.d_up[row_of(static_cast<int64_t>(i / D_out)) * D_out + i % D_out];
      },
      [&](size_t i) { layer.pack(static_cast<int64_t>(i / D_out)); }, evaluate_now, base, &tally);

  RecordProperty("checked", std::to_string(tally.checked));
  RecordProperty("skipped", std::to_string(tally.skipped));
  RecordProperty("max_abs_err", std::to_string(tally.max_abs_err));
  RecordProperty("max_noise_multiple", std::to_string(tally.max_noise_multiple));
  RecordProperty("noise", std::to_string(base.rounding_noise / kEps));
  // A piece change within +-eps needs a near-tie at the top-k boundary or a z or score within
  // ~1e-3 of 0: rare with O(1) random values (0 to 5 of ~600 with these seeds; 0.2% over 1400
  // reseeded runs, though one near-tie skips a whole group, so some seeds pass 5%).
  EXPECT_LT(tally.skipped * 20, tally.checked)
      << tally.skipped << " of " << tally.checked << " coordinates skipped at a kink";
  EXPECT_EQ(tally.failed, 0) << "of " << tally.checked - tally.skipped << " compared";
}

std::vector<GradCase> grad_cases() {
  std::vector<GradCase> cases;
  uint32_t seed = 100;
  for (Activation a :
       {Activation::kRelu, Activation::kGelu, Activation::kGeluTanh, Activation::kSilu}) {
    for (Gate g : {Gate::kSoftmax, Gate::kRelu, Gate::kSigmoid}) {
      cases.push_back({std::string(activation_name(a)) + "_" + std::string(gate_name(g)),
                       small_config(a, g), 3, seed++});
    }
  }
  GradCase rms{"silu_softmax_rms_norm", small_config(Activation::kSilu, Gate::kSoftmax), 3, 200};
  rms.config.input_norm = InputNorm::kRms;
  cases.push_back(rms);
  GradCase bias{"gelu_sigmoid_query_bias", small_config(Activation::kGelu, Gate::kSigmoid), 3, 201};
  bias.config.query_bias = true;
  cases.push_back(bias);
  GradCase shared{"gelu_tanh_relu_shared_keys", small_config(Activation::kGeluTanh, Gate::kRelu), 3,
                  202};
  shared.config.shared_keys = true;
  cases.push_back(shared);
  GradCase all{"relu_softmax_rms_norm_query_bias_shared_keys",
               small_config(Activation::kRelu, Gate::kSoftmax), 3, 203};
  all.config.input_norm = InputNorm::kRms;
  all.config.query_bias = true;
  all.config.shared_keys = true;
  cases.push_back(all);
  // N = 1: every slot of every token and head hits expert 0, so its gradient rows sum six
  // contributions; the sigmoid gate keeps the router path alive with k = 1.
  GradCase single{"silu_sigmoid_single_expert_rms_norm_query_bias",
                  small_config(Activation::kSilu, Gate::kSigmoid), 3, 204};
  single.config.n_keys = 1;
  single.config.topk = 1;
  single.config.topk_per_half = 1;
  single.config.input_norm = InputNorm::kRms;
  single.config.query_bias = true;
  cases.push_back(single);
  return cases;
}

INSTANTIATE_TEST_SUITE_P(ActivationGateAndVariants, PeerRefGrad, ::testing::ValuesIn(grad_cases()),
                         [](const ::testing::TestParamInfo<GradCase>& p) { return p.param.name; });

// ---- 2. routing
// ----------------------------------------------------------------------------------

// Routes the given q [T, h*2*dk] with the given keys through peer_route_ref.
PeerRouting route(const PeerConfig& config, const std::vector<float>& q,
                  const std::vector<float>& keys, int64_t tokens) {
  Layer layer = random_layer(config, DType::kF32, 1);
  TROVE_CHECK(keys.size() == layer.keys.size());
  layer.keys = keys;
  PeerRouting routing;
  peer_route_ref(layer.config, layer.router(), q.data(), tokens, &routing);
  return routing;
}

// Every (token, head) of `routing` equals the brute force over the k'^2 candidate pairs: ids
// exactly, scores to fp32 rounding.
void expect_routing_matches_brute_force(const PeerConfig& config, const std::vector<float>& q,
                                        const std::vector<float>& keys, int64_t tokens,
                                        const PeerRouting& routing) {
  const PeerConfig c = validated(config);
  ASSERT_EQ(routing.tokens, tokens);
  ASSERT_EQ(routing.heads, c.heads);
  ASSERT_EQ(routing.topk, c.topk);
  ASSERT_EQ(routing.slots(), static_cast<size_t>(tokens * c.heads * c.topk));
  for (int64_t t = 0; t < tokens; ++t) {
    const float* qt = &q[static_cast<size_t>(t * c.query_rows())];
    for (int64_t head = 0; head < c.heads; ++head) {
      const Selection want = brute_force_select(sub_scores(c, qt, keys.data(), head, 0),
                                                sub_scores(c, qt, keys.data(), head, 1), c.n_keys,
                                                c.topk_per_half, c.topk);
      for (int64_t s = 0; s < c.topk; ++s) {
        const size_t slot = static_cast<size_t>((t * c.heads + head) * c.topk + s);
        EXPECT_EQ(routing.ids[slot], want.ids[static_cast<size_t>(s)])
            << "token " << t << " head " << head << " slot " << s;
        EXPECT_NEAR(routing.scores[slot], want.scores[static_cast<size_t>(s)],
                    1e-6 * (1.0 + std::abs(want.scores[static_cast<size_t>(s)])))
            << "token " << t << " head " << head << " slot " << s;
      }
    }
  }
}

PeerConfig routing_config(int64_t n, int64_t k_half, int64_t k, bool shared_keys) {
  PeerConfig c = small_config(Activation::kSilu, Gate::kSoftmax);
  c.heads = 3;
  c.n_keys = n;
  c.dim_key = 4;
  c.topk_per_half = k_half;
  c.topk = k;
  c.shared_keys = shared_keys;
  return validated(c);
}

TEST(PeerRefRoute, EqualsBruteForceOverTheCandidatePairs) {
  std::mt19937 rng(7);
  for (const PeerConfig& c : {routing_config(7, 3, 5, false), routing_config(7, 3, 5, true),
                              routing_config(6, 4, 4, false), routing_config(9, 2, 4, false)}) {
    const int64_t T = 5;
    const std::vector<float> q = normal_values(static_cast<size_t>(T * c.query_rows()), 1.0, &rng);
    const std::vector<float> keys =
        normal_values(static_cast<size_t>(c.key_heads() * 2 * c.n_keys * c.dim_key), 1.0, &rng);
    const PeerRouting routing = route(c, q, keys, T);
    expect_routing_matches_brute_force(c, q, keys, T, routing);
  }
}

// Small integers make every score exact in fp32 and double and give ties everywhere: within a
// half (ties: lower sub-index) and among the k'^2 sums (ties: lower expert id).
TEST(PeerRefRoute, TiesGoToTheLowerIdWithExactIntegerScores) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> small(-1, 1);
  for (int trial = 0; trial < 20; ++trial) {
    const PeerConfig c = routing_config(6, 4, 7, trial % 2 == 1);
    const int64_t T = 4;
    std::vector<float> q(static_cast<size_t>(T * c.query_rows()));
    std::vector<float> keys(static_cast<size_t>(c.key_heads() * 2 * c.n_keys * c.dim_key));
    for (float& v : q) v = static_cast<float>(small(rng));
    for (float& v : keys) v = static_cast<float>(small(rng));
    const PeerRouting routing = route(c, q, keys, T);
    expect_routing_matches_brute_force(c, q, keys, T, routing);
  }
}

// All sub-scores equal: each half keeps sub-keys 0..k'-1, and among the k'^2 equal sums the
// lowest ids i*n + j win: with n = 5, k' = 3, k = 4 that is 0, 1, 2 and then 5 (i = 1, j = 0),
// not 3 (j = 3 is not a candidate).
TEST(PeerRefRoute, EqualKeysSelectTheLowestIdsAmongTheCandidates) {
  const PeerConfig c = validated(small_config(Activation::kSilu, Gate::kSoftmax));
  const int64_t T = 2;
  std::mt19937 rng(3);
  const std::vector<float> q = normal_values(static_cast<size_t>(T * c.query_rows()), 1.0, &rng);
  const std::vector<float> keys(static_cast<size_t>(c.key_heads() * 2 * c.n_keys * c.dim_key),
                                0.5f);
  const PeerRouting routing = route(c, q, keys, T);
  for (int64_t th = 0; th < T * c.heads; ++th) {
    const std::vector<int64_t> ids(routing.ids.begin() + th * c.topk,
                                   routing.ids.begin() + (th + 1) * c.topk);
    EXPECT_EQ(ids, (std::vector<int64_t>{0, 1, 2, 5})) << "token/head " << th;
  }
}

// n = 4, dk = 1, q = 1: s0 = [1, 3, 1, 0] keeps sub-key 1 and then 0 of the tied 0 and 2
// (k' = 2); s1 = [2, 2, 2, 2] keeps 0 and 1. Pairs: (1,0) = (1,1) = 5, (0,0) = (0,1) = 3, so
// ids 4, 5, 0, 1 in that order. Had the tie kept sub-key 2, id 8 would appear.
TEST(PeerRefRoute, TieAtThePerHalfBoundaryKeepsTheLowerSubIndex) {
  PeerConfig c = small_config(Activation::kSilu, Gate::kSoftmax);
  c.heads = 1;
  c.n_keys = 4;
  c.dim_key = 1;
  c.topk_per_half = 2;
  c.topk = 4;
  c = validated(c);
  const std::vector<float> q = {1.0f, 1.0f};
  const std::vector<float> keys = {1, 3, 1, 0, 2, 2, 2, 2};
  const PeerRouting routing = route(c, q, keys, 1);
  EXPECT_EQ(routing.ids, (std::vector<int64_t>{4, 5, 0, 1}));
  EXPECT_EQ(routing.scores, (std::vector<float>{5, 5, 3, 3}));
}

// The k'^2 candidates, not all n^2 pairs, compete: s0 = [10, 9, 8.5], s1 = [10, 0, -10] with
// k' = 2 keep sub-keys {0, 1} of each half, so (2, 0) = 18.5 (id 6), the third best pair
// overall, is not a candidate and the top 4 are (0,0) = 20, (1,0) = 19, (0,1) = 10, (1,1) = 9.
TEST(PeerRefRoute, SelectsOnlyAmongTheTopSubKeysOfEachHalf) {
  PeerConfig c = small_config(Activation::kSilu, Gate::kSoftmax);
  c.heads = 1;
  c.n_keys = 3;
  c.dim_key = 1;
  c.topk_per_half = 2;
  c.topk = 4;
  c = validated(c);
  const std::vector<float> q = {1.0f, 1.0f};
  const std::vector<float> keys = {10, 9, 8.5f, 10, 0, -10};
  const PeerRouting routing = route(c, q, keys, 1);
  EXPECT_EQ(routing.ids, (std::vector<int64_t>{0, 3, 1, 4}));
  EXPECT_EQ(routing.scores, (std::vector<float>{20, 19, 10, 9}));
}

// N = 1: the only expert is selected by every head of every token, with softmax gate 1.
TEST(PeerRefRoute, SingleExpertIsAlwaysSelected) {
  PeerConfig c = small_config(Activation::kSilu, Gate::kSoftmax);
  c.n_keys = 1;
  c.topk = 1;
  c.topk_per_half = 1;
  c = validated(c);
  const int64_t T = 3;
  std::mt19937 rng(5);
  const std::vector<float> q = normal_values(static_cast<size_t>(T * c.query_rows()), 1.0, &rng);
  const std::vector<float> keys =
      normal_values(static_cast<size_t>(c.key_heads() * 2 * c.dim_key), 1.0, &rng);
  const PeerRouting routing = route(c, q, keys, T);
  EXPECT_EQ(routing.ids, std::vector<int64_t>(static_cast<size_t>(T * c.heads), 0));
  EXPECT_EQ(routing.gates, std::vector<float>(static_cast<size_t>(T * c.heads), 1.0f));
  expect_routing_matches_brute_force(c, q, keys, T, routing);
}

// k = n^2 (k' = n): every expert once per head, scores non-increasing.
TEST(PeerRefRoute, TopkOfAllExpertsIsAPermutationByDescendingScore) {
  const PeerConfig c = routing_config(3, 3, 9, false);
  const int64_t T = 2;
  std::mt19937 rng(9);
  const std::vector<float> q = normal_values(static_cast<size_t>(T * c.query_rows()), 1.0, &rng);
  const std::vector<float> keys =
      normal_values(static_cast<size_t>(c.key_heads() * 2 * c.n_keys * c.dim_key), 1.0, &rng);
  const PeerRouting routing = route(c, q, keys, T);
  for (int64_t th = 0; th < T * c.heads; ++th) {
    std::vector<int64_t> ids(routing.ids.begin() + th * c.topk,
                             routing.ids.begin() + (th + 1) * c.topk);
    for (int64_t s = 1; s < c.topk; ++s) {
      EXPECT_GE(routing.scores[static_cast<size_t>(th * c.topk + s - 1)],
                routing.scores[static_cast<size_t>(th * c.topk + s)]);
    }
    std::sort(ids.begin(), ids.end());
    EXPECT_EQ(ids, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8})) << "token/head " << th;
  }
  expect_routing_matches_brute_force(c, q, keys, T, routing);
}

// ---- 3. gates
// ------------------------------------------------------------------------------------

// Routes random q (scaled by q_scale) through `gate` and checks every gate against its formula
// on the routing's own scores.
void expect_gates_follow_formula(Gate gate, double q_scale) {
  const PeerConfig c = validated(small_config(Activation::kSilu, gate));
  const int64_t T = 4;
  std::mt19937 rng(21);
  const std::vector<float> q =
      normal_values(static_cast<size_t>(T * c.query_rows()), q_scale, &rng);
  const std::vector<float> keys =
      normal_values(static_cast<size_t>(c.key_heads() * 2 * c.n_keys * c.dim_key), 1.0, &rng);
  const PeerRouting routing = route(c, q, keys, T);
  bool saw_negative = false;
  for (int64_t th = 0; th < T * c.heads; ++th) {
    const auto first = static_cast<size_t>(th * c.topk);
    const std::vector<double> scores(
        routing.scores.begin() + static_cast<ptrdiff_t>(first),
        routing.scores.begin() + static_cast<ptrdiff_t>(first + c.topk));
    const std::vector<double> want = gate_formula(gate, scores);
    double sum = 0;
    for (size_t s = 0; s < want.size(); ++s) {
      const float got = routing.gates[first + s];
      ASSERT_TRUE(std::isfinite(got)) << "token/head " << th << " slot " << s;
      EXPECT_NEAR(got, want[s], 1e-6 * (1.0 + std::abs(want[s])))
          << "score " << scores[s] << ", token/head " << th << " slot " << s;
      sum += got;
      saw_negative |= scores[s] < 0;
    }
    if (gate == Gate::kSoftmax) {
      EXPECT_NEAR(sum, 1.0, 1e-6) << "token/head " << th;
    }
  }
  // The relu case is only a test of the clamp if some selected score is negative.
  if (gate == Gate::kRelu) {
    EXPECT_TRUE(saw_negative);
  }
}

TEST(PeerRefGates, SoftmaxSumsToOnePerHead) {
  expect_gates_follow_formula(Gate::kSoftmax, 1.0);
}

// Scores of magnitude ~1e3 overflow exp() unless the maximum is subtracted first.
TEST(PeerRefGates, SoftmaxIsStableForLargeScores) {
  expect_gates_follow_formula(Gate::kSoftmax, 500.0);
}

TEST(PeerRefGates, ReluIsTheScoreClampedAtZero) {
  // Scale q down so that some selected scores (best of k'^2 sums) are still negative.
  expect_gates_follow_formula(Gate::kRelu, 0.3);
}

TEST(PeerRefGates, SigmoidIsTheLogisticOfTheScore) {
  expect_gates_follow_formula(Gate::kSigmoid, 1.0);
}

// ---- 4. forward against naive math on the decoded tables
// -----------------------------------------

class PeerRefForward : public ::testing::TestWithParam<DType> {};

// D = 37 and D_out = 29 are not multiples of 32: int8/int4 rows carry padded groups.
TEST_P(PeerRefForward, MatchesNaiveMathOnTheDequantizedTable) {
  const DType dtype = GetParam();
  uint32_t seed = 300;
  for (Activation a :
       {Activation::kRelu, Activation::kGelu, Activation::kGeluTanh, Activation::kSilu}) {
    for (Gate g : {Gate::kSoftmax, Gate::kRelu, Gate::kSigmoid}) {
      SCOPED_TRACE(std::string(activation_name(a)) + " " + std::string(gate_name(g)));
      PeerConfig c;
      c.dim = 37;
      c.dim_out = 29;
      c.heads = 3;
      c.n_keys = 7;
      c.dim_key = 4;
      c.topk = 5;
      c.topk_per_half = 3;
      c.activation = a;
      c.gate = g;
      c.input_norm = seed % 2 == 0 ? InputNorm::kRms : InputNorm::kNone;
      c.query_bias = seed % 3 == 0;
      c.shared_keys = seed % 4 == 1;
      const Layer layer = random_layer(c, dtype, seed++);
      const int64_t T = 4;
      std::mt19937 rng(seed + 1000);
      const std::vector<float> x = normal_values(static_cast<size_t>(T * c.dim), 1.0, &rng);

      const Forward f = run_forward(layer, x, T);
      const NaiveForward want = naive_forward(layer, decoded_rows(dtype, layer.down, c.dim),
                                              decoded_rows(dtype, layer.up, c.dim_out), x, T);
      ASSERT_EQ(f.routing.ids, want.ids);
      double scale = 1.0;
      for (double v : want.y) scale = std::max(scale, std::abs(v));
      // The oracle stores xhat, q, scores and gates in fp32 (relative 6e-8 each, amplified by
      // O(1) condition numbers here); 1e-5 of the output scale leaves room for that but not
      // for a misread scale, nibble or padding element.
      for (size_t i = 0; i < want.y.size(); ++i) {
        EXPECT_NEAR(f.y[i], want.y[i], 1e-5 * scale) << "y[" << i << "]";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(RecordDTypes, PeerRefForward,
                         ::testing::Values(DType::kF32, DType::kBF16, DType::kF16, DType::kI8,
                                           DType::kI4),
                         [](const ::testing::TestParamInfo<DType>& p) {
                           return std::string(dtype_name(p.param));
                         });

// ---- 5. rms norm
// ---------------------------------------------------------------------------------

void expect_rms_norm(float eps, double x_scale) {
  PeerConfig c = small_config(Activation::kSilu, Gate::kSoftmax);
  c.dim = 37;
  c.input_norm = InputNorm::kRms;
  c.norm_eps = eps;
  c = validated(c);
  const int64_t T = 5;
  std::mt19937 rng(31);
  const std::vector<float> x = normal_values(static_cast<size_t>(T * c.dim), x_scale, &rng);
  std::vector<float> gamma = normal_values(static_cast<size_t>(c.dim), 0.3, &rng);
  for (float& g : gamma) g += 1.0f;
  std::vector<float> xhat(x.size());
  peer_norm_ref(c, gamma.data(), x.data(), T, xhat.data());
  for (int64_t t = 0; t < T; ++t) {
    double ms = 0;
    for (int64_t d = 0; d < c.dim; ++d) {
      const double v = x[static_cast<size_t>(t * c.dim + d)];
      ms += v * v;
    }
    const double inv = 1.0 / std::sqrt(ms / static_cast<double>(c.dim) + eps);
    for (int64_t d = 0; d < c.dim; ++d) {
      const size_t i = static_cast<size_t>(t * c.dim + d);
      const double want = x[i] * inv * gamma[static_cast<size_t>(d)];
      EXPECT_NEAR(xhat[i], want, 1e-6 * std::abs(want) + 1e-30) << "token " << t << " d " << d;
    }
  }
}

TEST(PeerRefNorm, RmsDividesByTheRootMeanSquareAndScalesByGamma) {
  expect_rms_norm(1e-6f, 1.0);
}

// With |x| ~ 1e-2 the mean square (~1e-4) is comparable to eps = 1e-4: eps must be inside
// the square root, added to the mean (not to the sum).
TEST(PeerRefNorm, RmsAddsTheConfiguredEpsToTheMeanSquare) {
  expect_rms_norm(1e-4f, 1e-2);
}

TEST(PeerRefNorm, NoneIsTheIdentity) {
  const PeerConfig c = validated(small_config(Activation::kSilu, Gate::kSoftmax));
  std::mt19937 rng(33);
  const std::vector<float> x = normal_values(static_cast<size_t>(3 * c.dim), 1.0, &rng);
  std::vector<float> xhat(x.size());
  peer_norm_ref(c, nullptr, x.data(), 3, xhat.data());
  EXPECT_EQ(xhat, x);
}

// ---- 6. empty batch
// ------------------------------------------------------------------------------

TEST(PeerRefEmptyBatch, EveryStepAcceptsZeroTokens) {
  PeerConfig c = small_config(Activation::kSilu, Gate::kSoftmax);
  c.input_norm = InputNorm::kRms;
  c.query_bias = true;
  const Layer layer = random_layer(c, DType::kI4, 41);
  const std::vector<float> x;
  const std::vector<float> dy;
  const Forward f = run_forward(layer, x, 0);
  EXPECT_EQ(f.routing.tokens, 0);
  EXPECT_EQ(f.routing.slots(), 0u);
  EXPECT_TRUE(f.routing.scores.empty());
  EXPECT_TRUE(f.routing.gates.empty());

  PeerGrads grads;
  peer_backward_ref(layer.config, layer.router(), layer.layout, x.data(), 0, f.routing, nullptr,
                    dy.data(), &grads);
  EXPECT_TRUE(grads.dx.empty());
  EXPECT_TRUE(grads.expert_ids.empty());
  EXPECT_TRUE(grads.d_down.empty());
  EXPECT_TRUE(grads.d_up.empty());
  // The dense router gradients keep their shapes, all zero.
  EXPECT_EQ(grads.d_query_weight, std::vector<float>(layer.query_weight.size(), 0.0f));
  EXPECT_EQ(grads.d_query_bias, std::vector<float>(layer.query_bias.size(), 0.0f));
  EXPECT_EQ(grads.d_keys, std::vector<float>(layer.keys.size(), 0.0f));
  EXPECT_EQ(grads.d_norm_weight, std::vector<float>(layer.norm_weight.size(), 0.0f));
}

}  // namespace
}  // namespace trove
