// The cuda executor's plan, without a device (runtime/layer/expert_waves.h): the slots each wave
// of the expert pass computes follow the fixed per-token order whatever arrives when (the same
// rule as the CPU's peer_experts_resume, whose bits the tests below tie it to), and the choice
// of the misses computed on the CPU from the measured rates.
#include "runtime/layer/expert_waves.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include <gtest/gtest.h>

#include "kernels/cpu/peer.h"
#include "tests/peer_test_util.h"

namespace trove {
namespace {

using testing::make_config;
using testing::PeerLayer;
using testing::PeerShape;
using testing::random_layer;
using testing::ref_forward;
using testing::RefForward;

// slot_index of T tokens x S slots over U unique records, random.
std::vector<int32_t> random_slots(int64_t T, int64_t S, int32_t U, std::mt19937* rng) {
  std::uniform_int_distribution<int32_t> u(0, U - 1);
  std::vector<int32_t> idx(static_cast<size_t>(T * S));
  for (int32_t& i : idx) i = u(*rng);
  return idx;
}

TEST(SlotWaves, EachWaveRunsEveryTokenFromWhereItStoppedToItsFirstRecordNotHere) {
  std::mt19937 rng(3);
  for (int64_t T : {1, 7, 64}) {
    for (int64_t S : {1, 5, 12}) {
      const int32_t U = 23;
      const std::vector<int32_t> idx = random_slots(T, S, U, &rng);
      // Each unique record arrives in wave 0, 1, 2 or 3.
      std::uniform_int_distribution<int> when(0, 3);
      std::vector<int> arrives(U);
      for (int& a : arrives) a = when(rng);
      SlotWaves w;
      w.reset(T, S);
      EXPECT_EQ(w.pending_tokens(), T);
      std::vector<int32_t> stopped(static_cast<size_t>(T), 0);
      std::vector<int32_t> ranges(static_cast<size_t>(2 * T));
      int64_t total = 0;
      for (int wave = 0; wave < 4; ++wave) {
        std::vector<uint8_t> ready(U);
        for (int32_t u = 0; u < U; ++u) ready[u] = arrives[u] <= wave ? 1 : 0;
        const int64_t n = w.next(idx, ready, ranges);
        int64_t sum = 0;
        for (int64_t t = 0; t < T; ++t) {
          const int32_t b = ranges[2 * t], e = ranges[2 * t + 1];
          ASSERT_EQ(b, stopped[t]) << "token " << t << " did not resume where it stopped";
          ASSERT_LE(b, e);
          for (int32_t s = b; s < e; ++s) ASSERT_EQ(ready[idx[t * S + s]], 1) << "not here";
          if (e < S) {
            EXPECT_EQ(ready[idx[t * S + e]], 0) << "stopped before a ready slot";
          }
          stopped[t] = e;
          sum += e - b;
        }
        EXPECT_EQ(n, sum);
        total += n;
      }
      EXPECT_EQ(total, T * S);
      EXPECT_TRUE(w.done());
      EXPECT_EQ(w.pending_tokens(), 0);
    }
  }
}

TEST(SlotWaves, EmptyBatchAndAllHereAreOneWave) {
  SlotWaves w;
  w.reset(0, 4);
  std::vector<int32_t> none;
  EXPECT_EQ(w.next({}, std::vector<uint8_t>{}, none), 0);
  EXPECT_TRUE(w.done());
  const std::vector<int32_t> idx = {0, 1, 1, 0, 2, 2};  // 2 tokens x 3 slots
  w.reset(2, 3);
  std::vector<int32_t> ranges(4);
  EXPECT_EQ(w.next(idx, std::vector<uint8_t>{1, 1, 1}, ranges), 6);
  EXPECT_EQ(ranges, (std::vector<int32_t>{0, 3, 0, 3}));
  EXPECT_TRUE(w.done());
  // A later wave of a finished batch computes nothing.
  EXPECT_EQ(w.next(idx, std::vector<uint8_t>{1, 1, 1}, ranges), 0);
  EXPECT_EQ(ranges, (std::vector<int32_t>{3, 3, 3, 3}));
}

// The plan is the CPU's resume rule: after each wave a token's range ends where
// peer_experts_resume stopped it, and the CPU's waves give peer_experts' bits; so a kernel that
// resumes each token's fp32 sum over the plan's ranges computes the all-resident bits.
TEST(SlotWaves, RangesEndWhereTheCpuResumeStopsAndTheResultIsTheAllResidentBits) {
  PeerConfig c = make_config(45, 38, 3, 9, 8, 4, 3);
  c.activation = Activation::kRelu;
  const PeerShape shape{57, c, DType::kI4};
  const PeerLayer l = random_layer(shape, 5);
  const RefForward ref = ref_forward(l);
  const int64_t S = l.config.heads * l.config.topk;
  // Unique experts of the routing and each slot's index among them.
  std::vector<int64_t> ids(ref.routing.ids);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  std::vector<int32_t> idx(ref.routing.ids.size());
  for (size_t s = 0; s < idx.size(); ++s) {
    idx[s] = static_cast<int32_t>(std::lower_bound(ids.begin(), ids.end(), ref.routing.ids[s]) -
                                  ids.begin());
  }
  const std::vector<const uint8_t*> all = l.slot_records(ref.routing);
  std::vector<float> want(static_cast<size_t>(l.tokens * l.config.dim_out));
  peer_experts(l.config, l.layout, ref.xhat.data(), ref.routing, all.data(), want.data(), 2);
  std::mt19937 rng(9);
  for (double late : {0.0, 0.3, 0.8, 1.0}) {
    std::bernoulli_distribution is_late(late);
    std::vector<uint8_t> ready(ids.size());
    for (uint8_t& r : ready) r = is_late(rng) ? 0 : 1;
    SlotWaves w;
    w.reset(l.tokens, S);
    PeerExpertProgress progress;
    progress.reset(l.tokens, S);
    std::vector<float> y(want.size(), std::nanf(""));
    std::vector<int32_t> ranges(static_cast<size_t>(2 * l.tokens));
    for (int wave = 0; wave < 2; ++wave) {
      if (wave == 1) std::fill(ready.begin(), ready.end(), 1);
      std::vector<const uint8_t*> records(all.size());
      for (size_t s = 0; s < all.size(); ++s) records[s] = ready[idx[s]] != 0 ? all[s] : nullptr;
      w.next(idx, ready, ranges);
      peer_experts_resume(l.config, l.layout, ref.xhat.data(), ref.routing, records.data(),
                          y.data(), &progress, 2);
      for (int64_t t = 0; t < l.tokens; ++t) {
        ASSERT_EQ(ranges[2 * t + 1], progress.next_slot[t]) << "late " << late << " token " << t;
      }
      EXPECT_EQ(w.pending_tokens(), progress.pending_tokens);
    }
    EXPECT_TRUE(w.done());
    testing::expect_bits_equal(y, want, "late " + std::to_string(late));
  }
}

// ---- the misses computed on the CPU ------------------------------------------------------------

TEST(ChooseCpuMisses, NothingUntilTheDeviceSideIsMeasuredThenAProbeForTheCpuRate) {
  const std::vector<int32_t> uses = {5, 1, 3, 1, 9};
  EXPECT_TRUE(choose_cpu_misses(uses, 4096, 100, MissCostRates{}).empty());
  MissCostRates r;
  r.h2d_bytes_per_second = 1e9;
  EXPECT_TRUE(choose_cpu_misses(uses, 4096, 100, r).empty()) << "no device rate";
  r.device_slots_per_second = 1e7;
  // The CPU's rate unknown: the `probe` fewest-used, lower index first among equal uses.
  EXPECT_EQ(choose_cpu_misses(uses, 4096, 100, r, 2), (std::vector<uint32_t>{1, 3}));
  EXPECT_EQ(choose_cpu_misses(uses, 4096, 100, r, 3), (std::vector<uint32_t>{1, 2, 3}));
  EXPECT_EQ(choose_cpu_misses(uses, 4096, 100, r, 99).size(), uses.size());
  EXPECT_TRUE(choose_cpu_misses({}, 4096, 100, r).empty());
}

TEST(ChooseCpuMisses, AFastLinkMovesEverythingASlowOneComputesTheRarelyUsedOnTheCpu) {
  const std::vector<int32_t> uses = {1, 1, 1, 1, 40, 40, 40, 40};
  MissCostRates r;
  r.cpu_slots_per_second = 1e5;     // 10 us a contribution
  r.device_slots_per_second = 1e9;  // 1 ns
  // 4 KiB records at 25 GB/s: 0.16 us a copy, far below one CPU contribution.
  r.h2d_bytes_per_second = 25e9;
  EXPECT_TRUE(choose_cpu_misses(uses, 4096, 1000, r).empty());
  // At 41 MB/s a copy takes 100 us: the once-used ones cost 10 us each on the CPU, so they stay
  // there; a 40-use one would cost 400 us there, more than the device's 300 us for the rest.
  r.h2d_bytes_per_second = 4.096e7;
  const std::vector<uint32_t> slow = choose_cpu_misses(uses, 4096, 1000, r);
  EXPECT_EQ(slow, (std::vector<uint32_t>{0, 1, 2, 3}));
  // Slower still (1 ms a copy): the CPU takes all but one (1.24 ms beside the device's one
  // copy, 1.00 ms); all eight would take it 1.64 ms.
  r.h2d_bytes_per_second = 4.096e6;
  EXPECT_EQ(choose_cpu_misses(uses, 4096, 1000, r), (std::vector<uint32_t>{0, 1, 2, 3, 4, 5, 6}));
}

// The chosen split is never worse than moving everything or computing everything on the CPU,
// under the function's own model, at random sizes and rates.
TEST(ChooseCpuMisses, TheChoiceBeatsEveryOtherNumberOfFewestUsedMisses) {
  std::mt19937 rng(21);
  std::uniform_int_distribution<int32_t> use(1, 50);
  std::uniform_real_distribution<double> exp10(4, 10);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int32_t> uses(static_cast<size_t>(1 + trial % 37));
    for (int32_t& u : uses) u = use(rng);
    MissCostRates r;
    r.h2d_bytes_per_second = std::pow(10, exp10(rng));
    r.cpu_slots_per_second = std::pow(10, exp10(rng) - 3);
    r.device_slots_per_second = std::pow(10, exp10(rng));
    const uint64_t bytes = 2368;
    const int64_t device_slots = use(rng) * 10;
    const auto cost = [&](const std::vector<uint32_t>& cpu) {
      int64_t cpu_uses = 0, all_uses = 0;
      for (uint32_t i : cpu) cpu_uses += uses[i];
      for (int32_t u : uses) all_uses += u;
      const double c = cpu_uses / r.cpu_slots_per_second;
      const double d =
          static_cast<double>(uses.size() - cpu.size()) * bytes / r.h2d_bytes_per_second +
          static_cast<double>(device_slots + all_uses - cpu_uses) / r.device_slots_per_second;
      return std::max(c, d);
    };
    const double chosen = cost(choose_cpu_misses(uses, bytes, device_slots, r));
    std::vector<uint32_t> order(uses.size());
    std::iota(order.begin(), order.end(), 0u);
    std::stable_sort(order.begin(), order.end(),
                     [&](uint32_t a, uint32_t b) { return uses[a] < uses[b]; });
    for (size_t k = 0; k <= uses.size(); ++k) {
      const std::vector<uint32_t> other(order.begin(), order.begin() + static_cast<ptrdiff_t>(k));
      EXPECT_LE(chosen, cost(other) * (1 + 1e-12)) << "trial " << trial << ", k " << k;
    }
  }
}

}  // namespace
}  // namespace trove
