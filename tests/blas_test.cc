// The BLAS wrapper of the CPU kernels (kernels/cpu/blas.h) against plain double loops: the three
// forms at shapes that are not multiples of any kernel tile (incl. 1 and empty), leading
// dimensions wider than the rows, accumulate, an empty sum; the same call at other addresses
// and on other threads gives the same bits; and the caller's OpenMP thread count survives.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "base/numeric.h"
#include "kernels/cpu/blas.h"

namespace trove {
namespace {

enum class Form { kNT, kTN, kNN };

struct Shape {
  int64_t m, n, k;
};

std::vector<float> normal(size_t count, std::mt19937* rng) {
  std::normal_distribution<float> d;
  std::vector<float> v(count);
  for (float& x : v) x = d(*rng);
  return v;
}

// A as stored: [m, lda] for NT/NN, [k, lda] for TN; B: [n, ldb] for NT, [k, ldb] otherwise.
struct Operands {
  int64_t lda, ldb, ldc;
  std::vector<float> a, b, c;
};

Operands make_operands(Form f, Shape s, int64_t pad, std::mt19937* rng) {
  Operands o;
  o.lda = (f == Form::kTN ? s.m : s.k) + pad;
  o.ldb = (f == Form::kNT ? s.k : s.n) + pad;
  o.ldc = s.n + pad;
  o.a = normal(sz((f == Form::kTN ? s.k : s.m) * o.lda), rng);
  o.b = normal(sz((f == Form::kNT ? s.n : s.k) * o.ldb), rng);
  o.c = normal(sz(s.m * o.ldc), rng);
  return o;
}

float a_at(Form f, const Operands& o, int64_t i, int64_t p) {
  return f == Form::kTN ? o.a[sz(p * o.lda + i)] : o.a[sz(i * o.lda + p)];
}
float b_at(Form f, const Operands& o, int64_t p, int64_t j) {
  return f == Form::kNT ? o.b[sz(j * o.ldb + p)] : o.b[sz(p * o.ldb + j)];
}

void call(Form f, Shape s, const Operands& o, float* c, bool accumulate) {
  switch (f) {
    case Form::kNT:
      return blas::gemm_nt(s.m, s.n, s.k, o.a.data(), o.lda, o.b.data(), o.ldb, c, o.ldc,
                           accumulate);
    case Form::kTN:
      return blas::gemm_tn(s.m, s.n, s.k, o.a.data(), o.lda, o.b.data(), o.ldb, c, o.ldc,
                           accumulate);
    case Form::kNN:
      return blas::gemm_nn(s.m, s.n, s.k, o.a.data(), o.lda, o.b.data(), o.ldb, c, o.ldc,
                           accumulate);
  }
}

TEST(BlasTest, EveryFormMatchesDoubleLoopsAtOddShapesAndWideLeadingDimensions) {
  std::mt19937 rng(5);
  const Shape shapes[] = {{1, 1, 1},    {3, 7, 5},    {65, 130, 67}, {64, 512, 64}, {1, 512, 2048},
                          {200, 33, 1}, {17, 1, 300}, {0, 5, 5},     {5, 0, 5}};
  for (Form f : {Form::kNT, Form::kTN, Form::kNN}) {
    for (Shape s : shapes) {
      for (int64_t pad : {int64_t{0}, int64_t{3}}) {
        for (bool accumulate : {false, true}) {
          const std::string what = "form " + std::to_string(static_cast<int>(f)) + " m " +
                                   std::to_string(s.m) + " n " + std::to_string(s.n) + " k " +
                                   std::to_string(s.k) + " pad " + std::to_string(pad) +
                                   (accumulate ? " accumulate" : "");
          const Operands o = make_operands(f, s, pad, &rng);
          std::vector<float> c = o.c;
          call(f, s, o, c.data(), accumulate);
          for (int64_t i = 0; i < s.m; ++i) {
            for (int64_t j = 0; j < o.ldc; ++j) {
              const float before = o.c[sz(i * o.ldc + j)];
              const float got = c[sz(i * o.ldc + j)];
              if (j >= s.n) {  // the padding columns of C are not written
                ASSERT_EQ(std::memcmp(&got, &before, sizeof(float)), 0) << what;
                continue;
              }
              double want = accumulate ? before : 0.0, sum_abs = std::abs(want);
              for (int64_t p = 0; p < s.k; ++p) {
                const double term = static_cast<double>(a_at(f, o, i, p)) * b_at(f, o, p, j);
                want += term;
                sum_abs += std::abs(term);
              }
              // fp32 sums of k terms: a few eps32 * sqrt(k) of the terms' magnitude.
              ASSERT_NEAR(got, want, 1e-6 * (1.0 + sum_abs)) << what << " at " << i << "," << j;
            }
          }
        }
      }
    }
  }
}

TEST(BlasTest, AnEmptySumClearsOrKeepsC) {
  const Shape s{4, 6, 0};
  std::mt19937 rng(9);
  const Operands o = make_operands(Form::kNT, s, 0, &rng);
  std::vector<float> c = o.c;
  call(Form::kNT, s, o, c.data(), /*accumulate=*/true);
  EXPECT_EQ(c, o.c);
  call(Form::kNT, s, o, c.data(), /*accumulate=*/false);
  EXPECT_EQ(c, std::vector<float>(c.size(), 0.0f));
}

// The CPU routing relies on this: a call's bits depend on its shapes and inputs only.
TEST(BlasTest, TheSameCallGivesTheSameBitsAtAnotherAddressAndOnAnotherThread) {
  const Shape s{64, 512, 2048};
  std::mt19937 rng(13);
  const Operands o = make_operands(Form::kNT, s, 0, &rng);
  std::vector<float> want(sz(s.m * s.n));
  blas::gemm_nt(s.m, s.n, s.k, o.a.data(), o.lda, o.b.data(), o.ldb, want.data(), s.n);

  // A shifted by one float: other alignment of every row.
  std::vector<float> shifted(o.a.size() + 1);
  std::memcpy(shifted.data() + 1, o.a.data(), o.a.size() * sizeof(float));
  std::vector<float> got(want.size());
  blas::gemm_nt(s.m, s.n, s.k, shifted.data() + 1, o.lda, o.b.data(), o.ldb, got.data(), s.n);
  EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0);

  std::vector<float> other(want.size());
  std::thread([&] {
    blas::gemm_nt(s.m, s.n, s.k, o.a.data(), o.lda, o.b.data(), o.ldb, other.data(), s.n);
  }).join();
  EXPECT_EQ(std::memcmp(other.data(), want.data(), want.size() * sizeof(float)), 0);
}

// An application's OpenMP setting is its own: a call runs single-threaded and restores it.
TEST(BlasTest, TheCallersOpenMpThreadCountIsRestored) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(3);
  const Shape s{70, 40, 90};
  std::mt19937 rng(17);
  const Operands o = make_operands(Form::kNN, s, 0, &rng);
  std::vector<float> c(o.c.size());
  call(Form::kNN, s, o, c.data(), false);
  EXPECT_EQ(omp_get_max_threads(), 3);
  omp_set_num_threads(saved);
}

}  // namespace
}  // namespace trove
