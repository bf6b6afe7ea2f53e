// Stopwatch: wall time since construction or restart(), on the steady clock, for stage
// timings in reports and benchmarks.
#pragma once

#include <chrono>

namespace trove {

class Stopwatch {
 public:
  Stopwatch() : start_(std::chrono::steady_clock::now()) {}
  void restart() { start_ = std::chrono::steady_clock::now(); }
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

}  // namespace trove
