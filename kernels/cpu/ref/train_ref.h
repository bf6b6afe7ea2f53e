// The oracle of the int4 training view (kernels/train.h): import, export and the
// stochastic-rounding update, written one element at a time exactly as the rules read. Every
// other path (kernels/cpu/train.h, CUDA) must equal it bit for bit on codes, scales and
// accumulators.
#pragma once

#include <cstdint>

#include "base/status.h"
#include "kernels/record.h"
#include "kernels/train.h"

namespace trove {

// One serving int4 record (serving.stride bytes) -> one training int8 record (training.stride
// bytes, padding zeroed): b = 16 q, same scales. Errors for layouts check_train_layouts
// rejects.
Status train_import_record_ref(const RecordLayout& serving, const RecordLayout& training,
                               const uint8_t* in, uint8_t* out);
// The inverse direction: q = train_code_to_int4(b), stored q + 8, same scales.
Status train_export_record_ref(const RecordLayout& serving, const RecordLayout& training,
                               const uint8_t* in, uint8_t* out);

// One update of one training record in place. `down_grad` is [width][dim], `up_grad`
// [width][dim_out]; `accum` the record's 2·width Adagrad accumulators (down rows then up rows;
// may be nullptr for SGD). On error nothing is changed.
Result<TrainStats> train_update_record_ref(const RecordLayout& training, const TrainStep& step,
                                           int64_t expert, const float* down_grad,
                                           const float* up_grad, uint8_t* record, float* accum);

// `count` records at training.stride: experts[count], down_grad [count][width][dim], up_grad
// [count][width][dim_out], accum [count][2·width]. Checks every record's inputs first (bad
// input: nothing changed), then updates them in order; a record whose scale would overflow
// fp16 is left unchanged, the others are updated, and the error names the first such expert.
Result<TrainStats> train_update_records_ref(const RecordLayout& training, const TrainStep& step,
                                            const int64_t* experts, int64_t count,
                                            const float* down_grad, const float* up_grad,
                                            uint8_t* records, float* accum);

}  // namespace trove
