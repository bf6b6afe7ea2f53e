#include "runtime/bench/device_peers.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "base/bytes.h"
#include "base/numeric.h"
#include "base/stopwatch.h"
#include "base/strings.h"

#if TROVE_HAVE_CUDA
#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/peer_cuda.h"
#include "kernels/cuda/peer_einsum.h"
#endif

namespace trove {

namespace {

Status invalid(const std::string& what) {
  return Status::invalid_argument("device peers: " + what);
}

// A filled copy of the options' config, after checking every field.
Result<PeerConfig> check_options(const DevicePeerOptions& o) {
  PeerConfig c = o.config;
  TROVE_RETURN_IF_ERROR(c.validate_and_fill().with_context("device peers: config"));
  if (o.layout.dim != c.dim || o.layout.dim_out != c.dim_out || o.layout.stride == 0) {
    return invalid(
        str_printf("layout is for dim %lld, dim_out %lld (stride %zu); the config has "
                   "dim %lld, dim_out %lld",
                   (long long)o.layout.dim, (long long)o.layout.dim_out, o.layout.stride,
                   (long long)c.dim, (long long)c.dim_out));
  }
  const uint64_t need = static_cast<uint64_t>(c.num_experts()) * o.layout.stride;
  if (o.table.data() == nullptr || o.table.size() < need) {
    return invalid(str_printf("table has %zu bytes; %lld experts at stride %zu need %llu",
                              o.table.size(), (long long)c.num_experts(), o.layout.stride,
                              (unsigned long long)need));
  }
  if (o.params == nullptr) return invalid("params is null");
  if (!o.source) return invalid("source is empty");
  if (o.batch < 1 || o.batches < 1) {
    return invalid(str_printf("batch %lld and batches %lld must be >= 1", (long long)o.batch,
                              (long long)o.batches));
  }
  return c;
}

}  // namespace

uint64_t expert_kernel_bytes(const PeerConfig& config, const RecordLayout& layout, int64_t tokens,
                             int64_t distinct_records) {
  const auto t = static_cast<uint64_t>(tokens);
  const auto slots = t * static_cast<uint64_t>(config.heads * config.topk);
  return static_cast<uint64_t>(distinct_records) * layout.record_bytes +
         t * static_cast<uint64_t>(config.dim) * sizeof(float) +     // xhat
         slots * (sizeof(float) + sizeof(int64_t)) +                 // gates, record indexes
         t * static_cast<uint64_t>(config.dim_out) * sizeof(float);  // y
}

#if TROVE_HAVE_CUDA

namespace {

bool does_not_fit(const Status& s) {
  return s.code() == Status::Code::kResourceExhausted;
}

int64_t count_distinct(std::span<const int64_t> ids) {
  std::vector<int64_t> v(ids.begin(), ids.end());
  std::sort(v.begin(), v.end());
  return std::unique(v.begin(), v.end()) - v.begin();
}

// Device memory for `count` elements of T.
template <typename T>
Result<CudaDeviceMemory> device_array(size_t count) {
  return CudaDeviceMemory::allocate(count * sizeof(T));
}

template <typename T>
T* as(const CudaDeviceMemory& m) {
  return reinterpret_cast<T*>(m.data());
}

template <typename T>
T* as(const PinnedHostBuffer& m) {
  return reinterpret_cast<T*>(m.data());
}

// What differs between the peers: y [T, D_out] from xhat and the routing, all on the device,
// queued on the context's stream.
using ExpertStep =
    std::function<Status(const float* xhat, const PeerDeviceRouting& routing, float* y)>;

// One batch's seconds: the layer on the device (x in device memory -> y in device memory, by
// CUDA events), its norm + routing part, and the host copies around it (wall).
struct BatchTimes {
  double layer = 0, route = 0, io = 0;
};

// The per-batch stages every peer shares (the timeline in device_peers.h), and their buffers.
class BatchRunner {
 public:
  static Result<BatchRunner> create(const DevicePeerOptions& o, const PeerConfig& c) {
    BatchRunner r;
    r.o_ = &o;
    r.c_ = c;
    TROVE_ASSIGN_OR_RETURN(r.ctx_, CudaPeerContext::create());
    const int64_t T = o.batch;
    const size_t slots = sz(T * c.heads * c.topk);
    TROVE_ASSIGN_OR_RETURN(r.x_, device_array<float>(sz(T * c.dim)));
    TROVE_ASSIGN_OR_RETURN(r.xhat_, device_array<float>(sz(T * c.dim)));
    TROVE_ASSIGN_OR_RETURN(r.q_, device_array<float>(sz(T * c.query_rows())));
    TROVE_ASSIGN_OR_RETURN(r.y_, device_array<float>(sz(T * c.dim_out)));
    TROVE_ASSIGN_OR_RETURN(r.ids_, device_array<int64_t>(slots));
    TROVE_ASSIGN_OR_RETURN(r.scores_, device_array<float>(slots));
    TROVE_ASSIGN_OR_RETURN(r.gates_, device_array<float>(slots));
    TROVE_ASSIGN_OR_RETURN(r.host_x_, PinnedHostBuffer::allocate(sz(T * c.dim) * sizeof(float)));
    TROVE_ASSIGN_OR_RETURN(r.host_y_,
                           PinnedHostBuffer::allocate(sz(T * c.dim_out) * sizeof(float)));
    TROVE_ASSIGN_OR_RETURN(r.host_ids_, PinnedHostBuffer::allocate(slots * sizeof(int64_t)));
    TROVE_ASSIGN_OR_RETURN(r.host_gates_, PinnedHostBuffer::allocate(slots * sizeof(float)));
    // The router's parameters, once.
    const PeerDenseParams& p = *o.params;
    TROVE_RETURN_IF_ERROR(r.upload(&r.query_weight_, p.query_weight));
    TROVE_RETURN_IF_ERROR(r.upload(&r.query_bias_, p.query_bias));
    TROVE_RETURN_IF_ERROR(r.upload(&r.keys_, p.keys));
    TROVE_RETURN_IF_ERROR(r.upload(&r.norm_weight_, p.norm_weight));
    TROVE_RETURN_IF_ERROR(r.ctx_.synchronize());
    TROVE_ASSIGN_OR_RETURN(r.start_, CudaEvent::create());
    TROVE_ASSIGN_OR_RETURN(r.routed_, CudaEvent::create());
    TROVE_ASSIGN_OR_RETURN(r.end_, CudaEvent::create());
    r.y_host_.resize(sz(T * c.dim_out));
    return Result<BatchRunner>(std::move(r));
  }

  CudaPeerContext& context() { return ctx_; }
  const std::vector<float>& y() const { return y_host_; }

  // Runs batch `index` through `experts` and returns its stages' seconds. The timed part starts
  // with x (and a given routing) already in device memory and ends with y in device memory, as
  // the layer runs inside a model on the GPU; the host copies around it are timed apart (io).
  // last_ids() then holds the batch's routing on the host (downloaded after the timing when the
  // device routed).
  Result<BatchTimes> run(int64_t index, const ExpertStep& experts) {
    const int64_t T = o_->batch;
    const size_t slots = sz(T * c_.heads * c_.topk);
    DevicePeerBatch in;
    TROVE_RETURN_IF_ERROR(
        o_->source(index, &in)
            .with_context(str_printf("device peers: batch %lld", (long long)index)));
    TROVE_RETURN_IF_ERROR(check_batch(index, in));
    const size_t x_bytes = sz(T * c_.dim) * sizeof(float);
    const size_t y_bytes = sz(T * c_.dim_out) * sizeof(float);
    PeerDeviceRouting routing{as<int64_t>(ids_), as<float>(scores_), as<float>(gates_)};
    BatchTimes times;

    Stopwatch io;
    std::memcpy(host_x_.data(), in.x, x_bytes);
    TROVE_RETURN_IF_ERROR(ctx_.copy_async(x_.data(), host_x_.data(), x_bytes));
    if (in.routing != nullptr) {
      std::memcpy(host_ids_.data(), in.routing->ids.data(), slots * sizeof(int64_t));
      std::memcpy(host_gates_.data(), in.routing->gates.data(), slots * sizeof(float));
      TROVE_RETURN_IF_ERROR(
          ctx_.copy_async(ids_.data(), host_ids_.data(), slots * sizeof(int64_t)));
      TROVE_RETURN_IF_ERROR(
          ctx_.copy_async(gates_.data(), host_gates_.data(), slots * sizeof(float)));
    }
    TROVE_RETURN_IF_ERROR(ctx_.synchronize());
    times.io = io.seconds();

    TROVE_RETURN_IF_ERROR(ctx_.record(start_));
    TROVE_RETURN_IF_ERROR(
        ctx_.norm_device(c_, as<float>(norm_weight_), as<float>(x_), T, as<float>(xhat_)));
    if (in.routing == nullptr) {
      PeerRouterParams p;
      p.query_weight = as<float>(query_weight_);
      p.query_bias = c_.query_bias ? as<float>(query_bias_) : nullptr;
      p.keys = as<float>(keys_);
      TROVE_RETURN_IF_ERROR(ctx_.query_device(c_, p, as<float>(xhat_), T, as<float>(q_)));
      TROVE_RETURN_IF_ERROR(ctx_.route_device(c_, p, as<float>(q_), T, routing));
    }
    TROVE_RETURN_IF_ERROR(ctx_.record(routed_));
    TROVE_RETURN_IF_ERROR(experts(as<float>(xhat_), routing, as<float>(y_)));
    TROVE_RETURN_IF_ERROR(ctx_.record(end_));
    TROVE_RETURN_IF_ERROR(ctx_.synchronize());
    TROVE_ASSIGN_OR_RETURN(times.layer, CudaEvent::elapsed_seconds(start_, end_));
    TROVE_ASSIGN_OR_RETURN(times.route, CudaEvent::elapsed_seconds(start_, routed_));

    io.restart();
    TROVE_RETURN_IF_ERROR(ctx_.copy_async(host_y_.data(), y_.data(), y_bytes));
    TROVE_RETURN_IF_ERROR(ctx_.synchronize());
    std::memcpy(y_host_.data(), host_y_.data(), y_bytes);
    times.io += io.seconds();

    last_ids_.resize(slots);
    if (in.routing != nullptr) {
      std::copy(in.routing->ids.begin(), in.routing->ids.end(), last_ids_.begin());
    } else {
      TROVE_RETURN_IF_ERROR(
          ctx_.copy_async(last_ids_.data(), ids_.data(), slots * sizeof(int64_t)));
      TROVE_RETURN_IF_ERROR(ctx_.synchronize());
    }
    return times;
  }

  std::span<const int64_t> last_ids() const { return last_ids_; }

 private:
  BatchRunner() = default;

  Status upload(CudaDeviceMemory* dst, const std::vector<float>& src) {
    TROVE_ASSIGN_OR_RETURN(*dst, device_array<float>(src.size()));
    return ctx_.copy_async(dst->data(), src.data(), src.size() * sizeof(float));
  }

  Status check_batch(int64_t index, const DevicePeerBatch& in) const {
    if (in.x == nullptr) return invalid(str_printf("batch %lld has no x", (long long)index));
    if (in.routing == nullptr) return Status::ok_status();
    const PeerRouting& r = *in.routing;
    if (r.tokens != o_->batch || r.heads != c_.heads || r.topk != c_.topk ||
        r.ids.size() != sz(r.tokens * r.heads * r.topk) || r.gates.size() != r.ids.size()) {
      return invalid(str_printf(
          "batch %lld: routing of %lld tokens x %lld heads x top-%lld (%zu ids); the layer runs "
          "%lld x %lld x %lld",
          (long long)index, (long long)r.tokens, (long long)r.heads, (long long)r.topk,
          r.ids.size(), (long long)o_->batch, (long long)c_.heads, (long long)c_.topk));
    }
    // The fused kernel reads table + id * stride unchecked.
    for (size_t s = 0; s < r.ids.size(); ++s) {
      if (r.ids[s] < 0 || r.ids[s] >= c_.num_experts()) {
        return invalid(str_printf("batch %lld: selection %zu is expert %lld of %lld",
                                  (long long)index, s, (long long)r.ids[s],
                                  (long long)c_.num_experts()));
      }
    }
    return Status::ok_status();
  }

  const DevicePeerOptions* o_ = nullptr;
  PeerConfig c_;
  CudaPeerContext ctx_;
  CudaDeviceMemory x_, xhat_, q_, y_, ids_, scores_, gates_;
  CudaDeviceMemory query_weight_, query_bias_, keys_, norm_weight_;
  PinnedHostBuffer host_x_, host_y_, host_ids_, host_gates_;
  CudaEvent start_, routed_, end_;
  std::vector<float> y_host_;
  std::vector<int64_t> last_ids_;
};

// Runs every batch once as `peer` and sums their times; *first_y gets batch 0's output when not
// null.
Result<BatchTimes> run_batches(BatchRunner& runner, const DevicePeerOptions& o, const char* peer,
                               const ExpertStep& experts, std::vector<float>* first_y,
                               const std::function<Status()>& after_batch = {}) {
  BatchTimes sum;
  for (int64_t b = 0; b < o.batches; ++b) {
    TROVE_ASSIGN_OR_RETURN(const BatchTimes t, runner.run(b, experts));
    sum.layer += t.layer;
    sum.route += t.route;
    sum.io += t.io;
    if (b == 0 && first_y != nullptr) *first_y = runner.y();
    if (o.on_output) o.on_output(peer, b, runner.y());
    if (after_batch) TROVE_RETURN_IF_ERROR(after_batch());
  }
  return sum;
}

// max |got - want| / max |want| (0 when want is all zeros and got equals it).
double max_error(const std::vector<float>& got, const std::vector<float>& want) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
    err = std::max(err, std::abs(static_cast<double>(got[i]) - want[i]));
    scale = std::max(scale, std::abs(static_cast<double>(want[i])));
  }
  return scale > 0 ? err / scale : err;
}

double tokens_per_second(const DevicePeerOptions& o, double seconds) {
  return seconds > 0 ? static_cast<double>(o.batch * o.batches) / seconds : 0;
}

std::string does_not_fit_reason(const char* what, uint64_t bytes, const Status& s) {
  return str_printf("%s (%s) did not fit: %s", what, format_bytes(bytes).c_str(),
                    s.message().c_str());
}

}  // namespace

Result<DevicePeerResult> run_device_peers(const DevicePeerOptions& o) {
  TROVE_ASSIGN_OR_RETURN(const PeerConfig c, check_options(o));
  TROVE_RETURN_IF_ERROR(cuda_device_available().with_context("device peers"));
  const int64_t n = c.num_experts();
  const uint64_t table_bytes = static_cast<uint64_t>(n) * o.layout.stride;
  const uint8_t* table = o.table.data();
  TROVE_ASSIGN_OR_RETURN(BatchRunner runner, BatchRunner::create(o, c));
  CudaPeerContext& ctx = runner.context();
  DevicePeerResult res;
  std::vector<float> resident_y;

  // Every peer first runs batch 0 once unmeasured (module loading, cuBLAS's first calls, the
  // einsum's scratch), except managed, whose cold first touches are what it measures.
  auto warm_up = [&](const ExpertStep& experts) { return runner.run(0, experts).status(); };

  if (o.resident) {
    Result<CudaDeviceMemory> device_table = CudaDeviceMemory::allocate(table_bytes);
    if (!device_table.ok()) {
      if (!does_not_fit(device_table.status())) return device_table.status();
      res.resident_skipped = does_not_fit_reason("the packed table in device memory", table_bytes,
                                                 device_table.status());
    } else {
      TROVE_RETURN_IF_ERROR(ctx.copy_async(device_table->data(), table, table_bytes));
      TROVE_RETURN_IF_ERROR(ctx.synchronize());
      TROVE_ASSIGN_OR_RETURN(CudaEvent start, CudaEvent::create());
      TROVE_ASSIGN_OR_RETURN(CudaEvent end, CudaEvent::create());
      const uint8_t* d_table = device_table->data();
      const ExpertStep experts = [&](const float* xhat, const PeerDeviceRouting& r, float* y) {
        TROVE_RETURN_IF_ERROR(ctx.record(start));
        TROVE_RETURN_IF_ERROR(
            ctx.experts_device_indexed(c, o.layout, xhat, o.batch, r.gates, d_table, r.ids, y));
        return ctx.record(end);
      };
      TROVE_RETURN_IF_ERROR(warm_up(experts));
      const auto after = [&]() -> Status {
        TROVE_ASSIGN_OR_RETURN(const double s, CudaEvent::elapsed_seconds(start, end));
        res.expert_kernel_seconds += s;
        res.expert_kernel_bytes +=
            expert_kernel_bytes(c, o.layout, o.batch, count_distinct(runner.last_ids()));
        return Status::ok_status();
      };
      TROVE_ASSIGN_OR_RETURN(const BatchTimes s,
                             run_batches(runner, o, "resident", experts, &resident_y, after));
      res.resident_tokens_per_second = tokens_per_second(o, s.layer);
      res.route_seconds = s.route;
      res.host_io_seconds = s.io;
    }
  }

  if (o.einsum) {
    Result<CudaEinsumPeer> peer = CudaEinsumPeer::create(c, o.layout, table, n);
    if (!peer.ok()) {
      if (!does_not_fit(peer.status())) return peer.status();
      res.einsum_skipped = does_not_fit_reason("the bf16 tables in device memory",
                                               CudaEinsumPeer::table_bytes(c, n), peer.status());
    } else {
      const ExpertStep experts = [&](const float* xhat, const PeerDeviceRouting& r, float* y) {
        return peer->forward_device(ctx, xhat, o.batch, r, y);
      };
      std::vector<float> einsum_y;
      const Status warm = warm_up(experts);
      Result<BatchTimes> s =
          warm.ok() ? run_batches(runner, o, "einsum", experts, &einsum_y) : warm;
      if (s.ok()) {
        res.einsum_tokens_per_second = tokens_per_second(o, s->layer);
        if (!resident_y.empty()) res.einsum_max_error = max_error(einsum_y, resident_y);
      } else if (does_not_fit(s.status())) {
        // The gathered rows of a tile may not fit beside the tables.
        res.einsum_skipped = "its gathered rows do not fit: " + s.status().message();
      } else {
        return s.status();
      }
    }
  }

  if (o.managed) {
    // The host writes the whole table, so it must fit host memory (half of it, as the CPU's
    // all-resident run asks); device memory it may exceed (pages then migrate back and forth).
    const uint64_t ram = static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) *
                         static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
    Result<CudaManagedMemory> managed =
        table_bytes <= ram / 2 ? CudaManagedMemory::allocate(table_bytes)
                               : Result<CudaManagedMemory>(Status::resource_exhausted(
                                     "over half of the host's memory (" + format_bytes(ram) + ")"));
    if (!managed.ok()) {
      if (!does_not_fit(managed.status())) return managed.status();
      res.managed_skipped =
          does_not_fit_reason("the packed table in managed memory", table_bytes, managed.status());
    } else {
      // Written by the host: its pages start on the host and migrate on the device's first touch.
      std::memcpy(managed->data(), table, table_bytes);
      const uint8_t* m_table = managed->data();
      const ExpertStep experts = [&](const float* xhat, const PeerDeviceRouting& r, float* y) {
        return ctx.experts_device_indexed(c, o.layout, xhat, o.batch, r.gates, m_table, r.ids, y);
      };
      TROVE_ASSIGN_OR_RETURN(const BatchTimes s,
                             run_batches(runner, o, "managed", experts, nullptr));
      res.managed_tokens_per_second = tokens_per_second(o, s.layer);
    }
  }
  return res;
}

#else  // !TROVE_HAVE_CUDA

Result<DevicePeerResult> run_device_peers(const DevicePeerOptions& o) {
  TROVE_RETURN_IF_ERROR(check_options(o).status());
  return Status::not_supported("device peers: trove was built without CUDA");
}

#endif

}  // namespace trove
