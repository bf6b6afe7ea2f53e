// base: byte sizes, half-precision conversions (exhaustive for fp16, and against the F16C
// hardware conversion for random fp32), Status/Result, the progress bar's line, str_split.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>

#include "base/bytes.h"
#include "base/half.h"
#include "base/metrics.h"
#include "base/progress.h"
#include "base/status.h"
#include "base/strings.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TROVE_TEST_HAVE_F16C 1
#else
#define TROVE_TEST_HAVE_F16C 0
#endif

namespace trove {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// ---- parse_bytes / format_bytes / format_rate ---------------------------------------------------

uint64_t bytes_ok(const char* text) {
  auto r = parse_bytes(text);
  EXPECT_TRUE(r.ok()) << text << ": " << r.status().to_string();
  return r.ok() ? *r : ~uint64_t{0};
}

TEST(ParseBytes, AcceptsTheWaysPeopleWriteSizes) {
  EXPECT_EQ(bytes_ok("12GiB"), uint64_t{12} << 30);
  EXPECT_EQ(bytes_ok("512 MiB"), uint64_t{512} << 20);
  EXPECT_EQ(bytes_ok("1.5GB"), 1500000000u);
  EXPECT_EQ(bytes_ok("4096"), 4096u);
  EXPECT_EQ(bytes_ok("4k"), 4096u);
  EXPECT_EQ(bytes_ok("4K"), 4096u);
  EXPECT_EQ(bytes_ok("0"), 0u);
  EXPECT_EQ(bytes_ok("2kB"), 2000u);
  EXPECT_EQ(bytes_ok("1.5KiB"), 1536u);
  EXPECT_EQ(bytes_ok("3 gib"), uint64_t{3} << 30);
  EXPECT_EQ(bytes_ok("1T"), uint64_t{1} << 40);
  EXPECT_EQ(bytes_ok("  64 B  "), 64u);
  EXPECT_EQ(bytes_ok("2.9"), 2u) << "fractions round down to a whole byte";
  EXPECT_EQ(bytes_ok("8388607T"), (uint64_t{1} << 63) - (uint64_t{1} << 40));
}

TEST(ParseBytes, RejectsMalformedInputNamingIt) {
  for (const char* bad : {"", "GiB", "1.2.3", "-5", ".", "abc", "1e5"}) {
    const Status st = parse_bytes(bad).status();
    EXPECT_TRUE(st.is_invalid_argument()) << "'" << bad << "': " << st.to_string();
    EXPECT_THAT(st.message(), HasSubstr(std::string("'") + bad + "'"));
  }
  const Status unit = parse_bytes("12XB").status();
  EXPECT_TRUE(unit.is_invalid_argument());
  EXPECT_THAT(unit.message(), AllOf(HasSubstr("'12XB'"), HasSubstr("unknown unit 'XB'")));
  EXPECT_THAT(parse_bytes("").status().message(), HasSubstr("not a byte size"));
}

TEST(ParseBytes, HugeValuesAreOutOfRange) {
  for (const char* huge : {"16777216T", "99999999999999999999", "9999999999 TiB",
                           "100000000000000000000000000000000000000000000000000000000000"}) {
    const Status st = parse_bytes(huge).status();
    EXPECT_EQ(st.code(), Status::Code::kOutOfRange) << huge << ": " << st.to_string();
    EXPECT_THAT(st.message(), HasSubstr(huge));
  }
}

TEST(FormatBytes, BinaryUnitsWithThreeSignificantDigits) {
  EXPECT_EQ(format_bytes(0), "0 B");
  EXPECT_EQ(format_bytes(1023), "1023 B");
  EXPECT_EQ(format_bytes(4096), "4 KiB");
  EXPECT_EQ(format_bytes(4097), "4.00 KiB");
  EXPECT_EQ(format_bytes(1904), "1.86 KiB");
  EXPECT_EQ(format_bytes(uint64_t{3} << 29), "1.50 GiB");
  EXPECT_EQ(format_bytes(uint64_t{10} << 20), "10 MiB");
  EXPECT_EQ(format_bytes((uint64_t{21} << 19) + 1), "10.5 MiB");
  EXPECT_EQ(format_bytes(uint64_t{100} << 10), "100 KiB");
  EXPECT_EQ(format_bytes(~uint64_t{0}), "16.0 EiB");
}

TEST(FormatRate, DecimalUnits) {
  EXPECT_EQ(format_rate(1.23e9), "1.23 GB/s");
  EXPECT_EQ(format_rate(999), "999 B/s");
  EXPECT_EQ(format_rate(0), "0.00 B/s");
  EXPECT_EQ(format_rate(25.5e6), "25.5 MB/s");
  EXPECT_EQ(format_rate(3e12), "3.00 TB/s");
}

// ---- fp16 / bf16 --------------------------------------------------------------------------------

bool fp16_is_nan(uint16_t h) {
  return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0;
}
bool bf16_is_nan(uint16_t h) {
  return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0;
}

TEST(Fp16, EveryBitPatternRoundTrips) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = fp16_to_fp32(h);
    if (fp16_is_nan(h)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      ASSERT_TRUE(fp16_is_nan(fp32_to_fp16(f))) << std::hex << h;
      continue;
    }
    ASSERT_EQ(fp32_to_fp16(f), h) << std::hex << h << " -> " << f;
  }
}

TEST(Fp16, EdgeCasesRoundToNearestEven) {
  EXPECT_EQ(fp32_to_fp16(65504.0f), 0x7bffu);
  EXPECT_EQ(fp32_to_fp16(65519.99f), 0x7bffu);
  EXPECT_EQ(fp32_to_fp16(65520.0f), 0x7c00u) << "halfway to 2^16 rounds to even: infinity";
  EXPECT_EQ(fp32_to_fp16(-65520.0f), 0xfc00u);
  EXPECT_EQ(fp32_to_fp16(std::numeric_limits<float>::max()), 0x7c00u);
  EXPECT_EQ(fp32_to_fp16(std::numeric_limits<float>::infinity()), 0x7c00u);
  EXPECT_EQ(fp32_to_fp16(0x1p-24f), 0x0001u);
  EXPECT_EQ(fp32_to_fp16(0x1p-25f), 0x0000u) << "halfway to the smallest subnormal: even is 0";
  EXPECT_EQ(fp32_to_fp16(-0x1p-25f), 0x8000u);
  EXPECT_EQ(fp32_to_fp16(0x1p-25f * 1.0001f), 0x0001u);
  EXPECT_EQ(fp32_to_fp16(3 * 0x1p-25f), 0x0002u) << "1.5 subnormal steps: even is 2";
  EXPECT_EQ(fp32_to_fp16(5 * 0x1p-25f), 0x0002u) << "2.5 subnormal steps: even is 2";
  EXPECT_EQ(fp32_to_fp16(0x1p-14f - 0x1p-25f), 0x0400u) << "top subnormal tie rounds to normal";
  EXPECT_EQ(fp32_to_fp16(1.0f + 0x1p-11f), 0x3c00u) << "tie between 1 and 1+2^-10: even";
  EXPECT_EQ(fp32_to_fp16(1.0f + 3 * 0x1p-11f), 0x3c02u);
  EXPECT_EQ(fp32_to_fp16(0x1p-14f), 0x0400u);
  EXPECT_EQ(fp32_to_fp16(-0.0f), 0x8000u);
  EXPECT_EQ(fp32_to_fp16(1e-10f), 0x0000u);
  EXPECT_TRUE(fp16_is_nan(fp32_to_fp16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(fp16_is_nan(fp32_to_fp16(std::bit_cast<float>(0x7f800001u))))
      << "a NaN whose payload sits below fp16's mantissa must not become infinity";
  EXPECT_TRUE(fp16_is_nan(fp32_to_fp16(std::bit_cast<float>(0xff800001u))));
  EXPECT_EQ(fp16_to_fp32(0x0001u), 0x1p-24f);
  EXPECT_EQ(fp16_to_fp32(0x8001u), -0x1p-24f);
  EXPECT_EQ(fp16_to_fp32(0x7bffu), 65504.0f);
  EXPECT_EQ(kFp16Max, 65504.0f);
}

#if TROVE_TEST_HAVE_F16C
__attribute__((target("f16c"))) uint16_t hardware_fp32_to_fp16(float x) {
  return static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) float hardware_fp16_to_fp32(uint16_t h) {
  return _cvtsh_ss(h);
}
#endif

TEST(Fp16, MatchesF16cHardwareConversion) {
#if !TROVE_TEST_HAVE_F16C
  GTEST_SKIP() << "not an x86 build: no F16C to compare against";
#else
  if (!__builtin_cpu_supports("f16c")) GTEST_SKIP() << "this CPU has no F16C instructions";
  const auto check = [](uint32_t bits) {
    const float f = std::bit_cast<float>(bits);
    const uint16_t ours = fp32_to_fp16(f);
    const uint16_t hw = hardware_fp32_to_fp16(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(fp16_is_nan(ours)) << std::hex << bits;
      return fp16_is_nan(ours);
    }
    EXPECT_EQ(ours, hw) << "fp32 bits 0x" << std::hex << bits << " (" << f << ")";
    return ours == hw;
  };
  const float edges[] = {65504.0f,
                         65519.99f,
                         65520.0f,
                         65536.0f,
                         0x1p-24f,
                         0x1p-25f,
                         0x1p-25f * 1.0001f,
                         3 * 0x1p-25f,
                         0x1p-14f,
                         0x1p-14f - 0x1p-25f,
                         1.0f + 0x1p-11f,
                         1.0f + 3 * 0x1p-11f,
                         0.0f,
                         -0.0f,
                         1e-30f,
                         -1e30f,
                         std::numeric_limits<float>::infinity(),
                         std::numeric_limits<float>::denorm_min()};
  for (float e : edges) {
    check(std::bit_cast<uint32_t>(e));
    check(std::bit_cast<uint32_t>(-e));
  }
  // Every tie and near-tie around each fp16 value's rounding boundary.
  for (uint32_t h = 0; h < 0x7c00u; ++h) {
    const uint32_t bits = std::bit_cast<uint32_t>(fp16_to_fp32(static_cast<uint16_t>(h)));
    for (uint32_t d : {0x0fffu, 0x1000u, 0x1001u}) check(bits + d);
  }
  std::mt19937 rng(1234);
  int mismatches = 0;
  for (int i = 0; i < 1000000 && mismatches < 10; ++i) {
    if (!check(static_cast<uint32_t>(rng()))) ++mismatches;
  }
  // Concentrated on the fp16 range, where the rounding is interesting.
  for (int i = 0; i < 200000 && mismatches < 10; ++i) {
    const uint32_t exp = 100u + static_cast<uint32_t>(rng() % 50u);  // 2^-27 .. 2^22
    const uint32_t bits = (rng() & 0x807fffffu) | (exp << 23);
    if (!check(bits)) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0);
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    if (fp16_is_nan(h)) continue;
    ASSERT_EQ(std::bit_cast<uint32_t>(fp16_to_fp32(h)),
              std::bit_cast<uint32_t>(hardware_fp16_to_fp32(h)))
        << std::hex << h;
  }
#endif
}

TEST(Bf16, RoundsToNearestEvenOnTies) {
  const auto bf = [](uint32_t bits) { return fp32_to_bf16(std::bit_cast<float>(bits)); };
  EXPECT_EQ(bf(0x3f800000u), 0x3f80u);
  EXPECT_EQ(bf(0x3f808000u), 0x3f80u) << "tie, 0x3f80 is even";
  EXPECT_EQ(bf(0x3f818000u), 0x3f82u) << "tie, 0x3f82 is even";
  EXPECT_EQ(bf(0x3f808001u), 0x3f81u) << "just above the tie";
  EXPECT_EQ(bf(0x3f807fffu), 0x3f80u) << "just below the tie";
  EXPECT_EQ(bf(0xbf818000u), 0xbf82u) << "negative tie";
  EXPECT_EQ(bf(0x7f7fffffu), 0x7f80u) << "FLT_MAX rounds to infinity";
  EXPECT_EQ(bf(0x7f800000u), 0x7f80u);
  EXPECT_EQ(bf(0xff800000u), 0xff80u);
  EXPECT_EQ(bf(0x00008000u), 0x0000u) << "subnormal tie to even zero";
  EXPECT_EQ(bf(0x00018000u), 0x0002u);
  EXPECT_TRUE(bf16_is_nan(bf(0x7f800001u))) << "payload below bf16's mantissa stays NaN";
  EXPECT_TRUE(bf16_is_nan(bf(0xffc00000u)));
  EXPECT_EQ(bf16_to_fp32(0x3f80u), 1.0f);
}

TEST(Bf16, EveryBitPatternRoundTrips) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = bf16_to_fp32(h);
    if (bf16_is_nan(h)) {
      ASSERT_TRUE(bf16_is_nan(fp32_to_bf16(f))) << std::hex << h;
      continue;
    }
    ASSERT_EQ(fp32_to_bf16(f), h) << std::hex << h;
  }
}

// ---- Status / Result
// ------------------------------------------------------------------------------

TEST(Status, DefaultIsOkAndPrintsOk) {
  const Status ok;
  EXPECT_TRUE(ok.ok());
  EXPECT_EQ(ok.code(), Status::Code::kOk);
  EXPECT_EQ(ok.to_string(), "OK");
  EXPECT_TRUE(ok.with_context("reading x").ok());
  EXPECT_TRUE(ok.with_context("reading x").message().empty());
}

TEST(Status, WithContextPrependsAndKeepsTheCode) {
  const Status st = Status::corruption("bad checksum at record 7");
  const Status wrapped = st.with_context("reading a.trove").with_context("pack");
  EXPECT_TRUE(wrapped.is_corruption());
  EXPECT_EQ(wrapped.message(), "pack: reading a.trove: bad checksum at record 7");
  EXPECT_EQ(wrapped.to_string(), "Corruption: pack: reading a.trove: bad checksum at record 7");
  EXPECT_EQ(st.message(), "bad checksum at record 7") << "the original is unchanged";
}

TEST(Status, CodesAndNames) {
  EXPECT_TRUE(Status::invalid_argument("x").is_invalid_argument());
  EXPECT_TRUE(Status::not_found("x").is_not_found());
  EXPECT_TRUE(Status::io_error("x").is_io_error());
  EXPECT_EQ(Status::not_supported("x").code(), Status::Code::kNotSupported);
  EXPECT_EQ(Status::out_of_range("x").code(), Status::Code::kOutOfRange);
  EXPECT_EQ(Status::resource_exhausted("x").code(), Status::Code::kResourceExhausted);
  EXPECT_EQ(Status::aborted("x").code(), Status::Code::kAborted);
  EXPECT_EQ(Status::not_found("f").to_string(), "Not found: f");
  EXPECT_STREQ(Status::code_name(Status::Code::kIOError), "IO error");
  const Status e = Status::from_errno("opening /x", ENOENT);
  EXPECT_TRUE(e.is_io_error());
  EXPECT_EQ(e.message(), std::string("opening /x: ") + std::strerror(ENOENT));
}

Result<int> half_of(int x) {
  if (x % 2 != 0) return Status::invalid_argument(str_printf("%d is odd", x));
  return x / 2;
}

Result<int> quarter_of(int x) {
  TROVE_ASSIGN_OR_RETURN(int half, half_of(x));
  TROVE_ASSIGN_OR_RETURN(int quarter, half_of(half));
  return quarter;
}

Status check_even(int x) {
  TROVE_RETURN_IF_ERROR(half_of(x));
  return Status::ok_status();
}

TEST(Result, HoldsAValueOrAnError) {
  Result<int> v = half_of(8);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 4);
  EXPECT_EQ(v.value(), 4);
  EXPECT_TRUE(v.status().ok());

  Result<int> e = half_of(7);
  EXPECT_FALSE(e.ok());
  EXPECT_TRUE(e.status().is_invalid_argument());
  EXPECT_EQ(e.status().message(), "7 is odd");
}

TEST(Result, MacrosPropagateErrors) {
  EXPECT_EQ(*quarter_of(12), 3);
  EXPECT_EQ(quarter_of(6).status().message(), "3 is odd");
  EXPECT_TRUE(check_even(2).ok());
  EXPECT_TRUE(check_even(3).is_invalid_argument());
}

TEST(Result, HoldsMoveOnlyValues) {
  Result<std::unique_ptr<int>> r = std::make_unique<int>(5);
  ASSERT_TRUE(r.ok());
  std::unique_ptr<int> p = std::move(r).value();
  EXPECT_EQ(*p, 5);
  Result<std::string> s = std::string("abc");
  EXPECT_EQ(s->size(), 3u);
}

TEST(ResultDeathTest, ValueOnErrorAborts) {
  Result<int> e = Status::not_found("gone");
  EXPECT_DEATH((void)e.value(), "gone");
}

// ---- ProgressBar
// ------------------------------------------------------------------------------------

TEST(ProgressBar, RenderShowsPercentCountsAndEta) {
  ProgressBar::set_enabled(false);  // never draw on the test's stderr
  ProgressBar bar("pack", 200);
  const std::string line = bar.render(50, 1.0, 20);
  EXPECT_THAT(line, AllOf(HasSubstr("pack"), HasSubstr(" 25%"), HasSubstr("50/200"),
                          HasSubstr("50/s"), HasSubstr("ETA 3s")));
  EXPECT_THAT(line, HasSubstr("[#####...............]"));
  EXPECT_THAT(bar.render(200, 2.0, 10), AllOf(HasSubstr("100%"), HasSubstr("[##########]")));
  EXPECT_THAT(bar.render(0, 0.0, 10), AllOf(HasSubstr("  0%"), HasSubstr("0/200")));
}

TEST(ProgressBar, RenderInBytes) {
  ProgressBar::set_enabled(false);
  ProgressBar bar("copy", uint64_t{1} << 30, ProgressBar::Unit::kBytes);
  const std::string line = bar.render(uint64_t{512} << 20, 2.0, 10);
  EXPECT_THAT(line, AllOf(HasSubstr(" 50%"), HasSubstr("512 MiB/1 GiB"), HasSubstr("MB/s")));
}

TEST(ProgressBar, RenderClampsDoneBeyondTotalAndEmptyTotal) {
  ProgressBar::set_enabled(false);
  ProgressBar bar("x", 10);
  EXPECT_THAT(bar.render(15, 1.0, 10), AllOf(HasSubstr("100%"), HasSubstr("[##########]")));
  ProgressBar empty("none", 0);
  EXPECT_THAT(empty.render(0, 0.0, 4), HasSubstr("100%"));
  EXPECT_FALSE(ProgressBar::enabled());
}

// ---- strings
// --------------------------------------------------------------------------------------

TEST(Strings, SplitKeepsEmptyPieces) {
  using V = std::vector<std::string>;
  EXPECT_EQ(str_split("a,b,,c", ','), (V{"a", "b", "", "c"}));
  EXPECT_EQ(str_split("", ','), (V{""}));
  EXPECT_EQ(str_split(",", ','), (V{"", ""}));
  EXPECT_EQ(str_split("abc", ','), (V{"abc"}));
  EXPECT_EQ(str_split("a,", ','), (V{"a", ""}));
}

TEST(Strings, PrintfAndAffixes) {
  EXPECT_EQ(str_printf("%d-%s", 7, "x"), "7-x");
  EXPECT_EQ(str_printf("%s", ""), "");
  const std::string long_text(5000, 'z');
  EXPECT_EQ(str_printf("<%s>", long_text.c_str()), "<" + long_text + ">");
  EXPECT_TRUE(starts_with("layers.0.w", "layers."));
  EXPECT_FALSE(starts_with("w", "layers."));
  EXPECT_TRUE(ends_with("model.safetensors", ".safetensors"));
  EXPECT_FALSE(ends_with("a", "abc"));
}

TEST(Metrics, CountersAddNestByDotsAndSumWithPlusEquals) {
  Metrics a;
  a.count("tokens", 7);
  a.count("host.hits", 3);
  a.add("host.disk_seconds", 0.25);
  Metrics b;
  b.count("tokens", 5);
  b.count("host.misses", 2);
  b.add("host.disk_seconds", 0.5);
  a += b;
  EXPECT_EQ(a.counter("tokens"), 12);
  EXPECT_EQ(a.counter("host.hits"), 3);
  EXPECT_EQ(a.counter("host.misses"), 2);
  EXPECT_EQ(a.counter("never"), 0);
  EXPECT_DOUBLE_EQ(a.real("host.disk_seconds"), 0.75);
  const nlohmann::json j = a.to_json();
  EXPECT_EQ(j["tokens"], 12);
  EXPECT_TRUE(j["tokens"].is_number_integer());
  EXPECT_EQ(j["host"]["hits"], 3);
  EXPECT_EQ(j["host"]["misses"], 2);
  EXPECT_DOUBLE_EQ(j["host"]["disk_seconds"].get<double>(), 0.75);
  EXPECT_EQ(Metrics{}.to_json(), nlohmann::json::object());
}

TEST(Metrics, HistogramsGiveNearestRankPercentilesAndMerge) {
  Metrics a, b;
  for (int i = 1; i <= 60; ++i) a.observe("route", i * 1e-3);
  for (int i = 61; i <= 101; ++i) b.observe("route", i * 1e-3);  // 101 samples in all
  a += b;
  const LatencyHistogram* h = a.histogram("route");
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(h->count(), 101);
  EXPECT_DOUBLE_EQ(h->quantile(0.5), 51e-3);
  EXPECT_DOUBLE_EQ(h->quantile(0.9), 91e-3);
  EXPECT_DOUBLE_EQ(h->quantile(0.99), 100e-3);
  EXPECT_DOUBLE_EQ(h->quantile(1.0), 101e-3);
  EXPECT_DOUBLE_EQ(h->quantile(0.0), 1e-3);
  const nlohmann::json j = a.to_json()["route"];
  EXPECT_EQ(j["count"], 101);
  EXPECT_NEAR(j["mean"].get<double>(), 51e-3, 1e-12);
  EXPECT_DOUBLE_EQ(j["p90"].get<double>(), 91e-3);
  EXPECT_EQ(a.histogram("other"), nullptr);
  EXPECT_DOUBLE_EQ(LatencyHistogram{}.quantile(0.5), 0.0);
  EXPECT_EQ(LatencyHistogram{}.to_json()["count"], 0);
}

TEST(MetricsDeathTest, ANameIsOneKindOfMetric) {
  Metrics m;
  m.count("x", 1);
  EXPECT_DEATH(m.add("x", 1.0), "");
  EXPECT_DEATH(m.observe("x", 1.0), "");
}

}  // namespace
}  // namespace trove
