#include "base/check.h"

#include <cstdarg>
#include <cstdio>
#include <cstdlib>

namespace trove::internal {

void check_failed(const char* file, int line, const char* expr, const char* fmt, ...) {
  std::fprintf(stderr, "trove: CHECK failed at %s:%d: %s", file, line, expr);
  if (fmt != nullptr) {
    std::fputs(": ", stderr);
    va_list ap;
    va_start(ap, fmt);
    std::vfprintf(stderr, fmt, ap);
    va_end(ap);
  }
  std::fputs("\n", stderr);
  std::fflush(stderr);
  std::abort();
}

}  // namespace trove::internal
