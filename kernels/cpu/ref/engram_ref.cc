#include "kernels/cpu/ref/engram_ref.h"

#include <cstring>
#include <map>

#include "base/check.h"
#include "kernels/cpu/ref/quant_ref.h"
#include "kernels/quant.h"

namespace trove {

int64_t engram_hash_one_ref(const EngramHash& hash, const int64_t* tokens, int64_t seq, int64_t b,
                            int64_t t, int n, int head) {
  int64_t h = 0;
  for (int i = 0; i < n; ++i) {
    const int64_t tok = t - i >= 0 ? tokens[b * seq + t - i] : 0;
    // int64 products wrap as torch's do (two's complement), hence unsigned arithmetic.
    h ^= static_cast<int64_t>(static_cast<uint64_t>(tok) *
                              static_cast<uint64_t>(hash.mult[static_cast<size_t>(i)]));
  }
  const auto sum = static_cast<int64_t>(static_cast<uint64_t>(h) +
                                        static_cast<uint64_t>(head * kEngramHeadPrime));
  int64_t r = sum % hash.vocab;
  if (r < 0) r += hash.vocab;
  return r;
}

void engram_hash_ref(const EngramHash& hash, const int64_t* tokens, int64_t batch, int64_t seq,
                     int64_t* ids) {
  for (int n = 2; n <= hash.max_ngram; ++n) {
    for (int head = 0; head < hash.heads; ++head) {
      int64_t* out = ids + ((n - 2) * hash.heads + head) * batch * seq;
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t t = 0; t < seq; ++t) {
          out[b * seq + t] = engram_hash_one_ref(hash, tokens, seq, b, t, n, head);
        }
      }
    }
  }
}

void engram_pack_row_ref(const EngramRowLayout& layout, const float* x, uint8_t* row) {
  const int64_t d = layout.dim;
  uint8_t* codes = row + layout.scale_bytes;
  // Scales are written byte by byte: rows start at any even offset.
  std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(d)));
  switch (layout.dtype) {
    case DType::kI8:
      quantize_row_int8_ref(x, d, scales.data(), reinterpret_cast<int8_t*>(codes));
      break;
    case DType::kI4:
      quantize_row_int4_ref(x, d, scales.data(), codes);
      break;
    default:
      convert_row_ref(layout.dtype, x, d, row);
      return;
  }
  std::memcpy(row, scales.data(), layout.scale_bytes);
}

void engram_unpack_row_ref(const EngramRowLayout& layout, const uint8_t* row, float* y) {
  const int64_t d = layout.dim;
  const uint8_t* codes = row + layout.scale_bytes;
  std::vector<uint16_t> scales(static_cast<size_t>(quant_groups(d)));
  std::memcpy(scales.data(), row, layout.scale_bytes);
  switch (layout.dtype) {
    case DType::kI8:
      dequantize_row_int8_ref(scales.data(), reinterpret_cast<const int8_t*>(codes), d, y);
      break;
    case DType::kI4:
      dequantize_row_int4_ref(scales.data(), codes, d, y);
      break;
    default:
      unconvert_row_ref(layout.dtype, row, d, y);
      break;
  }
}

void engram_row_grads_ref(const int64_t* ids, int64_t n, const float* dy, int64_t ld_dy,
                          int64_t dim, std::vector<int64_t>* unique, std::vector<float>* grads) {
  std::map<int64_t, std::vector<float>> sums;
  for (int64_t i = 0; i < n; ++i) {
    auto [it, fresh] = sums.try_emplace(ids[i], static_cast<size_t>(dim), 0.0f);
    for (int64_t j = 0; j < dim; ++j) it->second[static_cast<size_t>(j)] += dy[i * ld_dy + j];
  }
  unique->clear();
  grads->clear();
  for (const auto& [id, g] : sums) {
    unique->push_back(id);
    grads->insert(grads->end(), g.begin(), g.end());
  }
}

}  // namespace trove
