// The PEER layer on the cuda backend (runtime/layer/cuda_executor.h): forward, forward_routed and
// backward equal the CPU layer's within the tolerances of tests/cuda_peer_test.cc and
// tests/cuda_peer_backward_test.cc, with and without a device tier, over the mapped table and
// over the host tier at several budgets; the device tier's hits need no copy; a device budget
// below one batch is a clear error before any work. Without a device (or without CUDA in the
// build) the backend is a clear kNotSupported error, which the first tests check; the rest
// skip with a message.
#include <cstring>
#include <random>

#include <gtest/gtest.h>

#include "base/strings.h"
#include "runtime/bench/synthetic.h"
#include "runtime/convert/pack.h"
#include "runtime/layer/cuda_executor.h"
#include "runtime/layer/lookahead.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/layer/store_layer.h"
#include "runtime/tiers/tiered_source.h"
#include "storage/store.h"
#include "tests/fault_injection.h"
#include "tests/peer_test_util.h"
#include "tests/runtime_test_util.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using testing::ScratchDir;

// tests/cuda_peer_test.cc's forward tolerances and tests/cuda_peer_backward_test.cc's gradient
// ones (fp32 sums in other orders; see there for the reasoning).
constexpr double kForwardAbs = 1e-5;
constexpr double kForwardRel = 1e-5;
constexpr testing::RoutingTolerance kRoutingTolerance = {/*score_abs=*/1e-5, /*score_rel=*/1e-5,
                                                         /*gate_abs=*/2e-5};
constexpr double kGradAbs = 3e-5;
constexpr double kGradRel = 1e-5;

constexpr int64_t kTokens = 16;  // per batch
constexpr int64_t kBatches = 8;

constexpr int64_t kWorkingSet = kTokens * 3 * 4;  // T * h * k: one batch's most experts

std::string make_store(const ScratchDir& dir, DType dtype) {
  return testing::pack_synthetic_store(dir, testing::small_tier_config(), dtype, 0.5f);
}

// Gaussian batches; every other one repeats an earlier one, so a device tier gets hits.
std::vector<std::vector<float>> batches(uint32_t seed) {
  return testing::repeating_batches(seed, kBatches, kTokens, testing::small_tier_config().dim);
}

struct RunOutput {
  std::vector<std::vector<float>> ys;
  std::vector<PeerRouting> routings;
  std::vector<PeerBatchStats> stats;
};

RunOutput run(PeerLayer& layer, const std::vector<std::vector<float>>& xs) {
  RunOutput r;
  for (const auto& x : xs) {
    std::vector<float> y(static_cast<size_t>(kTokens * layer.config().dim_out));
    PeerRouting routing;
    PeerBatchStats st;
    const Status s = layer.forward(x, kTokens, y, &routing, &st);
    EXPECT_TRUE(s.ok()) << s.to_string();
    r.ys.push_back(std::move(y));
    r.routings.push_back(std::move(routing));
    r.stats.push_back(st);
  }
  return r;
}

PeerLayerOptions cuda_options(uint64_t vram_slots, uint64_t host_slots, size_t stride,
                              std::shared_ptr<FileOps> file_ops = nullptr, int landing_groups = 1) {
  PeerLayerOptions o;
  o.backend = PeerBackend::kCuda;
  o.threads = 2;
  o.cuda.vram_budget_bytes = vram_slots * stride;
  if (host_slots > 0) {
    TieredSourceOptions t;
    t.host_budget_bytes = host_slots * stride;
    t.io.engine = RecordReaderOptions::Engine::kPread;
    t.io.queue_depth = 8;
    t.io.pread_threads = 3;
    t.io.file_ops = std::move(file_ops);
    t.landing_groups = landing_groups;
    o.tiers = t;
  }
  return o;
}

// ---- without a device ----------------------------------------------------------------------

TEST(CudaRuntime, CudaBackendWithoutADeviceIsNotSupportedBeforeAnyWork) {
  if (check_backend_available(PeerBackend::kCuda).ok()) {
    GTEST_SKIP() << "a CUDA device is present; the no-device path is not reachable";
  }
  const Status available = check_backend_available(PeerBackend::kCuda);
  EXPECT_EQ(available.code(), Status::Code::kNotSupported);
  EXPECT_NE(available.message().find("no CUDA device is available ("), std::string::npos)
      << available.to_string();
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI4));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  PeerLayerOptions o;
  o.backend = PeerBackend::kCuda;
  auto layer = PeerLayer::open(*store, "blk.0.peer", o);
  ASSERT_FALSE(layer.ok());
  EXPECT_EQ(layer.status().code(), Status::Code::kNotSupported);
  EXPECT_NE(layer.status().message().find("no CUDA device is available ("), std::string::npos)
      << layer.status().to_string();
}

TEST(CudaRuntime, BackendNamesRoundTripAndAVramBudgetNeedsTheCudaBackend) {
  for (PeerBackend b : {PeerBackend::kCpu, PeerBackend::kRef, PeerBackend::kCuda}) {
    auto parsed = parse_peer_backend(peer_backend_name(b));
    ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
    EXPECT_EQ(*parsed, b);
  }
  EXPECT_TRUE(check_backend_available(PeerBackend::kCpu).ok());
  EXPECT_TRUE(check_backend_available(PeerBackend::kRef).ok());
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI8));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  PeerLayerOptions o;
  o.cuda.vram_budget_bytes = 1 << 20;
  auto layer = PeerLayer::open(*store, "blk.0.peer", o);
  ASSERT_FALSE(layer.ok());
  EXPECT_EQ(layer.status().code(), Status::Code::kInvalidArgument);
  EXPECT_NE(layer.status().message().find("needs the cuda backend, not cpu"), std::string::npos)
      << layer.status().to_string();
}

TEST(CudaRuntime, H2dMethodNamesAndPipelineChunksAreChecked) {
  for (H2dMethod m : {H2dMethod::kAuto, H2dMethod::kSlab, H2dMethod::kBatch, H2dMethod::kGather}) {
    auto parsed = parse_h2d_method(h2d_method_name(m));
    ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
    EXPECT_EQ(*parsed, m);
  }
  auto bad = parse_h2d_method("dma");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'dma' (expected auto, slab, batch or gather)"),
            std::string::npos)
      << bad.status().to_string();
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI4));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  for (int chunks : {-1, 65}) {
    PeerLayerOptions o;
    o.cuda.pipeline_chunks = chunks;
    auto layer = PeerLayer::open(*store, "blk.0.peer", o);
    ASSERT_FALSE(layer.ok());
    EXPECT_NE(layer.status().message().find("pipeline chunks must be 0 (auto) to 64, got " +
                                            std::to_string(chunks)),
              std::string::npos)
        << layer.status().to_string();
  }
}

// The host tier the cuda backend uses: pinned and mapped when a device is present, plain
// pageable memory (with a warning) when not; either way it serves the same records.
TEST(CudaRuntime, PinnedHostTierServesRecordsAndSaysWhetherTheDeviceCanReadThem) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI8));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const StoreLayerInfo* info = store->find_layer("blk.0.peer");
  ASSERT_NE(info, nullptr);
  auto stored = load_stored_layer(*store, "blk.0.peer");
  ASSERT_TRUE(stored.ok()) << stored.status().to_string();
  TieredSourceOptions t;
  t.host_budget_bytes = 64 * info->table.stride;
  t.io.engine = RecordReaderOptions::Engine::kPread;
  t.host_memory = make_pinned_slot_memory();
  auto tiered = TieredExpertSource::open(*store, *info, stored->record, t);
  ASSERT_TRUE(tiered.ok()) << tiered.status().to_string();
  const std::vector<int64_t> ids = {0, 7, 300, 575};
  std::vector<const uint8_t*> records(ids.size());
  ASSERT_TRUE((*tiered)->acquire(ids, records).ok());
  const std::span<const uint8_t> table = store->mapped_records(*info);
  const bool device = check_backend_available(PeerBackend::kCuda).ok();
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_EQ(
        std::memcmp(records[i], table.data() + ids[i] * info->table.stride, info->table.stride), 0)
        << "expert " << ids[i];
    const uint8_t* on_device = (*tiered)->device_address(records[i]);
    if (device) {
      EXPECT_NE(on_device, nullptr) << "the host tier is not pinned and mapped";
    } else {
      EXPECT_EQ(on_device, nullptr) << "no device can read pageable memory";
    }
  }
  (*tiered)->release(ids);
  if (t.host_memory == nullptr) {
    SUCCEED() << "built without CUDA: no pinned slot memory";
  }
}

// ---- on a device ---------------------------------------------------------------------------

class CudaRuntimeDevice : public ::testing::Test {
 protected:
  void SetUp() override {
    const Status available = check_backend_available(PeerBackend::kCuda);
    if (!available.ok()) {
      GTEST_SKIP() << "the cuda backend is compiled but not run: " << available.message();
    }
  }
};

TEST_F(CudaRuntimeDevice, ForwardEqualsTheCpuLayerAtEveryVramAndHostBudget) {
  ScratchDir dir;
  for (DType dtype : {DType::kI4, DType::kI8, DType::kBF16}) {
    auto store = StoreReader::open(make_store(dir, dtype));
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    PeerLayerOptions cpu_options;
    cpu_options.threads = 2;
    auto cpu = PeerLayer::open(*store, "blk.0.peer", cpu_options);
    ASSERT_TRUE(cpu.ok()) << cpu.status().to_string();
    const auto xs = batches(7);
    const RunOutput want = run(*cpu, xs);
    const size_t stride = cpu->record_layout().stride;
    const int64_t n = cpu->config().num_experts();
    for (int64_t host : {int64_t{0}, kWorkingSet, n}) {
      for (int64_t vram : {int64_t{0}, kWorkingSet, kWorkingSet + 7, n / 2, n}) {
        SCOPED_TRACE(std::string(dtype_name(dtype)) + " vram " + std::to_string(vram) +
                     " slots, host " + std::to_string(host) + " slots");
        auto layer = PeerLayer::open(*store, "blk.0.peer", cuda_options(vram, host, stride));
        ASSERT_TRUE(layer.ok()) << layer.status().to_string();
        ASSERT_TRUE(layer->check_batch(kTokens).ok());
        const RunOutput got = run(*layer, xs);
        ASSERT_EQ(got.ys.size(), want.ys.size());
        for (size_t b = 0; b < got.ys.size(); ++b) {
          SCOPED_TRACE("batch " + std::to_string(b));
          testing::expect_routing_close(got.routings[b], want.routings[b], kRoutingTolerance,
                                        "routing");
          testing::expect_close(got.ys[b], want.ys[b], kForwardAbs, kForwardRel, "y");
          const DeviceTransferStats& d = got.stats[b].device;
          EXPECT_EQ(d.hits + d.misses, got.stats[b].unique_experts);
          EXPECT_GT(d.bytes_copied, 0u);
          if (vram == 0) {
            EXPECT_EQ(d.hits, 0);
          }
        }
        if (vram > 0) {
          // Cold first; a repeated batch finds everything when the tier holds both batches.
          EXPECT_EQ(got.stats[0].device.hits, 0);
          if (vram >= n) {
            EXPECT_EQ(got.stats[1].device.misses, 0);
          }
        }
      }
    }
  }
}

// Every way of moving the misses (slab, batch, gather, auto) and of chunking the pipeline gives
// the same bits (the kernel reads each record through its slot's pointer, and the records are
// the same bytes), over the mapped table (not pinned: everything falls back to slab) and over a
// pinned host tier, with and without a device tier.
TEST_F(CudaRuntimeDevice, EveryH2dMethodAndPipelineChunkingGivesTheSameBits) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI4));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  auto cpu = PeerLayer::open(*store, "blk.0.peer");
  ASSERT_TRUE(cpu.ok()) << cpu.status().to_string();
  const auto xs = batches(17);
  const RunOutput want = run(*cpu, xs);
  const size_t stride = cpu->record_layout().stride;
  const int64_t n = cpu->config().num_experts();
  for (int64_t host : {int64_t{0}, 2 * kWorkingSet}) {
    for (int64_t vram : {int64_t{0}, kWorkingSet + 7, n}) {
      std::vector<std::vector<float>> first;  // slab, one chunk
      for (H2dMethod method :
           {H2dMethod::kSlab, H2dMethod::kBatch, H2dMethod::kGather, H2dMethod::kAuto}) {
        for (int chunks : {1, 3, 16}) {
          SCOPED_TRACE(str_printf("host %lld, vram %lld slots, %s, %d chunks", (long long)host,
                                  (long long)vram, std::string(h2d_method_name(method)).c_str(),
                                  chunks));
          PeerLayerOptions o = cuda_options(vram, host, stride);
          o.cuda.h2d = method;
          o.cuda.pipeline_chunks = chunks;
          auto layer = PeerLayer::open(*store, "blk.0.peer", o);
          ASSERT_TRUE(layer.ok()) << layer.status().to_string();
          const RunOutput got = run(*layer, xs);
          for (size_t b = 0; b < got.ys.size(); ++b) {
            testing::expect_close(got.ys[b], want.ys[b], kForwardAbs, kForwardRel, "y");
            const DeviceTransferStats& d = got.stats[b].device;
            EXPECT_EQ(d.chunks, chunks);
            if (d.misses > 0 && method != H2dMethod::kAuto) {
              // The mapped table is not pinned: only slab applies.
              EXPECT_EQ(d.method, host > 0 ? method : H2dMethod::kSlab) << "batch " << b;
            }
          }
          if (first.empty()) {
            first = got.ys;
          } else {
            EXPECT_EQ(got.ys, first) << "not the same bits as slab in one chunk";
          }
          if (method == H2dMethod::kAuto && vram == 0) {
            // Every batch misses: two trials of each method (those that apply), then a choice.
            EXPECT_NE(layer->h2d_method(), H2dMethod::kAuto);
            int64_t tried = 0;
            for (const H2dMethodTotals& t : layer->h2d_totals()) {
              tried += t.batches;
              if (host > 0) {
                EXPECT_GE(t.batches, 2) << h2d_method_name(t.method);
              }
            }
            EXPECT_EQ(tried, kBatches);
          }
        }
      }
    }
  }
}

// An all-hit batch after an all-hit batch takes the device-side lookup: no host -> device copy
// at all (bytes_copied 0), the same y. The lookup table follows T0 through evictions: with a
// tier of little more than one batch, B evicts part of A, and A's later all-hit batches must
// still read A's records.
TEST_F(CudaRuntimeDevice, AllHitBatchesTakeTheDeviceLookupAndItFollowsEvictions) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI8));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  auto cpu = PeerLayer::open(*store, "blk.0.peer");
  ASSERT_TRUE(cpu.ok()) << cpu.status().to_string();
  const auto xs = batches(19);
  const std::vector<float>& a = xs[0];
  const std::vector<float>& b = xs[2];  // (xs[1] repeats xs[0])
  const size_t stride = cpu->record_layout().stride;
  const int64_t n = cpu->config().num_experts();
  // A tier just above the larger batch's distinct experts: B must evict some of A.
  int64_t most_unique = 0;
  for (const auto* x : {&a, &b}) {
    std::vector<float> y(static_cast<size_t>(kTokens * cpu->config().dim_out));
    ASSERT_TRUE(cpu->forward(*x, kTokens, y).ok());
    most_unique = std::max(most_unique, static_cast<int64_t>(cpu->last_experts().size()));
  }
  for (int64_t vram : {n, most_unique + 2}) {
    for (int64_t host : {int64_t{0}, n}) {
      SCOPED_TRACE(str_printf("vram %lld, host %lld slots", (long long)vram, (long long)host));
      auto gpu = PeerLayer::open(*store, "blk.0.peer", cuda_options(vram, host, stride));
      ASSERT_TRUE(gpu.ok()) << gpu.status().to_string();
      const std::vector<const std::vector<float>*> plan = {&a, &a, &a, &b, &a, &a, &a, &a, &b};
      int64_t previous_misses = -1;  // none before the first batch
      int lookups = 0;
      for (size_t i = 0; i < plan.size(); ++i) {
        SCOPED_TRACE("batch " + std::to_string(i));
        const std::vector<float>& x = *plan[i];
        std::vector<float> want(static_cast<size_t>(kTokens * cpu->config().dim_out));
        std::vector<float> got(want.size());
        PeerRouting want_r, got_r;
        PeerBatchStats st;
        ASSERT_TRUE(cpu->forward(x, kTokens, want, &want_r).ok());
        const Status s = gpu->forward(x, kTokens, got, &got_r, &st);
        ASSERT_TRUE(s.ok()) << s.to_string();
        testing::expect_close(got, want, kForwardAbs, kForwardRel, "y");
        testing::expect_routing_close(got_r, want_r, kRoutingTolerance, "routing");
        EXPECT_EQ(st.unique_experts, static_cast<int64_t>(gpu->last_experts().size()));
        // The lookup path copies nothing; it is taken exactly when the batch before had no
        // device misses and this one has none.
        const bool lookup = st.device.bytes_copied == 0;
        EXPECT_EQ(lookup, previous_misses == 0 && st.device.misses == 0);
        if (lookup) {
          ++lookups;
          EXPECT_EQ(st.device.hits, st.unique_experts);
          EXPECT_EQ(st.fetch.misses, 0);
        }
        if (vram < n && i == 4) {
          EXPECT_GT(st.device.misses, 0) << "B evicted none of A";
        }
        previous_misses = st.device.misses;
      }
      EXPECT_GE(lookups, 3);
    }
  }
}

TEST_F(CudaRuntimeDevice, RoutedForwardEmptyBatchAndChangedParamsMatchTheCpuLayer) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI4));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  auto cpu = PeerLayer::open(*store, "blk.0.peer");
  ASSERT_TRUE(cpu.ok()) << cpu.status().to_string();
  const size_t stride = cpu->record_layout().stride;
  auto gpu = PeerLayer::open(*store, "blk.0.peer", cuda_options(kWorkingSet * 2, 0, stride));
  ASSERT_TRUE(gpu.ok()) << gpu.status().to_string();
  const auto xs = batches(11);
  const int64_t d_out = cpu->config().dim_out;

  // Empty batch.
  std::vector<float> none;
  EXPECT_TRUE(gpu->forward(none, 0, none).ok());

  // The CPU's routing replayed on the device.
  std::vector<float> want(static_cast<size_t>(kTokens * d_out)), got(want.size());
  PeerRouting routing;
  ASSERT_TRUE(cpu->forward(xs[0], kTokens, want, &routing).ok());
  ASSERT_TRUE(gpu->forward_routed(xs[0], kTokens, routing, got).ok());
  testing::expect_close(got, want, kForwardAbs, kForwardRel, "routed y");

  // All tokens routed to one expert.
  PeerRouting one = routing;
  for (int64_t& id : one.ids) id = 5;
  ASSERT_TRUE(cpu->forward_routed(xs[0], kTokens, one, want).ok());
  ASSERT_TRUE(gpu->forward_routed(xs[0], kTokens, one, got).ok());
  testing::expect_close(got, want, kForwardAbs, kForwardRel, "one-expert y");

  // Router parameters changed in place (the trainer's step) reach the device.
  for (PeerLayer* l : {&*cpu, &*gpu}) {
    for (float& w : l->mutable_params().query_weight) w *= -0.5f;
  }
  ASSERT_TRUE(cpu->forward(xs[2], kTokens, want).ok());
  ASSERT_TRUE(gpu->forward(xs[2], kTokens, got).ok());
  testing::expect_close(got, want, kForwardAbs, kForwardRel, "y after a parameter change");
}

TEST_F(CudaRuntimeDevice, BackwardMatchesTheCpuLayer) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI8));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  auto cpu = PeerLayer::open(*store, "blk.0.peer");
  ASSERT_TRUE(cpu.ok()) << cpu.status().to_string();
  auto gpu = PeerLayer::open(*store, "blk.0.peer", cuda_options(0, 0, cpu->record_layout().stride));
  ASSERT_TRUE(gpu.ok()) << gpu.status().to_string();
  const auto xs = batches(13);
  std::mt19937 rng(14);
  const std::vector<float> dy =
      testing::normal_values(static_cast<size_t>(kTokens * cpu->config().dim_out), 1.0, &rng);
  PeerGrads want, got;
  ASSERT_TRUE(cpu->backward(xs[0], kTokens, dy, &want).ok());
  const Status s = gpu->backward(xs[0], kTokens, dy, &got);
  ASSERT_TRUE(s.ok()) << s.to_string();
  testing::expect_close(got.dx, want.dx, kGradAbs, kGradRel, "dx");
  testing::expect_close(got.d_query_weight, want.d_query_weight, kGradAbs, kGradRel, "d_query_w");
  testing::expect_close(got.d_keys, want.d_keys, kGradAbs, kGradRel, "d_keys");
  EXPECT_EQ(got.expert_ids, want.expert_ids);
  testing::expect_close(got.d_down, want.d_down, kGradAbs, kGradRel, "d_down");
  testing::expect_close(got.d_up, want.d_up, kGradAbs, kGradRel, "d_up");
}

// A slow disk (every read 2 ms late): batches whose misses are partly on disk run in waves, the
// device computing what is resident while the reads are in flight (the first wave's slots) and
// each landing group as it lands, and give the bits of the all-resident run (the records in
// host memory from the start, no waves) at every device and host budget and landing-group
// count, and the CPU layer's y within the forward tolerance.
TEST_F(CudaRuntimeDevice, SlowDiskRunsInWavesAndGivesTheAllResidentBits) {
  ScratchDir dir;
  for (DType dtype : {DType::kI4, DType::kBF16}) {
    auto store = StoreReader::open(make_store(dir, dtype));
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    PeerLayerOptions cpu_options;
    cpu_options.threads = 2;
    auto cpu = PeerLayer::open(*store, "blk.0.peer", cpu_options);
    ASSERT_TRUE(cpu.ok()) << cpu.status().to_string();
    const auto xs = batches(29);
    const RunOutput want = run(*cpu, xs);
    const size_t stride = cpu->record_layout().stride;
    const int64_t n = cpu->config().num_experts();
    auto resident = PeerLayer::open(*store, "blk.0.peer", cuda_options(0, 0, stride));
    ASSERT_TRUE(resident.ok()) << resident.status().to_string();
    const RunOutput all_resident = run(*resident, xs);
    for (int groups : {1, 3}) {
      for (const auto& [host, vram] :
           {std::pair{2 * kWorkingSet, int64_t{0}}, std::pair{2 * kWorkingSet, kWorkingSet + 7},
            std::pair{n, n}}) {
        SCOPED_TRACE(str_printf("%s, host %lld, vram %lld slots, %d landing groups",
                                std::string(dtype_name(dtype)).c_str(), (long long)host,
                                (long long)vram, groups));
        auto slow = std::make_shared<FaultyFileOps>();
        slow->delay_each_read(std::chrono::microseconds(2000));
        auto layer =
            PeerLayer::open(*store, "blk.0.peer", cuda_options(vram, host, stride, slow, groups));
        ASSERT_TRUE(layer.ok()) << layer.status().to_string();
        const RunOutput got = run(*layer, xs);
        int64_t waved = 0, early = 0, most_waves = 0;
        for (size_t b = 0; b < got.ys.size(); ++b) {
          SCOPED_TRACE("batch " + std::to_string(b));
          testing::expect_bits_equal(got.ys[b], all_resident.ys[b], "y vs all-resident");
          testing::expect_close(got.ys[b], want.ys[b], kForwardAbs, kForwardRel, "y vs cpu");
          const DeviceTransferStats& d = got.stats[b].device;
          if (got.stats[b].fetch.misses > 0) {
            EXPECT_GE(d.waves, 2) << "records on disk, yet no waves";
            EXPECT_LE(d.waves, 1 + groups);
          }
          waved += d.waves >= 2 ? 1 : 0;
          most_waves = std::max<int64_t>(most_waves, d.waves);
          early += d.early_slots;
          EXPECT_LE(d.early_slots, got.stats[b].slots);
          EXPECT_EQ(d.hits + d.misses, got.stats[b].unique_experts);
        }
        EXPECT_GT(slow->reads_seen(), 0u);
        EXPECT_GT(waved, 0);
        if (groups > 1) {
          EXPECT_GT(most_waves, 2) << "no batch computed a landing group before the last";
        }
        // A batch with both host hits and disk misses computes some slots before its reads land.
        EXPECT_GT(early, 0);
      }
    }
  }
}

// Misses computed where they are: with cpu_misses, the misses in host memory the cost model
// gives to the CPU are summed there (after a first measured batch the CPU's rate is probed), and
// y stays within the forward tolerance of the CPU layer's (it is not the all-resident bits: two
// fp32 partial sums added).
TEST_F(CudaRuntimeDevice, MissesComputedOnTheCpuStayWithinTheForwardTolerance) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI4));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  auto cpu = PeerLayer::open(*store, "blk.0.peer");
  ASSERT_TRUE(cpu.ok()) << cpu.status().to_string();
  const auto xs = batches(31);
  const RunOutput want = run(*cpu, xs);
  const size_t stride = cpu->record_layout().stride;
  const int64_t n = cpu->config().num_experts();
  for (int64_t vram : {int64_t{0}, kWorkingSet + 7}) {
    SCOPED_TRACE("vram " + std::to_string(vram) + " slots");
    auto slow = std::make_shared<FaultyFileOps>();
    slow->delay_each_read(std::chrono::microseconds(500));
    PeerLayerOptions o = cuda_options(vram, n, stride, slow);
    o.cuda.cpu_misses = true;
    o.cuda.cpu_threads = 2;
    auto layer = PeerLayer::open(*store, "blk.0.peer", o);
    ASSERT_TRUE(layer.ok()) << layer.status().to_string();
    const RunOutput got = run(*layer, xs);
    int64_t on_cpu = 0;
    for (size_t b = 0; b < got.ys.size(); ++b) {
      SCOPED_TRACE("batch " + std::to_string(b));
      testing::expect_close(got.ys[b], want.ys[b], kForwardAbs, kForwardRel, "y vs cpu");
      const DeviceTransferStats& d = got.stats[b].device;
      EXPECT_EQ(d.hits + d.misses + d.cpu_misses, got.stats[b].unique_experts);
      EXPECT_LE(d.cpu_slots, got.stats[b].slots);
      on_cpu += d.cpu_misses;
    }
    EXPECT_GT(on_cpu, 0) << "the CPU's rate was never probed";
  }
}

// Look-ahead on the cuda backend: every batch, even one whose experts are all in the device
// tier, consumes its own prefetch (run_experts always begins a lease on the source, empty when
// nothing is missing), so no prefetch is left pending or taken by a later batch, and y is the
// bits of the run without look-ahead.
TEST_F(CudaRuntimeDevice, LookaheadConsumesOnePrefetchPerBatchEvenWhenAllIsOnTheDevice) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI4));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const size_t stride = store->find_layer("blk.0.peer")->table.stride;
  const auto xs = batches(37);
  auto plain = PeerLayer::open(*store, "blk.0.peer", cuda_options(0, 0, stride));
  ASSERT_TRUE(plain.ok()) << plain.status().to_string();
  const RunOutput want = run(*plain, xs);
  const int64_t n = plain->config().num_experts();
  for (int depth : {1, 3}) {
    SCOPED_TRACE("depth " + std::to_string(depth));
    auto layer = PeerLayer::open(*store, "blk.0.peer", cuda_options(n, n, stride));
    ASSERT_TRUE(layer.ok()) << layer.status().to_string();
    std::vector<std::vector<float>> ys(xs.size());
    int64_t all_on_device = 0;
    const Status s = forward_with_lookahead(
        *layer, kBatches, depth,
        [&](int64_t b, std::vector<float>* x, int64_t* tokens) {
          *x = xs[static_cast<size_t>(b)];
          *tokens = kTokens;
          return Status::ok_status();
        },
        [&](int64_t b, std::span<const float> y, const PeerRouting&, const PeerBatchStats& st) {
          ys[static_cast<size_t>(b)].assign(y.begin(), y.end());
          all_on_device += st.device.misses == 0 ? 1 : 0;
          return Status::ok_status();
        });
    ASSERT_TRUE(s.ok()) << s.to_string();
    for (size_t b = 0; b < ys.size(); ++b) {
      testing::expect_bits_equal(ys[b], want.ys[b], "batch " + std::to_string(b));
    }
    auto* source = dynamic_cast<TieredExpertSource*>(&layer->experts());
    ASSERT_NE(source, nullptr);
    const PrefetchStats p = source->prefetch_stats();
    EXPECT_EQ(p.prefetches, kBatches);
    EXPECT_EQ(p.dropped, 0);
    EXPECT_EQ(source->pending_prefetches(), 0) << "a batch did not consume its prefetch";
    EXPECT_GT(all_on_device, 0) << "no batch found all its experts in the device tier";
    EXPECT_EQ(source->host().metrics().leased_slots, 0);
  }
}

TEST_F(CudaRuntimeDevice, VramBudgetBelowOneBatchIsAClearErrorBeforeAnyWork) {
  ScratchDir dir;
  auto store = StoreReader::open(make_store(dir, DType::kI4));
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const size_t stride = (*store).find_layer("blk.0.peer")->table.stride;
  auto layer = PeerLayer::open(*store, "blk.0.peer", cuda_options(kWorkingSet - 1, 0, stride));
  ASSERT_TRUE(layer.ok()) << layer.status().to_string();
  const Status s = layer->check_batch(kTokens);
  EXPECT_EQ(s.code(), Status::Code::kResourceExhausted);
  EXPECT_NE(s.message().find("device budget"), std::string::npos) << s.to_string();
  EXPECT_NE(s.message().find("raise --vram to at least"), std::string::npos) << s.to_string();
  // Below one record: refused at open, naming --vram.
  auto tiny = PeerLayer::open(*store, "blk.0.peer", cuda_options(0, 0, stride));
  ASSERT_TRUE(tiny.ok());
  PeerLayerOptions o = cuda_options(0, 0, stride);
  o.cuda.vram_budget_bytes = stride - 1;
  auto refused = PeerLayer::open(*store, "blk.0.peer", o);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("--vram"), std::string::npos)
      << refused.status().to_string();
}

}  // namespace
}  // namespace trove
