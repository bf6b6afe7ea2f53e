#include "runtime/bench/synthetic.h"

#include <cmath>
#include <cstring>

#include "base/random.h"
#include "kernels/cpu/ref/quant_ref.h"
#include "runtime/layer/peer_config_json.h"

namespace trove {

namespace {

uint64_t name_hash(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

std::string join(const std::string& prefix, const std::string& suffix) {
  return prefix.empty() ? suffix : prefix + "." + suffix;
}

// A tensor whose element at foreign (file) index i holds the canonical element map(i).
struct TensorPlan {
  std::string name;       // in the file
  std::string canonical;  // "down", "keys", ...
  std::vector<int64_t> shape;
  float std;
  std::function<uint64_t(uint64_t)> to_canonical;
};

}  // namespace

float synthetic_value(uint64_t seed, const std::string& prefix, const std::string& tensor,
                      uint64_t index, float std) {
  // Box-Muller on two uniforms from a counter-based hash.
  const uint64_t base = splitmix64(seed ^ name_hash(prefix) ^ (name_hash(tensor) << 1));
  const uint64_t a = splitmix64(base + 2 * index);
  const uint64_t b = splitmix64(base + 2 * index + 1);
  const double u1 = (static_cast<double>(a >> 11) + 1.0) * 0x1p-53;  // (0, 1]
  const double u2 = static_cast<double>(b >> 11) * 0x1p-53;
  const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  return static_cast<float>(z * std);
}

Status write_synthetic_checkpoint(const std::string& path, const SyntheticCheckpoint& spec) {
  PeerConfig c = spec.config;
  TROVE_RETURN_IF_ERROR(c.validate_and_fill());
  if (spec.dtype != StDType::kF32 && spec.dtype != StDType::kF16 && spec.dtype != StDType::kBF16) {
    return Status::invalid_argument("synthetic checkpoint dtype must be F32, F16 or BF16");
  }
  const int64_t h = c.heads, n = c.n_keys, dk = c.dim_key, hk = c.key_heads();
  const int64_t big_n = c.num_experts();
  std::vector<TensorPlan> plans;
  std::map<std::string, std::string> metadata;
  for (const std::string& p : spec.prefixes) {
    auto identity = [](uint64_t i) { return i; };
    // Keys [h, n, 2, dk] in the foreign layouts; canonical [hk, 2, n, dk].
    auto foreign_keys = [n, dk](uint64_t i) {
      const uint64_t j = i % dk, c2 = (i / dk) % 2, ii = (i / (2 * dk)) % n, hh = i / (2 * dk * n);
      return ((hh * 2 + c2) * n + ii) * dk + j;
    };
    switch (spec.layout) {
      case ImportLayout::kTrove:
        plans.push_back({join(p, "query.weight"),
                         "query.weight",
                         {c.query_rows(), c.dim},
                         spec.router_std,
                         identity});
        plans.push_back({join(p, "keys"), "keys", {hk, 2, n, dk}, spec.router_std, identity});
        plans.push_back({join(p, "down"), "down", {big_n, c.dim}, spec.expert_std, identity});
        plans.push_back({join(p, "up"), "up", {big_n, c.dim_out}, spec.expert_std, identity});
        metadata[trove_layout_config_key(p)] = peer_config_to_json(c).dump();
        break;
      case ImportLayout::kMikeybeez:
        if (c.shared_keys) return Status::invalid_argument("mikeybeez layout has per-head keys");
        plans.push_back({join(p, "to_queries.weight"),
                         "query.weight",
                         {c.query_rows(), c.dim},
                         spec.router_std,
                         identity});
        plans.push_back({join(p, "keys"), "keys", {h, n, 2, dk}, spec.router_std, foreign_keys});
        plans.push_back(
            {join(p, "expert_down.weight"), "down", {big_n, c.dim}, spec.expert_std, identity});
        plans.push_back(
            {join(p, "expert_up.weight"), "up", {big_n, c.dim_out}, spec.expert_std, identity});
        break;
      case ImportLayout::kLucidrains: {
        if (c.shared_keys) return Status::invalid_argument("lucidrains layout has per-head keys");
        const int64_t cols = c.dim;
        // File rows (half, head, j) hold canonical rows (head, half, j).
        auto queries = [h, dk, cols](uint64_t i) {
          const uint64_t row = i / cols, col = i % cols;
          const uint64_t j = row % dk, head = (row / dk) % h, half = row / (dk * h);
          return ((head * 2 + half) * dk + j) * cols + col;
        };
        plans.push_back({join(p, "to_queries.0.weight"),
                         "query.weight",
                         {c.query_rows(), c.dim},
                         spec.router_std,
                         queries});
        plans.push_back({join(p, "keys"), "keys", {h, n, 2, dk}, spec.router_std, foreign_keys});
        plans.push_back({join(p, "weight_down_embed.weight"),
                         "down",
                         {big_n, c.dim},
                         spec.expert_std,
                         identity});
        plans.push_back({join(p, "weight_up_embed.weight"),
                         "up",
                         {big_n, c.dim_out},
                         spec.expert_std,
                         identity});
        break;
      }
    }
  }
  std::vector<StTensorOut> tensors;
  const size_t esize = st_dtype_size(spec.dtype);
  for (size_t t = 0; t < plans.size(); ++t) {
    const TensorPlan& plan = plans[t];
    const std::string prefix = spec.prefixes[t / 4];
    const uint64_t seed = spec.seed;
    tensors.push_back({plan.name,
                       spec.dtype,
                       plan.shape,
                       {},
                       [plan, prefix, seed, dtype = st_float_dtype(spec.dtype), esize](
                           uint64_t offset, std::span<uint8_t> chunk) -> Status {
                         // Any byte range: elements overlapping the range are generated whole and
                         // the overlapping bytes copied.
                         const uint64_t end = offset + chunk.size();
                         for (uint64_t i = offset / esize; i * esize < end; ++i) {
                           uint8_t bytes[4];
                           const float v = synthetic_value(seed, prefix, plan.canonical,
                                                           plan.to_canonical(i), plan.std);
                           convert_row_ref(dtype, &v, 1, bytes);
                           for (uint64_t k = 0; k < esize; ++k) {
                             const uint64_t pos = i * esize + k;
                             if (pos >= offset && pos < end) chunk[pos - offset] = bytes[k];
                           }
                         }
                         return {};
                       }});
  }
  metadata["trove.synthetic"] = "true";
  return write_safetensors(path, tensors, metadata);
}

}  // namespace trove
