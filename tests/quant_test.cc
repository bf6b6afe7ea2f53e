// Row quantizers (kernels/quant.h): the oracle's rules checked against hand-computed values,
// then every optimized CPU path checked bit for bit against the oracle.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "base/half.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/ref/quant_ref.h"
#include "kernels/quant.h"
#include "tests/cpu_path_test.h"

namespace trove {

// Names the path in gtest's failure messages (found by ADL, hence outside the anonymous
// namespace; inline because both test files of this binary define it).
inline void PrintTo(CpuPath path, std::ostream* os) {
  *os << cpu_path_name(path);
}

namespace {

using ::testing::HasSubstr;

// Byte-for-byte equality of two arrays, reporting the first differing element.
template <typename T>
::testing::AssertionResult same_bits(const std::vector<T>& want, const std::vector<T>& got) {
  if (want.size() != got.size()) {
    return ::testing::AssertionFailure()
           << "sizes differ: want " << want.size() << ", got " << got.size();
  }
  if (want.empty() || std::memcmp(want.data(), got.data(), want.size() * sizeof(T)) == 0) {
    return ::testing::AssertionSuccess();
  }
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::memcmp(&want[i], &got[i], sizeof(T)) != 0) {
      auto out = ::testing::AssertionFailure() << "first difference at element " << i << ": want ";
      if constexpr (std::is_floating_point_v<T>) {
        out << want[i] << " (0x" << std::hex << std::bit_cast<uint32_t>(want[i]) << "), got "
            << std::dec << got[i] << " (0x" << std::hex << std::bit_cast<uint32_t>(got[i]) << ")";
      } else {
        out << "0x" << std::hex
            << static_cast<uint32_t>(static_cast<std::make_unsigned_t<T>>(want[i])) << ", got 0x"
            << static_cast<uint32_t>(static_cast<std::make_unsigned_t<T>>(got[i]));
      }
      return out;
    }
  }
  return ::testing::AssertionSuccess();
}

struct Int8Row {
  std::vector<uint16_t> scales;
  std::vector<int8_t> codes;
};
struct Int4Row {
  std::vector<uint16_t> scales;
  std::vector<uint8_t> codes;
};

using QuantizeInt8Fn = void (*)(const float*, int64_t, uint16_t*, int8_t*);
using QuantizeInt4Fn = void (*)(const float*, int64_t, uint16_t*, uint8_t*);

Int8Row quantize_int8(QuantizeInt8Fn fn, const std::vector<float>& x) {
  const auto n = static_cast<int64_t>(x.size());
  // Poisoned outputs: every byte must be written.
  Int8Row r{std::vector<uint16_t>(static_cast<size_t>(quant_groups(n)), 0xdead),
            std::vector<int8_t>(row_code_bytes(DType::kI8, n), 0x55)};
  fn(x.data(), n, r.scales.data(), r.codes.data());
  return r;
}

Int4Row quantize_int4(QuantizeInt4Fn fn, const std::vector<float>& x) {
  const auto n = static_cast<int64_t>(x.size());
  Int4Row r{std::vector<uint16_t>(static_cast<size_t>(quant_groups(n)), 0xdead),
            std::vector<uint8_t>(row_code_bytes(DType::kI4, n), 0x55)};
  fn(x.data(), n, r.scales.data(), r.codes.data());
  return r;
}

std::vector<float> dequantize_int8_ref(const Int8Row& r, size_t n) {
  std::vector<float> y(n);
  dequantize_row_int8_ref(r.scales.data(), r.codes.data(), static_cast<int64_t>(n), y.data());
  return y;
}

std::vector<float> dequantize_int4_ref(const Int4Row& r, size_t n) {
  std::vector<float> y(n);
  dequantize_row_int4_ref(r.scales.data(), r.codes.data(), static_cast<int64_t>(n), y.data());
  return y;
}

std::vector<float> normal_values(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

// Input distributions for the parity tests; each stresses a different part of the rules.
enum class Dist {
  kNormal,       // N(0, 1)
  kUniform,      // U(-1, 1)
  kHuge,         // up to quant_max_abs, with groups hitting the limit exactly
  kTiny,         // scales in fp16's subnormal range or flushing to zero
  kMixedScales,  // per-group magnitudes from 1e-6 to 1e4
  kZeroGroups,   // all-zero groups, lone nonzeros, negative zeros
  kIntegerLike,  // small integers: many exact ties between +m and -m and on-grid values
};
constexpr Dist kAllDists[] = {Dist::kNormal,      Dist::kUniform,    Dist::kHuge,       Dist::kTiny,
                              Dist::kMixedScales, Dist::kZeroGroups, Dist::kIntegerLike};

const char* dist_name(Dist d) {
  switch (d) {
    case Dist::kNormal:
      return "normal";
    case Dist::kUniform:
      return "uniform";
    case Dist::kHuge:
      return "huge";
    case Dist::kTiny:
      return "tiny";
    case Dist::kMixedScales:
      return "mixed-scales";
    case Dist::kZeroGroups:
      return "zero-groups";
    case Dist::kIntegerLike:
      return "integer-like";
  }
  return "?";
}

// `code_max` is 127 for int8 and 8 for int4: the ratio between a group's largest magnitude
// and its scale, used to aim the tiny distribution at subnormal scales.
std::vector<float> make_values(Dist dist, size_t n, uint32_t seed, DType t) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float code_max = t == DType::kI8 ? 127.0f : 8.0f;
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) {
    const size_t g = i / kQuantGroup;
    std::mt19937 group_rng(seed * 7919u + static_cast<uint32_t>(g));  // per-group magnitude
    std::uniform_real_distribution<float> group_unit(0.0f, 1.0f);
    const float group_u = group_unit(group_rng);
    switch (dist) {
      case Dist::kNormal:
        x[i] = normal(rng);
        break;
      case Dist::kUniform:
        x[i] = unit(rng);
        break;
      case Dist::kHuge:
        x[i] = unit(rng) * quant_max_abs(t);
        if (g % 3 == 0 && i % kQuantGroup == 5) x[i] = (g % 2 ? -1 : 1) * quant_max_abs(t);
        break;
      case Dist::kTiny:
        // Scale targets 2^-27 .. 2^-13: below half the smallest fp16 subnormal (2^-25) the
        // scale is 0, up to 2^-14 it is subnormal.
        x[i] = unit(rng) * code_max * std::exp2(-27.0f + 14.0f * group_u);
        break;
      case Dist::kMixedScales:
        x[i] = normal(rng) * std::pow(10.0f, -6.0f + 10.0f * group_u);
        break;
      case Dist::kZeroGroups:
        if (g % 3 == 0) {
          x[i] = ((i + g / 3) % 2) ? -0.0f : 0.0f;  // some groups start with -0
        } else if (g % 3 == 1) {
          x[i] = i % kQuantGroup == g % kQuantGroup ? normal(rng) : 0.0f;
        } else {
          x[i] = normal(rng);
        }
        break;
      case Dist::kIntegerLike:
        x[i] = static_cast<float>(std::uniform_int_distribution<int>(-4, 4)(rng));
        break;
    }
  }
  return x;
}

constexpr size_t kLengths[] = {1, 7, 31, 32, 33, 63, 64, 65, 100, 1000, 2048, 2049, 4101};

// Groups whose every element is an exact rounding tie x / d = k + 0.5, for random fp16 scales
// d: the group's extreme element (first, or placed at random) pins the scale to exactly d.
std::vector<float> tie_values(DType t, size_t groups, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> exponent(-14, 10);
  std::uniform_int_distribution<int> mantissa(0, 1023);
  std::uniform_int_distribution<int> place(0, kQuantGroup - 1);
  std::vector<float> x(groups * kQuantGroup);
  for (size_t g = 0; g < groups; ++g) {
    const float d = std::ldexp(1.0f + static_cast<float>(mantissa(rng)) / 1024.0f, exponent(rng));
    const int kmin = t == DType::kI8 ? -127 : -8;
    const int kmax = t == DType::kI8 ? 126 : 6;
    std::uniform_int_distribution<int> k(kmin, kmax);
    float* group = x.data() + g * kQuantGroup;
    for (int j = 0; j < kQuantGroup; ++j) group[j] = d * (static_cast<float>(k(rng)) + 0.5f);
    // int8: absmax = 127 d gives d exactly; int4: m = -8 d gives d exactly (both products and
    // quotients are exact: 11-bit mantissas times small integers).
    group[place(rng)] = t == DType::kI8 ? (g % 2 ? -127.0f : 127.0f) * d : -8.0f * d;
  }
  return x;
}

// ---- sizes and ranges ---------------------------------------------------------------------

TEST(QuantSizes, RowCodeBytesPadQuantizedRowsToWholeGroups) {
  EXPECT_EQ(row_code_bytes(DType::kI8, 1), 32u);
  EXPECT_EQ(row_code_bytes(DType::kI8, 32), 32u);
  EXPECT_EQ(row_code_bytes(DType::kI8, 33), 64u);
  EXPECT_EQ(row_code_bytes(DType::kI4, 33), 32u);
  EXPECT_EQ(row_code_bytes(DType::kI4, 2048), 1024u);
  EXPECT_EQ(row_code_bytes(DType::kF32, 33), 132u);
  EXPECT_EQ(row_code_bytes(DType::kF16, 33), 66u);
  EXPECT_EQ(row_code_bytes(DType::kBF16, 33), 66u);
  EXPECT_EQ(row_code_bytes(DType::kI8, 0), 0u);
}

TEST(QuantSizes, RowScaleBytesAreTwoPerGroupForQuantizedTypesOnly) {
  EXPECT_EQ(row_scale_bytes(DType::kI8, 33), 4u);
  EXPECT_EQ(row_scale_bytes(DType::kI4, 2048), 128u);
  EXPECT_EQ(row_scale_bytes(DType::kI4, 2049), 130u);
  EXPECT_EQ(row_scale_bytes(DType::kF32, 100), 0u);
  EXPECT_EQ(row_scale_bytes(DType::kF16, 100), 0u);
  EXPECT_EQ(row_scale_bytes(DType::kBF16, 100), 0u);
}

TEST(QuantSizes, MaxAbsIsTheLargestValueWithAFiniteScale) {
  EXPECT_EQ(quant_max_abs(DType::kI8), 65504.0f * 127.0f);
  EXPECT_EQ(quant_max_abs(DType::kI4), 65504.0f * 8.0f);
  EXPECT_EQ(quant_max_abs(DType::kF16), 65504.0f);
  EXPECT_EQ(quant_max_abs(DType::kF32), std::numeric_limits<float>::max());
  EXPECT_EQ(fp32_to_bf16(quant_max_abs(DType::kBF16)), 0x7f7f);

  std::vector<float> x(32, 1.0f);
  x[9] = -quant_max_abs(DType::kI8);
  EXPECT_EQ(quantize_int8(quantize_row_int8_ref, x).scales[0], 0x7bff);  // 65504
  x[9] = quant_max_abs(DType::kI4);
  EXPECT_EQ(quantize_int4(quantize_row_int4_ref, x).scales[0], 0xfbff);  // -65504
}

TEST(QuantCheckRange, AcceptsFiniteValuesUpToTheLimit) {
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8, DType::kI4}) {
    const std::vector<float> x = {0.0f, -0.0f, 1.5f, quant_max_abs(t), -quant_max_abs(t)};
    EXPECT_TRUE(quant_check_range(t, x.data(), static_cast<int64_t>(x.size())).ok())
        << dtype_name(t);
  }
  EXPECT_TRUE(quant_check_range(DType::kI8, nullptr, 0).ok());
}

TEST(QuantCheckRange, RejectsNanNamingItsIndex) {
  std::vector<float> x(40, 1.0f);
  x[17] = std::nanf("");
  x[30] = std::numeric_limits<float>::infinity();
  const Status s = quant_check_range(DType::kI4, x.data(), 40);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("element 17 is nan"));
}

TEST(QuantCheckRange, RejectsInfinityNamingItsIndex) {
  std::vector<float> x(8, 1.0f);
  x[6] = -std::numeric_limits<float>::infinity();
  const Status s = quant_check_range(DType::kF32, x.data(), 8);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("element 6 is -inf"));
}

TEST(QuantCheckRange, RejectsValuesBeyondTheDtypeRangeNamingIndexAndValue) {
  std::vector<float> x(8, 1.0f);
  x[3] = 600000.0f;  // fine for int8 (limit 8319008), too large for int4 (524032)
  EXPECT_TRUE(quant_check_range(DType::kI8, x.data(), 8).ok());
  const Status s = quant_check_range(DType::kI4, x.data(), 8);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("element 3 is 600000"));
  EXPECT_THAT(s.message(), HasSubstr("int4"));

  x[3] = 70000.0f;
  const Status f16 = quant_check_range(DType::kF16, x.data(), 8);
  ASSERT_FALSE(f16.ok());
  EXPECT_THAT(f16.message(), HasSubstr("element 3 is 70000"));
}

// ---- error statistics ---------------------------------------------------------------------

TEST(QuantErrorStats, AccumulatesRmseMaxAbsAndRelativeFrobenius) {
  const std::vector<float> x = {3.0f, 4.0f, 0.0f, 0.0f};
  const std::vector<float> y = {3.0f, 3.0f, 0.0f, 1.0f};  // errors 0, 1, 0, -1
  QuantError e;
  e.add(x.data(), y.data(), 4);
  EXPECT_EQ(e.count, 4);
  EXPECT_DOUBLE_EQ(e.sum_sq_err, 2.0);
  EXPECT_DOUBLE_EQ(e.sum_sq_ref, 25.0);
  EXPECT_DOUBLE_EQ(e.max_abs, 1.0);
  EXPECT_DOUBLE_EQ(e.rmse(), std::sqrt(0.5));
  EXPECT_DOUBLE_EQ(e.rel_fro(), std::sqrt(2.0 / 25.0));
}

TEST(QuantErrorStats, MergeEqualsOneAddOverTheConcatenation) {
  const std::vector<float> x = normal_values(100, 1);
  const std::vector<float> y = normal_values(100, 2);
  QuantError whole, first, second;
  whole.add(x.data(), y.data(), 100);
  first.add(x.data(), y.data(), 37);
  second.add(x.data() + 37, y.data() + 37, 63);
  first.merge(second);
  EXPECT_EQ(first.count, whole.count);
  EXPECT_NEAR(first.sum_sq_err, whole.sum_sq_err, 1e-9);
  EXPECT_NEAR(first.sum_sq_ref, whole.sum_sq_ref, 1e-9);
  EXPECT_EQ(first.max_abs, whole.max_abs);
  EXPECT_NEAR(first.rmse(), whole.rmse(), 1e-12);
}

TEST(QuantErrorStats, EmptyAndAllZeroReferenceGiveZeros) {
  QuantError e;
  EXPECT_EQ(e.rmse(), 0.0);
  EXPECT_EQ(e.rel_fro(), 0.0);
  const std::vector<float> zeros(4, 0.0f);
  e.add(zeros.data(), zeros.data(), 4);
  EXPECT_EQ(e.rel_fro(), 0.0);
}

// ---- the int8 oracle ----------------------------------------------------------------------

TEST(QuantRefInt8, ScaleIsFp16OfAbsmaxOver127) {
  std::vector<float> x(32, 0.25f);
  x[4] = -127.0f;  // absmax 127 -> d = 1
  const Int8Row r = quantize_int8(quantize_row_int8_ref, x);
  EXPECT_EQ(r.scales[0], 0x3c00);
  EXPECT_EQ(r.codes[4], -127);
  EXPECT_EQ(r.codes[0], 0);  // 0.25 rounds to 0

  x.assign(32, 0.0f);
  x[0] = 1.0f;  // 1/127 = 2^-7 * 1.00787...: fp16 mantissa 8/1024, bits 0x2008
  EXPECT_EQ(quantize_int8(quantize_row_int8_ref, x).scales[0], 0x2008);
}

TEST(QuantRefInt8, DividesByTheWidenedFp16ScaleAndClampsTo127) {
  // absmax / 127 = 1.4 * 2^-24 rounds to the smallest fp16 subnormal, d = 2^-24. Dividing by
  // the widened d (not by absmax / 127) gives 177.8 -> clamped to 127, and 100.5 -> a tie that
  // rounds to 100; dividing by the unrounded 1.4 * 2^-24 would have given 127 and 72.
  std::vector<float> x(32, 0.0f);
  x[0] = 177.8f * 0x1p-24f;
  x[1] = 100.5f * 0x1p-24f;
  const Int8Row r = quantize_int8(quantize_row_int8_ref, x);
  EXPECT_EQ(r.scales[0], 0x0001);
  EXPECT_EQ(r.codes[0], 127);
  EXPECT_EQ(r.codes[1], 100);
}

TEST(QuantRefInt8, RoundsExactTiesToEven) {
  std::vector<float> x(32);
  x[0] = 127.0f * 0.125f;  // d = 0.125 exactly
  for (int j = 1; j < 32; ++j) x[j] = 0.125f * (static_cast<float>(j - 16) + 0.5f);
  const Int8Row r = quantize_int8(quantize_row_int8_ref, x);
  ASSERT_EQ(r.scales[0], fp32_to_fp16(0.125f));
  for (int j = 1; j < 32; ++j) {
    const int k = j - 16;  // x / d = k + 0.5: the even one of k and k + 1
    EXPECT_EQ(r.codes[j], k % 2 == 0 ? k : k + 1) << "k = " << k;
  }
}

TEST(QuantRefInt8, OnGridValuesRoundTripExactly) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> code(-127, 127);
  std::vector<float> x(96);
  const float d = 0.0390625f;  // 5 * 2^-7, exact in fp16
  for (float& v : x) v = d * static_cast<float>(code(rng));
  for (int g = 0; g < 3; ++g) x[g * 32 + 7] = (g == 1 ? -127.0f : 127.0f) * d;
  const Int8Row r = quantize_int8(quantize_row_int8_ref, x);
  EXPECT_TRUE(same_bits(x, dequantize_int8_ref(r, x.size())));
}

TEST(QuantRefInt8, ZeroOrUnderflowingGroupGetsZeroScaleAndZeroCodes) {
  std::vector<float> x(64, 0.0f);
  for (int j = 32; j < 64; ++j) x[j] = (j % 2 ? 1e-9f : -1e-9f);  // 1e-9 / 127 < 2^-25
  const Int8Row r = quantize_int8(quantize_row_int8_ref, x);
  EXPECT_EQ(r.scales[0], 0);
  EXPECT_EQ(r.scales[1], 0);
  EXPECT_TRUE(same_bits(std::vector<int8_t>(64, 0), r.codes));
  for (float y : dequantize_int8_ref(r, 64)) EXPECT_EQ(y, 0.0f);
}

TEST(QuantRefInt8, SubnormalScaleStillQuantizes) {
  std::vector<float> x(32, 0.0f);
  x[0] = 381.0f * 0x1p-24f;  // absmax / 127 = 3 * 2^-24: fp16 subnormal bits 0x0003
  x[1] = -190.0f * 0x1p-24f;
  const Int8Row r = quantize_int8(quantize_row_int8_ref, x);
  EXPECT_EQ(r.scales[0], 0x0003);
  EXPECT_EQ(r.codes[0], 127);
  EXPECT_EQ(r.codes[1], -63);  // -63.33
}

TEST(QuantRefInt8, RowPaddingQuantizesToZeroCodes) {
  std::vector<float> x = normal_values(33, 5);
  const Int8Row r = quantize_int8(quantize_row_int8_ref, x);
  ASSERT_EQ(r.codes.size(), 64u);
  for (size_t i = 33; i < 64; ++i) EXPECT_EQ(r.codes[i], 0) << i;
  // The scale of the last group comes from its one real element.
  EXPECT_EQ(r.scales[1], fp32_to_fp16(std::fabs(x[32]) / 127.0f));
}

// ---- the int4 oracle ----------------------------------------------------------------------

TEST(QuantRefInt4, ScaleIsFp16OfFirstLargestElementOverMinus8) {
  std::vector<float> x(32, 0.1f);
  x[3] = -2.0f;  // first element of largest magnitude
  x[5] = 2.0f;   // ties in magnitude, comes later
  Int4Row r = quantize_int4(quantize_row_int4_ref, x);
  EXPECT_EQ(r.scales[0], fp32_to_fp16(0.25f));
  EXPECT_EQ(r.codes[3] & 0x0f, 0);   // -2 / 0.25 = -8, stored 0
  EXPECT_EQ(r.codes[5] & 0x0f, 15);  // +2 / 0.25 = +8 clamps to 7, stored 15

  std::swap(x[3], x[5]);  // now +2 comes first: d = -0.25 and the signs flip
  r = quantize_int4(quantize_row_int4_ref, x);
  EXPECT_EQ(r.scales[0], fp32_to_fp16(-0.25f));
  EXPECT_EQ(r.codes[3] & 0x0f, 0);   // +2 / -0.25 = -8
  EXPECT_EQ(r.codes[5] & 0x0f, 15);  // -2 / -0.25 = +8 -> 7
  EXPECT_EQ(r.codes[0] & 0x0f, 8);   // 0.1 / -0.25 = -0.4 -> 0, stored 8
}

TEST(QuantRefInt4, ByteJHoldsElementJLowAndElementJPlus16High) {
  // d = 0.5 (m = x[0] = -4). Element j < 16 stores j; element 16 + i stores 15 - i.
  std::vector<float> x(32);
  for (int j = 0; j < 16; ++j) x[j] = 0.5f * static_cast<float>(j - 8);
  for (int i = 0; i < 16; ++i) x[16 + i] = 0.5f * static_cast<float>(7 - i);
  const Int4Row r = quantize_int4(quantize_row_int4_ref, x);
  ASSERT_EQ(r.scales[0], fp32_to_fp16(0.5f));
  for (int j = 0; j < 16; ++j) EXPECT_EQ(r.codes[j], j | ((15 - j) << 4)) << "byte " << j;
  EXPECT_TRUE(same_bits(x, dequantize_int4_ref(r, 32)));
}

TEST(QuantRefInt4, RoundsExactTiesToEven) {
  std::vector<float> x(32, 0.0f);
  x[0] = -1.0f;                                                                     // d = 0.125
  for (int j = 1; j < 16; ++j) x[j] = 0.125f * (static_cast<float>(j - 9) + 0.5f);  // k = -8..6
  const Int4Row r = quantize_int4(quantize_row_int4_ref, x);
  ASSERT_EQ(r.scales[0], fp32_to_fp16(0.125f));
  for (int j = 1; j < 16; ++j) {
    const int k = j - 9;
    EXPECT_EQ((r.codes[j] & 0x0f) - 8, k % 2 == 0 ? k : k + 1) << "k = " << k;
  }
}

TEST(QuantRefInt4, OnGridValuesRoundTripExactly) {
  std::mt19937 rng(12);
  std::uniform_int_distribution<int> code(-8, 7);
  std::vector<float> x(96);
  const float d = 0.375f;
  for (float& v : x) v = d * static_cast<float>(code(rng));
  for (int g = 0; g < 3; ++g) x[g * 32 + 20] = -8.0f * d;  // pins the scale to d
  const Int4Row r = quantize_int4(quantize_row_int4_ref, x);
  EXPECT_TRUE(same_bits(x, dequantize_int4_ref(r, x.size())));
}

TEST(QuantRefInt4, ZeroGroupStoresEightsUnderANegativeZeroScale) {
  // m = +0, d = fp16(0 / -8) = -0: ggml's Q4_0 rule taken literally. Every backend must agree.
  const std::vector<float> x(32, 0.0f);
  const Int4Row r = quantize_int4(quantize_row_int4_ref, x);
  EXPECT_EQ(r.scales[0], 0x8000);
  EXPECT_TRUE(same_bits(std::vector<uint8_t>(16, 0x88), r.codes));
  for (float y : dequantize_int4_ref(r, 32)) EXPECT_EQ(y, 0.0f);
}

TEST(QuantRefInt4, RowPaddingQuantizesToStoredEight) {
  std::vector<float> x = normal_values(33, 6);
  const Int4Row r = quantize_int4(quantize_row_int4_ref, x);
  ASSERT_EQ(r.codes.size(), 32u);
  EXPECT_EQ(r.codes[16] & 0x0f, 0);     // element 32 is its group's m: -8, stored 0
  EXPECT_EQ(r.codes[16] & 0xf0, 0x80);  // element 48 is padding
  for (size_t i = 17; i < 32; ++i) EXPECT_EQ(r.codes[i], 0x88) << i;
}

// ---- accuracy on N(0, 1) (SPEC §3) ---------------------------------------------------------

// SPEC quotes RMSE int8 ~ 0.0054 and int4 ~ 0.086 for N(0, 1), group 32, fp16 scales. An
// independent double-precision simulation of the same rules gives 0.00535 and 0.0859.
TEST(QuantAccuracy, Int8RmseOnStandardNormalMatchesSpec) {
  const std::vector<float> x = normal_values(1'000'000, 2024);
  const auto n = static_cast<int64_t>(x.size());
  Int8Row r = quantize_int8(quantize_row_int8, x);
  std::vector<float> y(x.size());
  dequantize_row_int8(r.scales.data(), r.codes.data(), n, y.data());
  QuantError e;
  e.add(x.data(), y.data(), n);
  std::printf("int8 on N(0,1): rmse %.6f  max_abs %.6f  rel_fro %.6f\n", e.rmse(), e.max_abs,
              e.rel_fro());
  EXPECT_NEAR(e.rmse(), 0.0054, 0.0054 * 0.05);
  EXPECT_NEAR(e.rel_fro(), e.rmse(), e.rmse() * 0.01);  // E x^2 = 1
}

TEST(QuantAccuracy, Int4RmseOnStandardNormalMatchesSpec) {
  const std::vector<float> x = normal_values(1'000'000, 2025);
  const auto n = static_cast<int64_t>(x.size());
  Int4Row r = quantize_int4(quantize_row_int4, x);
  std::vector<float> y(x.size());
  dequantize_row_int4(r.scales.data(), r.codes.data(), n, y.data());
  QuantError e;
  e.add(x.data(), y.data(), n);
  std::printf("int4 on N(0,1): rmse %.6f  max_abs %.6f  rel_fro %.6f\n", e.rmse(), e.max_abs,
              e.rel_fro());
  EXPECT_NEAR(e.rmse(), 0.086, 0.086 * 0.05);
}

// ---- every CPU path equals the oracle, bit for bit ---------------------------------------

class QuantPathTest : public testing::CpuPathTest {};

TEST_P(QuantPathTest, Int8CodesAndScalesEqualTheOracle) {
  uint32_t seed = 100;
  for (Dist dist : kAllDists) {
    for (size_t n : kLengths) {
      const std::vector<float> x = make_values(dist, n, ++seed, DType::kI8);
      const Int8Row want = quantize_int8(quantize_row_int8_ref, x);
      const Int8Row got = quantize_int8(quantize_row_int8, x);
      EXPECT_TRUE(same_bits(want.scales, got.scales)) << dist_name(dist) << " n=" << n;
      EXPECT_TRUE(same_bits(want.codes, got.codes)) << dist_name(dist) << " n=" << n;
    }
  }
}

TEST_P(QuantPathTest, Int4CodesAndScalesEqualTheOracle) {
  uint32_t seed = 200;
  for (Dist dist : kAllDists) {
    for (size_t n : kLengths) {
      const std::vector<float> x = make_values(dist, n, ++seed, DType::kI4);
      const Int4Row want = quantize_int4(quantize_row_int4_ref, x);
      const Int4Row got = quantize_int4(quantize_row_int4, x);
      EXPECT_TRUE(same_bits(want.scales, got.scales)) << dist_name(dist) << " n=" << n;
      EXPECT_TRUE(same_bits(want.codes, got.codes)) << dist_name(dist) << " n=" << n;
    }
  }
}

TEST_P(QuantPathTest, ExactTiesRoundLikeTheOracle) {
  for (DType t : {DType::kI8, DType::kI4}) {
    // 1000 groups, each a random fp16 scale with every element on a tie; also cut mid-group.
    const std::vector<float> x = tie_values(t, 1000, t == DType::kI8 ? 31 : 32);
    for (size_t n : {x.size(), x.size() - 13}) {
      const std::vector<float> row(x.begin(), x.begin() + static_cast<ptrdiff_t>(n));
      if (t == DType::kI8) {
        const Int8Row want = quantize_int8(quantize_row_int8_ref, row);
        const Int8Row got = quantize_int8(quantize_row_int8, row);
        EXPECT_TRUE(same_bits(want.scales, got.scales)) << "int8 n=" << n;
        EXPECT_TRUE(same_bits(want.codes, got.codes)) << "int8 n=" << n;
      } else {
        const Int4Row want = quantize_int4(quantize_row_int4_ref, row);
        const Int4Row got = quantize_int4(quantize_row_int4, row);
        EXPECT_TRUE(same_bits(want.scales, got.scales)) << "int4 n=" << n;
        EXPECT_TRUE(same_bits(want.codes, got.codes)) << "int4 n=" << n;
      }
    }
  }
}

TEST_P(QuantPathTest, PlusAndMinusMaxTieKeepsTheFirstAsTheOracleDoes) {
  std::mt19937 rng(33);
  std::uniform_int_distribution<int> place(0, kQuantGroup - 1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(64 * kQuantGroup);
  for (size_t g = 0; g < 64; ++g) {
    float* group = x.data() + g * kQuantGroup;
    for (int j = 0; j < kQuantGroup; ++j) group[j] = normal(rng);
    const float a = 5.0f + static_cast<float>(g);
    group[place(rng)] = a;
    group[place(rng)] = -a;  // may land on the same place: then only -a remains
  }
  const Int4Row want = quantize_int4(quantize_row_int4_ref, x);
  const Int4Row got = quantize_int4(quantize_row_int4, x);
  EXPECT_TRUE(same_bits(want.scales, got.scales));
  EXPECT_TRUE(same_bits(want.codes, got.codes));
  const Int8Row want8 = quantize_int8(quantize_row_int8_ref, x);
  const Int8Row got8 = quantize_int8(quantize_row_int8, x);
  EXPECT_TRUE(same_bits(want8.scales, got8.scales));
  EXPECT_TRUE(same_bits(want8.codes, got8.codes));
}

TEST_P(QuantPathTest, DequantizationEqualsTheOracle) {
  std::mt19937 rng(44);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_int_distribution<int> half_bits(0, 0xffff);
  for (size_t n : kLengths) {
    const size_t groups = static_cast<size_t>(quant_groups(static_cast<int64_t>(n)));
    // Arbitrary finite fp16 scales of either sign, subnormals and zeros included, and
    // arbitrary code bytes: dequantization has no preconditions beyond finiteness.
    std::vector<uint16_t> scales(groups);
    for (uint16_t& s : scales) {
      do {
        s = static_cast<uint16_t>(half_bits(rng));
      } while ((s & 0x7c00) == 0x7c00);
    }
    if (groups > 2) scales[1] = 0x8000;
    std::vector<int8_t> codes8(groups * 32);
    for (int8_t& c : codes8) c = static_cast<int8_t>(byte(rng) - 128);
    std::vector<uint8_t> codes4(groups * 16);
    for (uint8_t& c : codes4) c = static_cast<uint8_t>(byte(rng));

    std::vector<float> want(n), got(n, -1.0f);
    dequantize_row_int8_ref(scales.data(), codes8.data(), static_cast<int64_t>(n), want.data());
    dequantize_row_int8(scales.data(), codes8.data(), static_cast<int64_t>(n), got.data());
    EXPECT_TRUE(same_bits(want, got)) << "int8 n=" << n;
    dequantize_row_int4_ref(scales.data(), codes4.data(), static_cast<int64_t>(n), want.data());
    dequantize_row_int4(scales.data(), codes4.data(), static_cast<int64_t>(n), got.data());
    EXPECT_TRUE(same_bits(want, got)) << "int4 n=" << n;
  }
}

TEST_P(QuantPathTest, RoundTripOfQuantizedRowsEqualsTheOracle) {
  const std::vector<float> x = make_values(Dist::kMixedScales, 2049, 55, DType::kI4);
  const auto n = static_cast<int64_t>(x.size());
  const Int8Row r8 = quantize_int8(quantize_row_int8, x);
  std::vector<float> got(x.size());
  dequantize_row_int8(r8.scales.data(), r8.codes.data(), n, got.data());
  EXPECT_TRUE(
      same_bits(dequantize_int8_ref(quantize_int8(quantize_row_int8_ref, x), x.size()), got));
  const Int4Row r4 = quantize_int4(quantize_row_int4, x);
  dequantize_row_int4(r4.scales.data(), r4.codes.data(), n, got.data());
  EXPECT_TRUE(
      same_bits(dequantize_int4_ref(quantize_int4(quantize_row_int4_ref, x), x.size()), got));
}

INSTANTIATE_TEST_SUITE_P(CpuPaths, QuantPathTest,
                         ::testing::Values(CpuPath::kScalar, CpuPath::kAvx2),
                         [](const ::testing::TestParamInfo<CpuPath>& param_info) {
                           return std::string(cpu_path_name(param_info.param));
                         });

}  // namespace
}  // namespace trove
