// pack: checkpoint(s) -> .trove store, streamed in chunks of experts (runtime/convert/pack.h).
#include "runtime/convert/pack.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <set>
#include <thread>

#include "base/bytes.h"
#include "base/half.h"
#include "base/log.h"
#include "base/progress.h"
#include "base/strings.h"
#include "kernels/cpu/quant.h"
#include "runtime/engram/engram_import.h"
#include "runtime/layer/peer_config_json.h"
#include "storage/store.h"

namespace trove {

namespace {

// Experts converted per chunk: enough to keep every core busy, small enough (~32 MiB of fp32)
// that packing a table of any size needs a fixed amount of memory.
int64_t chunk_experts(int64_t row_floats) {
  const int64_t kChunkBytes = 32 << 20;
  return std::max<int64_t>(1, kChunkBytes / (row_floats * static_cast<int64_t>(sizeof(float))));
}

std::string iso_time_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

nlohmann::json quant_error_json(const QuantError& e) {
  return {
      {"rmse", e.rmse()}, {"max_abs", e.max_abs}, {"rel_fro", e.rel_fro()}, {"elements", e.count}};
}

// Checks every row of a chunk before it is quantized, so a NaN or an out-of-range value is
// reported with the tensor and the row instead of producing an infinite scale.
Status check_rows(DType dtype, const std::string& tensor, const float* rows, int64_t first,
                  int64_t count, int64_t len) {
  for (int64_t r = 0; r < count; ++r) {
    Status s = quant_check_range(dtype, rows + r * len, len);
    if (!s.ok()) {
      return Status::invalid_argument(str_printf("tensor %s row %lld: %s; %s cannot hold it",
                                                 tensor.c_str(), static_cast<long long>(first + r),
                                                 s.message().c_str(),
                                                 std::string(dtype_name(dtype)).c_str()));
    }
  }
  return {};
}

// The router's tensors (W_q, its bias, the keys, the norm's gamma) must be finite: a NaN or
// an infinity there makes every token's scores NaN, and forward would route on them (or
// return NaN) with no error. Errors name the file, the layer, the tensor (as stored) and the
// element's index.
Status check_finite_router(const ImportedLayer& layer) {
  const PeerConfig& c = layer.config;
  struct Tensor {
    const char* name;
    const std::vector<float>& values;
    std::vector<int64_t> shape;
  };
  const Tensor tensors[] = {
      {"query.weight", layer.query_weight, {c.query_rows(), c.dim}},
      {"query.bias", layer.query_bias, {c.query_rows()}},
      {"keys", layer.keys, {c.key_heads(), 2, c.n_keys, c.dim_key}},
      {"norm.weight", layer.norm_weight, {c.dim}},
  };
  for (const Tensor& t : tensors) {
    for (size_t i = 0; i < t.values.size(); ++i) {
      const float v = t.values[i];
      if (std::isfinite(v)) continue;
      // The index in the tensor's shape, outermost first.
      std::vector<int64_t> index(t.shape.size());
      uint64_t rest = i;
      for (size_t k = t.shape.size(); k-- > 0;) {
        const uint64_t dim = static_cast<uint64_t>(std::max<int64_t>(t.shape[k], 1));
        index[k] = static_cast<int64_t>(rest % dim);
        rest /= dim;
      }
      return Status::invalid_argument(str_printf(
          "%s: layer %s: tensor %s %s, element %s (flat index %zu) is %s; the router's "
          "parameters must be finite (forward would route every token on NaN scores)",
          layer.source_file.c_str(), layer.prefix.c_str(), t.name, shape_to_string(t.shape).c_str(),
          shape_to_string(index).c_str(), i, std::isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf")));
    }
  }
  return {};
}

std::string tensor_label(const StTensorView* t) {
  return t == nullptr ? "?" : t->name;
}

// Converts, checks, packs and measures experts [first, first + count) of a layer into
// `records`, on `threads` workers. The work is cut into fixed blocks of experts whose error
// sums are merged in block order, so the result (bytes and statistics) does not depend on
// the thread count; the first failing block's error is returned.
Status pack_chunk(const ImportedLayer& layer, const RecordLayout& rec, int64_t first, int64_t count,
                  int threads, float* down, float* up, float* down_back, float* up_back,
                  uint8_t* records, QuantError* down_error, QuantError* up_error) {
  constexpr int64_t kBlock = 64;
  const int64_t d = rec.dim;
  const int64_t d_out = rec.dim_out;
  const int64_t blocks = (count + kBlock - 1) / kBlock;
  std::vector<Status> status(static_cast<size_t>(blocks));
  std::vector<QuantError> down_err(status.size()), up_err(status.size());
  auto run_block = [&](int64_t b) {
    const int64_t lo = b * kBlock;
    const int64_t n = std::min(kBlock, count - lo);
    float* block_down = down + lo * d;
    float* block_up = up + lo * d_out;
    Status& st = status[static_cast<size_t>(b)];
    st = read_rows_f32(*layer.down, first + lo, n, block_down);
    if (st.ok()) st = read_rows_f32(*layer.up, first + lo, n, block_up);
    if (st.ok()) st = check_rows(rec.dtype, tensor_label(layer.down), block_down, first + lo, n, d);
    if (st.ok()) st = check_rows(rec.dtype, tensor_label(layer.up), block_up, first + lo, n, d_out);
    if (!st.ok()) return;
    uint8_t* out = records + static_cast<size_t>(lo) * rec.stride;
    pack_records(rec, block_down, block_up, n, out, /*threads=*/1);
    unpack_records(rec, out, n, down_back + lo * d, up_back + lo * d_out, /*threads=*/1);
    down_err[static_cast<size_t>(b)].add(block_down, down_back + lo * d, n * d);
    up_err[static_cast<size_t>(b)].add(block_up, up_back + lo * d_out, n * d_out);
  };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w) {
    pool.emplace_back([&, w] {
      for (int64_t b = w; b < blocks; b += workers) run_block(b);
    });
  }
  for (int64_t b = 0; b < blocks; b += workers) run_block(b);
  for (std::thread& t : pool) t.join();
  for (size_t b = 0; b < status.size(); ++b) {
    TROVE_RETURN_IF_ERROR(status[b]);
    down_error->merge(down_err[b]);
    up_error->merge(up_err[b]);
  }
  return {};
}

}  // namespace

nlohmann::json record_layout_json(const RecordLayout& r) {
  nlohmann::json j = {{"dtype", dtype_name(r.dtype)},
                      {"dim", r.dim},
                      {"dim_out", r.dim_out},
                      {"width", r.width},
                      {"record_bytes", r.record_bytes},
                      {"stride", r.stride},
                      {"down_codes_offset", r.down_codes_offset},
                      {"up_codes_offset", r.up_codes_offset}};
  if (dtype_is_quantized(r.dtype)) {
    j["group"] = kQuantGroup;
    j["scale_dtype"] = "f16";
    j["down_scales_offset"] = r.down_scales_offset;
    j["up_scales_offset"] = r.up_scales_offset;
    if (r.dtype == DType::kI4) j["nibble_order"] = "ggml_q4_0";
  }
  return j;
}

Result<PackReport> pack_store(const PackOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (options.inputs.empty()) return Status::invalid_argument("pack: no input checkpoint given");
  if (options.layers.empty() && options.engram_layers.empty()) {
    return Status::invalid_argument("pack: no layer given; name one with --prefix (or --engram)");
  }
  if (!options.engram_layers.empty() && options.layout != ImportLayout::kMikeybeez) {
    return Status::invalid_argument(std::string("pack: Engram layers (--engram) come from the "
                                                "mikeybeez layout; this pack is --layout ") +
                                    std::string(import_layout_name(options.layout)));
  }
  if (options.output.empty()) return Status::invalid_argument("pack: no output path (-o) given");

  std::vector<SafetensorsFile> files;
  files.reserve(options.inputs.size());
  for (const std::string& path : options.inputs) {
    TROVE_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::open(path));
    files.push_back(std::move(f));
  }
  std::vector<const SafetensorsFile*> file_ptrs;
  for (const auto& f : files) file_ptrs.push_back(&f);

  // Import (and so validate) every layer before writing anything.
  std::vector<ImportedLayer> imported;
  std::set<std::string> names;
  PackReport report;
  for (const PackLayerRequest& req : options.layers) {
    const std::string name = req.name.empty() ? req.prefix : req.name;
    if (name.empty()) {
      return Status::invalid_argument("pack: a layer needs a name when its prefix is empty");
    }
    if (!names.insert(name).second) {
      return Status::invalid_argument("pack: layer name '" + name + "' given twice");
    }
    TROVE_ASSIGN_OR_RETURN(ImportedLayer layer,
                           import_layer(file_ptrs, options.layout, req.prefix, options.overrides));
    TROVE_ASSIGN_OR_RETURN(RecordLayout record,
                           RecordLayout::make(options.dtype, layer.config.dim, layer.config.dim_out,
                                              layer.config.expert_width, options.stride_align));
    PackedLayer packed;
    packed.name = name;
    packed.prefix = req.prefix;
    packed.config = layer.config;
    packed.record = record;
    packed.source_dtype = st_dtype_name(layer.down->dtype);
    report.source_bytes += layer.down->bytes.size() + layer.up->bytes.size();
    report.layers.push_back(std::move(packed));
    imported.push_back(std::move(layer));
  }

  std::vector<ImportedEngram> engram;
  for (const PackLayerRequest& req : options.engram_layers) {
    const std::string name = req.name.empty() ? req.prefix : req.name;
    if (name.empty()) {
      return Status::invalid_argument(
          "pack: an Engram layer needs a name when its prefix is "
          "empty");
    }
    if (!names.insert(name).second) {
      return Status::invalid_argument("pack: layer name '" + name + "' given twice");
    }
    TROVE_ASSIGN_OR_RETURN(ImportedEngram layer, import_engram(file_ptrs, req.prefix));
    PackedEngram packed;
    packed.name = name;
    packed.prefix = req.prefix;
    packed.tables = layer.config.tables();
    packed.rows = layer.config.rows();
    packed.dim = layer.config.embed_per_head;
    packed.source_dtype = layer.source_dtype;
    for (const StTensorView* t : layer.tables) report.source_bytes += t->bytes.size();
    report.engram_layers.push_back(std::move(packed));
    engram.push_back(std::move(layer));
  }

  nlohmann::json sources = nlohmann::json::array();
  for (const auto& f : files) sources.push_back({{"file", f.path()}, {"bytes", f.file_size()}});
  const nlohmann::json provenance = {{"tool", "trove " TROVE_VERSION},
                                     {"created", iso_time_now()},
                                     {"command", options.command_line},
                                     {"layout", import_layout_name(options.layout)},
                                     {"sources", sources}};
  // Before any file is created: a bad router fails in a second, not after the tables.
  for (const ImportedLayer& layer : imported) TROVE_RETURN_IF_ERROR(check_finite_router(layer));
  TROVE_ASSIGN_OR_RETURN(StoreWriter writer, StoreWriter::create(options.output, provenance));

  ProgressBar bar("packing", report.source_bytes, ProgressBar::Unit::kBytes);
  uint64_t done_bytes = 0;

  for (size_t li = 0; li < imported.size(); ++li) {
    const ImportedLayer& layer = imported[li];
    PackedLayer& packed = report.layers[li];
    const RecordLayout& rec = packed.record;
    const int64_t n_experts = layer.config.num_experts();
    const int64_t d = layer.config.dim;
    const int64_t d_out = layer.config.dim_out;

    nlohmann::json info = {{"config", peer_config_to_json(layer.config)},
                           {"record", record_layout_json(rec)},
                           {"source",
                            {{"file", layer.source_file},
                             {"prefix", layer.prefix},
                             {"layout", import_layout_name(options.layout)},
                             {"dtype", packed.source_dtype}}}};
    StoreTableSpec table{std::string(dtype_name(rec.dtype)), static_cast<uint64_t>(n_experts),
                         rec.record_bytes, rec.stride};
    TROVE_RETURN_IF_ERROR(writer.begin_layer(packed.name, info, table));

    const int64_t chunk = chunk_experts(d + d_out);
    const int threads = options.threads > 0
                            ? options.threads
                            : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    std::vector<float> down(static_cast<size_t>(chunk * d));
    std::vector<float> up(static_cast<size_t>(chunk * d_out));
    std::vector<float> down_back(down.size());
    std::vector<float> up_back(up.size());
    std::vector<uint8_t> records(static_cast<size_t>(chunk) * rec.stride);
    for (int64_t first = 0; first < n_experts; first += chunk) {
      const int64_t count = std::min(chunk, n_experts - first);
      TROVE_RETURN_IF_ERROR(pack_chunk(layer, rec, first, count, threads, down.data(), up.data(),
                                       down_back.data(), up_back.data(), records.data(),
                                       &packed.down_error, &packed.up_error));
      TROVE_RETURN_IF_ERROR(
          writer.append_records({records.data(), static_cast<size_t>(count) * rec.stride}));
      done_bytes += static_cast<uint64_t>(count) *
                    (static_cast<uint64_t>(d) * st_dtype_size(layer.down->dtype) +
                     static_cast<uint64_t>(d_out) * st_dtype_size(layer.up->dtype));
      bar.update(done_bytes);
    }
    info["quant_error"] = {{"down", quant_error_json(packed.down_error)},
                           {"up", quant_error_json(packed.up_error)}};
    TROVE_RETURN_IF_ERROR(writer.update_layer_info(info));

    const int64_t qrows = layer.config.query_rows();
    TROVE_RETURN_IF_ERROR(writer.add_dense("query.weight", {qrows, d}, layer.query_weight));
    if (!layer.query_bias.empty()) {
      TROVE_RETURN_IF_ERROR(writer.add_dense("query.bias", {qrows}, layer.query_bias));
    }
    TROVE_RETURN_IF_ERROR(writer.add_dense(
        "keys", {layer.config.key_heads(), 2, layer.config.n_keys, layer.config.dim_key},
        layer.keys));
    if (!layer.norm_weight.empty()) {
      TROVE_RETURN_IF_ERROR(writer.add_dense("norm.weight", {d}, layer.norm_weight));
    }
    TROVE_RETURN_IF_ERROR(writer.end_layer());
  }
  for (size_t li = 0; li < engram.size(); ++li) {
    PackedEngram& packed = report.engram_layers[li];
    TROVE_ASSIGN_OR_RETURN(packed.error,
                           write_imported_engram(&writer, packed.name, engram[li], options.dtype));
    TROVE_ASSIGN_OR_RETURN(const EngramRowLayout rows,
                           EngramRowLayout::make(options.dtype, packed.dim));
    packed.table_bytes = static_cast<uint64_t>(rows.records(packed.rows)) * rows.record_bytes;
    for (const StTensorView* t : engram[li].tables) done_bytes += t->bytes.size();
    bar.update(done_bytes);
  }
  TROVE_RETURN_IF_ERROR(writer.finish());
  bar.finish();

  struct stat st;
  if (::stat(options.output.c_str(), &st) == 0)
    report.output_bytes = static_cast<uint64_t>(st.st_size);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace trove
