// Import of PEER checkpoints from safetensors in named layouts (SPEC §2) into the canonical
// arrangement, and export back in the `trove` layout.
//
//   trove       P.query.weight [h*2*dk, D] rows (head, half, j); optional P.query.bias [h*2*dk];
//               P.keys [hk, 2, n, dk]; P.down [N, D]; P.up [N, D_out]; P.norm.weight [D];
//               config in __metadata__["trove.layer.<P>"] as a JSON object (PeerConfig fields).
//   mikeybeez   P.to_queries.weight [h*2*dk, D] rows (head, half, j); optional
//               P.to_queries.bias; P.keys [h, n, 2, dk]; P.expert_down.weight [N, D];
//               P.expert_up.weight [N, D_out]; silu, relu gate.
//   lucidrains  P.to_queries.weight or P.to_queries.0.weight [h*2*dk, D] rows (half, head, j);
//               optional P.to_queries[.0].bias; P.keys [h, n, 2, dk];
//               P.weight_down_embed.weight, P.weight_up_embed.weight;
//               gelu; optional P.norm.gamma (its RMSNorm scales by (gamma + 1)).
// P is the --prefix; an empty prefix means names without a leading "P.".
// Shapes give D, D_out, N, n, dk, h and hk; topk and anything not implied by shapes come from
// metadata, the layout's defaults, or ImportOverrides (overrides win). Shapes that disagree
// with each other or with the config are errors naming the tensor, its shape and the
// expected one.
//
// Layout defaults (used when neither metadata nor an override says):
//   all         topk = topk_per_half = 8 (the background config); for lucidrains topk = 1,
//               topk_per_half = 16 (PEER-pytorch's non_competing_scores=True default, k' =
//               num_experts_per_head); an error asking for --topk when n_keys < k'.
//               --topk without --topk-per-half sets k' = k.
//   trove       with metadata: the metadata's config, which must agree with the shapes, the
//               bias and the norm tensor. Without metadata: relu, softmax gate, input_norm
//               rms (eps 1e-6) exactly when P.norm.weight is present.
//   mikeybeez   silu, relu gate, input_norm none (the layout has no norm tensor).
//   lucidrains  gelu, relu gate (PEER-pytorch's default non_competing_scores=True; a model
//               built with non_competing_scores=False is --gate softmax --topk K, K =
//               num_experts_per_head, which also sets k' = K), input_norm
//               rms when P.norm.gamma is present, stored as norm_weight = gamma + 1 with
//               norm_eps 1e-12 (its eps sits on the L2 norm; see layouts.cc).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "kernels/peer_config.h"
#include "storage/safetensors.h"

namespace trove {

enum class ImportLayout : uint8_t { kTrove, kMikeybeez, kLucidrains };
std::string_view import_layout_name(ImportLayout layout);
Result<ImportLayout> parse_import_layout(std::string_view name);

// Config values given on the command line (--heads --topk --activation --gate ...).
struct ImportOverrides {
  std::optional<int64_t> heads;
  std::optional<int64_t> topk;
  std::optional<int64_t> topk_per_half;
  std::optional<Activation> activation;
  std::optional<Gate> gate;
  std::optional<InputNorm> input_norm;
  std::optional<float> norm_eps;
};

// A layer in canonical form. Dense tensors are fp32 copies (small); expert tables stay views
// into the mapped source files (they can be tens of GB).
struct ImportedLayer {
  std::string prefix;
  PeerConfig config;
  std::vector<float> query_weight;     // [h*2*dk, D], rows (head, half, j)
  std::vector<float> query_bias;       // [h*2*dk] or empty
  std::vector<float> keys;             // [hk, 2, n, dk]
  std::vector<float> norm_weight;      // [D] or empty: the canonical gamma of rms-norm
  const StTensorView* down = nullptr;  // [N, D], F32/F16/BF16
  const StTensorView* up = nullptr;    // [N, D_out]
  std::string source_file;             // file holding `down`
};

// Tensors are looked up across all `files` (sharded checkpoints); a name in two files is an
// error. The files must outlive the returned layer.
Result<ImportedLayer> import_layer(const std::vector<const SafetensorsFile*>& files,
                                   ImportLayout layout, const std::string& prefix,
                                   const ImportOverrides& overrides);

// Metadata key of a layer's config in the trove layout: "trove.layer.<prefix>".
std::string trove_layout_config_key(const std::string& prefix);

}  // namespace trove
