// Small string helpers (GCC 12 has no <format>).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace trove {

// printf into a std::string.
std::string str_printf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Splits on `sep`; keeps empty pieces.
std::vector<std::string> str_split(std::string_view s, char sep);

// "[2048, 4, 64]".
std::string shape_to_string(const std::vector<int64_t>& shape);

// At most `max_bytes` of `s`, with "..." appended when cut: for quoting untrusted text in
// error messages.
std::string clip(std::string_view s, size_t max_bytes = 128);

// The deepest nesting of [ and { in JSON text (brackets inside strings do not count). Parsers
// of untrusted JSON reject deep documents first: nlohmann::json copies and compares values
// recursively, so a 100k-deep array would overflow the stack later.
int json_nesting_depth(std::string_view text);
// Documents trove reads never need more than this.
inline constexpr int kMaxJsonDepth = 64;

// 4194304 -> "4,194,304"; -1234 -> "-1,234".
std::string with_commas(int64_t v);

bool starts_with(std::string_view s, std::string_view prefix);
bool ends_with(std::string_view s, std::string_view suffix);

}  // namespace trove
