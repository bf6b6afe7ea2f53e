// Small string helpers (GCC 12 has no <format>).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace trove {

// printf into a std::string.
std::string str_printf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Splits on `sep`; keeps empty pieces.
std::vector<std::string> str_split(std::string_view s, char sep);

bool starts_with(std::string_view s, std::string_view prefix);
bool ends_with(std::string_view s, std::string_view suffix);

}  // namespace trove
