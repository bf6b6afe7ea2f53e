// oneDNN's GEMMs, one thread per call (kernels/cpu/blas.h says why).
#include "kernels/cpu/blas.h"

#include <omp.h>
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>

#include "base/check.h"

namespace trove::blas {

namespace {

// oneDNN's OpenMP build runs a call on omp_get_max_threads() threads of the caller; the
// setting is per thread, so this pins the caller's to 1 for one call and puts it back, leaving
// the process's OpenMP state (which an application may use) as it was.
class OneThreadForThisCall {
 public:
  OneThreadForThisCall() : saved_(omp_get_max_threads()) {
    if (saved_ != 1) omp_set_num_threads(1);
  }
  ~OneThreadForThisCall() {
    if (saved_ != 1) omp_set_num_threads(saved_);
  }
  OneThreadForThisCall(const OneThreadForThisCall&) = delete;
  OneThreadForThisCall& operator=(const OneThreadForThisCall&) = delete;

 private:
  int saved_;
};

void sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
           const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  TROVE_CHECK(m >= 0 && n >= 0 && k >= 0 && ldc >= n);
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: C = 0, or C unchanged
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    }
    return;
  }
  const OneThreadForThisCall one_thread;
  const dnnl_status_t status =
      dnnl_sgemm(transa, transb, m, n, k, 1.0f, a, lda, b, ldb, accumulate ? 1.0f : 0.0f, c, ldc);
  TROVE_CHECK_MSG(status == dnnl_success, "dnnl_sgemm(%c, %c, %lld, %lld, %lld) failed: %d", transa,
                  transb, static_cast<long long>(m), static_cast<long long>(n),
                  static_cast<long long>(k), static_cast<int>(status));
}

}  // namespace

void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  TROVE_CHECK(lda >= k && ldb >= k);
  sgemm('N', 'T', m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

void gemm_tn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  TROVE_CHECK(lda >= m && ldb >= n);
  sgemm('T', 'N', m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  TROVE_CHECK(lda >= k && ldb >= n);
  sgemm('N', 'N', m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

void gemm_nt_int8(int64_t m, int64_t n, int64_t k, const uint8_t* a, int64_t lda, const int8_t* b,
                  int64_t ldb, int32_t* c, int64_t ldc) {
  TROVE_CHECK(m >= 0 && n >= 0 && k >= 0 && lda >= k && ldb >= k && ldc >= n);
  TROVE_CHECK(k < (int64_t{1} << 31) / (127 * 64));
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0);
    return;
  }
  const OneThreadForThisCall one_thread;
  const int32_t c_offset = 0;
  const dnnl_status_t status = dnnl_gemm_u8s8s32('N', 'T', 'F', m, n, k, 1.0f, a, lda, 128, b, ldb,
                                                 0, 0.0f, c, ldc, &c_offset);
  TROVE_CHECK_MSG(status == dnnl_success, "dnnl_gemm_u8s8s32(%lld, %lld, %lld) failed: %d",
                  static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k),
                  static_cast<int>(status));
}

}  // namespace trove::blas
