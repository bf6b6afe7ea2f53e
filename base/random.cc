#include "base/random.h"

#include <cmath>
#include <numbers>

namespace trove {

void fill_gaussian(std::span<float> out, double stddev, uint64_t seed) {
  uint64_t state = seed;
  auto uniform = [&state] {  // in (0, 1): never 0, so the log is finite
    const uint64_t z = splitmix64(state);
    state += 0x9e3779b97f4a7c15ull;
    return static_cast<double>(z >> 11) * 0x1.0p-53 + 0x1.0p-54;
  };
  for (size_t i = 0; i < out.size(); i += 2) {
    const double r = stddev * std::sqrt(-2 * std::log(uniform()));
    const double a = 2 * std::numbers::pi * uniform();
    out[i] = static_cast<float>(r * std::cos(a));
    if (i + 1 < out.size()) out[i + 1] = static_cast<float>(r * std::sin(a));
  }
}

}  // namespace trove
