#include "tools/forward.h"

#include <unistd.h>
#include <algorithm>

#include <cerrno>
#include <chrono>
#include <filesystem>

#include "base/stopwatch.h"
#include "base/strings.h"
#include "kernels/cpu/ref/quant_ref.h"
#include "runtime/layer/lookahead.h"

namespace trove {

namespace {

// The tensor to run on: --input-tensor, else the only tensor, else "x".
Result<const StTensorView*> find_input(const SafetensorsFile& file, const std::string& name) {
  if (!name.empty()) {
    const StTensorView* t = file.find(name);
    if (t == nullptr) {
      return Status::not_found(file.path() + ": no tensor named '" + name + "'");
    }
    return t;
  }
  if (file.tensors().size() == 1) return &file.tensors()[0];
  if (const StTensorView* t = file.find("x")) return t;
  std::string names;
  for (const auto& t : file.tensors()) names += (names.empty() ? "" : ", ") + t.name;
  return Status::invalid_argument(file.path() + " holds " + std::to_string(file.tensors().size()) +
                                  " tensors and none is named 'x'; choose one with "
                                  "--input-tensor (tensors: " +
                                  clip(names, 400) + ")");
}

}  // namespace

Result<ForwardReport> run_forward(const ForwardOptions& opt) {
  if (opt.batch < 1) {
    return Status::invalid_argument(
        str_printf("--batch must be >= 1, got %lld", static_cast<long long>(opt.batch)));
  }
  TROVE_ASSIGN_OR_RETURN(StoreReader store, StoreReader::open(opt.store));
  TROVE_ASSIGN_OR_RETURN(PeerLayer layer, PeerLayer::open(store, opt.layer, opt.layer_options));
  const PeerConfig& c = layer.config();

  TROVE_ASSIGN_OR_RETURN(SafetensorsFile input, SafetensorsFile::open(opt.input));
  TROVE_ASSIGN_OR_RETURN(const StTensorView* x, find_input(input, opt.input_tensor));
  const std::string where = opt.input + ": tensor '" + x->name + "'";
  if (!st_dtype_is_float(x->dtype)) {
    return Status::invalid_argument(where + " has dtype " + st_dtype_name(x->dtype) +
                                    "; trove forward reads F32, F16 or BF16 activations");
  }
  if (x->shape.empty() || x->shape.back() != c.dim) {
    return Status::invalid_argument(
        str_printf("%s has shape %s; layer %s takes [..., %lld] (dim %lld)", where.c_str(),
                   shape_to_string(x->shape).c_str(), opt.layer.c_str(),
                   static_cast<long long>(c.dim), static_cast<long long>(c.dim)));
  }
  const StDType out_dtype = opt.out_dtype.value_or(x->dtype);
  if (!st_dtype_is_float(out_dtype)) {
    return Status::invalid_argument(std::string("output dtype ") + st_dtype_name(out_dtype) +
                                    " is not F32, F16 or BF16");
  }

  // Output folders are checked before the run, so a typo fails in a second, not after it, and
  // never after `y` has been written.
  for (const std::string* out : {&opt.output, &opt.routing_output}) {
    if (out->empty()) continue;
    const std::filesystem::path parent = std::filesystem::path(*out).parent_path();
    const std::string folder = parent.empty() ? "." : parent.string();
    if (::access(folder.c_str(), W_OK) != 0) {
      return Status::from_errno("output folder " + folder + " (for " + *out + ")", errno);
    }
  }

  ForwardReport report;
  report.store_generation = store.generation();
  report.store_manifest_xxh3 = store.manifest_xxh3();
  report.input_tensor = x->name;
  report.input_shape = x->shape;
  report.input_dtype = st_dtype_name(x->dtype);
  report.output_shape = x->shape;
  report.output_shape.back() = c.dim_out;
  report.output_dtype = st_dtype_name(out_dtype);
  report.config = c;
  report.record_dtype = std::string(dtype_name(layer.record_layout().dtype));
  report.stats = RoutingStats(c.num_experts());

  // A 2-D view of the input for batch reads.
  StTensorView rows = *x;
  const int64_t T = x->numel() / c.dim;
  rows.shape = {T, c.dim};
  report.tokens = T;
  // A host budget that cannot hold one batch's experts fails here, before any work.
  TROVE_RETURN_IF_ERROR(layer.check_batch(std::min(opt.batch, T)));

  const DType out_type = st_float_dtype(out_dtype);
  const size_t out_elem = st_dtype_size(out_dtype);
  std::vector<uint8_t> y_bytes(static_cast<size_t>(T * c.dim_out) * out_elem);
  const bool dump = !opt.routing_output.empty();
  const int64_t per_token = c.heads * c.topk;
  std::vector<int64_t> all_ids;
  std::vector<float> all_scores, all_gates;
  if (dump) {
    all_ids.resize(static_cast<size_t>(T * per_token));
    all_scores.resize(all_ids.size());
    all_gates.resize(all_ids.size());
  }

  bool input_failed = false;  // the error is the input file's (it names it), not the layer's
  auto read_batch = [&](int64_t b, std::vector<float>* xb, int64_t* n) -> Status {
    const int64_t first = b * opt.batch;
    *n = std::min(opt.batch, T - first);
    xb->resize(static_cast<size_t>(*n * c.dim));
    Status s = read_rows_f32(rows, first, *n, xb->data());
    // Checked here too so that the error names the token of the file, not of the batch.
    if (s.ok()) s = check_finite_rows("input", *xb, c.dim, first);
    input_failed = !s.ok();
    return s.with_context(where);
  };
  Stopwatch since_last;  // from the last batch's output (or the start) to this one's
  auto output = [&](int64_t b, std::span<const float> yb, const PeerRouting& routing,
                    const PeerBatchStats& bs) -> Status {
    const int64_t first = b * opt.batch;
    const int64_t n = routing.tokens;
    convert_row_ref(out_type, yb.data(), n * c.dim_out,
                    y_bytes.data() + static_cast<size_t>(first * c.dim_out) * out_elem);
    if (dump) {
      const size_t at = static_cast<size_t>(first * per_token);
      std::copy(routing.ids.begin(), routing.ids.end(), all_ids.begin() + at);
      std::copy(routing.scores.begin(), routing.scores.end(), all_scores.begin() + at);
      std::copy(routing.gates.begin(), routing.gates.end(), all_gates.begin() + at);
    }
    report.stats.add(routing);
    ++report.batches;
    Metrics m = batch_metrics(bs);
    m.observe("latency.batch", since_last.seconds());
    m.observe("latency.route", bs.route_seconds);
    m.observe("latency.acquire", bs.acquire_seconds);
    m.observe("latency.experts", bs.expert_seconds);
    since_last.restart();
    report.metrics += m;
    if (opt.progress) opt.progress(first + n, T);
    return Status::ok_status();
  };
  const auto start = std::chrono::steady_clock::now();
  since_last.restart();
  const int64_t batches = (T + opt.batch - 1) / opt.batch;
  Status ran = forward_with_lookahead(layer, batches, opt.lookahead, read_batch, output);
  if (!ran.ok() && !input_failed) {
    // Named by the tokens, not the input file: an error here is the store's or the tier's
    // (the input's own faults are caught by `input`), and its message names the store file.
    return ran.with_context(str_printf(
        "forward of tokens %lld..%lld", static_cast<long long>(report.batches * opt.batch),
        static_cast<long long>(std::min(T, (report.batches + 1) * opt.batch) - 1)));
  }
  TROVE_RETURN_IF_ERROR(ran);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  report.device = peer_backend_traits(opt.layer_options.backend).device_memory;
  report.h2d_method = std::string(h2d_method_name(layer.h2d_method()));

  const std::map<std::string, std::string> meta = {
      {"trove.store", opt.store}, {"trove.layer", opt.layer}, {"trove.input", opt.input}};
  TROVE_RETURN_IF_ERROR(write_safetensors(
      opt.output, {{"y", out_dtype, report.output_shape, y_bytes, nullptr}}, meta));
  if (dump) {
    std::vector<int64_t> shape(x->shape.begin(), x->shape.end() - 1);
    shape.push_back(c.heads);
    shape.push_back(c.topk);
    auto bytes = [](const auto& v) {
      return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()),
                                      v.size() * sizeof(v[0]));
    };
    TROVE_RETURN_IF_ERROR(
        write_safetensors(opt.routing_output,
                          {{"ids", StDType::kI64, shape, bytes(all_ids), nullptr},
                           {"scores", StDType::kF32, shape, bytes(all_scores), nullptr},
                           {"gates", StDType::kF32, shape, bytes(all_gates), nullptr}},
                          meta));
  }
  return report;
}

}  // namespace trove
