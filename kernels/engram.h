// Engram tables (issue 18): hashed n-gram memories whose rows trove stores. A layer has
// (max_ngram - 1) * heads tables of `vocab` rows of `dim` elements each; the rows a batch reads
// depend only on its token ids.
//
// The hash (the background's LlamaEngram): for order n = 2..max_ngram and head 0..heads-1,
//
//   h(b, t)  = XOR_{i < n} token[b][t - i] * mult[i]     (token 0 before the sequence start)
//   id(b, t) = (h(b, t) + head * 104729) mod vocab        (floor mod, so never negative)
//
// in int64, read by table (n - 2) * heads + head. `mult` are the layer's odd multipliers (the
// module's hash_mult buffer); tokens must be >= 0 (the background's are vocabulary ids).
//
// A row is stored as [fp16 scales: G(dim)][codes] for int8/int4 (the group-wise rules of
// kernels/quant.h) and as raw elements for f32/f16/bf16: row_bytes with no padding. Rows are
// packed back to back; a record (the unit the store checksums and the tiers move) is
// rows_per_record consecutive rows, chosen so that rows_per_record * row_bytes is a multiple of
// 64 and at least min_record_bytes: no padding inside a table except after its last row. Row r
// lies at byte r * row_bytes of the table, in record r / rows_per_record.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "base/dtype.h"
#include "base/status.h"
#include "kernels/train.h"

namespace trove {

inline constexpr int64_t kEngramHeadPrime = 104729;

struct EngramHash {
  int max_ngram = 3;
  int heads = 8;
  int64_t vocab = 100000;
  std::vector<int64_t> mult;  // max_ngram odd multipliers

  int64_t tables() const { return static_cast<int64_t>(max_ngram - 1) * heads; }
  // Errors naming the field for max_ngram < 2, heads < 1, vocab < 1, a multiplier count other
  // than max_ngram, or a multiplier that is not odd and positive.
  Status validate() const;
};

struct EngramRowLayout {
  DType dtype = DType::kF32;
  int64_t dim = 0;
  size_t scale_bytes = 0;  // bytes of fp16 scales at the start of a row (0 for float types)
  size_t row_bytes = 0;    // scales + codes
  int64_t rows_per_record = 1;
  size_t record_bytes = 0;  // rows_per_record * row_bytes, a multiple of 64

  // Errors naming the value for dim < 1 or min_record_bytes over 1 MiB.
  static Result<EngramRowLayout> make(DType dtype, int64_t dim, size_t min_record_bytes = 512);

  int64_t records(int64_t rows) const { return (rows + rows_per_record - 1) / rows_per_record; }
  // Stored bytes of a table of `rows` rows (whole records) / its useful bytes.
  double overhead(int64_t rows) const;
};

// ids [tables][batch][seq] of tokens [batch][seq] (row-major int64). Returns an error naming the
// position of a negative token.
Status engram_hash(const EngramHash& hash, const int64_t* tokens, int64_t batch, int64_t seq,
                   int64_t* ids);

// Quantizes `rows` rows x [rows][dim] into rows * row_bytes bytes (bit-identical to the oracle).
void engram_pack_rows(const EngramRowLayout& layout, const float* x, int64_t rows, uint8_t* out);

// out[i][0..dim) (row i at out + i * ld_out) = the dequantized row whose bytes start at rows[i].
// Threads: 0 means hardware concurrency; the result does not depend on it.
void engram_gather(const EngramRowLayout& layout, const uint8_t* const* rows, int64_t n, float* out,
                   int64_t ld_out, int threads = 1);
// The same from a table in memory: row ids[i] at table + ids[i] * row_bytes (ids must be in
// range: callers check).
void engram_gather_table(const EngramRowLayout& layout, const uint8_t* table, const int64_t* ids,
                         int64_t n, float* out, int64_t ld_out, int threads = 1);

// The sparse backward of a gather: for dy [n][dim] (row i at dy + i * ld_dy) of the rows ids[i],
// `unique` gets the distinct ids in ascending order and `grads` [unique.size()][dim] each one's
// sum of its dy rows, added in increasing i from 0.0f (so every implementation gives the same
// bits). No dense table gradient exists.
void engram_row_grads(const int64_t* ids, int64_t n, const float* dy, int64_t ld_dy, int64_t dim,
                      std::vector<int64_t>* unique, std::vector<float>* grads);

// ---- training (SPEC §7, as PEER's tables: kernels/train.h) ------------------------------------
//
// An int4 Engram row trains in the int8 training view of kernels/train.h: the row's fp16
// scales with int8 codes b (weight = d/16 · b), imported from int4 as b = 16 q and exported as
// q = train_code_to_int4(b). One row updates exactly as the down row of a PEER record of width
// 1 whose up row has a zero gradient: SR with the counter hash (seed, step, table, row, element)
// where `row` is the global row id (k * vocab + r), row-wise Adagrad with one fp32 accumulator
// per row. `training` is the kI8 EngramRowLayout of the serving row's dim.

// serving int4 row -> training int8 row (same scales), and back.
void engram_train_import_row(const EngramRowLayout& serving, const EngramRowLayout& training,
                             const uint8_t* in, uint8_t* out);
void engram_train_export_row(const EngramRowLayout& serving, const EngramRowLayout& training,
                             const uint8_t* in, uint8_t* out);

// One step over `n` training rows (rows[i] points at row_ids[i]'s training bytes, grads
// [n][dim] segment-summed, accum[n] the rows' Adagrad accumulators, nullptr for SGD). Bad input
// (step, non-finite gradient or scale, negative accumulator) changes nothing; a row whose scale
// would overflow fp16 is left unchanged and named. Returns the summed stats.
Result<TrainStats> engram_train_update_rows(const EngramRowLayout& training, const TrainStep& step,
                                            const int64_t* row_ids, int64_t n, const float* grads,
                                            uint8_t* const* rows, float* accum);

}  // namespace trove
