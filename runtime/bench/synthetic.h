// Synthetic PEER checkpoints, written as safetensors in any import layout: for `trove demo`,
// tests and benchmarks, where no real checkpoint can be downloaded. Values are gaussian and
// depend only on (seed, tensor, element index), not on how the file is chunked, so the same
// spec always yields the same bytes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "kernels/peer_config.h"
#include "runtime/convert/layouts.h"
#include "storage/safetensors.h"

namespace trove {

struct SyntheticCheckpoint {
  ImportLayout layout = ImportLayout::kMikeybeez;
  std::vector<std::string> prefixes = {"model.layers.19.mlp.peer"};
  PeerConfig config;               // dim, heads, n_keys, dim_key, ... (validated)
  StDType dtype = StDType::kBF16;  // F32, F16 or BF16
  float expert_std = 1.0f;         // std of the expert tables
  float router_std = 0.02f;        // std of queries and keys
  uint64_t seed = 1;
};

// Writes `spec` to `path` atomically. For the trove layout the config goes into the metadata.
Status write_synthetic_checkpoint(const std::string& path, const SyntheticCheckpoint& spec);

// The canonical value of element `index` of synthetic tensor `tensor` (the canonical name:
// "down", "up", "query.weight", "keys", ...), before conversion to spec.dtype; exposed so
// tests can check imports against it.
float synthetic_value(uint64_t seed, const std::string& prefix, const std::string& tensor,
                      uint64_t index, float std);

}  // namespace trove
