// The PEER backward pass on the GPU (kernels/cuda/peer_cuda_backward.h), the device twin of
// kernels/cpu/peer.cc's peer_backward: the same stages, the same summation orders where a sum
// has an order, with warp-tree dot products and cuBLAS for the dense parts.
//
// Shapes: T tokens, D = dim, Do = dim_out, h heads, k slots per head, S = T·h·k slots,
// rows = h·2·dk query rows, n sub-keys per half, hk key heads, U unique experts.
//
// Stages, all queued on one stream (one host synchronization, to learn U):
//   1  xhat = rms-norm(x)·γ (block per token), or x itself.       reads/writes T·D floats
//   2  q = xhat W_qᵀ (+ b_q): cuBLAS SGEMM [T, D] x [D, rows].
//   3  per slot (warp per slot): z = <u_e, xhat_t>, <v_e, dy_t> on the codes; then a, act'(z),
//      dz = g·<v,dy>·act'(z), dg = a·<v,dy>, ga = g·a.            reads each slot's record once
//   4  dxhat = Σ_slots dz·u_e (block per token, slots in order).   reads each record's down row
//   5  router (warp per (token, head)): dscore from the gate, ds per distinct sub-key (slot
//      order), dq += ds·K rows, and one "key term" (key row, ds) per distinct sub-key.
//   6  dxhat += dq W_q: cuBLAS SGEMM [T, rows] x [rows, D].
//   7  dx = dxhat, or the rms-norm backward (block per token).
//   8  dW_q = dqᵀ xhat: cuBLAS SGEMM; db_q = Σ_t dq (thread per row, tokens in order).
//   9  dγ = Σ_t dxhat·x·r (thread per column, tokens in order).
//   10 dK: key terms stably radix-sorted by key row (token order kept, as the CPU's counting
//      sort), run-length encoded, each key row's run summed by a warp.
//   11 d_down, d_up: (expert id, slot) stably radix-sorted, run-length encoded (the unique ids,
//      ascending, are PeerGrads::expert_ids), each expert's run summed in slot order by a
//      block: d_down[u] = Σ dz·xhat_t, d_up[u] = Σ ga·dy_t. No [N, D] buffer; no atomics.
//
// Sizes at the background configuration (T = 2048, D = Do = 2048, h = 4, k = 8, dk = 128,
// N = 4M int4): S = 65536 slots, U <= S; records staged once each (host entry) <= 151 MB;
// xhat, dxhat, q-sized buffers 16 MB each; d_down and d_up [U, D] up to 512 MB each (the
// output itself). All index arithmetic is int64; counts handed to CUB and cuBLAS are int and
// are bounded by the argument checks (S, 2S, T, rows, key rows < 2^31).
#include <cublas_v2.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <cub/cub.cuh>

#include "base/strings.h"
#include "kernels/cuda/blas.cuh"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/peer_cuda_backward.h"
#include "kernels/cuda/record_element.cuh"
#include "kernels/quant.h"

namespace trove::cuda {

namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
// Grids are capped; every kernel loops (grid-stride) over whatever is left.
constexpr int64_t kMaxBlocks = 65535;

unsigned int blocks_for(int64_t items, int64_t items_per_block) {
  const int64_t blocks = (items + items_per_block - 1) / items_per_block;
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, kMaxBlocks));
}

// Row-major C[M, N] = alpha · A[M, K] · B[K, N] + beta · C, with A stored transposed when
// a_transposed (then A is [K, M] row-major). cuBLAS is column-major: a row-major [R, C] matrix
// is a column-major [C, R] one, so C = A·B is computed as Cᵀ = Bᵀ·Aᵀ.
Status gemm_row_major(const BlasHandle& blas, bool a_transposed, bool b_transposed, int64_t M,
                      int64_t N, int64_t K, const float* A, const float* B, float beta, float* C) {
  const float alpha = 1.0f;
  const int lda = static_cast<int>(a_transposed ? M : K);
  const int ldb = static_cast<int>(b_transposed ? K : N);
  TROVE_CUBLAS_RETURN_IF_ERROR(cublasSgemm(
      blas.get(), b_transposed ? CUBLAS_OP_T : CUBLAS_OP_N,
      a_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(M),
      static_cast<int>(K), &alpha, B, ldb, A, lda, &beta, C, static_cast<int>(N)));
  return Status::ok_status();
}

// ---- device helpers ----------------------------------------------------------------------------

// Where the down and up rows of a width-1 record are.
struct RecordRows {
  int64_t down_scales;
  int64_t up_scales;
  int64_t down_codes;
  int64_t up_codes;
};

__device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarpSize / 2; o >= 1; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// The sum of v over the block, returned to every thread. `scratch` holds kWarpsPerBlock
// doubles. REQUIRES: blockDim.x == kThreads, called by every thread of the block.
__device__ double block_sum(double v, double* scratch) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  for (int o = kWarpSize / 2; o >= 1; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kWarpsPerBlock; ++w) total += scratch[w];  // same order in every thread
  __syncthreads();  // scratch may be reused right after
  return total;
}

// ---- kernels -----------------------------------------------------------------------------------

// Stage 1. Launch: blocks_for(T, 1) x kThreads; block per token (grid-stride). Reads x and γ,
// writes xhat [T, D] and inv_rms [T]: 2·T·D floats of traffic.
__global__ void __launch_bounds__(kThreads)
    rms_norm_kernel(const float* __restrict__ x, const float* __restrict__ gamma, int64_t T,
                    int64_t D, float eps, float* __restrict__ xhat, double* __restrict__ inv_rms) {
  __shared__ double scratch[kWarpsPerBlock];
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const float* xt = x + t * D;
    double ss = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) ss += static_cast<double>(xt[d]) * xt[d];
    ss = block_sum(ss, scratch);
    const double r = 1.0 / sqrt(ss / static_cast<double>(D) + static_cast<double>(eps));
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      xhat[t * D + d] = static_cast<float>(static_cast<double>(xt[d]) * r * gamma[d]);
    }
    if (threadIdx.x == 0) inv_rms[t] = r;
  }
}

// Stage 2's bias. Launch: blocks_for(T·rows, kThreads) x kThreads; q[t, r] = b[r].
__global__ void broadcast_rows_kernel(const float* __restrict__ bias, int64_t T, int64_t rows,
                                      float* __restrict__ q) {
  const int64_t total = T * rows;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    q[i] = bias[i % rows];
  }
}

// Stage 3. Launch: blocks_for(S, kWarpsPerBlock) x kThreads; one warp per slot (grid-stride
// over warps). Lane l reads elements l, l+32, ... of the slot's down and up rows: coalesced
// code bytes (int8: 32 B per warp step; int4: 16 B, each byte shared by two lanes), one
// broadcast scale per group, and the token's xhat and dy rows (L2 hits: a token's h·k slots
// are adjacent warps). Traffic: S records' useful bytes + S·(D + Do) floats mostly from L2.
template <DType kType>
__global__ void __launch_bounds__(kThreads)
    slot_kernel(const uint8_t* const* __restrict__ records, RecordRows rows, int64_t D, int64_t Do,
                const float* __restrict__ xhat, const float* __restrict__ dy,
                const float* __restrict__ gates, int64_t slots, int64_t per_token,
                Activation activation, float* __restrict__ slot_dz, float* __restrict__ slot_ga,
                double* __restrict__ slot_dg) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t first_warp =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t s = first_warp; s < slots; s += warps) {
    const uint8_t* rec = records[s];
    const int64_t t = s / per_token;
    const float* xt = xhat + t * D;
    const float* dyt = dy + t * Do;
    float z = 0.0f, v_dy = 0.0f;
    for (int64_t i = lane; i < D; i += kWarpSize) {
      z += row_element<kType>(rec + rows.down_scales, rec + rows.down_codes, i) * xt[i];
    }
    for (int64_t i = lane; i < Do; i += kWarpSize) {
      v_dy += row_element<kType>(rec + rows.up_scales, rec + rows.up_codes, i) * dyt[i];
    }
    z = warp_sum(z);
    v_dy = warp_sum(v_dy);
    if (lane == 0) {
      const double g = gates[s];
      const double a = activation_ref(activation, z);
      const double dz = g * v_dy * activation_grad_ref(activation, z);
      slot_dz[s] = static_cast<float>(dz);
      slot_ga[s] = static_cast<float>(g * a);
      slot_dg[s] = a * v_dy;
    }
  }
}

// Stage 4. Launch: blocks_for(T, 1) x kThreads; block per token (grid-stride). The token's
// slots are staged kThreads at a time in shared memory (record pointer, dz); thread j owns
// columns j, j + 256, ... and adds dz·u[d] over the slots in slot order (the CPU's order),
// keeping its partial sums in dxhat between chunks (no other thread touches them). Reads every
// slot's down row once (coalesced across the block) and writes T·D floats.
template <DType kType>
__global__ void __launch_bounds__(kThreads)
    expert_dxhat_kernel(const uint8_t* const* __restrict__ records, RecordRows rows, int64_t D,
                        const float* __restrict__ slot_dz, int64_t T, int64_t per_token,
                        float* __restrict__ dxhat) {
  __shared__ const uint8_t* s_rec[kThreads];
  __shared__ float s_dz[kThreads];
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t c0 = 0; c0 < per_token; c0 += kThreads) {
      const int cn = static_cast<int>(min_i64(kThreads, per_token - c0));
      if (static_cast<int>(threadIdx.x) < cn) {
        const int64_t s = t * per_token + c0 + threadIdx.x;
        s_rec[threadIdx.x] = records[s];
        s_dz[threadIdx.x] = slot_dz[s];
      }
      __syncthreads();
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = c0 == 0 ? 0.0f : dxhat[t * D + d];
        for (int j = 0; j < cn; ++j) {
          const float dz = s_dz[j];
          if (dz != 0.0f) {
            acc +=
                dz * row_element<kType>(s_rec[j] + rows.down_scales, s_rec[j] + rows.down_codes, d);
          }
        }
        dxhat[t * D + d] = acc;
      }
      __syncthreads();  // before the next chunk overwrites s_rec / s_dz
    }
  }
}

// What stage 5 needs of the layer.
struct RouterShape {
  int64_t T, h, k, n, dk, rows;
  bool shared_keys;
  Gate gate;
  int32_t no_key;  // the sentinel key row of a term that carries nothing (sorts last)
};

__device__ __forceinline__ int64_t sub_key(int64_t expert, int half, int64_t n) {
  return half == 0 ? expert / n : expert % n;
}

// d loss / d score of one slot (kernels/cpu/peer.cc's gate_backward).
__device__ __forceinline__ double dscore_of(Gate gate, float score, float g, double dg,
                                            double g_dg) {
  switch (gate) {
    case Gate::kSoftmax:
      return g * (dg - g_dg);
    case Gate::kRelu:
      return score > 0 ? dg : 0.0;
    case Gate::kSigmoid:
      return dg * g * (1.0 - g);
  }
  return 0.0;
}

// Stage 5. Launch: blocks_for(T·h, kWarpsPerBlock) x kThreads; one warp per (token, head).
// Per half, lane l takes slot c0 + l of each 32-slot chunk: its sub-key i; it "owns" i when no
// earlier slot has the same sub-key, and then sums the dscore of every slot with that sub-key
// in slot order (O(k²) reads of k values, L1-resident). Owned sums are applied in slot order:
// dq[t, head, half, :] += float(sum) · K[key row, :] (lanes over dk; the warp owns that dq
// segment, so no other warp writes it), and every slot writes its key term: term index
// ((t·h + head)·2 + half)·k + s, key row or no_key, float(sum). Traffic: S ids/scores/gates/dg
// reads, up to 2S key rows of dk floats, 2S terms written.
__global__ void __launch_bounds__(kThreads)
    router_backward_kernel(RouterShape r, const int64_t* __restrict__ ids,
                           const float* __restrict__ scores, const float* __restrict__ gates,
                           const double* __restrict__ slot_dg, const float* __restrict__ keys,
                           float* __restrict__ dq, int32_t* __restrict__ term_key,
                           float* __restrict__ term_ds) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t first_warp =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t th = first_warp; th < r.T * r.h; th += warps) {
    const int64_t t = th / r.h;
    const int64_t head = th % r.h;
    const int64_t base = th * r.k;
    double g_dg = 0.0;  // every lane sums the same terms in the same order
    if (r.gate == Gate::kSoftmax) {
      for (int64_t s = 0; s < r.k; ++s)
        g_dg += static_cast<double>(gates[base + s]) * slot_dg[base + s];
    }
    const int64_t hk = r.shared_keys ? 0 : head;
    for (int half = 0; half < 2; ++half) {
      float* dq_row = dq + t * r.rows + (head * 2 + half) * r.dk;
      const int64_t key_base = (hk * 2 + half) * r.n;
      for (int64_t c0 = 0; c0 < r.k; c0 += kWarpSize) {
        const int64_t s = c0 + lane;
        bool owner = false;
        double sum = 0.0;
        int64_t i = 0;
        if (s < r.k) {
          i = sub_key(ids[base + s], half, r.n);
          owner = true;
          for (int64_t s2 = 0; s2 < s && owner; ++s2)
            owner = sub_key(ids[base + s2], half, r.n) != i;
          if (owner) {
            for (int64_t s2 = s; s2 < r.k; ++s2) {
              if (sub_key(ids[base + s2], half, r.n) != i) continue;
              sum +=
                  dscore_of(r.gate, scores[base + s2], gates[base + s2], slot_dg[base + s2], g_dg);
            }
          }
          const bool carries = owner && sum != 0.0;
          const int64_t term = (th * 2 + half) * r.k + s;
          term_key[term] = carries ? static_cast<int32_t>(key_base + i) : r.no_key;
          term_ds[term] = static_cast<float>(sum);
        }
        const int chunk = static_cast<int>(min_i64(kWarpSize, r.k - c0));
        for (int l = 0; l < chunk; ++l) {
          const bool l_owner = __shfl_sync(kFullMask, owner ? 1 : 0, l) != 0;
          const double l_sum = __shfl_sync(kFullMask, sum, l);
          const long long l_i = __shfl_sync(kFullMask, static_cast<long long>(i), l);
          if (!l_owner || l_sum == 0.0) continue;
          const float fs = static_cast<float>(l_sum);
          const float* key = keys + (key_base + l_i) * r.dk;
          for (int64_t j = lane; j < r.dk; j += kWarpSize) dq_row[j] += fs * key[j];
        }
      }
    }
  }
}

// Stage 7 (rms). Launch: blocks_for(T, 1) x kThreads; block per token:
// dx = r·γ·dxhat - x·r³/D·Σ(γ·dxhat·x). Reads 3 rows, writes one.
__global__ void __launch_bounds__(kThreads)
    rms_backward_kernel(const float* __restrict__ x, const float* __restrict__ gamma,
                        const float* __restrict__ dxhat, const double* __restrict__ inv_rms,
                        int64_t T, int64_t D, float* __restrict__ dx) {
  __shared__ double scratch[kWarpsPerBlock];
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const float* xt = x + t * D;
    const float* gt = dxhat + t * D;
    double wx = 0.0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      wx += static_cast<double>(gamma[d]) * gt[d] * xt[d];
    }
    wx = block_sum(wx, scratch);
    const double r = inv_rms[t];
    const double c = r * r * r * wx / static_cast<double>(D);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      dx[t * D + d] = static_cast<float>(r * gamma[d] * gt[d] - xt[d] * c);
    }
  }
}

// Stage 8's bias and stage 9: out[c] = Σ_t a[t, c] (· b[t, c] · w[t]) over tokens in order, in
// double, one thread per column. Launch: blocks_for(cols, kThreads) x kThreads; consecutive
// threads read consecutive columns (coalesced), T·cols reads per operand.
__global__ void column_sum_kernel(const float* __restrict__ a, const float* __restrict__ b,
                                  const double* __restrict__ w, int64_t T, int64_t cols,
                                  float* __restrict__ out) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double acc = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      double term = a[t * cols + c];
      if (b != nullptr) term = term * b[t * cols + c] * w[t];
      acc += term;
    }
    out[c] = static_cast<float>(acc);
  }
}

// Slot or term indices 0..n-1, the values the sorts carry.
__global__ void iota_kernel(int32_t* __restrict__ out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<int32_t>(i);
  }
}

// Stage 10. Launch: blocks_for(2S, kWarpsPerBlock) x kThreads; one warp per run of the sorted
// key terms (grid-stride up to *num_runs, read on the device). The run of key row R sums
// float(ds)·q[t, head, half, :] over its terms in term order (= token order, as the CPU).
// Runs of no_key (terms that carry nothing) are skipped. dk floats read per term (q, L2) and
// written per key row.
__global__ void __launch_bounds__(kThreads)
    key_segment_kernel(RouterShape r, const int32_t* __restrict__ run_key,
                       const int32_t* __restrict__ run_start, const int32_t* __restrict__ run_count,
                       const int* __restrict__ num_runs, const int32_t* __restrict__ sorted_term,
                       const float* __restrict__ term_ds, const float* __restrict__ q,
                       float* __restrict__ d_keys) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t first_warp =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t runs = *num_runs;
  for (int64_t u = first_warp; u < runs; u += warps) {
    const int32_t key_row = run_key[u];
    if (key_row == r.no_key) continue;
    float* out = d_keys + static_cast<int64_t>(key_row) * r.dk;
    const int64_t begin = run_start[u], end = begin + run_count[u];
    for (int64_t j0 = lane; j0 < r.dk; j0 += kWarpSize) {
      float acc = 0.0f;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t term = sorted_term[p];
        const int64_t rest = term / r.k;  // (t·h + head)·2 + half
        const int64_t half = rest % 2;
        const int64_t th = rest / 2;
        const int64_t t = th / r.h, head = th % r.h;
        acc += term_ds[term] * q[t * r.rows + (head * 2 + half) * r.dk + j0];
      }
      out[j0] = acc;
    }
  }
}

// Stage 11. Launch: blocks_for(U, 1) x kThreads; block per unique expert u (grid-stride). Its
// run of slots (sorted by slot within the expert: the sort is stable) is staged kThreads at a
// time in shared memory (token, dz, ga); thread j owns columns j, j + 256, ... of d_down[u]
// and d_up[u] and adds the slots in slot order, keeping partial sums in the output between
// chunks. Reads one xhat row and one dy row per slot (coalesced), writes (D + Do) floats per
// expert. A hot expert is one long run for one block (at most T·h slots), never contention.
__global__ void __launch_bounds__(kThreads)
    expert_segment_kernel(const int32_t* __restrict__ run_start,
                          const int32_t* __restrict__ run_count, int64_t U,
                          const int32_t* __restrict__ sorted_slot,
                          const float* __restrict__ slot_dz, const float* __restrict__ slot_ga,
                          const float* __restrict__ xhat, const float* __restrict__ dy, int64_t D,
                          int64_t Do, int64_t per_token, float* __restrict__ d_down,
                          float* __restrict__ d_up) {
  __shared__ int64_t s_token[kThreads];
  __shared__ float s_dz[kThreads];
  __shared__ float s_ga[kThreads];
  for (int64_t u = blockIdx.x; u < U; u += gridDim.x) {
    const int64_t begin = run_start[u], count = run_count[u];
    float* down = d_down + u * D;
    float* up = d_up + u * Do;
    for (int64_t c0 = 0; c0 < count; c0 += kThreads) {
      const int cn = static_cast<int>(min_i64(kThreads, count - c0));
      if (static_cast<int>(threadIdx.x) < cn) {
        const int64_t slot = sorted_slot[begin + c0 + threadIdx.x];
        s_token[threadIdx.x] = slot / per_token;
        s_dz[threadIdx.x] = slot_dz[slot];
        s_ga[threadIdx.x] = slot_ga[slot];
      }
      __syncthreads();
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = c0 == 0 ? 0.0f : down[d];
        for (int j = 0; j < cn; ++j) {
          if (s_dz[j] != 0.0f) acc += s_dz[j] * xhat[s_token[j] * D + d];
        }
        down[d] = acc;
      }
      for (int64_t d = threadIdx.x; d < Do; d += blockDim.x) {
        float acc = c0 == 0 ? 0.0f : up[d];
        for (int j = 0; j < cn; ++j) {
          if (s_ga[j] != 0.0f) acc += s_ga[j] * dy[s_token[j] * Do + d];
        }
        up[d] = acc;
      }
      __syncthreads();  // before the next chunk overwrites the staged slots
    }
  }
}

// ---- the pipeline ------------------------------------------------------------------------------

// Number of low bits that hold every value in [0, max_value].
int bits_for(uint64_t max_value) {
  int bits = 1;
  while (bits < 64 && (max_value >> bits) != 0) ++bits;
  return bits;
}

template <typename T>
Status to_device(DeviceBuffer<T>* buf, const T* host, size_t count, cudaStream_t stream) {
  TROVE_ASSIGN_OR_RETURN(*buf, DeviceBuffer<T>::allocate(count));
  if (count > 0) {
    TROVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(buf->get(), host, count * sizeof(T), cudaMemcpyHostToDevice, stream));
  }
  return Status::ok_status();
}

template <typename T>
Status to_host(std::vector<T>* out, const DeviceBuffer<T>& buf, size_t count, cudaStream_t stream) {
  out->assign(count, T{});
  if (count > 0) {
    TROVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out->data(), buf.get(), count * sizeof(T), cudaMemcpyDeviceToHost, stream));
  }
  return Status::ok_status();
}

// Every buffer of one backward call; freed when the call returns (after the stream is idle).
struct Buffers {
  DeviceBuffer<float> x, dy, wq, bq, keys, gamma, scores, gates;
  DeviceBuffer<int64_t> ids;
  DeviceBuffer<uint8_t> slab;  // the distinct records, stride apart
  DeviceBuffer<const uint8_t*> records;
  DeviceBuffer<float> xhat, q, dq, dxhat, dx, dwq, dbq, dkeys, dgamma;
  DeviceBuffer<double> inv_rms, slot_dg;
  DeviceBuffer<float> slot_dz, slot_ga, term_ds;
  DeviceBuffer<int32_t> term_key, term_key_sorted, term_idx, term_sorted;
  DeviceBuffer<int32_t> key_runs, key_counts, key_starts;
  DeviceBuffer<int32_t> slot_idx, slot_sorted, expert_counts, expert_starts;
  DeviceBuffer<uint64_t> ids_sorted, expert_ids;
  DeviceBuffer<int> num_runs;        // [0]: key runs, [1]: expert runs
  DeviceBuffer<float> d_down, d_up;  // [U, D], [U, Do]
  DeviceBuffer<uint8_t> cub_temp;
};

template <DType kType>
Status launch_record_kernels_for(const Buffers& b, const RecordRows& rows, int64_t T, int64_t D,
                                 int64_t Do, int64_t S, int64_t per_token, Activation activation,
                                 cudaStream_t stream) {
  slot_kernel<kType><<<blocks_for(S, kWarpsPerBlock), kThreads, 0, stream>>>(
      b.records.get(), rows, D, Do, b.xhat.get(), b.dy.get(), b.gates.get(), S, per_token,
      activation, b.slot_dz.get(), b.slot_ga.get(), b.slot_dg.get());
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  expert_dxhat_kernel<kType><<<blocks_for(T, 1), kThreads, 0, stream>>>(
      b.records.get(), rows, D, b.slot_dz.get(), T, per_token, b.dxhat.get());
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::ok_status();
}

Status launch_record_kernels(DType dtype, const Buffers& b, const RecordRows& rows, int64_t T,
                             int64_t D, int64_t Do, int64_t S, int64_t per_token,
                             Activation activation, cudaStream_t stream) {
  switch (dtype) {
    case DType::kF32:
      return launch_record_kernels_for<DType::kF32>(b, rows, T, D, Do, S, per_token, activation,
                                                    stream);
    case DType::kF16:
      return launch_record_kernels_for<DType::kF16>(b, rows, T, D, Do, S, per_token, activation,
                                                    stream);
    case DType::kBF16:
      return launch_record_kernels_for<DType::kBF16>(b, rows, T, D, Do, S, per_token, activation,
                                                     stream);
    case DType::kI8:
      return launch_record_kernels_for<DType::kI8>(b, rows, T, D, Do, S, per_token, activation,
                                                   stream);
    case DType::kI4:
      return launch_record_kernels_for<DType::kI4>(b, rows, T, D, Do, S, per_token, activation,
                                                   stream);
    default:
      return Status::invalid_argument("cuda_peer_backward: record dtype " +
                                      std::string(dtype_name(dtype)) + " is not supported");
  }
}

// Stages 1-11 for T > 0 with every input checked; fills `grads`.
Status run_backward(const PeerConfig& c, const PeerRouterParams& params, const RecordLayout& layout,
                    const float* x, int64_t T, const PeerRouting& routing,
                    const uint8_t* const* records, const float* dy, PeerGrads* grads, Buffers& b,
                    cudaStream_t stream) {
  const int64_t D = c.dim, Do = c.dim_out, h = c.heads, k = c.topk, n = c.n_keys;
  const int64_t dk = c.dim_key, rows = c.query_rows(), per_token = h * k, S = T * per_token;
  const int64_t key_rows = c.key_heads() * 2 * n;
  const int64_t terms = 2 * S;
  const bool rms = c.input_norm == InputNorm::kRms;
  const auto sz = [](int64_t v) { return static_cast<size_t>(v); };

  // Inputs. The distinct records (by address) go to one slab; slot s points at its copy.
  TROVE_RETURN_IF_ERROR(to_device(&b.x, x, sz(T * D), stream));
  TROVE_RETURN_IF_ERROR(to_device(&b.dy, dy, sz(T * Do), stream));
  TROVE_RETURN_IF_ERROR(to_device(&b.wq, params.query_weight, sz(rows * D), stream));
  TROVE_RETURN_IF_ERROR(to_device(&b.keys, params.keys, sz(key_rows * dk), stream));
  TROVE_RETURN_IF_ERROR(to_device(&b.scores, routing.scores.data(), sz(S), stream));
  TROVE_RETURN_IF_ERROR(to_device(&b.gates, routing.gates.data(), sz(S), stream));
  TROVE_RETURN_IF_ERROR(to_device(&b.ids, routing.ids.data(), sz(S), stream));
  if (c.query_bias) TROVE_RETURN_IF_ERROR(to_device(&b.bq, params.query_bias, sz(rows), stream));
  if (rms) TROVE_RETURN_IF_ERROR(to_device(&b.gamma, params.norm_weight, sz(D), stream));

  std::unordered_map<const uint8_t*, size_t> index_of;
  std::vector<size_t> slot_record(sz(S));
  std::vector<const uint8_t*> distinct;
  for (int64_t s = 0; s < S; ++s) {
    auto [it, inserted] = index_of.try_emplace(records[s], distinct.size());
    if (inserted) distinct.push_back(records[s]);
    slot_record[sz(s)] = it->second;
  }
  std::vector<uint8_t> slab(distinct.size() * layout.stride);
  for (size_t r = 0; r < distinct.size(); ++r) {
    std::memcpy(slab.data() + r * layout.stride, distinct[r], layout.record_bytes);
  }
  TROVE_RETURN_IF_ERROR(to_device(&b.slab, slab.data(), slab.size(), stream));
  std::vector<const uint8_t*> slot_ptr(sz(S));
  for (int64_t s = 0; s < S; ++s) {
    slot_ptr[sz(s)] = b.slab.get() + slot_record[sz(s)] * layout.stride;
  }
  TROVE_RETURN_IF_ERROR(to_device(&b.records, slot_ptr.data(), slot_ptr.size(), stream));

  // Working buffers.
  TROVE_ASSIGN_OR_RETURN(b.xhat, DeviceBuffer<float>::allocate(sz(T * D)));
  TROVE_ASSIGN_OR_RETURN(b.q, DeviceBuffer<float>::allocate(sz(T * rows)));
  TROVE_ASSIGN_OR_RETURN(b.dq, DeviceBuffer<float>::allocate(sz(T * rows)));
  TROVE_ASSIGN_OR_RETURN(b.dxhat, DeviceBuffer<float>::allocate(sz(T * D)));
  TROVE_ASSIGN_OR_RETURN(b.dwq, DeviceBuffer<float>::allocate(sz(rows * D)));
  TROVE_ASSIGN_OR_RETURN(b.dkeys, DeviceBuffer<float>::allocate(sz(key_rows * dk)));
  TROVE_ASSIGN_OR_RETURN(b.slot_dz, DeviceBuffer<float>::allocate(sz(S)));
  TROVE_ASSIGN_OR_RETURN(b.slot_ga, DeviceBuffer<float>::allocate(sz(S)));
  TROVE_ASSIGN_OR_RETURN(b.slot_dg, DeviceBuffer<double>::allocate(sz(S)));
  TROVE_ASSIGN_OR_RETURN(b.term_ds, DeviceBuffer<float>::allocate(sz(terms)));
  TROVE_ASSIGN_OR_RETURN(b.term_key, DeviceBuffer<int32_t>::allocate(sz(terms)));
  TROVE_ASSIGN_OR_RETURN(b.term_key_sorted, DeviceBuffer<int32_t>::allocate(sz(terms)));
  TROVE_ASSIGN_OR_RETURN(b.term_idx, DeviceBuffer<int32_t>::allocate(sz(terms)));
  TROVE_ASSIGN_OR_RETURN(b.term_sorted, DeviceBuffer<int32_t>::allocate(sz(terms)));
  TROVE_ASSIGN_OR_RETURN(b.key_runs, DeviceBuffer<int32_t>::allocate(sz(terms)));
  TROVE_ASSIGN_OR_RETURN(b.key_counts, DeviceBuffer<int32_t>::allocate(sz(terms)));
  TROVE_ASSIGN_OR_RETURN(b.key_starts, DeviceBuffer<int32_t>::allocate(sz(terms)));
  TROVE_ASSIGN_OR_RETURN(b.slot_idx, DeviceBuffer<int32_t>::allocate(sz(S)));
  TROVE_ASSIGN_OR_RETURN(b.slot_sorted, DeviceBuffer<int32_t>::allocate(sz(S)));
  TROVE_ASSIGN_OR_RETURN(b.expert_counts, DeviceBuffer<int32_t>::allocate(sz(S)));
  TROVE_ASSIGN_OR_RETURN(b.expert_starts, DeviceBuffer<int32_t>::allocate(sz(S)));
  TROVE_ASSIGN_OR_RETURN(b.ids_sorted, DeviceBuffer<uint64_t>::allocate(sz(S)));
  TROVE_ASSIGN_OR_RETURN(b.expert_ids, DeviceBuffer<uint64_t>::allocate(sz(S)));
  TROVE_ASSIGN_OR_RETURN(b.num_runs, DeviceBuffer<int>::allocate(2));
  if (rms) {
    TROVE_ASSIGN_OR_RETURN(b.inv_rms, DeviceBuffer<double>::allocate(sz(T)));
    TROVE_ASSIGN_OR_RETURN(b.dx, DeviceBuffer<float>::allocate(sz(T * D)));
    TROVE_ASSIGN_OR_RETURN(b.dgamma, DeviceBuffer<float>::allocate(sz(D)));
  }
  if (c.query_bias) {
    TROVE_ASSIGN_OR_RETURN(b.dbq, DeviceBuffer<float>::allocate(sz(rows)));
  }

  // CUB's scratch: the largest any of the six calls below asks for. Routing ids are in
  // [0, N) (checked), so they sort as unsigned keys on their low bits only.
  const int id_bits = bits_for(static_cast<uint64_t>(c.num_experts() - 1));
  const int key_bits = bits_for(static_cast<uint64_t>(key_rows));  // no_key == key_rows
  const auto* ids_u = reinterpret_cast<const uint64_t*>(b.ids.get());
  size_t temp = 0, need = 0;
  TROVE_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(
      nullptr, need, b.term_key.get(), b.term_key_sorted.get(), b.term_idx.get(),
      b.term_sorted.get(), static_cast<int>(terms), 0, key_bits, stream));
  temp = std::max(temp, need);
  TROVE_CUDA_RETURN_IF_ERROR(cub::DeviceRunLengthEncode::Encode(
      nullptr, need, b.term_key_sorted.get(), b.key_runs.get(), b.key_counts.get(),
      b.num_runs.get(), static_cast<int>(terms), stream));
  temp = std::max(temp, need);
  TROVE_CUDA_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(
      nullptr, need, b.key_counts.get(), b.key_starts.get(), static_cast<int>(terms), stream));
  temp = std::max(temp, need);
  TROVE_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(
      nullptr, need, ids_u, b.ids_sorted.get(), b.slot_idx.get(), b.slot_sorted.get(),
      static_cast<int>(S), 0, id_bits, stream));
  temp = std::max(temp, need);
  TROVE_CUDA_RETURN_IF_ERROR(cub::DeviceRunLengthEncode::Encode(
      nullptr, need, b.ids_sorted.get(), b.expert_ids.get(), b.expert_counts.get(),
      b.num_runs.get() + 1, static_cast<int>(S), stream));
  temp = std::max(temp, need);
  TROVE_CUDA_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(
      nullptr, need, b.expert_counts.get(), b.expert_starts.get(), static_cast<int>(S), stream));
  temp = std::max(temp, need);
  // Never empty: CUB takes a null scratch pointer as a size query and would do nothing.
  temp = std::max<size_t>(temp, 16);
  TROVE_ASSIGN_OR_RETURN(b.cub_temp, DeviceBuffer<uint8_t>::allocate(temp));

  // Pedantic fp32 (blas.cuh): the gradients are compared with an fp32 oracle.
  TROVE_ASSIGN_OR_RETURN(BlasHandle blas, BlasHandle::create(stream, CUBLAS_PEDANTIC_MATH));

  // 1. xhat.
  if (rms) {
    rms_norm_kernel<<<blocks_for(T, 1), kThreads, 0, stream>>>(
        b.x.get(), b.gamma.get(), T, D, c.norm_eps, b.xhat.get(), b.inv_rms.get());
    TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  } else {
    TROVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(b.xhat.get(), b.x.get(), b.x.bytes(), cudaMemcpyDeviceToDevice, stream));
  }
  // 2. q = xhat W_qᵀ + b_q.
  if (c.query_bias) {
    broadcast_rows_kernel<<<blocks_for(T * rows, kThreads), kThreads, 0, stream>>>(b.bq.get(), T,
                                                                                   rows, b.q.get());
    TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  TROVE_RETURN_IF_ERROR(gemm_row_major(blas, false, true, T, rows, D, b.xhat.get(), b.wq.get(),
                                       c.query_bias ? 1.0f : 0.0f, b.q.get()));
  // 3, 4. Per slot, then dxhat from the experts.
  const RecordRows rec_rows{static_cast<int64_t>(layout.down_scales_offset),
                            static_cast<int64_t>(layout.up_scales_offset),
                            static_cast<int64_t>(layout.down_codes_offset),
                            static_cast<int64_t>(layout.up_codes_offset)};
  TROVE_RETURN_IF_ERROR(launch_record_kernels(layout.dtype, b, rec_rows, T, D, Do, S, per_token,
                                              c.activation, stream));
  // 5. Router.
  const RouterShape rs{T, h, k, n, dk, rows, c.shared_keys, c.gate, static_cast<int32_t>(key_rows)};
  TROVE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(b.dq.get(), 0, b.dq.bytes(), stream));
  router_backward_kernel<<<blocks_for(T * h, kWarpsPerBlock), kThreads, 0, stream>>>(
      rs, b.ids.get(), b.scores.get(), b.gates.get(), b.slot_dg.get(), b.keys.get(), b.dq.get(),
      b.term_key.get(), b.term_ds.get());
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  // 6. dxhat += dq W_q.
  TROVE_RETURN_IF_ERROR(
      gemm_row_major(blas, false, false, T, D, rows, b.dq.get(), b.wq.get(), 1.0f, b.dxhat.get()));
  // 7. dx.
  if (rms) {
    rms_backward_kernel<<<blocks_for(T, 1), kThreads, 0, stream>>>(
        b.x.get(), b.gamma.get(), b.dxhat.get(), b.inv_rms.get(), T, D, b.dx.get());
    TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  // 8. dW_q = dqᵀ xhat, db_q = Σ_t dq.
  TROVE_RETURN_IF_ERROR(
      gemm_row_major(blas, true, false, rows, D, T, b.dq.get(), b.xhat.get(), 0.0f, b.dwq.get()));
  if (c.query_bias) {
    column_sum_kernel<<<blocks_for(rows, kThreads), kThreads, 0, stream>>>(
        b.dq.get(), nullptr, nullptr, T, rows, b.dbq.get());
    TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  // 9. dγ = Σ_t dxhat · x · r.
  if (rms) {
    column_sum_kernel<<<blocks_for(D, kThreads), kThreads, 0, stream>>>(
        b.dxhat.get(), b.x.get(), b.inv_rms.get(), T, D, b.dgamma.get());
    TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  // 10. dK: sort the key terms by key row, sum each row's run.
  void* tmp = b.cub_temp.get();
  iota_kernel<<<blocks_for(terms, kThreads), kThreads, 0, stream>>>(b.term_idx.get(), terms);
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  TROVE_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(
      tmp, temp, b.term_key.get(), b.term_key_sorted.get(), b.term_idx.get(), b.term_sorted.get(),
      static_cast<int>(terms), 0, key_bits, stream));
  // Zeroed so the scan below reads no uninitialized count past the last run.
  TROVE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(b.key_counts.get(), 0, b.key_counts.bytes(), stream));
  TROVE_CUDA_RETURN_IF_ERROR(cub::DeviceRunLengthEncode::Encode(
      tmp, temp, b.term_key_sorted.get(), b.key_runs.get(), b.key_counts.get(), b.num_runs.get(),
      static_cast<int>(terms), stream));
  TROVE_CUDA_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(
      tmp, temp, b.key_counts.get(), b.key_starts.get(), static_cast<int>(terms), stream));
  TROVE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(b.dkeys.get(), 0, b.dkeys.bytes(), stream));
  key_segment_kernel<<<blocks_for(terms, kWarpsPerBlock), kThreads, 0, stream>>>(
      rs, b.key_runs.get(), b.key_starts.get(), b.key_counts.get(), b.num_runs.get(),
      b.term_sorted.get(), b.term_ds.get(), b.q.get(), b.dkeys.get());
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  // 11. Experts: sort (id, slot), encode the runs, learn U.
  iota_kernel<<<blocks_for(S, kThreads), kThreads, 0, stream>>>(b.slot_idx.get(), S);
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  TROVE_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(
      tmp, temp, ids_u, b.ids_sorted.get(), b.slot_idx.get(), b.slot_sorted.get(),
      static_cast<int>(S), 0, id_bits, stream));
  TROVE_CUDA_RETURN_IF_ERROR(cub::DeviceRunLengthEncode::Encode(
      tmp, temp, b.ids_sorted.get(), b.expert_ids.get(), b.expert_counts.get(),
      b.num_runs.get() + 1, static_cast<int>(S), stream));
  int unique_runs = 0;
  TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&unique_runs, b.num_runs.get() + 1, sizeof(int),
                                             cudaMemcpyDeviceToHost, stream));
  TROVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  const int64_t U = unique_runs;
  if (U < 1 || U > S) {
    return Status::io_error(
        str_printf("cuda_peer_backward: the device found %lld unique experts "
                   "among %lld slots",
                   static_cast<long long>(U), static_cast<long long>(S)));
  }
  TROVE_CUDA_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(
      tmp, temp, b.expert_counts.get(), b.expert_starts.get(), static_cast<int>(U), stream));
  TROVE_ASSIGN_OR_RETURN(b.d_down, DeviceBuffer<float>::allocate(sz(U * D)));
  TROVE_ASSIGN_OR_RETURN(b.d_up, DeviceBuffer<float>::allocate(sz(U * Do)));
  expert_segment_kernel<<<blocks_for(U, 1), kThreads, 0, stream>>>(
      b.expert_starts.get(), b.expert_counts.get(), U, b.slot_sorted.get(), b.slot_dz.get(),
      b.slot_ga.get(), b.xhat.get(), b.dy.get(), D, Do, per_token, b.d_down.get(), b.d_up.get());
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());

  // Results.
  TROVE_RETURN_IF_ERROR(to_host(&grads->dx, rms ? b.dx : b.dxhat, sz(T * D), stream));
  TROVE_RETURN_IF_ERROR(to_host(&grads->d_query_weight, b.dwq, sz(rows * D), stream));
  grads->d_query_bias.clear();
  if (c.query_bias) TROVE_RETURN_IF_ERROR(to_host(&grads->d_query_bias, b.dbq, sz(rows), stream));
  TROVE_RETURN_IF_ERROR(to_host(&grads->d_keys, b.dkeys, sz(key_rows * dk), stream));
  grads->d_norm_weight.clear();
  if (rms) TROVE_RETURN_IF_ERROR(to_host(&grads->d_norm_weight, b.dgamma, sz(D), stream));
  std::vector<uint64_t> unique_ids;
  TROVE_RETURN_IF_ERROR(to_host(&unique_ids, b.expert_ids, sz(U), stream));
  TROVE_RETURN_IF_ERROR(to_host(&grads->d_down, b.d_down, sz(U * D), stream));
  TROVE_RETURN_IF_ERROR(to_host(&grads->d_up, b.d_up, sz(U * Do), stream));
  TROVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  grads->expert_ids.assign(unique_ids.begin(), unique_ids.end());
  return Status::ok_status();
}

// ---- argument checks -----------------------------------------------------------------------

Status invalid(const std::string& what) {
  return Status::invalid_argument("cuda_peer_backward: " + what);
}

constexpr int64_t kMaxIndex = (int64_t{1} << 31) - 1;  // CUB item counts and cuBLAS sizes

Status check_backward_args(const PeerConfig& c, const PeerRouterParams& params,
                           const RecordLayout& layout, const float* x, int64_t T,
                           const PeerRouting& routing, const uint8_t* const* records,
                           const float* dy, const PeerGrads* grads) {
  if (grads == nullptr) return invalid("grads is null");
  PeerConfig filled = c;
  TROVE_RETURN_IF_ERROR(filled.validate_and_fill().with_context("cuda_peer_backward: config"));
  if (filled.dim_out != c.dim_out || filled.topk_per_half != c.topk_per_half) {
    return invalid(
        str_printf("config must be validated first (dim_out %lld, topk_per_half %lld "
                   "left to their defaults)",
                   static_cast<long long>(c.dim_out), static_cast<long long>(c.topk_per_half)));
  }
  const DType t = layout.dtype;
  if (t != DType::kF32 && t != DType::kF16 && t != DType::kBF16 && t != DType::kI8 &&
      t != DType::kI4) {
    return invalid("record dtype " + std::string(dtype_name(t)) + " is not supported");
  }
  if (layout.dim != c.dim || layout.dim_out != c.dim_out || layout.width != 1) {
    return invalid(
        str_printf("record layout (dim %lld, dim_out %lld, width %lld) does not match "
                   "the config (dim %lld, dim_out %lld, width 1)",
                   static_cast<long long>(layout.dim), static_cast<long long>(layout.dim_out),
                   static_cast<long long>(layout.width), static_cast<long long>(c.dim),
                   static_cast<long long>(c.dim_out)));
  }
  if (layout.stride < layout.record_bytes || layout.stride % 16 != 0) {
    return invalid(
        str_printf("record stride %zu must be a multiple of 16 and at least "
                   "record_bytes %zu",
                   layout.stride, layout.record_bytes));
  }
  if (T < 0) return invalid(str_printf("T must be >= 0 (got %lld)", static_cast<long long>(T)));
  if (routing.tokens != T || routing.heads != c.heads || routing.topk != c.topk) {
    return invalid(
        str_printf("routing is [%lld, %lld, %lld]; expected [T %lld, heads %lld, topk "
                   "%lld]",
                   static_cast<long long>(routing.tokens), static_cast<long long>(routing.heads),
                   static_cast<long long>(routing.topk), static_cast<long long>(T),
                   static_cast<long long>(c.heads), static_cast<long long>(c.topk)));
  }
  const int64_t per_token = c.heads * c.topk;
  const int64_t key_rows = c.key_heads() * 2 * c.n_keys;
  if (T > kMaxIndex / 2 / per_token || c.query_rows() > kMaxIndex || key_rows >= kMaxIndex ||
      key_rows > kMaxIndex / c.dim_key || c.query_rows() > kMaxIndex / c.dim) {
    return Status::out_of_range(str_printf(
        "cuda_peer_backward: T %lld x heads %lld x topk %lld slots (twice that key terms), "
        "%lld query rows or %lld key rows exceed the 2^31 - 1 a launch can index",
        static_cast<long long>(T), static_cast<long long>(c.heads), static_cast<long long>(c.topk),
        static_cast<long long>(c.query_rows()), static_cast<long long>(key_rows)));
  }
  const auto slots = static_cast<size_t>(T * per_token);
  if (routing.ids.size() != slots || routing.scores.size() != slots ||
      routing.gates.size() != slots) {
    return invalid(str_printf("routing has %zu ids, %zu scores and %zu gates; expected %zu",
                              routing.ids.size(), routing.scores.size(), routing.gates.size(),
                              slots));
  }
  if (params.query_weight == nullptr) return invalid("params.query_weight is null");
  if (params.keys == nullptr) return invalid("params.keys is null");
  if ((params.query_bias != nullptr) != c.query_bias) {
    return invalid(c.query_bias ? "the config has a query bias but params.query_bias is null"
                                : "params.query_bias is set but the config has no query bias");
  }
  if (c.input_norm == InputNorm::kRms && params.norm_weight == nullptr) {
    return invalid("input_norm rms needs params.norm_weight (got null)");
  }
  if (T == 0) return Status::ok_status();
  if (x == nullptr) return invalid("x is null");
  if (dy == nullptr) return invalid("dy is null");
  if (records == nullptr) return invalid("records is null");
  const int64_t N = c.num_experts();
  for (size_t s = 0; s < slots; ++s) {
    const int64_t id = routing.ids[s];
    if (id < 0 || id >= N) {
      return invalid(str_printf("routing.ids[%zu] (token %lld) is %lld, outside [0, %lld)", s,
                                static_cast<long long>(static_cast<int64_t>(s) / per_token),
                                static_cast<long long>(id), static_cast<long long>(N)));
    }
    if (records[s] == nullptr) {
      return invalid(
          str_printf("records[%zu] (expert %lld) is null", s, static_cast<long long>(id)));
    }
  }
  return Status::ok_status();
}

}  // namespace

}  // namespace trove::cuda

namespace trove {

Status cuda_peer_backward(const PeerConfig& config, const PeerRouterParams& params,
                          const RecordLayout& layout, const float* x, int64_t T,
                          const PeerRouting& routing, const uint8_t* const* records,
                          const float* dy, PeerGrads* grads) {
  TROVE_RETURN_IF_ERROR(
      cuda::check_backward_args(config, params, layout, x, T, routing, records, dy, grads));
  const int64_t D = config.dim, rows = config.query_rows();
  const int64_t key_rows = config.key_heads() * 2 * config.n_keys;
  if (T == 0) {  // the oracle's empty-batch result; nothing to run
    const auto sz = [](int64_t v) { return static_cast<size_t>(v); };
    grads->dx.clear();
    grads->d_query_weight.assign(sz(rows * D), 0.0f);
    grads->d_query_bias.assign(config.query_bias ? sz(rows) : 0, 0.0f);
    grads->d_keys.assign(sz(key_rows * config.dim_key), 0.0f);
    grads->d_norm_weight.assign(config.input_norm == InputNorm::kRms ? sz(D) : 0, 0.0f);
    grads->expert_ids.clear();
    grads->d_down.clear();
    grads->d_up.clear();
    return Status::ok_status();
  }
  TROVE_RETURN_IF_ERROR(cuda::require_cuda_device().with_context("cuda_peer_backward"));
  TROVE_ASSIGN_OR_RETURN(cuda::Stream stream, cuda::Stream::create());
  // Declared after the stream and synchronized before they go: queued work may still read
  // them (and the host vectors) when an error returns early.
  cuda::Buffers buffers;
  const Status run = cuda::run_backward(config, params, layout, x, T, routing, records, dy, grads,
                                        buffers, stream.get());
  const Status finished = stream.synchronize();
  return run.ok() ? finished : run;
}

}  // namespace trove
