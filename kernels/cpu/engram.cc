// kernels/engram.h on the CPU: the hash a table at a time, the gather through the dispatching
// row dequantizers (kernels/cpu/quant.h), the row gradients by a stable sort of positions.
#include "kernels/engram.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "base/half.h"
#include "base/strings.h"
#include "base/thread_pool.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/train.h"
#include "kernels/quant.h"
#include "kernels/record.h"

namespace trove {

Status EngramHash::validate() const {
  if (max_ngram < 2) {
    return Status::invalid_argument(
        str_printf("engram max_ngram is %d; it must be >= 2 (orders 2..max_ngram)", max_ngram));
  }
  if (heads < 1)
    return Status::invalid_argument(str_printf("engram heads is %d; it must be >= 1", heads));
  if (vocab < 1) {
    return Status::invalid_argument(
        str_printf("engram vocab is %lld; it must be >= 1", static_cast<long long>(vocab)));
  }
  if (mult.size() != static_cast<size_t>(max_ngram)) {
    return Status::invalid_argument(
        str_printf("engram hash has %zu multipliers; max_ngram %d "
                   "needs %d",
                   mult.size(), max_ngram, max_ngram));
  }
  for (size_t i = 0; i < mult.size(); ++i) {
    if (mult[i] <= 0 || mult[i] % 2 == 0) {
      return Status::invalid_argument(
          str_printf("engram hash multiplier %zu is %lld; it must be odd and positive", i,
                     static_cast<long long>(mult[i])));
    }
  }
  return Status::ok_status();
}

Result<EngramRowLayout> EngramRowLayout::make(DType dtype, int64_t dim, size_t min_record_bytes) {
  if (dim < 1 || dim > (int64_t{1} << 24)) {
    return Status::invalid_argument(
        str_printf("engram row dim is %lld; it must be in [1, 2^24]", static_cast<long long>(dim)));
  }
  if (min_record_bytes > (size_t{1} << 20)) {
    return Status::invalid_argument(
        str_printf("engram min_record_bytes is %zu; it must be at most 1 MiB", min_record_bytes));
  }
  EngramRowLayout l;
  l.dtype = dtype;
  l.dim = dim;
  l.scale_bytes = row_scale_bytes(dtype, dim);
  l.row_bytes = l.scale_bytes + row_code_bytes(dtype, dim);
  // The fewest rows whose bytes are a multiple of 64, then whole multiples of that up to the
  // minimum record size.
  const size_t step = 64 / std::gcd(l.row_bytes, size_t{64});
  size_t rows = step;
  while (rows * l.row_bytes < min_record_bytes) rows += step;
  l.rows_per_record = static_cast<int64_t>(rows);
  l.record_bytes = rows * l.row_bytes;
  return l;
}

double EngramRowLayout::overhead(int64_t rows) const {
  if (rows <= 0) return 1.0;
  return static_cast<double>(records(rows)) * static_cast<double>(record_bytes) /
         (static_cast<double>(rows) * static_cast<double>(row_bytes));
}

Status engram_hash(const EngramHash& hash, const int64_t* tokens, int64_t batch, int64_t seq,
                   int64_t* ids) {
  TROVE_RETURN_IF_ERROR(hash.validate());
  const int64_t count = batch * seq;
  for (int64_t i = 0; i < count; ++i) {
    if (tokens[i] < 0) {
      return Status::invalid_argument(
          str_printf("engram token at batch %lld, position %lld is %lld; token ids must be >= 0",
                     static_cast<long long>(i / seq), static_cast<long long>(i % seq),
                     static_cast<long long>(tokens[i])));
    }
  }
  // One XOR accumulator per position, extended an order at a time: order n's h is order
  // n - 1's XOR token[t - n + 1] * mult[n - 1].
  std::vector<int64_t> h(static_cast<size_t>(count));
  // Products and sums wrap as torch's int64 do (two's complement): unsigned arithmetic.
  auto mul = [](int64_t a, int64_t b) {
    return static_cast<int64_t>(static_cast<uint64_t>(a) * static_cast<uint64_t>(b));
  };
  for (int64_t i = 0; i < count; ++i) h[static_cast<size_t>(i)] = mul(tokens[i], hash.mult[0]);
  for (int n = 2; n <= hash.max_ngram; ++n) {
    const int64_t back = n - 1;
    const int64_t m = hash.mult[static_cast<size_t>(back)];
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t* tok = tokens + b * seq;
      int64_t* hb = h.data() + b * seq;
      for (int64_t t = std::min(back, seq); t < seq; ++t) hb[t] ^= mul(tok[t - back], m);
      // Positions t < back XOR 0 * m: unchanged.
    }
    for (int head = 0; head < hash.heads; ++head) {
      int64_t* out = ids + ((n - 2) * hash.heads + head) * count;
      const int64_t off = head * kEngramHeadPrime;
      for (int64_t i = 0; i < count; ++i) {
        const auto sum = static_cast<int64_t>(static_cast<uint64_t>(h[static_cast<size_t>(i)]) +
                                              static_cast<uint64_t>(off));
        const int64_t r = sum % hash.vocab;
        out[i] = r < 0 ? r + hash.vocab : r;
      }
    }
  }
  return Status::ok_status();
}

namespace {

// Scales are copied out first: a row starts at any even byte, not necessarily 2-aligned for
// a uint16_t load in every case (row_bytes is even, tables start 64-aligned, so they are;
// the copy keeps the kernels free of that assumption).
void unpack_row(const EngramRowLayout& l, const uint8_t* row, uint16_t* scales, float* y) {
  const uint8_t* codes = row + l.scale_bytes;
  switch (l.dtype) {
    case DType::kF32:
      std::memcpy(y, row, static_cast<size_t>(l.dim) * 4);
      break;
    case DType::kBF16:
      for (int64_t j = 0; j < l.dim; ++j) {
        uint16_t v;
        std::memcpy(&v, row + 2 * j, 2);
        y[j] = bf16_to_fp32(v);
      }
      break;
    case DType::kF16:
      for (int64_t j = 0; j < l.dim; ++j) {
        uint16_t v;
        std::memcpy(&v, row + 2 * j, 2);
        y[j] = fp16_to_fp32(v);
      }
      break;
    case DType::kI8:
      std::memcpy(scales, row, l.scale_bytes);
      dequantize_row_int8(scales, reinterpret_cast<const int8_t*>(codes), l.dim, y);
      break;
    case DType::kI4:
      std::memcpy(scales, row, l.scale_bytes);
      dequantize_row_int4(scales, codes, l.dim, y);
      break;
  }
}

}  // namespace

void engram_pack_rows(const EngramRowLayout& l, const float* x, int64_t rows, uint8_t* out) {
  std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(l.dim)));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * l.dim;
    uint8_t* row = out + static_cast<size_t>(r) * l.row_bytes;
    uint8_t* codes = row + l.scale_bytes;
    switch (l.dtype) {
      case DType::kF32:
        std::memcpy(row, xr, static_cast<size_t>(l.dim) * 4);
        continue;
      case DType::kBF16:
      case DType::kF16:
        for (int64_t j = 0; j < l.dim; ++j) {
          const uint16_t v = l.dtype == DType::kBF16 ? fp32_to_bf16(xr[j]) : fp32_to_fp16(xr[j]);
          std::memcpy(row + 2 * j, &v, 2);
        }
        continue;
      case DType::kI8:
        quantize_row_int8(xr, l.dim, scales.data(), reinterpret_cast<int8_t*>(codes));
        break;
      case DType::kI4:
        quantize_row_int4(xr, l.dim, scales.data(), codes);
        break;
    }
    std::memcpy(row, scales.data(), l.scale_bytes);
  }
}

void engram_gather(const EngramRowLayout& l, const uint8_t* const* rows, int64_t n, float* out,
                   int64_t ld_out, int threads) {
  // Under ~16k rows a chunk the threads cost more than they save.
  const int want = static_cast<int>(
      std::min<int64_t>(resolve_thread_count(threads), std::max<int64_t>(1, n / 16384)));
  auto run = [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(l.dim)));
    for (int64_t i = begin; i < end; ++i) unpack_row(l, rows[i], scales.data(), out + i * ld_out);
  };
  if (want <= 1) {
    run(0, n);
  } else {
    parallel_for(n, want, run);
  }
}

void engram_gather_table(const EngramRowLayout& l, const uint8_t* table, const int64_t* ids,
                         int64_t n, float* out, int64_t ld_out, int threads) {
  std::vector<const uint8_t*> rows(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) rows[static_cast<size_t>(i)] = table + ids[i] * l.row_bytes;
  engram_gather(l, rows.data(), n, out, ld_out, threads);
}

void engram_row_grads(const int64_t* ids, int64_t n, const float* dy, int64_t ld_dy, int64_t dim,
                      std::vector<int64_t>* unique, std::vector<float>* grads) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  // Stable: positions of one id stay in increasing order, the order the sums are taken in.
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  unique->clear();
  grads->clear();
  for (int64_t k = 0; k < n;) {
    const int64_t id = ids[order[static_cast<size_t>(k)]];
    unique->push_back(id);
    grads->resize(grads->size() + static_cast<size_t>(dim), 0.0f);
    float* g = grads->data() + grads->size() - static_cast<size_t>(dim);
    for (; k < n && ids[order[static_cast<size_t>(k)]] == id; ++k) {
      const float* row = dy + order[static_cast<size_t>(k)] * ld_dy;
      for (int64_t j = 0; j < dim; ++j) g[j] += row[j];
    }
  }
}

void engram_train_import_row(const EngramRowLayout& serving, const EngramRowLayout& training,
                             const uint8_t* in, uint8_t* out) {
  std::memcpy(out, in, serving.scale_bytes);
  const uint8_t* q = in + serving.scale_bytes;
  auto* b = reinterpret_cast<int8_t*>(out + training.scale_bytes);
  const int64_t padded = quant_groups(serving.dim) * kQuantGroup;
  for (int64_t g = 0; g < padded / kQuantGroup; ++g) {
    for (int j = 0; j < 16; ++j) {
      const uint8_t byte = q[g * 16 + j];
      b[g * 32 + j] = int4_to_train_code((byte & 0x0f) - 8);
      b[g * 32 + j + 16] = int4_to_train_code((byte >> 4) - 8);
    }
  }
}

void engram_train_export_row(const EngramRowLayout& serving, const EngramRowLayout& training,
                             const uint8_t* in, uint8_t* out) {
  std::memcpy(out, in, serving.scale_bytes);
  const auto* b = reinterpret_cast<const int8_t*>(in + training.scale_bytes);
  uint8_t* q = out + serving.scale_bytes;
  const int64_t groups = quant_groups(serving.dim);
  for (int64_t g = 0; g < groups; ++g) {
    for (int j = 0; j < 16; ++j) {
      const int lo = train_code_to_int4(b[g * 32 + j]) + 8;
      const int hi = train_code_to_int4(b[g * 32 + j + 16]) + 8;
      q[g * 16 + j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

Result<TrainStats> engram_train_update_rows(const EngramRowLayout& training, const TrainStep& step,
                                            const int64_t* row_ids, int64_t n, const float* grads,
                                            uint8_t* const* rows, float* accum) {
  if (training.dtype != DType::kI8) {
    return Status::invalid_argument("engram training rows must be the int8 training view");
  }
  // Each row is the down row of a width-1 PEER training record whose up row (one element,
  // scale 1.0, code 0, gradient 0) never changes: kernels/train.h's update, unchanged.
  TROVE_ASSIGN_OR_RETURN(const RecordLayout rec,
                         RecordLayout::make(DType::kI8, training.dim, 1, 1, 64));
  const size_t stride = rec.stride;
  std::vector<uint8_t> records(static_cast<size_t>(n) * stride, 0);
  std::vector<float> up_grad(static_cast<size_t>(n), 0.0f);
  std::vector<float> acc(static_cast<size_t>(2 * n), 0.0f);
  const uint16_t one = fp32_to_fp16(1.0f);
  const size_t codes = training.row_bytes - training.scale_bytes;
  for (int64_t i = 0; i < n; ++i) {
    uint8_t* r = records.data() + static_cast<size_t>(i) * stride;
    std::memcpy(r + rec.down_scales_offset, rows[i], training.scale_bytes);
    std::memcpy(r + rec.up_scales_offset, &one, 2);
    std::memcpy(r + rec.down_codes_offset, rows[i] + training.scale_bytes, codes);
    if (accum != nullptr) acc[static_cast<size_t>(2 * i)] = accum[i];
  }
  Result<TrainStats> stats =
      train_update_records(rec, step, row_ids, n, grads, up_grad.data(), records.data(),
                           accum != nullptr ? acc.data() : nullptr, /*threads=*/1);
  // Rows the update changed (all of them, or all but those it names) go back.
  if (!stats.ok() && stats.status().code() != Status::Code::kOutOfRange) return stats;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* r = records.data() + static_cast<size_t>(i) * stride;
    std::memcpy(rows[i], r + rec.down_scales_offset, training.scale_bytes);
    std::memcpy(rows[i] + training.scale_bytes, r + rec.down_codes_offset, codes);
    if (accum != nullptr) accum[i] = acc[static_cast<size_t>(2 * i)];
  }
  return stats;
}

}  // namespace trove
