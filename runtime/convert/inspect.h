// `trove inspect`: what a store holds and what it costs to serve, as JSON (for --json and
// tests) and as a human report rendered from that JSON.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "base/status.h"
#include "storage/store.h"

namespace trove {

// Tier budgets to split the tables over (0 = tier absent). With both 0 the report shows the
// sizes only.
struct TierBudgets {
  uint64_t vram = 0;
  uint64_t host = 0;
};

// Layers (config, dtype, record size and stride, read amplification at 512 and 4096-byte
// alignment, bytes and the bf16 size they replace, quantization error, source), dense tensors,
// provenance, and the split of the tables over T0/T1/T2 for `budgets` (filled in tier order:
// VRAM first, then host, the rest stays on disk).
Result<nlohmann::json> inspect_store(const StoreReader& store, const TierBudgets& budgets);

std::string render_inspect(const nlohmann::json& report);

}  // namespace trove
