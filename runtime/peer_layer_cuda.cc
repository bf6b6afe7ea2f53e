#include "runtime/peer_layer_cuda.h"

#if TROVE_HAVE_CUDA

#include <algorithm>
#include <cstring>
#include <vector>

#include "base/bytes.h"
#include "base/check.h"
#include "base/strings.h"
#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/peer_cuda.h"
#include "runtime/expert_cache.h"

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

size_t align_up(size_t v, size_t a) {
  return (v + a - 1) / a * a;
}

}  // namespace

struct CudaPeerRunner::Impl {
  PeerConfig config;
  RecordLayout layout;
  CudaPeerContext ctx;
  CudaCopyStream copies;
  CudaEvent copy_start, copy_end;
  std::unique_ptr<ExpertCache> device_tier;  // null without --vram

  bool params_changed = true;
  CudaDeviceMemory query_weight, query_bias, keys, norm_weight;
  // Per batch, grown to the largest.
  CudaDeviceMemory x, xhat, q, ids, scores, gates, slab, y;
  PinnedHostBuffer staging;
  // Scratch.
  std::vector<int64_t> miss_ids;
  std::vector<const uint8_t*> miss_records;
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  CacheBatch batch;

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

  // The one host -> device transfer of a batch, timed between events on the copy stream;
  // waits for it. `batched`: dsts/srcs/sizes as one cudaMemcpyBatchAsync, else one copy of
  // `bytes` from the staging slab to the device slab.
  Status transfer(bool batched, size_t bytes, DeviceTransferStats* stats) {
    TROVE_RETURN_IF_ERROR(copy_start.record(copies));
    if (batched) {
      TROVE_RETURN_IF_ERROR(
          copies.copy_batch_async(dsts.data(), srcs.data(), sizes.data(), dsts.size()));
    } else {
      TROVE_RETURN_IF_ERROR(copies.copy_async(slab.data(), staging.data(), bytes));
    }
    TROVE_RETURN_IF_ERROR(copy_end.record(copies));
    TROVE_RETURN_IF_ERROR(copies.synchronize());
    TROVE_ASSIGN_OR_RETURN(stats->copy_seconds, CudaEvent::elapsed_seconds(copy_start, copy_end));
    stats->bytes_copied = bytes;
    stats->pinned = staging.pinned();
    return Status::ok_status();
  }

  Status compute(int64_t tokens, const uint8_t* table, const int64_t* index,
                 const uint8_t* const* pointers, const float* gate_table, float* y_host) {
    const size_t y_bytes = static_cast<size_t>(tokens * config.dim_out) * sizeof(float);
    TROVE_RETURN_IF_ERROR(reserve(&y, y_bytes));
    const float* xh = reinterpret_cast<const float*>(xhat.data());
    float* yd = reinterpret_cast<float*>(y.data());
    if (pointers != nullptr) {
      TROVE_RETURN_IF_ERROR(
          ctx.experts_device(config, layout, xh, tokens, gate_table, pointers, yd));
    } else {
      TROVE_RETURN_IF_ERROR(
          ctx.experts_device_indexed(config, layout, xh, tokens, gate_table, table, index, yd));
    }
    TROVE_RETURN_IF_ERROR(ctx.synchronize());
    TROVE_RETURN_IF_ERROR(copies.copy_async(y_host, yd, y_bytes));
    return copies.synchronize();
  }
};

CudaPeerRunner::CudaPeerRunner(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaPeerRunner::~CudaPeerRunner() = default;

Result<std::unique_ptr<CudaPeerRunner>> CudaPeerRunner::create(const PeerConfig& config,
                                                               const RecordLayout& layout,
                                                               const PeerLayerOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->config = config;
  TROVE_RETURN_IF_ERROR(impl->config.validate_and_fill());
  impl->layout = layout;
  TROVE_ASSIGN_OR_RETURN(impl->ctx, CudaPeerContext::create());
  TROVE_ASSIGN_OR_RETURN(impl->copies, CudaCopyStream::create());
  TROVE_ASSIGN_OR_RETURN(impl->copy_start, CudaEvent::create());
  TROVE_ASSIGN_OR_RETURN(impl->copy_end, CudaEvent::create());
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
  return std::unique_ptr<CudaPeerRunner>(new CudaPeerRunner(std::move(impl)));
}

Status CudaPeerRunner::check_batch(int64_t max_unique, const std::string& what) const {
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

void CudaPeerRunner::mark_params_changed() {
  impl_->params_changed = true;
}

Status CudaPeerRunner::route(const PeerDenseParams& params, const float* x, int64_t tokens,
                             PeerRouting* routing) {
  Impl& m = *impl_;
  const PeerConfig& c = m.config;
  if (routing != nullptr) routing->resize(tokens, c.heads, c.topk);
  if (tokens == 0) return Status::ok_status();
  TROVE_RETURN_IF_ERROR(m.upload_params(params));
  const size_t n = static_cast<size_t>(tokens * c.dim);
  TROVE_RETURN_IF_ERROR(reserve(&m.x, n * 4));
  TROVE_RETURN_IF_ERROR(reserve(&m.xhat, n * 4));
  TROVE_RETURN_IF_ERROR(m.copies.copy_async(m.x.data(), x, n * 4));
  TROVE_RETURN_IF_ERROR(m.copies.synchronize());
  const PeerRouterParams p = m.device_params();
  const float* xd = reinterpret_cast<const float*>(m.x.data());
  float* xh = reinterpret_cast<float*>(m.xhat.data());
  TROVE_RETURN_IF_ERROR(m.ctx.norm_device(c, p.norm_weight, xd, tokens, xh));
  if (routing == nullptr) return m.ctx.synchronize();
  const size_t slots = routing->slots();
  TROVE_RETURN_IF_ERROR(reserve(&m.q, static_cast<size_t>(tokens * c.query_rows()) * 4));
  TROVE_RETURN_IF_ERROR(reserve(&m.ids, slots * 8));
  TROVE_RETURN_IF_ERROR(reserve(&m.scores, slots * 4));
  TROVE_RETURN_IF_ERROR(reserve(&m.gates, slots * 4));
  float* qd = reinterpret_cast<float*>(m.q.data());
  TROVE_RETURN_IF_ERROR(m.ctx.query_device(c, p, xh, tokens, qd));
  PeerDeviceRouting r;
  r.ids = reinterpret_cast<int64_t*>(m.ids.data());
  r.scores = reinterpret_cast<float*>(m.scores.data());
  r.gates = reinterpret_cast<float*>(m.gates.data());
  TROVE_RETURN_IF_ERROR(m.ctx.route_device(c, p, qd, tokens, r));
  TROVE_RETURN_IF_ERROR(m.ctx.synchronize());
  TROVE_RETURN_IF_ERROR(m.copies.copy_async(routing->ids.data(), r.ids, slots * 8));
  TROVE_RETURN_IF_ERROR(m.copies.copy_async(routing->scores.data(), r.scores, slots * 4));
  TROVE_RETURN_IF_ERROR(m.copies.copy_async(routing->gates.data(), r.gates, slots * 4));
  return m.copies.synchronize();
}

Status CudaPeerRunner::experts(const PeerRouting& routing, std::span<const int64_t> unique_ids,
                               std::span<const int32_t> slot_index, ExpertSource& source, float* y,
                               DeviceTransferStats* stats) {
  Impl& m = *impl_;
  const size_t slots = routing.slots();
  const size_t unique = unique_ids.size();
  TROVE_CHECK(slot_index.size() == slots);
  *stats = DeviceTransferStats{};
  if (routing.tokens == 0) return Status::ok_status();
  const size_t stride = m.layout.stride;
  const size_t gate_bytes = slots * sizeof(float);

  if (m.device_tier == nullptr) {
    // [unique records][slot -> record index][gates]: one copy.
    const size_t index_at = unique * stride;
    const size_t gates_at = align_up(index_at + slots * sizeof(int64_t), 256);
    const size_t bytes = gates_at + gate_bytes;
    TROVE_RETURN_IF_ERROR(reserve(&m.staging, bytes));
    TROVE_RETURN_IF_ERROR(reserve(&m.slab, bytes));
    m.miss_records.resize(unique);
    TROVE_RETURN_IF_ERROR(source.acquire(unique_ids, m.miss_records));
    for (size_t u = 0; u < unique; ++u) {
      std::memcpy(m.staging.data() + u * stride, m.miss_records[u], stride);
    }
    source.release(unique_ids);
    auto* index = reinterpret_cast<int64_t*>(m.staging.data() + index_at);
    for (size_t s = 0; s < slots; ++s) index[s] = slot_index[s];
    std::memcpy(m.staging.data() + gates_at, routing.gates.data(), gate_bytes);
    stats->misses = static_cast<int64_t>(unique);
    TROVE_RETURN_IF_ERROR(m.transfer(false, bytes, stats));
    return m.compute(routing.tokens, m.slab.data(),
                     reinterpret_cast<const int64_t*>(m.slab.data() + index_at), nullptr,
                     reinterpret_cast<const float*>(m.slab.data() + gates_at), y);
  }

  // Device tier: lease every unique expert there; copy only the misses.
  ExpertCache& t0 = *m.device_tier;
  t0.report_requested(static_cast<int64_t>(slots));
  TROVE_RETURN_IF_ERROR(t0.admit(unique_ids, &m.batch));
  const std::vector<uint32_t>& miss = m.batch.miss_index;
  const size_t misses = miss.size();
  // [missed records][slot -> device record pointer][gates]; the tables land in `slab`.
  const size_t pointers_at = misses * stride;
  const size_t gates_at = align_up(pointers_at + slots * sizeof(void*), 256);
  const size_t bytes = gates_at + gate_bytes;
  const size_t tables_bytes = bytes - pointers_at;
  Status filled = [&]() -> Status {
    TROVE_RETURN_IF_ERROR(reserve(&m.staging, bytes));
    TROVE_RETURN_IF_ERROR(reserve(&m.slab, tables_bytes));
    m.miss_ids.resize(misses);
    m.miss_records.resize(misses);
    for (size_t j = 0; j < misses; ++j) m.miss_ids[j] = unique_ids[miss[j]];
    TROVE_RETURN_IF_ERROR(source.acquire(m.miss_ids, m.miss_records));
    for (size_t j = 0; j < misses; ++j) {
      std::memcpy(m.staging.data() + j * stride, m.miss_records[j], stride);
    }
    source.release(m.miss_ids);
    auto* pointers = reinterpret_cast<const uint8_t**>(m.staging.data() + pointers_at);
    for (size_t s = 0; s < slots; ++s) {
      pointers[s] = m.batch.slots[static_cast<size_t>(slot_index[s])];
    }
    std::memcpy(m.staging.data() + gates_at, routing.gates.data(), gate_bytes);
    m.dsts.clear();
    m.srcs.clear();
    m.sizes.clear();
    for (size_t j = 0; j < misses; ++j) {
      m.dsts.push_back(m.batch.slots[miss[j]]);
      m.srcs.push_back(m.staging.data() + j * stride);
      m.sizes.push_back(stride);
    }
    m.dsts.push_back(m.slab.data());
    m.srcs.push_back(m.staging.data() + pointers_at);
    m.sizes.push_back(tables_bytes);
    return m.transfer(true, bytes, stats);
  }();
  if (!filled.ok()) {
    t0.abort_fills(unique_ids, m.batch);
    return filled;
  }
  t0.commit_fills(unique_ids, m.batch);
  stats->misses = static_cast<int64_t>(misses);
  stats->hits = static_cast<int64_t>(unique - misses);
  const Status computed = m.compute(
      routing.tokens, nullptr, nullptr, reinterpret_cast<const uint8_t* const*>(m.slab.data()),
      reinterpret_cast<const float*>(m.slab.data() + (gates_at - pointers_at)), y);
  t0.release(unique_ids);
  return computed;
}

}  // namespace trove

#else  // !TROVE_HAVE_CUDA

namespace trove {

struct CudaPeerRunner::Impl {};

CudaPeerRunner::CudaPeerRunner(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaPeerRunner::~CudaPeerRunner() = default;

Result<std::unique_ptr<CudaPeerRunner>> CudaPeerRunner::create(const PeerConfig&,
                                                               const RecordLayout&,
                                                               const PeerLayerOptions&) {
  return Status::not_supported(
      "the cuda backend: trove was built without CUDA (configure with -DTROVE_CUDA=ON where nvcc "
      "is installed)");
}

Status CudaPeerRunner::check_batch(int64_t, const std::string&) const {
  return Status::ok_status();
}
void CudaPeerRunner::mark_params_changed() {}
Status CudaPeerRunner::route(const PeerDenseParams&, const float*, int64_t, PeerRouting*) {
  return Status::not_supported("trove was built without CUDA");
}
Status CudaPeerRunner::experts(const PeerRouting&, std::span<const int64_t>,
                               std::span<const int32_t>, ExpertSource&, float*,
                               DeviceTransferStats*) {
  return Status::not_supported("trove was built without CUDA");
}

}  // namespace trove

#endif  // TROVE_HAVE_CUDA
