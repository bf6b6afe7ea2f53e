// Launchers for the PEER router on the GPU (SPEC §2 steps 1-5): rms norm, the query
// projection and the sub-key scores through cuBLAS, and the per-(token, head) selection that
// turns sub-scores into the top-k experts and their gates. Device pointers in and out; work is
// queued on the given stream (the cuBLAS handle's stream) and not waited for. Arguments are
// the caller's to check (kernels/cuda/peer_cuda.cu does): REQUIRES as stated per function.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "base/status.h"
#include "kernels/peer_config.h"

namespace trove::cuda {

// xhat [T, D] = x / sqrt(mean(x^2) + eps) * gamma, the sum of squares in fp64 as the oracle.
// x and xhat may be the same array. REQUIRES: 1 <= tokens <= 2^31 - 1, dim >= 1.
Status launch_rms_norm(const float* x, const float* gamma, int64_t tokens, int64_t dim, float eps,
                       float* xhat, cudaStream_t stream);

// q [T, rows] = xhat [T, D] W_q^T (+ bias), W_q [rows, D] row-major, by one cuBLAS SGEMM.
// `bias` may be null. REQUIRES: tokens, rows, dim in [1, 2^31 - 1].
Status query_projection(cublasHandle_t blas, const float* weight, const float* bias,
                        const float* xhat, int64_t tokens, int64_t dim, int64_t rows, float* q,
                        cudaStream_t stream);

// The routing shape of one layer, as the selection kernel needs it.
struct RouteShape {
  int64_t heads = 0;          // h
  int64_t n_keys = 0;         // n
  int64_t dim_key = 0;        // dk
  int64_t topk = 0;           // k
  int64_t topk_per_half = 0;  // k'
  bool shared_keys = false;
  Gate gate = Gate::kSoftmax;
};

// sub_scores [T, h, 2, n] with sub_scores[t][head][c][i] = <q[t][head][c], K[hk][c][i]>, for
// q [T, h*2*dk] and keys [hk, 2, n, dk]: per half one SGEMM over all (token, head) columns when
// the keys are shared, else one strided-batched SGEMM over the 2h (head, half) pairs.
// REQUIRES: tokens * h, h * 2 * dk and 2 * h * n in [1, 2^31 - 1].
Status sub_key_scores(cublasHandle_t blas, const float* q, const float* keys, int64_t tokens,
                      const RouteShape& shape, float* sub_scores);

// Dynamic shared memory the selection kernel needs for this shape (bytes).
size_t route_select_smem_bytes(const RouteShape& shape);

// From sub_scores [T, h, 2, n]: each half's top-k' (ties: lower index), the top-k of the k'^2
// sums s_0[i] + s_1[j] (ties: lower expert id i*n + j), best first, and the gates. Writes ids,
// scores and gates [T, h, k]. REQUIRES: tokens * h in [1, 2^31 - 1], n <= 65536,
// 1 <= k' <= min(n, 1024), 1 <= k <= min(k'^2, 1024), finite sub-scores.
Status launch_route_select(const float* sub_scores, int64_t tokens, const RouteShape& shape,
                           int64_t* ids, float* scores, float* gates, cudaStream_t stream);

}  // namespace trove::cuda
