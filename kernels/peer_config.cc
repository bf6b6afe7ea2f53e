// PeerConfig names, parsers and validation (SPEC §2).
//
// Validation is the single gate every config passes before it reaches a kernel or a
// manifest, so the limits here are what the rest of trove may assume: every size >= 1,
// n^2 and the table's element count fit comfortably in int64, k' <= n, k <= k'^2.
#include "kernels/peer_config.h"

#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "base/strings.h"

namespace trove {
namespace {

// N = n^2 is capped at 2^40 experts (n <= 2^20): far beyond any table a machine holds
// today, and small enough that N * (D + D_out) * 4 bytes cannot overflow int64 under the
// dimension cap below.
constexpr int64_t kMaxKeys = int64_t{1} << 20;
// Dimensions (D, D_out, dk, h) are capped at 2^20 so that products such as
// h * 2 * dk * D and N * (D + D_out) stay far from int64 overflow.
constexpr int64_t kMaxDim = int64_t{1} << 20;
// Bound on N * (D + D_out): the element count of one layer's expert tables.
constexpr int64_t kMaxTableElements = int64_t{1} << 60;

template <typename Enum, size_t kCount>
Result<Enum> parse_enum(std::string_view what, std::string_view s,
                        const std::pair<std::string_view, Enum> (&table)[kCount]) {
  std::string accepted;
  for (const auto& [name, value] : table) {
    if (name == s) return value;
    if (!accepted.empty()) accepted += ", ";
    accepted += name;
  }
  return Status::invalid_argument("unknown " + std::string(what) + " '" + std::string(s) +
                                  "' (accepted: " + accepted + ")");
}

constexpr std::pair<std::string_view, Activation> kActivations[] = {
    {"relu", Activation::kRelu},
    {"gelu", Activation::kGelu},
    {"gelu_tanh", Activation::kGeluTanh},
    {"silu", Activation::kSilu},
};
constexpr std::pair<std::string_view, Gate> kGates[] = {
    {"softmax", Gate::kSoftmax},
    {"relu", Gate::kRelu},
    {"sigmoid", Gate::kSigmoid},
};
constexpr std::pair<std::string_view, InputNorm> kInputNorms[] = {
    {"none", InputNorm::kNone},
    {"rms", InputNorm::kRms},
};

Status check_size(const char* field, int64_t value, int64_t max) {
  if (value < 1) {
    return Status::invalid_argument(
        str_printf("PEER config: %s must be >= 1, got %lld", field, static_cast<long long>(value)));
  }
  if (value > max) {
    return Status::invalid_argument(str_printf("PEER config: %s must be <= %lld, got %lld", field,
                                               static_cast<long long>(max),
                                               static_cast<long long>(value)));
  }
  return Status::ok_status();
}

}  // namespace

std::string_view activation_name(Activation a) {
  for (const auto& [name, value] : kActivations) {
    if (value == a) return name;
  }
  TROVE_CHECK_MSG(false, "bad Activation %d", static_cast<int>(a));
  return {};
}

std::string_view gate_name(Gate g) {
  for (const auto& [name, value] : kGates) {
    if (value == g) return name;
  }
  TROVE_CHECK_MSG(false, "bad Gate %d", static_cast<int>(g));
  return {};
}

std::string_view input_norm_name(InputNorm n) {
  for (const auto& [name, value] : kInputNorms) {
    if (value == n) return name;
  }
  TROVE_CHECK_MSG(false, "bad InputNorm %d", static_cast<int>(n));
  return {};
}

Result<Activation> parse_activation(std::string_view s) {
  return parse_enum("activation", s, kActivations);
}
Result<Gate> parse_gate(std::string_view s) {
  return parse_enum("gate", s, kGates);
}
Result<InputNorm> parse_input_norm(std::string_view s) {
  return parse_enum("input_norm", s, kInputNorms);
}

Status PeerConfig::validate_and_fill() {
  if (dim_out == 0) dim_out = dim;
  if (topk_per_half == 0) topk_per_half = topk;

  TROVE_RETURN_IF_ERROR(check_size("dim", dim, kMaxDim));
  TROVE_RETURN_IF_ERROR(check_size("dim_out", dim_out, kMaxDim));
  TROVE_RETURN_IF_ERROR(check_size("heads", heads, kMaxDim));
  TROVE_RETURN_IF_ERROR(check_size("dim_key", dim_key, kMaxDim));
  if (n_keys > kMaxKeys) {
    return Status::invalid_argument(
        str_printf("PEER config: n_keys %lld gives n_keys^2 experts, above the limit of 2^40 "
                   "(n_keys <= %lld)",
                   static_cast<long long>(n_keys), static_cast<long long>(kMaxKeys)));
  }
  TROVE_RETURN_IF_ERROR(check_size("n_keys", n_keys, kMaxKeys));
  // Upper bounds of k and k' are the relational checks below, with better messages.
  constexpr int64_t kNoMax = std::numeric_limits<int64_t>::max();
  TROVE_RETURN_IF_ERROR(check_size("topk", topk, kNoMax));
  TROVE_RETURN_IF_ERROR(check_size("topk_per_half", topk_per_half, kNoMax));
  if (expert_width < 1) {
    return Status::invalid_argument(str_printf("PEER config: expert_width must be >= 1, got %lld",
                                               static_cast<long long>(expert_width)));
  }
  if (expert_width > 1) {
    return Status::not_supported(
        str_printf("PEER config: expert_width %lld: expert_width m > 1 is not supported yet",
                   static_cast<long long>(expert_width)));
  }
  if (topk_per_half > n_keys) {
    return Status::invalid_argument(
        str_printf("PEER config: topk_per_half %lld must be <= n_keys %lld",
                   static_cast<long long>(topk_per_half), static_cast<long long>(n_keys)));
  }
  // Both are <= n_keys <= 2^20 here, so the square cannot overflow.
  if (topk > topk_per_half * topk_per_half) {
    return Status::invalid_argument(str_printf(
        "PEER config: topk %lld must be <= topk_per_half^2 = %lld (topk_per_half %lld)",
        static_cast<long long>(topk), static_cast<long long>(topk_per_half * topk_per_half),
        static_cast<long long>(topk_per_half)));
  }
  if (num_experts() > kMaxTableElements / (dim + dim_out)) {
    return Status::invalid_argument(
        str_printf("PEER config: n_keys^2 * (dim + dim_out) = %lld * %lld elements exceeds 2^60",
                   static_cast<long long>(num_experts()), static_cast<long long>(dim + dim_out)));
  }
  if (input_norm == InputNorm::kRms && !(norm_eps > 0.0f && std::isfinite(norm_eps))) {
    return Status::invalid_argument(
        str_printf("PEER config: norm_eps must be a finite value > 0 when input_norm is rms, "
                   "got %g",
                   static_cast<double>(norm_eps)));
  }
  return Status::ok_status();
}

}  // namespace trove
