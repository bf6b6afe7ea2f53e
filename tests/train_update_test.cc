// The int4 training view and its stochastic-rounding update (kernels/train.h, SPEC §3, §7):
// the oracle checked against the rules and the SPEC §7 figures, then the CPU kernels checked
// bit for bit against the oracle at many shapes and thread counts.
//
// LSB units: "code LSB" is one step of the 8-bit training code, d/16; "int4 LSB" is one step
// of the served int4 value, d.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "base/half.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/ref/quant_ref.h"
#include "kernels/cpu/ref/train_ref.h"
#include "kernels/cpu/train.h"
#include "kernels/quant.h"
#include "kernels/record.h"
#include "kernels/train.h"
#include "tests/cpu_path_test.h"
#include "tests/train_test_util.h"

namespace trove {
namespace {

using ::testing::HasSubstr;

using testing::adagrad;
using testing::layout_of;
using testing::normal;
using testing::random_training_records;
using testing::Row;
using testing::row_of;
using testing::sgd;

// ---- the training view ---------------------------------------------------------------------

TEST(TrainView, ExportRoundsToNearestTiesUpAndClamps) {
  EXPECT_EQ(train_code_to_int4(0), 0);
  EXPECT_EQ(train_code_to_int4(7), 0);
  EXPECT_EQ(train_code_to_int4(8), 1);  // half an int4 LSB rounds up
  EXPECT_EQ(train_code_to_int4(-8), 0);
  EXPECT_EQ(train_code_to_int4(-9), -1);
  EXPECT_EQ(train_code_to_int4(-128), -8);
  EXPECT_EQ(train_code_to_int4(119), 7);
  EXPECT_EQ(train_code_to_int4(120), 7);  // (128 >> 4) = 8, clamped
  EXPECT_EQ(train_code_to_int4(127), 7);
  for (int q = -8; q <= 7; ++q) EXPECT_EQ(train_code_to_int4(int4_to_train_code(q)), q);
}

TEST(TrainView, ImportThenExportReturnsTheServingBytes) {
  std::mt19937 rng(11);
  const int64_t shapes[][3] = {{32, 32, 1}, {45, 70, 3}, {1, 1, 1}, {100, 33, 2}, {257, 31, 1}};
  for (const auto& s : shapes) {
    const RecordLayout serving = layout_of(DType::kI4, s[0], s[1], s[2]);
    const RecordLayout training = layout_of(DType::kI8, s[0], s[1], s[2]);
    const int64_t count = 5;
    std::vector<uint8_t> served(static_cast<size_t>(count) * serving.stride);
    for (int64_t i = 0; i < count; ++i) {
      auto down = normal(static_cast<size_t>(s[0] * s[2]), 1.0f, rng);
      auto up = normal(static_cast<size_t>(s[1] * s[2]), 1.0f, rng);
      if (i == 1) std::fill(down.begin(), down.end(), 0.0f);  // zero scales
      pack_record_ref(serving, down.data(), up.data(), served.data() + i * serving.stride);
    }
    std::vector<uint8_t> trained_ref(static_cast<size_t>(count) * training.stride);
    std::vector<uint8_t> back_ref(served.size());
    for (int64_t i = 0; i < count; ++i) {
      ASSERT_TRUE(train_import_record_ref(serving, training, served.data() + i * serving.stride,
                                          trained_ref.data() + i * training.stride)
                      .ok());
      ASSERT_TRUE(train_export_record_ref(serving, training,
                                          trained_ref.data() + i * training.stride,
                                          back_ref.data() + i * serving.stride)
                      .ok());
    }
    EXPECT_EQ(back_ref, served) << "shape " << s[0] << "x" << s[1] << "x" << s[2];
    for (int threads : {1, 3}) {
      std::vector<uint8_t> trained(trained_ref.size(), 0xab), back(served.size(), 0xcd);
      ASSERT_TRUE(
          train_import_records(serving, training, served.data(), count, trained.data(), threads)
              .ok());
      ASSERT_TRUE(
          train_export_records(serving, training, trained.data(), count, back.data(), threads)
              .ok());
      EXPECT_EQ(trained, trained_ref);
      EXPECT_EQ(back, served);
    }
    // Same weights: the training view's b·d/16 is the int4 value q·d, exactly.
    for (int64_t i = 0; i < count; ++i) {
      std::vector<float> d4(static_cast<size_t>(s[0] * s[2])), u4(static_cast<size_t>(s[1] * s[2]));
      std::vector<float> d8(d4.size()), u8(u4.size());
      unpack_record_ref(serving, served.data() + i * serving.stride, d4.data(), u4.data());
      unpack_record_ref(training, trained_ref.data() + i * training.stride, d8.data(), u8.data());
      for (size_t j = 0; j < d4.size(); ++j) ASSERT_EQ(d8[j], 16.0f * d4[j]);
      for (size_t j = 0; j < u4.size(); ++j) ASSERT_EQ(u8[j], 16.0f * u4[j]);
    }
  }
}

TEST(TrainView, MismatchedLayoutsAreRejected) {
  const RecordLayout i4 = layout_of(DType::kI4, 64, 32, 1);
  const RecordLayout i8 = layout_of(DType::kI8, 64, 32, 1);
  const RecordLayout i8_other = layout_of(DType::kI8, 64, 33, 1);
  std::vector<uint8_t> buf(4096);
  std::vector<uint8_t> out(4096);
  EXPECT_THAT(check_train_layouts(i4, i8_other).message(), HasSubstr("differ in shape"));
  EXPECT_THAT(check_train_layouts(i8, i8).message(), HasSubstr("must be int4"));
  EXPECT_THAT(check_train_layouts(i4, i4).message(), HasSubstr("must be int8"));
  EXPECT_FALSE(train_import_record_ref(i4, i8_other, buf.data(), out.data()).ok());
  EXPECT_FALSE(train_import_records(i4, i8_other, buf.data(), 1, out.data()).ok());
  EXPECT_FALSE(train_export_records(i8, i8, buf.data(), 1, out.data()).ok());
  const int64_t expert = 0;
  std::vector<float> g(200, 0.0f);
  auto r = train_update_records(i4, sgd(0.1f), &expert, 1, g.data(), g.data(), buf.data(), nullptr);
  EXPECT_THAT(r.status().message(), HasSubstr("must be int8"));
}

// ---- the hash -------------------------------------------------------------------------------

TEST(SrUniform, IsPinnedAcrossPlatforms) {
  // These bits are the definition every backend reproduces; they must never change.
  constexpr float kTwo24 = 16777216.0f;  // u · 2^24 is the integer h >> 40
  static_assert(sr_prefix(0, 0, 0, 0) == 0x1957a7604e215178ull);
  EXPECT_EQ(sr_uniform(0, 0, 0, 0, 0) * kTwo24, 5582208.0f);
  EXPECT_EQ(sr_uniform(1, 2, 3, 4, 5) * kTwo24, 7888724.0f);
  EXPECT_EQ(sr_uniform(0x5eed, 1000, 7, 123456, 99) * kTwo24, 9193929.0f);
  EXPECT_EQ(sr_uniform_from_prefix(sr_prefix(1, 2, 3, 4), 5), sr_uniform(1, 2, 3, 4, 5));
}

TEST(SrUniform, ChangingAnyOneInputChangesU) {
  std::mt19937_64 rng(5);
  int same = 0;
  float sum = 0.0f;
  for (int t = 0; t < 2000; ++t) {
    uint64_t in[5] = {rng(), rng() % 100000, rng() % 64, rng() % (1u << 20), rng() % 100000};
    const float u = sr_uniform(in[0], in[1], static_cast<uint32_t>(in[2]), in[3], in[4]);
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    sum += u;
    for (int k = 0; k < 5; ++k) {
      uint64_t v[5] = {in[0], in[1], in[2], in[3], in[4]};
      v[k] += 1;
      same += sr_uniform(v[0], v[1], static_cast<uint32_t>(v[2]), v[3], v[4]) == u ? 1 : 0;
    }
    // The rescale counters of an element differ from every update counter.
    same += sr_uniform(in[0], in[1], static_cast<uint32_t>(in[2]), in[3],
                       sr_rescale_element(in[4], 1)) == u
                ? 1
                : 0;
  }
  EXPECT_EQ(same, 0);  // a 24-bit collision has probability ~ 12000 / 2^24
  EXPECT_NEAR(sum / 2000.0f, 0.5f, 0.03f);
}

// ---- the update: SPEC §7 checks (on the oracle, the definition) --------------------------------

TEST(TrainUpdate, ZeroGradientLeavesRecordsAndAccumulatorsByteIdentical) {
  std::mt19937 rng(21);
  const RecordLayout l = layout_of(DType::kI8, 45, 70, 3);
  const int64_t count = 6;
  const auto recs = random_training_records(l, count, rng);
  std::vector<float> down(static_cast<size_t>(count * 3 * 45), 0.0f);
  std::vector<float> up(static_cast<size_t>(count * 3 * 70), -0.0f);
  std::vector<int64_t> experts = {0, 1, 2, 3, 4, 5};
  for (const TrainStep& st : {sgd(0.5f), adagrad(0.5f)}) {
    std::vector<float> acc(static_cast<size_t>(count * 6), 0.25f);
    const auto acc0 = acc;
    auto a = recs;
    auto r = train_update_records_ref(l, st, experts.data(), count, down.data(), up.data(),
                                      a.data(), acc.data());
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_EQ(a, recs);
    EXPECT_EQ(acc, acc0);
    EXPECT_EQ(*r, TrainStats{});
    auto b = recs;
    auto c = train_update_records(l, st, experts.data(), count, down.data(), up.data(), b.data(),
                                  acc.data(), 2);
    ASSERT_TRUE(c.ok());
    EXPECT_EQ(b, recs);
    EXPECT_EQ(acc, acc0);
  }
}

// One record with `n` down elements at scale d = 1 (so v = 16Δ), up row unused.
struct Bench1 {
  RecordLayout l;
  std::vector<uint8_t> rec;
  std::vector<float> up;
  explicit Bench1(int64_t n) : l(layout_of(DType::kI8, n, 1, 1)), rec(l.stride, 0), up(1, 0.0f) {
    Row row = row_of(l, rec.data(), 0);
    for (int64_t g = 0; g < quant_groups(n); ++g) row.scales[g] = fp32_to_fp16(1.0f);
    row_of(l, rec.data(), 1).scales[0] = fp32_to_fp16(1.0f);
  }
  int8_t* codes() { return row_of(l, rec.data(), 0).codes; }
};

TEST(TrainUpdate, StochasticRoundingIsUnbiased) {
  const int64_t n = 100000;
  for (float x : {0.3f, 0.01f, 0.5f, -1.7f, 2.9f}) {
    Bench1 b(n);
    std::mt19937 rng(31);
    std::uniform_int_distribution<int> code(-60, 60);
    std::vector<int8_t> before(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j)
      b.codes()[j] = before[static_cast<size_t>(j)] = static_cast<int8_t>(code(rng));
    // SGD, lr 1, d 1: Δ = -g and v = 16Δ / 1 = x (to within fp32; use the kernel's own v).
    const float g = -(x / 16.0f);
    const float v = (16.0f * -(1.0f * g)) / 1.0f;
    std::vector<float> down(static_cast<size_t>(n), g);
    auto r = train_update_record_ref(b.l, sgd(1.0f, 7), 42, down.data(), b.up.data(), b.rec.data(),
                                     nullptr);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    double sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += b.codes()[j] - before[static_cast<size_t>(j)];
    const double mean = sum / static_cast<double>(n);
    const double frac = v - std::floor(v);
    const double sigma = std::sqrt(frac * (1 - frac) / static_cast<double>(n));
    std::printf(
        "[ figure ] SR of %g code LSB over 1e5 copies: mean %.6f, |mean - x| = %.2f sigma\n",
        static_cast<double>(v), mean, std::fabs(mean - v) / sigma);
    EXPECT_LT(std::fabs(mean - v), 4 * sigma) << "x = " << x;
  }
}

TEST(TrainUpdate, HundredthLsbIncrementsMoveStochasticRoundingTenLsb) {
  // 1000 increments of 0.01 code LSB (d/16) to 512 elements. Round-to-nearest of b + 0.01 is b
  // every time: it moves 0. SR moves each element Binomial(1000, 0.01): 10 ± 3.15 code LSB.
  const int64_t n = 512;
  Bench1 b(n);
  std::vector<float> down(static_cast<size_t>(n), -(0.01f / 16.0f));
  for (uint64_t t = 0; t < 1000; ++t) {
    ASSERT_TRUE(train_update_record_ref(b.l, sgd(1.0f, t), 9, down.data(), b.up.data(),
                                        b.rec.data(), nullptr)
                    .ok());
  }
  double sum = 0, sum_sq = 0;
  int rtn_moved = 0;
  for (int64_t j = 0; j < n; ++j) {
    sum += b.codes()[j];
    sum_sq += b.codes()[j] * b.codes()[j];
    int rtn = 0;
    for (int t = 0; t < 1000; ++t) rtn = static_cast<int>(std::nearbyint(rtn + 0.01));
    rtn_moved += rtn;
  }
  const double mean = sum / n, sd = std::sqrt(sum_sq / n - mean * mean);
  std::printf(
      "[ figure ] 1000 x 0.01 code LSB: round-to-nearest moved %d, SR moved %.2f ± %.2f "
      "code LSB (mean ± sd over %lld elements)\n",
      rtn_moved, mean, sd, static_cast<long long>(n));
  EXPECT_EQ(rtn_moved, 0);
  EXPECT_NEAR(mean, 10.0, 0.6);  // 3 sigma of the mean (3.15 / sqrt(512) = 0.14)
  EXPECT_NEAR(sd, 3.15, 0.5);
}

TEST(TrainUpdate, DriftUnderNoiseIsUnderOneInt4LsbWithTheEightBitCode) {
  // 1000 updates of N(0, 0.15) int4 LSB noise, in cancelling pairs (+x, -x) so no element walks
  // out of the int4 range (the SR error does not depend on where the value sits). Drift: the
  // stored weight minus the exactly accumulated one, RMS over elements, in int4 LSB (d = 1).
  // Baseline: SR straight into an int4 grid (unclamped: a clamp would only hide the drift).
  const int64_t n = 4096;
  Bench1 b(n);
  std::mt19937 rng(41);
  std::vector<double> exact(static_cast<size_t>(n), 0.0);
  std::vector<int64_t> int4_direct(static_cast<size_t>(n), 0);
  std::vector<float> x, down(static_cast<size_t>(n));
  TrainStats stats;
  for (uint64_t t = 0; t < 1000; ++t) {
    if (t % 2 == 0) {
      x = normal(static_cast<size_t>(n), 0.15f, rng);
    } else {
      for (float& v : x) v = -v;
    }
    for (int64_t j = 0; j < n; ++j) down[static_cast<size_t>(j)] = -x[static_cast<size_t>(j)];
    auto r = train_update_record_ref(b.l, sgd(1.0f, t), 5, down.data(), b.up.data(), b.rec.data(),
                                     nullptr);
    ASSERT_TRUE(r.ok());
    stats.merge(*r);
    const uint64_t prefix = sr_prefix(77, t, 0, 5);
    for (int64_t j = 0; j < n; ++j) {
      const float dx = x[static_cast<size_t>(j)];
      exact[static_cast<size_t>(j)] += dx;  // Δ = -(1 · -x) = x exactly
      auto& q = int4_direct[static_cast<size_t>(j)];
      const double v = static_cast<double>(q) + dx;
      const double k = std::floor(v);
      q = static_cast<int64_t>(k) +
          (sr_uniform_from_prefix(prefix, static_cast<uint64_t>(j)) < v - k ? 1 : 0);
    }
  }
  EXPECT_EQ(stats.rescales, 0);
  double sq8 = 0, sq4 = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double e8 = b.codes()[j] / 16.0 - exact[static_cast<size_t>(j)];
    const double e4 =
        static_cast<double>(int4_direct[static_cast<size_t>(j)]) - exact[static_cast<size_t>(j)];
    sq8 += e8 * e8;
    sq4 += e4 * e4;
  }
  const double rms8 = std::sqrt(sq8 / n), rms4 = std::sqrt(sq4 / n);
  std::printf(
      "[ figure ] drift after 1000 updates of N(0, 0.15) int4 LSB: %.3f int4 LSB RMS with "
      "the 8-bit code, %.2f with SR straight into int4\n",
      rms8, rms4);
  EXPECT_NEAR(rms8, 0.8, 0.15);
  EXPECT_NEAR(rms4, 10.0, 1.5);
}

// ---- the update: saturation, zero scales ---------------------------------------------------

TEST(TrainUpdate, SaturationDoublesTheScaleUntilTheUpdateFits) {
  Bench1 b(32);
  // v = 16Δ / d = 1000 code LSB at d = 1: three doublings (d = 8) make it 125.
  std::vector<float> down(32, 0.0f);
  down[5] = -62.5f;
  auto r =
      train_update_record_ref(b.l, sgd(1.0f), 0, down.data(), b.up.data(), b.rec.data(), nullptr);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->rescales, 3);
  EXPECT_EQ(fp16_to_fp32(row_of(b.l, b.rec.data(), 0).scales[0]), 8.0f);
  EXPECT_EQ(b.codes()[5], 125);
  EXPECT_EQ(r->elements_changed, 1);  // the zero codes halve to zero

  // With codes near the edge, the halving is SR: b/2 rounds either way, unbiased.
  Bench1 c(32);
  for (int j = 0; j < 32; ++j) c.codes()[j] = static_cast<int8_t>(127 - 2 * j);  // odd codes
  std::vector<float> push(32, 0.0f);
  push[0] = -1.0f / 16.0f;  // v = 1: 127 + 1 saturates
  r = train_update_record_ref(c.l, sgd(1.0f), 0, push.data(), c.up.data(), c.rec.data(), nullptr);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->rescales, 1);
  EXPECT_EQ(fp16_to_fp32(row_of(c.l, c.rec.data(), 0).scales[0]), 2.0f);
  for (int j = 1; j < 32; ++j) {
    const int was = 127 - 2 * j;
    EXPECT_TRUE(c.codes()[j] == (was >> 1) || c.codes()[j] == (was >> 1) + 1) << j;
  }
}

// A saturation tolerance T clamps a group that overshoots by at most T codes (scale kept)
// and still rescales one that overshoots by more; T outside 0..128 is refused.
TEST(TrainUpdate, SaturationToleranceClampsSmallOvershootsAndRescalesLargeOnes) {
  for (int tolerance : {0, 1, 5, 64}) {
    Bench1 c(32);
    for (int j = 0; j < 32; ++j) c.codes()[j] = static_cast<int8_t>(j == 0 ? 127 : -128 + j);
    std::vector<float> push(32, 0.0f);
    push[0] = -5.0f / 16.0f;  // v = 5: 127 + 5 overshoots by 5
    push[1] = 1.0f / 16.0f;   // v = -1: -127 - 1 = -128, in range
    TrainStep st = sgd(1.0f);
    st.saturation_tolerance = tolerance;
    auto r = train_update_record_ref(c.l, st, 0, push.data(), c.up.data(), c.rec.data(), nullptr);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    const float scale = fp16_to_fp32(row_of(c.l, c.rec.data(), 0).scales[0]);
    if (tolerance >= 5) {
      EXPECT_EQ(r->clamps, 1) << tolerance;
      EXPECT_EQ(r->rescales, 0);
      EXPECT_EQ(scale, 1.0f);
      EXPECT_EQ(c.codes()[0], 127);
      EXPECT_EQ(c.codes()[1], -128);
      EXPECT_EQ(c.codes()[2], -126);
    } else {
      EXPECT_EQ(r->clamps, 0) << tolerance;
      EXPECT_EQ(r->rescales, 1);
      EXPECT_EQ(scale, 2.0f);
    }
  }
  Bench1 b(32);
  for (int bad : {-1, 129}) {
    TrainStep st = sgd(1.0f);
    st.saturation_tolerance = bad;
    std::vector<float> g(32, 0.0f);
    auto r = train_update_record_ref(b.l, st, 0, g.data(), b.up.data(), b.rec.data(), nullptr);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("saturation tolerance"), std::string::npos);
  }
}

TEST(TrainUpdate, ScaleOverflowIsAnErrorThatLeavesTheRecordUnchanged) {
  const RecordLayout l = layout_of(DType::kI8, 32, 32, 1);
  std::vector<uint8_t> recs(2 * l.stride, 0);
  for (int i = 0; i < 2; ++i) {
    for (int r = 0; r < 2; ++r)
      row_of(l, recs.data() + i * l.stride, r).scales[0] = fp32_to_fp16(i == 1 ? 60000.0f : 1.0f);
  }
  std::vector<float> down(64, 0.0f), up(64, 0.0f);
  down[0] = 0.1f;        // record 0: fine
  down[32 + 3] = -1e9f;  // record 1: needs d far beyond fp16
  const auto before = recs;
  const int64_t experts[2] = {4, 7};
  for (bool ref : {true, false}) {
    auto recs2 = before;
    auto r = ref ? train_update_records_ref(l, sgd(1.0f), experts, 2, down.data(), up.data(),
                                            recs2.data(), nullptr)
                 : train_update_records(l, sgd(1.0f), experts, 2, down.data(), up.data(),
                                        recs2.data(), nullptr, 2);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), Status::Code::kOutOfRange);
    EXPECT_THAT(r.status().message(), HasSubstr("expert 7"));
    EXPECT_THAT(r.status().message(), HasSubstr("overflow fp16"));
    EXPECT_TRUE(std::equal(before.begin() + l.stride, before.end(), recs2.begin() + l.stride));
    EXPECT_FALSE(std::equal(before.begin(), before.begin() + l.stride, recs2.begin()));
  }
}

TEST(TrainUpdate, ZeroScaleGroupTakesAScaleFromItsUpdate) {
  Bench1 b(40);
  row_of(b.l, b.rec.data(), 0).scales[1] = 0;  // group 1 (elements 32..39), codes junk
  for (int j = 32; j < 40; ++j) b.codes()[j] = 99;
  std::vector<float> down(40, 0.0f);
  down[33] = 0.7f;  // Δ = -0.7 is the group's largest: d = fp16(0.1), v = -112
  down[35] = -0.35f;
  auto r =
      train_update_record_ref(b.l, sgd(1.0f), 0, down.data(), b.up.data(), b.rec.data(), nullptr);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->scale_inits, 1);
  const float d = fp16_to_fp32(row_of(b.l, b.rec.data(), 0).scales[1]);
  EXPECT_EQ(d, fp16_to_fp32(fp32_to_fp16(0.7f / 7.0f)));
  EXPECT_NEAR(b.codes()[33], -112, 1);
  EXPECT_NEAR(b.codes()[35], 56, 1);
  EXPECT_EQ(b.codes()[34], 0);
  EXPECT_EQ(r->elements_changed, 8);
}

TEST(TrainUpdate, PaddingCodesAreCarriedUnchangedAndAnEmptyBatchIsFine) {
  // dim 40: the second down group has 8 real elements and 24 padding codes.
  Bench1 b(40);
  for (int j = 40; j < 64; ++j) b.codes()[j] = static_cast<int8_t>(j);
  std::vector<float> down(40, -4.0f);  // v = 64 code LSB: saturates on the second step
  for (uint64_t t = 0; t < 3; ++t) {
    ASSERT_TRUE(train_update_record_ref(b.l, sgd(1.0f, t), 0, down.data(), b.up.data(),
                                        b.rec.data(), nullptr)
                    .ok());
  }
  EXPECT_GT(fp16_to_fp32(row_of(b.l, b.rec.data(), 0).scales[1]), 1.0f);  // it did rescale
  for (int j = 40; j < 64; ++j) EXPECT_EQ(b.codes()[j], j);

  auto r = train_update_records(b.l, adagrad(0.1f), nullptr, 0, nullptr, nullptr, nullptr, nullptr);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, TrainStats{});
  r = train_update_records_ref(b.l, adagrad(0.1f), nullptr, 0, nullptr, nullptr, nullptr, nullptr);
  ASSERT_TRUE(r.ok());
}

// ---- bad input ---------------------------------------------------------------------------------

TEST(TrainUpdate, BadInputIsAClearErrorAndChangesNothing) {
  std::mt19937 rng(51);
  const RecordLayout l = layout_of(DType::kI8, 40, 24, 2);
  const int64_t count = 3;
  const auto recs = random_training_records(l, count, rng);
  auto down = normal(static_cast<size_t>(count * 2 * 40), 0.1f, rng);
  auto up = normal(static_cast<size_t>(count * 2 * 24), 0.1f, rng);
  std::vector<float> acc(static_cast<size_t>(count * 4), 0.0f);
  const int64_t experts[3] = {10, 12, 14};
  auto run = [&](const TrainStep& st, const std::vector<float>& dg, const std::vector<float>& ug,
                 float* accum, bool ref) {
    auto r2 = recs;
    auto a2 = acc;
    auto r = ref ? train_update_records_ref(l, st, experts, count, dg.data(), ug.data(), r2.data(),
                                            accum ? a2.data() : nullptr)
                 : train_update_records(l, st, experts, count, dg.data(), ug.data(), r2.data(),
                                        accum ? a2.data() : nullptr, 2);
    EXPECT_EQ(r2, recs);
    EXPECT_EQ(a2, acc);
    return r.status();
  };
  for (bool ref : {true, false}) {
    auto bad_down = down;
    bad_down[2 * 40 + 40 + 5] = std::numeric_limits<float>::quiet_NaN();  // expert 12, row 1
    Status s = run(adagrad(0.1f), bad_down, up, acc.data(), ref);
    EXPECT_TRUE(s.is_invalid_argument());
    EXPECT_THAT(s.message(), HasSubstr("expert 12: gradient of down row 1 element 5"));
    EXPECT_THAT(s.message(), HasSubstr("nan"));
    auto bad_up = up;
    bad_up[23] = std::numeric_limits<float>::infinity();  // expert 10, up row 0, element 23
    s = run(sgd(0.1f), down, bad_up, nullptr, ref);
    EXPECT_THAT(s.message(), HasSubstr("expert 10: gradient of up row 0 element 23 (record "
                                       "element 103) is inf"));
    for (float lr : {0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN(),
                     std::numeric_limits<float>::infinity()}) {
      s = run(sgd(lr), down, up, nullptr, ref);
      EXPECT_THAT(s.message(), HasSubstr("learning rate must be > 0")) << lr;
    }
    TrainStep no_eps = adagrad(0.1f);
    no_eps.eps = 0.0f;
    EXPECT_THAT(run(no_eps, down, up, acc.data(), ref).message(), HasSubstr("eps must be > 0"));
    EXPECT_THAT(run(adagrad(0.1f), down, up, nullptr, ref).message(),
                HasSubstr("needs the row accumulators"));
    acc[5] = -1.0f;
    EXPECT_THAT(run(adagrad(0.1f), down, up, acc.data(), ref).message(),
                HasSubstr("expert 12: Adagrad accumulator of row 1"));
    acc[5] = 0.0f;
  }
}

// ---- CPU kernels against the oracle ----------------------------------------------------------

struct Case {
  int64_t dim, dim_out, width, count;
};

class TrainUpdateParity : public testing::CpuPathTest {};

TEST_P(TrainUpdateParity, CpuEqualsTheOracleBitForBitAtAnyThreadCount) {
  const Case cases[] = {{32, 32, 1, 1},  {45, 70, 3, 5},  {1, 1, 1, 7},  {100, 33, 2, 4},
                        {257, 31, 1, 3}, {64, 200, 4, 9}, {96, 17, 1, 2}};
  // Gradient regimes (σ of g, with lr 0.5 and scales 0.01..2): small steps, zero, steps of many
  // code LSB, and saturating steps that force one or more doublings.
  const float sigmas[] = {0.002f, 0.0f, 0.05f, 3.0f};
  // Saturation tolerance of steps 0, 1, 2: SPEC §7's rescale-always, then clamping.
  const int kTolerances[] = {0, 64, 16};
  std::mt19937 rng(61);
  int cases_run = 0;
  int64_t rescales = 0, inits = 0, clamps = 0;
  for (const Case& c : cases) {
    const RecordLayout l = layout_of(DType::kI8, c.dim, c.dim_out, c.width);
    for (float sigma : sigmas) {
      for (TrainOptimizer opt : {TrainOptimizer::kSgd, TrainOptimizer::kAdagrad}) {
        const auto start = random_training_records(l, c.count, rng);
        std::vector<int64_t> experts(static_cast<size_t>(c.count));
        for (auto& e : experts) e = rng() % 100000;
        std::vector<float> acc0(static_cast<size_t>(c.count * 2 * c.width));
        for (float& a : acc0) a = std::uniform_real_distribution<float>(0.0f, 1e-3f)(rng);
        std::vector<std::vector<float>> downs, ups;
        for (int s = 0; s < 3; ++s) {
          downs.push_back(normal(static_cast<size_t>(c.count * c.width * c.dim), sigma, rng));
          ups.push_back(normal(static_cast<size_t>(c.count * c.width * c.dim_out), sigma, rng));
        }
        auto want = start;
        auto want_acc = acc0;
        std::vector<TrainStats> want_stats;
        for (int s = 0; s < 3; ++s) {
          TrainStep st = opt == TrainOptimizer::kSgd ? sgd(0.5f, 100 + s) : adagrad(0.05f, s);
          st.saturation_tolerance = kTolerances[s];
          auto r = train_update_records_ref(l, st, experts.data(), c.count, downs[s].data(),
                                            ups[s].data(), want.data(), want_acc.data());
          ASSERT_TRUE(r.ok()) << r.status().to_string();
          want_stats.push_back(*r);
          rescales += r->rescales;
          inits += r->scale_inits;
          clamps += r->clamps;
        }
        for (int threads : {1, 2, 3, 8, 1}) {
          auto got = start;
          auto got_acc = acc0;
          for (int s = 0; s < 3; ++s) {
            TrainStep st = opt == TrainOptimizer::kSgd ? sgd(0.5f, 100 + s) : adagrad(0.05f, s);
            st.saturation_tolerance = kTolerances[s];
            auto r = train_update_records(l, st, experts.data(), c.count, downs[s].data(),
                                          ups[s].data(), got.data(), got_acc.data(), threads);
            ASSERT_TRUE(r.ok()) << r.status().to_string();
            EXPECT_EQ(*r, want_stats[static_cast<size_t>(s)]);
          }
          ASSERT_EQ(got, want) << "shape " << c.dim << "x" << c.dim_out << "x" << c.width
                               << " sigma " << sigma << " threads " << threads;
          ASSERT_EQ(0, std::memcmp(got_acc.data(), want_acc.data(), got_acc.size() * 4));
        }
        ++cases_run;
      }
    }
  }
  EXPECT_GT(rescales, 0);  // the saturating regime did saturate
  EXPECT_GT(inits, 0);
  EXPECT_GT(clamps, 0);  // and a tolerance clamped some groups
  std::printf("[ figure ] %d parity cases, %lld rescales, %lld scale inits, %lld clamps\n",
              cases_run, static_cast<long long>(rescales), static_cast<long long>(inits),
              static_cast<long long>(clamps));
}

INSTANTIATE_TEST_SUITE_P(CpuPaths, TrainUpdateParity,
                         ::testing::Values(CpuPath::kScalar, CpuPath::kAvx2),
                         [](const ::testing::TestParamInfo<CpuPath>& param_info) {
                           return std::string(cpu_path_name(param_info.param));
                         });

}  // namespace
}  // namespace trove
