// Import of PEER layers from safetensors checkpoints in the named layouts of
// runtime/convert/layouts.h. The work is in three steps, each with its own errors:
//   1. find the layout's tensors across the files (missing, duplicated, wrong dtype);
//   2. derive the sizes from their shapes and check that every shape agrees with them;
//   3. build the config (layout defaults < trove metadata < overrides) and copy the dense
//      tensors into the canonical arrangement. Expert tables are never copied: they stay
//      views into the mapped files, read later a row range at a time (read_rows_f32 in
//      storage/safetensors.h).
#include "runtime/convert/layouts.h"

#include <cmath>
#include <cstring>
#include <set>
#include <string>
#include <utility>

#include "base/strings.h"
#include "runtime/layer/peer_config_json.h"

namespace trove {
namespace {

// topk when neither metadata nor --topk says: the background documents' PEER config uses
// k = k' = 8 (mikeybeez, and trove files without metadata). PEER-pytorch's module defaults to
// non_competing_scores=True: a relu gate over the final top-1 per head of the k'^2 candidates,
// k' = product_key_topk = num_experts_per_head = 16 (SPEC §2).
constexpr int64_t kDefaultTopk = 8;
constexpr int64_t kLucidrainsDefaultTopk = 1;
constexpr int64_t kLucidrainsDefaultTopkPerHalf = 16;
// lucidrains' RMSNorm puts its eps on the L2 norm (F.normalize, 1e-12), not inside the mean
// of squares as trove's rms-norm does. A tiny eps inside the mean makes the two agree to
// below fp32 resolution for every input whose mean square is above ~1e-5; only (near-)zero
// inputs differ, and both give (near-)zero outputs for those.
constexpr float kLucidrainsNormEps = 1e-12f;

// The tensor names of a layout (suffixes after "<prefix>.").
struct LayoutNames {
  std::vector<std::string> query_weight;  // alternatives, at most one may be present
  std::vector<std::string> query_bias;    // alternatives; empty: the layout has no bias
  std::string keys;
  std::string down;
  std::string up;
  std::string norm;                 // empty: the layout has no norm tensor
  bool keys_head_major_half_first;  // keys [hk, 2, n, dk] (trove) vs [h, n, 2, dk]
  bool query_rows_half_major;       // query rows (half, head, j) (lucidrains)
};

LayoutNames layout_names(ImportLayout layout) {
  switch (layout) {
    case ImportLayout::kTrove:
      return {{"query.weight"}, {"query.bias"}, "keys", "down", "up", "norm.weight", true, false};
    case ImportLayout::kMikeybeez:
      return {{"to_queries.weight"},
              {"to_queries.bias"},
              "keys",
              "expert_down.weight",
              "expert_up.weight",
              "",
              false,
              false};
    case ImportLayout::kLucidrains:
      // The real module's to_queries is nn.Sequential(nn.Linear, Rearrange), so its weight
      // is "to_queries.0.weight"; a bare Linear would be "to_queries.weight".
      return {{"to_queries.0.weight", "to_queries.weight"},
              {"to_queries.0.bias", "to_queries.bias"},
              "keys",
              "weight_down_embed.weight",
              "weight_up_embed.weight",
              "norm.gamma",
              false,
              true};
  }
  TROVE_CHECK_MSG(false, "bad ImportLayout %d", static_cast<int>(layout));
  return {};
}

// A tensor found in one of the files.
struct Located {
  const SafetensorsFile* file = nullptr;
  const StTensorView* view = nullptr;
  explicit operator bool() const { return view != nullptr; }
};

// Looks tensors up by suffix across all files and explains misses.
class TensorFinder {
 public:
  TensorFinder(const std::vector<const SafetensorsFile*>& files, ImportLayout layout,
               const std::string& prefix)
      : files_(files), layout_(layout), prefix_(prefix) {}

  std::string full_name(const std::string& suffix) const {
    return prefix_.empty() ? suffix : prefix_ + "." + suffix;
  }

  // The tensor named by the first present alternative; an empty Located when none is present
  // and `required` is false. Two present alternatives, or one name in two files, is an error.
  Result<Located> find(const std::vector<std::string>& suffixes, bool required) const {
    Located found;
    std::string found_name;
    for (const std::string& suffix : suffixes) {
      const std::string name = full_name(suffix);
      for (const SafetensorsFile* file : files_) {
        const StTensorView* view = file->find(name);
        if (view == nullptr) continue;
        if (found) {
          if (found_name == name) {
            return Status::invalid_argument("tensor '" + name + "' appears in two files: " +
                                            found.file->path() + " and " + file->path());
          }
          return Status::invalid_argument(
              "both '" + found_name + "' and '" + name + "' are present; layout " +
              std::string(import_layout_name(layout_)) + " expects only one of them");
        }
        found = {file, view};
        found_name = name;
      }
    }
    if (found) {
      if (!st_dtype_is_float(found.view->dtype)) {
        return Status::invalid_argument("tensor '" + found_name + "' has dtype " +
                                        st_dtype_name(found.view->dtype) +
                                        "; layouts accept F32, F16 and BF16");
      }
      return found;
    }
    if (!required) return Located{};
    return not_found(suffixes);
  }

  Result<Located> find(const std::string& suffix, bool required) const {
    return find(std::vector<std::string>{suffix}, required);
  }

 private:
  // Not found, naming the tensor, the layout, the files, and tensors that look like what was
  // meant: names under the same prefix, and names ending in the same suffix (whose prefix is
  // probably the --prefix the user wanted).
  Status not_found(const std::vector<std::string>& suffixes) const {
    std::string msg = "tensor '" + full_name(suffixes[0]) + "'";
    for (size_t i = 1; i < suffixes.size(); ++i) msg += " (or '" + full_name(suffixes[i]) + "')";
    msg += " not found (layout " + std::string(import_layout_name(layout_)) + "; searched ";
    for (size_t i = 0; i < files_.size(); ++i) {
      if (i > 0) msg += ", ";
      msg += files_[i]->path();
    }
    if (files_.empty()) msg += "no files";
    msg += ")";

    constexpr size_t kMaxSimilar = 5;
    std::vector<std::string> similar;
    std::set<std::string> prefixes;
    const std::string under_prefix = prefix_.empty() ? "" : prefix_ + ".";
    for (const SafetensorsFile* file : files_) {
      for (const StTensorView& t : file->tensors()) {
        bool same_prefix = !under_prefix.empty() && starts_with(t.name, under_prefix);
        bool same_suffix = false;
        for (const std::string& suffix : suffixes) {
          if (t.name == suffix) {
            same_suffix = true;
            prefixes.insert("");
          } else if (ends_with(t.name, "." + suffix)) {
            same_suffix = true;
            prefixes.insert(t.name.substr(0, t.name.size() - suffix.size() - 1));
          }
        }
        if ((same_prefix || same_suffix) && similar.size() < kMaxSimilar) {
          similar.push_back(t.name);
        }
      }
    }
    if (!similar.empty()) {
      msg += "; similar tensors: ";
      for (size_t i = 0; i < similar.size(); ++i) msg += (i > 0 ? ", " : "") + similar[i];
    }
    prefixes.erase(prefix_);
    if (!prefixes.empty()) {
      msg += "; did you mean";
      size_t shown = 0;
      for (const std::string& p : prefixes) {
        if (shown == kMaxSimilar) break;
        msg += std::string(shown > 0 ? " or" : "") + " --prefix '" + p + "'";
        ++shown;
      }
      msg += "?";
    }
    return Status::not_found(msg);
  }

  const std::vector<const SafetensorsFile*>& files_;
  ImportLayout layout_;
  std::string prefix_;
};

Status shape_error(const StTensorView& t, const std::string& expected, const std::string& why) {
  return Status::invalid_argument("tensor '" + t.name + "' has shape " + shape_to_string(t.shape) +
                                  ", expected " + expected + " (" + why + ")");
}

// Integer square root, exact for every int64 >= 0.
int64_t isqrt(int64_t v) {
  auto r = static_cast<int64_t>(std::sqrt(static_cast<double>(v)));
  // Division instead of squaring: (r + 1)^2 can overflow near the top of int64.
  while (r > 0 && r > v / r) --r;
  while (r + 1 <= v / (r + 1)) ++r;
  return r;
}

// The config stored with a trove-layout checkpoint, when one of the files has it.
Result<std::optional<PeerConfig>> trove_metadata_config(
    const std::vector<const SafetensorsFile*>& files, const std::string& prefix) {
  const std::string key = trove_layout_config_key(prefix);
  const SafetensorsFile* source = nullptr;
  const std::string* text = nullptr;
  for (const SafetensorsFile* file : files) {
    auto it = file->metadata().find(key);
    if (it == file->metadata().end()) continue;
    if (text != nullptr && *text != it->second) {
      return Status::invalid_argument("__metadata__[\"" + key + "\"] differs between " +
                                      source->path() + " and " + file->path());
    }
    source = file;
    text = &it->second;
  }
  if (text == nullptr) return std::optional<PeerConfig>();
  const std::string where = source->path() + ": __metadata__[\"" + key + "\"]";
  if (const int depth = json_nesting_depth(*text); depth > kMaxJsonDepth) {
    return Status::invalid_argument(
        str_printf("%s nests %d levels deep; a config is a flat object", where.c_str(), depth));
  }
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return Status::invalid_argument(where + " is not valid JSON: " + clip(*text));
  }
  Result<PeerConfig> config = peer_config_from_json(j);
  if (!config.ok()) return config.status().with_context(where);
  return std::optional<PeerConfig>(*config);
}

Status check_metadata_field(const std::string& key, const char* field, int64_t meta,
                            int64_t from_shapes, const std::string& how) {
  if (meta == from_shapes) return Status::ok_status();
  return Status::invalid_argument(str_printf(
      "__metadata__[\"%s\"] says %s = %lld but the tensors give %lld (%s)", key.c_str(), field,
      static_cast<long long>(meta), static_cast<long long>(from_shapes), how.c_str()));
}

// Canonical query row (head*2 + half)*dk + j from lucidrains' row (half*h + head)*dk + j.
// Rows of length `row_len` (D for the weight, 1 for the bias).
std::vector<float> lucidrains_rows_to_canonical(const std::vector<float>& in, int64_t heads,
                                                int64_t dim_key, int64_t row_len) {
  std::vector<float> out(in.size());
  for (int64_t head = 0; head < heads; ++head) {
    for (int64_t half = 0; half < 2; ++half) {
      for (int64_t j = 0; j < dim_key; ++j) {
        const int64_t dst = (head * 2 + half) * dim_key + j;
        const int64_t src = (half * heads + head) * dim_key + j;
        std::memcpy(&out[dst * row_len], &in[src * row_len], sizeof(float) * row_len);
      }
    }
  }
  return out;
}

// Canonical keys [hk][2][n][dk] from [hk][n][2][dk].
std::vector<float> keys_to_canonical(const std::vector<float>& in, int64_t key_heads,
                                     int64_t n_keys, int64_t dim_key) {
  std::vector<float> out(in.size());
  for (int64_t hh = 0; hh < key_heads; ++hh) {
    for (int64_t c = 0; c < 2; ++c) {
      for (int64_t i = 0; i < n_keys; ++i) {
        const int64_t dst = ((hh * 2 + c) * n_keys + i) * dim_key;
        const int64_t src = ((hh * n_keys + i) * 2 + c) * dim_key;
        std::memcpy(&out[dst], &in[src], sizeof(float) * dim_key);
      }
    }
  }
  return out;
}

}  // namespace

std::string_view import_layout_name(ImportLayout layout) {
  switch (layout) {
    case ImportLayout::kTrove:
      return "trove";
    case ImportLayout::kMikeybeez:
      return "mikeybeez";
    case ImportLayout::kLucidrains:
      return "lucidrains";
  }
  TROVE_CHECK_MSG(false, "bad ImportLayout %d", static_cast<int>(layout));
  return {};
}

Result<ImportLayout> parse_import_layout(std::string_view name) {
  for (ImportLayout l :
       {ImportLayout::kTrove, ImportLayout::kMikeybeez, ImportLayout::kLucidrains}) {
    if (import_layout_name(l) == name) return l;
  }
  return Status::invalid_argument("unknown layout '" + std::string(name) +
                                  "' (accepted: trove, mikeybeez, lucidrains)");
}

std::string trove_layout_config_key(const std::string& prefix) {
  return "trove.layer." + prefix;
}

Result<ImportedLayer> import_layer(const std::vector<const SafetensorsFile*>& files,
                                   ImportLayout layout, const std::string& prefix,
                                   const ImportOverrides& overrides) {
  const LayoutNames names = layout_names(layout);
  const std::string layout_name(import_layout_name(layout));
  const TensorFinder finder(files, layout, prefix);

  // ---- 1. the tensors ------------------------------------------------------------------------
  TROVE_ASSIGN_OR_RETURN(Located down, finder.find(names.down, true));
  TROVE_ASSIGN_OR_RETURN(Located up, finder.find(names.up, true));
  TROVE_ASSIGN_OR_RETURN(Located keys, finder.find(names.keys, true));
  TROVE_ASSIGN_OR_RETURN(Located query, finder.find(names.query_weight, true));
  TROVE_ASSIGN_OR_RETURN(Located bias, finder.find(names.query_bias, false));
  Located norm;
  if (!names.norm.empty()) {
    TROVE_ASSIGN_OR_RETURN(norm, finder.find(names.norm, false));
  }

  // ---- 2. sizes from shapes --------------------------------------------------------------------
  // D and N come from `down`; every other tensor is checked against them.
  const StTensorView& dv = *down.view;
  if (dv.shape.size() != 2 || dv.shape[0] < 1 || dv.shape[1] < 1) {
    return shape_error(dv, "[N, D] with N, D >= 1", "the down projections, one row per expert");
  }
  const int64_t num_experts = dv.shape[0];
  const int64_t dim = dv.shape[1];
  const int64_t n_keys = isqrt(num_experts);
  if (n_keys * n_keys != num_experts) {
    return shape_error(dv, "[N, D] with N = n^2",
                       str_printf("N = %lld is not a perfect square, so it cannot be n_keys^2",
                                  static_cast<long long>(num_experts)));
  }
  const StTensorView& uv = *up.view;
  if (uv.shape.size() != 2 || uv.shape[0] != num_experts || uv.shape[1] < 1) {
    return shape_error(uv, str_printf("[%lld, D_out]", static_cast<long long>(num_experts)),
                       "one up row per expert of " + dv.name + " " + shape_to_string(dv.shape));
  }
  const int64_t dim_out = uv.shape[1];

  const StTensorView& kv = *keys.view;
  const std::string n_why = str_printf("n_keys %lld from %s %s", static_cast<long long>(n_keys),
                                       dv.name.c_str(), shape_to_string(dv.shape).c_str());
  const bool trove_keys = names.keys_head_major_half_first;
  if (kv.shape.size() != 4 || kv.shape[0] < 1 || kv.shape[3] < 1 ||
      kv.shape[trove_keys ? 1 : 2] != 2 || kv.shape[trove_keys ? 2 : 1] != n_keys) {
    return shape_error(kv,
                       trove_keys ? str_printf("[hk, 2, %lld, dk]", static_cast<long long>(n_keys))
                                  : str_printf("[h, %lld, 2, dk]", static_cast<long long>(n_keys)),
                       n_why);
  }
  const int64_t key_heads = kv.shape[0];
  const int64_t dim_key = kv.shape[3];

  const StTensorView& qv = *query.view;
  const std::string q_expected =
      str_printf("[h*2*%lld, %lld]", static_cast<long long>(dim_key), static_cast<long long>(dim));
  if (qv.shape.size() != 2 || qv.shape[1] != dim) {
    return shape_error(qv, q_expected,
                       str_printf("D = %lld from %s %s", static_cast<long long>(dim),
                                  dv.name.c_str(), shape_to_string(dv.shape).c_str()));
  }
  if (qv.shape[0] < 1 || qv.shape[0] % (2 * dim_key) != 0) {
    return shape_error(qv, q_expected,
                       str_printf("rows must be heads * 2 * dim_key with dim_key %lld from %s %s",
                                  static_cast<long long>(dim_key), kv.name.c_str(),
                                  shape_to_string(kv.shape).c_str()));
  }
  const int64_t heads = qv.shape[0] / (2 * dim_key);
  const std::string h_why = str_printf("heads %lld from %s %s", static_cast<long long>(heads),
                                       qv.name.c_str(), shape_to_string(qv.shape).c_str());
  bool shared_keys = false;
  if (trove_keys) {
    if (key_heads != heads && key_heads != 1) {
      return shape_error(
          kv,
          str_printf("[%lld or 1, 2, %lld, %lld]", static_cast<long long>(heads),
                     static_cast<long long>(n_keys), static_cast<long long>(dim_key)),
          h_why);
    }
    shared_keys = key_heads == 1 && heads > 1;
  } else if (key_heads != heads) {
    return shape_error(kv,
                       str_printf("[%lld, %lld, 2, %lld]", static_cast<long long>(heads),
                                  static_cast<long long>(n_keys), static_cast<long long>(dim_key)),
                       h_why + "; layout " + layout_name + " has one key set per head");
  }
  if (bias && (bias.view->shape.size() != 1 || bias.view->shape[0] != qv.shape[0])) {
    return shape_error(*bias.view, str_printf("[%lld]", static_cast<long long>(qv.shape[0])),
                       "one bias per row of " + qv.name + " " + shape_to_string(qv.shape));
  }
  if (norm && (norm.view->shape.size() != 1 || norm.view->shape[0] != dim)) {
    return shape_error(*norm.view, str_printf("[%lld]", static_cast<long long>(dim)),
                       str_printf("D = %lld from %s %s", static_cast<long long>(dim),
                                  dv.name.c_str(), shape_to_string(dv.shape).c_str()));
  }
  if (overrides.heads && *overrides.heads != heads) {
    return Status::invalid_argument(str_printf("--heads %lld disagrees with the tensors: %s",
                                               static_cast<long long>(*overrides.heads),
                                               h_why.c_str()));
  }

  // ---- 3. the config: layout defaults < metadata < overrides -----------------------------------
  PeerConfig config;
  bool topk_known = false;
  std::optional<PeerConfig> meta;
  if (layout == ImportLayout::kTrove) {
    TROVE_ASSIGN_OR_RETURN(meta, trove_metadata_config(files, prefix));
  }
  if (meta) {
    const std::string key = trove_layout_config_key(prefix);
    TROVE_RETURN_IF_ERROR(check_metadata_field(key, "dim", meta->dim, dim,
                                               dv.name + " " + shape_to_string(dv.shape)));
    TROVE_RETURN_IF_ERROR(check_metadata_field(key, "dim_out", meta->dim_out, dim_out,
                                               uv.name + " " + shape_to_string(uv.shape)));
    TROVE_RETURN_IF_ERROR(check_metadata_field(key, "n_keys", meta->n_keys, n_keys,
                                               dv.name + " " + shape_to_string(dv.shape)));
    TROVE_RETURN_IF_ERROR(check_metadata_field(key, "dim_key", meta->dim_key, dim_key,
                                               kv.name + " " + shape_to_string(kv.shape)));
    TROVE_RETURN_IF_ERROR(check_metadata_field(key, "heads", meta->heads, heads,
                                               qv.name + " " + shape_to_string(qv.shape)));
    // With one head, hk = 1 is both shared and per-head keys: the metadata decides.
    TROVE_RETURN_IF_ERROR(check_metadata_field(key, "key heads (shared_keys ? 1 : heads)",
                                               meta->key_heads(), key_heads,
                                               kv.name + " " + shape_to_string(kv.shape)));
    if (meta->query_bias != static_cast<bool>(bias)) {
      return Status::invalid_argument(
          "__metadata__[\"" + key +
          "\"] says query_bias = " + (meta->query_bias ? "true" : "false") + " but tensor '" +
          finder.full_name(names.query_bias[0]) + "' is " + (bias ? "present" : "absent"));
    }
    if (meta->input_norm == InputNorm::kNone && norm) {
      return Status::invalid_argument("__metadata__[\"" + key +
                                      "\"] says input_norm = none but tensor '" + norm.view->name +
                                      "' is present");
    }
    config = *meta;
    shared_keys = meta->shared_keys;
    topk_known = true;
  } else {
    switch (layout) {
      case ImportLayout::kTrove:
        config.input_norm = norm ? InputNorm::kRms : InputNorm::kNone;
        break;
      case ImportLayout::kMikeybeez:
        config.activation = Activation::kSilu;
        config.gate = Gate::kRelu;
        config.input_norm = InputNorm::kNone;
        break;
      case ImportLayout::kLucidrains:
        config.activation = Activation::kGelu;
        config.gate = Gate::kRelu;
        config.input_norm = norm ? InputNorm::kRms : InputNorm::kNone;
        config.norm_eps = kLucidrainsNormEps;
        break;
    }
  }
  config.dim = dim;
  config.dim_out = dim_out;
  config.heads = heads;
  config.n_keys = n_keys;
  config.dim_key = dim_key;
  config.shared_keys = shared_keys;
  config.query_bias = static_cast<bool>(bias);

  if (overrides.activation) config.activation = *overrides.activation;
  if (overrides.gate) config.gate = *overrides.gate;
  if (overrides.input_norm) config.input_norm = *overrides.input_norm;
  if (overrides.norm_eps) config.norm_eps = *overrides.norm_eps;
  const bool lucidrains = layout == ImportLayout::kLucidrains;
  const int64_t default_topk = lucidrains ? kLucidrainsDefaultTopk : kDefaultTopk;
  const int64_t default_topk_per_half = lucidrains ? kLucidrainsDefaultTopkPerHalf : kDefaultTopk;
  if (overrides.topk) {
    // --topk alone means k' = k (SPEC §2's default), even over a metadata k'.
    config.topk = *overrides.topk;
    config.topk_per_half = overrides.topk_per_half.value_or(*overrides.topk);
  } else if (overrides.topk_per_half) {
    config.topk_per_half = *overrides.topk_per_half;
    if (!topk_known) config.topk = default_topk;
  } else if (!topk_known) {
    if (n_keys < default_topk_per_half) {
      return Status::invalid_argument(str_printf(
          "layout %s does not record topk and the default topk = %lld, topk_per_half = %lld "
          "needs n_keys >= %lld, but n_keys is %lld (%s); pass --topk (and --topk-per-half <= "
          "n_keys)",
          layout_name.c_str(), static_cast<long long>(default_topk),
          static_cast<long long>(default_topk_per_half),
          static_cast<long long>(default_topk_per_half), static_cast<long long>(n_keys),
          n_why.c_str()));
    }
    config.topk = default_topk;
    config.topk_per_half = default_topk_per_half;
  }

  if (config.input_norm == InputNorm::kRms && !norm) {
    if (names.norm.empty()) {
      return Status::invalid_argument("input_norm = rms, but layout " + layout_name +
                                      " has no norm tensor");
    }
    return Status::not_found("input_norm = rms needs tensor '" + finder.full_name(names.norm) +
                             "', which is not in the files (layout " + layout_name + ")");
  }
  TROVE_RETURN_IF_ERROR(config.validate_and_fill().with_context("layer '" + prefix + "' (layout " +
                                                                layout_name + ")"));

  // ---- 4. dense tensors in canonical order -----------------------------------------------------
  ImportedLayer out;
  out.prefix = prefix;
  TROVE_ASSIGN_OR_RETURN(out.query_weight, query.file->read_f32(qv.name));
  if (bias) {
    TROVE_ASSIGN_OR_RETURN(out.query_bias, bias.file->read_f32(bias.view->name));
  }
  if (names.query_rows_half_major) {
    out.query_weight = lucidrains_rows_to_canonical(out.query_weight, heads, dim_key, dim);
    if (bias) out.query_bias = lucidrains_rows_to_canonical(out.query_bias, heads, dim_key, 1);
  }
  TROVE_ASSIGN_OR_RETURN(out.keys, keys.file->read_f32(kv.name));
  if (!trove_keys) out.keys = keys_to_canonical(out.keys, key_heads, n_keys, dim_key);
  if (config.input_norm == InputNorm::kRms) {
    TROVE_ASSIGN_OR_RETURN(out.norm_weight, norm.file->read_f32(norm.view->name));
    if (layout == ImportLayout::kLucidrains) {
      // F.normalize(x) * sqrt(D) * (gamma + 1) = x / rms(x) * (gamma + 1).
      for (float& g : out.norm_weight) g += 1.0f;
    }
  }
  out.config = config;
  out.down = down.view;
  out.up = up.view;
  out.source_file = down.file->path();
  return out;
}

}  // namespace trove
