// Deterministic pseudo-random values that are the same on every platform and standard library
// (std::normal_distribution is not): synthetic tensors, benchmark and training inputs.
#pragma once

#include <cstdint>
#include <span>

namespace trove {

// splitmix64: one step of the generator / a strong 64-bit mix of x.
constexpr uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Fills `out` with N(0, stddev^2) values: Box-Muller on the splitmix64 stream of `seed`.
void fill_gaussian(std::span<float> out, double stddev, uint64_t seed);

}  // namespace trove
