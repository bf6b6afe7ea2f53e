// TROVE_CHECK: for invariants whose failure is a bug in trove, not bad input. Prints file,
// line and the expression, then aborts. Always on (also in release builds): the checks sit
// outside inner loops. Bad input must produce a Status instead (base/status.h).
#pragma once

namespace trove::internal {
[[noreturn]] void check_failed(const char* file, int line, const char* expr, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));
}  // namespace trove::internal

#define TROVE_CHECK(cond)                                                  \
  do {                                                                     \
    if (__builtin_expect(!(cond), 0))                                      \
      ::trove::internal::check_failed(__FILE__, __LINE__, #cond, nullptr); \
  } while (0)

#define TROVE_CHECK_MSG(cond, ...)                                             \
  do {                                                                         \
    if (__builtin_expect(!(cond), 0))                                          \
      ::trove::internal::check_failed(__FILE__, __LINE__, #cond, __VA_ARGS__); \
  } while (0)
