// Helpers the PEER kernel tests share (tests/peer_ref_test.cc, tests/peer_parity_test.cc,
// tests/cuda_peer_test.cc, tests/cuda_peer_backward_test.cc): random layers packed as records, the
// oracle forward, and the comparisons with written-down tolerances (faiss compareIndices style for
// routing).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "base/check.h"
#include "base/numeric.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/ref/peer_ref.h"
#include "kernels/peer.h"
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

// Uniform with the given standard deviation: ~10x cheaper than normal_values, for the expert
// tables (n = 128 gives 16384 experts).
inline std::vector<float> uniform_values(size_t n, double stddev, std::mt19937* rng) {
  const double half_width = std::sqrt(3.0) * stddev;
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(((*rng)() * 0x1p-32 * 2.0 - 1.0) * half_width);
  return v;
}

// One parity case: the config, the record dtype and the batch size.
struct PeerShape {
  int64_t tokens;
  PeerConfig config;
  DType dtype;
};

inline std::string describe(const PeerShape& s) {
  const PeerConfig& c = s.config;
  std::ostringstream o;
  o << "T=" << s.tokens << " D=" << c.dim << " Dout=" << c.dim_out << " h=" << c.heads
    << " n=" << c.n_keys << " dk=" << c.dim_key << " k=" << c.topk << " k'=" << c.topk_per_half
    << (c.shared_keys ? " shared" : "") << " " << activation_name(c.activation) << " "
    << gate_name(c.gate) << " " << dtype_name(s.dtype) << (c.query_bias ? " bias" : "")
    << (c.input_norm == InputNorm::kRms ? " rms" : "");
  return o.str();
}

// A layer's fp32 parameters, its expert table packed as records, and an input batch.
struct PeerLayer {
  PeerConfig config;
  RecordLayout layout;
  int64_t tokens = 0;
  std::vector<float> query_weight, query_bias, keys, norm_weight, down, up;
  std::vector<uint8_t> table;
  std::vector<float> x, dy;

  PeerRouterParams router() const {
    PeerRouterParams p;
    p.query_weight = query_weight.data();
    p.query_bias = config.query_bias ? query_bias.data() : nullptr;
    p.keys = keys.data();
    p.norm_weight = config.input_norm == InputNorm::kRms ? norm_weight.data() : nullptr;
    return p;
  }
  std::vector<const uint8_t*> slot_records(const PeerRouting& routing) const {
    std::vector<const uint8_t*> records(routing.slots());
    for (size_t s = 0; s < records.size(); ++s) {
      records[s] = table.data() + sz(routing.ids[s]) * layout.stride;
    }
    return records;
  }
};

// Scales keep every stage O(1): q ~ N(0, 1), z = <u, xhat> ~ N(0, 1), v ~ N(0, 1).
inline PeerLayer random_layer(const PeerShape& shape, uint32_t seed) {
  PeerLayer l;
  l.config = shape.config;
  const Status st = l.config.validate_and_fill();
  TROVE_CHECK_MSG(st.ok(), "%s", st.to_string().c_str());
  const PeerConfig& c = l.config;
  l.layout = layout_of(shape.dtype, c.dim, c.dim_out);
  l.tokens = shape.tokens;
  std::mt19937 rng(seed);
  const double row_scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  const size_t experts = sz(c.num_experts());
  l.query_weight = normal_values(sz(c.query_rows() * c.dim), row_scale, &rng);
  l.query_bias = normal_values(sz(c.query_rows()), 0.5, &rng);
  l.keys = normal_values(sz(c.key_heads() * 2 * c.n_keys * c.dim_key), 1.0, &rng);
  l.norm_weight = normal_values(sz(c.dim), 0.3, &rng);
  for (float& g : l.norm_weight) g += 1.0f;
  l.down = uniform_values(experts * sz(c.dim), row_scale, &rng);
  l.up = uniform_values(experts * sz(c.dim_out), 1.0, &rng);
  l.table.assign(experts * l.layout.stride, 0);
  pack_records(l.layout, l.down.data(), l.up.data(), c.num_experts(), l.table.data());
  l.x = normal_values(sz(shape.tokens * c.dim), 1.0, &rng);
  l.dy = normal_values(sz(shape.tokens * c.dim_out), 1.0, &rng);
  return l;
}

// ---- comparisons -------------------------------------------------------------------------------

// |got - want| <= abs_tol * max|want| + rel_tol * |want| for every element; reports the worst.
inline void expect_close(const std::vector<float>& got, const std::vector<float>& want,
                         double abs_tol, double rel_tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (float w : want) scale = std::max(scale, std::abs(static_cast<double>(w)));
  size_t bad = 0, worst = 0;
  double worst_excess = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    const double tol = abs_tol * scale + rel_tol * std::abs(static_cast<double>(want[i]));
    if (!(err <= tol)) {
      if (bad == 0 || err - tol > worst_excess) {
        worst = i;
        worst_excess = err - tol;
      }
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << want.size()
                     << " elements out of tolerance; worst at " << worst << ": got "
                     << (bad ? got[worst] : 0.0f) << " want " << (bad ? want[worst] : 0.0f)
                     << " (array max " << scale << ")";
}

// Tolerances of expect_routing_close, relative to the largest |score| of each (token, head).
struct RoutingTolerance {
  double score_abs = 0;  // times that largest |score|
  double score_rel = 0;  // times the element's own |score|
  double gate_abs = 0;   // times that largest |score|
};

// faiss compareIndices style, per (token, head): scores equal position by position within
// tolerance; an id both sides selected has the same score on both; an id only one side
// selected sits at a tie with the k-th score (a swap at the boundary). Gates position by
// position (they are functions of the positional scores).
inline void expect_routing_close(const PeerRouting& got, const PeerRouting& want,
                                 const RoutingTolerance& tolerance, const std::string& what) {
  ASSERT_EQ(got.tokens, want.tokens) << what;
  ASSERT_EQ(got.heads, want.heads) << what;
  ASSERT_EQ(got.topk, want.topk) << what;
  const int64_t k = want.topk;
  int reported = 0;
  for (int64_t row = 0; row < want.tokens * want.heads && reported < 5; ++row) {
    const size_t base = sz(row * k);
    double scale = 1.0;
    for (int64_t s = 0; s < k; ++s)
      scale = std::max(scale, std::abs(double{want.scores[base + s]}));
    const double tol = tolerance.score_abs * scale;
    std::ostringstream fail;
    for (int64_t s = 0; s < k; ++s) {
      const double ds = std::abs(double{got.scores[base + s]} - want.scores[base + s]);
      if (ds > tol + tolerance.score_rel * std::abs(double{want.scores[base + s]})) {
        fail << " score[" << s << "] " << got.scores[base + s] << " vs " << want.scores[base + s];
      }
      if (std::abs(double{got.gates[base + s]} - want.gates[base + s]) >
          tolerance.gate_abs * scale) {
        fail << " gate[" << s << "] " << got.gates[base + s] << " vs " << want.gates[base + s];
      }
      // The same id on both sides must have the same score; an id selected by one side only
      // must tie with the k-th score.
      const int64_t id = got.ids[base + s];
      const auto* begin = &want.ids[base];
      const auto* at = std::find(begin, begin + k, id);
      const double kth = want.scores[base + sz(k - 1)];
      if (at != begin + k) {
        if (std::abs(double{want.scores[base + sz(at - begin)]} - got.scores[base + s]) > tol) {
          fail << " id " << id << " scored " << got.scores[base + s] << " vs "
               << want.scores[base + sz(at - begin)];
        }
      } else if (std::abs(double{got.scores[base + s]} - kth) > tol) {
        fail << " id " << id << " (score " << got.scores[base + s]
             << ") selected by the tested path only, not a tie with the k-th score " << kth;
      }
      const int64_t want_id = want.ids[base + s];
      const auto* got_begin = &got.ids[base];
      if (std::find(got_begin, got_begin + k, want_id) == got_begin + k &&
          std::abs(double{want.scores[base + s]} - kth) > tol) {
        fail << " id " << want_id << " (score " << want.scores[base + s]
             << ") missed by the tested path, not a tie with the k-th score " << kth;
      }
      if (std::set<int64_t>(got_begin, got_begin + k).size() != sz(k)) fail << " duplicate ids";
    }
    if (!fail.str().empty()) {
      ADD_FAILURE() << what << ": token " << row / want.heads << " head " << row % want.heads
                    << fail.str();
      ++reported;
    }
  }
}

inline void expect_bits_equal(const std::vector<float>& a, const std::vector<float>& b,
                              const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << what;
}

// The oracle forward, whose intermediates feed the tested implementation step by step.
struct RefForward {
  std::vector<float> xhat, q, y;
  PeerRouting routing;
};

inline RefForward ref_forward(const PeerLayer& l) {
  const PeerConfig& c = l.config;
  const PeerRouterParams p = l.router();
  RefForward f;
  f.xhat.resize(sz(l.tokens * c.dim));
  f.q.resize(sz(l.tokens * c.query_rows()));
  f.y.resize(sz(l.tokens * c.dim_out));
  peer_norm_ref(c, p.norm_weight, l.x.data(), l.tokens, f.xhat.data());
  peer_query_ref(c, p, f.xhat.data(), l.tokens, f.q.data());
  peer_route_ref(c, p, f.q.data(), l.tokens, &f.routing);
  const std::vector<const uint8_t*> records = l.slot_records(f.routing);
  peer_experts_ref(c, l.layout, f.xhat.data(), f.routing, records.data(), f.y.data());
  return f;
}

inline PeerConfig make_config(int64_t dim, int64_t dim_out, int64_t heads, int64_t n, int64_t dk,
                              int64_t k, int64_t kp) {
  PeerConfig c;
  c.dim = dim;
  c.dim_out = dim_out;
  c.heads = heads;
  c.n_keys = n;
  c.dim_key = dk;
  c.topk = k;
  c.topk_per_half = kp;
  return c;
}

// The parity tests' large cases: 1000 tokens (rms norm, silu, relu gate) ...
inline PeerConfig many_tokens_config() {
  PeerConfig c = make_config(24, 40, 4, 9, 8, 5, 3);
  c.input_norm = InputNorm::kRms;
  c.activation = Activation::kSilu;
  c.gate = Gate::kRelu;
  return c;
}
// ... and D = 2048 as in the background documents (h = 4, silu, softmax gate, query bias).
inline PeerConfig background_width_config() {
  PeerConfig c = make_config(2048, 2048, 4, 6, 16, 8, 4);
  c.activation = Activation::kSilu;
  c.gate = Gate::kSoftmax;
  c.query_bias = true;
  return c;
}

inline constexpr DType kAllDTypes[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kI8,
                                       DType::kI4};
inline constexpr Activation kAllActivations[] = {Activation::kRelu, Activation::kGelu,
                                                 Activation::kGeluTanh, Activation::kSilu};
inline constexpr Gate kAllGates[] = {Gate::kSoftmax, Gate::kRelu, Gate::kSigmoid};

// The parity sweep: activations x gates x dtypes, each once (60 shapes), the other settings
// cycled so that every token count, D, n, h, key sharing, bias and norm setting meets many of
// them. n = 1: N = 1, k = 1; n = 3: k = n^2 = N; k' < k throughout where k > 1. Calls
// check(shape, seed) with seeds 100, 101, ...; the caller trims the n = 128 shapes (16384
// experts) to what its path can afford.
template <typename Check>
void for_each_sweep_shape(const int64_t (&token_counts)[5], const int64_t (&dims)[4][2],
                          Check check) {
  struct Router {
    int64_t n, k, kp, dk;
  };
  const Router routers[] = {
      {1, 1, 1, 5}, {3, 9, 3, 6}, {3, 4, 2, 4}, {11, 6, 3, 7}, {128, 8, 4, 12}};
  int i = 0;
  for (Activation a : kAllActivations) {
    for (Gate g : kAllGates) {
      for (DType t : kAllDTypes) {
        const Router& r = routers[(i + i / 5) % 5];  // every router meets every dtype
        const int64_t* d = dims[(i / 5) % 4];
        PeerConfig c = make_config(d[0], d[1], (i / 2) % 2 == 0 ? 4 : 1, r.n, r.dk, r.k, r.kp);
        c.activation = a;
        c.gate = g;
        c.shared_keys = (i / 3) % 2 == 1;
        c.query_bias = i % 2 == 0;
        c.input_norm = (i / 7) % 2 == 0 ? InputNorm::kRms : InputNorm::kNone;
        check(PeerShape{token_counts[(i / 4) % 5], c, t}, 100 + static_cast<uint32_t>(i));
        ++i;
      }
    }
  }
}

}  // namespace trove::testing
