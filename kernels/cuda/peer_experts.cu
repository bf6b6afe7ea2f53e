// The fused PEER expert pass (peer_experts.cuh).
//
// One block per token, in two phases over the token's S = h*k slots:
//
//   phase 1 (down rows)  xhat[t] is staged in shared memory, chunk by chunk (<= 4096 floats);
//                        warp w takes slots w, w+4, ...: its lanes read the slot's down row in
//                        16-byte vectors (lane l: int4/int8 groups l, l+32, ...; f16/bf16/f32
//                        vectors l, l+32, ...), dequantize in registers (int codes times the
//                        group's fp16 scale, applied to the group's partial sum as the CPU path
//                        does) and dot with xhat; a shuffle tree reduces the lanes. z[s] lives in
//                        shared memory, then becomes ga[s] = float(gate * act(z)) in double (the
//                        CPU path's formula).
//   phase 2 (up rows)    thread i owns 16-byte columns i, i+128, ... of the up row (32 int4
//                        elements, 16 int8, 8 f16/bf16 or 4 f32 per column) and adds
//                        ga[s] * v_s over the slots in order, 4 slots' loads in flight at a time,
//                        skipping slots with ga = 0 (relu zeros) as the CPU path does; y[t] is
//                        written once.
//
// No [T, h, k, D] intermediate, no atomics: each y element is one thread's fixed-order sum, so
// results are identical from run to run.
//
// Traffic per token: its S records once each (down row in phase 1, up row in phase 2; scales
// from the same cache lines), xhat once (4D bytes), y once (4 D_out bytes). With the background
// config (D = 2048, h*k = 32, int4 records of 2304 bytes) that is 72 KiB of records per token,
// so the pass is bound by HBM (or L2 when tokens share experts).
//
// Alignment: records are 16-byte aligned (the device tier's slots are stride-aligned, the host
// form's slab too), but a section inside a record starts at any even offset (2 * G scales come
// first: D = 96 puts the int4 codes at byte 12). Lanes of a warp read addresses 16 bytes apart,
// so the section's offset mod 16 is the same for all of them and load16 picks one load width
// per warp: one 16-byte load, or 2 x 8, 4 x 4 or 8 x 2. Nothing is read past a row: partial
// vectors at the end of an f16/bf16/f32 row are read element by element (a record's last row can
// end at the very end of its stride).
//
// Shared-memory bank conflicts: xhat is stored with one pad float per 32 (element e at
// e + e/32), so lane l reading element 32*l + j of its group hits bank (l + j) mod 32:
// conflict-free for the int4/int8 group walk; the 8- and 4-element vectors are conflict-free too.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/device.cuh"
#include "kernels/cuda/peer_experts.cuh"
#include "kernels/peer.h"
#include "kernels/quant.h"

namespace trove::cuda {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kExpertThreads = 128;                // 4 warps
constexpr int kExpertWarps = kExpertThreads / 32;  // phase-1 slot parallelism
constexpr int64_t kMaxXChunk = 4096;               // xhat floats staged per pass
constexpr int kSlotBatch = 4;                      // phase-2 slots with loads in flight
static_assert(kMaxXChunk % kQuantGroup == 0, "chunks hold whole groups");

// ---- loads ----------------------------------------------------------------------------------

// 16 bytes at p, p 2-byte aligned, with the widest loads its alignment allows. Read-only path
// (records do not change while a kernel reads them).
__device__ __forceinline__ uint4 load16(const uint8_t* p) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if ((addr & 15) == 0) return __ldg(reinterpret_cast<const uint4*>(p));
  if ((addr & 7) == 0) {
    const auto* w = reinterpret_cast<const uint2*>(p);
    const uint2 lo = __ldg(w);
    const uint2 hi = __ldg(w + 1);
    return make_uint4(lo.x, lo.y, hi.x, hi.y);
  }
  if ((addr & 3) == 0) {
    const auto* w = reinterpret_cast<const unsigned int*>(p);
    return make_uint4(__ldg(w), __ldg(w + 1), __ldg(w + 2), __ldg(w + 3));
  }
  const auto* h = reinterpret_cast<const unsigned short*>(p);
  unsigned int w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[i] = static_cast<unsigned int>(__ldg(h + 2 * i)) |
           (static_cast<unsigned int>(__ldg(h + 2 * i + 1)) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ float fp16_to_float(unsigned short bits) {
  return __half2float(__ushort_as_half(bits));
}

// The fp16 scale of group g of a row whose scales start at `scales` (2-byte aligned).
__device__ __forceinline__ float load_scale(const uint8_t* scales, int64_t g) {
  return fp16_to_float(__ldg(reinterpret_cast<const unsigned short*>(scales) + g));
}

// ---- per-dtype decoding of one 16-byte vector -------------------------------------------------
// kElems elements per 16 bytes; decode() writes them in element order (int codes unscaled).

template <DType kType>
struct Codec;

template <>
struct Codec<DType::kI4> {
  static constexpr int kElems = 32;  // one whole group
  static constexpr bool kQuantized = true;
  // ggml Q4_0 order: byte b holds element b (low nibble) and element b + 16 (high), each + 8.
  __device__ static void decode(const uint4& v, float* out) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      const unsigned int byte = (w[b >> 2] >> (8 * (b & 3))) & 0xFFu;
      out[b] = static_cast<float>(static_cast<int>(byte & 0xFu) - 8);
      out[b + 16] = static_cast<float>(static_cast<int>(byte >> 4) - 8);
    }
  }
};

template <>
struct Codec<DType::kI8> {
  static constexpr int kElems = 16;  // half a group
  static constexpr bool kQuantized = true;
  __device__ static void decode(const uint4& v, float* out) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      const auto byte = static_cast<int8_t>((w[b >> 2] >> (8 * (b & 3))) & 0xFFu);
      out[b] = static_cast<float>(byte);
    }
  }
};

template <>
struct Codec<DType::kF16> {
  static constexpr int kElems = 8;
  static constexpr bool kQuantized = false;
  __device__ static void decode(const uint4& v, float* out) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = fp16_to_float(static_cast<unsigned short>(w[i] & 0xFFFFu));
      out[2 * i + 1] = fp16_to_float(static_cast<unsigned short>(w[i] >> 16));
    }
  }
  __device__ static float element(const uint8_t* codes, int64_t e) {
    return fp16_to_float(__ldg(reinterpret_cast<const unsigned short*>(codes) + e));
  }
};

template <>
struct Codec<DType::kBF16> {
  static constexpr int kElems = 8;
  static constexpr bool kQuantized = false;
  // bf16 -> fp32 is the 16 bits in the high half: exact.
  __device__ static void decode(const uint4& v, float* out) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
  __device__ static float element(const uint8_t* codes, int64_t e) {
    const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(codes) + e);
    return __uint_as_float(static_cast<unsigned int>(bits) << 16);
  }
};

template <>
struct Codec<DType::kF32> {
  static constexpr int kElems = 4;
  static constexpr bool kQuantized = false;
  __device__ static void decode(const uint4& v, float* out) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  }
  __device__ static float element(const uint8_t* codes, int64_t e) {
    return __ldg(reinterpret_cast<const float*>(codes) + e);
  }
};

// Bytes of codes per element of a float dtype (16 / kElems).
template <DType kType>
constexpr int kFloatBytes = 16 / Codec<kType>::kElems;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Index in the padded shared xhat chunk of the chunk's element r (one pad float per 32).
__device__ __forceinline__ int64_t padded(int64_t r) {
  return r + (r >> 5);
}

// ---- where a slot's record is -----------------------------------------------------------------

struct RecordPointers {
  const uint8_t* const* records;
  __device__ const uint8_t* operator()(int64_t slot) const { return records[slot]; }
};

struct RecordIndex {
  const uint8_t* table;
  const int64_t* index;
  uint64_t stride;
  __device__ const uint8_t* operator()(int64_t slot) const {
    return table + static_cast<uint64_t>(index[slot]) * stride;
  }
};

// ---- the kernel -------------------------------------------------------------------------------

struct ExpertArgs {
  const float* xhat;   // [T, D]
  const float* gates;  // [T, S]
  float* y;            // [T, D_out]
  int64_t dim;
  int64_t dim_out;
  int slots;  // S
  // Per token [begin, end) of the slots this pass computes, resuming y[t] (ranged pass); null:
  // all slots, y[t] written afresh.
  const int32_t* ranges;
  int x_chunk;  // xhat floats staged per pass, a multiple of 32
  Activation activation;
  uint64_t down_scales;
  uint64_t up_scales;
  uint64_t down_codes;
  uint64_t up_codes;
};

// One lane's share of <down row, xhat> over the staged chunk [c0, c1) (c0 a multiple of the
// chunk size, so of 32; c1 <= D rounded up to 32; xs zero past D).
template <DType kType>
__device__ float down_dot_lane(const uint8_t* record, const ExpertArgs& a, int64_t c0, int64_t c1,
                               const float* xs, int lane) {
  using C = Codec<kType>;
  const uint8_t* codes = record + a.down_codes;
  float acc = 0.0f;
  if constexpr (C::kQuantized) {
    // Lane = group: 32 elements, 16 (int4) or 32 (int8) bytes of codes, one scale. Padding
    // elements of the last group meet xs == 0.
    constexpr int kGroupBytes = kType == DType::kI4 ? 16 : 32;
    const uint8_t* scales = record + a.down_scales;
    for (int64_t g = c0 / kQuantGroup + lane; g < c1 / kQuantGroup; g += 32) {
      const float* xg = xs + padded(g * kQuantGroup - c0);
      float v[kQuantGroup];
      const uint8_t* gc = codes + g * kGroupBytes;
      C::decode(load16(gc), v);
      if constexpr (kType == DType::kI8) C::decode(load16(gc + 16), v + 16);
      float partial = 0.0f;
#pragma unroll
      for (int j = 0; j < kQuantGroup; ++j) partial = fmaf(v[j], xg[j], partial);
      acc = fmaf(partial, load_scale(scales, g), acc);
    }
  } else {
    // Lane = 16-byte vector of kElems elements (all inside one 32-element block of xs).
    constexpr int kE = C::kElems;
    const int64_t end = c1 < a.dim ? c1 : a.dim;
    for (int64_t u = c0 / kE + lane; u * kE < end; u += 32) {
      const int64_t e0 = u * kE;
      const float* xu = xs + padded(e0 - c0);
      if (e0 + kE <= end) {
        float v[kE];
        C::decode(load16(codes + e0 * kFloatBytes<kType>), v);
#pragma unroll
        for (int j = 0; j < kE; ++j) acc = fmaf(v[j], xu[j], acc);
      } else {
        // The row's last, partial vector (end == D here: chunk ends are multiples of 32).
        for (int64_t e = e0; e < end; ++e) acc = fmaf(C::element(codes, e), xu[e - e0], acc);
      }
    }
  }
  return acc;
}

// Thread's share of phase 2: y[t][e0, e0 + kE) for the 16-byte up-row column starting at
// element e0, summed over the slots [s_begin, s_end) in order, from 0 (s_begin == 0) or from
// what y[t] holds (a ranged pass resuming the token: the same fp32 sum continued).
template <DType kType, typename Records>
__device__ void up_column(const ExpertArgs& a, const Records& records, int64_t slot0,
                          const float* ga, int s_begin, int s_end, int64_t e0, float* yt) {
  using C = Codec<kType>;
  constexpr int kE = C::kElems;
  float acc[kE];
#pragma unroll
  for (int j = 0; j < kE; ++j) acc[j] = s_begin > 0 && e0 + j < a.dim_out ? yt[e0 + j] : 0.0f;

  if (C::kQuantized || e0 + kE <= a.dim_out) {
    // Whole vector: kSlotBatch slots' loads issued before their FMAs.
    for (int s0 = s_begin; s0 < s_end; s0 += kSlotBatch) {
      uint4 v[kSlotBatch];
      float f[kSlotBatch];
#pragma unroll
      for (int b = 0; b < kSlotBatch; ++b) {
        const int s = s0 + b;
        f[b] = s < s_end ? ga[s] : 0.0f;
        v[b] = make_uint4(0, 0, 0, 0);
        if (f[b] != 0.0f) {
          const uint8_t* record = records(slot0 + s);
          if constexpr (C::kQuantized) {
            v[b] = load16(record + a.up_codes + e0 / kE * 16);
            // As the CPU path: alpha * d once per group, then times the integer codes.
            f[b] *= load_scale(record + a.up_scales, e0 / kQuantGroup);
          } else {
            v[b] = load16(record + a.up_codes + e0 * kFloatBytes<kType>);
          }
        }
      }
#pragma unroll
      for (int b = 0; b < kSlotBatch; ++b) {
        if (f[b] == 0.0f) continue;
        float c[kE];
        C::decode(v[b], c);
#pragma unroll
        for (int j = 0; j < kE; ++j) acc[j] = fmaf(f[b], c[j], acc[j]);
      }
    }
  } else if constexpr (!C::kQuantized) {
    // The row's last, partial vector of a float dtype: element loads, nothing past D_out.
    for (int s = s_begin; s < s_end; ++s) {
      if (ga[s] == 0.0f) continue;
      const uint8_t* codes = records(slot0 + s) + a.up_codes;
      for (int j = 0; j < kE && e0 + j < a.dim_out; ++j) {
        acc[j] = fmaf(ga[s], C::element(codes, e0 + j), acc[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kE; ++j) {
    if (e0 + j < a.dim_out) yt[e0 + j] = acc[j];
  }
}

// Launch: grid = T blocks (one per token), kExpertThreads threads, dynamic shared memory
// expert_pass_smem_bytes (<= 33 KiB: a 4096-float chunk of xhat plus 4096 slots).
// Traffic per token: S records (record_bytes each), 4D bytes of xhat, 4 D_out bytes of y.
template <DType kType, typename Records>
__global__ void __launch_bounds__(kExpertThreads)
    peer_experts_kernel(ExpertArgs a, Records records) {
  extern __shared__ float smem[];
  float* xs = smem;                                        // x_chunk + x_chunk / 32 floats
  float* zs = smem + a.x_chunk + a.x_chunk / kQuantGroup;  // S floats: z, then gate * act(z)
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t t = blockIdx.x;
  const int64_t slot0 = t * a.slots;
  const float* xt = a.xhat + t * a.dim;
  int s_begin = 0;
  int s_end = a.slots;
  if (a.ranges != nullptr) {
    s_begin = a.ranges[2 * t];
    s_end = a.ranges[2 * t + 1];
    if (s_begin >= s_end) return;  // the whole block: nothing of this token in this pass
  }

  for (int s = tid; s < a.slots; s += blockDim.x) zs[s] = 0.0f;

  // Phase 1: z[s] = <u_s, xhat>, chunk by chunk over D rounded up to whole groups.
  const int64_t extent = (a.dim + kQuantGroup - 1) / kQuantGroup * kQuantGroup;
  for (int64_t c0 = 0; c0 < extent; c0 += a.x_chunk) {
    const int64_t c1 = c0 + a.x_chunk < extent ? c0 + a.x_chunk : extent;
    __syncthreads();  // the previous chunk is no longer read (and zs is zeroed)
    for (int64_t e = c0 + tid; e < c1; e += blockDim.x) {
      xs[padded(e - c0)] = e < a.dim ? xt[e] : 0.0f;
    }
    __syncthreads();
    // The slot loop is warp-uniform, so every lane reaches the shuffles in warp_sum.
    for (int s = s_begin + warp; s < s_end; s += kExpertWarps) {
      const float partial = warp_sum(down_dot_lane<kType>(records(slot0 + s), a, c0, c1, xs, lane));
      if (lane == 0) zs[s] += partial;
    }
  }
  __syncthreads();
  for (int s = s_begin + tid; s < s_end; s += blockDim.x) {
    // As the CPU path: float(gate * act(z)) with the activation in double.
    zs[s] = static_cast<float>(static_cast<double>(a.gates[slot0 + s]) *
                               activation_ref(a.activation, static_cast<double>(zs[s])));
  }
  __syncthreads();

  // Phase 2: y[t] = sum_s ga[s] v_s, one 16-byte column of the up row per thread at a time.
  constexpr int kE = Codec<kType>::kElems;
  const int64_t padded_out = Codec<kType>::kQuantized
                                 ? (a.dim_out + kQuantGroup - 1) / kQuantGroup * kQuantGroup
                                 : a.dim_out;
  const int64_t columns = (padded_out + kE - 1) / kE;
  float* yt = a.y + t * a.dim_out;
  for (int64_t col = tid; col < columns; col += blockDim.x) {
    up_column<kType>(a, records, slot0, zs, s_begin, s_end, col * kE, yt);
  }
}

ExpertArgs make_args(const ExpertPass& p, const float* xhat, const float* gates, float* y,
                     const int32_t* ranges = nullptr) {
  ExpertArgs a;
  a.ranges = ranges;
  a.xhat = xhat;
  a.gates = gates;
  a.y = y;
  a.dim = p.dim;
  a.dim_out = p.dim_out;
  a.slots = static_cast<int>(p.slots);
  const int64_t extent = quant_groups(p.dim) * kQuantGroup;
  a.x_chunk = static_cast<int>(std::min(extent, kMaxXChunk));
  a.activation = p.activation;
  a.down_scales = p.down_scales_offset;
  a.up_scales = p.up_scales_offset;
  a.down_codes = p.down_codes_offset;
  a.up_codes = p.up_codes_offset;
  return a;
}

template <typename Records>
Status launch(const ExpertPass& p, const ExpertArgs& a, const Records& records,
              cudaStream_t stream) {
  const auto blocks = static_cast<unsigned int>(p.tokens);
  const size_t smem = expert_pass_smem_bytes(p);
  switch (p.dtype) {
    case DType::kF32:
      peer_experts_kernel<DType::kF32><<<blocks, kExpertThreads, smem, stream>>>(a, records);
      break;
    case DType::kF16:
      peer_experts_kernel<DType::kF16><<<blocks, kExpertThreads, smem, stream>>>(a, records);
      break;
    case DType::kBF16:
      peer_experts_kernel<DType::kBF16><<<blocks, kExpertThreads, smem, stream>>>(a, records);
      break;
    case DType::kI8:
      peer_experts_kernel<DType::kI8><<<blocks, kExpertThreads, smem, stream>>>(a, records);
      break;
    case DType::kI4:
      peer_experts_kernel<DType::kI4><<<blocks, kExpertThreads, smem, stream>>>(a, records);
      break;
  }
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::ok_status();
}

}  // namespace

size_t expert_pass_smem_bytes(const ExpertPass& pass) {
  const int64_t chunk = std::min(quant_groups(pass.dim) * kQuantGroup, kMaxXChunk);
  return sizeof(float) * static_cast<size_t>(chunk + chunk / kQuantGroup + pass.slots);
}

Status launch_peer_experts(const ExpertPass& pass, const float* xhat, const float* gates,
                           const uint8_t* const* records, float* y, cudaStream_t stream) {
  return launch(pass, make_args(pass, xhat, gates, y), RecordPointers{records}, stream);
}

Status launch_peer_experts_ranged(const ExpertPass& pass, const float* xhat, const float* gates,
                                  const uint8_t* const* records, const int32_t* ranges, float* y,
                                  cudaStream_t stream) {
  return launch(pass, make_args(pass, xhat, gates, y, ranges), RecordPointers{records}, stream);
}

Status launch_peer_experts_indexed(const ExpertPass& pass, const float* xhat, const float* gates,
                                   const uint8_t* table, const int64_t* record_index,
                                   uint64_t stride, float* y, cudaStream_t stream) {
  return launch(pass, make_args(pass, xhat, gates, y), RecordIndex{table, record_index, stride},
                stream);
}

}  // namespace trove::cuda
