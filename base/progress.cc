#include "base/progress.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>

#include "base/bytes.h"
#include "base/strings.h"

namespace trove {

namespace {

std::atomic<int>& enabled_flag() {
  static std::atomic<int> flag{isatty(STDERR_FILENO) ? 1 : 0};
  return flag;
}

std::string format_count(uint64_t n, ProgressBar::Unit unit) {
  if (unit == ProgressBar::Unit::kBytes) return format_bytes(n);
  return str_printf("%llu", static_cast<unsigned long long>(n));
}

std::string format_seconds(double s) {
  if (s < 60) return str_printf("%.0fs", s);
  if (s < 3600) return str_printf("%dm%02ds", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  return str_printf("%dh%02dm", static_cast<int>(s) / 3600, (static_cast<int>(s) / 60) % 60);
}

}  // namespace

ProgressBar::ProgressBar(std::string label, uint64_t total, Unit unit)
    : label_(std::move(label)),
      total_(total),
      unit_(unit),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

ProgressBar::~ProgressBar() {
  finish();
}

void ProgressBar::set_enabled(bool enabled) {
  enabled_flag().store(enabled ? 1 : 0);
}
bool ProgressBar::enabled() {
  return enabled_flag().load() != 0;
}

void ProgressBar::update(uint64_t done) {
  done_ = std::min(done, total_);
  if (!enabled() || finished_) return;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  draw(false);
}

void ProgressBar::finish() {
  if (finished_) return;
  finished_ = true;
  if (enabled()) draw(true);
}

std::string ProgressBar::render(uint64_t done, double seconds, int width) const {
  done = std::min(done, total_);  // more than the total would draw a bar longer than `width`
  const double frac = total_ == 0 ? 1.0 : static_cast<double>(done) / static_cast<double>(total_);
  const int filled = static_cast<int>(frac * width + 1e-9);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(width - filled), '.');
  std::string line = str_printf("%-10s [%s] %3d%%  %s/%s", label_.c_str(), bar.c_str(),
                                static_cast<int>(frac * 100), format_count(done, unit_).c_str(),
                                format_count(total_, unit_).c_str());
  if (seconds > 0.05 && done > 0) {
    const double rate = static_cast<double>(done) / seconds;
    line += "  ";
    line += unit_ == Unit::kBytes ? format_rate(rate) : str_printf("%.0f/s", rate);
    if (done < total_)
      line += "  ETA " + format_seconds(static_cast<double>(total_ - done) / rate);
    else
      line += "  " + format_seconds(seconds);
  }
  if (!note_.empty()) line += "  " + note_;
  return line;
}

void ProgressBar::draw(bool final) {
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const std::string line = render(done_, seconds, 30);
  std::fprintf(stderr, "\r\033[2K%s%s", line.c_str(), final ? "\n" : "");
  std::fflush(stderr);
}

}  // namespace trove
