// The oracles of kernels/engram.h: the hash one id at a time, rows through the quantizer
// oracles, and the row gradients accumulated in an ordered map.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/engram.h"

namespace trove {

int64_t engram_hash_one_ref(const EngramHash& hash, const int64_t* tokens, int64_t seq, int64_t b,
                            int64_t t, int n, int head);
void engram_hash_ref(const EngramHash& hash, const int64_t* tokens, int64_t batch, int64_t seq,
                     int64_t* ids);
void engram_pack_row_ref(const EngramRowLayout& layout, const float* x, uint8_t* row);
void engram_unpack_row_ref(const EngramRowLayout& layout, const uint8_t* row, float* y);
void engram_row_grads_ref(const int64_t* ids, int64_t n, const float* dy, int64_t ld_dy,
                          int64_t dim, std::vector<int64_t>* unique, std::vector<float>* grads);

}  // namespace trove
