// Test helpers for the runtime's PEER-layer tests (tiers, backends): a packed synthetic store
// of one layer, and batches of gaussian tokens that repeat so that tiers get hits.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/bench/synthetic.h"
#include "runtime/convert/pack.h"
#include "tests/test_util.h"

namespace trove::testing {

// The small layer the tier tests run (tiered_source_test, cuda_runtime_test): D = 72 (not a
// multiple of 32), D_out = 40, h = 3, N = 576, k = k' = 4, gelu, softmax gates.
inline PeerConfig small_tier_config() {
  PeerConfig c;
  c.dim = 72;  // not a multiple of 32
  c.dim_out = 40;
  c.heads = 3;
  c.n_keys = 24;  // N = 576
  c.dim_key = 6;
  c.topk = 4;
  c.topk_per_half = 4;
  c.activation = Activation::kGelu;
  c.gate = Gate::kSoftmax;
  return c;
}

// One synthetic layer "blk.0.peer" of `config` (trove layout, fp32 tensors, router weights of
// std `router_std`) packed as `dtype` into dir/m-<dtype>.trove; returns the path.
inline std::string pack_synthetic_store(const ScratchDir& dir, const PeerConfig& config,
                                        DType dtype, float router_std) {
  SyntheticCheckpoint spec;
  spec.layout = ImportLayout::kTrove;
  spec.prefixes = {"blk.0.peer"};
  spec.config = config;
  spec.dtype = StDType::kF32;
  spec.router_std = router_std;
  EXPECT_TRUE(write_synthetic_checkpoint(dir.file("in.safetensors"), spec).ok());
  PackOptions opt;
  opt.inputs = {dir.file("in.safetensors")};
  opt.output = dir.file(std::string("m-") + std::string(dtype_name(dtype)) + ".trove");
  opt.layout = ImportLayout::kTrove;
  opt.dtype = dtype;
  opt.layers = {{"blk.0.peer", "blk.0.peer"}};
  const auto packed = pack_store(opt);
  EXPECT_TRUE(packed.ok()) << packed.status().to_string();
  return opt.output;
}

// `count` batches of `tokens` x `dim` gaussian values from `seed`; every other batch repeats
// an earlier one (batch b repeats batch b / 2), so later batches hit what earlier ones loaded.
inline std::vector<std::vector<float>> repeating_batches(uint32_t seed, int64_t count,
                                                         int64_t tokens, int64_t dim) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<float>> out;
  for (int64_t b = 0; b < count; ++b) {
    if (b % 2 == 1) {
      out.push_back(out[static_cast<size_t>(b / 2)]);
      continue;
    }
    std::vector<float> x(static_cast<size_t>(tokens * dim));
    for (float& v : x) v = normal(rng);
    out.push_back(std::move(x));
  }
  return out;
}

}  // namespace trove::testing
