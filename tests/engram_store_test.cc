// Engram layers in the store (runtime/engram): written beside a PEER-free store, read back
// through every tier exactly as packed, prefetched, verified, and refused when damaged.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kernels/cpu/ref/engram_ref.h"
#include "runtime/engram/engram_store.h"
#include "runtime/engram/engram_table.h"
#include "storage/store.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using ::testing::HasSubstr;

struct Model {
  EngramConfig config;
  std::vector<std::vector<float>> tables;  // [tables][vocab * e]
  EngramDense dense;
};

Model make_model(int64_t vocab, int64_t e, uint32_t seed) {
  Model m;
  m.config.hidden = 12;
  m.config.embed_per_head = e;
  m.config.kernel_size = 3;
  m.config.layer_idx = 5;
  m.config.hash.max_ngram = 3;
  m.config.hash.heads = 3;
  m.config.hash.vocab = vocab;
  m.config.hash.mult = {2021, 1234567, 77};
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  m.tables.resize(static_cast<size_t>(m.config.tables()));
  for (auto& t : m.tables) {
    t.resize(static_cast<size_t>(vocab * e));
    for (auto& v : t) v = nd(rng);
  }
  const int64_t d = m.config.hidden, ce = m.config.concat_dim();
  auto fill = [&](std::vector<float>* v, size_t n) {
    v->resize(n);
    for (auto& x : *v) x = nd(rng);
  };
  fill(&m.dense.value_proj, static_cast<size_t>(d * ce));
  fill(&m.dense.key_proj, static_cast<size_t>(d * ce));
  fill(&m.dense.norm_k, static_cast<size_t>(d));
  fill(&m.dense.norm_q, static_cast<size_t>(d));
  fill(&m.dense.conv, static_cast<size_t>(d * m.config.kernel_size));
  return m;
}

Status write(const std::string& path, const Model& m, DType dtype) {
  TROVE_ASSIGN_OR_RETURN(auto w, StoreWriter::create(path, nlohmann::json::object()));
  const int64_t e = m.config.embed_per_head;
  auto fill = [&](int64_t k, int64_t begin, int64_t count, float* out) -> Status {
    std::memcpy(out, m.tables[static_cast<size_t>(k)].data() + begin * e,
                static_cast<size_t>(count * e) * 4);
    return {};
  };
  TROVE_RETURN_IF_ERROR(
      write_engram_layer(&w, "model.layers.1.engram", m.config, dtype, fill, m.dense).status());
  return w.finish();
}

// What a lookup must return: each table's row through the row oracle.
std::vector<float> expected(const Model& m, const EngramRowLayout& l,
                            const std::vector<int64_t>& ids, int64_t n) {
  const int64_t tables = m.config.tables(), e = m.config.embed_per_head;
  std::vector<float> out(static_cast<size_t>(n * tables * e));
  std::vector<uint8_t> row(l.row_bytes);
  for (int64_t k = 0; k < tables; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = ids[static_cast<size_t>(k * n + i)];
      engram_pack_row_ref(l, m.tables[static_cast<size_t>(k)].data() + id * e, row.data());
      engram_unpack_row_ref(l, row.data(), out.data() + i * tables * e + k * e);
    }
  }
  return out;
}

TEST(EngramStore, LookupsEqualThePackedRowsOnEveryTier) {
  testing::ScratchDir dir;
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kI8, DType::kI4}) {
    for (int64_t e : {32, 7}) {
      const Model m = make_model(1009, e, 3);
      const std::string path = dir.file("e.trove");
      ASSERT_TRUE(write(path, m, dtype).ok());
      auto store = StoreReader::open(path);
      ASSERT_TRUE(store.ok()) << store.status().to_string();
      const StoreLayerInfo* layer = store->find_layer("model.layers.1.engram");
      ASSERT_NE(layer, nullptr);
      ASSERT_TRUE(is_engram_layer(*layer));
      // The stored table has no padding but the last record's.
      auto stored = read_engram_layer(*store, *layer);
      ASSERT_TRUE(stored.ok()) << stored.status().to_string();
      EXPECT_EQ(
          layer->table.count * layer->table.stride,
          static_cast<uint64_t>(stored->rows.records(m.config.rows())) * stored->rows.record_bytes);
      EXPECT_LT(stored->rows.overhead(m.config.rows()), 1.01);

      std::vector<int64_t> tokens(2 * 37);
      std::mt19937_64 rng(1);
      for (auto& t : tokens) t = static_cast<int64_t>(rng() % 32000);
      std::vector<EngramTableOptions> tiers(2);
      TieredSourceOptions small;
      small.host_budget_bytes = 400 * stored->rows.record_bytes;  // below most tables
      tiers[1].tiers = small;
      for (const EngramTableOptions& o : tiers) {
        auto t = EngramTable::open(*store, *layer, o);
        ASSERT_TRUE(t.ok()) << t.status().to_string();
        std::vector<int64_t> ids;
        ASSERT_TRUE((*t)->hash(tokens.data(), 2, 37, &ids).ok());
        std::vector<int64_t> want_ids(ids.size());
        engram_hash_ref(m.config.hash, tokens.data(), 2, 37, want_ids.data());
        ASSERT_EQ(want_ids, ids);
        const auto want = expected(m, stored->rows, ids, 74);
        for (bool prefetch : {false, true, true}) {
          if (prefetch) {
            ASSERT_TRUE((*t)->prefetch(ids, 74).ok());
          }
          std::vector<float> got(want.size(), -1.0f);
          Status s = (*t)->lookup(ids, 74, got.data());
          ASSERT_TRUE(s.ok()) << s.to_string();
          ASSERT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * 4))
              << dtype_name(dtype) << " e " << e << " tiered " << o.tiers.has_value();
          EXPECT_EQ((*t)->last_lookup().prefetched, prefetch);
          EXPECT_EQ((*t)->last_lookup().rows, 74 * m.config.tables());
          // The first tiered lookup reads from the store file.
          if (o.tiers.has_value() && !prefetch) {
            EXPECT_GT((*t)->last_lookup().fetch.misses, 0);
            EXPECT_GT((*t)->last_lookup().fetch.bytes_read, 0u);
          }
        }
        if (dtype == DType::kF32) {
          for (int64_t k = 0; k < m.config.tables(); ++k) {
            const float* src = m.tables[static_cast<size_t>(k)].data() + ids[k * 74 + 5] * e;
            ASSERT_EQ(0, std::memcmp(src, want.data() + 5 * m.config.concat_dim() + k * e, e * 4));
          }
        }
      }
      {
        // Preloaded, all resident: lookups read nothing more from the store.
        auto t = EngramTable::open(*store, *layer);
        ASSERT_TRUE(t.ok());
        ASSERT_TRUE((*t)->preload().ok());
        const auto* src = dynamic_cast<const ResidentStoreExpertSource*>(&(*t)->source());
        ASSERT_NE(src, nullptr);
        EXPECT_EQ(src->loaded_records(), static_cast<int64_t>(layer->table.count));
      }
      auto dense = read_engram_dense(*store, *layer, stored->config);
      ASSERT_TRUE(dense.ok());
      EXPECT_EQ(dense->value_proj, m.dense.value_proj);
      EXPECT_EQ(dense->conv, m.dense.conv);
      auto faults = store->verify();
      ASSERT_TRUE(faults.ok());
      EXPECT_TRUE(faults->empty());
    }
  }
}

TEST(EngramStore, DamageIsFoundAndBadIdsAreClearErrors) {
  testing::ScratchDir dir;
  const Model m = make_model(500, 32, 4);
  const std::string path = dir.file("e.trove");
  ASSERT_TRUE(write(path, m, DType::kI4).ok());
  uint64_t at = 0;
  uint64_t record_bytes = 0;
  {
    auto store = StoreReader::open(path);
    ASSERT_TRUE(store.ok());
    const StoreLayerInfo& layer = store->layers()[0];
    record_bytes = layer.table.stride;
    at = layer.table.offset + 3 * layer.table.stride + 5;  // inside record 3
    auto t = EngramTable::open(*store, layer);
    ASSERT_TRUE(t.ok());
    std::vector<int64_t> ids(static_cast<size_t>(m.config.tables()), 0);
    ids[2] = 500;
    std::vector<float> out(static_cast<size_t>(m.config.concat_dim()));
    Status s = (*t)->lookup(ids, 1, out.data());
    EXPECT_EQ(s.code(), Status::Code::kOutOfRange);
    EXPECT_THAT(s.message(), HasSubstr("table 2, position 0 asks for row 500 of 500"));
  }
  auto bytes = testing::read_all(path);
  bytes[at] ^= 0x10;
  testing::write_all(path, bytes);
  auto store = StoreReader::open(path);
  ASSERT_TRUE(store.ok());
  auto faults = store->verify();
  ASSERT_TRUE(faults.ok());
  ASSERT_EQ(faults->size(), 1u);
  EXPECT_EQ((*faults)[0].region, "records");
  EXPECT_EQ((*faults)[0].layer, "model.layers.1.engram");
  const StoreLayerInfo& layer = store->layers()[0];
  auto t = EngramTable::open(*store, layer);
  ASSERT_TRUE(t.ok());
  // Table 0, row 3 * rows_per_record lies in record 3.
  std::vector<int64_t> ids(static_cast<size_t>(m.config.tables()), 0);
  ids[0] = 3 * static_cast<int64_t>(record_bytes / 18);
  std::vector<float> out(static_cast<size_t>(m.config.concat_dim()));
  Status s = (*t)->lookup(ids, 1, out.data());
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.to_string(), HasSubstr("checksum"));
}

TEST(EngramStore, InfoThatDisagreesWithTheTableIsCorruption) {
  EngramConfig c = make_model(10, 8, 1).config;
  nlohmann::json j = engram_config_json(c);
  auto back = engram_config_from_json(j);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->hash.mult, c.hash.mult);
  j["hash_mult"][1] = 4;
  EXPECT_THAT(engram_config_from_json(j).status().to_string(), HasSubstr("multiplier 1 is 4"));
  j = engram_config_json(c);
  j["head_prime"] = 7;
  EXPECT_EQ(engram_config_from_json(j).status().code(), Status::Code::kNotSupported);

  testing::ScratchDir dir;
  const Model m = make_model(100, 32, 2);
  ASSERT_TRUE(write(dir.file("e.trove"), m, DType::kI8).ok());
  auto store = StoreReader::open(dir.file("e.trove"));
  ASSERT_TRUE(store.ok());
  StoreLayerInfo layer = store->layers()[0];
  layer.info["rows"]["dim"] = 16;
  EXPECT_EQ(read_engram_layer(*store, layer).status().code(), Status::Code::kCorruption);
  layer = store->layers()[0];
  layer.info["config"]["vocab"] = 101;
  EXPECT_THAT(read_engram_layer(*store, layer).status().to_string(), HasSubstr("disagree"));
  layer = store->layers()[0];
  layer.info["rows"]["rows_per_record"] = 16;
  EXPECT_THAT(read_engram_layer(*store, layer).status().to_string(), HasSubstr("row_bytes"));
}

}  // namespace
}  // namespace trove
