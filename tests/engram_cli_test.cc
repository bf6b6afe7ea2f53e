// The `trove` binary on Engram layers: pack --engram beside PEER layers (layout mikeybeez),
// inspect --json, verify naming a damaged Engram record, and the errors of bad requests.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "storage/safetensors.h"
#include "storage/store.h"
#include "tests/cli_util.h"

namespace trove {
namespace {

using testing::run;
using testing::RunResult;
using testing::ScratchDir;

// A checkpoint in the background's layout: PEER at model.layers.3.mlp.peer (D 16, h 1, dk 4,
// n 4) and Engram at model.layers.1.engram (orders 2..3, 2 heads, e 32, vocab 101).
Status write_mixed_checkpoint(const std::string& path) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  std::vector<std::vector<uint8_t>> data;
  std::vector<StTensorOut> out;
  auto f32 = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<uint8_t> bytes(static_cast<size_t>(n) * 4);
    for (int64_t i = 0; i < n; ++i) {
      const float v = nd(rng);
      std::memcpy(bytes.data() + i * 4, &v, 4);
    }
    data.push_back(std::move(bytes));
    out.push_back({name, StDType::kF32, shape, {}, {}});
  };
  const std::string p = "model.layers.3.mlp.peer.", e = "model.layers.1.engram.";
  f32(p + "to_queries.weight", {8, 16});
  f32(p + "keys", {1, 4, 2, 4});
  f32(p + "expert_down.weight", {16, 16});
  f32(p + "expert_up.weight", {16, 16});
  for (int j = 0; j < 4; ++j) f32(e + "embeddings." + std::to_string(j) + ".weight", {101, 32});
  f32(e + "value_proj.weight", {16, 128});
  f32(e + "key_proj.weight", {16, 128});
  f32(e + "norm_k.weight", {16});
  f32(e + "norm_q.weight", {16});
  f32(e + "conv.weight", {16, 1, 4});
  const int64_t mult[3] = {2029, 1197, 15355};
  std::vector<uint8_t> m(sizeof(mult));
  std::memcpy(m.data(), mult, sizeof(mult));
  data.push_back(std::move(m));
  out.push_back({e + "hash_mult", StDType::kI64, {3}, {}, {}});
  for (size_t i = 0; i < out.size(); ++i) out[i].data = data[i];
  return write_safetensors(path, out, {});
}

TEST(EngramCli, PackInspectVerify) {
  ScratchDir dir;
  ASSERT_TRUE(write_mixed_checkpoint(dir.file("in.safetensors")).ok());
  RunResult p = run(dir, {"pack", dir.file("in.safetensors"), "-o", dir.file("m.trove"), "--layout",
                          "mikeybeez", "--prefix", "model.layers.3.mlp.peer", "--engram",
                          "model.layers.1.engram", "--quant", "int4", "--topk", "2", "--json"});
  ASSERT_EQ(p.exit_code, 0) << p.err;
  auto pj = nlohmann::json::parse(p.out);
  EXPECT_EQ(pj["engram_layers"][0]["tables"], 4);
  EXPECT_EQ(pj["engram_layers"][0]["rows"], 404);

  RunResult i = run(dir, {"inspect", dir.file("m.trove"), "--json"});
  ASSERT_EQ(i.exit_code, 0) << i.err;
  auto j = nlohmann::json::parse(i.out);
  EXPECT_EQ(j["layers"][0]["experts"], 16);
  EXPECT_EQ(j["engram_layers"][0]["name"], "model.layers.1.engram");
  EXPECT_EQ(j["engram_layers"][0]["config"]["hash_mult"],
            (std::vector<int64_t>{2029, 1197, 15355}));
  EXPECT_EQ(j["engram_layers"][0]["config"]["layer_idx"], 1);
  RunResult text = run(dir, {"inspect", dir.file("m.trove")});
  EXPECT_NE(text.out.find("engram layer model.layers.1.engram"), std::string::npos) << text.out;

  RunResult v = run(dir, {"verify", dir.file("m.trove")});
  EXPECT_EQ(v.exit_code, 0) << v.err;

  auto store = StoreReader::open(dir.file("m.trove"));
  ASSERT_TRUE(store.ok());
  const StoreLayerInfo* layer = store->find_layer("model.layers.1.engram");
  ASSERT_NE(layer, nullptr);
  const uint64_t at = layer->table.offset + 5 * layer->table.stride + 7;  // record 5
  auto bytes = testing::read_all(dir.file("m.trove"));
  bytes[at] ^= 0x01;
  testing::write_all(dir.file("m.trove"), bytes);
  RunResult bad = run(dir, {"verify", dir.file("m.trove")});
  EXPECT_EQ(bad.exit_code, 3);
  EXPECT_NE(bad.err.find("model.layers.1.engram"), std::string::npos) << bad.err;
}

TEST(EngramCli, BadRequestsAreClearErrors) {
  ScratchDir dir;
  ASSERT_TRUE(write_mixed_checkpoint(dir.file("in.safetensors")).ok());
  RunResult t = run(dir, {"pack", dir.file("in.safetensors"), "-o", dir.file("m.trove"), "--layout",
                          "trove", "--engram", "model.layers.1.engram"});
  EXPECT_NE(t.exit_code, 0);
  EXPECT_NE(t.err.find("mikeybeez"), std::string::npos) << t.err;
  RunResult none = run(dir, {"pack", dir.file("in.safetensors"), "-o", dir.file("m.trove"),
                             "--layout", "mikeybeez"});
  EXPECT_NE(none.exit_code, 0);
  EXPECT_NE(none.err.find("no layer given"), std::string::npos) << none.err;
  RunResult missing = run(dir, {"pack", dir.file("in.safetensors"), "-o", dir.file("m.trove"),
                                "--layout", "mikeybeez", "--engram", "model.layers.9.engram"});
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.err.find("model.layers.9.engram.hash_mult"), std::string::npos) << missing.err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("m.trove")));
}

}  // namespace
}  // namespace trove
