// Logging to stderr. Level from the TROVE_LOG environment variable (debug|info|warn|error,
// default info) or set_log_level(). Messages are printf-style, one line each.
#pragma once

namespace trove {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3, kOff = 4 };

void set_log_level(LogLevel level);
LogLevel log_level();

void log_message(LogLevel level, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

}  // namespace trove

#define TROVE_LOG_DEBUG(...) ::trove::log_message(::trove::LogLevel::kDebug, __VA_ARGS__)
#define TROVE_LOG_INFO(...) ::trove::log_message(::trove::LogLevel::kInfo, __VA_ARGS__)
#define TROVE_LOG_WARN(...) ::trove::log_message(::trove::LogLevel::kWarn, __VA_ARGS__)
#define TROVE_LOG_ERROR(...) ::trove::log_message(::trove::LogLevel::kError, __VA_ARGS__)
