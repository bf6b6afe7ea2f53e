// The one place the CPU kernels call a BLAS: oneDNN's sgemm and its u8s8s32 integer GEMM
// (Debian's libdnnl-dev).
//
// Why oneDNN: it picks its kernels by CPU feature flags at run time (JIT, AVX-512 where the CPU
// has it), where Debian 12's OpenBLAS 0.3.21 picks them by CPU model and ran its SSE3
// (Prescott) kernels on a Xeon it did not know; BLIS 0.9 chose its AVX2 kernels there. The
// measurements are in the commit that brought it in.
//
// Determinism: oneDNN splits the reduction dimension over threads when it runs multi-threaded,
// which changes the bits with the thread count. Every call here therefore runs on the calling
// thread alone (its OpenMP thread count is set to 1 for the call and restored), and callers
// parallelize over independent calls (blocks of tokens) with base/thread_pool.h. A call's
// result depends only on its shapes and inputs, never on pointers' alignment or on which thread
// runs it; blocks of different row counts may round differently (the library picks kernels by
// shape), so callers cut fixed blocks that do not depend on the thread count.
#pragma once

#include <cstdint>

namespace trove::blas {

// C[m, n] = A[m, k] B[n, k]^T (+ C when accumulate), row-major with leading dimensions lda,
// ldb, ldc, single-threaded on the calling thread.
// REQUIRES: m, n, k >= 0; lda >= k, ldb >= k, ldc >= n.
void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc, bool accumulate = false);

// C[m, n] = A[k, m]^T B[k, n] (+ C when accumulate): the transposed-A form the backward's
// weight gradients take (a sum over tokens). Same contract as gemm_nt.
// REQUIRES: lda >= m, ldb >= n, ldc >= n.
void gemm_tn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc, bool accumulate = false);

// C[m, n] = A[m, k] B[k, n] (+ C when accumulate). Same contract as gemm_nt.
// REQUIRES: lda >= k, ldb >= n, ldc >= n.
void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc, bool accumulate = false);

// C[m, n] = A[m, k] B[n, k]^T in exact integer arithmetic, where the A operand is a[i] - 128
// (a's bytes hold signed codes offset by 128) and B holds signed codes: oneDNN's u8s8s32 GEMM,
// single-threaded on the calling thread. Exact, so no result depends on shapes or blocking,
// provided the CPU's kernel does not saturate: oneDNN's kernels for CPUs without VNNI sum pairs
// of u8 * s8 products in int16 with saturation, which |b| <= 64 rules out (2 * 255 * 64 < 2^15).
// REQUIRES: m, n, k >= 0; lda >= k, ldb >= k, ldc >= n; every |b| <= 64; k * 127 * 64 < 2^31.
void gemm_nt_int8(int64_t m, int64_t n, int64_t k, const uint8_t* a, int64_t lda, const int8_t* b,
                  int64_t ldb, int32_t* c, int64_t ldc);

}  // namespace trove::blas
