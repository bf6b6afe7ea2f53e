// Import of the background's Engram layers (LlamaEngram, layout `mikeybeez`) from safetensors:
//
//   P.embeddings.{j}.weight [vocab, e]   j = 0 .. (max_ngram - 1) * heads - 1, F32/F16/BF16
//   P.value_proj.weight, P.key_proj.weight [D, (max_ngram - 1) * heads * e]
//   P.norm_k.weight, P.norm_q.weight [D]
//   P.conv.weight [D, 1, K]
//   P.hash_mult [max_ngram] (I64, the module's buffer: the odd multipliers)
//
// max_ngram comes from hash_mult, heads from the number of tables; shapes that disagree are
// errors naming the tensor, its shape and the expected one. Tables stay views into the mapped
// files (they can be GBs); the rest is copied to fp32.
#pragma once

#include <string>
#include <vector>

#include "base/status.h"
#include "runtime/engram/engram_store.h"
#include "storage/safetensors.h"

namespace trove {

struct ImportedEngram {
  std::string prefix;
  EngramConfig config;
  EngramDense dense;
  std::vector<const StTensorView*> tables;  // [tables] of [vocab, e]
  std::string source_file;                  // file holding table 0
  std::string source_dtype;                 // "BF16", ...
};

// Tensors are looked up across `files` (shards); a name in two files is an error. The files
// must outlive the result.
Result<ImportedEngram> import_engram(const std::vector<const SafetensorsFile*>& files,
                                     const std::string& prefix);

// Writes `layer` into `w` as an Engram layer of `dtype` (rows read from the mapped tables a
// chunk at a time). Returns the reconstruction error of the stored rows.
Result<QuantError> write_imported_engram(StoreWriter* w, const std::string& name,
                                         const ImportedEngram& layer, DType dtype);

}  // namespace trove
