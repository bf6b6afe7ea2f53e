#include "runtime/layer/expert_waves.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include "base/check.h"

namespace trove {

void SlotWaves::reset(int64_t tokens, int64_t slots_per_token) {
  TROVE_CHECK(tokens >= 0 && slots_per_token >= 1 &&
              slots_per_token <= std::numeric_limits<int32_t>::max());
  next_slot_.assign(static_cast<size_t>(tokens), 0);
  slots_per_token_ = static_cast<int32_t>(slots_per_token);
  pending_ = tokens;
}

int64_t SlotWaves::next(std::span<const int32_t> slot_index, std::span<const uint8_t> ready,
                        std::span<int32_t> ranges) {
  const auto T = static_cast<int64_t>(next_slot_.size());
  const int32_t S = slots_per_token_;
  TROVE_CHECK(static_cast<int64_t>(slot_index.size()) == T * S);
  TROVE_CHECK(static_cast<int64_t>(ranges.size()) == 2 * T);
  int64_t computed = 0;
  for (int64_t t = 0; t < T; ++t) {
    int32_t& next = next_slot_[static_cast<size_t>(t)];
    const int32_t begin = next;
    const int32_t* index = slot_index.data() + t * S;
    while (next < S) {
      const auto u = static_cast<size_t>(index[next]);
      TROVE_CHECK(u < ready.size());
      if (ready[u] == 0) break;
      ++next;
    }
    ranges[static_cast<size_t>(2 * t)] = begin;
    ranges[static_cast<size_t>(2 * t + 1)] = next;
    computed += next - begin;
    if (begin < S && next == S) --pending_;
  }
  return computed;
}

std::vector<uint32_t> choose_cpu_misses(std::span<const int32_t> uses, uint64_t record_bytes,
                                        int64_t device_slots, const MissCostRates& rates,
                                        int64_t probe) {
  TROVE_CHECK(rates.h2d_bytes_per_second >= 0 && rates.cpu_slots_per_second >= 0 &&
              rates.device_slots_per_second >= 0 && device_slots >= 0);
  const size_t n = uses.size();
  std::vector<uint32_t> by_uses(n);
  std::iota(by_uses.begin(), by_uses.end(), 0u);
  std::stable_sort(by_uses.begin(), by_uses.end(),
                   [&](uint32_t a, uint32_t b) { return uses[a] < uses[b]; });
  size_t k = 0;
  if (n == 0 || rates.h2d_bytes_per_second <= 0 || rates.device_slots_per_second <= 0) {
    k = 0;
  } else if (rates.cpu_slots_per_second <= 0) {
    k = static_cast<size_t>(std::clamp<int64_t>(probe, 0, static_cast<int64_t>(n)));
  } else {
    int64_t total_uses = 0;
    for (int32_t u : uses) {
      TROVE_CHECK(u >= 1);
      total_uses += u;
    }
    const double copy_one = static_cast<double>(record_bytes) / rates.h2d_bytes_per_second;
    double best = std::numeric_limits<double>::infinity();
    int64_t cpu_uses = 0;  // of the k fewest-used
    for (size_t i = 0; i <= n; ++i) {
      const double cpu = static_cast<double>(cpu_uses) / rates.cpu_slots_per_second;
      const double device =
          static_cast<double>(n - i) * copy_one +
          static_cast<double>(device_slots + total_uses - cpu_uses) / rates.device_slots_per_second;
      const double batch = std::max(cpu, device);
      if (batch < best) {
        best = batch;
        k = i;
      }
      if (i < n) cpu_uses += uses[by_uses[i]];
    }
  }
  std::vector<uint32_t> chosen(by_uses.begin(), by_uses.begin() + static_cast<ptrdiff_t>(k));
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

}  // namespace trove
