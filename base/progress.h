// A progress bar for long work (pack, bench, train), drawn on stderr:
//   packing  [#############.........]  61%  1.20 GiB/1.97 GiB  310 MB/s  ETA 3s
// Drawn only when stderr is a terminal (or when forced), at most ~10 times a second, so it is
// cheap to call update() from a hot loop. When not drawn, finish() prints nothing: logs and
// --json output stay clean.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>

namespace trove {

class ProgressBar {
 public:
  enum class Unit { kItems, kBytes };

  ProgressBar(std::string label, uint64_t total, Unit unit = Unit::kItems);
  ~ProgressBar();
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // Globally enables/disables drawing (e.g. --quiet or --json). Default: isatty(stderr).
  static void set_enabled(bool enabled);
  static bool enabled();

  void update(uint64_t done);
  void add(uint64_t delta) { update(done_ + delta); }
  // A short status drawn after the counts ("loss 0.0123  41k tok/s"), from the next draw on.
  void set_note(std::string note) { note_ = std::move(note); }
  // Draws the final state and a newline (once).
  void finish();

  // The bar line for `done` of the total after `seconds`; exposed for tests.
  std::string render(uint64_t done, double seconds, int width) const;

 private:
  void draw(bool final);

  std::string label_;
  std::string note_;
  uint64_t total_;
  Unit unit_;
  uint64_t done_ = 0;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
};

}  // namespace trove
