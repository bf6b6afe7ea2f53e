// Engram kernels (kernels/engram.h) against their oracles (kernels/cpu/ref/engram_ref.h): the
// hash bit for bit, packed rows byte for byte, the gather and the row gradients bit for bit,
// at many shapes including odd ones, on every CPU path this machine runs.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <vector>

#include "base/half.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/ref/engram_ref.h"
#include "kernels/engram.h"
#include "tests/cpu_path_test.h"

namespace trove {
namespace {

using ::testing::HasSubstr;

EngramHash make_hash(int max_ngram, int heads, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  EngramHash h;
  h.max_ngram = max_ngram;
  h.heads = heads;
  h.vocab = vocab;
  for (int i = 0; i < max_ngram; ++i)
    h.mult.push_back(static_cast<int64_t>(rng() % 10736 + 1) * 2 + 1);
  return h;
}

std::vector<int64_t> random_tokens(int64_t count, int64_t range, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> t(static_cast<size_t>(count));
  for (auto& v : t) v = static_cast<int64_t>(rng() % static_cast<uint64_t>(range));
  return t;
}

TEST(EngramHash, MatchesTheOracleAtManyShapes) {
  struct Shape {
    int max_ngram, heads;
    int64_t vocab, batch, seq;
  };
  for (const Shape s :
       {Shape{3, 8, 100000, 2, 33}, Shape{2, 1, 1, 1, 1}, Shape{2, 1, 7, 3, 1},
        Shape{4, 3, 1009, 1, 2}, Shape{5, 2, 65537, 3, 4}, Shape{3, 5, 999983, 4, 129}}) {
    const EngramHash h = make_hash(s.max_ngram, s.heads, s.vocab, 11);
    // Tokens up to 2^40: products wrap in int64 as torch's do.
    for (int64_t range : {int64_t{32000}, int64_t{1} << 40}) {
      const auto tok = random_tokens(s.batch * s.seq, range, 5);
      std::vector<int64_t> want(static_cast<size_t>(h.tables() * s.batch * s.seq));
      std::vector<int64_t> got(want.size(), -1);
      engram_hash_ref(h, tok.data(), s.batch, s.seq, want.data());
      ASSERT_TRUE(engram_hash(h, tok.data(), s.batch, s.seq, got.data()).ok());
      EXPECT_EQ(want, got) << "max_ngram " << s.max_ngram << " heads " << s.heads;
      for (int64_t id : got) ASSERT_TRUE(id >= 0 && id < s.vocab) << id;
    }
  }
}

TEST(EngramHash, HandComputed) {
  EngramHash h;
  h.max_ngram = 3;
  h.heads = 2;
  h.vocab = 1000;
  h.mult = {3, 5, 7};
  const std::vector<int64_t> tok = {10, 20, 30};
  std::vector<int64_t> ids(4 * 3);
  ASSERT_TRUE(engram_hash(h, tok.data(), 1, 3, ids.data()).ok());
  // 2-grams: t0: 30 ^ 0 = 30; t1: 60 ^ 50 = 14; t2: 90 ^ 100 = 62.
  EXPECT_EQ((std::vector<int64_t>{30, 14, 62}), std::vector<int64_t>(ids.begin(), ids.begin() + 3));
  // head 1 adds 104729 = 729 mod 1000.
  EXPECT_EQ((std::vector<int64_t>{759, 743, 791}),
            std::vector<int64_t>(ids.begin() + 3, ids.begin() + 6));
  // 3-grams: t2: 90 ^ 100 ^ 70 = 62 ^ 70 = 120.
  EXPECT_EQ(30, ids[6]);
  EXPECT_EQ(14, ids[7]);
  EXPECT_EQ(120, ids[8]);
}

TEST(EngramHash, BadInputIsAClearError) {
  EngramHash h = make_hash(3, 2, 100, 1);
  const std::vector<int64_t> tok = {1, -4};
  std::vector<int64_t> ids(8);
  Status st = engram_hash(h, tok.data(), 1, 2, ids.data());
  EXPECT_THAT(st.to_string(), HasSubstr("position 1 is -4"));
  h.mult[1] = 4;
  EXPECT_THAT(h.validate().to_string(), HasSubstr("multiplier 1 is 4"));
  h.mult.pop_back();
  EXPECT_THAT(h.validate().to_string(), HasSubstr("2 multipliers"));
  h = make_hash(3, 2, 100, 1);
  h.max_ngram = 1;
  EXPECT_THAT(h.validate().to_string(), HasSubstr("max_ngram is 1"));
}

TEST(EngramRowLayout, NoPaddingInsideATable) {
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8, DType::kI4}) {
    for (int64_t d : {1, 7, 31, 32, 33, 64, 96, 100, 256, 4097}) {
      auto l = EngramRowLayout::make(t, d);
      ASSERT_TRUE(l.ok());
      EXPECT_EQ(l->record_bytes % 64, 0u);
      EXPECT_GE(l->record_bytes, 512u);
      EXPECT_EQ(l->record_bytes, static_cast<size_t>(l->rows_per_record) * l->row_bytes);
      EXPECT_LE(l->rows_per_record, 512);
      // A large table wastes at most its last record.
      const int64_t rows = 1000003;
      EXPECT_LT(l->overhead(rows), 1.0 + static_cast<double>(l->rows_per_record) / rows + 1e-12);
    }
  }
  // The background's shape in int4: 32 elements = 2 B of scale + 16 B of codes, 18 B a row
  // (a 64 B stride per row would be 3.6x).
  auto l = EngramRowLayout::make(DType::kI4, 32);
  EXPECT_EQ(l->row_bytes, 18u);
  EXPECT_EQ(l->rows_per_record, 32);
  EXPECT_EQ(l->record_bytes, 576u);
  EXPECT_FALSE(EngramRowLayout::make(DType::kI4, 0).ok());
}

class EngramKernels : public testing::CpuPathTest {};

TEST_P(EngramKernels, PackAndGatherMatchTheOracle) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8, DType::kI4}) {
    for (int64_t d : {1, 5, 31, 32, 33, 64, 95, 256}) {
      const auto l = EngramRowLayout::make(t, d).value();
      const int64_t rows = 37;
      std::vector<float> x(static_cast<size_t>(rows * d));
      for (auto& v : x) v = nd(rng);
      x[0] = 0.0f;
      std::vector<uint8_t> want(static_cast<size_t>(rows) * l.row_bytes);
      std::vector<uint8_t> got(want.size(), 0xab);
      for (int64_t r = 0; r < rows; ++r) {
        engram_pack_row_ref(l, x.data() + r * d,
                            want.data() + static_cast<size_t>(r) * l.row_bytes);
      }
      engram_pack_rows(l, x.data(), rows, got.data());
      ASSERT_EQ(want, got) << dtype_name(t) << " d " << d;

      // Gather with repeats and an odd count, into a strided output.
      const int64_t n = 53;
      const int64_t ld = d + 3;
      std::vector<int64_t> ids(static_cast<size_t>(n));
      for (auto& v : ids) v = static_cast<int64_t>(rng() % rows);
      std::vector<float> ref(static_cast<size_t>(n * ld), -7.0f);
      std::vector<float> out(ref.size(), -7.0f);
      for (int64_t i = 0; i < n; ++i) {
        engram_unpack_row_ref(l, got.data() + ids[i] * l.row_bytes, ref.data() + i * ld);
      }
      for (int threads : {1, 3}) {
        engram_gather_table(l, got.data(), ids.data(), n, out.data(), ld, threads);
        ASSERT_EQ(0, std::memcmp(ref.data(), out.data(), ref.size() * 4))
            << dtype_name(t) << " d " << d << " threads " << threads;
      }
      if (t == DType::kF32) {
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_EQ(0, std::memcmp(out.data() + i * ld, x.data() + ids[i] * d, d * 4));
        }
      }
    }
  }
}

TEST_P(EngramKernels, RowGradsMatchTheOracleAndTheDenseSum) {
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t n : {0, 1, 2, 17, 1000}) {
    for (int64_t d : {1, 3, 32, 65}) {
      for (int64_t vocab : {1, 5, 100000}) {
        const int64_t ld = d + 1;
        std::vector<int64_t> ids(static_cast<size_t>(n));
        for (auto& v : ids) v = static_cast<int64_t>(rng() % vocab);
        std::vector<float> dy(static_cast<size_t>(n * ld));
        for (auto& v : dy) v = nd(rng);
        std::vector<int64_t> u_ref, u;
        std::vector<float> g_ref, g;
        engram_row_grads_ref(ids.data(), n, dy.data(), ld, d, &u_ref, &g_ref);
        engram_row_grads(ids.data(), n, dy.data(), ld, d, &u, &g);
        ASSERT_EQ(u_ref, u);
        ASSERT_EQ(g_ref.size(), g.size());
        ASSERT_TRUE(g.empty() || std::memcmp(g_ref.data(), g.data(), g.size() * 4) == 0)
            << n << " " << d;
        // Against a dense gradient (double) on the touched rows.
        std::map<int64_t, std::vector<double>> dense;
        for (int64_t i = 0; i < n; ++i) {
          auto& row = dense[ids[i]];
          row.resize(static_cast<size_t>(d));
          for (int64_t j = 0; j < d; ++j) row[j] += dy[i * ld + j];
        }
        ASSERT_EQ(dense.size(), u.size());
        for (size_t k = 0; k < u.size(); ++k) {
          for (int64_t j = 0; j < d; ++j) {
            EXPECT_NEAR(dense[u[k]][j], g[k * d + j], 1e-4);
          }
        }
      }
    }
  }
}

TEST(EngramTrain, ImportExportRoundTripAndTheSrUpdateIsUnbiased) {
  std::mt19937 rng(21);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  for (int64_t d : {32, 7, 64}) {
    const auto serving = EngramRowLayout::make(DType::kI4, d).value();
    const auto training = EngramRowLayout::make(DType::kI8, d).value();
    const int64_t n = 4000;
    std::vector<float> x(static_cast<size_t>(n * d));
    for (auto& v : x) v = nd(rng);
    std::vector<uint8_t> served(static_cast<size_t>(n) * serving.row_bytes);
    engram_pack_rows(serving, x.data(), n, served.data());
    std::vector<uint8_t> train(static_cast<size_t>(n) * training.row_bytes);
    std::vector<uint8_t> back(served.size());
    for (int64_t i = 0; i < n; ++i) {
      engram_train_import_row(serving, training, served.data() + i * serving.row_bytes,
                              train.data() + i * training.row_bytes);
      engram_train_export_row(serving, training, train.data() + i * training.row_bytes,
                              back.data() + i * serving.row_bytes);
    }
    ASSERT_EQ(served, back) << "d " << d;

    // One SGD step with the same gradient on every row: the dequantized change averages
    // -lr * g (SR is unbiased), and each element moves by less than one int8 code + |lr g|.
    std::vector<float> before(static_cast<size_t>(n * d)), after(before.size());
    auto dequant_train = [&](std::vector<float>* out) {
      for (int64_t i = 0; i < n; ++i) {
        const uint8_t* r = train.data() + i * training.row_bytes;
        for (int64_t j = 0; j < d; ++j) {
          uint16_t h;
          std::memcpy(&h, r + 2 * (j / 32), 2);
          (*out)[static_cast<size_t>(i * d + j)] =
              fp16_to_fp32(h) / 16.0f * static_cast<int8_t>(r[training.scale_bytes + j]);
        }
      }
    };
    dequant_train(&before);
    std::vector<float> g(static_cast<size_t>(n * d));
    for (int64_t j = 0; j < n * d; ++j) g[static_cast<size_t>(j)] = (j % d) % 2 ? 0.5f : -0.25f;
    std::vector<int64_t> ids(static_cast<size_t>(n));
    std::vector<uint8_t*> ptrs(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      ids[static_cast<size_t>(i)] = 1000 + i;
      ptrs[static_cast<size_t>(i)] = train.data() + i * training.row_bytes;
    }
    TrainStep step;
    step.optimizer = TrainOptimizer::kSgd;
    step.lr = 0.002f;
    step.seed = 5;
    step.step = 1;
    auto stats =
        engram_train_update_rows(training, step, ids.data(), n, g.data(), ptrs.data(), nullptr);
    ASSERT_TRUE(stats.ok()) << stats.status().to_string();
    EXPECT_GT(stats->elements_changed, 0);
    dequant_train(&after);
    for (int64_t j = 0; j < 2; ++j) {
      double mean = 0;
      for (int64_t i = 0; i < n; ++i) {
        mean += after[static_cast<size_t>(i * d + j)] - before[static_cast<size_t>(i * d + j)];
      }
      mean /= static_cast<double>(n);
      const double want = -0.002 * (j % 2 ? 0.5 : -0.25);
      EXPECT_NEAR(mean, want, 0.15 * std::abs(want)) << "d " << d << " element " << j;
    }
    // Adagrad: the row's accumulator gains the mean squared gradient; a zero gradient moves
    // nothing.
    std::vector<float> acc(static_cast<size_t>(n), 0.0f);
    std::vector<float> zero(g.size(), 0.0f);
    const std::vector<uint8_t> snapshot = train;
    step.optimizer = TrainOptimizer::kAdagrad;
    step.step = 2;
    ASSERT_TRUE(engram_train_update_rows(training, step, ids.data(), n, zero.data(), ptrs.data(),
                                         acc.data())
                    .ok());
    EXPECT_EQ(snapshot, train);
    ASSERT_TRUE(
        engram_train_update_rows(training, step, ids.data(), 1, g.data(), ptrs.data(), acc.data())
            .ok());
    double ms = 0;
    for (int64_t j = 0; j < d; ++j) ms += static_cast<double>(g[j]) * g[j];
    EXPECT_FLOAT_EQ(acc[0], static_cast<float>(ms / static_cast<double>(d)));
    // A non-finite gradient is refused and changes nothing.
    g[3] = std::nanf("");
    const std::vector<uint8_t> snap2 = train;
    EXPECT_FALSE(
        engram_train_update_rows(training, step, ids.data(), n, g.data(), ptrs.data(), acc.data())
            .ok());
    EXPECT_EQ(snap2, train);
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, EngramKernels,
                         ::testing::Values(CpuPath::kScalar, CpuPath::kAvx2, CpuPath::kAvxVnni,
                                           CpuPath::kAvx512),
                         [](const ::testing::TestParamInfo<CpuPath>& param_info) {
                           return std::string(cpu_path_name(param_info.param));
                         });

}  // namespace
}  // namespace trove
