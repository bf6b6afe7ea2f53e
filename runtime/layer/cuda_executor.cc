#include "runtime/layer/cuda_executor.h"

#include "base/strings.h"
#include "runtime/layer/peer_executor.h"

namespace trove {

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

}  // namespace trove

#if TROVE_HAVE_CUDA

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "base/bytes.h"
#include "base/check.h"
#include "base/log.h"
#include "base/numeric.h"
#include "base/stopwatch.h"
#include "base/strings.h"
#include "kernels/cpu/peer.h"
#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/peer_cuda.h"
#include "kernels/cuda/peer_cuda_backward.h"
#include "kernels/cuda/residency.h"
#include "runtime/layer/expert_batch.h"
#include "runtime/layer/expert_waves.h"
#include "runtime/tiers/expert_cache.h"

namespace trove {

namespace {

// Device memory for the device tier's slot blocks.
class DeviceSlotMemory final : public SlotMemory {
 public:
  Result<uint8_t*> allocate(size_t bytes) override {
    TROVE_ASSIGN_OR_RETURN(CudaDeviceMemory m, CudaDeviceMemory::allocate(bytes));
    uint8_t* p = m.data();
    blocks_.push_back(std::move(m));
    return p;
  }
  void release(uint8_t* data, size_t) override {
    for (CudaDeviceMemory& m : blocks_) {
      if (m.data() == data) m.reset();
    }
  }

 private:
  std::vector<CudaDeviceMemory> blocks_;
};

// Host slot blocks registered with the device one by one (make_pinned_slot_memory).
class PinnedSlotMemory final : public SlotMemory {
 public:
  Result<uint8_t*> allocate(size_t bytes) override {
    TROVE_ASSIGN_OR_RETURN(uint8_t * p, allocate_host_block(bytes));
    Block b{p, bytes, HostRegistration::register_range(p, bytes)};
    // Sorted by address, for device_address's search.
    auto at = std::upper_bound(blocks_.begin(), blocks_.end(), p,
                               [](const uint8_t* q, const Block& x) { return q < x.data; });
    blocks_.insert(at, std::move(b));
    return p;
  }
  void release(uint8_t* data, size_t bytes) override {
    for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
      if (it->data == data) {
        blocks_.erase(it);  // unregisters first
        free_host_block(data, bytes);
        return;
      }
    }
  }
  const uint8_t* device_address(const uint8_t* p) const override {
    auto at = std::upper_bound(blocks_.begin(), blocks_.end(), p,
                               [](const uint8_t* q, const Block& x) { return q < x.data; });
    if (at == blocks_.begin()) return nullptr;
    const Block& b = *(at - 1);
    if (p >= b.data + b.bytes || !b.pin.registered()) return nullptr;
    return b.pin.device_data() + (p - b.data);
  }

 private:
  struct Block {
    uint8_t* data;
    size_t bytes;
    HostRegistration pin;
  };
  std::vector<Block> blocks_;
};

// Grows `m` to at least `bytes` (contents not kept).
Status reserve(CudaDeviceMemory* m, size_t bytes) {
  if (m->bytes() >= bytes) return Status::ok_status();
  m->reset();
  TROVE_ASSIGN_OR_RETURN(*m, CudaDeviceMemory::allocate(bytes));
  return Status::ok_status();
}
Status reserve(PinnedHostBuffer* b, size_t bytes) {
  if (b->bytes() >= bytes) return Status::ok_status();
  // Grow by half again, so a slowly growing batch does not reallocate (and re-pin) each time.
  const size_t grown = std::max(bytes, b->bytes() / 2 * 3);
  b->reset();
  TROVE_ASSIGN_OR_RETURN(*b, PinnedHostBuffer::allocate(grown));
  return Status::ok_status();
}

template <typename T>
Status upload(CudaCopyStream& stream, CudaDeviceMemory* m, const std::vector<T>& v) {
  TROVE_RETURN_IF_ERROR(reserve(m, v.size() * sizeof(T)));
  return stream.copy_async(m->data(), v.data(), v.size() * sizeof(T));
}

constexpr int kAutoChunkTokens = 256;
constexpr int kMaxAutoChunks = 4;
constexpr int kTrialBatches = 2;  // per method, under H2dMethod::kAuto

int method_index(H2dMethod m) {
  return static_cast<int>(m);
}

// The source's lease on a batch's misses: begun (what is in host memory readable, the disk's on
// its way), then finished (every record readable) until released.
enum class SourceLease { kNone, kBegun, kFinished };

}  // namespace

std::shared_ptr<SlotMemory> make_pinned_slot_memory() {
  return std::make_shared<PinnedSlotMemory>();
}

// The executor; its public methods are PeerExecutor's, the rest the steps of its flow.
class CudaExecutor final : public PeerExecutor {
 public:
  struct Impl;
  explicit CudaExecutor(std::unique_ptr<Impl> impl);
  ~CudaExecutor() override;

  std::string_view name() const override { return "cuda"; }
  Status check_batch(int64_t max_unique, const std::string& what) const override;
  void params_changed() override;
  Status route(const PeerDenseParams& params, const float* x, int64_t tokens,
               PeerRouting* routing) override;
  Status experts(const PeerRouting& routing, ExpertSource& source, float* y,
                 PeerBatchStats* stats) override;
  Status forward(const PeerDenseParams& params, const float* x, int64_t tokens,
                 ExpertSource& source, PeerRouting* routing, float* y,
                 PeerBatchStats* stats) override;
  Status backward(const PeerDenseParams& params, ExpertSource& source, const float* x,
                  int64_t tokens, const float* dy, PeerRouting* routing, PeerGrads* grads) override;
  std::span<const int64_t> last_experts() const override;
  std::vector<H2dMethodTotals> h2d_totals() const override;
  H2dMethod h2d_method() const override;

 private:
  // route() that, when the device tier holds every expert the routing chose (looked up on the
  // device), also queues the expert pass and sets *computed; the routing is copied back either
  // way. After *computed, finish_resident() copies y back; else run_experts() as after route().
  Status route_resident(const PeerDenseParams& params, const float* x, int64_t tokens,
                        PeerRouting* routing, bool* computed);
  // The T0 bookkeeping of an all-hit batch (batch_'s unique ids) while its kernel runs, then y.
  Status finish_resident(const PeerRouting& routing, float* y, DeviceTransferStats* stats);
  // The expert pass over `routing` on the x-hat of the last route(), batch_ deduped.
  Status run_experts(const PeerRouting& routing, ExpertSource& source, float* y,
                     DeviceTransferStats* stats);
  // run_experts' flow in waves, once the source has begun the misses (`pending` of them on
  // their way from disk) and the CPU's share is chosen; finishes the source's lease (*lease).
  Status run_waves(const PeerRouting& routing, ExpertSource& source, float* y, size_t pending,
                   DeviceTransferStats* stats, SourceLease* lease);
  // The counters of a batch that took `start` until now.
  void count(const PeerRouting& routing, const DeviceTransferStats& device,
             const ExpertFetchStats& fetch, const Stopwatch& start, PeerBatchStats* stats) const;

  std::unique_ptr<Impl> impl_;
  ExpertBatch batch_;
};

struct CudaExecutor::Impl {
  PeerConfig config;
  RecordLayout layout;
  H2dMethod h2d = H2dMethod::kAuto;  // as asked
  int pipeline_chunks = 0;
  CudaPeerContext ctx;
  CudaCopyStream copies;
  CudaEvent copy_start, copy_end, computed;
  CudaEvent kernel_start;                    // before an expert kernel timed alone (device rate)
  std::vector<CudaEvent> chunk_ready;        // one per chunk, grown
  std::unique_ptr<ExpertCache> device_tier;  // null without --vram

  bool params_changed = true;
  CudaDeviceMemory query_weight, query_bias, keys, norm_weight;
  // Per batch, grown to the largest: inputs and routing, the tables, the device slab (records
  // without T0), y.
  CudaDeviceMemory x, xhat, q, ids, scores, gates, tables, slab, y;
  PinnedHostBuffer staging;  // tables, then (slab method) packed records

  // H2D methods: what each moved, the trial schedule under kAuto and the one chosen.
  H2dMethodTotals totals[4];
  int trials = 0;                            // batches with misses run under kAuto so far
  double best_batch_rate[4] = {0, 0, 0, 0};  // per method, bytes/s of its best batch
  H2dMethod chosen = H2dMethod::kAuto;

  // T0's residency on the device for the all-hit path (the header's second timeline).
  CudaDeviceMemory resident;                  // [N] device record addresses, null: not in T0
  std::vector<const uint8_t*> resident_host;  // what `resident` holds once the updates land
  std::vector<int64_t> changed;  // ids whose entry changed since `resident` was written
  std::vector<const uint8_t*> changed_values;
  bool resident_stale = false;  // too many changes: write it whole
  CudaDeviceMemory updates, miss_count;
  PinnedHostBuffer miss_count_host;
  CudaEvent routed;
  bool try_resident = false;  // the last batch had no misses in T0

  // Scratch, per batch.
  std::vector<uint8_t*> dest;     // per unique id: its device address
  std::vector<uint32_t> miss_u;   // unique index of each miss, ascending
  std::vector<int64_t> miss_ids;  // ascending, for the source
  std::vector<const uint8_t*> miss_records;
  std::vector<uint32_t> order;       // misses by chunk: indices into miss_u
  std::vector<int64_t> chunk_begin;  // into order, C + 1 entries
  std::vector<int32_t> first_chunk;  // per unique id
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  CacheBatch batch;
  // The flow in waves and the CPU's share (cpu_misses).
  bool cpu_misses = false;
  int cpu_threads = 0;
  MissCostRates rates;  // measured: the CPU's and the device's (H2D: best_batch_rate)
  SlotWaves waves;
  CudaDeviceMemory zero_record;  // one record of zeros: the CPU's slots on the device
  std::vector<uint8_t> on_cpu;   // per unique id: the CPU computes it
  int64_t cpu_count = 0;         // unique ids on the CPU
  std::vector<uint8_t> ready_u;  // per unique id: its record is on the device for this wave
  std::vector<uint32_t> copy_u;  // unique index of each miss copied to the device
  std::vector<int64_t> t0_ids;   // what T0 admits when the CPU takes some misses
  std::vector<uint32_t> t0_u;
  std::vector<int32_t> j_of_u, uses_u, cand_uses;
  std::vector<uint32_t> cand_j;
  std::vector<uint8_t> selected;
  std::vector<const uint8_t*> cpu_records;
  std::vector<float> xhat_host, y_cpu;
  std::vector<uint32_t> landed;  // ExpertSource::wait_landed's
  // Per wave of a batch: its tables (record addresses, ranges) on the host and the device, and
  // its copies' start and end events; grown to the most waves a batch has had.
  std::vector<PinnedHostBuffer> wave_host;
  std::vector<CudaDeviceMemory> wave_dev;
  std::vector<CudaEvent> wave_events;

  Status route_on_device(const PeerDenseParams& params, const float* x_host, int64_t tokens,
                         bool with_routing, PeerDeviceRouting* r);
  Status queue_routing_back(const PeerDeviceRouting& r, PeerRouting* routing);
  Status copy_routing_back(const PeerDeviceRouting& r, PeerRouting* routing);

  Status upload_params(const PeerDenseParams& p) {
    if (!params_changed) return Status::ok_status();
    TROVE_RETURN_IF_ERROR(upload(copies, &query_weight, p.query_weight));
    TROVE_RETURN_IF_ERROR(upload(copies, &query_bias, p.query_bias));
    TROVE_RETURN_IF_ERROR(upload(copies, &keys, p.keys));
    TROVE_RETURN_IF_ERROR(upload(copies, &norm_weight, p.norm_weight));
    TROVE_RETURN_IF_ERROR(copies.synchronize());
    params_changed = false;
    return Status::ok_status();
  }

  PeerRouterParams device_params() const {
    PeerRouterParams p;
    p.query_weight = reinterpret_cast<const float*>(query_weight.data());
    p.query_bias = config.query_bias ? reinterpret_cast<const float*>(query_bias.data()) : nullptr;
    p.keys = reinterpret_cast<const float*>(keys.data());
    p.norm_weight = config.input_norm == InputNorm::kRms
                        ? reinterpret_cast<const float*>(norm_weight.data())
                        : nullptr;
    return p;
  }

  int chunks_for(int64_t tokens) const {
    const int64_t c = pipeline_chunks > 0
                          ? pipeline_chunks
                          : std::clamp<int64_t>(tokens / kAutoChunkTokens, 1, kMaxAutoChunks);
    return static_cast<int>(std::min<int64_t>(c, tokens));
  }

  // The method for a batch with misses: the asked one, or under kAuto the next trial, then the
  // fastest. `mapped`: every miss's record is device-readable (else only slab applies).
  H2dMethod pick_method(bool mapped) {
    H2dMethod m = h2d;
    if (m == H2dMethod::kAuto) {
      if (chosen != H2dMethod::kAuto) {
        m = chosen;
      } else {
        static constexpr H2dMethod kTrials[] = {H2dMethod::kGather, H2dMethod::kBatch,
                                                H2dMethod::kSlab};
        m = kTrials[trials % 3];
        ++trials;  // the choice is made in experts() once this batch is measured
      }
    }
    if (m != H2dMethod::kSlab && !mapped) {
      static std::atomic<bool> warned{false};  // once per process, not per layer
      if (h2d != H2dMethod::kAuto && !warned.exchange(true)) {
        TROVE_LOG_WARN(
            "--h2d %s needs the records in pinned host memory (a pinned host tier: --host); "
            "this source's are not, so batches use slab (warned once)",
            std::string(h2d_method_name(h2d)).c_str());
      }
      m = H2dMethod::kSlab;
    }
    return m;
  }

  // The method whose best trial batch moved the most bytes per second. The best batch, not the
  // sum: a method's first batch pays its first launch, and batches differ in their misses.
  H2dMethod fastest() const {
    H2dMethod best = H2dMethod::kSlab;
    double best_rate = -1;
    for (const H2dMethodTotals& t : totals) {
      const double rate = best_batch_rate[method_index(t.method)];
      if (t.batches > 0 && rate > best_rate) {
        best_rate = rate;
        best = t.method;
      }
    }
    return best;
  }

  // T0 changed: the ids it evicted left (always), a committed batch's misses arrived.
  void note_residency(std::span<const int64_t> unique_ids, bool committed) {
    const auto n = static_cast<size_t>(config.num_experts());
    if (resident_host.empty()) resident_host.assign(n, nullptr);
    for (int64_t id : batch.evicted) {
      resident_host[static_cast<size_t>(id)] = nullptr;
      changed.push_back(id);
    }
    if (committed) {
      for (uint32_t u : copy_u) {
        resident_host[static_cast<size_t>(unique_ids[u])] = dest[u];
        changed.push_back(unique_ids[u]);
      }
    }
    // Past a quarter of the table, writing it whole is cheaper than the list.
    if (changed.size() > n / 4) {
      changed.clear();
      resident_stale = true;
    }
  }

  // `resident` made equal to resident_host: the whole table the first time (or when stale),
  // else the changed entries, by a scatter on the context's stream (so before any later
  // lookup there).
  Status sync_resident() {
    const auto n = static_cast<size_t>(config.num_experts());
    if (resident_host.empty()) resident_host.assign(n, nullptr);
    if (resident.bytes() == 0 || resident_stale) {
      // Stale until the whole write has landed: a failed write must not leave a table that
      // later updates patch.
      resident_stale = true;
      TROVE_RETURN_IF_ERROR(reserve(&resident, n * sizeof(void*)));
      TROVE_RETURN_IF_ERROR(
          copies.copy_async(resident.data(), resident_host.data(), n * sizeof(void*)));
      TROVE_RETURN_IF_ERROR(copies.synchronize());
      changed.clear();
      resident_stale = false;
      return Status::ok_status();
    }
    if (changed.empty()) return Status::ok_status();
    // An id may have changed several times since the last write: its current value, once.
    std::sort(changed.begin(), changed.end());
    changed.erase(std::unique(changed.begin(), changed.end()), changed.end());
    const size_t count = changed.size();
    changed_values.resize(count);
    for (size_t i = 0; i < count; ++i) {
      changed_values[i] = resident_host[static_cast<size_t>(changed[i])];
    }
    resident_stale = true;  // until the scatter is queued
    TROVE_RETURN_IF_ERROR(reserve(&updates, count * 16));
    TROVE_RETURN_IF_ERROR(copies.copy_async(updates.data(), changed.data(), count * 8));
    TROVE_RETURN_IF_ERROR(
        copies.copy_async(updates.data() + count * 8, changed_values.data(), count * 8));
    TROVE_RETURN_IF_ERROR(copies.synchronize());
    TROVE_RETURN_IF_ERROR(scatter_resident_async(
        reinterpret_cast<const uint8_t**>(resident.data()), static_cast<int64_t>(n),
        reinterpret_cast<const int64_t*>(updates.data()),
        reinterpret_cast<const uint8_t* const*>(updates.data() + count * 8),
        static_cast<int64_t>(count), ctx.native_stream()));
    resident_stale = false;
    changed.clear();
    return Status::ok_status();
  }

  // What a batch's copies moved, by `method`, in `seconds` of copy-stream time.
  void note_copies(H2dMethod method, uint64_t bytes, double seconds) {
    H2dMethodTotals& t = totals[method_index(method)];
    ++t.batches;
    t.bytes += bytes;
    t.seconds += seconds;
    if (seconds > 0) {
      double& best = best_batch_rate[method_index(method)];
      best = std::max(best, static_cast<double>(bytes) / seconds);
    }
  }

  // The device's rate from an expert kernel of `slots` slots between kernel_start and computed.
  void note_device_rate(int64_t slots) {
    if (slots <= 0) return;
    const Result<double> s = CudaEvent::elapsed_seconds(kernel_start, computed);
    if (s.ok() && *s > 0) rates.device_slots_per_second = static_cast<double>(slots) / *s;
  }

  Status reserve_wave(int k, size_t bytes) {
    const auto n = static_cast<size_t>(k) + 1;
    if (wave_host.size() < n) wave_host.resize(n);
    if (wave_dev.size() < n) wave_dev.resize(n);
    while (wave_events.size() < 2 * n) {
      TROVE_ASSIGN_OR_RETURN(CudaEvent e, CudaEvent::create());
      wave_events.push_back(std::move(e));
    }
    TROVE_RETURN_IF_ERROR(reserve(&wave_host[n - 1], bytes));
    return reserve(&wave_dev[n - 1], bytes);
  }

  Status reserve_zero_record() {
    if (zero_record.bytes() >= layout.stride) return Status::ok_status();
    TROVE_RETURN_IF_ERROR(reserve(&zero_record, layout.stride));
    const std::vector<uint8_t> zeros(layout.stride, 0);
    TROVE_RETURN_IF_ERROR(copies.copy_async(zero_record.data(), zeros.data(), zeros.size()));
    return copies.synchronize();
  }

  // cpu_misses: on_cpu and cpu_count for the misses in host memory (miss_records set) that
  // choose_cpu_misses gives to the CPU, from the rates measured so far.
  void choose_cpu_share(std::span<const int32_t> slot_index) {
    uses_u.assign(on_cpu.size(), 0);
    for (int32_t u : slot_index) ++uses_u[static_cast<size_t>(u)];
    cand_j.clear();
    cand_uses.clear();
    int64_t candidate_slots = 0;
    for (size_t j = 0; j < miss_u.size(); ++j) {
      if (miss_records[j] == nullptr) continue;
      cand_j.push_back(static_cast<uint32_t>(j));
      cand_uses.push_back(uses_u[miss_u[j]]);
      candidate_slots += uses_u[miss_u[j]];
    }
    MissCostRates r = rates;
    for (double b : best_batch_rate) r.h2d_bytes_per_second = std::max(r.h2d_bytes_per_second, b);
    const std::vector<uint32_t> share = choose_cpu_misses(
        cand_uses, layout.stride, static_cast<int64_t>(slot_index.size()) - candidate_slots, r);
    for (uint32_t i : share) on_cpu[miss_u[cand_j[i]]] = 1;
    cpu_count = static_cast<int64_t>(share.size());
  }

  Status reserve_events(int chunks) {
    while (static_cast<int>(chunk_ready.size()) < chunks) {
      TROVE_ASSIGN_OR_RETURN(CudaEvent e, CudaEvent::create());
      chunk_ready.push_back(std::move(e));
    }
    return Status::ok_status();
  }

  // Queues chunk c's records (order[chunk_begin[c] .. chunk_begin[c + 1])) by method `m`.
  // Staging layout: [tables][gather: srcs, dsts][slab: records in chunk order].
  Status queue_chunk(H2dMethod m, int c, size_t gather_at, size_t records_at) {
    const size_t stride = layout.stride;
    const int64_t b = chunk_begin[static_cast<size_t>(c)];
    const int64_t e = chunk_begin[static_cast<size_t>(c) + 1];
    const size_t n = static_cast<size_t>(e - b);
    if (n == 0) return Status::ok_status();
    if (m == H2dMethod::kGather) {
      auto* dev_srcs = reinterpret_cast<const void* const*>(tables.data() + gather_at);
      auto* dev_dsts =
          reinterpret_cast<void* const*>(tables.data() + gather_at + miss_u.size() * sizeof(void*));
      return copies.gather_async(dev_dsts + b, dev_srcs + b, stride, n);
    }
    if (m == H2dMethod::kSlab) {
      uint8_t* packed = staging.data() + records_at;
      for (int64_t j = b; j < e; ++j) {
        std::memcpy(packed + static_cast<size_t>(j) * stride, miss_records[order[j]], stride);
      }
      if (device_tier == nullptr) {  // contiguous in the device slab, in chunk order
        return copies.copy_async(slab.data() + static_cast<size_t>(b) * stride,
                                 packed + static_cast<size_t>(b) * stride, n * stride);
      }
    }
    dsts.clear();
    srcs.clear();
    sizes.assign(n, stride);
    for (int64_t j = b; j < e; ++j) {
      dsts.push_back(dest[miss_u[order[j]]]);
      srcs.push_back(m == H2dMethod::kSlab
                         ? staging.data() + records_at + static_cast<size_t>(j) * stride
                         : miss_records[order[j]]);
    }
    return copies.copy_batch_async(dsts.data(), srcs.data(), sizes.data(), n);
  }
};

CudaExecutor::CudaExecutor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaExecutor::~CudaExecutor() = default;

Status cuda_executor_available() {
  return cuda_device_available();
}

Result<std::unique_ptr<PeerExecutor>> make_cuda_executor(const PeerConfig& config,
                                                         const RecordLayout& layout,
                                                         const CudaExecutorOptions& options) {
  using Impl = CudaExecutor::Impl;
  auto impl = std::make_unique<Impl>();
  impl->config = config;
  TROVE_RETURN_IF_ERROR(impl->config.validate_and_fill());
  impl->layout = layout;
  impl->h2d = options.h2d;
  impl->pipeline_chunks = options.pipeline_chunks;
  impl->cpu_misses = options.cpu_misses;
  impl->cpu_threads = options.cpu_threads;
  for (H2dMethod m : {H2dMethod::kAuto, H2dMethod::kSlab, H2dMethod::kBatch, H2dMethod::kGather}) {
    impl->totals[method_index(m)].method = m;
  }
  TROVE_ASSIGN_OR_RETURN(impl->ctx, CudaPeerContext::create());
  TROVE_ASSIGN_OR_RETURN(impl->copies, CudaCopyStream::create());
  TROVE_ASSIGN_OR_RETURN(impl->copy_start, CudaEvent::create());
  TROVE_ASSIGN_OR_RETURN(impl->copy_end, CudaEvent::create());
  TROVE_ASSIGN_OR_RETURN(impl->computed, CudaEvent::create());
  TROVE_ASSIGN_OR_RETURN(impl->kernel_start, CudaEvent::create());
  TROVE_ASSIGN_OR_RETURN(impl->routed, CudaEvent::create());
  if (options.vram_budget_bytes > 0) {
    ExpertCacheOptions o;
    o.budget_bytes = options.vram_budget_bytes;
    o.slot_bytes = layout.stride;
    o.num_experts = config.num_experts();
    o.policy = options.vram_policy;
    o.tier_name = "device";
    o.budget_flag = "--vram";
    o.memory = std::make_shared<DeviceSlotMemory>();
    TROVE_ASSIGN_OR_RETURN(impl->device_tier, ExpertCache::create(o));
  }
  return std::unique_ptr<PeerExecutor>(new CudaExecutor(std::move(impl)));
}

Status CudaExecutor::check_batch(int64_t max_unique, const std::string& what) const {
  const ExpertCache* t0 = impl_->device_tier.get();
  if (t0 == nullptr) return Status::ok_status();
  const int64_t need = std::min<int64_t>(max_unique, impl_->config.num_experts());
  if (need <= t0->capacity_slots()) return Status::ok_status();
  const uint64_t need_bytes = static_cast<uint64_t>(need) * t0->slot_stride();
  return Status::resource_exhausted(str_printf(
      "the device budget %s holds %lld records of %zu bytes; one batch of %s can need %lld "
      "distinct experts (%s): raise --vram to at least %s or lower --batch",
      format_bytes(t0->options().budget_bytes).c_str(),
      static_cast<long long>(t0->capacity_slots()), t0->slot_stride(), what.c_str(),
      static_cast<long long>(need), format_bytes(need_bytes).c_str(),
      format_bytes(need_bytes).c_str()));
}

void CudaExecutor::params_changed() {
  impl_->params_changed = true;
}

std::vector<H2dMethodTotals> CudaExecutor::h2d_totals() const {
  return {impl_->totals[method_index(H2dMethod::kSlab)],
          impl_->totals[method_index(H2dMethod::kBatch)],
          impl_->totals[method_index(H2dMethod::kGather)]};
}

H2dMethod CudaExecutor::h2d_method() const {
  return impl_->h2d == H2dMethod::kAuto ? impl_->chosen : impl_->h2d;
}

// Norm (and with `routing`, query and route) of x on the device; waits for none of it. *r
// receives the device routing.
Status CudaExecutor::Impl::route_on_device(const PeerDenseParams& params, const float* x_host,
                                           int64_t tokens, bool with_routing,
                                           PeerDeviceRouting* r) {
  const PeerConfig& c = config;
  TROVE_RETURN_IF_ERROR(upload_params(params));
  const size_t n = static_cast<size_t>(tokens * c.dim);
  TROVE_RETURN_IF_ERROR(reserve(&x, n * 4));
  TROVE_RETURN_IF_ERROR(reserve(&xhat, n * 4));
  TROVE_RETURN_IF_ERROR(copies.copy_async(x.data(), x_host, n * 4));
  TROVE_RETURN_IF_ERROR(copies.synchronize());
  const PeerRouterParams p = device_params();
  const float* xd = reinterpret_cast<const float*>(x.data());
  float* xh = reinterpret_cast<float*>(xhat.data());
  TROVE_RETURN_IF_ERROR(ctx.norm_device(c, p.norm_weight, xd, tokens, xh));
  if (!with_routing) return Status::ok_status();
  const auto slots = static_cast<size_t>(tokens * c.heads * c.topk);
  TROVE_RETURN_IF_ERROR(reserve(&q, static_cast<size_t>(tokens * c.query_rows()) * 4));
  TROVE_RETURN_IF_ERROR(reserve(&ids, slots * 8));
  TROVE_RETURN_IF_ERROR(reserve(&scores, slots * 4));
  TROVE_RETURN_IF_ERROR(reserve(&gates, slots * 4));
  float* qd = reinterpret_cast<float*>(q.data());
  TROVE_RETURN_IF_ERROR(ctx.query_device(c, p, xh, tokens, qd));
  r->ids = reinterpret_cast<int64_t*>(ids.data());
  r->scores = reinterpret_cast<float*>(scores.data());
  r->gates = reinterpret_cast<float*>(gates.data());
  return ctx.route_device(c, p, qd, tokens, *r);
}

// The device routing into `routing` (host) on the copy stream, after the context's work so far.
Status CudaExecutor::Impl::queue_routing_back(const PeerDeviceRouting& r, PeerRouting* routing) {
  TROVE_RETURN_IF_ERROR(ctx.record(routed));
  TROVE_RETURN_IF_ERROR(copies.wait(routed));
  return copy_routing_back(r, routing);
}

// The three routing arrays, device -> `routing` (host), queued on the copy stream as it stands.
Status CudaExecutor::Impl::copy_routing_back(const PeerDeviceRouting& r, PeerRouting* routing) {
  const size_t slots = routing->slots();
  TROVE_RETURN_IF_ERROR(copies.copy_async(routing->ids.data(), r.ids, slots * 8));
  TROVE_RETURN_IF_ERROR(copies.copy_async(routing->scores.data(), r.scores, slots * 4));
  return copies.copy_async(routing->gates.data(), r.gates, slots * 4);
}

Status CudaExecutor::route(const PeerDenseParams& params, const float* x, int64_t tokens,
                           PeerRouting* routing) {
  Impl& m = *impl_;
  const PeerConfig& c = m.config;
  if (routing != nullptr) routing->resize(tokens, c.heads, c.topk);
  if (tokens == 0) return Status::ok_status();
  PeerDeviceRouting r;
  Status s = m.route_on_device(params, x, tokens, routing != nullptr, &r);
  if (s.ok() && routing != nullptr) s = m.queue_routing_back(r, routing);
  const Status copied = m.copies.synchronize();
  const Status ran = m.ctx.synchronize();
  TROVE_RETURN_IF_ERROR(s);
  TROVE_RETURN_IF_ERROR(ran);
  return copied;
}

Status CudaExecutor::route_resident(const PeerDenseParams& params, const float* x, int64_t tokens,
                                    PeerRouting* routing, bool* computed) {
  Impl& m = *impl_;
  *computed = false;
  if (m.device_tier == nullptr || !m.try_resident || tokens == 0) {
    return route(params, x, tokens, routing);
  }
  const PeerConfig& c = m.config;
  routing->resize(tokens, c.heads, c.topk);
  const size_t slots = routing->slots();
  Status s = [&]() -> Status {
    PeerDeviceRouting r;
    TROVE_RETURN_IF_ERROR(m.route_on_device(params, x, tokens, true, &r));
    // Look the ids up where they are; one count comes back.
    TROVE_RETURN_IF_ERROR(m.sync_resident());
    TROVE_RETURN_IF_ERROR(reserve(&m.tables, slots * sizeof(void*)));
    TROVE_RETURN_IF_ERROR(reserve(&m.miss_count, sizeof(uint32_t)));
    TROVE_RETURN_IF_ERROR(reserve(&m.miss_count_host, sizeof(uint32_t)));
    auto* pointers = reinterpret_cast<const uint8_t**>(m.tables.data());
    auto* count = reinterpret_cast<uint32_t*>(m.miss_count.data());
    TROVE_RETURN_IF_ERROR(resolve_resident_async(
        reinterpret_cast<const uint8_t* const*>(m.resident.data()), c.num_experts(), r.ids,
        static_cast<int64_t>(slots), pointers, count, m.ctx.native_stream()));
    TROVE_RETURN_IF_ERROR(m.ctx.record(m.routed));
    TROVE_RETURN_IF_ERROR(m.copies.wait(m.routed));
    TROVE_RETURN_IF_ERROR(m.copies.copy_async(m.miss_count_host.data(), count, sizeof(uint32_t)));
    TROVE_RETURN_IF_ERROR(m.copies.synchronize());
    uint32_t misses = 0;
    std::memcpy(&misses, m.miss_count_host.data(), sizeof(misses));
    if (misses == 0) {
      // All hits: the kernel first, then the routing back while it runs; y in finish_resident()
      // (a copy into pageable memory would block the host until the kernel is done).
      const size_t y_bytes = static_cast<size_t>(tokens * c.dim_out) * sizeof(float);
      TROVE_RETURN_IF_ERROR(reserve(&m.y, y_bytes));
      auto* yd = reinterpret_cast<float*>(m.y.data());
      TROVE_RETURN_IF_ERROR(m.ctx.record(m.kernel_start));
      TROVE_RETURN_IF_ERROR(m.ctx.experts_device(c, m.layout,
                                                 reinterpret_cast<const float*>(m.xhat.data()),
                                                 tokens, r.gates, pointers, yd));
      TROVE_RETURN_IF_ERROR(m.ctx.record(m.computed));
      // The copy stream already waits for the lookup (`routed`), not for the kernel.
      TROVE_RETURN_IF_ERROR(m.copy_routing_back(r, routing));
      // Nothing else is queued on the copy stream: waiting for it waits for the routing only.
      TROVE_RETURN_IF_ERROR(m.copies.synchronize());
      *computed = true;
      return Status::ok_status();
    }
    TROVE_RETURN_IF_ERROR(m.queue_routing_back(r, routing));
    TROVE_RETURN_IF_ERROR(m.copies.synchronize());
    return m.ctx.synchronize();
  }();
  if (!s.ok()) {
    *computed = false;
    m.try_resident = false;
    m.resident_stale = true;  // an update may not have landed: write it whole next time
    (void)m.copies.synchronize();
    (void)m.ctx.synchronize();
  }
  return s;
}

Status CudaExecutor::finish_resident(const PeerRouting& routing, float* y,
                                     DeviceTransferStats* stats) {
  Impl& m = *impl_;
  const std::span<const int64_t> unique_ids = batch_.unique_ids;
  ExpertCache& t0 = *m.device_tier;
  *stats = DeviceTransferStats{};
  // The policy sees the hits while the kernel runs. Every id is resident: the table on the
  // device mirrors T0, and nothing else admits to it between the lookup and here.
  t0.report_requested(static_cast<int64_t>(routing.slots()));
  Status s = t0.admit(unique_ids, &m.batch);
  if (s.ok()) {
    TROVE_CHECK_MSG(m.batch.miss_index.empty() && m.batch.evicted.empty(),
                    "the device residency table said all %zu experts were in the device tier, "
                    "which missed %zu of them",
                    unique_ids.size(), m.batch.miss_index.size());
    t0.commit_fills(unique_ids, m.batch);
    t0.release(unique_ids);
  }
  Status copied = s;
  if (copied.ok()) copied = m.copies.wait(m.computed);
  if (copied.ok()) {
    const size_t y_bytes = static_cast<size_t>(routing.tokens * m.config.dim_out) * sizeof(float);
    copied = m.copies.copy_async(y, m.y.data(), y_bytes);
  }
  const Status synced = m.copies.synchronize();
  if (copied.ok()) copied = synced;
  const Status ran = m.ctx.synchronize();
  TROVE_RETURN_IF_ERROR(s);
  TROVE_RETURN_IF_ERROR(ran);
  TROVE_RETURN_IF_ERROR(copied);
  m.note_device_rate(static_cast<int64_t>(routing.slots()));
  stats->hits = static_cast<int64_t>(unique_ids.size());
  stats->chunks = 1;
  stats->pinned = m.staging.pinned() || m.staging.bytes() == 0;
  stats->method = m.h2d == H2dMethod::kAuto ? m.chosen : m.h2d;
  return Status::ok_status();
}

Status CudaExecutor::run_experts(const PeerRouting& routing, ExpertSource& source, float* y,
                                 DeviceTransferStats* stats) {
  Impl& m = *impl_;
  const std::span<const int64_t> unique_ids = batch_.unique_ids;
  const std::span<const int32_t> slot_index = batch_.slot_index;
  const PeerConfig& c = m.config;
  const size_t slots = routing.slots();
  const size_t unique = unique_ids.size();
  TROVE_CHECK(slot_index.size() == slots);
  *stats = DeviceTransferStats{};
  if (routing.tokens == 0) return Status::ok_status();
  const size_t stride = m.layout.stride;
  const int64_t T = routing.tokens;
  const int64_t per_token = c.heads * c.topk;
  const int chunks = m.chunks_for(T);
  const int64_t chunk_tokens = (T + chunks - 1) / chunks;

  // 1. Which unique experts the device lacks (miss_u). T0 admits the batch first, except when
  // the CPU may take some misses (cpu_misses): then T0 is probed, the source answers which
  // misses are in host memory, and T0 admits only what the device will compute (step 3).
  ExpertCache* t0 = m.device_tier.get();
  m.dest.assign(unique, nullptr);
  m.on_cpu.assign(unique, 0);
  m.cpu_count = 0;
  m.copy_u.clear();
  m.miss_u.clear();
  bool admitted = false;
  std::span<const int64_t> t0_ids = unique_ids;  // what T0 admitted
  if (t0 != nullptr) {
    t0->report_requested(static_cast<int64_t>(slots));
    if (!m.cpu_misses) {
      TROVE_RETURN_IF_ERROR(t0->admit(unique_ids, &m.batch));
      admitted = true;
      for (size_t u = 0; u < unique; ++u) m.dest[u] = m.batch.slots[u];
      m.miss_u.assign(m.batch.miss_index.begin(), m.batch.miss_index.end());
    } else {
      for (size_t u = 0; u < unique; ++u) {
        if (!t0->contains(unique_ids[u])) m.miss_u.push_back(static_cast<uint32_t>(u));
      }
    }
  } else {
    m.miss_u.resize(unique);
    for (size_t u = 0; u < unique; ++u) m.miss_u[u] = static_cast<uint32_t>(u);
  }
  size_t misses = m.miss_u.size();
  // The source's lease on the misses: begun (records in host memory readable, the disk's on
  // their way), then finished (every record readable) until released.
  SourceLease lease = SourceLease::kNone;

  Status done = [&]() -> Status {
    // 2. The misses' records, leased from the source until their copies are done: those in host
    // memory now, the disk's as they land (ExpertSource::begin_acquire / finish_acquire).
    m.miss_ids.resize(misses);
    m.miss_records.resize(misses);
    for (size_t j = 0; j < misses; ++j) m.miss_ids[j] = unique_ids[m.miss_u[j]];
    TROVE_RETURN_IF_ERROR(source.begin_acquire(m.miss_ids, m.miss_records));
    lease = SourceLease::kBegun;
    size_t pending = 0;
    for (const uint8_t* r : m.miss_records) pending += r == nullptr ? 1 : 0;

    // 3. cpu_misses: the CPU's share among the misses in host memory, then T0's admission of the
    // rest (its misses are then exactly the probed ones the CPU does not take).
    if (m.cpu_misses) {
      m.choose_cpu_share(slot_index);
      if (t0 != nullptr) {
        m.t0_ids.clear();
        m.t0_u.clear();
        for (size_t u = 0; u < unique; ++u) {
          if (m.on_cpu[u] != 0) continue;
          m.t0_ids.push_back(unique_ids[u]);
          m.t0_u.push_back(static_cast<uint32_t>(u));
        }
        t0_ids = m.t0_ids;
        TROVE_RETURN_IF_ERROR(t0->admit(t0_ids, &m.batch));
        admitted = true;
        for (size_t i = 0; i < t0_ids.size(); ++i) m.dest[m.t0_u[i]] = m.batch.slots[i];
        size_t probed = 0;  // misses not on the CPU, in miss_u order
        for (uint32_t u : m.miss_u) probed += m.on_cpu[u] == 0 ? 1 : 0;
        TROVE_CHECK_MSG(m.batch.miss_index.size() == probed,
                        "the device tier missed %zu experts of a batch, its probe %zu",
                        m.batch.miss_index.size(), probed);
      }
    }
    if (pending > 0 || m.cpu_count > 0) {
      return run_waves(routing, source, y, pending, stats, &lease);
    }
    const Status finished = source.finish_acquire(m.miss_ids, m.miss_records);
    lease = finished.ok() ? SourceLease::kFinished : SourceLease::kNone;
    TROVE_RETURN_IF_ERROR(finished);
    m.copy_u.assign(m.miss_u.begin(), m.miss_u.end());

    // 4. Each miss joins the first chunk whose tokens use it (slots are in token order).
    m.first_chunk.assign(unique, -1);
    for (size_t s = 0; s < slots; ++s) {
      int32_t& f = m.first_chunk[static_cast<size_t>(slot_index[s])];
      if (f < 0) f = static_cast<int32_t>(static_cast<int64_t>(s) / per_token / chunk_tokens);
    }
    m.chunk_begin.assign(static_cast<size_t>(chunks) + 1, 0);
    for (uint32_t u : m.miss_u) ++m.chunk_begin[static_cast<size_t>(m.first_chunk[u]) + 1];
    for (int i = 0; i < chunks; ++i) m.chunk_begin[i + 1] += m.chunk_begin[i];
    m.order.resize(misses);
    {
      std::vector<int64_t> next(m.chunk_begin.begin(), m.chunk_begin.end() - 1);
      for (size_t j = 0; j < misses; ++j) {
        m.order[static_cast<size_t>(next[static_cast<size_t>(m.first_chunk[m.miss_u[j]])]++)] =
            static_cast<uint32_t>(j);
      }
    }
    if (t0 == nullptr) {
      TROVE_RETURN_IF_ERROR(reserve(&m.slab, misses * stride));
      for (size_t j = 0; j < misses; ++j) m.dest[m.miss_u[m.order[j]]] = m.slab.data() + j * stride;
    }
    bool mapped = true;
    for (size_t j = 0; j < misses && mapped; ++j) {
      mapped = source.device_address(m.miss_records[j]) != nullptr;
    }
    const H2dMethod method = misses > 0 ? m.pick_method(mapped) : H2dMethod::kSlab;

    // 5. Tables: [per-slot record addresses][gates] | gather: [sources][destinations] | slab:
    // [records in chunk order]. The first part is one copy; the rest moves per chunk.
    const size_t gates_at = align_up(slots * sizeof(void*), 256);
    const size_t gather_at = align_up(gates_at + slots * sizeof(float), 256);
    const size_t tables_bytes =
        gather_at + (method == H2dMethod::kGather ? 2 * misses * sizeof(void*) : 0);
    const size_t records_at = align_up(tables_bytes, 256);
    const size_t staging_bytes = records_at + (method == H2dMethod::kSlab ? misses * stride : 0);
    TROVE_RETURN_IF_ERROR(reserve(&m.staging, staging_bytes));
    TROVE_RETURN_IF_ERROR(reserve(&m.tables, tables_bytes));
    TROVE_RETURN_IF_ERROR(m.reserve_events(chunks));
    auto* pointers = reinterpret_cast<const uint8_t**>(m.staging.data());
    for (size_t s = 0; s < slots; ++s) pointers[s] = m.dest[static_cast<size_t>(slot_index[s])];
    std::memcpy(m.staging.data() + gates_at, routing.gates.data(), slots * sizeof(float));
    if (method == H2dMethod::kGather) {
      auto* g_srcs = reinterpret_cast<const uint8_t**>(m.staging.data() + gather_at);
      auto* g_dsts = g_srcs + misses;
      for (size_t j = 0; j < misses; ++j) {
        g_srcs[j] = source.device_address(m.miss_records[m.order[j]]);
        g_dsts[j] = m.dest[m.miss_u[m.order[j]]];
      }
    }

    // 6. The pipeline (the header's timeline).
    const size_t y_bytes = static_cast<size_t>(T * c.dim_out) * sizeof(float);
    TROVE_RETURN_IF_ERROR(reserve(&m.y, y_bytes));
    TROVE_RETURN_IF_ERROR(m.copy_start.record(m.copies));
    TROVE_RETURN_IF_ERROR(m.copies.copy_async(m.tables.data(), m.staging.data(), tables_bytes));
    const auto* dev_pointers = reinterpret_cast<const uint8_t* const*>(m.tables.data());
    const auto* dev_gates = reinterpret_cast<const float*>(m.tables.data() + gates_at);
    const auto* xh = reinterpret_cast<const float*>(m.xhat.data());
    auto* yd = reinterpret_cast<float*>(m.y.data());
    int64_t timed_slots = 0;  // the last chunk's: its kernel alone between the events
    for (int ch = 0; ch < chunks; ++ch) {
      TROVE_RETURN_IF_ERROR(m.queue_chunk(method, ch, gather_at, records_at));
      CudaEvent& ready = m.chunk_ready[static_cast<size_t>(ch)];
      TROVE_RETURN_IF_ERROR(ready.record(m.copies));
      const int64_t t_begin = ch * chunk_tokens;
      const int64_t t_count = std::min(chunk_tokens, T - t_begin);
      if (t_count <= 0) continue;
      const size_t first_slot = static_cast<size_t>(t_begin * per_token);
      TROVE_RETURN_IF_ERROR(m.ctx.wait(ready));
      // The last chunk's kernel, after the earlier chunks' on the same stream, is timed alone:
      // the device's rate for cpu_misses' cost model, whatever the chunking.
      if (t_begin + t_count >= T) {
        TROVE_RETURN_IF_ERROR(m.ctx.record(m.kernel_start));
        timed_slots = t_count * per_token;
      }
      TROVE_RETURN_IF_ERROR(m.ctx.experts_device(c, m.layout, xh + t_begin * c.dim, t_count,
                                                 dev_gates + first_slot, dev_pointers + first_slot,
                                                 yd + t_begin * c.dim_out));
    }
    TROVE_RETURN_IF_ERROR(m.copy_end.record(m.copies));
    TROVE_RETURN_IF_ERROR(m.ctx.record(m.computed));
    TROVE_RETURN_IF_ERROR(m.copies.wait(m.computed));
    TROVE_RETURN_IF_ERROR(m.copies.copy_async(y, yd, y_bytes));
    TROVE_RETURN_IF_ERROR(m.copies.synchronize());
    TROVE_RETURN_IF_ERROR(m.ctx.synchronize());
    m.note_device_rate(timed_slots);

    TROVE_ASSIGN_OR_RETURN(stats->copy_seconds,
                           CudaEvent::elapsed_seconds(m.copy_start, m.copy_end));
    const uint64_t record_bytes = static_cast<uint64_t>(misses) * stride;
    stats->bytes_copied = tables_bytes + record_bytes;
    stats->pinned = m.staging.pinned();
    stats->method = method;
    stats->chunks = chunks;
    if (misses > 0) {
      m.note_copies(method, record_bytes, stats->copy_seconds);
      if (m.h2d == H2dMethod::kAuto && m.chosen == H2dMethod::kAuto &&
          m.trials >= 3 * kTrialBatches) {
        m.chosen = m.fastest();
      }
    }
    return Status::ok_status();
  }();

  if (!done.ok()) {
    // Copies or kernels queued before the error may still read the leased records and the
    // staging memory: let them finish before the leases end; reads still in flight land first.
    (void)m.copies.synchronize();
    (void)m.ctx.synchronize();
    if (lease == SourceLease::kBegun) {
      // An error from finish_acquire leaves nothing acquired.
      lease = source.finish_acquire(m.miss_ids, m.miss_records).ok() ? SourceLease::kFinished
                                                                     : SourceLease::kNone;
    }
  }
  if (lease == SourceLease::kFinished) source.release(m.miss_ids);
  if (admitted) {
    m.note_residency(unique_ids, done.ok());
    if (!done.ok()) {
      t0->abort_fills(t0_ids, m.batch);
      return done;
    }
    t0->commit_fills(t0_ids, m.batch);
    t0->release(t0_ids);
    m.try_resident = m.copy_u.empty() && m.cpu_count == 0;
  }
  TROVE_RETURN_IF_ERROR(done);
  misses = m.copy_u.size();
  stats->misses = static_cast<int64_t>(misses);
  stats->hits = static_cast<int64_t>(unique - misses) - m.cpu_count;
  return Status::ok_status();
}

// The flow in waves (the header's third timeline): what is on the device or in host memory now
// is copied and computed at once, the disk's records group by group as they land
// (ExpertSource::wait_landed, then finish_acquire); each token's slots are summed in their
// fixed order across the waves (runtime/layer/expert_waves.h), so y is the all-resident y to
// the bit. The CPU's share (cpu_misses) is computed on the host meanwhile and added to y at the
// end. Records move by the slab method (the host packs each wave's records into pinned
// staging; one copy per wave).
Status CudaExecutor::run_waves(const PeerRouting& routing, ExpertSource& source, float* y,
                               size_t pending, DeviceTransferStats* stats, SourceLease* lease) {
  Impl& m = *impl_;
  const std::span<const int64_t> unique_ids = batch_.unique_ids;
  const std::span<const int32_t> slot_index = batch_.slot_index;
  const PeerConfig& c = m.config;
  const size_t slots = routing.slots();
  const size_t unique = unique_ids.size();
  const size_t stride = m.layout.stride;
  const int64_t T = routing.tokens;
  const int64_t per_token = c.heads * c.topk;
  const size_t misses = m.miss_u.size();
  ExpertCache* t0 = m.device_tier.get();

  // Copies in wave order (`order`: miss indices; the first `first_wave` are in host memory
  // now); the CPU's share is never copied (it is chosen among those in host memory).
  m.order.clear();
  m.copy_u.clear();
  for (size_t j = 0; j < misses; ++j) {
    if (m.miss_records[j] != nullptr && m.on_cpu[m.miss_u[j]] == 0) {
      m.order.push_back(static_cast<uint32_t>(j));
      m.copy_u.push_back(m.miss_u[j]);
    }
  }
  const size_t first_wave = m.order.size();
  const size_t copies = first_wave + pending;
  if (t0 == nullptr) TROVE_RETURN_IF_ERROR(reserve(&m.slab, copies * stride));
  if (m.cpu_count > 0) {
    // The CPU's slots read a zero record with a zero gate on the device: they add nothing there.
    TROVE_RETURN_IF_ERROR(m.reserve_zero_record());
    for (size_t u = 0; u < unique; ++u) {
      if (m.on_cpu[u] != 0) m.dest[u] = m.zero_record.data();
    }
  }
  m.ready_u.assign(unique, 1);
  for (size_t j = 0; j < misses; ++j) {
    if (m.miss_records[j] == nullptr) m.ready_u[m.miss_u[j]] = 0;
  }

  // Staging: [gates][records in wave order], the gates copied once; each wave's [record
  // addresses][ranges] in a buffer of its own (host and device), so no wave's tables are
  // written while an earlier wave's copy or kernel reads them.
  const size_t records_at = align_up(slots * sizeof(float), 256);
  TROVE_RETURN_IF_ERROR(reserve(&m.staging, records_at + copies * stride));
  TROVE_RETURN_IF_ERROR(reserve(&m.tables, slots * sizeof(float)));
  const size_t ranges_at = align_up(slots * sizeof(void*), 256);
  const size_t wave_bytes = ranges_at + static_cast<size_t>(2 * T) * sizeof(int32_t);
  const size_t y_bytes = static_cast<size_t>(T * c.dim_out) * sizeof(float);
  TROVE_RETURN_IF_ERROR(reserve(&m.y, y_bytes));
  uint8_t* packed = m.staging.data() + records_at;
  const auto* xh = reinterpret_cast<const float*>(m.xhat.data());
  auto* yd = reinterpret_cast<float*>(m.y.data());
  const auto* dev_gates = reinterpret_cast<const float*>(m.tables.data());
  auto* gates = reinterpret_cast<float*>(m.staging.data());
  std::memcpy(gates, routing.gates.data(), slots * sizeof(float));
  for (size_t s = 0; s < slots; ++s) {
    if (m.on_cpu[static_cast<size_t>(slot_index[s])] != 0) gates[s] = 0.0f;
  }

  // Wave k: copies order[b, e) (their records packed at positions b..e-1) and the tables, then
  // the kernel over each token's next range. Returns the slots it computed in *computed.
  int waves = 0;
  int64_t last_wave = 0;
  const auto queue_wave = [&](size_t b, size_t e, int64_t* computed) -> Status {
    const int k = waves++;
    TROVE_RETURN_IF_ERROR(m.reserve_wave(k, wave_bytes));
    uint8_t* host = m.wave_host[static_cast<size_t>(k)].data();
    uint8_t* dev = m.wave_dev[static_cast<size_t>(k)].data();
    for (size_t i = b; i < e; ++i) {
      const uint32_t j = m.order[i];
      std::memcpy(packed + i * stride, m.miss_records[j], stride);
      if (t0 == nullptr) m.dest[m.miss_u[j]] = m.slab.data() + i * stride;
      m.ready_u[m.miss_u[j]] = 1;
    }
    auto* pointers = reinterpret_cast<const uint8_t**>(host);
    for (size_t s = 0; s < slots; ++s) {
      const auto u = static_cast<size_t>(slot_index[s]);
      pointers[s] = m.ready_u[u] != 0 ? m.dest[u] : nullptr;
    }
    const std::span<int32_t> ranges(reinterpret_cast<int32_t*>(host + ranges_at),
                                    static_cast<size_t>(2 * T));
    *computed = m.waves.next(slot_index, m.ready_u, ranges);
    CudaEvent& start = m.wave_events[static_cast<size_t>(2 * k)];
    CudaEvent& ready = m.wave_events[static_cast<size_t>(2 * k + 1)];
    TROVE_RETURN_IF_ERROR(start.record(m.copies));
    if (k == 0) {
      TROVE_RETURN_IF_ERROR(m.copies.copy_async(m.tables.data(), gates, slots * sizeof(float)));
    }
    TROVE_RETURN_IF_ERROR(m.copies.copy_async(dev, host, wave_bytes));
    if (e > b) {
      if (t0 == nullptr) {  // contiguous in the device slab, in wave order
        TROVE_RETURN_IF_ERROR(
            m.copies.copy_async(m.slab.data() + b * stride, packed + b * stride, (e - b) * stride));
      } else {
        m.dsts.clear();
        m.srcs.clear();
        m.sizes.assign(e - b, stride);
        for (size_t i = b; i < e; ++i) {
          m.dsts.push_back(m.dest[m.miss_u[m.order[i]]]);
          m.srcs.push_back(packed + i * stride);
        }
        TROVE_RETURN_IF_ERROR(
            m.copies.copy_batch_async(m.dsts.data(), m.srcs.data(), m.sizes.data(), e - b));
      }
    }
    TROVE_RETURN_IF_ERROR(ready.record(m.copies));
    if (*computed == 0) return Status::ok_status();
    last_wave = *computed;
    TROVE_RETURN_IF_ERROR(m.ctx.wait(ready));
    TROVE_RETURN_IF_ERROR(m.ctx.record(m.kernel_start));
    return m.ctx.experts_device_ranged(c, m.layout, xh, T, dev_gates,
                                       reinterpret_cast<const uint8_t* const*>(dev),
                                       reinterpret_cast<const int32_t*>(dev + ranges_at), yd);
  };

  // The CPU's share needs x-hat on the host: back before anything else is queued.
  if (m.cpu_count > 0) {
    m.xhat_host.resize(static_cast<size_t>(T * c.dim));
    TROVE_RETURN_IF_ERROR(
        m.copies.copy_async(m.xhat_host.data(), xh, m.xhat_host.size() * sizeof(float)));
    TROVE_RETURN_IF_ERROR(m.copies.synchronize());
  }

  // Wave 1: the device's hits, the host's misses and the CPU's (a zero record).
  m.waves.reset(T, per_token);
  TROVE_RETURN_IF_ERROR(queue_wave(0, first_wave, &stats->early_slots));

  // The CPU's share while the device computes and the disk reads.
  if (m.cpu_count > 0) {
    m.cpu_records.assign(slots, nullptr);
    m.selected.assign(slots, 0);
    m.j_of_u.assign(unique, -1);
    for (size_t j = 0; j < misses; ++j) m.j_of_u[m.miss_u[j]] = static_cast<int32_t>(j);
    for (size_t s = 0; s < slots; ++s) {
      const auto u = static_cast<size_t>(slot_index[s]);
      if (m.on_cpu[u] == 0) continue;
      m.selected[s] = 1;
      m.cpu_records[s] = m.miss_records[static_cast<size_t>(m.j_of_u[u])];
      ++stats->cpu_slots;
    }
    m.y_cpu.resize(static_cast<size_t>(T * c.dim_out));
    const Stopwatch cpu;
    peer_experts_partial(c, m.layout, m.xhat_host.data(), routing, m.cpu_records.data(),
                         m.selected.data(), m.y_cpu.data(), m.cpu_threads);
    stats->cpu_seconds = cpu.seconds();
    stats->cpu_misses = m.cpu_count;
    if (stats->cpu_seconds > 0) {
      m.rates.cpu_slots_per_second = static_cast<double>(stats->cpu_slots) / stats->cpu_seconds;
    }
  }

  // Then the disk's records, each group as it lands, each token resuming where it stopped.
  int64_t computed = 0;
  for (;;) {
    m.landed.clear();
    const Status landed = source.wait_landed(m.miss_ids, m.miss_records, &m.landed);
    if (!landed.ok()) {
      *lease = SourceLease::kNone;
      return landed;
    }
    if (m.landed.empty()) break;
    const size_t b = m.order.size();
    for (uint32_t j : m.landed) {
      m.order.push_back(j);
      m.copy_u.push_back(m.miss_u[j]);
    }
    TROVE_RETURN_IF_ERROR(queue_wave(b, m.order.size(), &computed));
  }
  const Status finished = source.finish_acquire(m.miss_ids, m.miss_records);
  *lease = finished.ok() ? SourceLease::kFinished : SourceLease::kNone;
  TROVE_RETURN_IF_ERROR(finished);
  if (m.order.size() < copies) {
    const size_t b = m.order.size();
    for (size_t j = 0; j < misses; ++j) {
      if (m.ready_u[m.miss_u[j]] == 0) {
        m.order.push_back(static_cast<uint32_t>(j));
        m.copy_u.push_back(m.miss_u[j]);
      }
    }
    TROVE_RETURN_IF_ERROR(queue_wave(b, m.order.size(), &computed));
  }
  TROVE_CHECK_MSG(m.order.size() == copies && m.waves.done(),
                  "%zu of %zu records copied, %lld tokens not computed", m.order.size(), copies,
                  static_cast<long long>(m.waves.pending_tokens()));
  TROVE_RETURN_IF_ERROR(m.ctx.record(m.computed));
  TROVE_RETURN_IF_ERROR(m.copies.wait(m.computed));
  TROVE_RETURN_IF_ERROR(m.copies.copy_async(y, yd, y_bytes));
  TROVE_RETURN_IF_ERROR(m.copies.synchronize());
  TROVE_RETURN_IF_ERROR(m.ctx.synchronize());
  if (m.cpu_count > 0) {
    const size_t n = m.y_cpu.size();
    for (size_t i = 0; i < n; ++i) y[i] += m.y_cpu[i];
  }

  m.note_device_rate(last_wave);
  for (int k = 0; k < waves; ++k) {
    TROVE_ASSIGN_OR_RETURN(
        const double seconds,
        CudaEvent::elapsed_seconds(m.wave_events[static_cast<size_t>(2 * k)],
                                   m.wave_events[static_cast<size_t>(2 * k + 1)]));
    stats->copy_seconds += seconds;
  }
  const uint64_t record_bytes = static_cast<uint64_t>(copies) * stride;
  if (copies > 0) m.note_copies(H2dMethod::kSlab, record_bytes, stats->copy_seconds);
  stats->bytes_copied =
      slots * sizeof(float) + static_cast<uint64_t>(waves) * wave_bytes + record_bytes;
  stats->pinned = m.staging.pinned();
  stats->method = H2dMethod::kSlab;
  stats->chunks = 1;
  stats->waves = waves;
  return Status::ok_status();
}

Status CudaExecutor::experts(const PeerRouting& routing, ExpertSource& source, float* y,
                             PeerBatchStats* stats) {
  Stopwatch start;
  batch_.dedupe(routing, impl_->config.num_experts());
  DeviceTransferStats device;
  TROVE_RETURN_IF_ERROR(run_experts(routing, source, y, &device));
  count(routing, device, source.last_fetch(), start, stats);
  return Status::ok_status();
}

Status CudaExecutor::forward(const PeerDenseParams& params, const float* x, int64_t tokens,
                             ExpertSource& source, PeerRouting* routing, float* y,
                             PeerBatchStats* stats) {
  Stopwatch start;
  bool computed = false;  // an all-hit batch's expert pass is already queued
  TROVE_RETURN_IF_ERROR(route_resident(params, x, tokens, routing, &computed));
  const double route_seconds = start.seconds();
  if (computed) {
    // Dedupe and T0's bookkeeping while the kernel runs; the source was not asked for anything.
    Stopwatch finish;
    batch_.dedupe(*routing, impl_->config.num_experts());
    DeviceTransferStats device;
    TROVE_RETURN_IF_ERROR(finish_resident(*routing, y, &device));
    count(*routing, device, ExpertFetchStats{}, finish, stats);
  } else {
    TROVE_RETURN_IF_ERROR(experts(*routing, source, y, stats));
  }
  if (stats != nullptr) stats->route_seconds = route_seconds;
  return Status::ok_status();
}

// The routing is the device's (as forward's); the gradients come from the CUDA backward on the
// leased host records (it copies each distinct record to the device once).
Status CudaExecutor::backward(const PeerDenseParams& params, ExpertSource& source, const float* x,
                              int64_t tokens, const float* dy, PeerRouting* routing,
                              PeerGrads* grads) {
  TROVE_RETURN_IF_ERROR(route(params, x, tokens, routing));
  batch_.dedupe(*routing, impl_->config.num_experts());
  ExpertLease lease(source);
  TROVE_RETURN_IF_ERROR(lease.all(batch_));
  return cuda_peer_backward(impl_->config, router_params(params), source.layout(), x, tokens,
                            *routing, batch_.slot_records.data(), dy, grads);
}

std::span<const int64_t> CudaExecutor::last_experts() const {
  return batch_.unique_ids;
}

// expert_seconds covers the transfer and the kernel; stats->device splits out the transfer.
void CudaExecutor::count(const PeerRouting& routing, const DeviceTransferStats& device,
                         const ExpertFetchStats& fetch, const Stopwatch& start,
                         PeerBatchStats* stats) const {
  if (stats == nullptr) return;
  count_batch(routing, batch_, impl_->layout.record_bytes, stats);
  stats->fetch = fetch;
  stats->device = device;
  stats->acquire_seconds = stats->fetch.resolve_seconds + stats->fetch.stall_seconds;
  stats->expert_seconds = std::max(0.0, start.seconds() - stats->acquire_seconds);
}

}  // namespace trove

#else  // !TROVE_HAVE_CUDA

namespace trove {

Status cuda_executor_available() {
  return Status::not_supported(
      "no CUDA device is available (trove was built without CUDA: configure with "
      "-DTROVE_CUDA=ON where nvcc is installed)");
}

Result<std::unique_ptr<PeerExecutor>> make_cuda_executor(const PeerConfig&, const RecordLayout&,
                                                         const CudaExecutorOptions&) {
  return Status::not_supported(
      "the cuda backend: trove was built without CUDA (configure with -DTROVE_CUDA=ON where nvcc "
      "is installed)");
}

std::shared_ptr<SlotMemory> make_pinned_slot_memory() {
  return nullptr;
}

}  // namespace trove

#endif  // TROVE_HAVE_CUDA
