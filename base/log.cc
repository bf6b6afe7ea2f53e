#include "base/log.h"

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace trove {

namespace {

LogLevel level_from_env() {
  const char* env = std::getenv("TROVE_LOG");
  if (env == nullptr) return LogLevel::kInfo;
  if (std::strcmp(env, "debug") == 0) return LogLevel::kDebug;
  if (std::strcmp(env, "warn") == 0) return LogLevel::kWarn;
  if (std::strcmp(env, "error") == 0) return LogLevel::kError;
  if (std::strcmp(env, "off") == 0) return LogLevel::kOff;
  return LogLevel::kInfo;
}

std::atomic<LogLevel>& level_ref() {
  static std::atomic<LogLevel> level{level_from_env()};
  return level;
}

}  // namespace

void set_log_level(LogLevel level) {
  level_ref().store(level);
}
LogLevel log_level() {
  return level_ref().load();
}

void log_message(LogLevel level, const char* fmt, ...) {
  if (level < log_level()) return;
  static const char* kTags[] = {"debug", "info", "warning", "error", ""};
  char line[4096];
  int n = std::snprintf(line, sizeof(line), "trove: %s: ", kTags[static_cast<int>(level)]);
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(line + n, sizeof(line) - static_cast<size_t>(n), fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "%s\n", line);  // one write per line: lines from threads stay whole
}

}  // namespace trove
