// The configuration of one PEER layer (SPEC §2). Kernels take it as plain data; runtime
// reads and writes it as JSON in the store's manifest (runtime/layer/peer_config_json.h).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "base/status.h"

namespace trove {

enum class Activation : uint8_t { kRelu, kGelu, kGeluTanh, kSilu };
enum class Gate : uint8_t { kSoftmax, kRelu, kSigmoid };
enum class InputNorm : uint8_t { kNone, kRms };

std::string_view activation_name(Activation a);  // "relu" "gelu" "gelu_tanh" "silu"
std::string_view gate_name(Gate g);              // "softmax" "relu" "sigmoid"
std::string_view input_norm_name(InputNorm n);   // "none" "rms"
Result<Activation> parse_activation(std::string_view s);
Result<Gate> parse_gate(std::string_view s);
Result<InputNorm> parse_input_norm(std::string_view s);

struct PeerConfig {
  int64_t dim = 0;            // D
  int64_t dim_out = 0;        // D_out (0 = same as dim until validated)
  int64_t heads = 1;          // h
  int64_t n_keys = 0;         // n; experts N = n^2
  int64_t dim_key = 0;        // dk, per half
  int64_t topk = 0;           // k, final experts per head
  int64_t topk_per_half = 0;  // k' (0 = k until validated)
  int64_t expert_width = 1;   // m
  Activation activation = Activation::kRelu;
  Gate gate = Gate::kSoftmax;
  InputNorm input_norm = InputNorm::kNone;
  float norm_eps = 1e-6f;
  bool shared_keys = false;  // one key set for all heads (hk = 1), else hk = h
  bool query_bias = false;   // W_q has a bias b_q

  int64_t num_experts() const { return n_keys * n_keys; }
  int64_t key_heads() const { return shared_keys ? 1 : heads; }
  int64_t query_rows() const { return heads * 2 * dim_key; }

  // Fills the defaults (dim_out = dim, topk_per_half = topk) and checks every field: positive
  // sizes, k <= k'^2, k' <= n, n^2 not overflowing, eps > 0 when input_norm = rms. Errors
  // name the field and value.
  Status validate_and_fill();
};

}  // namespace trove
