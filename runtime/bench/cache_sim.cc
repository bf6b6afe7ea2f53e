#include "runtime/bench/cache_sim.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <queue>
#include <utility>

#include "base/strings.h"
#include "runtime/tiers/expert_cache.h"

namespace trove {

namespace {

// The trace with each batch sorted and deduplicated, flat; and the id space it spans.
struct UniqueTrace {
  std::vector<int64_t> ids;
  std::vector<size_t> begin;  // batch b is ids[begin[b], begin[b + 1])
  int64_t num_experts = 0;    // largest id + 1
};

Result<UniqueTrace> unique_trace(const std::vector<std::vector<int64_t>>& batches,
                                 int64_t capacity_slots) {
  if (capacity_slots < 1) {
    return Status::invalid_argument(str_printf("capacity %lld slots: expected at least 1",
                                               static_cast<long long>(capacity_slots)));
  }
  UniqueTrace t;
  t.begin.push_back(0);
  for (size_t b = 0; b < batches.size(); ++b) {
    const size_t start = t.ids.size();
    t.ids.insert(t.ids.end(), batches[b].begin(), batches[b].end());
    std::sort(t.ids.begin() + static_cast<ptrdiff_t>(start), t.ids.end());
    t.ids.erase(std::unique(t.ids.begin() + static_cast<ptrdiff_t>(start), t.ids.end()),
                t.ids.end());
    if (t.ids.size() > start && t.ids[start] < 0) {
      return Status::invalid_argument(str_printf("batch %zu holds negative expert id %lld", b,
                                                 static_cast<long long>(t.ids[start])));
    }
    if (t.ids.size() > start) t.num_experts = std::max(t.num_experts, t.ids.back() + 1);
    const auto unique = static_cast<int64_t>(t.ids.size() - start);
    if (unique > capacity_slots) {
      return Status::resource_exhausted(
          str_printf("batch %zu needs %lld unique experts; the tier holds %lld", b,
                     static_cast<long long>(unique), static_cast<long long>(capacity_slots)));
    }
    t.begin.push_back(t.ids.size());
  }
  return t;
}

}  // namespace

Result<SimResult> simulate(const std::vector<std::vector<int64_t>>& batches, int64_t capacity_slots,
                           EvictionPolicy policy) {
  TROVE_ASSIGN_OR_RETURN(UniqueTrace trace, unique_trace(batches, capacity_slots));
  SimResult r;
  r.batches = static_cast<int64_t>(batches.size());
  if (trace.ids.empty()) return r;
  // One-byte slots: the records are not the point, the residency decisions are.
  ExpertCacheOptions options;
  options.budget_bytes = static_cast<uint64_t>(capacity_slots);
  options.slot_bytes = 1;
  options.slot_alignment = 1;
  options.num_experts = trace.num_experts;
  options.policy = policy;
  options.tier_name = "simulated";
  options.budget_flag = "the capacity";
  TROVE_ASSIGN_OR_RETURN(std::unique_ptr<ExpertCache> cache, ExpertCache::create(options));
  CacheBatch batch;
  for (size_t b = 0; b + 1 < trace.begin.size(); ++b) {
    const std::span<const int64_t> ids(trace.ids.data() + trace.begin[b],
                                       trace.begin[b + 1] - trace.begin[b]);
    Status s = cache->admit(ids, &batch);
    if (!s.ok()) return s.with_context(str_printf("batch %zu", b));
    cache->commit_fills(ids, batch);
    cache->release(ids);
  }
  const CacheMetrics m = cache->metrics();
  r.requests = m.unique;
  r.hits = m.hits;
  r.misses = m.misses;
  r.evictions = m.evictions;
  return r;
}

Result<SimResult> simulate_belady(const std::vector<std::vector<int64_t>>& batches,
                                  int64_t capacity_slots) {
  TROVE_ASSIGN_OR_RETURN(UniqueTrace trace, unique_trace(batches, capacity_slots));
  constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
  const size_t num_batches = batches.size();

  // next_use[j]: the batch that next asks for trace.ids[j] after the one holding j.
  std::vector<int64_t> next_use(trace.ids.size());
  {
    std::vector<int64_t> seen(static_cast<size_t>(trace.num_experts), kNever);
    for (size_t b = num_batches; b-- > 0;) {
      for (size_t j = trace.begin[b]; j < trace.begin[b + 1]; ++j) {
        next_use[j] = seen[trace.ids[j]];
        seen[trace.ids[j]] = static_cast<int64_t>(b);
      }
    }
  }

  // Resident ids keyed by next use in a max-heap; an entry is current while its id is
  // resident with that key (keys of one id only grow, so stale entries are recognisable).
  std::vector<int64_t> key(static_cast<size_t>(trace.num_experts), -1);  // -1: not resident
  std::priority_queue<std::pair<int64_t, int64_t>> heap;
  int64_t resident = 0;
  SimResult r;
  r.batches = static_cast<int64_t>(num_batches);
  for (size_t b = 0; b < num_batches; ++b) {
    const size_t begin = trace.begin[b];
    const size_t end = trace.begin[b + 1];
    int64_t misses = 0;
    for (size_t j = begin; j < end; ++j) misses += key[trace.ids[j]] < 0;
    // Resident ids of this batch have key b, below every other resident's, so they are never
    // the farthest while others remain; and unique ids <= capacity leaves enough others.
    for (int64_t over = resident + misses - capacity_slots; over > 0; --over) {
      for (;;) {
        const auto [k, id] = heap.top();
        heap.pop();
        if (key[id] != k) continue;
        TROVE_CHECK(k > static_cast<int64_t>(b));
        key[id] = -1;
        --resident;
        ++r.evictions;
        break;
      }
    }
    for (size_t j = begin; j < end; ++j) {
      const int64_t id = trace.ids[j];
      if (key[id] < 0) ++resident;
      key[id] = next_use[j];
      heap.emplace(next_use[j], id);
    }
    r.requests += static_cast<int64_t>(end - begin);
    r.misses += misses;
  }
  r.hits = r.requests - r.misses;
  return r;
}

ZipfSampler::ZipfSampler(int64_t n, double exponent, uint64_t seed)
    : cdf_(static_cast<size_t>(n)), guide_(static_cast<size_t>(n)), rng_(seed) {
  TROVE_CHECK(n >= 1 && n <= UINT32_MAX && exponent >= 0);
  double sum = 0;
  for (int64_t r = 0; r < n; ++r) {
    sum += std::pow(static_cast<double>(r + 1), -exponent);
    cdf_[r] = sum;
  }
  for (double& c : cdf_) c /= sum;
  cdf_.back() = 1.0;
  // guide_[k]: the first rank whose cdf exceeds k / n (cdf_.back() = 1 ends every search).
  uint32_t r = 0;
  for (size_t k = 0; k < guide_.size(); ++k) {
    const double threshold = static_cast<double>(k) / static_cast<double>(guide_.size());
    while (cdf_[r] <= threshold) ++r;
    guide_[k] = r;
  }
}

int64_t ZipfSampler::next() {
  // 53 random bits: uniform in [0, 1) without std::uniform_real_distribution, whose output
  // differs between standard libraries.
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
  // The first rank whose cdf exceeds u (what upper_bound would return), starting from the
  // guide: about two comparisons on average.
  const size_t k =
      std::min(static_cast<size_t>(u * static_cast<double>(guide_.size())), guide_.size() - 1);
  size_t r = guide_[k];
  while (r > 0 && cdf_[r - 1] > u) --r;  // u * n rounded up past k / n
  while (cdf_[r] <= u) ++r;
  return static_cast<int64_t>(r);
}

std::vector<std::vector<int64_t>> zipf_trace(int64_t num_experts, double exponent,
                                             int64_t num_batches, int64_t ids_per_batch,
                                             uint64_t seed) {
  ZipfSampler zipf(num_experts, exponent, seed);
  std::vector<std::vector<int64_t>> trace(static_cast<size_t>(num_batches));
  for (std::vector<int64_t>& batch : trace) {
    batch.resize(static_cast<size_t>(ids_per_batch));
    for (int64_t& id : batch) id = zipf.next();
  }
  return trace;
}

}  // namespace trove
