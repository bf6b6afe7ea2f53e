// unpack: a store's layers back to safetensors in the trove layout, streamed table by table.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>

#include "base/progress.h"
#include "base/strings.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/ref/quant_ref.h"
#include "runtime/convert/layouts.h"
#include "runtime/convert/pack.h"
#include "runtime/layer/peer_config_json.h"
#include "runtime/layer/store_layer.h"

namespace trove {

namespace {

// Streams one expert table (down or up) of a stored layer as a safetensors tensor: the
// writer asks for byte ranges, and each range is served by reading, verifying and dequantizing
// just the records it covers.
class TableFiller {
 public:
  TableFiller(const StoreReader& store, const StoredLayer& layer, bool up, StDType dtype,
              ProgressBar* bar)
      : store_(store),
        layer_(layer),
        up_(up),
        dtype_(dtype),
        out_dtype_(st_float_dtype(dtype)),
        bar_(bar) {}

  Status operator()(uint64_t offset, std::span<uint8_t> chunk) {
    const RecordLayout& rec = layer_.record;
    const uint64_t row_len = static_cast<uint64_t>(up_ ? rec.dim_out : rec.dim);
    const uint64_t esize = st_dtype_size(dtype_);
    const uint64_t row_bytes = row_len * esize;
    const uint64_t end = offset + chunk.size();
    const int64_t first = static_cast<int64_t>(offset / row_bytes);
    const int64_t last = static_cast<int64_t>((end + row_bytes - 1) / row_bytes);  // exclusive
    const int64_t count = last - first;
    rows_.resize(static_cast<size_t>(count) * row_len);
    bytes_.resize(static_cast<size_t>(count) * row_bytes);
    // Read through checked I/O and verified: a sector the disk cannot read is an error naming
    // the expert and errno, never a SIGBUS from a mapping.
    ids_.resize(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) ids_[static_cast<size_t>(i)] = first + i;
    records_.resize(static_cast<size_t>(count) * rec.stride);
    TROVE_RETURN_IF_ERROR(store_.read_records(*layer_.info, ids_, records_));
    unpack_records(rec, records_.data(), count, up_ ? nullptr : rows_.data(),
                   up_ ? rows_.data() : nullptr);
    convert_row_ref(out_dtype_, rows_.data(), count * static_cast<int64_t>(row_len), bytes_.data());
    std::memcpy(chunk.data(), bytes_.data() + (offset - static_cast<uint64_t>(first) * row_bytes),
                chunk.size());
    if (bar_ != nullptr) bar_->add(chunk.size());
    return {};
  }

 private:
  const StoreReader& store_;
  const StoredLayer& layer_;
  bool up_;
  StDType dtype_;
  DType out_dtype_;  // the same type, as the kernels name it
  ProgressBar* bar_;
  std::vector<float> rows_;
  std::vector<uint8_t> bytes_;
  std::vector<int64_t> ids_;
  std::vector<uint8_t> records_;
};

std::span<const uint8_t> as_bytes(const std::vector<float>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(float)};
}

}  // namespace

Result<UnpackReport> unpack_store(const UnpackOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (!st_dtype_is_float(options.dtype)) {
    return Status::invalid_argument(std::string("unpack: output dtype ") +
                                    st_dtype_name(options.dtype) + " is not one of F32, F16, BF16");
  }
  TROVE_ASSIGN_OR_RETURN(StoreReader store, StoreReader::open(options.input));

  std::vector<StoredLayer> layers;
  if (options.layers.empty()) {
    for (const auto& l : store.layers()) {
      // Engram tables (runtime/engram) are not PEER layers; unpack writes the PEER ones.
      if (l.info.is_object() && l.info.value("kind", nlohmann::json()) == "engram") continue;
      TROVE_ASSIGN_OR_RETURN(StoredLayer s, load_stored_layer(store, l));
      layers.push_back(s);
    }
  } else {
    for (const auto& name : options.layers) {
      TROVE_ASSIGN_OR_RETURN(StoredLayer s, load_stored_layer(store, name));
      layers.push_back(s);
    }
  }

  // Dense tensors are small: read (and verify) them all before the writer starts.
  std::vector<std::vector<float>> dense;
  std::vector<StTensorOut> tensors;
  std::map<std::string, std::string> metadata = {{"trove.layout", "trove"},
                                                 {"trove.source", store.path()}};
  uint64_t table_bytes = 0;
  dense.reserve(layers.size() * 4);
  for (const StoredLayer& layer : layers) {
    const std::string& name = layer.info->name;
    metadata[trove_layout_config_key(name)] = peer_config_to_json(layer.config).dump();
    for (const StoreDenseInfo& d : layer.info->dense) {
      TROVE_ASSIGN_OR_RETURN(std::vector<float> data, store.read_dense(*layer.info, d.name));
      dense.push_back(std::move(data));
      tensors.push_back({name + "." + d.name, StDType::kF32, d.shape, as_bytes(dense.back()), {}});
    }
    table_bytes += static_cast<uint64_t>(layer.config.num_experts()) *
                   static_cast<uint64_t>(layer.config.dim + layer.config.dim_out) *
                   st_dtype_size(options.dtype);
  }

  ProgressBar bar("unpacking", table_bytes, ProgressBar::Unit::kBytes);
  std::vector<std::unique_ptr<TableFiller>> fillers;
  for (size_t li = 0; li < layers.size(); ++li) {
    const StoredLayer& layer = layers[li];
    const std::string& name = layer.info->name;
    const int64_t n = layer.config.num_experts();
    for (bool up : {false, true}) {
      fillers.push_back(std::make_unique<TableFiller>(store, layer, up, options.dtype, &bar));
      TableFiller* f = fillers.back().get();
      tensors.push_back({name + (up ? ".up" : ".down"),
                         options.dtype,
                         {n, up ? layer.config.dim_out : layer.config.dim},
                         {},
                         [f](uint64_t off, std::span<uint8_t> chunk) { return (*f)(off, chunk); }});
    }
  }
  TROVE_RETURN_IF_ERROR(write_safetensors(options.output, tensors, metadata));
  bar.finish();

  UnpackReport report;
  report.tensors = static_cast<int64_t>(tensors.size());
  struct stat st;
  if (::stat(options.output.c_str(), &st) == 0)
    report.output_bytes = static_cast<uint64_t>(st.st_size);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace trove
