// The CUDA backend against the CPU oracles (kernels/cpu/ref/quant_ref.h), bit for bit.
// Tests that need a GPU skip with a message when none is present; the ones that check the
// no-device path and argument validation run everywhere.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/ref/quant_ref.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/quant.h"

namespace trove {
namespace {

// Rows of random codes and scales in the CPU layout, with the oracle's dequantization.
struct QuantRows {
  int64_t rows = 0;
  int64_t n = 0;
  std::vector<uint16_t> scales;
  std::vector<uint8_t> codes;
  std::vector<float> expected;
};

int64_t bytes_per_group(DType dtype) {
  return dtype == DType::kI8 ? kQuantGroup : kQuantGroup / 2;
}

// A random finite fp16 bit pattern; one in four is one of the edge cases.
uint16_t random_scale(std::mt19937_64& rng) {
  static constexpr uint16_t kEdges[] = {
      0x0000, 0x8000,  // +0, -0
      0x0001, 0x8001,  // smallest subnormals
      0x03FF, 0x83FF,  // largest subnormals
      0x0400, 0x8400,  // smallest normals
      0x3C00, 0xBC00,  // +1, -1
      0x7BFF, 0xFBFF,  // +-65504, the largest finite
  };
  if (rng() % 4 == 0) return kEdges[rng() % std::size(kEdges)];
  for (;;) {
    const auto bits = static_cast<uint16_t>(rng());
    if ((bits & 0x7C00) != 0x7C00) return bits;  // not inf or NaN
  }
}

QuantRows make_rows(DType dtype, int64_t rows, int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  QuantRows q;
  q.rows = rows;
  q.n = n;
  const int64_t groups = quant_groups(n);
  q.scales.resize(static_cast<size_t>(rows * groups));
  q.codes.resize(static_cast<size_t>(rows * groups * bytes_per_group(dtype)));
  q.expected.resize(static_cast<size_t>(rows * n));
  for (auto& s : q.scales) s = random_scale(rng);
  for (auto& c : q.codes) c = static_cast<uint8_t>(rng());
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* scales = q.scales.data() + r * groups;
    const uint8_t* codes = q.codes.data() + r * groups * bytes_per_group(dtype);
    float* y = q.expected.data() + r * n;
    if (dtype == DType::kI8) {
      dequantize_row_int8_ref(scales, reinterpret_cast<const int8_t*>(codes), n, y);
    } else {
      dequantize_row_int4_ref(scales, codes, n, y);
    }
  }
  return q;
}

// Index of the first element whose bits differ, or -1.
int64_t first_difference(const std::vector<float>& a, const std::vector<float>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return static_cast<int64_t>(i);
  }
  return -1;
}

void expect_matches_reference(DType dtype) {
  // (rows, n): single elements, one short of / exactly / one past a group, a long odd row,
  // and one large enough (> 4096 blocks * 256 threads) to take the kernel's grid-stride loop.
  const struct {
    int64_t rows, n;
  } kShapes[] = {{1, 1},  {3, 1},    {1, 31},   {2, 32},  {5, 33},
                 {7, 64}, {4, 2049}, {1, 4096}, {37, 95}, {513, 2049}};
  uint64_t seed = 1234;
  for (const auto& shape : kShapes) {
    SCOPED_TRACE(std::string(dtype_name(dtype)) + " rows=" + std::to_string(shape.rows) +
                 " n=" + std::to_string(shape.n));
    const QuantRows q = make_rows(dtype, shape.rows, shape.n, ++seed);
    std::vector<float> got(q.expected.size(), -1.0f);
    const Status s =
        cuda_dequantize_rows(dtype, q.scales.data(), q.codes.data(), q.rows, q.n, got.data());
    ASSERT_TRUE(s.ok()) << s.to_string();
    const int64_t i = first_difference(got, q.expected);
    EXPECT_EQ(i, -1) << "element " << i << " (row " << i / q.n << ", col " << i % q.n << "): cuda "
                     << got[static_cast<size_t>(i)] << " vs ref "
                     << q.expected[static_cast<size_t>(i)];
  }
}

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) {
      GTEST_SKIP() << "no CUDA device: cuda_device_count() is 0 (no driver or no GPU); the "
                      "CUDA kernels are compiled but not run";
    }
  }
};

TEST_F(CudaTest, DeviceHasAName) {
  const Result<std::string> name = cuda_device_name(0);
  ASSERT_TRUE(name.ok()) << name.status().to_string();
  EXPECT_FALSE(name->empty());
}

TEST_F(CudaTest, Int8DequantizationEqualsReferenceBitForBit) {
  expect_matches_reference(DType::kI8);
}

TEST_F(CudaTest, Int4DequantizationEqualsReferenceBitForBit) {
  expect_matches_reference(DType::kI4);
}

// The nibble order spelled out by hand, independent of the oracle: byte j holds element j
// low and element j + 16 high, each stored as q + 8.
TEST_F(CudaTest, Int4UsesGgmlNibbleOrder) {
  const uint16_t scale = 0x4000;         // 2.0
  std::vector<uint8_t> codes(16, 0x88);  // every q = 0
  codes[0] = 0x1F;                       // element 0: 15 - 8 = 7; element 16: 1 - 8 = -7
  codes[15] = 0x09;                      // element 15: 9 - 8 = 1; element 31: 0 - 8 = -8
  std::vector<float> y(32, -1.0f);
  ASSERT_TRUE(cuda_dequantize_rows(DType::kI4, &scale, codes.data(), 1, 32, y.data()).ok());
  EXPECT_EQ(y[0], 14.0f);
  EXPECT_EQ(y[16], -14.0f);
  EXPECT_EQ(y[15], 2.0f);
  EXPECT_EQ(y[31], -16.0f);
  EXPECT_EQ(y[1], 0.0f);
}

TEST_F(CudaTest, EmptyInputIsANoOp) {
  EXPECT_TRUE(cuda_dequantize_rows(DType::kI8, nullptr, nullptr, 0, 32, nullptr).ok());
  EXPECT_TRUE(cuda_dequantize_rows(DType::kI4, nullptr, nullptr, 5, 0, nullptr).ok());
}

// Runs with or without a GPU.
TEST(CudaBackendTest, DeviceCountNeverFailsAndNoDeviceIsAClearError) {
  const int count = cuda_device_count();
  ASSERT_GE(count, 0);
  EXPECT_FALSE(cuda_device_name(count).ok());
  EXPECT_FALSE(cuda_device_name(-1).ok());
  if (count > 0) GTEST_SKIP() << "a CUDA device is present; the no-device path is not reachable";

  const uint16_t scale = 0x3C00;
  const int8_t codes[32] = {};
  float y[32];
  const Status s =
      cuda_dequantize_rows(DType::kI8, &scale, reinterpret_cast<const uint8_t*>(codes), 1, 32, y);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("no CUDA device is available"), std::string::npos) << s.to_string();
  EXPECT_EQ(s.code(), Status::Code::kNotSupported);
}

// Argument checks come before any device work, so they run everywhere.
TEST(CudaBackendTest, RejectsBadArguments) {
  const uint16_t scale = 0x3C00;
  const uint8_t codes[32] = {};
  float y[32];
  const auto expect_invalid = [](const Status& s, const char* mentions) {
    EXPECT_TRUE(s.is_invalid_argument()) << s.to_string();
    EXPECT_NE(s.message().find(mentions), std::string::npos) << s.to_string();
  };
  expect_invalid(cuda_dequantize_rows(DType::kF32, &scale, codes, 1, 32, y), "f32");
  expect_invalid(cuda_dequantize_rows(DType::kBF16, &scale, codes, 1, 32, y), "bf16");
  expect_invalid(cuda_dequantize_rows(DType::kI8, &scale, codes, -1, 32, y), "non-negative");
  expect_invalid(cuda_dequantize_rows(DType::kI4, &scale, codes, 1, -5, y), "non-negative");
  expect_invalid(cuda_dequantize_rows(DType::kI8, nullptr, codes, 1, 32, y), "scales");
  expect_invalid(cuda_dequantize_rows(DType::kI4, &scale, nullptr, 1, 32, y), "codes");
  expect_invalid(cuda_dequantize_rows(DType::kI8, &scale, codes, 1, 32, nullptr), "out");

  const Status too_big = cuda_dequantize_rows(DType::kI8, &scale, codes, int64_t{1} << 40, 4096, y);
  EXPECT_EQ(too_big.code(), Status::Code::kOutOfRange) << too_big.to_string();
}

}  // namespace
}  // namespace trove
