// PeerConfig <-> JSON, as stored in manifests and in the trove layout's safetensors metadata:
// {"dim": 2048, "dim_out": 2048, "heads": 4, "n_keys": 896, "dim_key": 64, "topk": 8,
//  "topk_per_half": 8, "expert_width": 1, "activation": "silu", "gate": "relu",
//  "input_norm": "none", "norm_eps": 1e-6, "shared_keys": false, "query_bias": false}
#pragma once

#include <nlohmann/json.hpp>

#include "base/status.h"
#include "kernels/peer_config.h"

namespace trove {

nlohmann::json peer_config_to_json(const PeerConfig& config);
// Missing optional fields take their defaults; wrong types or unknown enum names are errors
// naming the field. The result is validated (PeerConfig::validate_and_fill).
Result<PeerConfig> peer_config_from_json(const nlohmann::json& j);

}  // namespace trove
