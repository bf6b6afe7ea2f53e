// PeerConfig <-> JSON. The reader checks every value's type before converting it, so
// nlohmann's type_error never fires; a config read from a file is untrusted input and every
// problem comes back as a Status naming the field.
#include "runtime/layer/peer_config_json.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

#include "base/strings.h"

namespace trove {
namespace {

using nlohmann::json;

constexpr const char* kIntFields[] = {"dim",     "dim_out", "heads",         "n_keys",
                                      "dim_key", "topk",    "topk_per_half", "expert_width"};
constexpr const char* kOtherFields[] = {"activation", "gate",        "input_norm",
                                        "norm_eps",   "shared_keys", "query_bias"};
// Fields without a meaningful default: a config missing one cannot describe a layer.
constexpr const char* kRequiredFields[] = {"dim", "n_keys", "dim_key", "topk"};

bool is_known_field(const std::string& key) {
  for (const char* f : kIntFields) {
    if (key == f) return true;
  }
  for (const char* f : kOtherFields) {
    if (key == f) return true;
  }
  return false;
}

// dump() for error messages: cannot throw (strings built in memory, not parsed, may hold
// invalid UTF-8) and is clipped. Callers bound the nesting depth of what they parse.
std::string safe_dump(const json& value) {
  return clip(value.dump(-1, ' ', false, json::error_handler_t::replace));
}

Status wrong_type(const char* field, const char* expected, const json& value) {
  return Status::invalid_argument(std::string("PEER config field '") + field + "' must be " +
                                  expected + ", got " + value.type_name() + " " + safe_dump(value));
}

// Reads an integer field into *out when present. Floats (even 2048.0) are rejected: a config
// field that should be a count and is not an integer is more likely a mistake than a style.
Status read_int(const json& j, const char* field, int64_t* out) {
  auto it = j.find(field);
  if (it == j.end()) return Status::ok_status();
  if (it->is_number_unsigned()) {
    uint64_t v = it->get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Status::invalid_argument(std::string("PEER config field '") + field +
                                      "' is out of range: " + safe_dump(*it));
    }
    *out = static_cast<int64_t>(v);
    return Status::ok_status();
  }
  if (it->is_number_integer()) {
    *out = it->get<int64_t>();
    return Status::ok_status();
  }
  return wrong_type(field, "an integer", *it);
}

Status read_bool(const json& j, const char* field, bool* out) {
  auto it = j.find(field);
  if (it == j.end()) return Status::ok_status();
  if (!it->is_boolean()) return wrong_type(field, "a boolean", *it);
  *out = it->get<bool>();
  return Status::ok_status();
}

// Reads a string field and parses it with `parse` into *out when present.
template <typename T, typename Parse>
Status read_enum(const json& j, const char* field, Parse parse, T* out) {
  auto it = j.find(field);
  if (it == j.end()) return Status::ok_status();
  if (!it->is_string()) return wrong_type(field, "a string", *it);
  Result<T> parsed = parse(it->get_ref<const std::string&>());
  if (!parsed.ok()) {
    return parsed.status().with_context(std::string("PEER config field '") + field + "'");
  }
  *out = *parsed;
  return Status::ok_status();
}

// The shortest decimal that reads back as the same float ("1e-06", not
// "9.99999997e-07"), so manifests show what the user wrote.
double float_as_short_double(float f) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), f);
  if (ec != std::errc()) return static_cast<double>(f);
  *end = '\0';
  return std::strtod(buf, nullptr);
}

}  // namespace

nlohmann::json peer_config_to_json(const PeerConfig& config) {
  json j = json::object();
  j["dim"] = config.dim;
  j["dim_out"] = config.dim_out;
  j["heads"] = config.heads;
  j["n_keys"] = config.n_keys;
  j["dim_key"] = config.dim_key;
  j["topk"] = config.topk;
  j["topk_per_half"] = config.topk_per_half;
  j["expert_width"] = config.expert_width;
  j["activation"] = std::string(activation_name(config.activation));
  j["gate"] = std::string(gate_name(config.gate));
  j["input_norm"] = std::string(input_norm_name(config.input_norm));
  j["norm_eps"] = float_as_short_double(config.norm_eps);
  j["shared_keys"] = config.shared_keys;
  j["query_bias"] = config.query_bias;
  return j;
}

Result<PeerConfig> peer_config_from_json(const nlohmann::json& j) {
  if (!j.is_object()) {
    return Status::invalid_argument(std::string("PEER config must be a JSON object, got ") +
                                    j.type_name());
  }
  for (const auto& [key, value] : j.items()) {
    if (!is_known_field(key)) {
      return Status::invalid_argument("PEER config has unknown field '" + key +
                                      "' (a typo? known fields: dim, dim_out, heads, n_keys, "
                                      "dim_key, topk, topk_per_half, expert_width, activation, "
                                      "gate, input_norm, norm_eps, shared_keys, query_bias)");
    }
  }
  for (const char* f : kRequiredFields) {
    if (!j.contains(f)) {
      return Status::invalid_argument(std::string("PEER config is missing required field '") + f +
                                      "'");
    }
  }

  PeerConfig c;
  TROVE_RETURN_IF_ERROR(read_int(j, "dim", &c.dim));
  TROVE_RETURN_IF_ERROR(read_int(j, "dim_out", &c.dim_out));
  TROVE_RETURN_IF_ERROR(read_int(j, "heads", &c.heads));
  TROVE_RETURN_IF_ERROR(read_int(j, "n_keys", &c.n_keys));
  TROVE_RETURN_IF_ERROR(read_int(j, "dim_key", &c.dim_key));
  TROVE_RETURN_IF_ERROR(read_int(j, "topk", &c.topk));
  TROVE_RETURN_IF_ERROR(read_int(j, "topk_per_half", &c.topk_per_half));
  TROVE_RETURN_IF_ERROR(read_int(j, "expert_width", &c.expert_width));
  TROVE_RETURN_IF_ERROR(read_enum(j, "activation", parse_activation, &c.activation));
  TROVE_RETURN_IF_ERROR(read_enum(j, "gate", parse_gate, &c.gate));
  TROVE_RETURN_IF_ERROR(read_enum(j, "input_norm", parse_input_norm, &c.input_norm));
  TROVE_RETURN_IF_ERROR(read_bool(j, "shared_keys", &c.shared_keys));
  TROVE_RETURN_IF_ERROR(read_bool(j, "query_bias", &c.query_bias));
  if (auto it = j.find("norm_eps"); it != j.end()) {
    if (!it->is_number()) return wrong_type("norm_eps", "a number", *it);
    double eps = it->get<double>();
    if (!std::isfinite(eps) || std::fabs(eps) > std::numeric_limits<float>::max()) {
      return Status::invalid_argument("PEER config field 'norm_eps' is out of range: " +
                                      safe_dump(*it));
    }
    c.norm_eps = static_cast<float>(eps);
  }
  TROVE_RETURN_IF_ERROR(c.validate_and_fill());
  return c;
}

}  // namespace trove
