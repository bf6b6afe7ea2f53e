// The int4 training view's stochastic-rounding update on a CUDA device (kernels/train.h has the
// rules; kernels/cpu/ref/train_ref.h is the oracle). Records, accumulators and stats equal the
// CPU's (kernels/cpu/train.h) byte for byte: the kernel performs the oracle's float and double
// operations in the oracle's order with correctly rounded intrinsics (no FMA contraction, no
// flush to zero), and draws its uniforms from the same constexpr hash (sr_uniform_from_prefix).
//
// This header carries no CUDA types and includes no CUDA header (kernels/cuda/cuda_backend.h
// is the model); it is plain C++17 because .cu files include it. A CUDA stream crosses it as
// `void*` (a cudaStream_t; nullptr is the legacy default stream).
//
// Semantics shared by both entry points and by train_update_records (kernels/cpu/train.h):
// `count` records at training.stride; experts[count] (the hash's expert ids, and what errors
// name); down_grad [count][width][dim] and up_grad [count][width][dim_out], segment-summed;
// accum [count][2·width] row-wise Adagrad accumulators (down rows, then up rows; may be
// nullptr for SGD). Bad input (layout, step, gradients, scales, accumulators) changes nothing
// and names the first bad record's expert, row, element and value. A record whose scale would
// overflow fp16 is left unchanged (record and accumulators) while the others are updated, and
// the error (kOutOfRange) names the lowest-indexed such record's expert. Returns the stats
// summed over the records. Padding bytes after record_bytes are never read or written.
//
// Limits: one record (its record_bytes) must fit one thread block's shared memory (the update
// is staged there so a failing record can be left untouched): about 227 KiB on H100/H200,
// e.g. width 1 with dim + dim_out up to ~220K. Larger records are a kNotSupported error.
#pragma once

#include <cstdint>

#include "base/status.h"
#include "kernels/record.h"
#include "kernels/train.h"

namespace trove {

// Host pointers, as train_update_records: the inputs are checked on the host (with the CPU's
// own check_train_record, so the messages are the CPU's), copied to the device, updated there,
// and the records and accumulators copied back. count == 0 is OK and needs no device. Without
// a usable device: kNotSupported "no CUDA device is available ...".
Result<TrainStats> cuda_train_update_records(const RecordLayout& training, const TrainStep& step,
                                             const int64_t* experts, int64_t count,
                                             const float* down_grad, const float* up_grad,
                                             uint8_t* records, float* accum);

// Device pointers, updated in place on `stream` (a cudaStream_t, nullptr: the legacy default
// stream); returns when the update is complete (the stats and errors are read back). The
// inputs are checked on the device first (one pass over gradients, scales and accumulators);
// the first bad record's inputs are then copied back and named with the CPU's messages.
// REQUIRES: `records` 16-byte aligned and training.stride a multiple of 16 (RecordLayout::make
// strides are multiples of 64; cudaMalloc returns 256-byte-aligned memory) - checked.
Result<TrainStats> cuda_train_update_records_device(const RecordLayout& training,
                                                    const TrainStep& step, const int64_t* experts,
                                                    int64_t count, const float* down_grad,
                                                    const float* up_grad, uint8_t* records,
                                                    float* accum, void* stream = nullptr);

}  // namespace trove
