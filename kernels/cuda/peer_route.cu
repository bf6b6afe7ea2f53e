// The PEER router on the GPU (peer_route.cuh): norm, query projection, sub-key scores and the
// top-k selection with its exact tie rule.
//
// Why radix select for the top-k: the oracle orders candidates by (score descending, id
// ascending) with ties of fp32 values broken by the lower id. Packing (score, id) into one
// 64-bit key, high word = the score's bits mapped to an order-preserving unsigned (with -0
// mapped to +0, as the float compare treats them equal) and low word = 0xFFFFFFFF - id, makes
// that order a plain unsigned compare in which no two candidates are equal. The top-k is then
// unique, and any correct selection returns exactly the oracle's ids in the oracle's order:
// MSB-first radix select finds the k-th largest key one byte at a time (a 256-bin shared-memory
// histogram per pass, stopping as soon as the chosen bin is taken whole), the k keys above it
// are gathered and bitonic-sorted. It needs no per-thread top-k lists, so k' and k up to 1024
// and n up to 65536 run in the same code, and the k'^2 candidates are generated on the fly
// from the two sorted half lists in shared memory (never stored).
//
// Why a second, warp-per-row selection for k', k <= 32 (every configuration the background and
// PEER-pytorch use): the block radix select above spends its time on barriers, not data. On an
// H200 at the background config (T = 2048, h = 4, n = 512, k' = k = 8) it took 265 us of a
// 750 us layer, for 8192 blocks of 256 threads each making 3 selections of 2-4 passes. One warp
// per (token, head) with no block barriers does the same selection exactly: each lane keeps the
// top-CAP keys of its strided share in registers (CAP = the next of 8, 16, 32 at or above
// max(k', k)), then k rounds of a warp-wide max pop the winners. The keys are the same distinct
// 64-bit keys, so the result is the radix select's, bit for bit.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>

#include "kernels/cuda/blas.cuh"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/peer_route.cuh"

namespace trove::cuda {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kNormThreads = 256;
constexpr int kBiasThreads = 256;
constexpr int64_t kMaxBiasBlocks = 4096;
constexpr int kSelectThreads = 256;
constexpr int kBins = 256;

// ---- norm and bias --------------------------------------------------------------------------

// Sum of one double per thread over the block, in a fixed order (lane tree, then warps in
// order): the same bits on every run. Every thread gets the total. `scratch`: 32 doubles.
__device__ double block_sum(double v, double* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += scratch[w];
  return total;
}

// Launch: grid = T blocks (one per token), kNormThreads threads; block-strided over D.
// Traffic: reads x twice (the second pass mostly from L1/L2) and gamma once, writes xhat: about
// 12 bytes per element from DRAM. In place (x == xhat) is safe: every x is read in the first
// pass before the barrier inside block_sum, and the second pass reads and writes each element
// in one thread.
__global__ void __launch_bounds__(kNormThreads)
    rms_norm_kernel(const float* x, const float* gamma, int64_t dim, float eps, float* xhat) {
  __shared__ double scratch[32];
  const int64_t t = blockIdx.x;
  const float* xt = x + t * dim;
  float* out = xhat + t * dim;
  double ss = 0;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    ss += static_cast<double>(xt[d]) * xt[d];
  }
  // As the oracle: 1 / sqrt(mean + eps) in double, then x * r * gamma in double, one rounding.
  const double r = 1.0 / sqrt(block_sum(ss, scratch) / static_cast<double>(dim) + eps);
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    out[d] = static_cast<float>(xt[d] * r * gamma[d]);
  }
}

// Launch: grid-stride over the T * rows elements of q. Traffic: q read and written once,
// bias from L1/L2.
__global__ void __launch_bounds__(kBiasThreads)
    add_bias_kernel(float* q, const float* bias, int64_t total, int64_t rows) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    q[i] += bias[i % rows];
  }
}

// ---- selection ------------------------------------------------------------------------------

// The (score, id) order of the oracle as one unsigned compare; see the top of the file.
__device__ __forceinline__ uint64_t route_key(float score, uint32_t id) {
  uint32_t bits = __float_as_uint(score);
  if (bits == 0x80000000u) bits = 0;  // -0 == +0 for the oracle's float compare
  const uint32_t ordered = (bits & 0x80000000u) != 0 ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(ordered) << 32) | (0xFFFFFFFFu - id);
}

__device__ __forceinline__ uint32_t route_key_id(uint64_t key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(key);
}

// Finite scores give keys >= 0x00800000'00000000, so 0 pads a sort buffer below any key.
constexpr uint64_t kPadKey = 0;

struct SelectState {
  uint64_t prefix;
  int remaining;
  int done;
  int count;
};

// Sorts keys[0, p2) descending; p2 a power of two. Ends with a barrier.
__device__ void bitonic_sort_descending(uint64_t* keys, int p2) {
  for (int size = 2; size <= p2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < p2; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const uint64_t a = keys[i];
          const uint64_t b = keys[j];
          const bool descending = (i & size) == 0;
          if (descending ? a < b : a > b) {
            keys[i] = b;
            keys[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

// keys[0, k) = the k largest of the `count` distinct keys key_of(0..count), descending;
// keys[k, p2) = kPadKey. Block-wide: every thread of the block calls it with the same
// arguments. REQUIRES: 1 <= k <= count, k <= p2 (a power of two), count < 2^31, blockDim a
// multiple of 32, `keys` p2 long, `hist` kBins long.
//
// MSB-first radix select: pass p histograms byte 7-p of the keys that share the bytes chosen so
// far (`prefix`), and picks the bin holding the remaining-th largest. Keys are distinct, so the
// last byte leaves one key per bin; usually a bin is taken whole far earlier (`done`). Then the
// keys whose bytes above `shift` are >= the prefix's are exactly the k largest.
template <typename KeyOf>
__device__ void block_select_top(int64_t count, int k, int p2, KeyOf key_of, uint64_t* keys,
                                 unsigned* hist, SelectState* st) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  uint64_t prefix = 0;
  int remaining = k;
  int shift = 56;
  for (;; shift -= 8) {
    for (int b = tid; b < kBins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    const uint64_t above_digit = shift == 56 ? 0 : (~uint64_t{0} << (shift + 8));
    // The trip count is the same for every thread (base is block-uniform), so all 32 lanes
    // reach __match_any_sync together. Lanes with the same bin add once (warp-aggregated):
    // the first passes put nearly every key in one bin.
    for (int64_t base = 0; base < count; base += blockDim.x) {
      const int64_t i = base + tid;
      int bin = kBins;  // none
      if (i < count) {
        const uint64_t key = key_of(i);
        if ((key & above_digit) == prefix) bin = static_cast<int>((key >> shift) & 0xFF);
      }
      const unsigned peers = __match_any_sync(kFullMask, bin);
      if (bin != kBins && lane == __ffs(peers) - 1) {
        atomicAdd(&hist[bin], static_cast<unsigned>(__popc(peers)));
      }
    }
    __syncthreads();
    if (tid == 0) {
      // Bins from the top: `above` keys of this prefix are larger than bin b's.
      int above = 0;
      int b = kBins - 1;
      while (b > 0 && above + static_cast<int>(hist[b]) < remaining) {
        above += static_cast<int>(hist[b]);
        --b;
      }
      st->prefix = prefix | (static_cast<uint64_t>(b) << shift);
      st->remaining = remaining - above;
      st->done = static_cast<int>(hist[b]) == remaining - above || shift == 0;
    }
    __syncthreads();
    prefix = st->prefix;
    remaining = st->remaining;
    const bool done = st->done != 0;
    __syncthreads();  // all have read *st before it is written again
    if (done) break;
  }

  if (tid == 0) st->count = 0;
  __syncthreads();
  const uint64_t threshold = prefix >> shift;
  for (int64_t i = tid; i < count; i += blockDim.x) {
    const uint64_t key = key_of(i);
    if ((key >> shift) >= threshold) {
      const int pos = atomicAdd(&st->count, 1);
      if (pos < p2) keys[pos] = key;  // pos < k by construction; the guard keeps a bug in bounds
    }
  }
  __syncthreads();
  for (int j = k + tid; j < p2; j += blockDim.x) keys[j] = kPadKey;
  __syncthreads();
  bitonic_sort_descending(keys, p2);
}

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// The selection kernel's dynamic shared memory, 8-byte items first. The same arithmetic on the
// host (size) and the device (carving).
struct SelectSmem {
  int p2;                 // sort buffer length: pow2 >= max(k', k)
  size_t keys = 0;        // uint64 [p2]
  size_t exps = 0;        // double [k]   softmax terms
  size_t list_score = 0;  // float  [2][k'] each half's selected sub-scores, best first
  size_t list_index = 0;  // int32  [2][k'] their sub-key indices
  size_t top_score = 0;   // float  [k]   the final scores
  size_t bytes = 0;

  __host__ __device__ SelectSmem(int sort_len, int kp, int k) : p2(sort_len) {
    exps = keys + sizeof(uint64_t) * static_cast<size_t>(p2);
    list_score = exps + sizeof(double) * static_cast<size_t>(k);
    list_index = list_score + sizeof(float) * 2 * static_cast<size_t>(kp);
    top_score = list_index + sizeof(int32_t) * 2 * static_cast<size_t>(kp);
    bytes = top_score + sizeof(float) * static_cast<size_t>(k);
  }
};

struct SelectArgs {
  const float* sub_scores;  // [rows][2][n], rows = T*h
  int64_t n;
  int kp;
  int k;
  int p2;
  Gate gate;
  int64_t* ids;  // [rows][k]
  float* scores;
  float* gates;
};

// Launch: grid = T*h blocks, one per (token, head); kSelectThreads threads; dynamic shared
// memory SelectSmem(p2, k', k).bytes (<= 37 KiB at k' = k = 1024) plus 1 KiB of histogram.
// Traffic: the (token, head)'s 2n sub-scores (8n bytes) are read once per radix pass (usually
// 2-4 passes, from L1 after the first) plus the gather; k ids, scores and gates written. The
// k'^2 merge candidates live only in registers.
__global__ void __launch_bounds__(kSelectThreads) route_select_kernel(SelectArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ unsigned hist[kBins];
  __shared__ SelectState st;
  __shared__ double softmax_max;
  __shared__ double softmax_sum;

  const SelectSmem layout(a.p2, a.kp, a.k);
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem + layout.keys);
  double* exps = reinterpret_cast<double*>(smem + layout.exps);
  float* list_score = reinterpret_cast<float*>(smem + layout.list_score);
  int32_t* list_index = reinterpret_cast<int32_t*>(smem + layout.list_index);
  float* top_score = reinterpret_cast<float*>(smem + layout.top_score);

  const int64_t row = blockIdx.x;  // token * h + head
  const int tid = threadIdx.x;
  const int kp = a.kp;
  const int k = a.k;
  const int64_t n = a.n;
  const float* s0 = a.sub_scores + row * 2 * n;
  const float* s1 = s0 + n;

  // Each half's top-k' by (score desc, index asc); the lists keep the raw sub-scores.
  for (int half = 0; half < 2; ++half) {
    const float* s = half == 0 ? s0 : s1;
    block_select_top(
        n, kp, a.p2, [s](int64_t i) { return route_key(__ldg(s + i), static_cast<uint32_t>(i)); },
        keys, hist, &st);
    for (int j = tid; j < kp; j += blockDim.x) {
      const uint32_t i = route_key_id(keys[j]);
      list_index[half * kp + j] = static_cast<int32_t>(i);
      list_score[half * kp + j] = s[i];
    }
    __syncthreads();  // lists written; keys free again
  }

  // The top-k of the k'^2 candidates (a, b): score list0[a] + list1[b] (the oracle's fp32 sum),
  // id i*n + j < 2^32 (n <= 65536).
  // m < k'^2 <= 2^20: 32-bit division (the 64-bit one is a long software sequence).
  const auto candidate_key = [=](int64_t m) {
    const int mi = static_cast<int>(m);
    const int ia = mi / kp;
    const int ib = mi - ia * kp;
    const float score = list_score[ia] + list_score[kp + ib];
    const uint32_t id = static_cast<uint32_t>(list_index[ia]) * static_cast<uint32_t>(n) +
                        static_cast<uint32_t>(list_index[kp + ib]);
    return route_key(score, id);
  };
  block_select_top(static_cast<int64_t>(kp) * kp, k, a.p2, candidate_key, keys, hist, &st);

  // Slots best first. The score is recomputed from the raw sub-scores (the key folded -0 to +0).
  int64_t* ids = a.ids + row * k;
  float* scores = a.scores + row * k;
  float* gates = a.gates + row * k;
  for (int j = tid; j < k; j += blockDim.x) {
    const uint32_t id = route_key_id(keys[j]);
    const float score = s0[id / n] + s1[id % n];
    ids[j] = id;
    scores[j] = score;
    top_score[j] = score;
  }
  __syncthreads();

  // Gates: gates_ref's math (kernels/peer.h), in double with one rounding, sums in slot order.
  switch (a.gate) {
    case Gate::kSoftmax: {
      if (tid == 0) {
        double mx = top_score[0];
        for (int j = 1; j < k; ++j) {
          const double v = top_score[j];
          mx = v > mx ? v : mx;
        }
        softmax_max = mx;
      }
      __syncthreads();
      for (int j = tid; j < k; j += blockDim.x) exps[j] = exp(top_score[j] - softmax_max);
      __syncthreads();
      if (tid == 0) {
        double sum = 0;
        for (int j = 0; j < k; ++j) sum += exps[j];
        softmax_sum = sum;
      }
      __syncthreads();
      for (int j = tid; j < k; j += blockDim.x)
        gates[j] = static_cast<float>(exps[j] / softmax_sum);
      break;
    }
    case Gate::kRelu:
      for (int j = tid; j < k; j += blockDim.x) gates[j] = top_score[j] > 0 ? top_score[j] : 0.0f;
      break;
    case Gate::kSigmoid:
      for (int j = tid; j < k; j += blockDim.x) {
        gates[j] = static_cast<float>(1.0 / (1.0 + exp(-static_cast<double>(top_score[j]))));
      }
      break;
  }
}

// ---- the warp-per-row selection (k', k <= 32) -------------------------------------------------

constexpr int kWarpSelectMax = 32;   // the largest k' and k the warp path takes
constexpr int kWarpSelectWarps = 8;  // rows per block

// Inserts `key` into the descending list l[0, CAP) if it beats l[CAP-1]: one branch-free bubble
// pass from the bottom (the list is sorted except for the slot just written).
template <int CAP>
__device__ __forceinline__ void list_insert(uint64_t (&l)[CAP], uint64_t key) {
  l[CAP - 1] = key > l[CAP - 1] ? key : l[CAP - 1];
#pragma unroll
  for (int j = CAP - 1; j > 0; --j) {
    const uint64_t a = l[j - 1];
    const uint64_t b = l[j];
    l[j - 1] = a > b ? a : b;
    l[j] = a > b ? b : a;
  }
}

// out[0, count) = the `count` largest keys over the warp's lists, descending. Each round takes
// the warp-wide max of the lanes' heads; the keys are distinct, so one lane pops it (pads are 0
// and never win while real keys remain: count <= the number of real keys). Warp-uniform.
template <int CAP>
__device__ __forceinline__ void warp_take_top(uint64_t (&l)[CAP], int count, uint64_t* out,
                                              int lane) {
  for (int r = 0; r < count; ++r) {
    uint64_t best = l[0];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const uint64_t other = __shfl_xor_sync(kFullMask, best, offset);
      best = other > best ? other : best;
    }
    const bool pop = l[0] == best;
#pragma unroll
    for (int j = 0; j < CAP - 1; ++j) l[j] = pop ? l[j + 1] : l[j];
    l[CAP - 1] = pop ? kPadKey : l[CAP - 1];
    if (lane == 0) out[r] = best;
  }
  __syncwarp();
}

// One warp's shared scratch.
struct WarpSelectSmem {
  uint64_t keys[kWarpSelectMax];
  double exps[kWarpSelectMax];
  float list_score[2 * kWarpSelectMax];
  int32_t list_index[2 * kWarpSelectMax];
  float top_score[kWarpSelectMax];
};

// Launch: grid = ceil(T*h / kWarpSelectWarps) blocks of kWarpSelectWarps warps, warp w of block b
// on row b * kWarpSelectWarps + w. No block barriers (a warp past the last row returns). CAP >=
// max(k', k). Traffic: the row's 2n sub-scores read once, k ids, scores and gates written.
template <int CAP>
__global__ void __launch_bounds__(kWarpSelectWarps * 32)
    route_select_warp_kernel(SelectArgs a, int64_t rows) {
  __shared__ WarpSelectSmem scratch[kWarpSelectWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpSelectWarps + warp;
  if (row >= rows) return;  // the whole warp
  WarpSelectSmem& w = scratch[warp];
  const int kp = a.kp;
  const int k = a.k;
  const int64_t n = a.n;
  const float* s0 = a.sub_scores + row * 2 * n;
  const float* s1 = s0 + n;

  // Each half's top-k' by (score desc, index asc); the lists keep the raw sub-scores.
  for (int half = 0; half < 2; ++half) {
    const float* s = half == 0 ? s0 : s1;
    uint64_t l[CAP];
#pragma unroll
    for (int j = 0; j < CAP; ++j) l[j] = kPadKey;
    for (int64_t i = lane; i < n; i += 32) {
      list_insert(l, route_key(__ldg(s + i), static_cast<uint32_t>(i)));
    }
    warp_take_top(l, kp, w.keys, lane);
    for (int j = lane; j < kp; j += 32) {
      const uint32_t i = route_key_id(w.keys[j]);
      w.list_index[half * kp + j] = static_cast<int32_t>(i);
      w.list_score[half * kp + j] = s[i];
    }
    __syncwarp();
  }

  // The top-k of the k'^2 candidates, as in route_select_kernel.
  {
    uint64_t l[CAP];
#pragma unroll
    for (int j = 0; j < CAP; ++j) l[j] = kPadKey;
    for (int m = lane; m < kp * kp; m += 32) {
      const int ia = m / kp;
      const int ib = m - ia * kp;
      const float score = w.list_score[ia] + w.list_score[kp + ib];
      const uint32_t id = static_cast<uint32_t>(w.list_index[ia]) * static_cast<uint32_t>(n) +
                          static_cast<uint32_t>(w.list_index[kp + ib]);
      list_insert(l, route_key(score, id));
    }
    warp_take_top(l, k, w.keys, lane);
  }

  int64_t* ids = a.ids + row * k;
  float* scores = a.scores + row * k;
  float* gates = a.gates + row * k;
  for (int j = lane; j < k; j += 32) {
    const uint32_t id = route_key_id(w.keys[j]);
    const float score = s0[id / n] + s1[id % n];
    ids[j] = id;
    scores[j] = score;
    w.top_score[j] = score;
  }
  __syncwarp();

  // Gates: route_select_kernel's math exactly (double, one rounding, sums in slot order).
  switch (a.gate) {
    case Gate::kSoftmax: {
      double mx = w.top_score[0];
      for (int j = 1; j < k; ++j) {
        const double v = w.top_score[j];
        mx = v > mx ? v : mx;
      }
      for (int j = lane; j < k; j += 32) w.exps[j] = exp(w.top_score[j] - mx);
      __syncwarp();
      double sum = 0;
      for (int j = 0; j < k; ++j) sum += w.exps[j];
      for (int j = lane; j < k; j += 32) gates[j] = static_cast<float>(w.exps[j] / sum);
      break;
    }
    case Gate::kRelu:
      for (int j = lane; j < k; j += 32) {
        gates[j] = w.top_score[j] > 0 ? w.top_score[j] : 0.0f;
      }
      break;
    case Gate::kSigmoid:
      for (int j = lane; j < k; j += 32) {
        gates[j] = static_cast<float>(1.0 / (1.0 + exp(-static_cast<double>(w.top_score[j]))));
      }
      break;
  }
}

unsigned int bias_blocks(int64_t total) {
  const int64_t blocks = (total + kBiasThreads - 1) / kBiasThreads;
  return static_cast<unsigned int>(std::min(blocks, kMaxBiasBlocks));
}

}  // namespace

Status launch_rms_norm(const float* x, const float* gamma, int64_t tokens, int64_t dim, float eps,
                       float* xhat, cudaStream_t stream) {
  rms_norm_kernel<<<static_cast<unsigned int>(tokens), kNormThreads, 0, stream>>>(x, gamma, dim,
                                                                                  eps, xhat);
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::ok_status();
}

Status query_projection(cublasHandle_t blas, const float* weight, const float* bias,
                        const float* xhat, int64_t tokens, int64_t dim, int64_t rows, float* q,
                        cudaStream_t stream) {
  // Column-major view: q^T (rows x T, ld rows) = W (stored dim x rows, ld dim)^T * xhat^T
  // (dim x T, ld dim).
  const float one = 1.0f;
  const float zero = 0.0f;
  const int m = static_cast<int>(rows);
  const int n = static_cast<int>(tokens);
  const int k = static_cast<int>(dim);
  TROVE_CUBLAS_RETURN_IF_ERROR(
      cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, weight, k, xhat, k, &zero, q, m));
  if (bias != nullptr) {
    const int64_t total = tokens * rows;
    add_bias_kernel<<<bias_blocks(total), kBiasThreads, 0, stream>>>(q, bias, total, rows);
    TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return Status::ok_status();
}

Status sub_key_scores(cublasHandle_t blas, const float* q, const float* keys, int64_t tokens,
                      const RouteShape& shape, float* sub_scores) {
  const float one = 1.0f;
  const float zero = 0.0f;
  const int64_t h = shape.heads;
  const int64_t n = shape.n_keys;
  const int64_t dk = shape.dim_key;
  const int64_t rows = h * 2 * dk;  // q's row length
  if (shape.shared_keys) {
    // Per half c, over the T*h (token, head) columns j: column j of q_c starts at
    // q + j*2dk + c*dk (ld 2dk); K_c = keys + c*n*dk is n rows of dk (stored dk x n, ld dk);
    // column j of the result goes to sub_scores + (j*2 + c)*n (ld 2n).
    for (int64_t c = 0; c < 2; ++c) {
      TROVE_CUBLAS_RETURN_IF_ERROR(cublasSgemm(
          blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(tokens * h),
          static_cast<int>(dk), &one, keys + c * n * dk, static_cast<int>(dk), q + c * dk,
          static_cast<int>(2 * dk), &zero, sub_scores + c * n, static_cast<int>(2 * n)));
    }
    return Status::ok_status();
  }
  // Batch b = head*2 + c over the T token columns: K_b = keys + b*n*dk, q_b column t at
  // q + t*rows + b*dk, result column t at sub_scores + (t*h*2 + b)*n (ld 2hn, batch stride n).
  TROVE_CUBLAS_RETURN_IF_ERROR(cublasSgemmStridedBatched(
      blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(tokens),
      static_cast<int>(dk), &one, keys, static_cast<int>(dk), n * dk, q, static_cast<int>(rows), dk,
      &zero, sub_scores, static_cast<int>(2 * h * n), n, static_cast<int>(2 * h)));
  return Status::ok_status();
}

size_t route_select_smem_bytes(const RouteShape& shape) {
  const int kp = static_cast<int>(shape.topk_per_half);
  const int k = static_cast<int>(shape.topk);
  return SelectSmem(next_pow2(std::max(kp, k)), kp, k).bytes;
}

Status launch_route_select(const float* sub_scores, int64_t tokens, const RouteShape& shape,
                           int64_t* ids, float* scores, float* gates, cudaStream_t stream) {
  SelectArgs a;
  a.sub_scores = sub_scores;
  a.n = shape.n_keys;
  a.kp = static_cast<int>(shape.topk_per_half);
  a.k = static_cast<int>(shape.topk);
  a.p2 = next_pow2(std::max(a.kp, a.k));
  a.gate = shape.gate;
  a.ids = ids;
  a.scores = scores;
  a.gates = gates;
  const int64_t rows = tokens * shape.heads;
  const int cap = std::max(a.kp, a.k);
  if (cap <= kWarpSelectMax) {
    const auto blocks = static_cast<unsigned int>((rows + kWarpSelectWarps - 1) / kWarpSelectWarps);
    constexpr unsigned int kThreads = kWarpSelectWarps * 32;
    if (cap <= 8) {
      route_select_warp_kernel<8><<<blocks, kThreads, 0, stream>>>(a, rows);
    } else if (cap <= 16) {
      route_select_warp_kernel<16><<<blocks, kThreads, 0, stream>>>(a, rows);
    } else {
      route_select_warp_kernel<32><<<blocks, kThreads, 0, stream>>>(a, rows);
    }
    TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return Status::ok_status();
  }
  const size_t smem = route_select_smem_bytes(shape);
  const auto blocks = static_cast<unsigned int>(rows);
  route_select_kernel<<<blocks, kSelectThreads, smem, stream>>>(a);
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::ok_status();
}

}  // namespace trove::cuda
