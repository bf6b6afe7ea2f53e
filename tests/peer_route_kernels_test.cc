// The routing step's inner loops (kernels/cpu/peer_kernels.h) on every SIMD path this CPU runs,
// each against a plain oracle: top_indices against top_indices_ref (a stable sort) and, for rows
// with NaNs, the scalar path's scan; merge_top against merge_top_ref (all sums sorted) and, with
// NaNs, the scalar path's heap; int8_scores against oneDNN's integer GEMM followed by
// portable_scale_products, gemm_nt_panels against std::fma chains, bit for bit. Rows with heavy
// ties, all-equal rows (past the ranked candidates' limit), signed zeros, and sizes below, at and
// across the vector widths.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/blas.h"
#include "kernels/cpu/peer_kernels.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/ref/peer_ref.h"

namespace trove {
namespace {

using peer_internal::PeerKernels;

size_t sz(int64_t v) {
  return static_cast<size_t>(v);
}

// The SIMD paths' tables this CPU can run (the scalar path's portable functions are checked
// beside them).
std::vector<std::pair<CpuPath, const PeerKernels*>> simd_tables() {
  std::vector<std::pair<CpuPath, const PeerKernels*>> out;
  if (cpu_path_supported(CpuPath::kAvx2)) out.emplace_back(CpuPath::kAvx2, &avx2::peer_kernels());
  if (cpu_path_supported(CpuPath::kAvxVnni)) {
    out.emplace_back(CpuPath::kAvxVnni, &avxvnni::peer_kernels());
  }
  if (cpu_path_supported(CpuPath::kAvx512)) {
    out.emplace_back(CpuPath::kAvx512, &avx512::peer_kernels());
  }
  return out;
}

// top_indices_ref's answer (a stable sort) and the scalar path's (the insertion scan, which
// also defines the answer for rows with NaNs).
std::vector<int64_t> ref_top(const std::vector<float>& s, int64_t kp) {
  std::vector<int64_t> out(sz(kp));
  top_indices_ref(s.data(), static_cast<int64_t>(s.size()), kp, out.data());
  return out;
}
std::vector<int64_t> portable_top(const std::vector<float>& s, int64_t kp) {
  std::vector<int64_t> out(sz(kp));
  peer_internal::portable_top_indices(s.data(), static_cast<int64_t>(s.size()), kp, out.data());
  return out;
}

// Rows of n scores of several kinds: gaussian, small integers (many ties), all equal, signed
// zeros among negatives, and a few equal maxima above gaussian noise.
std::vector<std::vector<float>> score_rows(int64_t n, std::mt19937* rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> small(-2, 2);
  std::vector<std::vector<float>> rows(5, std::vector<float>(sz(n)));
  for (int64_t i = 0; i < n; ++i) {
    rows[0][sz(i)] = normal(*rng);
    rows[1][sz(i)] = static_cast<float>(small(*rng));
    rows[2][sz(i)] = 0.75f;
    rows[3][sz(i)] = i % 3 == 0 ? -0.0f : i % 3 == 1 ? 0.0f : -1.0f - normal(*rng) * normal(*rng);
    rows[4][sz(i)] = i % 7 == 2 ? 5.0f : normal(*rng);
  }
  return rows;
}

// A merge's answer: ids and scores.
struct Merged {
  std::vector<int64_t> ids;
  std::vector<float> scores;
};
using MergeFn = void (*)(const float*, const float*, const int64_t*, const int64_t*, int64_t,
                         int64_t, int64_t, int64_t*, float*);
Merged merged_by(MergeFn merge, const std::vector<float>& s0, const std::vector<float>& s1,
                 const std::vector<int64_t>& top0, const std::vector<int64_t>& top1, int64_t kp,
                 int64_t n, int64_t k) {
  Merged m{std::vector<int64_t>(sz(k), -1), std::vector<float>(sz(k), 0.0f)};
  merge(s0.data(), s1.data(), top0.data(), top1.data(), kp, n, k, m.ids.data(), m.scores.data());
  return m;
}

// Each table's merge_top (and, with `portable`, portable_merge_top) gives `want`: ids and score
// bits.
::testing::AssertionResult merges_give(
    const Merged& want, const std::vector<std::pair<CpuPath, const PeerKernels*>>& tables,
    bool portable, const std::vector<float>& s0, const std::vector<float>& s1,
    const std::vector<int64_t>& top0, const std::vector<int64_t>& top1, int64_t kp, int64_t n,
    int64_t k) {
  std::vector<std::pair<const char*, MergeFn>> merges;
  if (portable) merges.emplace_back("portable", peer_internal::portable_merge_top);
  for (const auto& [path, kr] : tables) merges.emplace_back(cpu_path_name(path), kr->merge_top);
  for (const auto& [name, merge] : merges) {
    const Merged got = merged_by(merge, s0, s1, top0, top1, kp, n, k);
    if (got.ids != want.ids ||
        std::memcmp(got.scores.data(), want.scores.data(), sz(k) * sizeof(float)) != 0) {
      return ::testing::AssertionFailure()
             << name << " differs (first id " << got.ids[0] << " against " << want.ids[0] << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

// c [m, ldc] holds want [m, n] bit for bit, and `sentinel` past n in every row.
::testing::AssertionResult rows_match(const std::vector<float>& c, int64_t ldc,
                                      const std::vector<float>& want, int64_t m, int64_t n,
                                      float sentinel) {
  for (int64_t i = 0; i < m; ++i) {
    if (std::memcmp(&c[sz(i * ldc)], &want[sz(i * n)], sz(n) * sizeof(float)) != 0) {
      return ::testing::AssertionFailure() << "row " << i << " differs";
    }
    for (int64_t j = n; j < ldc; ++j) {
      if (c[sz(i * ldc + j)] != sentinel) {
        return ::testing::AssertionFailure() << "row " << i << " written past n at " << j;
      }
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(PeerRouteKernelsTest, TopIndicesMatchAStableSortOnEveryPath) {
  const auto tables = simd_tables();
  if (tables.empty()) GTEST_SKIP() << "this CPU runs the scalar path only";
  std::mt19937 rng(5);
  int checked = 0;
  // n = 64, 65, 72, 80: all-equal rows put 64 or more scores at the bound (the ranked limit).
  for (int64_t n : {1, 7, 15, 16, 17, 31, 32, 33, 64, 65, 72, 80, 100, 512, 1000, 1024}) {
    for (const std::vector<float>& s : score_rows(n, &rng)) {
      for (int64_t kp : {1, 2, 3, 5, 8, 9, 15, 16, 17}) {
        if (kp > n) continue;
        const std::vector<int64_t> want = ref_top(s, kp);
        ASSERT_EQ(portable_top(s, kp), want) << "scalar path, n " << n << " k' " << kp;
        for (const auto& [path, kr] : tables) {
          std::vector<int64_t> got(sz(kp), -1);
          kr->top_indices(s.data(), n, kp, got.data());
          ASSERT_EQ(got, want) << cpu_path_name(path) << " n " << n << " k' " << kp
                               << " first score " << s[0];
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 300);
}

// Rows with NaNs (a NaN query row gives a half of NaN scores): every path gives the scan's
// indices, wherever the NaNs are, so that no path reads indices it did not write.
TEST(PeerRouteKernelsTest, TopIndicesOfRowsWithNansAreTheScansOnEveryPath) {
  const auto tables = simd_tables();
  if (tables.empty()) GTEST_SKIP() << "this CPU runs the scalar path only";
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::mt19937 rng(19);
  int checked = 0;
  for (int64_t n : {16, 17, 32, 40, 512}) {
    std::vector<std::vector<float>> rows;
    rows.push_back(std::vector<float>(sz(n), nan));  // all NaN
    for (int64_t at : {int64_t{0}, int64_t{1}, int64_t{15}, n / 2, n - 1}) {
      std::vector<float> row = score_rows(n, &rng)[0];
      row[sz(at)] = nan;
      rows.push_back(row);
    }
    std::vector<float> every_other = score_rows(n, &rng)[0];
    for (int64_t i = 0; i < n; i += 2) every_other[sz(i)] = nan;
    rows.push_back(every_other);
    std::vector<float> with_inf = score_rows(n, &rng)[0];
    with_inf[sz(n / 3)] = std::numeric_limits<float>::infinity();
    with_inf[sz(n - 1)] = -std::numeric_limits<float>::infinity();
    rows.push_back(with_inf);
    for (size_t r = 0; r < rows.size(); ++r) {
      for (int64_t kp : {1, 4, 8, 16}) {
        const std::vector<int64_t> want = portable_top(rows[r], kp);
        for (const auto& [path, kr] : tables) {
          std::vector<int64_t> got(sz(kp), -7);
          kr->top_indices(rows[r].data(), n, kp, got.data());
          ASSERT_EQ(got, want) << cpu_path_name(path) << " n " << n << " row " << r << " k' " << kp;
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 100);
}

TEST(PeerRouteKernelsTest, MergeTopMatchesTheOracleOnEveryPath) {
  const auto tables = simd_tables();
  if (tables.empty()) GTEST_SKIP() << "this CPU runs the scalar path only";
  std::mt19937 rng(7);
  int checked = 0;
  for (int64_t n : {4, 33, 512}) {
    const std::vector<std::vector<float>> rows = score_rows(n, &rng);
    for (size_t kind = 0; kind < rows.size(); ++kind) {
      const std::vector<float>& s0 = rows[kind];
      // The other half: a different row of the same kind.
      const std::vector<float> s1 = score_rows(n, &rng)[kind];
      for (int64_t kp : {1, 2, 3, 4, 8, 16, 17}) {
        if (kp > n) continue;
        const std::vector<int64_t> top0 = ref_top(s0, kp), top1 = ref_top(s1, kp);
        for (int64_t k : {int64_t{1}, int64_t{2}, kp, std::min<int64_t>(kp * kp, 8),
                          std::min<int64_t>(kp * kp, 16), kp * kp}) {
          if (k > kp * kp) continue;  // REQUIRES k <= k'^2 (k = 2 at k' = 1)
          const Merged want = merged_by(merge_top_ref, s0, s1, top0, top1, kp, n, k);
          ASSERT_TRUE(merges_give(want, tables, true, s0, s1, top0, top1, kp, n, k))
              << "n " << n << " kind " << kind << " k' " << kp << " k " << k;
          checked += static_cast<int>(tables.size());
        }
      }
    }
  }
  EXPECT_GT(checked, 200);
}

// A NaN sub-score among the selected (a NaN query row's scores): every path merges as the heap
// does, wherever the NaN sits.
TEST(PeerRouteKernelsTest, MergeTopWithANanScoreGivesTheScalarPathsResult) {
  const auto tables = simd_tables();
  if (tables.empty()) GTEST_SKIP() << "this CPU runs the scalar path only";
  std::mt19937 rng(17);
  const int64_t n = 40;
  int checked = 0;
  for (int64_t kp : {2, 4, 8, 16}) {
    for (int64_t at : {int64_t{0}, int64_t{1}, kp - 1}) {
      for (int64_t k : {int64_t{1}, int64_t{2}, std::min<int64_t>(kp * kp, 8), kp * kp}) {
        std::vector<float> s0 = score_rows(n, &rng)[0], s1 = score_rows(n, &rng)[0];
        const std::vector<int64_t> top0 = ref_top(s0, kp), top1 = ref_top(s1, kp);
        s0[sz(top0[sz(at)])] = std::numeric_limits<float>::quiet_NaN();
        // The oracle's sort takes no NaN: the scalar path's heap defines the answer.
        const Merged want =
            merged_by(peer_internal::portable_merge_top, s0, s1, top0, top1, kp, n, k);
        ASSERT_TRUE(merges_give(want, tables, false, s0, s1, top0, top1, kp, n, k))
            << "k' " << kp << " NaN at " << at << " k " << k;
        checked += static_cast<int>(tables.size());
      }
    }
  }
  EXPECT_GT(checked, 30);
}

// Distinct best sums, but one outside the AVX2 merge's candidates ((a + 1)(b + 1) > k) rounds
// equal to the k-th: -2^25 + 1 and -2^25 + 0.5 are both -2^25 in fp32. Its id is the lower, so
// it is the k-th.
TEST(PeerRouteKernelsTest, MergeTopTakesASumRoundingEqualToTheKthByTheLowerId) {
  const int64_t n = 2, kp = 2, k = 3;
  const std::vector<float> s0 = {0.0f, -33554432.0f}, s1 = {0.5f, 1.0f};
  const std::vector<int64_t> top0 = ref_top(s0, kp), top1 = ref_top(s1, kp);
  ASSERT_EQ(top1, (std::vector<int64_t>{1, 0}));
  const Merged want = merged_by(merge_top_ref, s0, s1, top0, top1, kp, n, k);
  // Best first: 0 + 1 (id 1), 0 + 0.5 (id 0), then the tie at -2^25: ids 2 (s1[0]) and 3.
  EXPECT_EQ(want.ids, (std::vector<int64_t>{1, 0, 2}));
  EXPECT_EQ(want.scores, (std::vector<float>{1.0f, 0.5f, -33554432.0f}));
  EXPECT_TRUE(merges_give(want, simd_tables(), true, s0, s1, top0, top1, kp, n, k));
}

TEST(PeerRouteKernelsTest, Int8ScoresGiveTheBitsOfTheIntegerGemmThenScaleProducts) {
  const auto tables = simd_tables();
  if (tables.empty()) GTEST_SKIP() << "this CPU runs the scalar path only";
  constexpr float kSentinel = -12345.0f;
  constexpr int64_t kPad = 3;  // columns of c past n, which must stay untouched
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> activation(1, 255), weight(-64, 64);
  std::uniform_real_distribution<float> scale(1e-4f, 1e-1f);
  int checked = 0;
  for (int64_t m : {1, 2, 3, 4, 5, 7, 8, 9, 17}) {
    for (int64_t n : {1, 7, 8, 9, 15, 16, 17, 31, 33, 100}) {
      for (int64_t k : {1, 2, 3, 4, 5, 7, 8, 63, 64, 65, 128, 129}) {
        // Rows of a with a stride past k for odd m; every code at its extreme (255 x 64, the
        // largest pair sums) for k = 128.
        const int64_t lda = m % 2 == 1 ? k + 5 : k;
        const bool extreme = k == 128;
        std::vector<uint8_t> a(sz(m * lda));
        std::vector<int8_t> b(sz(n * k));
        // Random codes, with the extremes at the start of each.
        for (size_t i = 0; i < a.size(); ++i) {
          a[i] = static_cast<uint8_t>(extreme ? 255 : i < 8 ? (i % 2 ? 1 : 255) : activation(rng));
        }
        for (size_t i = 0; i < b.size(); ++i) {
          b[i] = static_cast<int8_t>(extreme || i < 8 ? (i % 2 ? -64 : 64) : weight(rng));
          if (extreme && i % 3 == 0) b[i] = 64;
        }
        std::vector<float> scale_a(sz(m)), scale_b(sz(n));
        for (float& v : scale_a) v = scale(rng);
        for (float& v : scale_b) v = scale(rng);
        std::vector<int32_t> acc(sz(m * n));
        blas::gemm_nt_int8(m, n, k, a.data(), lda, b.data(), k, acc.data(), n);
        std::vector<float> want(sz(m * n));
        peer_internal::portable_scale_products(acc.data(), m, n, scale_a.data(), scale_b.data(),
                                               want.data(), n);
        const peer_internal::Int8Panels panels = peer_internal::pack_int8_panels(b.data(), n, k, k);
        for (const auto& [path, kr] : tables) {
          if (kr->int8_scores == nullptr) continue;
          const int64_t ldc = n + kPad;
          std::vector<float> c(sz(m * ldc), kSentinel);
          kr->int8_scores(m, n, k, a.data(), lda, panels, scale_a.data(), scale_b.data(), c.data(),
                          ldc);
          const std::string what = std::string(cpu_path_name(path)) + " m " + std::to_string(m) +
                                   " n " + std::to_string(n) + " k " + std::to_string(k);
          ASSERT_TRUE(rows_match(c, ldc, want, m, n, kSentinel)) << what;
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 1000);
}

// The fixed-order fp32 GEMM (RoutingPrecision::kF32's products on the SIMD paths): each element
// one fma chain over k in order from 0, so its bits are std::fma's in a loop, across the k-blocks
// (256 steps), the partial last panel (n % 16) and every row count; nothing written past n.
TEST(PeerRouteKernelsTest, GemmNtPanelsIsOneFmaChainPerElement) {
  const auto tables = simd_tables();
  if (tables.empty()) GTEST_SKIP() << "this CPU runs the scalar path only";
  constexpr float kSentinel = -12345.0f;
  constexpr int64_t kPad = 5;
  std::mt19937 rng(13);
  std::normal_distribution<float> normal;
  int checked = 0;
  for (int64_t m : {1, 2, 3, 4, 5, 9}) {
    for (int64_t n : {1, 7, 15, 16, 17, 33, 100}) {
      for (int64_t k : {0, 1, 2, 63, 64, 255, 256, 257, 600}) {  // k = 0: C = 0
        const int64_t lda = k + 3;
        std::vector<float> a(sz(m * lda)), b(sz(n * k));
        for (float& v : a) v = normal(rng);
        for (float& v : b) v = normal(rng);
        const std::vector<float> panels = peer_internal::pack_f32_panels(b.data(), n, k, k);
        std::vector<float> want(sz(m * n));
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < n; ++j) {
            float acc = 0.0f;
            for (int64_t kk = 0; kk < k; ++kk) {
              acc = std::fma(a[sz(i * lda + kk)], b[sz(j * k + kk)], acc);
            }
            want[sz(i * n + j)] = acc;
          }
        }
        for (const auto& [path, kr] : tables) {
          if (kr->gemm_nt_panels == nullptr) continue;
          const int64_t ldc = n + kPad;
          std::vector<float> c(sz(m * ldc), kSentinel);
          kr->gemm_nt_panels(m, n, k, a.data(), lda, panels.data(), c.data(), ldc);
          const std::string what = std::string(cpu_path_name(path)) + " m " + std::to_string(m) +
                                   " n " + std::to_string(n) + " k " + std::to_string(k);
          ASSERT_TRUE(rows_match(c, ldc, want, m, n, kSentinel)) << what;
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 300);
}

}  // namespace
}  // namespace trove
