// Offline replay of expert-id traces through a residency tier, for choosing a policy and a
// budget on the workloads of SPEC §8 before running them: simulate() replays a trace through
// the real ExpertCache (so it measures the code that serves, not a model of it), and
// simulate_belady() gives the best any policy could do on the same trace.
//
// Both are batch-granular like the tier: each batch's ids are deduplicated, the whole batch is
// resident while it computes (its ids cannot be evicted to make room for its other ids), and
// a hit rate is hits / unique ids per batch. A trace of ~10^6 requests takes about a second.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "base/status.h"
#include "runtime/tiers/cache_policy.h"

namespace trove {

struct SimResult {
  int64_t batches = 0;
  int64_t requests = 0;  // unique ids per batch, summed
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t evictions = 0;

  double hit_rate() const { return requests == 0 ? 0.0 : static_cast<double>(hits) / requests; }
};

// Replays `batches` (ids >= 0, any order, duplicates allowed) through an ExpertCache of
// `capacity_slots` slots under `policy`: admit, fill, release, one batch after another.
// Errors: invalid_argument for a negative id or capacity < 1; resource_exhausted (naming the
// batch) when one batch has more unique ids than capacity_slots.
Result<SimResult> simulate(const std::vector<std::vector<int64_t>>& batches, int64_t capacity_slots,
                           EvictionPolicy policy);

// The optimal offline policy (Belady's MIN), batch-granular: on a miss with the tier full,
// evict the resident id, not in the current batch, whose next use is farthest (never used
// again first). Exchange argument as for MIN: with demand fills this minimizes misses, and the
// test checks it against exhaustive search. Same inputs and errors as simulate().
Result<SimResult> simulate_belady(const std::vector<std::vector<int64_t>>& batches,
                                  int64_t capacity_slots);

// Zipf ranks: P(id = r) proportional to 1 / (r + 1)^exponent for r in [0, n), so id 0 is the
// most popular (ids are ranks; permuting them changes no policy's hit rate). Inverse-CDF
// sampling with a guide table (12 bytes per id, O(1) expected per draw); deterministic for a
// seed on every platform.
class ZipfSampler {
 public:
  // REQUIRES: 1 <= n <= UINT32_MAX, exponent >= 0.
  ZipfSampler(int64_t n, double exponent, uint64_t seed);
  int64_t next();

 private:
  std::vector<double> cdf_;
  std::vector<uint32_t> guide_;
  std::mt19937_64 rng_;
};

// `num_batches` batches of `ids_per_batch` zipf draws over `num_experts` ids (duplicates kept,
// as a layer's h * k * T selections would have them). The workload "zipf:1.09" is exponent
// 1.09.
std::vector<std::vector<int64_t>> zipf_trace(int64_t num_experts, double exponent,
                                             int64_t num_batches, int64_t ids_per_batch,
                                             uint64_t seed);

}  // namespace trove
