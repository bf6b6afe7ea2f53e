#include "runtime/layer/peer_layer.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "base/numeric.h"
#include "base/stopwatch.h"
#include "base/strings.h"
#include "runtime/layer/store_layer.h"

namespace trove {

namespace {

Status check_size(const char* what, size_t got, int64_t want, const std::string& shape) {
  if (got != static_cast<size_t>(want)) {
    return Status::invalid_argument(str_printf("%s has %zu values, expected %lld (%s)", what, got,
                                               static_cast<long long>(want), shape.c_str()));
  }
  return Status::ok_status();
}

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

struct PeerLayer::Impl {
  PeerConfig config;
  PeerDenseParams params;
  std::unique_ptr<ExpertSource> experts;
  PeerLayerOptions options;
  std::unique_ptr<PeerExecutor> executor;
  PeerRouting routing;                 // scratch, for calls without one
  std::vector<uint8_t> prefetch_mark;  // prefetch(): per expert, all 0 between calls
  std::vector<int64_t> prefetch_ids;

  Status check_input(std::span<const float> x, int64_t T) const {
    if (T < 0) return Status::invalid_argument(str_printf("batch of %lld tokens", (long long)T));
    TROVE_RETURN_IF_ERROR(
        check_size("input", x.size(), T * config.dim,
                   str_printf("%lld tokens x dim %lld", (long long)T, (long long)config.dim)));
    return check_finite_rows("input", x, config.dim);
  }

  Status check_output(std::span<const float> y, int64_t T, const char* what) const {
    return check_size(
        what, y.size(), T * config.dim_out,
        str_printf("%lld tokens x dim_out %lld", (long long)T, (long long)config.dim_out));
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
  impl_->executor->params_changed();
  return impl_->params;
}
ExpertSource& PeerLayer::experts() {
  return *impl_->experts;
}
const PeerExecutor& PeerLayer::executor() const {
  return *impl_->executor;
}
std::vector<H2dMethodTotals> PeerLayer::h2d_totals() const {
  return impl_->executor->h2d_totals();
}
H2dMethod PeerLayer::h2d_method() const {
  return impl_->executor->h2d_method();
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
  auto impl = std::make_unique<Impl>();
  TROVE_ASSIGN_OR_RETURN(impl->executor, make_peer_executor(config, l, options));
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
    // (cuda: the host tier is pinned and mapped, so that the device tier fills straight from it)
    if (tiers.host_memory == nullptr) tiers.host_memory = executor_host_memory(options);
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
  return impl_->executor->last_experts();
}

Status PeerLayer::check_batch(int64_t tokens) const {
  const PeerConfig& c = impl_->config;
  const int64_t per_token = c.heads * c.topk;
  const std::string what =
      str_printf("%lld tokens x %lld selections", static_cast<long long>(tokens),
                 static_cast<long long>(per_token));
  TROVE_RETURN_IF_ERROR(impl_->executor->check_batch(tokens * per_token, what));
  return impl_->experts->check_batch(tokens * per_token, what);
}

Status PeerLayer::forward(std::span<const float> x, int64_t T, std::span<float> y,
                          PeerRouting* routing, PeerBatchStats* stats) {
  Impl& m = *impl_;
  TROVE_RETURN_IF_ERROR(m.check_input(x, T));
  TROVE_RETURN_IF_ERROR(m.check_output(y, T, "output"));
  PeerRouting& r = routing != nullptr ? *routing : m.routing;
  return m.executor->forward(m.params, x.data(), T, *m.experts, &r, y.data(), stats);
}

Status PeerLayer::route(std::span<const float> x, int64_t T, PeerRouting* routing) {
  Impl& m = *impl_;
  TROVE_RETURN_IF_ERROR(m.check_input(x, T));
  return m.executor->route(m.params, x.data(), T, routing);
}

Status PeerLayer::forward_routed(std::span<const float> x, int64_t T, const PeerRouting& routing,
                                 std::span<float> y, PeerBatchStats* stats) {
  Impl& m = *impl_;
  const PeerConfig& c = m.config;
  TROVE_RETURN_IF_ERROR(m.check_input(x, T));
  TROVE_RETURN_IF_ERROR(m.check_output(y, T, "output"));
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
  TROVE_RETURN_IF_ERROR(m.executor->route(m.params, x.data(), T, nullptr));  // x-hat only
  const double route_seconds = start.seconds();
  TROVE_RETURN_IF_ERROR(m.executor->experts(routing, *m.experts, y.data(), stats));
  if (stats != nullptr) stats->route_seconds = route_seconds;
  return Status::ok_status();
}

Status PeerLayer::backward(std::span<const float> x, int64_t T, std::span<const float> dy,
                           PeerGrads* grads) {
  Impl& m = *impl_;
  const PeerConfig& c = m.config;
  TROVE_RETURN_IF_ERROR(m.check_input(x, T));
  TROVE_RETURN_IF_ERROR(m.check_output(dy, T, "output gradient"));
  TROVE_RETURN_IF_ERROR(check_finite_rows("output gradient", dy, c.dim_out));
  return m.executor->backward(m.params, *m.experts, x.data(), T, dy.data(), &m.routing, grads);
}

}  // namespace trove
