// cuBLAS as the CUDA files use it: its errors as Status, and a move-only owner of a handle
// (STYLE.md rule 4). Included only by .cu files.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <utility>

#include "base/status.h"

namespace trove::cuda {

// "<call> failed at <file>:<line>: <CUBLAS_STATUS_NAME> (<description>)". Codes: allocation
// failure -> kResourceExhausted; not initialized (no device, no driver), architecture mismatch
// and not supported -> kNotSupported; anything else -> kIOError.
Status cublas_error_status(cublasStatus_t status, const char* call, const char* file, int line);

}  // namespace trove::cuda

// Evaluates a cuBLAS call; on failure returns its Status from the enclosing function.
#define TROVE_CUBLAS_RETURN_IF_ERROR(call)                                                        \
  do {                                                                                            \
    const cublasStatus_t trove_cublas_status_ = (call);                                           \
    if (trove_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                            \
      return ::trove::cuda::cublas_error_status(trove_cublas_status_, #call, __FILE__, __LINE__); \
  } while (0)

namespace trove::cuda {

// Owns a cuBLAS handle whose work goes to `stream`. Both math modes its users pick keep SGEMM in
// full fp32, never TF32 (which would move routing scores by ~1e-3 and change the selected
// experts): CUBLAS_DEFAULT_MATH for the forward; CUBLAS_PEDANTIC_MATH for the backward, which
// also rules out reduced-precision reductions whatever NVIDIA_TF32_OVERRIDE says, because its
// gradients are compared with an fp32 oracle. Move-only.
class BlasHandle {
 public:
  // REQUIRES: math is CUBLAS_DEFAULT_MATH or CUBLAS_PEDANTIC_MATH (no TF32 or tensor-op mode).
  static Result<BlasHandle> create(cudaStream_t stream, cublasMath_t math);

  ~BlasHandle();
  BlasHandle(BlasHandle&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  BlasHandle& operator=(BlasHandle&& other) noexcept;
  BlasHandle(const BlasHandle&) = delete;
  BlasHandle& operator=(const BlasHandle&) = delete;

  cublasHandle_t get() const { return handle_; }

 private:
  BlasHandle() = default;
  cublasHandle_t handle_ = nullptr;
};

}  // namespace trove::cuda
