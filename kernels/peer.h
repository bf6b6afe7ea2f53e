// The PEER layer's math on buffers (SPEC §2), shared by every backend: the router parameters,
// the routing a forward pass produces, the gradients a backward pass returns, and the scalar
// activation and gate functions. Kernels know nothing of files or tiers: expert records
// arrive as one pointer per (token, head, slot), handed out by the runtime's ExpertSource.
//
// Per token x (fp32, length D):
//   xhat = x, or x / sqrt(mean(x^2) + eps) * gamma          (input_norm rms)
//   q    = W_q xhat (+ b_q), viewed as [h][2][dk]
//   s_c[i] = <q[head][c], K[hk][c][i]>                       hk = 0 for shared keys, else head
//   top-k' of s_0 and of s_1 (ties: lower index), k'^2 candidates e = i*n + j with score
//   s_0[i] + s_1[j], final top-k by score (ties: lower expert id), best first. Scores are the
//   fp32 sub-scores added in fp32, and ties are ties of those fp32 values, so every backend
//   orders the same numbers the same way.
//   g = gate(scores of the head's k experts)                 softmax | relu | sigmoid
//   z_e = <u_e, xhat>, a_e = act(z_e), y = sum_heads sum_e g_e a_e v_e
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "base/host_device.h"
#include "kernels/peer_config.h"

namespace trove {

// Router parameters in the canonical arrangement, fp32, borrowed from the caller.
struct PeerRouterParams {
  const float* query_weight = nullptr;  // [h*2*dk, D], row (head*2 + half)*dk + j
  const float* query_bias = nullptr;    // [h*2*dk], or nullptr when !config.query_bias
  const float* keys = nullptr;          // [hk, 2, n, dk]
  const float* norm_weight = nullptr;   // [D] gamma, or nullptr when input_norm = none
};

// The routing of T tokens: per (token, head) the k selected experts, best first (score
// descending, ties lower id first). Arrays are [T, h, k], row-major.
struct PeerRouting {
  int64_t tokens = 0;
  int64_t heads = 0;
  int64_t topk = 0;
  std::vector<int64_t> ids;
  std::vector<float> scores;  // s_0[i] + s_1[j]
  std::vector<float> gates;

  void resize(int64_t t, int64_t h, int64_t k) {
    tokens = t;
    heads = h;
    topk = k;
    const size_t n = static_cast<size_t>(t * h * k);
    ids.assign(n, 0);
    scores.assign(n, 0.0f);
    gates.assign(n, 0.0f);
  }
  size_t slots() const { return ids.size(); }
};

// Gradients of sum(dy * y) with respect to the input and every parameter. The expert tables'
// gradients are row-sparse: one row per unique expert the batch touched, never [N, D].
struct PeerGrads {
  std::vector<float> dx;              // [T, D]
  std::vector<float> d_query_weight;  // [h*2*dk, D]
  std::vector<float> d_query_bias;    // [h*2*dk], empty when the layer has no bias
  std::vector<float> d_keys;          // [hk, 2, n, dk]
  std::vector<float> d_norm_weight;   // [D], empty when input_norm = none
  std::vector<int64_t> expert_ids;    // U unique experts, ascending
  std::vector<float> d_down;          // [U, D], row r is expert expert_ids[r]
  std::vector<float> d_up;            // [U, D_out]
};

// How the expert stage takes the down rows' dot products <u_e, xhat> on int8/int4 records.
enum class ExpertDot {
  // The codes widened to fp32 against fp32 xhat: within the parity tolerances of the oracle.
  kFloat,
  // xhat quantized per 32-group to int8 as an int8 record row is (ggml's Q8_0 beside Q4_0),
  // once per token, and integer dot products on the codes (VNNI where the CPU has it; the CPU
  // backend implements it, kernels/cpu/peer.h). Its error against the oracle is the
  // activations' quantization error (bench/peer_cpu_bench reports it on y), far beyond the fp32
  // tolerances, hence a mode. Every CPU path gives the same bits. Float records, and tokens
  // whose xhat the int8 quantizer cannot take (non-finite, |x| > quant_max_abs(kI8)), use kFloat.
  //
  // The up rows are summed in integers too. For a token's slots r with a gated activation
  // ga_r != 0 and each group g of the up rows: c_rg = ga_r * w_rg (w the group's fp16 scale,
  // fp32 product), a_g = max_r |c_rg|, inv_g = 32767 / a_g, d_g = a_g / 32767 (fp32); the
  // coefficient codes k_rg = clamp(rint(c_rg * inv_g), -32767, 32767) (0 for the whole group
  // when a_g is 0 or inv_g is not finite); then y[32g + i] = float(sum_r k_rg * q_rgi) * d_g with
  // q the records' signed codes and the sum exact in 32 bits. Each coefficient moves by at most
  // half a code, 1.5e-5 of its group's largest: far below the dot's quantization error. A token
  // with more than 512 such slots (where the sum could overflow) or with a non-finite c_rg takes
  // the float axpys.
  kInt8,
};

// The arithmetic of the router's two products: the query projection q = W_q xhat and the sub-key
// scores <q, K>.
enum class RoutingPrecision {
  // fp32 operands, fp32 accumulation: within the parity tolerances of the oracle.
  kF32,
  // Both operands of each product rounded to bf16 (round to nearest even), the products summed
  // in fp32; the bias, the top-k and the gates stay fp32. The oracle (kernels/cpu/ref/peer_ref.h,
  // called with kBf16) rounds the same operands and sums in double, so the parity tolerances are
  // those of kF32 against it; against kF32 the scores move by bf16's rounding (~2^-9 relative
  // per operand), which can swap experts whose scores are that close: a mode, off by default
  // (bench/peer_cpu_bench reports how many selected experts it changes). On CPUs with
  // AVX512_BF16 the CPU backend runs its own vdpbf16ps kernel; elsewhere the rounded operands go
  // through the fp32 BLAS.
  kBf16,
  // Both operands of each product quantized symmetrically to integers, one scale per row, and
  // multiplied exactly in integers (oneDNN's u8s8s32 GEMM for the query projection, VNNI where
  // the CPU has it, about 4x fp32's rate on the Zen 4 dev VM and 2x on an AVX2-only Zen 3; the
  // sub-key scores on the SIMD paths' int8_scores). The activation rows (a token's xhat; a token's
  // q for
  // one head and half) take codes in [-127, 127], the weight rows (a row of W_q; one sub-key) in
  // [-64, 64], so that no product pair overflows the 16-bit sums of CPUs without VNNI: the
  // integer results are exact on every CPU, path and blocking. Then
  //   q = (float(acc) * scale_x) * scale_w (+ b_q),  score = (float(acc) * scale_q) * scale_k,
  // each rounded once per operation in that order (routing_quantize_row gives the codes and the
  // scale). Every path, the oracle included, gives the same bits. Against kF32 the scores move
  // by the quantization (~1% of a row's largest element per operand), which swaps experts whose
  // scores are that close: a mode, off by default (bench/peer_cpu_bench reports how many
  // selected experts it changes).
  kInt8,
};

// "float" "int8"; "f32" "bf16" "int8" (the CLI's --expert-dot and --routing-math values).
inline const char* expert_dot_name(ExpertDot d) {
  return d == ExpertDot::kInt8 ? "int8" : "float";
}
inline const char* routing_precision_name(RoutingPrecision p) {
  return p == RoutingPrecision::kInt8 ? "int8" : p == RoutingPrecision::kBf16 ? "bf16" : "f32";
}

// RoutingPrecision::kInt8's row quantizer, the rule every implementation follows: for a row of n
// floats and `levels` (127 or 64), amax = max |v|; inv = levels / amax (fp32);
// code = clamp(rint(v * inv), -levels, levels); scale = amax / levels (fp32). A row of zeros,
// or one whose inv overflows (amax below ~levels * 2^-128), gets zero codes and scale 0; a row
// holding a NaN or an infinity gets zero codes and a NaN scale, so its products are NaN.
inline constexpr int kRoutingActivationLevels = 127;
inline constexpr int kRoutingWeightLevels = 64;

// ---- scalar math shared by the backends --------------------------------------------------------
// TROVE_HD: the CUDA kernels call these very functions. The math is spelled exp/erf/tanh, not
// std::, so device code finds CUDA's double overloads; on the host both name the C library's
// double functions, so CPU results are unchanged. No std::max on the device path either.

TROVE_HD inline double activation_ref(Activation a, double z) {
  switch (a) {
    case Activation::kRelu:
      return z > 0 ? z : 0.0;
    case Activation::kGelu:
      return 0.5 * z * (1.0 + erf(z * 0.70710678118654752440));
    case Activation::kGeluTanh: {
      const double u = 0.79788456080286535588 * (z + 0.044715 * z * z * z);
      return 0.5 * z * (1.0 + tanh(u));
    }
    case Activation::kSilu:
      return z / (1.0 + exp(-z));
  }
  return 0.0;
}

// d act / dz. relu'(0) = 0.
TROVE_HD inline double activation_grad_ref(Activation a, double z) {
  switch (a) {
    case Activation::kRelu:
      return z > 0 ? 1.0 : 0.0;
    case Activation::kGelu: {
      const double cdf = 0.5 * (1.0 + erf(z * 0.70710678118654752440));
      const double pdf = 0.39894228040143267794 * exp(-0.5 * z * z);
      return cdf + z * pdf;
    }
    case Activation::kGeluTanh: {
      const double c = 0.79788456080286535588;
      const double u = c * (z + 0.044715 * z * z * z);
      const double t = tanh(u);
      return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * z * z);
    }
    case Activation::kSilu: {
      const double s = 1.0 / (1.0 + exp(-z));
      return s * (1.0 + z * (1.0 - s));
    }
  }
  return 0.0;
}

// The k gates of one (token, head) from its top-k scores (softmax, relu or sigmoid), in double
// with one rounding; every backend computes gates with this.
TROVE_HD inline void gates_ref(Gate gate, const float* scores, int64_t k, float* gates) {
  switch (gate) {
    case Gate::kSoftmax: {
      double mx = scores[0];
      for (int64_t s = 1; s < k; ++s) {
        const double v = scores[s];
        mx = mx < v ? v : mx;  // std::max(mx, v), usable on the device
      }
      double sum = 0;
      for (int64_t s = 0; s < k; ++s) sum += exp(scores[s] - mx);
      for (int64_t s = 0; s < k; ++s) gates[s] = static_cast<float>(exp(scores[s] - mx) / sum);
      break;
    }
    case Gate::kRelu:
      for (int64_t s = 0; s < k; ++s) gates[s] = scores[s] > 0 ? scores[s] : 0.0f;
      break;
    case Gate::kSigmoid:
      for (int64_t s = 0; s < k; ++s) {
        gates[s] = static_cast<float>(1.0 / (1.0 + exp(-static_cast<double>(scores[s]))));
      }
      break;
  }
}

}  // namespace trove
