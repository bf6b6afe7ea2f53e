// Engram layers in a .trove store (issue 18; storage/FORMAT.md "Engram layers"). An Engram
// layer is a store layer whose info has "kind": "engram": its record table holds the rows of
// all its (max_ngram - 1) * heads hash tables back to back (table k's row r is global row
// k * vocab + r), rows_per_record rows a record (kernels/engram.h), so the store's per-record
// checksums, regions, tiers and generations serve it as they serve PEER tables. Its dense
// tensors are the module's torch layers: value_proj.weight and key_proj.weight [D, E],
// norm_k.weight and norm_q.weight [D], conv.weight [D, 1, K].
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/dtype.h"
#include "base/status.h"
#include "kernels/engram.h"
#include "kernels/quant.h"
#include "storage/store.h"

namespace trove {

struct EngramConfig {
  int64_t hidden = 0;          // D, the model's hidden size
  int64_t embed_per_head = 0;  // e, elements of a row
  int64_t kernel_size = 4;     // the depthwise causal conv's K
  int64_t layer_idx = 0;       // the model layer (the multipliers' seed), informational
  EngramHash hash;             // max_ngram, heads, vocab, multipliers

  int64_t tables() const { return hash.tables(); }
  int64_t rows() const { return tables() * hash.vocab; }
  int64_t concat_dim() const { return tables() * embed_per_head; }  // E
  // Errors naming the field.
  Status validate() const;
};

inline constexpr const char* kEngramKind = "engram";

// The info.rows object of a table of `rows` rows (tables x vocab) in `layout`.
nlohmann::json engram_rows_json(const EngramRowLayout& layout, int64_t tables, int64_t rows);

// Whether a store layer is an Engram layer (info.kind == "engram"); PEER layers have no kind.
bool is_engram_layer(const StoreLayerInfo& layer);

nlohmann::json engram_config_json(const EngramConfig& c);
Result<EngramConfig> engram_config_from_json(const nlohmann::json& j);

// A stored Engram layer's config and row layout, checked against its table: Corruption naming
// the store, layer and field when info and table disagree, NotSupported for a row encoding
// this build does not decode.
struct EngramStoredLayer {
  EngramConfig config;
  EngramRowLayout rows;
};
Result<EngramStoredLayer> read_engram_layer(const StoreReader& store, const StoreLayerInfo& layer);

// The module's dense tensors, fp32 row-major.
struct EngramDense {
  std::vector<float> value_proj;  // [D, E]
  std::vector<float> key_proj;    // [D, E]
  std::vector<float> norm_k;      // [D]
  std::vector<float> norm_q;      // [D]
  std::vector<float> conv;        // [D, 1, K]
};
Result<EngramDense> read_engram_dense(const StoreReader& store, const StoreLayerInfo& layer,
                                      const EngramConfig& config);

// Writes one Engram layer into `w`: `table(k, begin, count, out)` fills rows begin..begin+count
// of table k as fp32 [count, e] (streamed, so a table never has to sit in memory whole). Values
// must be finite and in range for `dtype`: an error names the table and row. `source` goes to
// info.source. Returns the reconstruction error of the stored rows.
using EngramTableFill =
    std::function<Status(int64_t table, int64_t begin, int64_t count, float* out)>;
Result<QuantError> write_engram_layer(StoreWriter* w, const std::string& name,
                                      const EngramConfig& config, DType dtype,
                                      const EngramTableFill& table, const EngramDense& dense,
                                      const nlohmann::json& source = nlohmann::json::object(),
                                      size_t min_record_bytes = 512);

// `trove inspect`'s report of an Engram layer (config, row encoding, record size, table bytes
// and the bf16 size they replace, overhead over the useful row bytes, quantization error,
// dense tensors) and its rendering.
Result<nlohmann::json> engram_inspect_json(const StoreReader& store, const StoreLayerInfo& layer);
std::string render_engram_inspect(const nlohmann::json& j);

}  // namespace trove
