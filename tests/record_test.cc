// Expert records (kernels/record.h): layout offsets worked out by hand, read amplification,
// the oracle's packed bytes, and pack_records/unpack_records equal to the oracle for every
// path and thread count.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "base/half.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/ref/quant_ref.h"
#include "kernels/quant.h"
#include "kernels/record.h"
#include "tests/cpu_path_test.h"

namespace trove {

// Names the path in gtest's failure messages (found by ADL, hence outside the anonymous
// namespace; inline because both test files of this binary define it).
inline void PrintTo(CpuPath path, std::ostream* os) {
  *os << cpu_path_name(path);
}

namespace {

using ::testing::HasSubstr;

constexpr DType kAllDTypes[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kI8, DType::kI4};

RecordLayout layout_of(DType t, int64_t dim, int64_t dim_out, int64_t width = 1,
                       size_t stride_align = 64) {
  Result<RecordLayout> l = RecordLayout::make(t, dim, dim_out, width, stride_align);
  TROVE_CHECK_MSG(l.ok(), "%s", l.status().to_string().c_str());
  return *l;
}

std::vector<float> normal_values(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

// Inputs on which fp32 -> fp16 rounding is delicate: exact ties between fp16 neighbours
// (normal and subnormal), values just past a tie, the overflow boundary, and fp32 values of
// every exponent fp16 can hold or flush.
std::vector<float> hard_f16_values(size_t n, uint32_t seed) {
  std::vector<float> x = {
      1.0f + 0x1p-11f,             // tie: rounds down to 1
      1.0f + 3 * 0x1p-11f,         // tie: rounds up to the even mantissa 2
      1.0f + 0x1p-11f + 0x1p-20f,  // just past a tie: up
      0x1p-25f,                    // half the smallest subnormal: tie to 0
      3 * 0x1p-25f,                // tie between 1 and 2 subnormal units: 2
      0x1p-26f,                    // flushes to 0
      -5 * 0x1p-25f,               // tie between 2 and 3 units: 2
      0x1p-14f - 0x1p-25f,         // largest subnormal region, tie up to the smallest normal
      65504.0f,
      65519.0f,  // both round to the largest finite fp16
      65520.0f,
      -70000.0f,  // overflow to infinity
      0.0f,
      -0.0f,
  };
  std::mt19937 rng(seed);
  std::uniform_int_distribution<uint32_t> mantissa(0, (1u << 23) - 1);
  std::uniform_int_distribution<uint32_t> exponent(127 - 30, 127 + 16);
  std::uniform_int_distribution<uint32_t> sign(0, 1);
  while (x.size() < n) {
    uint32_t m = mantissa(rng);
    if (x.size() % 4 == 0) m = (m & ~0x1fffu) | 0x1000u;  // force an exact fp16 tie
    x.push_back(std::bit_cast<float>((sign(rng) << 31) | (exponent(rng) << 23) | m));
  }
  x.resize(n);
  return x;
}

// ---- layout -------------------------------------------------------------------------------

TEST(RecordLayoutMake, Int4OffsetsFollowScalesThenCodesOrder) {
  // dim 100: 4 groups (8 scale bytes, 64 code bytes per row); dim_out 70: 3 groups (6, 48).
  const RecordLayout l = layout_of(DType::kI4, 100, 70, 3);
  EXPECT_EQ(l.down_scales_offset, 0u);
  EXPECT_EQ(l.up_scales_offset, 24u);
  EXPECT_EQ(l.down_codes_offset, 42u);
  EXPECT_EQ(l.down_row_code_bytes, 64u);
  EXPECT_EQ(l.up_codes_offset, 234u);
  EXPECT_EQ(l.up_row_code_bytes, 48u);
  EXPECT_EQ(l.record_bytes, 378u);
  EXPECT_EQ(l.stride, 384u);
}

TEST(RecordLayoutMake, Int8OffsetsPadRowsToWholeGroups) {
  const RecordLayout l = layout_of(DType::kI8, 100, 70, 2);
  EXPECT_EQ(l.up_scales_offset, 16u);
  EXPECT_EQ(l.down_codes_offset, 28u);
  EXPECT_EQ(l.down_row_code_bytes, 128u);
  EXPECT_EQ(l.up_codes_offset, 284u);
  EXPECT_EQ(l.up_row_code_bytes, 96u);
  EXPECT_EQ(l.record_bytes, 476u);
  EXPECT_EQ(l.stride, 512u);
}

TEST(RecordLayoutMake, FloatFormatsHaveNoScalesAndNoRowPadding) {
  const RecordLayout f32 = layout_of(DType::kF32, 100, 70, 2);
  EXPECT_EQ(f32.up_scales_offset, 0u);
  EXPECT_EQ(f32.down_codes_offset, 0u);
  EXPECT_EQ(f32.down_row_code_bytes, 400u);
  EXPECT_EQ(f32.up_codes_offset, 800u);
  EXPECT_EQ(f32.record_bytes, 1360u);
  EXPECT_EQ(f32.stride, 1408u);
  for (DType t : {DType::kF16, DType::kBF16}) {
    const RecordLayout l = layout_of(t, 33, 17);
    EXPECT_EQ(l.down_codes_offset, 0u);
    EXPECT_EQ(l.up_codes_offset, 66u);
    EXPECT_EQ(l.up_row_code_bytes, 34u);
    EXPECT_EQ(l.record_bytes, 100u);
    EXPECT_EQ(l.stride, 128u);
  }
}

TEST(RecordLayoutMake, StrideRoundsUpToTheRequestedAlignment) {
  // D = 2048 int4: 128 + 128 scale bytes + 1024 + 1024 code bytes.
  EXPECT_EQ(layout_of(DType::kI4, 2048, 2048).record_bytes, 2304u);
  EXPECT_EQ(layout_of(DType::kI4, 2048, 2048).stride, 2304u);
  EXPECT_EQ(layout_of(DType::kI4, 2048, 2048, 1, 512).stride, 2560u);
  EXPECT_EQ(layout_of(DType::kI4, 2048, 2048, 1, 4096).stride, 4096u);
  EXPECT_EQ(layout_of(DType::kI8, 1, 1).record_bytes, 68u);  // 2 + 2 scale, 32 + 32 code bytes
  EXPECT_EQ(layout_of(DType::kI8, 1, 1).stride, 128u);
}

TEST(RecordLayoutMake, RejectsBadArgumentsNamingTheValue) {
  const auto message_of = [](Result<RecordLayout> r) {
    EXPECT_FALSE(r.ok());
    EXPECT_TRUE(r.status().is_invalid_argument());
    return r.status().message();
  };
  EXPECT_THAT(message_of(RecordLayout::make(DType::kI4, 0, 8)), HasSubstr("dim must"));
  EXPECT_THAT(message_of(RecordLayout::make(DType::kI4, 0, 8)), HasSubstr("got 0"));
  EXPECT_THAT(message_of(RecordLayout::make(DType::kI4, 8, -3)), HasSubstr("dim_out"));
  EXPECT_THAT(message_of(RecordLayout::make(DType::kI4, 8, -3)), HasSubstr("got -3"));
  EXPECT_THAT(message_of(RecordLayout::make(DType::kI8, 8, 8, 0)), HasSubstr("width"));
  EXPECT_THAT(message_of(RecordLayout::make(DType::kF32, 8, 8, 1, 100)),
              HasSubstr("stride_align must be a power of two >= 64 (got 100)"));
  EXPECT_THAT(message_of(RecordLayout::make(DType::kF32, 8, 8, 1, 32)), HasSubstr("got 32"));
  EXPECT_THAT(message_of(RecordLayout::make(DType::kF32, int64_t{1} << 31, 8)),
              HasSubstr("got 2147483648"));
  EXPECT_THAT(message_of(RecordLayout::make(DType::kF32, 1 << 30, 1 << 30, 1 << 20)),
              HasSubstr("1 TiB"));
}

// ---- read amplification -------------------------------------------------------------------

RecordLayout bare_layout(size_t record_bytes, size_t stride) {
  RecordLayout l;
  l.record_bytes = record_bytes;
  l.stride = stride;
  return l;
}

TEST(RecordReadAmplification, PageSizedRecordsAtPageAlignmentReadNothingExtra) {
  const RecordLayout l = layout_of(DType::kF32, 512, 512, 1, 4096);  // exactly 4096 bytes
  ASSERT_EQ(l.record_bytes, 4096u);
  EXPECT_DOUBLE_EQ(l.read_amplification(4096), 1.0);
  EXPECT_DOUBLE_EQ(l.read_amplification(512), 1.0);
  // At byte alignment only the stride padding is read in excess.
  const RecordLayout padded = layout_of(DType::kI4, 100, 70, 3);
  EXPECT_DOUBLE_EQ(padded.read_amplification(1),
                   static_cast<double>(padded.stride) / static_cast<double>(padded.record_bytes));
}

TEST(RecordReadAmplification, MatchesHandComputedSmallCases) {
  // Every record starts aligned and reads 128 bytes for 100 useful ones.
  EXPECT_DOUBLE_EQ(bare_layout(100, 128).read_amplification(64), 1.28);
  // Period 2: [0, 192) reads [0, 256); [192, 384) reads [128, 384). 256 / 192 each.
  EXPECT_DOUBLE_EQ(bare_layout(192, 192).read_amplification(128), 256.0 / 192.0);
  // 64-byte records never cross a page, and each costs a whole page.
  EXPECT_DOUBLE_EQ(bare_layout(64, 64).read_amplification(4096), 64.0);
  // Period 4 at align 256, stride 192: starts 0, 192, 128, 64 (mod 256) end at 192, 384, 320,
  // 256, so the reads are 256, 512, 512, 256 bytes: 1536 for 768 useful.
  EXPECT_DOUBLE_EQ(bare_layout(192, 192).read_amplification(256), 2.0);
}

TEST(RecordReadAmplification, MatchesTheClosedFormAtPageAlignment) {
  // A record read alone costs stride + 4096 - gcd(stride, 4096) bytes on average
  // (storage/FORMAT.md).
  EXPECT_DOUBLE_EQ(bare_layout(4096, 4096).read_amplification(4096), 1.0);
  EXPECT_DOUBLE_EQ(bare_layout(2304, 2304).read_amplification(4096), 6144.0 / 2304.0);
  EXPECT_DOUBLE_EQ(bare_layout(2304, 4096).read_amplification(4096), 4096.0 / 2304.0);
  EXPECT_DOUBLE_EQ(bare_layout(170, 192).read_amplification(4096), 4224.0 / 170.0);
  EXPECT_DOUBLE_EQ(bare_layout(256, 256).read_amplification(4096), 16.0);
}

TEST(RecordReadAmplification, EqualsTheAverageOverALongTable) {
  for (const RecordLayout& l :
       {layout_of(DType::kI4, 2048, 2048), layout_of(DType::kI8, 100, 70, 3),
        layout_of(DType::kBF16, 1000, 333, 2, 128)}) {
    for (uint64_t align : {512u, 4096u}) {
      // 8192 records cover a whole number of periods (a period divides align / 64 here).
      uint64_t fetched = 0;
      for (uint64_t i = 0; i < 8192; ++i) {
        const uint64_t start = i * l.stride;
        const uint64_t end = start + l.stride;
        fetched += (end + align - 1) / align * align - start / align * align;
      }
      const double want =
          static_cast<double>(fetched) / (8192.0 * static_cast<double>(l.record_bytes));
      EXPECT_NEAR(l.read_amplification(align), want, 1e-12)
          << "record " << l.record_bytes << " stride " << l.stride << " align " << align;
    }
  }
}

// ---- the oracle's packed bytes ------------------------------------------------------------

struct Expert {
  std::vector<float> down;  // [width][dim]
  std::vector<float> up;    // [width][dim_out]
};

Expert random_expert(const RecordLayout& l, uint32_t seed) {
  return {normal_values(static_cast<size_t>(l.width * l.dim), seed),
          normal_values(static_cast<size_t>(l.width * l.dim_out), seed + 1)};
}

// The bytes one row contributes, from the row oracles: scales then codes.
std::vector<uint8_t> row_bytes(DType t, const float* x, int64_t n, bool want_scales) {
  std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(n)));
  std::vector<uint8_t> codes(row_code_bytes(t, n));
  if (t == DType::kI8) {
    quantize_row_int8_ref(x, n, scales.data(), reinterpret_cast<int8_t*>(codes.data()));
  } else if (t == DType::kI4) {
    quantize_row_int4_ref(x, n, scales.data(), codes.data());
  } else {
    convert_row_ref(t, x, n, codes.data());
  }
  if (!want_scales) return codes;
  std::vector<uint8_t> bytes(row_scale_bytes(t, n));
  if (!bytes.empty()) std::memcpy(bytes.data(), scales.data(), bytes.size());
  return bytes;
}

std::vector<uint8_t> slice(const std::vector<uint8_t>& v, size_t offset, size_t size) {
  return {v.begin() + static_cast<ptrdiff_t>(offset),
          v.begin() + static_cast<ptrdiff_t>(offset + size)};
}

TEST(RecordPackRef, PlacesEachRowsScalesAndCodesAtTheLayoutOffsets) {
  for (DType t : kAllDTypes) {
    const RecordLayout l = layout_of(t, 100, 70, 3);
    const Expert e = random_expert(l, 7);
    std::vector<uint8_t> record(l.stride, 0xab);
    pack_record_ref(l, e.down.data(), e.up.data(), record.data());
    const size_t ds = row_scale_bytes(t, l.dim);
    const size_t us = row_scale_bytes(t, l.dim_out);
    for (int64_t r = 0; r < l.width; ++r) {
      const auto ur = static_cast<size_t>(r);
      const float* down = e.down.data() + r * l.dim;
      const float* up = e.up.data() + r * l.dim_out;
      EXPECT_EQ(slice(record, l.down_scales_offset + ur * ds, ds), row_bytes(t, down, l.dim, true))
          << dtype_name(t) << " down scales, row " << r;
      EXPECT_EQ(slice(record, l.up_scales_offset + ur * us, us), row_bytes(t, up, l.dim_out, true))
          << dtype_name(t) << " up scales, row " << r;
      EXPECT_EQ(
          slice(record, l.down_codes_offset + ur * l.down_row_code_bytes, l.down_row_code_bytes),
          row_bytes(t, down, l.dim, false))
          << dtype_name(t) << " down codes, row " << r;
      EXPECT_EQ(slice(record, l.up_codes_offset + ur * l.up_row_code_bytes, l.up_row_code_bytes),
                row_bytes(t, up, l.dim_out, false))
          << dtype_name(t) << " up codes, row " << r;
    }
    EXPECT_EQ(slice(record, l.record_bytes, l.stride - l.record_bytes),
              std::vector<uint8_t>(l.stride - l.record_bytes, 0))
        << dtype_name(t) << ": padding must be zero";
  }
}

TEST(RecordPackRef, F32RecordsRoundTripExactly) {
  const RecordLayout l = layout_of(DType::kF32, 45, 77, 2);
  const Expert e = random_expert(l, 9);
  std::vector<uint8_t> record(l.stride);
  pack_record_ref(l, e.down.data(), e.up.data(), record.data());
  Expert back{std::vector<float>(e.down.size()), std::vector<float>(e.up.size())};
  unpack_record_ref(l, record.data(), back.down.data(), back.up.data());
  EXPECT_EQ(back.down, e.down);
  EXPECT_EQ(back.up, e.up);
}

TEST(RecordPackRef, RoundTripEqualsTheRowOracles) {
  for (DType t : {DType::kF16, DType::kBF16, DType::kI8, DType::kI4}) {
    const RecordLayout l = layout_of(t, 100, 70, 3);
    const Expert e = random_expert(l, 13);
    std::vector<uint8_t> record(l.stride);
    pack_record_ref(l, e.down.data(), e.up.data(), record.data());
    Expert back{std::vector<float>(e.down.size()), std::vector<float>(e.up.size())};
    unpack_record_ref(l, record.data(), back.down.data(), back.up.data());

    // Expected: each row through the row quantizer and dequantizer (or conversion) alone.
    const auto expect_row = [&](const float* x, int64_t n) {
      std::vector<float> y(static_cast<size_t>(n));
      std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(n)));
      std::vector<uint8_t> codes(row_code_bytes(t, n));
      if (t == DType::kI8) {
        auto* c = reinterpret_cast<int8_t*>(codes.data());
        quantize_row_int8_ref(x, n, scales.data(), c);
        dequantize_row_int8_ref(scales.data(), c, n, y.data());
      } else if (t == DType::kI4) {
        quantize_row_int4_ref(x, n, scales.data(), codes.data());
        dequantize_row_int4_ref(scales.data(), codes.data(), n, y.data());
      } else {
        for (int64_t i = 0; i < n; ++i) {
          y[static_cast<size_t>(i)] = t == DType::kF16 ? fp16_to_fp32(fp32_to_fp16(x[i]))
                                                       : bf16_to_fp32(fp32_to_bf16(x[i]));
        }
      }
      return y;
    };
    std::vector<float> want_down, want_up;
    for (int64_t r = 0; r < l.width; ++r) {
      const std::vector<float> d = expect_row(e.down.data() + r * l.dim, l.dim);
      const std::vector<float> u = expect_row(e.up.data() + r * l.dim_out, l.dim_out);
      want_down.insert(want_down.end(), d.begin(), d.end());
      want_up.insert(want_up.end(), u.begin(), u.end());
    }
    EXPECT_EQ(back.down, want_down) << dtype_name(t);
    EXPECT_EQ(back.up, want_up) << dtype_name(t);

    QuantError err;
    err.add(e.down.data(), back.down.data(), static_cast<int64_t>(e.down.size()));
    err.add(e.up.data(), back.up.data(), static_cast<int64_t>(e.up.size()));
    EXPECT_LT(err.rel_fro(), t == DType::kI4 ? 0.15 : 0.01) << dtype_name(t);
  }
}

// ---- pack_records / unpack_records: every path and thread count equals the oracle --------

class RecordPathTest : public testing::CpuPathTest {};

struct Table {
  std::vector<float> down;  // [count][width][dim]
  std::vector<float> up;    // [count][width][dim_out]
};

Table random_table(const RecordLayout& l, int64_t count, uint32_t seed) {
  Table t{normal_values(static_cast<size_t>(count * l.width * l.dim), seed),
          normal_values(static_cast<size_t>(count * l.width * l.dim_out), seed + 1)};
  if (l.dtype == DType::kF16) {  // make the F16C conversion earn its keep
    const std::vector<float> hard = hard_f16_values(t.down.size(), seed + 2);
    t.down = hard;
  }
  return t;
}

std::vector<uint8_t> pack_with_oracle(const RecordLayout& l, const Table& t, int64_t count) {
  std::vector<uint8_t> records(static_cast<size_t>(count) * l.stride, 0xcd);
  for (int64_t e = 0; e < count; ++e) {
    pack_record_ref(l, t.down.data() + e * l.width * l.dim, t.up.data() + e * l.width * l.dim_out,
                    records.data() + static_cast<size_t>(e) * l.stride);
  }
  return records;
}

TEST_P(RecordPathTest, PackRecordsEqualsTheOracleForAnyThreadCount) {
  constexpr int64_t kCount = 7;  // not a multiple of 3 threads
  for (DType t : kAllDTypes) {
    for (const RecordLayout& l : {layout_of(t, 100, 45, 2), layout_of(t, 2048, 64, 1, 4096)}) {
      const Table table = random_table(l, kCount, 21);
      const std::vector<uint8_t> want = pack_with_oracle(l, table, kCount);
      for (int threads : {1, 3, 0}) {
        std::vector<uint8_t> got(want.size(), 0xee);  // padding must be overwritten with zeros
        pack_records(l, table.down.data(), table.up.data(), kCount, got.data(), threads);
        EXPECT_TRUE(got == want) << dtype_name(t) << " dim " << l.dim << " threads " << threads;
      }
    }
  }
}

TEST_P(RecordPathTest, UnpackRecordsEqualsTheOracleForAnyThreadCount) {
  constexpr int64_t kCount = 7;
  for (DType t : kAllDTypes) {
    const RecordLayout l = layout_of(t, 100, 45, 2);
    const std::vector<uint8_t> records = pack_with_oracle(l, random_table(l, kCount, 31), kCount);
    Table want{std::vector<float>(static_cast<size_t>(kCount * l.width * l.dim)),
               std::vector<float>(static_cast<size_t>(kCount * l.width * l.dim_out))};
    for (int64_t e = 0; e < kCount; ++e) {
      unpack_record_ref(l, records.data() + static_cast<size_t>(e) * l.stride,
                        want.down.data() + e * l.width * l.dim,
                        want.up.data() + e * l.width * l.dim_out);
    }
    for (int threads : {1, 3}) {
      Table got{std::vector<float>(want.down.size(), -1.0f),
                std::vector<float>(want.up.size(), -1.0f)};
      unpack_records(l, records.data(), kCount, got.down.data(), got.up.data(), threads);
      // Bitwise: NaN never appears, and -0 must stay -0.
      EXPECT_EQ(0, std::memcmp(got.down.data(), want.down.data(), want.down.size() * 4))
          << dtype_name(t) << " threads " << threads;
      EXPECT_EQ(0, std::memcmp(got.up.data(), want.up.data(), want.up.size() * 4))
          << dtype_name(t) << " threads " << threads;
    }
  }
}

TEST_P(RecordPathTest, F16ConversionMatchesSoftwareRoundingOnHardValues) {
  const std::vector<float> x = hard_f16_values(10'007, 41);
  const auto n = static_cast<int64_t>(x.size());
  const RecordLayout l = layout_of(DType::kF16, n, 1);
  const std::vector<float> up = {0.5f};
  std::vector<uint8_t> record(l.stride);
  pack_records(l, x.data(), up.data(), 1, record.data(), 1);
  std::vector<uint8_t> want(static_cast<size_t>(n) * 2);
  convert_row_ref(DType::kF16, x.data(), n, want.data());
  EXPECT_EQ(slice(record, 0, want.size()), want);

  std::vector<float> back(x.size()), back_up(1), want_back(x.size());
  unpack_records(l, record.data(), 1, back.data(), back_up.data(), 1);
  unconvert_row_ref(DType::kF16, want.data(), n, want_back.data());
  EXPECT_EQ(0, std::memcmp(back.data(), want_back.data(), back.size() * 4));
}

TEST_P(RecordPathTest, MoreThreadsThanRecordsAndEmptyTablesAreFine) {
  const RecordLayout l = layout_of(DType::kI4, 33, 65);
  const Table table = random_table(l, 2, 51);
  const std::vector<uint8_t> want = pack_with_oracle(l, table, 2);
  std::vector<uint8_t> got(want.size());
  pack_records(l, table.down.data(), table.up.data(), 2, got.data(), 16);
  EXPECT_TRUE(got == want);
  pack_records(l, table.down.data(), table.up.data(), 0, got.data(), 4);  // writes nothing
  unpack_records(l, got.data(), 0, nullptr, nullptr, 4);
  EXPECT_TRUE(got == want);
}

INSTANTIATE_TEST_SUITE_P(CpuPaths, RecordPathTest,
                         ::testing::Values(CpuPath::kScalar, CpuPath::kAvx2),
                         [](const ::testing::TestParamInfo<CpuPath>& param_info) {
                           return std::string(cpu_path_name(param_info.param));
                         });

}  // namespace
}  // namespace trove
