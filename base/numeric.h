// Integer helpers every room needs: index casts and alignment.
#pragma once

#include <cstddef>
#include <cstdint>

namespace trove {

// A non-negative int64_t count (shapes are int64_t, as in torch) as a size_t index.
constexpr size_t sz(int64_t v) {
  return static_cast<size_t>(v);
}

// x rounded up / down to a multiple of align (align > 0; any value, not only powers of two).
constexpr uint64_t align_up(uint64_t x, uint64_t align) {
  return (x + align - 1) / align * align;
}
constexpr uint64_t align_down(uint64_t x, uint64_t align) {
  return x / align * align;
}

}  // namespace trove
