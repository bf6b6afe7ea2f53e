#include "runtime/bench/bench.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <numeric>
#include <optional>
#include <random>

#include "base/bytes.h"
#include "base/metrics.h"
#include "base/numeric.h"
#include "base/random.h"
#include "base/stopwatch.h"
#include "base/strings.h"
#include "kernels/cpu/quant.h"
#include "kernels/record.h"
#include "runtime/bench/cache_sim.h"
#include "runtime/convert/pack.h"
#include "runtime/layer/lookahead.h"
#include "runtime/layer/peer_config_json.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/layer/store_layer.h"
#include "storage/safetensors.h"
#include "storage/store.h"

namespace trove {

namespace {

std::vector<float> gaussian(size_t n, double stddev, uint64_t seed) {
  std::vector<float> v(n);
  fill_gaussian(v, stddev, seed);
  return v;
}

// Makes the copy of a pool record for expert `id` its own: quantized codes take any byte, so
// eight of them are xored with a hash of the id; float codes get sign flips (still finite).
void vary_record(const RecordLayout& layout, int64_t id, uint8_t* record) {
  uint8_t* codes = record + layout.down_codes_offset;
  const uint64_t h = splitmix64(static_cast<uint64_t>(id));
  if (dtype_is_quantized(layout.dtype)) {
    const size_t n = std::min<size_t>(8, layout.down_row_code_bytes);
    for (size_t i = 0; i < n; ++i) codes[i] ^= static_cast<uint8_t>(h >> (8 * i));
    return;
  }
  const size_t elem = static_cast<size_t>(dtype_bits(layout.dtype) / 8);
  const size_t n = std::min<size_t>(64, static_cast<size_t>(layout.dim));
  for (size_t i = 0; i < n; ++i) {
    if ((h >> i) & 1) codes[i * elem + elem - 1] ^= 0x80;  // the sign bit (little-endian)
  }
}

// Popularity rank -> expert id: a bijection of [0, N) that scatters neighbouring ranks.
struct RankScatter {
  int64_t n;
  uint64_t a;
  explicit RankScatter(int64_t n_in) : n(n_in), a(1) {
    // An odd multiplier near N / golden ratio, coprime with N.
    uint64_t m = static_cast<uint64_t>(static_cast<double>(n) * 0.6180339887) | 1;
    while (std::gcd(m, static_cast<uint64_t>(n)) != 1) m += 2;
    m %= static_cast<uint64_t>(n);
    a = m;
  }
  int64_t operator()(int64_t rank) const {
    // a < n <= 2^32 (ZipfSampler's limit), so the product fits 64 bits.
    return static_cast<int64_t>((static_cast<uint64_t>(rank) * a + 12345) %
                                static_cast<uint64_t>(n));
  }
};

void softmax_gates(const float* scores, int64_t k, float* gates) {
  float mx = scores[0];
  for (int64_t i = 1; i < k; ++i) mx = std::max(mx, scores[i]);
  float sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += gates[i] = std::exp(scores[i] - mx);
  for (int64_t i = 0; i < k; ++i) gates[i] /= sum;
}

// The routing of each batch, the same for the tiered and the resident runs.
class RoutingSource {
 public:
  static Result<RoutingSource> make(const BenchWorkload& w, const PeerConfig& c, int64_t batch,
                                    uint64_t seed) {
    RoutingSource r(w, c, batch, seed);
    if (w.kind == BenchWorkload::Kind::kZipf) {
      r.zipf_ = std::make_unique<ZipfSampler>(c.num_experts(), w.exponent, seed);
    }
    if (w.kind == BenchWorkload::Kind::kTrace) TROVE_RETURN_IF_ERROR(r.load_trace());
    return r;
  }

  bool routes_itself() const { return w_.kind == BenchWorkload::Kind::kProductKey; }

  // The input of batch b (pk: fresh gaussian tokens; otherwise one fixed batch, since x does
  // not change the cost of a given routing).
  const std::vector<float>& x(int64_t b) {
    if (routes_itself() || x_.empty()) {
      x_ = gaussian(sz(batch_ * c_.dim), 1.0,
                    splitmix64(seed_ * 1000003 + static_cast<uint64_t>(b)));
    }
    return x_;
  }

  // Batch b's routing. Zipf draws are sequential: call with b = 0, 1, 2, ... once each per run,
  // or reset() to replay.
  void routing(int64_t b, PeerRouting* r) {
    const int64_t per_token = c_.heads * c_.topk;
    r->tokens = batch_;
    r->heads = c_.heads;
    r->topk = c_.topk;
    r->ids.resize(sz(batch_ * per_token));
    r->scores.resize(r->ids.size());
    r->gates.resize(r->ids.size());
    if (w_.kind == BenchWorkload::Kind::kTrace) {
      for (int64_t t = 0; t < batch_; ++t) {
        const int64_t src = (b * batch_ + t) % trace_tokens_;
        std::copy_n(&trace_ids_[sz(src * per_token)], per_token, &r->ids[sz(t * per_token)]);
        std::copy_n(&trace_gates_[sz(src * per_token)], per_token, &r->gates[sz(t * per_token)]);
      }
      return;
    }
    std::mt19937_64 rng(splitmix64(seed_ ^ (static_cast<uint64_t>(b) << 20)));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& s : r->scores) s = normal(rng);
    for (size_t s = 0; s < r->ids.size(); s += sz(c_.topk)) {
      softmax_gates(&r->scores[s], c_.topk, &r->gates[s]);
    }
    const int64_t n = c_.num_experts();
    if (w_.kind == BenchWorkload::Kind::kUniform) {
      std::uniform_int_distribution<int64_t> pick(0, n - 1);
      for (int64_t& id : r->ids) id = pick(rng);
    } else {
      for (int64_t& id : r->ids) id = scatter_(zipf_->next());
    }
  }

  void reset() {
    if (zipf_) zipf_ = std::make_unique<ZipfSampler>(c_.num_experts(), w_.exponent, seed_);
  }

 private:
  RoutingSource(const BenchWorkload& w, const PeerConfig& c, int64_t batch, uint64_t seed)
      : w_(w), c_(c), batch_(batch), seed_(seed), scatter_(c.num_experts()) {}

  Status load_trace() {
    TROVE_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::open(w_.trace));
    const StTensorView* ids = f.find("ids");
    const StTensorView* gates = f.find("gates");
    if (ids == nullptr || gates == nullptr || ids->dtype != StDType::kI64 ||
        gates->dtype != StDType::kF32 || ids->shape != gates->shape || ids->shape.size() < 2) {
      return Status::invalid_argument(
          w_.trace +
          ": not a routing dump (tensors 'ids' I64 and 'gates' F32 [..., h, k], as "
          "`trove forward --dump-routing` writes)");
    }
    const auto& s = ids->shape;
    if (s[s.size() - 2] != c_.heads || s.back() != c_.topk) {
      return Status::invalid_argument(str_printf(
          "%s: routing of %lld heads x top-%lld; the benchmark layer has %lld x %lld (set "
          "--heads and --topk to match)",
          w_.trace.c_str(), (long long)s[s.size() - 2], (long long)s.back(), (long long)c_.heads,
          (long long)c_.topk));
    }
    trace_ids_.resize(sz(ids->numel()));
    trace_gates_.resize(trace_ids_.size());
    std::memcpy(trace_ids_.data(), ids->bytes.data(), trace_ids_.size() * sizeof(int64_t));
    std::memcpy(trace_gates_.data(), gates->bytes.data(), trace_gates_.size() * sizeof(float));
    trace_tokens_ = ids->numel() / (c_.heads * c_.topk);
    for (size_t i = 0; i < trace_ids_.size(); ++i) {
      if (trace_ids_[i] < 0 || trace_ids_[i] >= c_.num_experts() ||
          !std::isfinite(trace_gates_[i])) {
        return Status::invalid_argument(str_printf(
            "%s: selection %zu is expert %lld with gate %g; the benchmark layer has %lld experts "
            "(set --experts to at least the trace's)",
            w_.trace.c_str(), i, (long long)trace_ids_[i], (double)trace_gates_[i],
            (long long)c_.num_experts()));
      }
    }
    if (trace_tokens_ == 0) return Status::invalid_argument(w_.trace + ": the trace is empty");
    return Status::ok_status();
  }

  BenchWorkload w_;
  PeerConfig c_;
  int64_t batch_;
  uint64_t seed_;
  RankScatter scatter_;
  std::unique_ptr<ZipfSampler> zipf_;
  std::vector<float> x_;
  std::vector<int64_t> trace_ids_;
  std::vector<float> trace_gates_;
  int64_t trace_tokens_ = 0;
};

// Runs one batch on input x: the layer's own routing (pk) or the given one.
Status run_batch(PeerLayer& layer, RoutingSource& src, int64_t b, int64_t T,
                 std::span<const float> x, PeerRouting* r, std::vector<float>* y,
                 PeerBatchStats* stats) {
  if (src.routes_itself()) return layer.forward(x, T, *y, r, stats);
  src.routing(b, r);
  return layer.forward_routed(x, T, *r, *y, stats);
}

// One layer of a run: its tiered layer (and all-resident twin for the baseline), its routing
// stream, and what it did.
struct BenchLayer {
  StoredLayer stored;
  PeerLayer layer;
  TieredExpertSource* tiered = nullptr;  // layer's expert source
  RoutingSource src;
  std::optional<PeerLayer> resident;
  std::string context;  // for errors: "layer bench.1" (empty with one layer)
  PeerRouting routing;
  std::vector<float> y;
  PeerBatchStats last;                      // the last batch's, through the tiers
  std::vector<std::vector<int64_t>> trace;  // unique ids per batch from cold, for Belady
  int64_t hits_all = 0, unique_all = 0, device_hits_all = 0;
  BenchLayerResult res;
  // Look-ahead (the first layer only: the one whose input a real stack knows ahead): the
  // routings of the batches routed ahead, oldest first, and the next batch to route.
  bool looks_ahead = false;
  std::deque<PeerRouting> ahead;
  int64_t next_ahead = 0;
  // Cross-layer prediction: this layer's router on the layer before's input, its distinct
  // experts, and how they compared with the ones the batch used.
  PeerRouting predicted;
  std::vector<int64_t> predicted_ids;
  std::vector<uint8_t> mark;  // per expert, all 0 between uses
  bool has_prediction = false;
  int64_t predicted_used = 0, predicted_of = 0;  // the last batch's
};

// The distinct ids of `r`, ascending, into *out (`mark`: one byte per expert, all 0).
void unique_ids(const PeerRouting& r, std::vector<uint8_t>* mark, std::vector<int64_t>* out) {
  out->clear();
  for (int64_t id : r.ids) {
    uint8_t& m = (*mark)[static_cast<size_t>(id)];
    if (m == 0) {
      m = 1;
      out->push_back(id);
    }
  }
  std::sort(out->begin(), out->end());
  for (int64_t id : *out) (*mark)[static_cast<size_t>(id)] = 0;
}

int64_t count_common(std::span<const int64_t> a, std::span<const int64_t> b) {
  int64_t n = 0;
  for (size_t i = 0, j = 0; i < a.size() && j < b.size();) {
    if (a[i] < b[j]) {
      ++i;
    } else if (b[j] < a[i]) {
      ++j;
    } else {
      ++n, ++i, ++j;
    }
  }
  return n;
}

// Look-ahead: each layer that looks ahead routes its batches up to b + depth (of `total`) and
// prefetches their experts (PeerLayer::prefetch), in order, each once.
Status look_ahead(std::vector<BenchLayer>& layers, int depth, int64_t b, int64_t total, int64_t T) {
  for (BenchLayer& L : layers) {
    if (!L.looks_ahead) continue;
    for (; L.next_ahead < total && L.next_ahead <= b + depth; ++L.next_ahead) {
      PeerRouting r;
      if (L.src.routes_itself()) {
        TROVE_RETURN_IF_ERROR(L.layer.route(L.src.x(L.next_ahead), T, &r));
      } else {
        L.src.routing(L.next_ahead, &r);
      }
      L.layer.prefetch(r);
      L.ahead.push_back(std::move(r));
    }
  }
  return Status::ok_status();
}

// Runs batch b through every layer (their resident twins when `resident`), each on x + y of
// the layer before it, as a transformer's residual stream; layer l's stats go to its `last`.
// `h` holds the stream between layers. Through the tiers, a layer that looks ahead runs the
// routing it was given ahead (look_ahead), and with `cross_layer` each pk layer after the first
// prefetches what its router picks on the input of the layer before, before that one runs.
Status run_layers(std::vector<BenchLayer>& layers, bool resident, int64_t b, int64_t T,
                  std::vector<float>* h, bool cross_layer = false) {
  std::span<const float> x = layers[0].src.x(b);
  for (size_t l = 0; l < layers.size(); ++l) {
    BenchLayer& L = layers[l];
    PeerLayer& layer = resident ? *L.resident : L.layer;
    L.last = PeerBatchStats();
    if (!resident && cross_layer && l + 1 < layers.size()) {
      BenchLayer& next = layers[l + 1];
      if (next.src.routes_itself() && !next.looks_ahead) {
        TROVE_RETURN_IF_ERROR(next.layer.route(x, T, &next.predicted));
        next.layer.prefetch(next.predicted);
        next.has_prediction = true;
      }
    }
    Status s;
    if (!resident && L.looks_ahead) {
      TROVE_CHECK(!L.ahead.empty());
      L.routing = std::move(L.ahead.front());
      L.ahead.pop_front();
      s = layer.forward_routed(x, T, L.routing, L.y, &L.last);
    } else {
      s = run_batch(layer, L.src, b, T, x, &L.routing, &L.y, resident ? nullptr : &L.last);
    }
    if (s.ok() && L.has_prediction) {
      if (L.mark.empty()) L.mark.assign(static_cast<size_t>(layer.config().num_experts()), 0);
      unique_ids(L.predicted, &L.mark, &L.predicted_ids);
      const std::span<const int64_t> used = layer.last_experts();
      L.predicted_used = count_common(L.predicted_ids, used);
      L.predicted_of = static_cast<int64_t>(used.size());
      L.has_prediction = false;
    }
    if (!s.ok()) {
      std::string what = str_printf("bench batch %lld", (long long)b);
      if (!L.context.empty()) what += ", " + L.context;
      return s.with_context(what);
    }
    if (l + 1 < layers.size()) {
      h->resize(x.size());  // (x may be h itself: same size, no reallocation)
      for (size_t i = 0; i < x.size(); ++i) (*h)[i] = x[i] + L.y[i];
      x = *h;
    }
  }
  return Status::ok_status();
}

// The measured batches again, through the GPU peers (runtime/bench/device_peers.h): the same inputs
// and routing as the tiered run's (RoutingSource replays them from the start).
Result<DevicePeerResult> run_bench_device_peers(const BenchOptions& opt, const PeerLayer& layer,
                                                const RecordLayout& layout,
                                                std::span<const uint8_t> table,
                                                RoutingSource& src) {
  PeerRouting r;
  DevicePeerOptions po;
  po.config = layer.config();
  po.layout = layout;
  po.table = table;
  po.params = &layer.params();
  po.batch = opt.batch;
  po.batches = opt.batches;
  po.source = [&](int64_t index, DevicePeerBatch* batch) -> Status {
    if (index == 0) {
      src.reset();
      for (int64_t b = 0; b < opt.warmup_batches; ++b) {
        if (!src.routes_itself()) src.routing(b, &r);  // keep the zipf stream in step
      }
    }
    const int64_t b = opt.warmup_batches + index;
    batch->x = src.x(b).data();
    batch->routing = nullptr;
    if (!src.routes_itself()) {
      src.routing(b, &r);
      batch->routing = &r;
    }
    return Status::ok_status();
  };
  return run_device_peers(po);
}

}  // namespace

Result<BenchWorkload> BenchWorkload::parse(const std::string& text) {
  BenchWorkload w;
  if (text == "uniform") {
    w.kind = Kind::kUniform;
  } else if (text == "pk") {
    w.kind = Kind::kProductKey;
  } else if (text.rfind("zipf:", 0) == 0) {
    w.kind = Kind::kZipf;
    char* end = nullptr;
    const std::string a = text.substr(5);
    w.exponent = std::strtod(a.c_str(), &end);
    if (a.empty() || *end != '\0' || !(w.exponent >= 0) || w.exponent > 10) {
      return Status::invalid_argument("workload " + text +
                                      ": the zipf exponent must be a number in [0, 10]");
    }
  } else if (text.rfind("trace:", 0) == 0 && text.size() > 6) {
    w.kind = Kind::kTrace;
    w.trace = text.substr(6);
  } else {
    return Status::invalid_argument("unknown workload '" + text +
                                    "': use uniform, zipf:A (e.g. zipf:1.09), pk or trace:FILE");
  }
  return w;
}

std::string BenchWorkload::name() const {
  switch (kind) {
    case Kind::kUniform:
      return "uniform";
    case Kind::kZipf:
      return str_printf("zipf:%g", exponent);
    case Kind::kProductKey:
      return "pk";
    case Kind::kTrace:
      return "trace:" + trace;
  }
  return "?";
}

std::string bench_layer_name(int64_t index) {
  return index == 0 ? std::string("bench") : str_printf("bench.%lld", (long long)index);
}

namespace {

// Layer `index`'s seed: layer 0 keeps the run's, so one-layer stores and runs are as before.
uint64_t layer_seed(uint64_t seed, int64_t index) {
  return index == 0 ? seed : splitmix64(seed * 1000003 + static_cast<uint64_t>(index));
}

// Writes layer `index` of a bench store into `w`; `done` counts the records of all layers.
Status write_bench_layer(StoreWriter& w, const PeerConfig& c, const RecordLayout& layout,
                         int64_t index, uint64_t seed, int64_t* done, int64_t total,
                         const std::function<void(int64_t, int64_t)>& progress) {
  const int64_t n = c.num_experts();
  const int64_t pool = std::min<int64_t>(n, 2048);
  std::vector<uint8_t> pool_records(sz(pool) * layout.stride);
  {
    const auto down = gaussian(sz(pool * c.dim), 1.0 / std::sqrt(static_cast<double>(c.dim)), seed);
    const auto up = gaussian(sz(pool * c.dim_out), 1.0, seed + 1);
    pack_records(layout, down.data(), up.data(), pool, pool_records.data());
  }
  nlohmann::json info = {{"config", peer_config_to_json(c)},
                         {"record", record_layout_json(layout)},
                         {"source", {{"synthetic", "trove bench"}, {"seed", seed}}}};
  StoreTableSpec table{std::string(dtype_name(layout.dtype)), static_cast<uint64_t>(n),
                       layout.record_bytes, layout.stride};
  TROVE_RETURN_IF_ERROR(w.begin_layer(bench_layer_name(index), info, table));
  const int64_t chunk =
      std::max<int64_t>(1, (int64_t{16} << 20) / static_cast<int64_t>(layout.stride));
  std::vector<uint8_t> buf(sz(chunk) * layout.stride);
  for (int64_t first = 0; first < n; first += chunk) {
    const int64_t count = std::min(chunk, n - first);
    for (int64_t i = 0; i < count; ++i) {
      uint8_t* rec = buf.data() + sz(i) * layout.stride;
      std::memcpy(rec, pool_records.data() + sz((first + i) % pool) * layout.stride, layout.stride);
      if (first + i >= pool) vary_record(layout, first + i, rec);
    }
    TROVE_RETURN_IF_ERROR(w.append_records({buf.data(), sz(count) * layout.stride}));
    *done += count;
    if (progress) progress(*done, total);
  }
  const double qstd = 1.0 / std::sqrt(static_cast<double>(c.dim));
  TROVE_RETURN_IF_ERROR(w.add_dense("query.weight", {c.query_rows(), c.dim},
                                    gaussian(sz(c.query_rows() * c.dim), qstd, seed + 2)));
  if (c.query_bias) {
    TROVE_RETURN_IF_ERROR(
        w.add_dense("query.bias", {c.query_rows()}, std::vector<float>(sz(c.query_rows()), 0.0f)));
  }
  TROVE_RETURN_IF_ERROR(
      w.add_dense("keys", {c.key_heads(), 2, c.n_keys, c.dim_key},
                  gaussian(sz(c.key_heads() * 2 * c.n_keys * c.dim_key), 1.0, seed + 3)));
  if (c.input_norm == InputNorm::kRms) {
    TROVE_RETURN_IF_ERROR(w.add_dense("norm.weight", {c.dim}, std::vector<float>(sz(c.dim), 1.0f)));
  }
  return w.end_layer();
}

}  // namespace

Status write_bench_store(const std::string& path, const PeerConfig& config_in, DType dtype,
                         uint64_t seed, const std::function<void(int64_t, int64_t)>& progress,
                         int64_t layers) {
  if (layers < 1) {
    return Status::invalid_argument(str_printf(
        "%s: a bench store needs at least one layer, not %lld", path.c_str(), (long long)layers));
  }
  PeerConfig c = config_in;
  TROVE_RETURN_IF_ERROR(c.validate_and_fill());
  TROVE_ASSIGN_OR_RETURN(RecordLayout layout,
                         RecordLayout::make(dtype, c.dim, c.dim_out, c.expert_width));
  nlohmann::json provenance = {{"tool", "trove bench"}, {"synthetic", true}, {"seed", seed}};
  TROVE_ASSIGN_OR_RETURN(StoreWriter w, StoreWriter::create(path, provenance));
  int64_t done = 0;
  for (int64_t l = 0; l < layers; ++l) {
    TROVE_RETURN_IF_ERROR(write_bench_layer(w, c, layout, l, layer_seed(seed, l), &done,
                                            c.num_experts() * layers, progress));
  }
  return w.finish();
}

namespace {

// Opens the first opt.layers bench layers of `store`, each over its own tiers with an even
// share of the run's budgets and its own routing stream, and checks that a batch fits each
// one before any work.
Result<std::vector<BenchLayer>> open_bench_layers(const StoreReader& store,
                                                  const BenchOptions& opt) {
  const int64_t n = opt.layers;
  int64_t held = 0;
  for (const StoreLayerInfo& info : store.layers()) {
    for (int64_t l = 0; l < n; ++l) held += info.name == bench_layer_name(l) ? 1 : 0;
  }
  if (held < n) {
    return Status::invalid_argument(str_printf(
        "%s holds %lld of the %lld bench layers asked for (%s ... %s): write the store with at "
        "least %lld layers (write_bench_store's `layers`; trove bench --layers %lld writes the "
        "stores of its --store folder anew), or run fewer layers",
        opt.store.c_str(), (long long)held, (long long)n, bench_layer_name(0).c_str(),
        bench_layer_name(n - 1).c_str(), (long long)n, (long long)n));
  }
  const uint64_t host_share = opt.host_budget_bytes / static_cast<uint64_t>(n);
  const uint64_t vram_share = opt.vram_budget_bytes / static_cast<uint64_t>(n);
  std::vector<BenchLayer> layers;
  for (int64_t l = 0; l < n; ++l) {
    const std::string name = bench_layer_name(l);
    // With several layers, errors name the layer and, since a tier's sizes are one share of
    // the budgets, the split.
    std::string context;
    if (n > 1) {
      context = str_printf(
          "layer %s (%lld of %lld; the budgets are split evenly over the layers: "
          "host %s = %lld x %s",
          name.c_str(), (long long)(l + 1), (long long)n,
          format_bytes(opt.host_budget_bytes).c_str(), (long long)n,
          format_bytes(host_share).c_str());
      if (opt.vram_budget_bytes > 0) {
        context += str_printf(", vram %s = %lld x %s", format_bytes(opt.vram_budget_bytes).c_str(),
                              (long long)n, format_bytes(vram_share).c_str());
      }
      context += str_printf("; the sizes below are one layer's: the totals need %lld x them)",
                            (long long)n);
    }
    auto named = [&](const Status& s) { return context.empty() ? s : s.with_context(context); };
    Result<StoredLayer> stored = load_stored_layer(store, name);
    if (!stored.ok()) return named(stored.status());
    PeerLayerOptions lo;
    lo.threads = opt.threads;
    lo.backend = opt.backend;
    lo.cuda.vram_budget_bytes = vram_share;
    lo.cuda.h2d = opt.h2d;
    lo.cuda.cpu_misses = opt.cpu_misses;
    lo.cuda.vram_policy = opt.policy;
    TieredSourceOptions tiers;
    tiers.host_budget_bytes = host_share;
    tiers.policy = opt.policy;
    tiers.io = opt.io;
    lo.tiers = tiers;
    Result<PeerLayer> layer = PeerLayer::open(store, name, lo);
    if (!layer.ok()) return named(layer.status());
    const PeerConfig& c = layer->config();
    if (n > 1 &&
        (c.dim_out != c.dim || (!layers.empty() && layers[0].layer.config().dim != c.dim))) {
      return Status::invalid_argument(str_printf(
          "%s: %lld layers run as a residual stream (layer l + 1 reads x + y of layer l), so "
          "every layer needs dim_out = dim = the first layer's dim; this one has dim %lld, dim_out "
          "%lld",
          name.c_str(), (long long)n, (long long)c.dim, (long long)c.dim_out));
    }
    Status fits = layer->check_batch(opt.batch);
    if (!fits.ok()) return named(fits);
    Result<RoutingSource> src =
        RoutingSource::make(opt.workload, c, opt.batch, layer_seed(opt.seed, l));
    if (!src.ok()) return named(src.status());
    auto* tiered = &dynamic_cast<TieredExpertSource&>(layer->experts());
    const int64_t dim_out = c.dim_out;
    layers.push_back(BenchLayer{std::move(*stored), std::move(*layer), tiered, std::move(*src)});
    layers.back().y.resize(sz(opt.batch * dim_out));
    layers.back().context = context.empty() ? context : "layer " + name;
    layers.back().looks_ahead = l == 0 && opt.lookahead > 0;
    layers.back().res.name = name;
    layers.back().res.host_budget_bytes = host_share;
    layers.back().res.vram_budget_bytes = vram_share;
  }
  return layers;
}

}  // namespace

Result<BenchResult> run_bench(const BenchOptions& opt) {
  if (opt.batch < 1 || opt.batches < 1 || opt.warmup_batches < 0) {
    return Status::invalid_argument(
        str_printf("bench: batch %lld, batches %lld and warm-up %lld must be >= 1, >= 1 and >= 0",
                   (long long)opt.batch, (long long)opt.batches, (long long)opt.warmup_batches));
  }
  if (opt.lookahead < 0 || opt.lookahead > kMaxLookahead) {
    return Status::invalid_argument(
        str_printf("bench: look-ahead %d must be 0 (off) to %d", opt.lookahead, kMaxLookahead));
  }
  if (opt.layers < 1) {
    return Status::invalid_argument(
        str_printf("bench: layers %lld must be >= 1", (long long)opt.layers));
  }
  TROVE_ASSIGN_OR_RETURN(StoreReader store, StoreReader::open(opt.store));
  TROVE_ASSIGN_OR_RETURN(std::vector<BenchLayer> layers, open_bench_layers(store, opt));
  const StoredLayer& stored = layers[0].stored;
  const PeerConfig& c = layers[0].layer.config();

  BenchResult res;
  res.config = c;
  res.record_dtype = std::string(dtype_name(stored.record.dtype));
  res.record_bytes = stored.record.record_bytes;
  res.record_stride = stored.record.stride;
  res.engine = layers[0].tiered->disk().engine_name();
  res.direct_io = layers[0].tiered->disk().direct_io();
  res.backend = std::string(peer_backend_name(opt.backend));
  res.device_memory = peer_backend_traits(opt.backend).device_memory;
  for (BenchLayer& L : layers) {
    res.table_bytes += L.stored.info->table.bytes;
    L.res.capacity_slots = L.tiered->host().capacity_slots();
    res.capacity_slots += L.res.capacity_slots;
    if (L.res.vram_budget_bytes > 0) {
      L.res.device_capacity_slots = static_cast<int64_t>(
          std::min<uint64_t>(L.res.vram_budget_bytes / L.stored.record.stride,
                             static_cast<uint64_t>(L.layer.config().num_experts())));
      res.device_capacity_slots += L.res.device_capacity_slots;
    }
  }

  const int64_t total = opt.warmup_batches + opt.batches;
  std::vector<float> h;  // the residual stream between layers
  int64_t hits_all = 0, unique_all = 0, device_hits_all = 0;
  double measured = 0;
  res.lookahead = opt.lookahead;
  res.cross_layer = opt.cross_layer;
  for (int64_t b = 0; b < total; ++b) {
    const Stopwatch start;
    TROVE_RETURN_IF_ERROR(
        look_ahead(layers, opt.lookahead, b, total, opt.batch).with_context("bench look-ahead"));
    TROVE_RETURN_IF_ERROR(run_layers(layers, false, b, opt.batch, &h, opt.cross_layer));
    const double seconds = start.seconds();
    Metrics m;  // this batch's, summed over the layers
    for (BenchLayer& L : layers) {
      const Metrics lm = batch_metrics(L.last);
      m += lm;
      if (opt.oracle) {
        const std::span<const int64_t> u = L.layer.last_experts();
        L.trace.emplace_back(u.begin(), u.end());
      }
      L.hits_all += L.last.fetch.hits;
      L.device_hits_all += L.last.device.hits;
      L.unique_all += L.last.unique_experts;
      if (b >= opt.warmup_batches) {
        L.res.metrics += lm;
        res.predicted_used += L.predicted_used;
        res.predicted_of += L.predicted_of;
        res.predicted += L.predicted_of > 0 ? static_cast<int64_t>(L.predicted_ids.size()) : 0;
      }
      L.predicted_used = L.predicted_of = 0;
    }
    hits_all += m.counter("host.hits");
    device_hits_all += m.counter("device.hits");
    unique_all += m.counter("unique_experts");
    if (b >= opt.warmup_batches) {
      measured += seconds;
      m.observe("latency.batch", seconds);
      m.observe("latency.route", m.real("route_seconds"));
      m.observe("latency.resolve", m.real("acquire_seconds"));
      m.observe("latency.disk", m.real("host.disk_seconds"));
      m.observe("latency.compute", m.real("expert_seconds"));
      // Waits for prefetch reads are stalls too.
      m.observe("latency.stall",
                m.real("host.stall_seconds") + m.real("host.prefetch_wait_seconds"));
      m.observe("latency.transfer", m.real("device.copy_seconds"));
      res.metrics += m;
    }
    if (opt.progress) opt.progress(b + 1, total);
  }
  const Metrics& m = res.metrics;
  res.batches = opt.batches;
  res.tokens = opt.batch * opt.batches;  // each token once, through every layer
  res.seconds = measured;
  res.tokens_per_second = measured > 0 ? static_cast<double>(res.tokens) / measured : 0;
  auto ratio = [](int64_t part, int64_t whole) {
    return static_cast<double>(part) / static_cast<double>(std::max<int64_t>(1, whole));
  };
  res.hit_rate = ratio(m.counter("host.hits"), m.counter("unique_experts"));
  const double disk_seconds = m.real("host.disk_seconds");
  res.iops = disk_seconds > 0 ? static_cast<double>(res.records_read()) / disk_seconds : 0;
  // Each layer chooses its own method; the totals are summed, the method is the first layer's.
  for (const BenchLayer& L : layers) {
    const std::vector<H2dMethodTotals> totals = L.layer.h2d_totals();
    if (res.h2d_methods.empty()) {
      res.h2d_methods = totals;
      continue;
    }
    for (size_t i = 0; i < totals.size() && i < res.h2d_methods.size(); ++i) {
      res.h2d_methods[i].batches += totals[i].batches;
      res.h2d_methods[i].bytes += totals[i].bytes;
      res.h2d_methods[i].seconds += totals[i].seconds;
    }
  }
  res.h2d_method = layers[0].layer.h2d_method();
  res.device_hit_rate = ratio(m.counter("device.hits"), m.counter("unique_experts"));
  for (BenchLayer& L : layers) {
    L.res.hit_rate = ratio(L.res.hits(), L.res.unique());
    L.res.device_hit_rate = ratio(L.res.metrics.counter("device.hits"), L.res.unique());
  }
  if (opt.oracle) {
    // Over every batch from a cold tier, as the policy saw them, beside the policy's own; each
    // layer's tier on its own trace, and over the layers Belady's hits / their unique experts.
    const bool device = res.device_capacity_slots > 0;
    int64_t best_hits = 0, best_requests = 0;
    for (BenchLayer& L : layers) {
      TROVE_ASSIGN_OR_RETURN(
          SimResult best,
          simulate_belady(L.trace, device ? L.res.device_capacity_slots : L.res.capacity_slots));
      best_hits += best.hits;
      best_requests += best.requests;
      if (device) {
        L.res.device_oracle_hit_rate = best.hit_rate();
        L.res.device_hit_rate_all = ratio(L.device_hits_all, L.unique_all);
      } else {
        L.res.oracle_hit_rate = best.hit_rate();
        L.res.achieved_hit_rate_all = ratio(L.hits_all, L.unique_all);
      }
    }
    if (device) {
      res.device_oracle_hit_rate = ratio(best_hits, best_requests);
      res.device_hit_rate_all = ratio(device_hits_all, unique_all);
    } else {
      res.oracle_hit_rate = ratio(best_hits, best_requests);
      res.achieved_hit_rate_all = ratio(hits_all, unique_all);
    }
  }
  for (BenchLayer& L : layers) res.layers.push_back(L.res);

  if (opt.resident_baseline) {
    // The same measured batches with every layer's whole table in memory (when the tables fit
    // in half of RAM).
    const uint64_t ram = static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) *
                         static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
    const ExecutorTraits traits = peer_backend_traits(opt.backend);
    if (res.table_bytes > ram / 2) {
      res.resident_skipped =
          str_printf("the table%s (%s) would take more than half of this machine's %s of memory",
                     layers.size() > 1 ? "s" : "", format_bytes(res.table_bytes).c_str(),
                     format_bytes(ram).c_str());
    } else {
      Status made;
      for (BenchLayer& L : layers) {
        std::span<const uint8_t> table = store.mapped_records(*L.stored.info);
        auto source = std::make_unique<MemoryExpertSource>(
            L.stored.record, std::vector<uint8_t>(table.begin(), table.end()));
        PeerLayerOptions ro;
        ro.threads = opt.threads;
        ro.backend = opt.backend;
        // Resident in the executor's own memory too, where it has one (a device tier).
        set_resident_options(L.stored.info->table.bytes, &ro);
        Result<PeerLayer> resident =
            PeerLayer::create(L.layer.config(), L.layer.params(), std::move(source), ro);
        if (!resident.ok()) {
          made = resident.status();
          break;
        }
        L.resident.emplace(std::move(*resident));
      }
      if (made.ok()) {
        // The executor's fill passes first (a device tier fills), then the measured one.
        for (int pass = 0; pass <= traits.resident_fill_passes; ++pass) {
          for (BenchLayer& L : layers) {
            L.src.reset();
            for (int64_t b = 0; b < opt.warmup_batches; ++b) {
              if (!L.src.routes_itself()) L.src.routing(b, &L.routing);  // keep zipf in step
            }
          }
          double seconds = 0;
          for (int64_t b = opt.warmup_batches; b < total; ++b) {
            const Stopwatch start;
            TROVE_RETURN_IF_ERROR(run_layers(layers, true, b, opt.batch, &h));
            seconds += start.seconds();
          }
          res.resident_tokens_per_second = static_cast<double>(res.tokens) / seconds;
        }
      } else if (traits.device_memory && made.code() == Status::Code::kResourceExhausted) {
        // (Tables larger than the device are no error: the comparison is left out.)
        res.resident_skipped = "the tables do not fit the device: " + made.message();
      } else {
        return made;
      }
    }
    for (BenchLayer& L : layers) L.resident.reset();  // (their memory back for what follows)
    if (traits.device_memory) {
      if (layers.size() == 1) {
        BenchLayer& L = layers[0];
        TROVE_ASSIGN_OR_RETURN(res.device_peers,
                               run_bench_device_peers(opt, L.layer, L.stored.record,
                                                      store.mapped_records(*L.stored.info), L.src));
      } else {
        DevicePeerResult& d = res.device_peers;
        d.resident_skipped = d.einsum_skipped = d.managed_skipped =
            str_printf("the GPU peers run one layer; this run has %zu", layers.size());
      }
    }
  }
  return res;
}

}  // namespace trove
