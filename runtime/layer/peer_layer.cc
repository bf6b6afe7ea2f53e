#include "runtime/layer/peer_layer.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "base/numeric.h"
#include "base/stopwatch.h"
#include "base/strings.h"
#include "kernels/cpu/peer.h"
#include "kernels/cpu/ref/peer_ref.h"
#include "runtime/layer/peer_layer_cuda.h"
#include "runtime/layer/store_layer.h"

#if TROVE_HAVE_CUDA
#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/peer_cuda_backward.h"
#endif

namespace trove {

namespace {

Status check_size(const char* what, size_t got, int64_t want, const std::string& shape) {
  if (got != static_cast<size_t>(want)) {
    return Status::invalid_argument(str_printf("%s has %zu values, expected %lld (%s)", what, got,
                                               static_cast<long long>(want), shape.c_str()));
  }
  return Status::ok_status();
}

// Releases what it acquired when it goes out of scope.
class Lease {
 public:
  explicit Lease(ExpertSource& source) : source_(source) {}
  ~Lease() {
    if (held_) source_.release(ids_);
  }
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  // ExpertSource::begin_acquire and finish_acquire; an error from either ends the lease (the
  // source has let go of everything). REQUIRES: `ids` outlives the lease.
  Status begin(std::span<const int64_t> ids, std::span<const uint8_t*> records) {
    TROVE_CHECK(!held_);
    TROVE_RETURN_IF_ERROR(source_.begin_acquire(ids, records));
    ids_ = ids;
    held_ = true;
    return Status::ok_status();
  }
  Status finish(std::span<const uint8_t*> records) {
    TROVE_CHECK(held_);
    Status s = source_.finish_acquire(ids_, records);
    if (!s.ok()) held_ = false;
    return s;
  }

 private:
  ExpertSource& source_;
  std::span<const int64_t> ids_;
  bool held_ = false;
};

}  // namespace

Status check_finite_rows(const char* what, std::span<const float> v, int64_t row_len,
                         int64_t first_row) {
  for (size_t i = 0; i < v.size(); ++i) {
    if (!std::isfinite(v[i])) {
      return Status::invalid_argument(str_printf(
          "%s: token %lld, element %lld is %s; the PEER layer needs finite inputs (routing by "
          "NaN or infinite scores is undefined); check the producer of this tensor",
          what, static_cast<long long>(first_row + static_cast<int64_t>(i) / row_len),
          static_cast<long long>(static_cast<int64_t>(i) % row_len),
          std::isnan(v[i]) ? "nan" : (v[i] > 0 ? "inf" : "-inf")));
    }
  }
  return Status::ok_status();
}

std::string_view peer_backend_name(PeerBackend b) {
  switch (b) {
    case PeerBackend::kRef:
      return "ref";
    case PeerBackend::kCuda:
      return "cuda";
    case PeerBackend::kCpu:
      break;
  }
  return "cpu";
}

Result<PeerBackend> parse_peer_backend(std::string_view s) {
  if (s == "cpu") return PeerBackend::kCpu;
  if (s == "ref") return PeerBackend::kRef;
  if (s == "cuda") return PeerBackend::kCuda;
  return Status::invalid_argument("unknown backend '" + clip(s) + "' (expected cpu, ref or cuda)");
}

std::string_view h2d_method_name(H2dMethod m) {
  switch (m) {
    case H2dMethod::kSlab:
      return "slab";
    case H2dMethod::kBatch:
      return "batch";
    case H2dMethod::kGather:
      return "gather";
    case H2dMethod::kAuto:
      break;
  }
  return "auto";
}

Result<H2dMethod> parse_h2d_method(std::string_view s) {
  for (H2dMethod m : {H2dMethod::kAuto, H2dMethod::kSlab, H2dMethod::kBatch, H2dMethod::kGather}) {
    if (s == h2d_method_name(m)) return m;
  }
  return Status::invalid_argument("unknown host -> device method '" + clip(s) +
                                  "' (expected auto, slab, batch or gather)");
}

Status check_backend_available(PeerBackend b) {
  if (b != PeerBackend::kCuda) return Status::ok_status();
#if TROVE_HAVE_CUDA
  return cuda_device_available();
#else
  return Status::not_supported(
      "no CUDA device is available (trove was built without CUDA: configure with "
      "-DTROVE_CUDA=ON where nvcc is installed)");
#endif
}

struct PeerLayer::Impl {
  PeerConfig config;
  PeerDenseParams params;
  std::unique_ptr<ExpertSource> experts;
  PeerLayerOptions options;
  std::unique_ptr<CudaPeerRunner> cuda;  // kCuda only

  // Scratch reused across batches.
  std::vector<float> xhat, q;
  PeerRouting routing;
  std::vector<int64_t> unique_ids;
  std::vector<const uint8_t*> unique_records;
  std::vector<const uint8_t*> slot_records;
  std::vector<int32_t> slot_index;
  std::vector<int32_t> index_of_expert;  // see dedupe
  std::vector<uint8_t> prefetch_mark;    // prefetch(): per expert, all 0 between calls
  std::vector<int64_t> prefetch_ids;
  PeerExpertProgress progress;

  PeerRouterParams router() const {
    PeerRouterParams p;
    p.query_weight = params.query_weight.data();
    p.query_bias = params.query_bias.empty() ? nullptr : params.query_bias.data();
    p.keys = params.keys.data();
    p.norm_weight = params.norm_weight.empty() ? nullptr : params.norm_weight.data();
    return p;
  }
  bool ref() const { return options.backend == PeerBackend::kRef; }
  bool on_cuda() const { return cuda != nullptr; }

  Status check_input(std::span<const float> x, int64_t T) const {
    if (T < 0) return Status::invalid_argument(str_printf("batch of %lld tokens", (long long)T));
    TROVE_RETURN_IF_ERROR(
        check_size("input", x.size(), T * config.dim,
                   str_printf("%lld tokens x dim %lld", (long long)T, (long long)config.dim)));
    return check_finite_rows("input", x, config.dim);
  }

  // Norm, query and routing of x into xhat, q and `out` (kCuda: xhat stays on the device).
  Status route(const float* x, int64_t T, PeerRouting* out) {
    if (on_cuda()) return cuda->route(params, x, T, out);
    xhat.resize(static_cast<size_t>(T * config.dim));
    q.resize(static_cast<size_t>(T * config.query_rows()));
    const PeerRouterParams p = router();
    if (ref()) {
      peer_norm_ref(config, p.norm_weight, x, T, xhat.data());
      peer_query_ref(config, p, xhat.data(), T, q.data());
      peer_route_ref(config, p, q.data(), T, out);
    } else {
      peer_norm(config, p.norm_weight, x, T, xhat.data(), options.threads);
      peer_query(config, p, xhat.data(), T, q.data(), options.threads);
      peer_route(config, p, q.data(), T, out, options.threads);
    }
    return Status::ok_status();
  }

  // The unique experts of `r` into unique_ids (ascending) and each slot's index among them
  // into slot_index. Dedupe goes through a flat id -> index array (4 bytes per expert, all -1
  // between calls) instead of a search per slot: a batch has tens of thousands of slots, and
  // this runs on the critical path of every layer call.
  void dedupe(const PeerRouting& r) {
    if (index_of_expert.empty())
      index_of_expert.assign(static_cast<size_t>(config.num_experts()), -1);
    unique_ids.clear();
    // The marks are scattered over N entries: each slot's is prefetched 16 slots ahead.
    constexpr size_t kAhead = 16;
    for (size_t s = 0; s < r.ids.size(); ++s) {
      if (s + kAhead < r.ids.size()) {
        __builtin_prefetch(&index_of_expert[static_cast<size_t>(r.ids[s + kAhead])], 1);
      }
      const int64_t id = r.ids[s];
      int32_t& mark = index_of_expert[static_cast<size_t>(id)];
      if (mark < 0) {
        mark = 0;
        unique_ids.push_back(id);
      }
    }
    std::sort(unique_ids.begin(), unique_ids.end());
    for (size_t u = 0; u < unique_ids.size(); ++u) {
      index_of_expert[static_cast<size_t>(unique_ids[u])] = static_cast<int32_t>(u);
    }
    slot_index.resize(r.ids.size());
    for (size_t s = 0; s < r.ids.size(); ++s) {
      slot_index[s] = index_of_expert[static_cast<size_t>(r.ids[s])];
    }
    for (int64_t id : unique_ids) index_of_expert[static_cast<size_t>(id)] = -1;
    unique_records.resize(unique_ids.size());
    slot_records.resize(r.ids.size());
  }

  // slot_records from unique_records (nullptr for a record not here yet).
  void point_slots() {
    for (size_t s = 0; s < slot_records.size(); ++s) {
      slot_records[s] = unique_records[static_cast<size_t>(slot_index[s])];
    }
  }

  // Leases the unique experts of `r` and points slot_records at each slot's record.
  Status lease_experts(const PeerRouting& r, Lease* lease) {
    dedupe(r);
    TROVE_RETURN_IF_ERROR(lease->begin(unique_ids, unique_records));
    TROVE_RETURN_IF_ERROR(lease->finish(unique_records));
    point_slots();
    return Status::ok_status();
  }

  // The expert pass of forward() over routing `r` into y, with the source's records fetched
  // while it computes (runtime/tiers/tiered_source.h has the timeline): wave 1 on the records that
  // are here, wave 2 on the rest once they land. The result does not depend on which records
  // came late (kernels/cpu/peer.h: peer_experts_resume).
  Status run_experts(const PeerRouting& r, float* y, PeerBatchStats* stats) {
    if (on_cuda()) return run_experts_cuda(r, y, stats);
    Stopwatch start;
    dedupe(r);
    Lease lease(*experts);
    TROVE_RETURN_IF_ERROR(lease.begin(unique_ids, unique_records));
    const double acquire_seconds = start.seconds();
    start.restart();
    const PeerConfig& c = config;
    const RecordLayout& layout = experts->layout();
    const bool pending =
        std::find(unique_records.begin(), unique_records.end(), nullptr) != unique_records.end();
    if (!pending || ref()) {
      TROVE_RETURN_IF_ERROR(lease.finish(unique_records));
      point_slots();
      if (r.tokens > 0 && ref()) {
        peer_experts_ref(c, layout, xhat.data(), r, slot_records.data(), y);
      } else if (r.tokens > 0) {
        peer_experts(c, layout, xhat.data(), r, slot_records.data(), y, options.threads,
                     options.expert_dot);
      }
    } else {
      point_slots();
      progress.reset(r.tokens, r.heads * r.topk);
      peer_experts_resume(c, layout, xhat.data(), r, slot_records.data(), y, &progress,
                          options.threads, options.expert_dot);
      TROVE_RETURN_IF_ERROR(lease.finish(unique_records));
      point_slots();
      peer_experts_resume(c, layout, xhat.data(), r, slot_records.data(), y, &progress,
                          options.threads, options.expert_dot);
      TROVE_CHECK(progress.done());
    }
    if (stats != nullptr) {
      const uint64_t rec = layout.record_bytes;
      stats->tokens = r.tokens;
      stats->slots = static_cast<int64_t>(r.ids.size());
      stats->unique_experts = static_cast<int64_t>(unique_ids.size());
      stats->record_bytes_used = rec * r.ids.size();
      stats->record_bytes_unique = rec * unique_ids.size();
      stats->fetch = experts->last_fetch();
      stats->acquire_seconds = acquire_seconds;
      // Time blocked on the disk is the fetch's, not the kernels'.
      stats->expert_seconds = std::max(0.0, start.seconds() - stats->fetch.stall_seconds);
    }
    return Status::ok_status();
  }

  // run_experts on the device (runtime/layer/peer_layer_cuda.h has the timeline). expert_seconds
  // covers the transfer and the kernel; stats->device splits out the transfer.
  Status run_experts_cuda(const PeerRouting& r, float* y, PeerBatchStats* stats) {
    Stopwatch start;
    dedupe(r);
    DeviceTransferStats device;
    TROVE_RETURN_IF_ERROR(cuda->experts(r, unique_ids, slot_index, *experts, y, &device));
    fill_cuda_stats(r, device, experts->last_fetch(), start, stats);
    return Status::ok_status();
  }

  // An all-hit batch whose expert pass route_resident() queued: dedupe and T0's bookkeeping
  // while it runs, then y. The source was not asked for anything.
  Status finish_resident_cuda(const PeerRouting& r, float* y, PeerBatchStats* stats) {
    Stopwatch start;
    dedupe(r);
    DeviceTransferStats device;
    TROVE_RETURN_IF_ERROR(cuda->finish_resident(r, unique_ids, y, &device));
    fill_cuda_stats(r, device, ExpertFetchStats{}, start, stats);
    return Status::ok_status();
  }

  void fill_cuda_stats(const PeerRouting& r, const DeviceTransferStats& device,
                       const ExpertFetchStats& fetch, const Stopwatch& start,
                       PeerBatchStats* stats) {
    if (stats != nullptr) {
      const uint64_t rec = experts->layout().record_bytes;
      stats->tokens = r.tokens;
      stats->slots = static_cast<int64_t>(r.ids.size());
      stats->unique_experts = static_cast<int64_t>(unique_ids.size());
      stats->record_bytes_used = rec * r.ids.size();
      stats->record_bytes_unique = rec * unique_ids.size();
      stats->fetch = fetch;
      stats->device = device;
      stats->acquire_seconds = stats->fetch.resolve_seconds + stats->fetch.stall_seconds;
      stats->expert_seconds = std::max(0.0, start.seconds() - stats->acquire_seconds);
    }
  }
};

PeerLayer::PeerLayer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PeerLayer::PeerLayer(PeerLayer&&) noexcept = default;
PeerLayer& PeerLayer::operator=(PeerLayer&&) noexcept = default;
PeerLayer::~PeerLayer() = default;

const PeerConfig& PeerLayer::config() const {
  return impl_->config;
}
const RecordLayout& PeerLayer::record_layout() const {
  return impl_->experts->layout();
}
const PeerDenseParams& PeerLayer::params() const {
  return impl_->params;
}
PeerDenseParams& PeerLayer::mutable_params() {
  if (impl_->cuda != nullptr) impl_->cuda->mark_params_changed();
  return impl_->params;
}
ExpertSource& PeerLayer::experts() {
  return *impl_->experts;
}
std::vector<H2dMethodTotals> PeerLayer::h2d_totals() const {
  return impl_->cuda != nullptr ? impl_->cuda->h2d_totals() : std::vector<H2dMethodTotals>{};
}
H2dMethod PeerLayer::h2d_method() const {
  return impl_->cuda != nullptr ? impl_->cuda->h2d_method() : H2dMethod::kAuto;
}
const PeerLayerOptions& PeerLayer::options() const {
  return impl_->options;
}

Result<PeerLayer> PeerLayer::create(PeerConfig config, PeerDenseParams params,
                                    std::unique_ptr<ExpertSource> experts,
                                    PeerLayerOptions options) {
  TROVE_RETURN_IF_ERROR(config.validate_and_fill());
  if (experts == nullptr) return Status::invalid_argument("PEER layer: no expert source");
  const PeerConfig& c = config;
  const std::string qshape =
      str_printf("[%lld, %lld]", (long long)c.query_rows(), (long long)c.dim);
  TROVE_RETURN_IF_ERROR(
      check_size("query.weight", params.query_weight.size(), c.query_rows() * c.dim, qshape));
  if (c.query_bias) {
    TROVE_RETURN_IF_ERROR(check_size("query.bias", params.query_bias.size(), c.query_rows(),
                                     str_printf("[%lld]", (long long)c.query_rows())));
  } else if (!params.query_bias.empty()) {
    return Status::invalid_argument("query.bias given but the config has query_bias = false");
  }
  TROVE_RETURN_IF_ERROR(check_size("keys", params.keys.size(),
                                   c.key_heads() * 2 * c.n_keys * c.dim_key,
                                   str_printf("[%lld, 2, %lld, %lld]", (long long)c.key_heads(),
                                              (long long)c.n_keys, (long long)c.dim_key)));
  if (c.input_norm == InputNorm::kRms) {
    TROVE_RETURN_IF_ERROR(check_size("norm.weight", params.norm_weight.size(), c.dim,
                                     str_printf("[%lld]", (long long)c.dim)));
  } else if (!params.norm_weight.empty()) {
    return Status::invalid_argument("norm.weight given but the config has input_norm = none");
  }
  const RecordLayout& l = experts->layout();
  if (l.dim != c.dim || l.dim_out != c.dim_out || l.width != c.expert_width ||
      experts->num_experts() != c.num_experts()) {
    return Status::invalid_argument(str_printf(
        "PEER layer: the expert source (%s: dim %lld, dim_out %lld, width %lld, %lld experts) "
        "does not match the config (dim %lld, dim_out %lld, width %lld, %lld experts)",
        experts->describe().c_str(), (long long)l.dim, (long long)l.dim_out, (long long)l.width,
        (long long)experts->num_experts(), (long long)c.dim, (long long)c.dim_out,
        (long long)c.expert_width, (long long)c.num_experts()));
  }
  if (options.pipeline_chunks < 0 || options.pipeline_chunks > 64) {
    return Status::invalid_argument(
        str_printf("pipeline chunks must be 0 (auto) to 64, got %d", options.pipeline_chunks));
  }
  if (options.threads < 0) {
    return Status::invalid_argument(str_printf("threads must be >= 0, got %d", options.threads));
  }
  auto impl = std::make_unique<Impl>();
  if (options.backend == PeerBackend::kCuda) {
    TROVE_RETURN_IF_ERROR(check_backend_available(PeerBackend::kCuda));
    auto runner = CudaPeerRunner::create(config, l, options);
    if (!runner.ok()) return runner.status().with_context("PEER layer on the cuda backend");
    impl->cuda = std::move(runner).value();
  } else if (options.vram_budget_bytes > 0) {
    return Status::invalid_argument(
        str_printf("a device budget (vram %llu bytes) needs the cuda backend, not %s",
                   static_cast<unsigned long long>(options.vram_budget_bytes),
                   std::string(peer_backend_name(options.backend)).c_str()));
  }
  impl->config = config;
  impl->params = std::move(params);
  impl->experts = std::move(experts);
  impl->options = options;
  return PeerLayer(std::move(impl));
}

Result<PeerLayer> PeerLayer::open(const StoreReader& store, const std::string& name,
                                  PeerLayerOptions options) {
  TROVE_ASSIGN_OR_RETURN(StoredLayer stored, load_stored_layer(store, name));
  if (stored.info->info.contains("training_view")) {
    // int8 codes at scale d/16 (train/trainer.h): served as they are they would be 16x too big.
    return Status::invalid_argument(
        store.path() + ": layer " + name + " is the training state of layer " +
        stored.info->info["training_view"].value("of", std::string("?")) +
        " (int8 codes at scale d/16, not a servable layer); run that layer instead");
  }
  const StoreLayerInfo& info = *stored.info;
  PeerDenseParams params;
  TROVE_ASSIGN_OR_RETURN(params.query_weight, store.read_dense(info, "query.weight"));
  TROVE_ASSIGN_OR_RETURN(params.keys, store.read_dense(info, "keys"));
  if (stored.config.query_bias) {
    TROVE_ASSIGN_OR_RETURN(params.query_bias, store.read_dense(info, "query.bias"));
  }
  if (stored.config.input_norm == InputNorm::kRms) {
    TROVE_ASSIGN_OR_RETURN(params.norm_weight, store.read_dense(info, "norm.weight"));
  }
  std::unique_ptr<ExpertSource> source;
  if (options.tiers.has_value()) {
    TieredSourceOptions tiers = *options.tiers;
    tiers.io.verify = options.verify_checksums;
    // On the device, the host tier is pinned and mapped: the device tier fills straight from it.
    if (options.backend == PeerBackend::kCuda && tiers.host_memory == nullptr) {
      tiers.host_memory = make_pinned_slot_memory();
    }
    auto tiered = TieredExpertSource::open(store, info, stored.record, tiers);
    if (!tiered.ok()) return tiered.status();
    source = std::move(tiered).value();
  } else {
    auto resident =
        ResidentStoreExpertSource::open(store, info, stored.record, options.verify_checksums);
    if (!resident.ok()) return resident.status();
    source = std::move(resident).value();
  }
  auto layer = create(stored.config, std::move(params), std::move(source), options);
  if (!layer.ok()) return layer.status().with_context(store.path() + ": layer " + name);
  return layer;
}

Status PeerLayer::route(std::span<const float> x, int64_t T, PeerRouting* routing) {
  Impl& m = *impl_;
  TROVE_RETURN_IF_ERROR(m.check_input(x, T));
  if (m.on_cuda()) return m.cuda->route(m.params, x.data(), T, routing);
  return m.route(x.data(), T, routing);
}

void PeerLayer::prefetch(const PeerRouting& routing) {
  Impl& m = *impl_;
  if (m.prefetch_mark.empty()) m.prefetch_mark.assign(sz(m.config.num_experts()), 0);
  m.prefetch_ids.clear();
  for (int64_t id : routing.ids) {
    uint8_t& mark = m.prefetch_mark[static_cast<size_t>(id)];
    if (mark == 0) {
      mark = 1;
      m.prefetch_ids.push_back(id);
    }
  }
  std::sort(m.prefetch_ids.begin(), m.prefetch_ids.end());
  for (int64_t id : m.prefetch_ids) m.prefetch_mark[static_cast<size_t>(id)] = 0;
  m.experts->prefetch(m.prefetch_ids);
}

std::span<const int64_t> PeerLayer::last_experts() const {
  return impl_->unique_ids;
}

Status PeerLayer::check_batch(int64_t tokens) const {
  const PeerConfig& c = impl_->config;
  const int64_t per_token = c.heads * c.topk;
  const std::string what =
      str_printf("%lld tokens x %lld selections", static_cast<long long>(tokens),
                 static_cast<long long>(per_token));
  if (impl_->cuda != nullptr) {
    TROVE_RETURN_IF_ERROR(impl_->cuda->check_batch(tokens * per_token, what));
  }
  return impl_->experts->check_batch(tokens * per_token, what);
}

Status PeerLayer::forward(std::span<const float> x, int64_t T, std::span<float> y,
                          PeerRouting* routing, PeerBatchStats* stats) {
  Impl& m = *impl_;
  const PeerConfig& c = m.config;
  TROVE_RETURN_IF_ERROR(m.check_input(x, T));
  TROVE_RETURN_IF_ERROR(
      check_size("output", y.size(), T * c.dim_out,
                 str_printf("%lld tokens x dim_out %lld", (long long)T, (long long)c.dim_out)));
  PeerRouting& r = routing != nullptr ? *routing : m.routing;
  Stopwatch start;
  bool computed = false;  // kCuda: an all-hit batch's expert pass is already queued
  if (m.on_cuda()) {
    TROVE_RETURN_IF_ERROR(m.cuda->route_resident(m.params, x.data(), T, &r, &computed));
  } else {
    TROVE_RETURN_IF_ERROR(m.route(x.data(), T, &r));
  }
  const double route_seconds = start.seconds();

  if (computed) {
    TROVE_RETURN_IF_ERROR(m.finish_resident_cuda(r, y.data(), stats));
  } else {
    TROVE_RETURN_IF_ERROR(m.run_experts(r, y.data(), stats));
  }
  if (stats != nullptr) stats->route_seconds = route_seconds;
  return Status::ok_status();
}

Status PeerLayer::forward_routed(std::span<const float> x, int64_t T, const PeerRouting& routing,
                                 std::span<float> y, PeerBatchStats* stats) {
  Impl& m = *impl_;
  const PeerConfig& c = m.config;
  TROVE_RETURN_IF_ERROR(m.check_input(x, T));
  TROVE_RETURN_IF_ERROR(
      check_size("output", y.size(), T * c.dim_out,
                 str_printf("%lld tokens x dim_out %lld", (long long)T, (long long)c.dim_out)));
  if (routing.tokens != T || routing.heads != c.heads || routing.topk != c.topk ||
      routing.ids.size() != static_cast<size_t>(T * c.heads * c.topk) ||
      routing.gates.size() != routing.ids.size()) {
    return Status::invalid_argument(str_printf(
        "routing: %lld tokens x %lld heads x %lld (%zu ids, %zu gates), expected %lld x %lld x "
        "%lld",
        (long long)routing.tokens, (long long)routing.heads, (long long)routing.topk,
        routing.ids.size(), routing.gates.size(), (long long)T, (long long)c.heads,
        (long long)c.topk));
  }
  for (size_t s = 0; s < routing.ids.size(); ++s) {
    if (routing.ids[s] < 0 || routing.ids[s] >= c.num_experts() ||
        !std::isfinite(routing.gates[s])) {
      return Status::invalid_argument(str_printf(
          "routing: slot %zu has expert %lld (of %lld) and gate %g", s, (long long)routing.ids[s],
          (long long)c.num_experts(), static_cast<double>(routing.gates[s])));
    }
  }
  Stopwatch start;
  m.xhat.resize(static_cast<size_t>(T * c.dim));
  const PeerRouterParams p = m.router();
  if (m.on_cuda()) {
    TROVE_RETURN_IF_ERROR(m.cuda->route(m.params, x.data(), T, nullptr));
  } else if (m.ref()) {
    peer_norm_ref(c, p.norm_weight, x.data(), T, m.xhat.data());
  } else {
    peer_norm(c, p.norm_weight, x.data(), T, m.xhat.data(), m.options.threads);
  }
  const double route_seconds = start.seconds();
  TROVE_RETURN_IF_ERROR(m.run_experts(routing, y.data(), stats));
  if (stats != nullptr) stats->route_seconds = route_seconds;
  return Status::ok_status();
}

Status PeerLayer::backward(std::span<const float> x, int64_t T, std::span<const float> dy,
                           PeerGrads* grads) {
  Impl& m = *impl_;
  const PeerConfig& c = m.config;
  TROVE_RETURN_IF_ERROR(m.check_input(x, T));
  TROVE_RETURN_IF_ERROR(
      check_size("output gradient", dy.size(), T * c.dim_out,
                 str_printf("%lld tokens x dim_out %lld", (long long)T, (long long)c.dim_out)));
  TROVE_RETURN_IF_ERROR(check_finite_rows("output gradient", dy, c.dim_out));
  TROVE_RETURN_IF_ERROR(m.route(x.data(), T, &m.routing));
  Lease lease(*m.experts);
  TROVE_RETURN_IF_ERROR(m.lease_experts(m.routing, &lease));
  const PeerRouterParams p = m.router();
  if (m.on_cuda()) {
#if TROVE_HAVE_CUDA
    // The routing is the device's (as forward's); the gradients come from the CUDA backward
    // on the leased host records (it copies each distinct record to the device once).
    return cuda_peer_backward(c, p, m.experts->layout(), x.data(), T, m.routing,
                              m.slot_records.data(), dy.data(), grads);
#else
    return Status::not_supported("trove was built without CUDA");
#endif
  } else if (m.ref()) {
    peer_backward_ref(c, p, m.experts->layout(), x.data(), T, m.routing, m.slot_records.data(),
                      dy.data(), grads);
  } else {
    peer_backward(c, p, m.experts->layout(), x.data(), T, m.routing, m.slot_records.data(),
                  dy.data(), grads, m.options.threads);
  }
  return Status::ok_status();
}

}  // namespace trove
