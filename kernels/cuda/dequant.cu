// Group-wise int8/int4 dequantization on the GPU, and cuda_dequantize_rows, the host entry
// point that validates it against the CPU oracles (kernels/cpu/ref/quant_ref.h).
//
// Why it is bit-exact with the oracle: y = float(q) * float(d) is one IEEE multiply, rounded
// to nearest even on both sides, and it is in fact exact: |q| <= 128 needs 8 significant bits
// and an fp16 scale 11, so the product fits fp32's 24 with an exponent well inside fp32's
// normal range (fp16's smallest subnormal is 2^-24), so flush-to-zero could not bite either.
// The fp16 -> fp32 widening (__half2float) is exact for every finite fp16, subnormals
// included, as is the CPU's software fp16_to_fp32. __fmul_rn keeps the compiler from ever
// contracting the multiply into something else.
//
// Why this shape: dequantization alone is memory bound and exists here to prove the format's
// device-side decoding that the fused gather -> dequantize -> dot kernels will inline. So it
// stays the simplest correct thing: one thread per output element over the flattened
// [rows, n] index, a grid-stride loop so any size runs on a capped grid. Consecutive threads
// write consecutive floats and read consecutive code bytes (coalesced); the 32 threads of a
// group read the same scale (one broadcast transaction).
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/dequant.cuh"
#include "kernels/cuda/device.cuh"
#include "kernels/quant.h"

namespace trove::cuda {

namespace {

constexpr int kThreadsPerBlock = 256;
// About 4 resident blocks per SM on the largest current parts; larger inputs loop.
constexpr int64_t kMaxBlocks = 4096;

__device__ __forceinline__ float fp16_bits_to_float(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

__global__ void dequantize_int8_kernel(const uint16_t* __restrict__ scales,
                                       const int8_t* __restrict__ codes, int64_t rows, int64_t n,
                                       int64_t groups_per_row, float* __restrict__ y) {
  const int64_t total = rows * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t row = i / n;
    const int64_t col = i - row * n;
    const int64_t group = row * groups_per_row + col / kQuantGroup;
    const int64_t lane = col % kQuantGroup;
    const float d = fp16_bits_to_float(scales[group]);
    y[i] = __fmul_rn(static_cast<float>(codes[group * kQuantGroup + lane]), d);
  }
}

__global__ void dequantize_int4_kernel(const uint16_t* __restrict__ scales,
                                       const uint8_t* __restrict__ codes, int64_t rows, int64_t n,
                                       int64_t groups_per_row, float* __restrict__ y) {
  constexpr int kBytesPerGroup = kQuantGroup / 2;
  const int64_t total = rows * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t row = i / n;
    const int64_t col = i - row * n;
    const int64_t group = row * groups_per_row + col / kQuantGroup;
    const int lane = static_cast<int>(col % kQuantGroup);
    // ggml Q4_0 order: element j (< 16) is the low nibble of byte j, element j + 16 the high.
    const unsigned byte = codes[group * kBytesPerGroup + (lane % kBytesPerGroup)];
    const unsigned nibble = lane < kBytesPerGroup ? (byte & 0xFu) : (byte >> 4);
    const int q = static_cast<int>(nibble) - 8;
    const float d = fp16_bits_to_float(scales[group]);
    y[i] = __fmul_rn(static_cast<float>(q), d);
  }
}

unsigned int blocks_for(int64_t elements) {
  const int64_t blocks = (elements + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return static_cast<unsigned int>(std::min(blocks, kMaxBlocks));
}

}  // namespace

Status launch_dequantize_int8(const uint16_t* scales, const int8_t* codes, int64_t rows, int64_t n,
                              float* y, cudaStream_t stream) {
  if (rows == 0 || n == 0) return Status::ok_status();
  dequantize_int8_kernel<<<blocks_for(rows * n), kThreadsPerBlock, 0, stream>>>(
      scales, codes, rows, n, quant_groups(n), y);
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::ok_status();
}

Status launch_dequantize_int4(const uint16_t* scales, const uint8_t* codes, int64_t rows, int64_t n,
                              float* y, cudaStream_t stream) {
  if (rows == 0 || n == 0) return Status::ok_status();
  dequantize_int4_kernel<<<blocks_for(rows * n), kThreadsPerBlock, 0, stream>>>(
      scales, codes, rows, n, quant_groups(n), y);
  TROVE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return Status::ok_status();
}

}  // namespace trove::cuda

namespace trove {

namespace {

// Bounds every size computed below (codes, scales and outputs are all < 2^45 bytes), so no
// product overflows int64_t or size_t. Far beyond any one GPU's memory.
constexpr int64_t kMaxElements = int64_t{1} << 40;

Status check_dequantize_args(DType dtype, const uint16_t* scales, const uint8_t* codes,
                             int64_t rows, int64_t n, const float* out) {
  if (dtype != DType::kI8 && dtype != DType::kI4) {
    return Status::invalid_argument("cuda_dequantize_rows: dtype " +
                                    std::string(dtype_name(dtype)) +
                                    " is not quantized (expected int8 or int4)");
  }
  if (rows < 0 || n < 0) {
    return Status::invalid_argument("cuda_dequantize_rows: rows (" + std::to_string(rows) +
                                    ") and n (" + std::to_string(n) + ") must be non-negative");
  }
  if (n > kMaxElements || (n > 0 && rows > kMaxElements / (quant_groups(n) * kQuantGroup))) {
    return Status::out_of_range("cuda_dequantize_rows: " + std::to_string(rows) + " rows of " +
                                std::to_string(n) + " elements exceed the limit of 2^40");
  }
  if (rows > 0 && n > 0 && (scales == nullptr || codes == nullptr || out == nullptr)) {
    return Status::invalid_argument(
        std::string("cuda_dequantize_rows: null pointer for") +
        (scales == nullptr ? " scales" : "") + (codes == nullptr ? " codes" : "") +
        (out == nullptr ? " out" : "") + " with " + std::to_string(rows) + " rows of " +
        std::to_string(n) + " elements");
  }
  return Status::ok_status();
}

// Queues host -> device copies, the kernel and the device -> host copy on `stream`.
Status enqueue_dequantize(bool is_int8, const uint16_t* scales, const uint8_t* codes, int64_t rows,
                          int64_t n, float* out, const cuda::DeviceBuffer<uint16_t>& d_scales,
                          const cuda::DeviceBuffer<uint8_t>& d_codes,
                          const cuda::DeviceBuffer<float>& d_out, cudaStream_t stream) {
  TROVE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(d_scales.get(), scales, d_scales.bytes(), cudaMemcpyHostToDevice, stream));
  TROVE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(d_codes.get(), codes, d_codes.bytes(), cudaMemcpyHostToDevice, stream));
  if (is_int8) {
    TROVE_RETURN_IF_ERROR(
        cuda::launch_dequantize_int8(d_scales.get(), reinterpret_cast<const int8_t*>(d_codes.get()),
                                     rows, n, d_out.get(), stream));
  } else {
    TROVE_RETURN_IF_ERROR(
        cuda::launch_dequantize_int4(d_scales.get(), d_codes.get(), rows, n, d_out.get(), stream));
  }
  TROVE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(out, d_out.get(), d_out.bytes(), cudaMemcpyDeviceToHost, stream));
  return Status::ok_status();
}

}  // namespace

Status cuda_dequantize_rows(DType dtype, const uint16_t* scales, const uint8_t* codes, int64_t rows,
                            int64_t n, float* out) {
  TROVE_RETURN_IF_ERROR(check_dequantize_args(dtype, scales, codes, rows, n, out));
  TROVE_RETURN_IF_ERROR(cuda::require_cuda_device().with_context("cuda_dequantize_rows"));
  if (rows == 0 || n == 0) return Status::ok_status();

  const bool is_int8 = dtype == DType::kI8;
  const size_t scale_count = static_cast<size_t>(rows * quant_groups(n));
  const size_t code_bytes = scale_count * (is_int8 ? kQuantGroup : kQuantGroup / 2);
  const size_t out_count = static_cast<size_t>(rows * n);

  TROVE_ASSIGN_OR_RETURN(cuda::Stream stream, cuda::Stream::create());
  TROVE_ASSIGN_OR_RETURN(auto d_scales, cuda::DeviceBuffer<uint16_t>::allocate(scale_count));
  TROVE_ASSIGN_OR_RETURN(auto d_codes, cuda::DeviceBuffer<uint8_t>::allocate(code_bytes));
  TROVE_ASSIGN_OR_RETURN(auto d_out, cuda::DeviceBuffer<float>::allocate(out_count));

  // Wait for the stream also when queuing failed part-way: the device buffers must outlive
  // every copy already queued on it.
  const Status queued = enqueue_dequantize(is_int8, scales, codes, rows, n, out, d_scales, d_codes,
                                           d_out, stream.get());
  const Status finished = stream.synchronize();
  return queued.ok() ? finished : queued;
}

}  // namespace trove
