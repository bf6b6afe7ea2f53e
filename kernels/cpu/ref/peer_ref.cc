// Plain, one-token-at-a-time PEER math. Every reduction accumulates in double and is rounded
// to fp32 once, where it is stored; nothing here is tuned. See kernels/peer.h for the math.
#include "kernels/cpu/ref/peer_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <vector>

#include "base/check.h"
#include "base/half.h"
#include "kernels/cpu/ref/quant_ref.h"

namespace trove {

namespace {

void check_common(const PeerConfig& c, const RecordLayout* layout) {
  TROVE_CHECK(c.dim > 0 && c.dim_out > 0 && c.n_keys > 0 && c.topk > 0 && c.topk_per_half > 0);
  TROVE_CHECK(c.topk_per_half <= c.n_keys && c.topk <= c.topk_per_half * c.topk_per_half);
  TROVE_CHECK(c.expert_width == 1);
  if (layout != nullptr) {
    TROVE_CHECK(layout->dim == c.dim && layout->dim_out == c.dim_out && layout->width == 1);
  }
}

// x as the router's products read it: itself, or rounded to bf16.
double operand(float x, RoutingPrecision precision) {
  return precision == RoutingPrecision::kBf16 ? bf16_to_fp32(fp32_to_bf16(x)) : x;
}

// A row as RoutingPrecision::kInt8 quantizes it (kernels/peer.h's rule, written out plainly).
struct QuantizedRow {
  std::vector<int64_t> codes;
  float scale = 0.0f;
};

QuantizedRow quantize_routing_row_ref(const float* v, int64_t n, int levels) {
  QuantizedRow row;
  row.codes.assign(static_cast<size_t>(n), 0);
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(v[i])) {
      row.scale = std::numeric_limits<float>::quiet_NaN();
      return row;
    }
    amax = std::max(amax, std::fabs(v[i]));
  }
  const float lv = static_cast<float>(levels);
  const float inv = lv / amax;
  if (amax == 0.0f || !std::isfinite(inv)) return row;
  for (int64_t i = 0; i < n; ++i) {
    const float code = std::min(std::max(std::nearbyint(v[i] * inv), -lv), lv);
    row.codes[static_cast<size_t>(i)] = static_cast<int64_t>(code);
  }
  row.scale = amax / lv;
  return row;
}

// The exact integer product of two quantized rows, scaled as kernels/peer.h says.
float int8_product(const QuantizedRow& activation, const QuantizedRow& weight) {
  int64_t acc = 0;
  for (size_t i = 0; i < activation.codes.size(); ++i) acc += activation.codes[i] * weight.codes[i];
  float out = static_cast<float>(acc);
  out = out * activation.scale;
  out = out * weight.scale;
  return out;
}

// Sub-key scores s_c[i] = <q[head][c], K[hk][c][i]> of one token and head.
std::vector<float> sub_scores(const PeerConfig& c, const PeerRouterParams& p, const float* q_token,
                              int64_t head, int half, RoutingPrecision precision) {
  const int64_t hk = c.shared_keys ? 0 : head;
  const float* qh = q_token + (head * 2 + half) * c.dim_key;
  std::vector<float> s(static_cast<size_t>(c.n_keys));
  if (precision == RoutingPrecision::kInt8) {
    const QuantizedRow qq = quantize_routing_row_ref(qh, c.dim_key, kRoutingActivationLevels);
    for (int64_t i = 0; i < c.n_keys; ++i) {
      const float* key = p.keys + ((hk * 2 + half) * c.n_keys + i) * c.dim_key;
      s[static_cast<size_t>(i)] =
          int8_product(qq, quantize_routing_row_ref(key, c.dim_key, kRoutingWeightLevels));
    }
    return s;
  }
  for (int64_t i = 0; i < c.n_keys; ++i) {
    const float* key = p.keys + ((hk * 2 + half) * c.n_keys + i) * c.dim_key;
    double acc = 0;
    for (int64_t j = 0; j < c.dim_key; ++j) {
      acc += operand(qh[j], precision) * operand(key[j], precision);
    }
    s[static_cast<size_t>(i)] = static_cast<float>(acc);
  }
  return s;
}

// The expert's down row u and up row v as fp32.
void decode_record(const RecordLayout& layout, const uint8_t* record, std::vector<float>* u,
                   std::vector<float>* v) {
  u->resize(static_cast<size_t>(layout.dim));
  v->resize(static_cast<size_t>(layout.dim_out));
  unpack_record_ref(layout, record, u->data(), v->data());
}

double dot(const float* a, const float* b, int64_t n) {
  double acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(a[i]) * b[i];
  return acc;
}

}  // namespace

void peer_norm_ref(const PeerConfig& config, const float* norm_weight, const float* x, int64_t T,
                   float* xhat) {
  check_common(config, nullptr);
  const int64_t D = config.dim;
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * D;
    float* out = xhat + t * D;
    if (config.input_norm == InputNorm::kNone) {
      std::copy(xt, xt + D, out);
      continue;
    }
    TROVE_CHECK(norm_weight != nullptr);
    const double r = 1.0 / std::sqrt(dot(xt, xt, D) / static_cast<double>(D) + config.norm_eps);
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(xt[d] * r * norm_weight[d]);
  }
}

void peer_query_ref(const PeerConfig& config, const PeerRouterParams& params, const float* xhat,
                    int64_t T, float* q, RoutingPrecision precision) {
  check_common(config, nullptr);
  TROVE_CHECK((params.query_bias != nullptr) == config.query_bias);
  const int64_t rows = config.query_rows();
  if (precision == RoutingPrecision::kInt8) {
    std::vector<QuantizedRow> w;
    for (int64_t r = 0; r < rows; ++r) {
      w.push_back(quantize_routing_row_ref(params.query_weight + r * config.dim, config.dim,
                                           kRoutingWeightLevels));
    }
    for (int64_t t = 0; t < T; ++t) {
      const QuantizedRow xt =
          quantize_routing_row_ref(xhat + t * config.dim, config.dim, kRoutingActivationLevels);
      for (int64_t r = 0; r < rows; ++r) {
        float out = int8_product(xt, w[static_cast<size_t>(r)]);
        if (params.query_bias != nullptr) out = out + params.query_bias[r];
        q[t * rows + r] = out;
      }
    }
    return;
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* w = params.query_weight + r * config.dim;
      const float* xt = xhat + t * config.dim;
      double acc = 0;
      for (int64_t d = 0; d < config.dim; ++d) {
        acc += operand(w[d], precision) * operand(xt[d], precision);
      }
      if (params.query_bias != nullptr) acc += params.query_bias[r];
      q[t * rows + r] = static_cast<float>(acc);
    }
  }
}

void top_indices_ref(const float* s, int64_t n, int64_t kp, int64_t* out) {
  std::vector<int64_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return s[a] > s[b]; });
  std::copy(idx.begin(), idx.begin() + kp, out);
}

void merge_top_ref(const float* s0, const float* s1, const int64_t* top0, const int64_t* top1,
                   int64_t kp, int64_t n, int64_t k, int64_t* ids, float* scores) {
  struct Candidate {
    float score;
    int64_t id;
  };
  std::vector<Candidate> cand;
  for (int64_t a = 0; a < kp; ++a) {
    for (int64_t b = 0; b < kp; ++b) {
      cand.push_back({s0[top0[a]] + s1[top1[b]], top0[a] * n + top1[b]});
    }
  }
  std::sort(cand.begin(), cand.end(), [](const Candidate& x, const Candidate& y) {
    return x.score != y.score ? x.score > y.score : x.id < y.id;
  });
  for (int64_t r = 0; r < k; ++r) {
    ids[r] = cand[static_cast<size_t>(r)].id;
    scores[r] = cand[static_cast<size_t>(r)].score;
  }
}

void peer_route_ref(const PeerConfig& config, const PeerRouterParams& params, const float* q,
                    int64_t T, PeerRouting* routing, RoutingPrecision precision) {
  check_common(config, nullptr);
  const int64_t h = config.heads, k = config.topk, kp = config.topk_per_half, n = config.n_keys;
  routing->resize(T, h, k);
  for (int64_t t = 0; t < T; ++t) {
    const float* qt = q + t * config.query_rows();
    for (int64_t head = 0; head < h; ++head) {
      const std::vector<float> s0 = sub_scores(config, params, qt, head, 0, precision);
      const std::vector<float> s1 = sub_scores(config, params, qt, head, 1, precision);
      std::vector<int64_t> top0(static_cast<size_t>(kp)), top1(static_cast<size_t>(kp));
      top_indices_ref(s0.data(), n, kp, top0.data());
      top_indices_ref(s1.data(), n, kp, top1.data());
      const size_t base = static_cast<size_t>((t * h + head) * k);
      merge_top_ref(s0.data(), s1.data(), top0.data(), top1.data(), kp, n, k, &routing->ids[base],
                    &routing->scores[base]);
      gates_ref(config.gate, &routing->scores[base], k, &routing->gates[base]);
    }
  }
}

void peer_experts_ref(const PeerConfig& config, const RecordLayout& layout, const float* xhat,
                      const PeerRouting& routing, const uint8_t* const* records, float* y) {
  check_common(config, &layout);
  const int64_t D = config.dim, Dout = config.dim_out;
  const int64_t slots_per_token = routing.heads * routing.topk;
  std::vector<float> u, v;
  std::vector<double> acc(static_cast<size_t>(Dout));
  for (int64_t t = 0; t < routing.tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t s = 0; s < slots_per_token; ++s) {
      const size_t slot = static_cast<size_t>(t * slots_per_token + s);
      decode_record(layout, records[slot], &u, &v);
      const double z = dot(u.data(), xhat + t * D, D);
      const double ga = routing.gates[slot] * activation_ref(config.activation, z);
      for (int64_t d = 0; d < Dout; ++d) acc[d] += ga * v[d];
    }
    for (int64_t d = 0; d < Dout; ++d) y[t * Dout + d] = static_cast<float>(acc[d]);
  }
}

void peer_backward_ref(const PeerConfig& config, const PeerRouterParams& params,
                       const RecordLayout& layout, const float* x, int64_t T,
                       const PeerRouting& routing, const uint8_t* const* records, const float* dy,
                       PeerGrads* grads) {
  check_common(config, &layout);
  TROVE_CHECK(routing.tokens == T && routing.heads == config.heads && routing.topk == config.topk);
  const int64_t D = config.dim, Dout = config.dim_out, h = config.heads, k = config.topk;
  const int64_t n = config.n_keys, dk = config.dim_key, rows = config.query_rows();
  const bool rms = config.input_norm == InputNorm::kRms;

  // The forward intermediates, recomputed.
  std::vector<float> xhat(static_cast<size_t>(T * D)), q(static_cast<size_t>(T * rows));
  peer_norm_ref(config, params.norm_weight, x, T, xhat.data());
  peer_query_ref(config, params, xhat.data(), T, q.data());

  // Unique experts, ascending, and the row of each in d_down / d_up.
  std::vector<int64_t> ids(routing.ids);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  std::map<int64_t, size_t> row_of;
  for (size_t r = 0; r < ids.size(); ++r) row_of[ids[r]] = r;

  std::vector<double> d_down(ids.size() * D, 0.0), d_up(ids.size() * Dout, 0.0);
  std::vector<double> d_wq(static_cast<size_t>(rows * D), 0.0), d_bq(static_cast<size_t>(rows));
  std::vector<double> d_keys(static_cast<size_t>(config.key_heads() * 2 * n * dk), 0.0);
  std::vector<double> d_gamma(static_cast<size_t>(D), 0.0);
  grads->dx.assign(static_cast<size_t>(T * D), 0.0f);

  std::vector<float> u, v;
  std::vector<double> dxhat(static_cast<size_t>(D)), dq(static_cast<size_t>(rows));
  std::vector<double> dg(static_cast<size_t>(k)), ds(static_cast<size_t>(2 * n));
  for (int64_t t = 0; t < T; ++t) {
    const float* xh = &xhat[t * D];
    const float* qt = &q[t * rows];
    const float* dyt = dy + t * Dout;
    std::fill(dxhat.begin(), dxhat.end(), 0.0);
    std::fill(dq.begin(), dq.end(), 0.0);
    for (int64_t head = 0; head < h; ++head) {
      const size_t base = static_cast<size_t>((t * h + head) * k);
      // Experts: dv += g a dy; da = g <v, dy>; dg = a <v, dy>; dz = da act'(z); du += dz xhat;
      // dxhat += dz u.
      for (int64_t s = 0; s < k; ++s) {
        const int64_t e = routing.ids[base + s];
        const double g = routing.gates[base + s];
        decode_record(layout, records[base + s], &u, &v);
        const double z = dot(u.data(), xh, D);
        const double a = activation_ref(config.activation, z);
        const double v_dy = dot(v.data(), dyt, Dout);
        const double dz = g * v_dy * activation_grad_ref(config.activation, z);
        dg[s] = a * v_dy;
        const size_t r = row_of.at(e);
        for (int64_t d = 0; d < Dout; ++d) d_up[r * Dout + d] += g * a * dyt[d];
        for (int64_t d = 0; d < D; ++d) {
          d_down[r * D + d] += dz * xh[d];
          dxhat[d] += dz * u[d];
        }
      }
      // Gates -> scores -> sub-scores (score = s_0[i] + s_1[j], e = i*n + j).
      const float* scores = &routing.scores[base];
      const float* gates = &routing.gates[base];
      double g_dg = 0;
      for (int64_t s = 0; s < k; ++s) g_dg += gates[s] * dg[s];
      std::fill(ds.begin(), ds.end(), 0.0);
      for (int64_t s = 0; s < k; ++s) {
        double dscore = 0;
        switch (config.gate) {
          case Gate::kSoftmax:
            dscore = gates[s] * (dg[s] - g_dg);
            break;
          case Gate::kRelu:
            dscore = scores[s] > 0 ? dg[s] : 0.0;
            break;
          case Gate::kSigmoid:
            dscore = dg[s] * gates[s] * (1.0 - gates[s]);
            break;
        }
        const int64_t e = routing.ids[base + s];
        ds[e / n] += dscore;
        ds[n + e % n] += dscore;
      }
      // Sub-scores -> q and keys.
      const int64_t hk = config.shared_keys ? 0 : head;
      for (int half = 0; half < 2; ++half) {
        const float* qh = qt + (head * 2 + half) * dk;
        for (int64_t i = 0; i < n; ++i) {
          const double dsi = ds[half * n + i];
          if (dsi == 0.0) continue;
          const size_t key = static_cast<size_t>(((hk * 2 + half) * n + i) * dk);
          for (int64_t j = 0; j < dk; ++j) {
            dq[(head * 2 + half) * dk + j] += dsi * params.keys[key + j];
            d_keys[key + j] += dsi * qh[j];
          }
        }
      }
    }
    // q = W_q xhat + b.
    for (int64_t r = 0; r < rows; ++r) {
      d_bq[r] += dq[r];
      const float* w = params.query_weight + r * D;
      for (int64_t d = 0; d < D; ++d) {
        d_wq[r * D + d] += dq[r] * xh[d];
        dxhat[d] += dq[r] * w[d];
      }
    }
    // xhat = x r gamma, r = 1 / sqrt(mean(x^2) + eps):
    // dx = r (gamma dxhat) - x r^3 / D * sum(gamma dxhat x).
    float* dxt = &grads->dx[t * D];
    const float* xt = x + t * D;
    if (!rms) {
      for (int64_t d = 0; d < D; ++d) dxt[d] = static_cast<float>(dxhat[d]);
      continue;
    }
    const double r = 1.0 / std::sqrt(dot(xt, xt, D) / static_cast<double>(D) + config.norm_eps);
    double wx = 0;
    for (int64_t d = 0; d < D; ++d) {
      wx += params.norm_weight[d] * dxhat[d] * xt[d];
      d_gamma[d] += dxhat[d] * xt[d] * r;
    }
    for (int64_t d = 0; d < D; ++d) {
      dxt[d] = static_cast<float>(r * params.norm_weight[d] * dxhat[d] -
                                  xt[d] * r * r * r * wx / static_cast<double>(D));
    }
  }

  auto to_float = [](const std::vector<double>& in) {
    return std::vector<float>(in.begin(), in.end());
  };
  grads->expert_ids = ids;
  grads->d_down = to_float(d_down);
  grads->d_up = to_float(d_up);
  grads->d_query_weight = to_float(d_wq);
  grads->d_query_bias = config.query_bias ? to_float(d_bq) : std::vector<float>();
  grads->d_keys = to_float(d_keys);
  grads->d_norm_weight = rms ? to_float(d_gamma) : std::vector<float>();
}

}  // namespace trove
