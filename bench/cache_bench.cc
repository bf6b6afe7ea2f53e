// The per-batch bookkeeping of a residency tier (runtime/tiers/expert_cache.h) for a batch whose
// experts are all resident: admit + commit_fills + release of U distinct ids out of N, with
// each replacement policy. On the cuda backend this runs on the host for every batch while the
// device's expert kernel takes ~0.1 ms at the background config (65,536 slots of 2.3 KB records
// at HBM speed), so it is the part of a device-tier batch that the GPU cannot hide.
//
//   BM_AllHitBatch/<policy>/N:<N>/U:<U>   s_per_id: host time per distinct expert;
//                                         batches/s: the bookkeeping's own ceiling
#include <benchmark/benchmark.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "runtime/tiers/expert_cache.h"

namespace trove {
namespace {

// Stands in for device memory: address space only, the slots are never touched.
class NoMemory final : public SlotMemory {
 public:
  Result<uint8_t*> allocate(size_t bytes) override { return allocate_host_block(bytes); }
  void release(uint8_t* data, size_t bytes) override { free_host_block(data, bytes); }
};

void BM_AllHitBatch(benchmark::State& state) {
  const auto policy = static_cast<EvictionPolicy>(state.range(0));
  const int64_t n = state.range(1);
  const int64_t unique = state.range(2);
  ExpertCacheOptions o;
  o.slot_bytes = 64;  // the bookkeeping does not depend on the record size
  o.num_experts = n;
  o.budget_bytes = static_cast<uint64_t>(n) * 64;
  o.policy = policy;
  o.memory = std::make_shared<NoMemory>();
  auto cache = ExpertCache::create(o);
  if (!cache.ok()) {
    state.SkipWithError(cache.status().to_string().c_str());
    return;
  }
  // Batches of `unique` random distinct ids, all made resident first.
  std::mt19937_64 rng(1);
  std::vector<std::vector<int64_t>> batches(8);
  for (auto& b : batches) {
    std::vector<int64_t> ids(static_cast<size_t>(unique));
    for (auto& id : ids) id = static_cast<int64_t>(rng() % static_cast<uint64_t>(n));
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    b = std::move(ids);
  }
  CacheBatch batch;
  for (const auto& b : batches) {
    if (!(*cache)->admit(b, &batch).ok()) {
      state.SkipWithError("admit failed");
      return;
    }
    (*cache)->commit_fills(b, batch);
    (*cache)->release(b);
  }
  size_t i = 0, ids = 0;
  for (auto _ : state) {
    const auto& b = batches[i++ % batches.size()];
    (*cache)->report_requested(static_cast<int64_t>(b.size()) * 4);
    if (!(*cache)->admit(b, &batch).ok()) state.SkipWithError("admit failed");
    (*cache)->commit_fills(b, batch);
    (*cache)->release(b);
    ids += b.size();
  }
  state.counters["s_per_id"] = benchmark::Counter(
      static_cast<double>(ids), benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.counters["batches/s"] =
      benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.SetLabel(std::string(eviction_policy_name(policy)));
}

void args(benchmark::internal::Benchmark* b) {
  for (EvictionPolicy p :
       {EvictionPolicy::kLru, EvictionPolicy::kClock, EvictionPolicy::kFrequency}) {
    for (int64_t n : {int64_t{1} << 20, int64_t{4} << 20}) {
      for (int64_t u : {int64_t{18000}, int64_t{40000}}) {
        b->Args({static_cast<int64_t>(p), n, u});
      }
    }
  }
  b->ArgNames({"policy", "N", "U"})->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_AllHitBatch)->Apply(args);

}  // namespace
}  // namespace trove

BENCHMARK_MAIN();
