// The int4 training view on the CPU (kernels/train.h): import, export and the
// stochastic-rounding update over many records, threaded over records. Bit-identical to
// kernels/cpu/ref/train_ref.h on codes, scales and accumulators, for any thread count (each
// record is updated by one thread, in the oracle's order).
#pragma once

#include <cstdint>

#include "base/status.h"
#include "kernels/record.h"
#include "kernels/train.h"

namespace trove {

// `count` serving int4 records (serving.stride apart) -> training int8 records
// (training.stride apart, padding zeroed), and back. Threads: 0 means hardware concurrency.
Status train_import_records(const RecordLayout& serving, const RecordLayout& training,
                            const uint8_t* in, int64_t count, uint8_t* out, int threads = 0);
Status train_export_records(const RecordLayout& serving, const RecordLayout& training,
                            const uint8_t* in, int64_t count, uint8_t* out, int threads = 0);

// One update step of `count` training records in place: experts[count] (the hash's expert
// ids, and what errors name), down_grad [count][width][dim], up_grad [count][width][dim_out]
// (segment-summed), records at training.stride, accum [count][2·width] (Adagrad; nullptr for
// SGD). Bad input (layout, step, gradients, scales, accumulators) changes nothing. A record
// whose scale would overflow fp16 is left unchanged while the others are updated, and the
// error names the lowest-indexed such record's expert. Returns the stats summed over records.
Result<TrainStats> train_update_records(const RecordLayout& training, const TrainStep& step,
                                        const int64_t* experts, int64_t count,
                                        const float* down_grad, const float* up_grad,
                                        uint8_t* records, float* accum, int threads = 0);

}  // namespace trove
