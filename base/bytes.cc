#include "base/bytes.h"

#include <cctype>
#include <cmath>
#include <cstdlib>

#include "base/strings.h"

namespace trove {

namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Multiplier for a unit suffix, or 0 when unknown.
double unit_multiplier(std::string_view unit_text) {
  const std::string u = lower(unit_text);
  if (u.empty() || u == "b") return 1;
  static const struct {
    const char* name;
    double mult;
  } kUnits[] = {
      {"k", 0x1p10},   {"kib", 0x1p10}, {"ki", 0x1p10},  {"m", 0x1p20},
      {"mib", 0x1p20}, {"mi", 0x1p20},  {"g", 0x1p30},   {"gib", 0x1p30},
      {"gi", 0x1p30},  {"t", 0x1p40},   {"tib", 0x1p40}, {"ti", 0x1p40},
      {"kb", 1e3},     {"mb", 1e6},     {"gb", 1e9},     {"tb", 1e12},
  };
  for (const auto& unit : kUnits) {
    if (u == unit.name) return unit.mult;
  }
  return 0;
}

}  // namespace

Result<uint64_t> parse_bytes(std::string_view text) {
  const std::string original(text);
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front())))
    text.remove_prefix(1);
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back())))
    text.remove_suffix(1);
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.'))
    ++i;
  const std::string number(text.substr(0, i));
  std::string_view unit = text.substr(i);
  while (!unit.empty() && std::isspace(static_cast<unsigned char>(unit.front())))
    unit.remove_prefix(1);
  if (number.empty() || number == "." || number.find('.') != number.rfind('.')) {
    return Status::invalid_argument(str_printf(
        "'%s' is not a byte size; write e.g. 4096, 512MiB, 12GiB or 1.5GB", original.c_str()));
  }
  const double mult = unit_multiplier(unit);
  if (mult == 0) {
    return Status::invalid_argument(str_printf(
        "'%s': unknown unit '%.*s' (use B, KiB, MiB, GiB, TiB, K, M, G, T, kB, MB, GB or TB)",
        original.c_str(), static_cast<int>(unit.size()), unit.data()));
  }
  const double value = std::strtod(number.c_str(), nullptr) * mult;
  if (!(value < 0x1p63)) {
    return Status::out_of_range(str_printf("'%s' is larger than 8 EiB", original.c_str()));
  }
  return static_cast<uint64_t>(std::floor(value));
}

std::string format_bytes(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return str_printf("%llu B", static_cast<unsigned long long>(bytes));
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 6) {
    v /= 1024;
    ++u;
  }
  const uint64_t unit = uint64_t{1} << (10 * u);
  if (bytes % unit == 0) {  // a size as the user typed it: "64 MiB", not "64.0 MiB"
    return str_printf("%llu %s", static_cast<unsigned long long>(bytes / unit), kUnits[u]);
  }
  return str_printf(v >= 100 ? "%.0f %s" : v >= 10 ? "%.1f %s" : "%.2f %s", v, kUnits[u]);
}

std::string format_rate(double bytes_per_second) {
  static const char* kUnits[] = {"B/s", "kB/s", "MB/s", "GB/s", "TB/s"};
  double v = bytes_per_second;
  int u = 0;
  while (v >= 1000 && u < 4) {
    v /= 1000;
    ++u;
  }
  return str_printf(v >= 100 ? "%.0f %s" : v >= 10 ? "%.1f %s" : "%.2f %s", v, kUnits[u]);
}

}  // namespace trove
