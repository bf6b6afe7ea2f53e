// pack: safetensors checkpoint(s) -> .trove store; unpack: .trove store -> safetensors in the
// `trove` layout (dequantized). Both stream expert tables in chunks, so a 20 GB table never
// sits in memory, and both write through AtomicFileWriter: the destination holds either its
// previous content or the complete new file, whatever happens to the process.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/dtype.h"
#include "base/status.h"
#include "kernels/quant.h"
#include "kernels/record.h"
#include "runtime/convert/layouts.h"
#include "storage/safetensors.h"

namespace trove {

// One layer to import: its tensor-name prefix in the checkpoint and its name in the store
// (the prefix when empty).
struct PackLayerRequest {
  std::string prefix;
  std::string name;
};

struct PackOptions {
  std::vector<std::string> inputs;  // one checkpoint, or the shards of one
  std::string output;
  ImportLayout layout = ImportLayout::kTrove;
  std::vector<PackLayerRequest> layers;  // PEER layers; with engram_layers, at least one
  // Engram layers (runtime/engram, layout mikeybeez only), stored beside the PEER layers with
  // rows of `dtype`.
  std::vector<PackLayerRequest> engram_layers;
  DType dtype = DType::kI4;  // expert record dtype
  ImportOverrides overrides;
  size_t stride_align = 64;  // 64 (dense), 512 or 4096 (no O_DIRECT read amplification)
  int threads = 0;           // 0: all cores
  std::string command_line;  // recorded in the manifest's provenance
};

struct PackedLayer {
  std::string name;
  std::string prefix;
  PeerConfig config;
  RecordLayout record;
  std::string source_dtype;  // "BF16", ...
  QuantError down_error;     // reconstruction error of the stored down table vs the source
  QuantError up_error;
};

struct PackedEngram {
  std::string name;
  std::string prefix;
  int64_t tables = 0;
  int64_t rows = 0;
  int64_t dim = 0;
  uint64_t table_bytes = 0;
  std::string source_dtype;
  QuantError error;
};

struct PackReport {
  std::vector<PackedLayer> layers;
  std::vector<PackedEngram> engram_layers;
  uint64_t output_bytes = 0;
  uint64_t source_bytes = 0;  // bytes of expert tables read from the checkpoint
  double seconds = 0;
};

Result<PackReport> pack_store(const PackOptions& options);

struct UnpackOptions {
  std::string input;
  std::string output;
  StDType dtype = StDType::kF32;    // F32, F16 or BF16
  std::vector<std::string> layers;  // empty: all
};

struct UnpackReport {
  uint64_t output_bytes = 0;
  int64_t tensors = 0;
  double seconds = 0;
};

Result<UnpackReport> unpack_store(const UnpackOptions& options);

// The "record" object of a stored layer's info (what runtime/layer/store_layer.h reads back).
nlohmann::json record_layout_json(const RecordLayout& record);

}  // namespace trove
