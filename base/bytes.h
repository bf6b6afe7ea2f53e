// Byte sizes as people write them: "12GiB", "512 MiB", "1.5GB", "4096", "4k".
// Binary units: KiB MiB GiB TiB, and the bare letters K M G T (as dd and fio read them).
// Decimal units: kB/KB MB GB TB. A bare number is bytes. Case of the unit's "iB"/"B" is
// ignored; fractions are allowed and rounded down to a whole byte.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "base/status.h"

namespace trove {

Result<uint64_t> parse_bytes(std::string_view text);

// "0 B", "4 KiB", "1.50 GiB": binary units; a whole number of the unit is printed whole,
// anything else with three significant digits ("1.86 KiB", "10.5 MiB").
std::string format_bytes(uint64_t bytes);

// "1.23 GB/s" (decimal, as bandwidths are quoted by hardware vendors).
std::string format_rate(double bytes_per_second);

}  // namespace trove
