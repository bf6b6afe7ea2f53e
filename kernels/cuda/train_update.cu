// The stochastic-rounding update of int4 training records on the GPU (kernels/cuda/train_cuda.h),
// bit-identical to the CPU oracle (kernels/cpu/ref/train_ref.cc) and the CPU kernel
// (kernels/cpu/train.cc).
//
// Why the bits match. Every fp32 operation the oracle performs is done here with the
// correctly rounded intrinsic of that one operation, in the oracle's order:
//   Adagrad  lane sums of g² in double (__dmul_rn, __dadd_rn; each square is exact anyway),
//            lane l summing elements l, l+32, ... in increasing order; the fold
//            lane[l] += lane[l + o] for o = 16..1 is __shfl_down_sync (lane l < o reads lane
//            l + o's value of the same round, as the CPU loop does); mean = __ddiv_rn then
//            __double2float_rn; G = __fadd_rn(G, mean); a = __fdiv_rn(lr, __fadd_rn(
//            __fsqrt_rn(G), eps)).
//   Δ        -__fmul_rn(a, g).
//   scale    d = fp16 -> fp32 (__half2float, exact); init fp16(max|Δ| / 7) with __fdiv_rn and
//            __float2half_rn (round to nearest even, as base/half.cc's fp32_to_fp16); max is
//            order-free (fmaxf drops NaN as the CPU's std::max(acc, NaN) keeps acc).
//   v, k, u  v = __fdiv_rn(__fmul_rn(16, Δ), d); k = floorf(v) (exact); v - k = __fsub_rn
//            (exact); u from sr_uniform_from_prefix, the constexpr hash of kernels/train.h
//            itself (TROVE_HD), integer-only.
//   rescale  2d = __fmul_rn(2, d) (exact), SR halving in integers.
// The intrinsics cannot be contracted into FMAs; kernels/CMakeLists.txt also compiles this file
// with -fmad=false -ftz=false -prec-div=true -prec-sqrt=true so nothing else can be either, and
// no fp32 subnormal (a tiny Δ) is flushed. The CPU side does no contraction either: its
// products stand alone (kernels/train.h) and kernels/cpu/train.cc is compiled without -mfma.
//
// Why this shape. A record's update must be all or nothing (a record whose scale would overflow
// fp16 stays unchanged), and its groups are independent given each row's step size. So:
// one 256-thread block per record (a grid-stride loop over records), the record's
// record_bytes staged in shared memory with 16-byte loads, then
//   phase 1: one warp per row computes the row's step size (Adagrad's sum over the row),
//   phase 2: one warp per 32-element group (lane j = element j) runs the group's update
//            entirely in registers, with warp votes for "every candidate fits" and a warp max
//            for the scale init; a failing group records (group, kind, value) with a 64-bit
//            atomicMin so the lowest group - the one the CPU stops at - is reported,
//   phase 3: if no group failed, the staged record and the new accumulators are written back.
// Traffic per record (width 1, D = D_out = 2048, int8 training codes): 4.3 KB record read and
// written, 16 KB of gradients read (read twice under Adagrad; the second read is an L2 hit),
// 8 bytes of accumulators: about 25 KB, so the update runs at HBM speed (~190K records per
// millisecond at 4.8 TB/s on an H200) as long as enough records are in flight; a record is
// 128 groups over 8 warps.
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "base/strings.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/train_cuda.h"
#include "kernels/quant.h"
#include "kernels/train.h"

namespace trove::cuda {

namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kUpdateThreads = 256;
constexpr int kUpdateWarps = kUpdateThreads / kWarpSize;
// Blocks beyond this loop over records (grid-stride); ~60 resident blocks per SM's worth.
constexpr int64_t kMaxUpdateBlocks = 8192;
constexpr unsigned long long kNoFailure = ~0ull;
// The largest finite fp16 (base/half.h's kFp16Max; that header is C++20 and .cu files are not).
constexpr float kFp16Max = 65504.0f;

static_assert(kQuantGroup == kWarpSize, "one lane per element of a quantization group");

// The record geometry the kernels need, as plain integers.
struct Geometry {
  int64_t dim;
  int64_t dim_out;
  int64_t width;
  int64_t down_groups;  // per row
  int64_t up_groups;
  int64_t down_scales_offset;
  int64_t up_scales_offset;
  int64_t down_codes_offset;
  int64_t up_codes_offset;
  int64_t down_row_code_bytes;
  int64_t up_row_code_bytes;
  int64_t record_bytes;
  int64_t stride;
};

Geometry geometry_of(const RecordLayout& l) {
  Geometry g;
  g.dim = l.dim;
  g.dim_out = l.dim_out;
  g.width = l.width;
  g.down_groups = quant_groups(l.dim);
  g.up_groups = quant_groups(l.dim_out);
  g.down_scales_offset = static_cast<int64_t>(l.down_scales_offset);
  g.up_scales_offset = static_cast<int64_t>(l.up_scales_offset);
  g.down_codes_offset = static_cast<int64_t>(l.down_codes_offset);
  g.up_codes_offset = static_cast<int64_t>(l.up_codes_offset);
  g.down_row_code_bytes = static_cast<int64_t>(l.down_row_code_bytes);
  g.up_row_code_bytes = static_cast<int64_t>(l.up_row_code_bytes);
  g.record_bytes = static_cast<int64_t>(l.record_bytes);
  g.stride = static_cast<int64_t>(l.stride);
  return g;
}

// What the update kernel reports per record. failure: kNoFailure, or
// (group << 33) | (kind << 32) | fp32 bits of the value, group = the record-wide group index
// (down rows' groups first), kind 0 = the scale init does not fit fp16 (value max|Δ|),
// kind 1 = doubling the scale would overflow fp16 (value d).
struct RecordOutcome {
  int64_t expert;
  unsigned long long elements_changed;
  unsigned long long rescales;
  unsigned long long scale_inits;
  unsigned long long clamps;
  unsigned long long failure;
};

// Dynamic shared memory of one update block: the staged record, then the rows' step sizes and
// new accumulators (2·width floats each).
__host__ __device__ int64_t staged_record_bytes(const Geometry& g) {
  return (g.record_bytes + 15) / 16 * 16;
}
int64_t update_smem_bytes(const Geometry& g) {
  return staged_record_bytes(g) + 2 * (2 * g.width) * static_cast<int64_t>(sizeof(float));
}

// Copies `bytes` bytes; both pointers 16-byte aligned. 16-byte words by all threads of the
// block, then the tail bytes.
__device__ void block_copy(unsigned char* __restrict__ dst, const unsigned char* __restrict__ src,
                           int64_t bytes) {
  const int64_t words = bytes / 16;
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) {
    reinterpret_cast<uint4*>(dst)[w] = reinterpret_cast<const uint4*>(src)[w];
  }
  for (int64_t b = words * 16 + threadIdx.x; b < bytes; b += blockDim.x) dst[b] = src[b];
}

__device__ __forceinline__ float fp16_bits_to_float(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}
__device__ __forceinline__ uint16_t float_to_fp16_bits(float f) {
  return __half_as_ushort(__float2half_rn(f));
}

// Launch: grid min(count, kMaxUpdateBlocks) x kUpdateThreads, dynamic shared memory
// update_smem_bytes(g). Block b updates records b, b + gridDim.x, ... (see the file comment).
__global__ void __launch_bounds__(kUpdateThreads)
    train_update_kernel(Geometry g, TrainStep st, const int64_t* __restrict__ experts,
                        int64_t count, const float* __restrict__ down_grad,
                        const float* __restrict__ up_grad, uint8_t* __restrict__ records,
                        float* __restrict__ accum, RecordOutcome* __restrict__ outcomes) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ unsigned long long s_failure, s_changed, s_rescales, s_inits, s_clamps;

  unsigned char* rec = smem;
  float* s_step = reinterpret_cast<float*>(smem + staged_record_bytes(g));  // [2m]
  float* s_accum = s_step + 2 * g.width;                                    // [2m]
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t m = g.width;
  const bool adagrad = st.optimizer == TrainOptimizer::kAdagrad;

  for (int64_t i = blockIdx.x; i < count; i += gridDim.x) {
    uint8_t* global_rec = records + i * g.stride;
    if (threadIdx.x == 0) {
      s_failure = kNoFailure;
      s_changed = s_rescales = s_inits = s_clamps = 0;
    }
    block_copy(rec, global_rec, g.record_bytes);
    const int64_t expert = experts[i];
    const uint64_t prefix = sr_prefix(st.seed, st.step, st.table, static_cast<uint64_t>(expert));
    const float* dg = down_grad + i * m * g.dim;
    const float* ug = up_grad + i * m * g.dim_out;

    // Phase 1: per row r (down rows 0..m-1, up rows m..2m-1) the step size a.
    for (int64_t r = warp; r < 2 * m; r += kUpdateWarps) {
      if (!adagrad) {
        if (lane == 0) s_step[r] = st.lr;
        continue;
      }
      const bool down = r < m;
      const int64_t n = down ? g.dim : g.dim_out;
      const float* grad = down ? dg + r * g.dim : ug + (r - m) * g.dim_out;
      double lane_sum = 0.0;
      for (int64_t e = lane; e < n; e += kWarpSize) {
        const double x = grad[e];
        lane_sum = __dadd_rn(lane_sum, __dmul_rn(x, x));
      }
      for (int o = kWarpSize / 2; o >= 1; o /= 2) {
        lane_sum = __dadd_rn(lane_sum, __shfl_down_sync(kFullMask, lane_sum, o));
      }
      if (lane == 0) {
        const float mean = __double2float_rn(__ddiv_rn(lane_sum, static_cast<double>(n)));
        const float acc = __fadd_rn(accum[i * 2 * m + r], mean);
        s_accum[r] = acc;
        s_step[r] = __fdiv_rn(st.lr, __fadd_rn(__fsqrt_rn(acc), st.eps));
      }
    }
    __syncthreads();  // the staged record and the step sizes are ready

    // Phase 2: one warp per group; gg counts the down rows' groups, then the up rows'.
    const int64_t down_total = m * g.down_groups;
    const int64_t total = down_total + m * g.up_groups;
    for (int64_t gg = warp; gg < total; gg += kUpdateWarps) {
      const bool down = gg < down_total;
      const int64_t row = down ? gg / g.down_groups : (gg - down_total) / g.up_groups;
      const int64_t grp = down ? gg % g.down_groups : (gg - down_total) % g.up_groups;
      const int64_t n = down ? g.dim : g.dim_out;
      const float* grad = down ? dg + row * g.dim : ug + row * g.dim_out;
      uint16_t* scale_ptr = reinterpret_cast<uint16_t*>(
          rec + (down ? g.down_scales_offset + 2 * (row * g.down_groups + grp)
                      : g.up_scales_offset + 2 * (row * g.up_groups + grp)));
      int8_t* codes =
          reinterpret_cast<int8_t*>(rec +
                                    (down ? g.down_codes_offset + row * g.down_row_code_bytes
                                          : g.up_codes_offset + row * g.up_row_code_bytes) +
                                    grp * kQuantGroup);
      const int64_t first = grp * kQuantGroup;
      const bool real = first + lane < n;  // padding lanes carry their code unchanged
      const uint64_t e =
          static_cast<uint64_t>((down ? row * g.dim : m * g.dim + row * g.dim_out) + first + lane);
      const float a = s_step[down ? row : m + row];
      const float delta = real ? -__fmul_rn(a, grad[first + lane]) : 0.0f;
      const int before = real ? static_cast<int>(codes[lane]) : 0;
      int b = before;
      float d = fp16_bits_to_float(*scale_ptr);
      unsigned long long inits = 0, rescales = 0, clamps = 0;
      bool failed = false;
      unsigned kind = 0;
      float failed_value = 0.0f;

      if (d == 0.0f) {
        float max_abs = real ? fabsf(delta) : 0.0f;
        for (int o = kWarpSize / 2; o >= 1; o /= 2) {
          max_abs = fmaxf(max_abs, __shfl_xor_sync(kFullMask, max_abs, o));
        }
        if (max_abs == 0.0f) continue;  // warp-uniform: nothing to represent, group untouched
        const float init = __fdiv_rn(max_abs, 7.0f);
        if (!(init <= kFp16Max)) {
          failed = true;
          kind = 0;
          failed_value = max_abs;
        } else {
          uint16_t h = float_to_fp16_bits(init);
          if (h == 0) h = 1;  // smallest subnormal, 2^-24
          __syncwarp();
          if (lane == 0) *scale_ptr = h;
          d = fp16_bits_to_float(h);
          if (real) b = 0;
          inits = 1;
        }
      }

      for (uint64_t round = 1; !failed; ++round) {
        // This lane's overshoot outside [-128, 127] (kHugeOvershoot when |k| > 256); the
        // group's is the warp max, compared with the step's tolerance (0: any overshoot
        // rescales, SPEC §7 as written).
        constexpr int kHugeOvershoot = 1 << 20;
        int overshoot = 0;
        int c = b;
        if (real) {
          const float v = __fdiv_rn(__fmul_rn(16.0f, delta), d);
          const float k = floorf(v);
          const float u = sr_uniform_from_prefix(prefix, e);
          // |k| <= 256 keeps the int conversion defined; beyond, no tolerance suffices.
          if (!(fabsf(k) <= 256.0f)) {
            overshoot = kHugeOvershoot;
          } else {
            c = b + static_cast<int>(k) + (u < __fsub_rn(v, k) ? 1 : 0);
            overshoot = max(0, max(c - 127, -128 - c));
          }
        }
        const int group_overshoot = __reduce_max_sync(kFullMask, overshoot);
        if (group_overshoot <= st.saturation_tolerance) {
          b = min(127, max(-128, c));
          if (group_overshoot > 0) ++clamps;
          break;
        }
        const float doubled = __fmul_rn(2.0f, d);
        if (!(fabsf(doubled) <= kFp16Max)) {
          failed = true;
          kind = 1;
          failed_value = d;
          break;
        }
        d = doubled;
        if (lane == 0) *scale_ptr = float_to_fp16_bits(d);
        if (real) {
          const float u = sr_uniform_from_prefix(prefix, sr_rescale_element(e, round));
          b = (b >> 1) + (((b & 1) != 0 && u < 0.5f) ? 1 : 0);  // floor(b/2) + [u < frac]
        }
        ++rescales;
      }

      if (failed) {
        if (lane == 0) {
          const unsigned long long key = (static_cast<unsigned long long>(gg) << 33) |
                                         (static_cast<unsigned long long>(kind) << 32) |
                                         __float_as_uint(failed_value);
          atomicMin(&s_failure, key);
        }
        continue;
      }
      if (real) codes[lane] = static_cast<int8_t>(b);
      const unsigned changed = __ballot_sync(kFullMask, real && b != before);
      if (lane == 0) {
        atomicAdd(&s_changed, static_cast<unsigned long long>(__popc(changed)));
        if (rescales != 0) atomicAdd(&s_rescales, rescales);
        if (inits != 0) atomicAdd(&s_inits, inits);
        if (clamps != 0) atomicAdd(&s_clamps, clamps);
      }
    }
    __syncthreads();  // every group is done

    // Phase 3: all or nothing.
    const bool ok = s_failure == kNoFailure;
    if (ok) {
      block_copy(global_rec, rec, g.record_bytes);
      if (adagrad) {
        for (int64_t r = threadIdx.x; r < 2 * m; r += blockDim.x) accum[i * 2 * m + r] = s_accum[r];
      }
    }
    if (threadIdx.x == 0) {
      RecordOutcome out;
      out.expert = expert;
      out.elements_changed = ok ? s_changed : 0;
      out.rescales = ok ? s_rescales : 0;
      out.scale_inits = ok ? s_inits : 0;
      out.clamps = ok ? s_clamps : 0;
      out.failure = s_failure;
      outcomes[i] = out;
    }
    __syncthreads();  // before the next record reuses the shared memory
  }
}

// Launch: grid min(count, kMaxUpdateBlocks) x kUpdateThreads, no dynamic shared memory.
// bad[i] = 1 when record i has any input check_train_record rejects: a negative expert, a
// non-finite gradient or scale, or (Adagrad) a negative or non-finite accumulator. One pass
// over the gradients (coalesced), the scales and the accumulators.
__global__ void __launch_bounds__(kUpdateThreads)
    check_inputs_kernel(Geometry g, bool adagrad, const int64_t* __restrict__ experts,
                        int64_t count, const float* __restrict__ down_grad,
                        const float* __restrict__ up_grad, const uint8_t* __restrict__ records,
                        const float* __restrict__ accum, uint8_t* __restrict__ bad) {
  const int64_t m = g.width;
  const int64_t down_n = m * g.dim, up_n = m * g.dim_out;
  const int64_t scales = m * (g.down_groups + g.up_groups);
  for (int64_t i = blockIdx.x; i < count; i += gridDim.x) {
    bool any = threadIdx.x == 0 && experts[i] < 0;
    for (int64_t j = threadIdx.x; j < down_n; j += blockDim.x) {
      any |= !isfinite(down_grad[i * down_n + j]);
    }
    for (int64_t j = threadIdx.x; j < up_n; j += blockDim.x) {
      any |= !isfinite(up_grad[i * up_n + j]);
    }
    const uint8_t* rec = records + i * g.stride + g.down_scales_offset;
    for (int64_t s = threadIdx.x; s < scales; s += blockDim.x) {
      const uint16_t h = static_cast<uint16_t>(rec[2 * s] | (rec[2 * s + 1] << 8));
      any |= (h & 0x7c00u) == 0x7c00u;  // inf or NaN
    }
    if (adagrad) {
      for (int64_t r = threadIdx.x; r < 2 * m; r += blockDim.x) {
        const float a = accum[i * 2 * m + r];
        any |= !(a >= 0.0f) || !isfinite(a);
      }
    }
    const int flagged = __syncthreads_or(any ? 1 : 0);
    if (threadIdx.x == 0) bad[i] = flagged != 0 ? 1 : 0;
  }
}

unsigned int blocks_for(int64_t count) {
  return static_cast<unsigned int>(std::min(count, kMaxUpdateBlocks));
}

// The CPU's message for a scale that cannot take the update (kernels/cpu/train.cc).
Status overflow_status(const Geometry& g, const RecordOutcome& o) {
  const unsigned long long gg = o.failure >> 33;
  const unsigned kind = static_cast<unsigned>((o.failure >> 32) & 1u);
  const auto bits = static_cast<uint32_t>(o.failure & 0xffffffffull);
  float value = 0.0f;
  std::memcpy(&value, &bits, sizeof value);
  const auto down_total = static_cast<unsigned long long>(g.width * g.down_groups);
  const bool down = gg < down_total;
  const auto per_row = static_cast<unsigned long long>(down ? g.down_groups : g.up_groups);
  const unsigned long long within = down ? gg : gg - down_total;
  const auto row = static_cast<long long>(within / per_row);
  const auto grp = static_cast<long long>(within % per_row);
  const auto expert = static_cast<long long>(o.expert);
  const char* name = down ? "down" : "up";
  if (kind == 0) {
    return Status::out_of_range(
        str_printf("expert %lld: %s row %lld group %lld: an update of %g does not fit an fp16 "
                   "scale (lower the learning rate)",
                   expert, name, row, grp, static_cast<double>(value)));
  }
  return Status::out_of_range(
      str_printf("expert %lld: %s row %lld group %lld saturates with its scale at %g, and "
                 "doubling it would overflow fp16 (the update is too large: lower the learning "
                 "rate)",
                 expert, name, row, grp, static_cast<double>(value)));
}

// OK when one record's staging fits a block's shared memory on the current device; raises the
// kernel's dynamic shared memory limit past the default 48 KiB when needed.
Status prepare_update_kernel(const Geometry& g) {
  int device = 0;
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  int optin = 0;
  TROVE_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t need = update_smem_bytes(g);
  // The kernel's static shared memory (four counters) comes on top of the dynamic part.
  constexpr int64_t kStaticSmem = 4 * sizeof(unsigned long long);
  if (need + kStaticSmem > optin) {
    return Status::not_supported(str_printf(
        "cuda_train_update_records: a training record of %lld bytes (dim %lld, dim_out %lld, "
        "width %lld) needs %lld bytes of shared memory per block; this device allows %d",
        static_cast<long long>(g.record_bytes), static_cast<long long>(g.dim),
        static_cast<long long>(g.dim_out), static_cast<long long>(g.width),
        static_cast<long long>(need + kStaticSmem), optin));
  }
  TROVE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      train_update_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(need)));
  return Status::ok_status();
}

// The first record the device flags, named with the CPU's check on a host copy of its inputs.
Status name_bad_record(const RecordLayout& l, const TrainStep& step, int64_t i,
                       const int64_t* experts, const float* down_grad, const float* up_grad,
                       const uint8_t* records, const float* accum, cudaStream_t stream) {
  const int64_t m = l.width;
  int64_t expert = 0;
  std::vector<float> down(static_cast<size_t>(m * l.dim)), up(static_cast<size_t>(m * l.dim_out));
  std::vector<uint8_t> rec(l.record_bytes);
  std::vector<float> acc(static_cast<size_t>(2 * m));
  const bool adagrad = step.optimizer == TrainOptimizer::kAdagrad;
  TROVE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(&expert, experts + i, sizeof expert, cudaMemcpyDeviceToHost, stream));
  TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(down.data(), down_grad + i * m * l.dim,
                                             down.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                             stream));
  TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(up.data(), up_grad + i * m * l.dim_out,
                                             up.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                             stream));
  TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(rec.data(),
                                             records + static_cast<size_t>(i) * l.stride,
                                             rec.size(), cudaMemcpyDeviceToHost, stream));
  if (adagrad) {
    TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
        acc.data(), accum + i * 2 * m, acc.size() * sizeof(float), cudaMemcpyDeviceToHost, stream));
  }
  TROVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  const Status s = check_train_record(l, step, expert, down.data(), up.data(), rec.data(),
                                      adagrad ? acc.data() : nullptr);
  if (!s.ok()) return s;
  return Status::io_error(str_printf(
      "cuda_train_update_records: the device check flagged record %lld but the host check of "
      "its copy passes (device memory changed underneath?)",
      static_cast<long long>(i)));
}

// The update of `count` (> 0) records in device memory, on `stream`; waits for it.
Result<TrainStats> run_update(const RecordLayout& l, const TrainStep& step, const int64_t* experts,
                              int64_t count, const float* down_grad, const float* up_grad,
                              uint8_t* records, float* accum, bool check_on_device,
                              cudaStream_t stream) {
  const Geometry g = geometry_of(l);
  TROVE_RETURN_IF_ERROR(prepare_update_kernel(g));
  const bool adagrad = step.optimizer == TrainOptimizer::kAdagrad;
  const unsigned int blocks = blocks_for(count);

  if (check_on_device) {
    TROVE_ASSIGN_OR_RETURN(auto bad, DeviceBuffer<uint8_t>::allocate(static_cast<size_t>(count)));
    check_inputs_kernel<<<blocks, kUpdateThreads, 0, stream>>>(
        g, adagrad, experts, count, down_grad, up_grad, records, accum, bad.get());
    TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    std::vector<uint8_t> flags(static_cast<size_t>(count));
    TROVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(flags.data(), bad.get(), flags.size(), cudaMemcpyDeviceToHost, stream));
    TROVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    const auto first = std::find(flags.begin(), flags.end(), uint8_t{1});
    if (first != flags.end()) {
      return name_bad_record(l, step, first - flags.begin(), experts, down_grad, up_grad, records,
                             accum, stream);
    }
  }

  TROVE_ASSIGN_OR_RETURN(auto outcomes,
                         DeviceBuffer<RecordOutcome>::allocate(static_cast<size_t>(count)));
  train_update_kernel<<<blocks, kUpdateThreads, static_cast<size_t>(update_smem_bytes(g)),
                        stream>>>(g, step, experts, count, down_grad, up_grad, records, accum,
                                  outcomes.get());
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  std::vector<RecordOutcome> host(static_cast<size_t>(count));
  TROVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host.data(), outcomes.get(), outcomes.bytes(),
                                             cudaMemcpyDeviceToHost, stream));
  TROVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));

  TrainStats total;
  for (const RecordOutcome& o : host) {
    if (o.failure != kNoFailure) return overflow_status(g, o);  // the lowest-indexed record
    total.elements_changed += static_cast<int64_t>(o.elements_changed);
    total.rescales += static_cast<int64_t>(o.rescales);
    total.clamps += static_cast<int64_t>(o.clamps);
    total.scale_inits += static_cast<int64_t>(o.scale_inits);
  }
  return total;
}

// The checks both entry points make before touching anything, in the CPU's order and words.
Status check_update_args(const RecordLayout& l, const TrainStep& step, const int64_t* experts,
                         int64_t count, const float* down_grad, const float* up_grad,
                         const uint8_t* records, const float* accum) {
  TROVE_RETURN_IF_ERROR(check_train_layout(l));
  TROVE_RETURN_IF_ERROR(check_train_step(step));
  if (count < 0) return Status::invalid_argument("record count must be >= 0");
  if (step.optimizer == TrainOptimizer::kAdagrad && accum == nullptr && count > 0) {
    return Status::invalid_argument("Adagrad needs the row accumulators (got none)");
  }
  if (count > 0 &&
      (experts == nullptr || down_grad == nullptr || up_grad == nullptr || records == nullptr)) {
    return Status::invalid_argument(
        std::string("cuda_train_update_records: null pointer for") +
        (experts == nullptr ? " experts" : "") + (down_grad == nullptr ? " down_grad" : "") +
        (up_grad == nullptr ? " up_grad" : "") + (records == nullptr ? " records" : "") + " with " +
        std::to_string(count) + " records");
  }
  // Every size below is then < 2^62 bytes: record_bytes <= 2^40 (RecordLayout::make), and one
  // launch's records must fit one device anyway.
  if (count > (int64_t{1} << 40) / static_cast<int64_t>(std::max<size_t>(l.stride, 1))) {
    return Status::out_of_range(
        str_printf("cuda_train_update_records: %lld records of stride %zu exceed 1 TiB",
                   static_cast<long long>(count), l.stride));
  }
  if (l.stride < l.record_bytes || l.stride % 16 != 0) {
    return Status::invalid_argument(
        str_printf("cuda_train_update_records: record stride %zu must be a multiple of 16 and "
                   "at least record_bytes %zu",
                   l.stride, l.record_bytes));
  }
  return Status::ok_status();
}

}  // namespace

}  // namespace trove::cuda

namespace trove {

Result<TrainStats> cuda_train_update_records(const RecordLayout& training, const TrainStep& step,
                                             const int64_t* experts, int64_t count,
                                             const float* down_grad, const float* up_grad,
                                             uint8_t* records, float* accum) {
  TROVE_RETURN_IF_ERROR(
      cuda::check_update_args(training, step, experts, count, down_grad, up_grad, records, accum));
  const int64_t m = training.width;
  const bool adagrad = step.optimizer == TrainOptimizer::kAdagrad;
  for (int64_t i = 0; i < count; ++i) {
    TROVE_RETURN_IF_ERROR(check_train_record(
        training, step, experts[i], down_grad + i * m * training.dim,
        up_grad + i * m * training.dim_out, records + static_cast<size_t>(i) * training.stride,
        adagrad ? accum + i * 2 * m : nullptr));
  }
  if (count == 0) return TrainStats{};
  TROVE_RETURN_IF_ERROR(cuda::require_cuda_device().with_context("cuda_train_update_records"));

  const auto n = static_cast<size_t>(count);
  const size_t down_n = n * static_cast<size_t>(m * training.dim);
  const size_t up_n = n * static_cast<size_t>(m * training.dim_out);
  const size_t acc_n = adagrad ? n * static_cast<size_t>(2 * m) : 0;
  TROVE_ASSIGN_OR_RETURN(cuda::Stream stream, cuda::Stream::create());
  TROVE_ASSIGN_OR_RETURN(auto d_experts, cuda::DeviceBuffer<int64_t>::allocate(n));
  TROVE_ASSIGN_OR_RETURN(auto d_down, cuda::DeviceBuffer<float>::allocate(down_n));
  TROVE_ASSIGN_OR_RETURN(auto d_up, cuda::DeviceBuffer<float>::allocate(up_n));
  TROVE_ASSIGN_OR_RETURN(auto d_records,
                         cuda::DeviceBuffer<uint8_t>::allocate(n * training.stride));
  TROVE_ASSIGN_OR_RETURN(auto d_accum, cuda::DeviceBuffer<float>::allocate(acc_n));

  // Queued copies read host memory until the stream is synchronized: wait also on failure.
  const auto queue_and_run = [&]() -> Result<TrainStats> {
    const cudaStream_t s = stream.get();
    TROVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(d_experts.get(), experts, d_experts.bytes(), cudaMemcpyHostToDevice, s));
    TROVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(d_down.get(), down_grad, d_down.bytes(), cudaMemcpyHostToDevice, s));
    TROVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(d_up.get(), up_grad, d_up.bytes(), cudaMemcpyHostToDevice, s));
    TROVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(d_records.get(), records, d_records.bytes(), cudaMemcpyHostToDevice, s));
    if (adagrad) {
      TROVE_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(d_accum.get(), accum, d_accum.bytes(), cudaMemcpyHostToDevice, s));
    }
    // Checked on the host above, with the CPU's own function: no device check pass.
    Result<TrainStats> stats =
        cuda::run_update(training, step, d_experts.get(), count, d_down.get(), d_up.get(),
                         d_records.get(), adagrad ? d_accum.get() : nullptr,
                         /*check_on_device=*/false, s);
    // A record whose scale overflows is unchanged on the device: copying every record back is
    // right in both cases; any other error leaves the host buffers alone.
    if (!stats.ok() && stats.status().code() != Status::Code::kOutOfRange) return stats;
    TROVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(records, d_records.get(), d_records.bytes(), cudaMemcpyDeviceToHost, s));
    if (adagrad) {
      TROVE_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(accum, d_accum.get(), d_accum.bytes(), cudaMemcpyDeviceToHost, s));
    }
    TROVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    return stats;
  };
  Result<TrainStats> result = queue_and_run();
  const Status finished = stream.synchronize();
  if (!result.ok()) return result;
  if (!finished.ok()) return finished;
  return result;
}

Result<TrainStats> cuda_train_update_records_device(const RecordLayout& training,
                                                    const TrainStep& step, const int64_t* experts,
                                                    int64_t count, const float* down_grad,
                                                    const float* up_grad, uint8_t* records,
                                                    float* accum, void* stream) {
  TROVE_RETURN_IF_ERROR(
      cuda::check_update_args(training, step, experts, count, down_grad, up_grad, records, accum));
  if (reinterpret_cast<uintptr_t>(records) % 16 != 0) {
    return Status::invalid_argument(
        str_printf("cuda_train_update_records_device: records at %p are not 16-byte aligned",
                   static_cast<void*>(records)));
  }
  if (count == 0) return TrainStats{};
  TROVE_RETURN_IF_ERROR(
      cuda::require_cuda_device().with_context("cuda_train_update_records_device"));
  const bool adagrad = step.optimizer == TrainOptimizer::kAdagrad;
  return cuda::run_update(training, step, experts, count, down_grad, up_grad, records,
                          adagrad ? accum : nullptr, /*check_on_device=*/true,
                          static_cast<cudaStream_t>(stream));
}

}  // namespace trove
