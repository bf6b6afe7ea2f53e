// In-place store updates (storage/store_update.h): a commit is a new generation read back
// whole; only what changed is written; bad input is named and changes nothing; a crash at
// every write, sync, truncate, create and unlink of an update (or of its recovery), with and
// without losing what was not synced, leaves exactly the old or exactly the new generation; a
// damaged journal is never replayed and a journal of another generation is refused.
// storage/FORMAT.md, "Generations", is the specification tested here.
#include "storage/store_update.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "base/log.h"
#include "base/strings.h"
#include "storage/store.h"
#include "storage/store_format.h"
#include "tests/fault_injection.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using testing::ScratchDir;
using testing::write_all;

// A whole file (testing::read_all goes byte by byte: too slow here in Debug builds).
std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  std::vector<uint8_t> bytes(static_cast<size_t>(std::max<std::streamoff>(in.tellg(), 0)));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return bytes;
}

// ---- what a store holds -----------------------------------------------------------------------

struct DenseData {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

struct LayerData {
  std::string name;
  json info;
  StoreTableSpec table;
  std::vector<uint8_t> records;  // count * stride
  std::vector<DenseData> dense;

  uint8_t* record(int64_t id) { return records.data() + static_cast<size_t>(id) * table.stride; }
  DenseData& tensor(const std::string& n) {
    for (DenseData& d : dense) {
      if (d.name == n) return d;
    }
    ADD_FAILURE() << "no tensor " << n;
    return dense.front();
  }
};

// One generation's full contents, as the test expects them.
struct StoreContent {
  uint64_t generation = 1;
  json provenance;
  std::vector<LayerData> layers;

  LayerData& layer(const std::string& n) {
    for (LayerData& l : layers) {
      if (l.name == n) return l;
    }
    ADD_FAILURE() << "no layer " << n;
    return layers.front();
  }
};

std::vector<float> random_floats(size_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

std::vector<uint8_t> random_stride(const StoreTableSpec& t, std::mt19937_64& rng) {
  std::vector<uint8_t> s(t.stride, 0);  // stride padding stays zero
  for (uint64_t b = 0; b < t.record_bytes; ++b) s[b] = static_cast<uint8_t>(rng());
  return s;
}

LayerData make_layer(std::string name, uint64_t count, uint64_t record_bytes, uint64_t stride,
                     std::vector<std::pair<std::string, std::vector<int64_t>>> dense,
                     std::mt19937_64& rng) {
  LayerData l;
  l.name = std::move(name);
  l.info = {{"dim", 64}, {"note", "opaque to storage"}};
  l.table = {"int8", count, record_bytes, stride};
  for (uint64_t i = 0; i < count; ++i) {
    const std::vector<uint8_t> s = random_stride(l.table, rng);
    l.records.insert(l.records.end(), s.begin(), s.end());
  }
  for (auto& [dense_name, shape] : dense) {
    size_t numel = 1;
    for (int64_t d : shape) numel *= static_cast<size_t>(d);
    l.dense.push_back({dense_name, shape, random_floats(numel, rng)});
  }
  return l;
}

// Two layers, counts and strides not powers of two; a scalar and an empty tensor among the
// dense ones.
StoreContent sample_store() {
  std::mt19937_64 rng(7);
  StoreContent s;
  s.provenance = {{"source", "model.safetensors"},
                  {"layout", "trove"},
                  {"note", "gen 1"},
                  {"history", std::string(300, 'h')}};
  s.layers.push_back(
      make_layer("L19", 37, 2304, 2304, {{"query.weight", {24, 10}}, {"keys", {1, 2, 7, 4}}}, rng));
  s.layers.push_back(make_layer("L21", 300, 170, 192,
                                {{"norm.weight", {13}}, {"scale", {}}, {"empty", {0, 3}}}, rng));
  return s;
}

Status write_store(const std::string& path, const StoreContent& s) {
  TROVE_ASSIGN_OR_RETURN(StoreWriter w, StoreWriter::create(path, s.provenance));
  for (const LayerData& l : s.layers) {
    TROVE_RETURN_IF_ERROR(w.begin_layer(l.name, l.info, l.table));
    TROVE_RETURN_IF_ERROR(w.append_records(l.records));
    for (const DenseData& d : l.dense)
      TROVE_RETURN_IF_ERROR(w.add_dense(d.name, d.shape, d.values));
    TROVE_RETURN_IF_ERROR(w.end_layer());
  }
  return w.finish();
}

// Checks that the store at `path` holds exactly `want`, passes verify() and has no journal.
void expect_store(const std::string& path, const StoreContent& want) {
  SCOPED_TRACE("expecting generation " + std::to_string(want.generation));
  Result<StoreReader> r = StoreReader::open(path);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->generation(), want.generation);
  EXPECT_EQ(r->provenance(), want.provenance);
  ASSERT_EQ(r->layers().size(), want.layers.size());
  for (const LayerData& l : want.layers) {
    const StoreLayerInfo* info = r->find_layer(l.name);
    ASSERT_NE(info, nullptr) << l.name;
    EXPECT_EQ(info->info, l.info) << l.name;
    std::vector<int64_t> ids(l.table.count);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i);
    std::vector<uint8_t> got(l.records.size());
    ASSERT_TRUE(r->read_records(*info, ids, got).ok()) << l.name;
    EXPECT_TRUE(got == l.records) << "records of " << l.name;
    for (const DenseData& d : l.dense) {
      Result<std::vector<float>> v = r->read_dense(*info, d.name);
      ASSERT_TRUE(v.ok()) << v.status().to_string();
      EXPECT_TRUE(*v == d.values) << l.name << " " << d.name;
    }
  }
  Result<std::vector<StoreFault>> faults = r->verify();
  ASSERT_TRUE(faults.ok());
  for (const StoreFault& f : *faults) ADD_FAILURE() << f.message();
  EXPECT_FALSE(std::filesystem::exists(store_journal_path(path)));
}

// ---- the updates the tests make ---------------------------------------------------------------

// Changes to apply to a store: replaced records (neighbours and not, first and last ids, given
// out of order), dense tensors, a layer's info and the provenance (`provenance_note` and
// `keep_history` make the manifest grow or shrink).
struct Change {
  std::string provenance_note = "gen 2";
  uint64_t seed = 99;
  bool keep_history = true;
};

// The records every Change replaces: first and last ids, neighbours (5, 6, 7 and 1, 2, 3) and
// loners, out of order.
const std::vector<std::pair<std::string, std::vector<int64_t>>> kPuts = {
    {"L19", {36, 0, 6, 5, 7}}, {"L21", {299, 1, 2, 150, 100, 3}}};

// Stages `change` on `u` and applies it to `content` (the expected next generation).
Status stage(StoreUpdate& u, StoreContent& content, const Change& change) {
  std::mt19937_64 rng(change.seed);
  for (const auto& [name, ids] : kPuts) {
    LayerData& l = content.layer(name);
    std::vector<uint8_t> strides;
    for (int64_t id : ids) {
      const std::vector<uint8_t> s = random_stride(l.table, rng);
      std::memcpy(l.record(id), s.data(), s.size());
      strides.insert(strides.end(), s.begin(), s.end());
    }
    TROVE_RETURN_IF_ERROR(u.put_records(name, ids, strides));
  }
  for (const auto& [name, tensor] :
       std::vector<std::pair<std::string, std::string>>{{"L19", "keys"}, {"L21", "scale"}}) {
    DenseData& d = content.layer(name).tensor(tensor);
    d.values = random_floats(d.values.size(), rng);
    TROVE_RETURN_IF_ERROR(u.put_dense(name, tensor, d.values));
  }
  LayerData& l21 = content.layer("L21");
  l21.info["quant_error"] = {{"rmse", 0.0859}, {"step", change.seed}};
  TROVE_RETURN_IF_ERROR(u.set_layer_info("L21", l21.info));
  content.provenance["note"] = change.provenance_note;
  if (!change.keep_history) content.provenance.erase("history");
  TROVE_RETURN_IF_ERROR(u.set_provenance(content.provenance));
  content.generation += 1;
  return {};
}

class StoreUpdateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Crashed updates and recoveries log every journal they remove or replay.
    set_log_level(LogLevel::kError);
    path_ = dir_.file("model.trove");
    ASSERT_TRUE(write_store(path_, old_).ok());
    pristine_ = read_all(path_);
  }
  void TearDown() override { set_log_level(LogLevel::kInfo); }

  // Stages `change` and commits; returns the new content.
  StoreContent commit(const StoreContent& from, const Change& change) {
    StoreContent next = from;
    Result<StoreUpdate> u = StoreUpdate::begin(path_);
    EXPECT_TRUE(u.ok()) << u.status().to_string();
    if (!u.ok()) return next;
    EXPECT_TRUE(stage(*u, next, change).ok());
    Result<uint64_t> g = u->commit();
    EXPECT_TRUE(g.ok()) << g.status().to_string();
    if (g.ok()) {
      EXPECT_EQ(*g, next.generation);
    }
    return next;
  }

  // Runs `change` on a fresh copy of generation 1 with `ops` (which may crash it).
  void run_update(const std::shared_ptr<CrashingStoreUpdateOps>& ops, const Change& change,
                  StoreContent* next) {
    StoreUpdateOptions options;
    options.ops = ops;
    options.journal_buffer_bytes = 4096;  // more calls to crash at
    Result<StoreUpdate> u = StoreUpdate::begin(path_, options);
    if (!u.ok()) return;
    ASSERT_TRUE(stage(*u, *next, change).ok());
    (void)u->commit();
  }

  // Leaves a committed but unapplied journal beside generation 1 (the update "crashes" right
  // after its commit point); returns the content it commits.
  StoreContent committed_journal(const Change& change = {}) {
    uint64_t commit_point = 0;
    {
      auto ops = std::make_shared<CrashingStoreUpdateOps>();
      StoreContent next = old_;
      run_update(ops, change, &next);
      commit_point = commit_point_of(*ops);
      write_all(path_, pristine_);
    }
    auto ops = std::make_shared<CrashingStoreUpdateOps>();
    ops->crash_at(commit_point + 1);
    StoreContent next = old_;
    run_update(ops, change, &next);
    EXPECT_TRUE(ops->crashed());
    EXPECT_TRUE(read_all(path_) == pristine_) << "the store was written before the crash";
    return next;
  }

  // The call that makes the journal durable under its name: the first folder sync.
  static uint64_t commit_point_of(const CrashingStoreUpdateOps& ops) {
    const std::vector<std::string>& t = ops.trace();
    for (size_t i = 0; i < t.size(); ++i) {
      if (t[i].rfind("sync_dir ", 0) == 0) return i + 1;
    }
    ADD_FAILURE() << "no folder sync";
    return 0;
  }

  ScratchDir dir_;
  std::string path_;
  StoreContent old_ = sample_store();
  std::vector<uint8_t> pristine_;
};

// ---- round trips ------------------------------------------------------------------------------

TEST_F(StoreUpdateTest, CommitIsANewGenerationReadBackWhole) {
  StoreContent g2 = commit(old_, {});
  expect_store(path_, g2);
  StoreContent g3 = commit(g2, {"gen 3", 5});
  expect_store(path_, g3);
  EXPECT_EQ(g3.generation, 3u);
}

TEST_F(StoreUpdateTest, OnlyWhatChangedIsWritten) {
  // Kept open across the commit, so not pinned (a pin would make the commit refuse).
  StoreOpenOptions unpinned;
  unpinned.pin_generation = false;
  Result<StoreReader> before = StoreReader::open(path_, unpinned);
  ASSERT_TRUE(before.ok());
  // Every byte the update may change: the changed strides, their checksum entries, the changed
  // dense tensors, the manifest and trailer (from the manifest on), and the header.
  const StoreHeader h = decode_store_header(pristine_);
  std::vector<std::pair<uint64_t, uint64_t>> may_change = {
      {0, sizeof(StoreHeader)}, {h.manifest_offset, UINT64_MAX - h.manifest_offset}};
  for (const auto& [name, ids] : kPuts) {
    const StoreLayerInfo* l = before->find_layer(name);
    size_t li = static_cast<size_t>(l - before->layers().data());
    const uint64_t sums = before->manifest()["layers"][li]["table"]["checksums"]["offset"];
    for (int64_t id : ids) {
      may_change.push_back(
          {l->table.offset + static_cast<uint64_t>(id) * l->table.stride, l->table.stride});
      may_change.push_back({sums + static_cast<uint64_t>(id) * 8, 8});
    }
  }
  may_change.push_back({before->find_layer("L19")->find_dense("keys")->offset, 4 * 1 * 2 * 7 * 4});
  may_change.push_back({before->find_layer("L21")->find_dense("scale")->offset, 4});

  Result<StoreUpdate> u = StoreUpdate::begin(path_);
  ASSERT_TRUE(u.ok());
  StoreContent next = old_;
  ASSERT_TRUE(stage(*u, next, {}).ok());
  ASSERT_TRUE(u->commit().ok());
  const std::vector<uint8_t> after = read_all(path_);
  for (uint64_t i = 0; i < std::min(after.size(), pristine_.size()); ++i) {
    if (after[i] == pristine_[i]) continue;
    const bool allowed = std::any_of(may_change.begin(), may_change.end(), [&](const auto& r) {
      return i >= r.first && i - r.first < r.second;
    });
    ASSERT_TRUE(allowed) << "byte " << i << " changed outside every changed region";
  }
  // Neighbouring ids share writes: strides {0} {5-7} {36} {1-3} {100} {150} {299}, checksum
  // entries the same runs, 2 dense tensors, manifest + trailer, header.
  const StoreUpdateStats& s = u->stats();
  EXPECT_EQ(s.records, 11u);
  EXPECT_EQ(s.dense_tensors, 2u);
  EXPECT_EQ(s.writes, 7u + 7u + 2u + 1u + 1u);
  const uint64_t manifest_bytes = decode_store_header(after).manifest_bytes;
  EXPECT_EQ(s.applied_bytes, (5u * 2304 + 6u * 192) + 11u * 8 + (56u * 4 + 4) +
                                 (manifest_bytes + kStoreTrailerBytes) + sizeof(StoreHeader));
  EXPECT_EQ(s.journal_bytes, sizeof(StoreJournalHeader) + s.writes * sizeof(StoreJournalWrite) +
                                 s.applied_bytes + sizeof(StoreJournalCommit));
  EXPECT_EQ(s.file_size_before, pristine_.size());
  EXPECT_EQ(s.file_size_after, after.size());
}

TEST_F(StoreUpdateTest, ALaterPutReplacesAnEarlierOneForTheSameId) {
  Result<StoreUpdate> u = StoreUpdate::begin(path_);
  ASSERT_TRUE(u.ok());
  LayerData& l = old_.layer("L21");
  std::vector<uint8_t> first(l.table.stride, 0x11);
  std::vector<uint8_t> second(l.table.stride, 0x22);
  const int64_t ids[] = {42};
  ASSERT_TRUE(u->put_records("L21", ids, first).ok());
  ASSERT_TRUE(u->put_records("L21", ids, second).ok());
  ASSERT_TRUE(u->commit().ok());
  StoreContent want = old_;
  std::memcpy(want.layer("L21").record(42), second.data(), second.size());
  want.generation = 2;
  expect_store(path_, want);
}

TEST_F(StoreUpdateTest, ManifestGrowsAndShrinksAcrossGenerations) {
  struct Step {
    Change change;
    int64_t min_growth;  // bytes; negative: shrinkage
  };
  const Step steps[] = {{{std::string(5000, 'p'), 1, true}, 4900},
                        {{"", 2, true}, -4900},
                        {{"", 3, false}, -290},
                        {{std::string(70000, 'q'), 4, false}, 69000}};
  StoreContent g = old_;
  int64_t size = static_cast<int64_t>(pristine_.size());
  for (const Step& step : steps) {
    g = commit(g, step.change);
    expect_store(path_, g);
    const int64_t now = static_cast<int64_t>(read_all(path_).size());
    if (step.min_growth > 0) {
      EXPECT_GE(now - size, step.min_growth);
    } else {
      EXPECT_LE(now - size, step.min_growth);
    }
    size = now;
  }
  EXPECT_EQ(g.generation, 5u);
}

// FORMAT.md lets a writer put regions in any order. Here the manifest sits before the checksum
// arrays: generation 2's manifest goes after the last region and the old one's bytes become
// zero padding (verify() checks they are).
TEST_F(StoreUpdateTest, StoreWithItsManifestBeforeOtherRegionsIsUpdatedToo) {
  const StoreHeader h = decode_store_header(pristine_);
  json m =
      json::parse(pristine_.begin() + static_cast<ptrdiff_t>(h.manifest_offset),
                  pristine_.begin() + static_cast<ptrdiff_t>(h.manifest_offset + h.manifest_bytes));
  json& layers = m["layers"];
  uint64_t first_array = UINT64_MAX;
  for (const json& l : layers) {
    first_array = std::min(first_array, l["table"]["checksums"]["offset"].get<uint64_t>());
  }
  // Checksum arrays after the manifest (with room for the digits their offsets gain).
  const uint64_t manifest_offset = first_array;
  uint64_t next = (manifest_offset + h.manifest_bytes + 64 + 4095) / 4096 * 4096;
  std::vector<std::pair<uint64_t, uint64_t>> moves;  // (old offset, new offset) per array
  for (json& l : layers) {
    json& sums = l["table"]["checksums"];
    moves.push_back({sums["offset"].get<uint64_t>(), next});
    sums["offset"] = next;
    next = (next + sums["bytes"].get<uint64_t>() + 4095) / 4096 * 4096;
  }
  const std::string text = store_manifest_text(m);
  ASSERT_LE(manifest_offset + text.size(), moves.front().second);
  uint64_t end = 0;
  for (size_t i = 0; i < moves.size(); ++i) {
    end = moves[i].second + layers[i]["table"]["checksums"]["bytes"].get<uint64_t>();
  }
  std::vector<uint8_t> file(end + kStoreTrailerBytes, 0);
  std::copy(pristine_.begin(), pristine_.begin() + static_cast<ptrdiff_t>(manifest_offset),
            file.begin());
  std::memcpy(file.data() + manifest_offset, text.data(), text.size());
  for (size_t i = 0; i < moves.size(); ++i) {
    const uint64_t bytes = layers[i]["table"]["checksums"]["bytes"].get<uint64_t>();
    std::memcpy(file.data() + moves[i].second, pristine_.data() + moves[i].first, bytes);
  }
  const StoreHeader header = make_store_header(
      file.size(), manifest_offset, text.size(),
      store_checksum({reinterpret_cast<const uint8_t*>(text.data()), text.size()}), 1);
  encode_store_header(header,
                      std::span<uint8_t, kStoreHeaderBytes>(file.data(), kStoreHeaderBytes));
  encode_store_trailer(make_store_trailer(header), std::span<uint8_t, kStoreTrailerBytes>(
                                                       file.data() + end, kStoreTrailerBytes));
  write_all(path_, file);
  expect_store(path_, old_);  // a valid store as made

  const StoreContent g2 = commit(old_, {});
  expect_store(path_, g2);
  EXPECT_GE(decode_store_header(read_all(path_)).manifest_offset, end);
}

TEST_F(StoreUpdateTest, UnpinnedReaderOpenedBeforeACommitFailsChecksumsNotReadsWrongBytes) {
  // Only a writer's own readers open unpinned; what they read of a changed record still never
  // arrives wrong.
  StoreOpenOptions unpinned;
  unpinned.pin_generation = false;
  Result<StoreReader> stale = StoreReader::open(path_, unpinned);
  ASSERT_TRUE(stale.ok());
  commit(old_, {});
  const StoreLayerInfo* l = stale->find_layer("L19");
  std::vector<uint8_t> out(l->table.stride);
  const int64_t changed[] = {36};
  const Status s = stale->read_records(*l, changed, out);
  EXPECT_TRUE(s.is_corruption()) << s.to_string();
  const int64_t unchanged[] = {20};
  EXPECT_TRUE(stale->read_records(*l, unchanged, out).ok());
}

// ---- bad input --------------------------------------------------------------------------------

TEST_F(StoreUpdateTest, BadInputIsNamedAndChangesNothing) {
  Result<StoreUpdate> u = StoreUpdate::begin(path_);
  ASSERT_TRUE(u.ok());
  const std::vector<uint8_t> one(192, 7);
  const std::vector<uint8_t> two(2 * 192, 7);
  auto ids = [](std::initializer_list<int64_t> l) { return std::vector<int64_t>(l); };
  struct Case {
    Status status;
    const char* message;
  };
  const std::vector<float> keys_short(55);
  const Case cases[] = {
      {u->put_records("L20", ids({1}), one),
       "put_records: no layer named 'L20' (the store has "
       "'L19', 'L21')"},
      {u->put_records("L21", ids({-1}), one),
       "layer 'L21': expert -1 is out of range (the "
       "table has 300 experts)"},
      {u->put_records("L21", ids({300}), one), "layer 'L21': expert 300 is out of range"},
      {u->put_records("L21", ids({1, 2}), one),
       "layer 'L21': 192 bytes given for 2 records of 192 bytes (384 needed: whole strides)"},
      {u->put_records("L21", ids({1}), std::vector<uint8_t>(170)),
       "170 bytes given for 1 records of 192 bytes"},
      {u->put_records("L21", ids({3, 3}), two),
       "layer 'L21': expert 3 appears more than once in one call"},
      {u->put_dense("L19", "key", keys_short), "layer 'L19' has no dense tensor named 'key'"},
      {u->put_dense("L19", "keys", keys_short),
       "layer 'L19' tensor 'keys' has 56 elements (shape [1, 2, 7, 4]); 55 given"},
      {u->put_dense("L22", "keys", keys_short), "no layer named 'L22'"},
      {u->set_layer_info("L9", json::object()), "set_layer_info: no layer named 'L9'"},
  };
  for (const Case& c : cases) {
    EXPECT_FALSE(c.status.ok()) << c.message;
    EXPECT_THAT(c.status.message(), HasSubstr(path_)) << c.message;
    EXPECT_THAT(c.status.message(), HasSubstr(c.message));
  }
  json deep = 1;
  for (int i = 0; i < 70; ++i) deep = json::array({deep});
  const Status too_deep = u->set_provenance(deep);
  EXPECT_THAT(too_deep.message(), HasSubstr("provenance nests too deeply"));
  EXPECT_TRUE(read_all(path_) == pristine_);

  // None of that was staged, and the update goes on: commit writes only what was valid.
  ASSERT_TRUE(u->put_records("L21", ids({4}), one).ok());
  ASSERT_TRUE(u->commit().ok());
  StoreContent want = old_;
  std::memcpy(want.layer("L21").record(4), one.data(), one.size());
  want.generation = 2;
  expect_store(path_, want);
}

TEST_F(StoreUpdateTest, AnUpdateDestroyedWithoutCommitLeavesTheStoreAsItWas) {
  {
    Result<StoreUpdate> u = StoreUpdate::begin(path_);
    ASSERT_TRUE(u.ok());
    StoreContent next = old_;
    ASSERT_TRUE(stage(*u, next, {}).ok());
  }
  EXPECT_TRUE(read_all(path_) == pristine_);
  expect_store(path_, old_);
}

TEST_F(StoreUpdateTest, OneUpdateAtATimeAndNoneAfterCommit) {
  Result<StoreUpdate> u = StoreUpdate::begin(path_);
  ASSERT_TRUE(u.ok());
  Result<StoreUpdate> second = StoreUpdate::begin(path_);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), Status::Code::kAborted);
  EXPECT_THAT(second.status().message(), HasSubstr("busy: another writer of this store"));
  ASSERT_TRUE(u->commit().ok());
  EXPECT_THAT(u->commit().status().message(), HasSubstr("the update has ended"));
  EXPECT_THAT(u->set_provenance(json::object()).message(), HasSubstr("the update has ended"));
  EXPECT_TRUE(StoreUpdate::begin(path_).ok());  // the lock went with the commit
  EXPECT_TRUE(StoreUpdate::begin(dir_.file("missing.trove")).status().is_not_found());
}

// ---- the journal ------------------------------------------------------------------------------

TEST_F(StoreUpdateTest, JournalBytesMatchFormatMd) {
  const StoreContent next = committed_journal();
  const std::string jpath = store_journal_path(path_);
  EXPECT_EQ(jpath, std::filesystem::canonical(path_).string() + ".journal");
  const std::vector<uint8_t> j = read_all(jpath);
  ASSERT_GE(j.size(), 72u + 32u);
  StoreJournalHeader h;
  std::memcpy(&h, j.data(), sizeof(h));
  EXPECT_EQ(std::memcmp(j.data(), "TROVEJNL", 8), 0);
  EXPECT_EQ(h.version_major, 1);
  EXPECT_EQ(h.version_minor, 0);
  EXPECT_EQ(std::memcmp(j.data() + 12, "\x04\x03\x02\x01", 4), 0);
  const StoreHeader old = decode_store_header(pristine_);
  EXPECT_EQ(h.target_file_size, old.file_size);
  EXPECT_EQ(h.target_generation, 1u);
  EXPECT_EQ(h.target_manifest_xxh3, old.manifest_xxh3);
  EXPECT_EQ(h.new_generation, 2u);
  // The writes, end to end, then the commit record.
  uint64_t pos = sizeof(h);
  uint64_t last_offset = UINT64_MAX;
  for (uint64_t i = 0; i < h.write_count; ++i) {
    StoreJournalWrite w;
    ASSERT_LE(pos + sizeof(w), j.size());
    std::memcpy(&w, j.data() + pos, sizeof(w));
    pos += sizeof(w) + w.bytes;
    ASSERT_LE(w.offset + w.bytes, h.new_file_size);
    last_offset = w.offset;
  }
  EXPECT_EQ(last_offset, 0u) << "the header is the last write";
  ASSERT_EQ(pos + sizeof(StoreJournalCommit), j.size());
  StoreJournalCommit c;
  std::memcpy(&c, j.data() + pos, sizeof(c));
  EXPECT_EQ(std::memcmp(c.magic, "TROVEJND", 8), 0);
  EXPECT_EQ(c.journal_bytes, j.size());
  EXPECT_EQ(c.write_count, h.write_count);
  EXPECT_EQ(c.journal_xxh3, store_checksum({j.data(), j.size() - 8}));

  // Replayed, it makes generation 2, whose header the journal named.
  expect_store(path_, next);
  const StoreHeader now = decode_store_header(read_all(path_));
  EXPECT_EQ(h.new_file_size, now.file_size);
  EXPECT_EQ(h.new_manifest_xxh3, now.manifest_xxh3);
}

// For every call k of one update (open, each journal write, its fsync, the folder fsync, each
// write into the store, the truncate, the store's fsync, the unlink, the last folder fsync),
// the process dies before call k; then nothing, everything or a random half of what was not
// synced is lost. The next open finds exactly generation 1 or exactly generation 2: generation
// 2 whenever the journal's folder fsync (the commit point) had returned, generation 1 whenever
// it had not and every unsynced change was lost.
TEST_F(StoreUpdateTest, CrashAtEveryCallLeavesTheOldOrTheNewGeneration) {
  for (const Change& change :
       {Change{"a note that makes the manifest grow", 3, true}, Change{"", 3, false}}) {
    SCOPED_TRACE(change.keep_history ? "the manifest grows" : "the manifest shrinks");
    auto clean = std::make_shared<CrashingStoreUpdateOps>();
    StoreContent next = old_;
    run_update(clean, change, &next);
    const uint64_t calls = clean->calls();
    const uint64_t commit_point = commit_point_of(*clean);
    ASSERT_GT(calls, commit_point + 5);
    if (change.keep_history) {
      ASSERT_GT(read_all(path_).size(), pristine_.size());
    } else {
      ASSERT_LT(read_all(path_).size(), pristine_.size());
    }

    using Loss = CrashingStoreUpdateOps::Loss;
    int saw_old = 0, saw_new = 0;
    // k = calls + 1: commit() returned, then the power went.
    for (uint64_t k = 1; k <= calls + 1; ++k) {
      for (auto [loss, seed] :
           {std::pair{Loss::kNone, 0}, {Loss::kAll, 0}, {Loss::kRandom, 1}, {Loss::kRandom, 2}}) {
        SCOPED_TRACE(str_printf("crash at call %llu of %llu (%s), loss %d seed %d", ull(k),
                                ull(calls), k <= calls ? clean->trace()[k - 1].c_str() : "none",
                                static_cast<int>(loss), seed));
        write_all(path_, pristine_);
        auto ops = std::make_shared<CrashingStoreUpdateOps>();
        ops->crash_at(k);
        StoreContent expected_new = old_;
        run_update(ops, change, &expected_new);
        ASSERT_EQ(ops->crashed(), k <= calls);
        ops->lose_unsynced(loss, k * 4 + seed);

        Result<StoreReader> r = StoreReader::open(path_);
        ASSERT_TRUE(r.ok()) << r.status().to_string();
        const uint64_t g = r->generation();
        if (k > commit_point) {
          ASSERT_EQ(g, 2u);
        }
        if (k <= commit_point && loss == Loss::kAll) {
          ASSERT_EQ(g, 1u);
        }
        ASSERT_TRUE(g == 1 || g == 2) << g;
        expect_store(path_, g == 1 ? old_ : expected_new);
        (g == 1 ? saw_old : saw_new)++;
      }
    }
    EXPECT_GT(saw_old, 0);
    EXPECT_GT(saw_new, 0);
  }
}

// A crash while replaying a committed journal (in recover_store, at every call, with every
// loss) leaves the journal to replay again: the next open still ends in generation 2.
TEST_F(StoreUpdateTest, CrashDuringRecoveryIsRecoveredByTheNextOpen) {
  const StoreContent next = committed_journal();
  const std::string jpath = store_journal_path(path_);
  const std::vector<uint8_t> journal = read_all(jpath);
  auto clean = std::make_shared<CrashingStoreUpdateOps>();
  ASSERT_TRUE(recover_store(path_, {clean}).ok());
  const uint64_t calls = clean->calls();
  ASSERT_GT(calls, 5u);
  using Loss = CrashingStoreUpdateOps::Loss;
  for (uint64_t k = 1; k <= calls + 1; ++k) {
    for (auto [loss, seed] :
         {std::pair{Loss::kNone, 0}, {Loss::kAll, 0}, {Loss::kRandom, 1}, {Loss::kRandom, 2}}) {
      SCOPED_TRACE(str_printf("recovery crashes at call %llu (%s), loss %d seed %d", ull(k),
                              k <= calls ? clean->trace()[k - 1].c_str() : "none",
                              static_cast<int>(loss), seed));
      write_all(path_, pristine_);
      write_all(jpath, journal);
      auto ops = std::make_shared<CrashingStoreUpdateOps>();
      ops->crash_at(k);
      const Status s = recover_store(path_, {ops});
      // Only the journal's removal comes after the store's fsync; its failure is logged.
      if (k < calls - 1) {
        EXPECT_FALSE(s.ok());
      }
      ops->lose_unsynced(loss, k * 4 + seed);
      expect_store(path_, next);
    }
  }
}

// A committed journal, damaged before its replay, fails its checksum: it is removed unreplayed
// and the untouched generation 1 stands, whichever byte was hit or wherever it was cut.
TEST_F(StoreUpdateTest, DamagedJournalIsNeverReplayed) {
  committed_journal();
  const std::string jpath = store_journal_path(path_);
  const std::vector<uint8_t> journal = read_all(jpath);
  std::vector<uint64_t> hits = {0, 8, 16, 24, 40, 64, 71};  // header fields
  StoreJournalWrite first;
  std::memcpy(&first, journal.data() + sizeof(StoreJournalHeader), sizeof(first));
  hits.push_back(72);                // first write's offset
  hits.push_back(80);                // its length
  hits.push_back(88);                // its data
  hits.push_back(88 + first.bytes);  // the second write's header
  for (uint64_t i = journal.size() - 32; i < journal.size(); i += 4) hits.push_back(i);  // commit
  for (uint64_t i = 1; i < journal.size(); i += journal.size() / 40) hits.push_back(i);
  for (uint64_t at : hits) {
    SCOPED_TRACE("flipped journal byte " + std::to_string(at));
    std::vector<uint8_t> damaged = journal;
    damaged[at] ^= 0x20;
    write_all(jpath, damaged);
    expect_store(path_, old_);
    EXPECT_TRUE(read_all(path_) == pristine_);
  }
  for (uint64_t len : {uint64_t{0}, uint64_t{1}, uint64_t{71}, uint64_t{72}, uint64_t{103},
                       journal.size() / 2, journal.size() - 32, journal.size() - 1}) {
    SCOPED_TRACE("journal cut to " + std::to_string(len) + " bytes");
    write_all(jpath, std::vector<uint8_t>(journal.begin(), journal.begin() + len));
    expect_store(path_, old_);
  }
}

TEST_F(StoreUpdateTest, JournalOfAnotherGenerationOrStoreIsRefused) {
  const StoreContent g2 = committed_journal();
  const std::string jpath = store_journal_path(path_);
  const std::vector<uint8_t> journal = read_all(jpath);  // generation 1 -> 2
  expect_store(path_, g2);
  const StoreContent g3 = commit(g2, {"gen 3", 4});
  const std::vector<uint8_t> at_g3 = read_all(path_);

  write_all(jpath, journal);
  Result<StoreReader> r = StoreReader::open(path_);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().is_corruption());
  EXPECT_THAT(r.status().message(), HasSubstr("the committed update journal " + jpath +
                                              " was written for another store or generation"));
  EXPECT_THAT(r.status().message(), HasSubstr("turns generation 1,"));
  EXPECT_THAT(r.status().message(), HasSubstr("into generation 2,"));
  EXPECT_THAT(r.status().message(), HasSubstr("the store has generation 3,"));
  EXPECT_THAT(r.status().message(), HasSubstr("Remove " + jpath));
  EXPECT_FALSE(recover_store(path_).ok());
  EXPECT_FALSE(StoreUpdate::begin(path_).ok());
  EXPECT_TRUE(read_all(path_) == at_g3);
  EXPECT_TRUE(read_all(jpath) == journal);

  // Beside another store (same layout, other bytes) it is refused the same way.
  const std::string other = dir_.file("other.trove");
  StoreContent different = old_;
  different.provenance["note"] = "another store";
  ASSERT_TRUE(write_store(other, different).ok());
  write_all(store_journal_path(other), journal);
  EXPECT_THAT(StoreReader::open(other).status().message(),
              HasSubstr("was written for another store or generation"));

  // Removed as the message says, the store opens as it was.
  std::filesystem::remove(jpath);
  expect_store(path_, g3);
}

TEST_F(StoreUpdateTest, StaleUncommittedJournalNeverBlocksReaders) {
  const std::string jpath = store_journal_path(path_);
  // While an update holds the lock, its unfinished journal is its own: left alone.
  {
    Result<StoreUpdate> u = StoreUpdate::begin(path_);
    ASSERT_TRUE(u.ok());
    write_all(jpath, std::vector<uint8_t>(100, 0xab));
    Result<StoreReader> r = StoreReader::open(path_);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_TRUE(std::filesystem::exists(jpath));
  }
  // With no update running it is a leftover of a crash before the commit point: removed.
  expect_store(path_, old_);
  // A begin() removes one too.
  write_all(jpath, std::vector<uint8_t>(10, 1));
  ASSERT_TRUE(StoreUpdate::begin(path_).ok());
  EXPECT_FALSE(std::filesystem::exists(jpath));
}

TEST_F(StoreUpdateTest, CommittedJournalOfAReadOnlyStoreFailsOpenSayingWhatToRun) {
  if (::geteuid() == 0) GTEST_SKIP() << "root writes read-only files";
  const std::string jpath = store_journal_path(path_);
  committed_journal();
  const std::vector<uint8_t> journal = read_all(jpath);
  ASSERT_EQ(::chmod(path_.c_str(), 0444), 0);
  Result<StoreReader> r = StoreReader::open(path_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(),
              HasSubstr("generation 2 is committed in the update journal " + jpath));
  EXPECT_THAT(r.status().message(), HasSubstr("run `trove verify " + path_ + "`"));
  // An uncommitted one does not stop a reader that cannot write.
  write_all(jpath, std::vector<uint8_t>(journal.begin(), journal.end() - 1));
  expect_store(path_, old_);
  ASSERT_EQ(::chmod(path_.c_str(), 0644), 0);
}

// ---- readers and writers ---------------------------------------------------------------------

// A StoreReader in a child process (a pin of this process would make the commit refuse to wait
// for itself): it opens the store, says so, waits for go(), then reads every record of L19 and
// reports whether they were exactly `want`, read without error.
class ReaderProcess {
 public:
  ReaderProcess(const std::string& path, const std::vector<uint8_t>& want) {
    if (::pipe(ready_) != 0 || ::pipe(go_) != 0) std::abort();
    pid_ = ::fork();
    if (pid_ == 0) {
      uint8_t result = 0;
      {
        Result<StoreReader> r = StoreReader::open(path);
        uint8_t opened = r.ok() ? 1 : 0;
        if (::write(ready_[1], &opened, 1) != 1) ::_exit(2);
        uint8_t go = 0;
        if (::read(go_[0], &go, 1) != 1) ::_exit(2);
        if (r.ok()) {
          const StoreLayerInfo* l = r->find_layer("L19");
          std::vector<int64_t> ids(l->table.count);
          for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i);
          std::vector<uint8_t> got(want.size());
          result = r->read_records(*l, ids, got).ok() && got == want ? 1 : 0;
        }
      }
      ::_exit(result == 1 ? 0 : 1);
    }
    uint8_t opened = 0;
    EXPECT_EQ(::read(ready_[0], &opened, 1), 1);
    EXPECT_EQ(opened, 1) << "the reader process could not open the store";
  }
  // Lets the reader read; true when it read exactly `want`.
  bool go_and_wait() {
    uint8_t go = 1;
    EXPECT_EQ(::write(go_[1], &go, 1), 1);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    for (int fd : {ready_[0], ready_[1], go_[0], go_[1]}) ::close(fd);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }

 private:
  pid_t pid_ = -1;
  int ready_[2] = {-1, -1};
  int go_[2] = {-1, -1};
};

TEST_F(StoreUpdateTest, CommitWaitsForPinnedReadersAndNewReadersQueueBehindIt) {
  ReaderProcess old_reader(path_, old_.layer("L19").records);
  std::atomic<bool> committed{false};
  StoreContent g2;
  std::thread writer([&] {
    g2 = commit(old_, {});
    committed = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_FALSE(committed) << "the commit wrote the store under a reader of generation 1";
  // A reader arriving now waits at the turnstile for the commit, then reads generation 2.
  std::atomic<uint64_t> new_generation{0};
  std::thread new_reader([&] {
    Result<StoreReader> r = StoreReader::open(path_);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    if (r.ok()) new_generation = r->generation();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(new_generation, 0u) << "a new reader overtook the waiting commit";
  EXPECT_FALSE(committed);
  // The old reader reads generation 1 whole, though the commit is past its commit point.
  EXPECT_TRUE(old_reader.go_and_wait());
  writer.join();
  new_reader.join();
  EXPECT_TRUE(committed);
  EXPECT_EQ(new_generation, 2u);
  expect_store(path_, g2);
}

TEST_F(StoreUpdateTest, SecondWriterIsBusyAtOnceWhileARunHoldsTheLock) {
  Result<StoreLock> run = StoreLock::acquire(path_);
  ASSERT_TRUE(run.ok()) << run.status().to_string();
  const Result<StoreLock> second = StoreLock::acquire(path_);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), Status::Code::kAborted);
  EXPECT_THAT(second.status().message(), HasSubstr(path_ + ": busy"));
  const Result<StoreUpdate> update = StoreUpdate::begin(path_);
  EXPECT_THAT(update.status().message(), HasSubstr("busy"));
  // The run commits generation after generation under its one lock.
  StoreContent content = old_;
  for (uint64_t seed : {3, 4}) {
    StoreUpdateOptions options;
    options.lock = &*run;
    Result<StoreUpdate> u = StoreUpdate::begin(path_, options);
    ASSERT_TRUE(u.ok()) << u.status().to_string();
    ASSERT_TRUE(stage(*u, content, {"run", seed}).ok());
    ASSERT_TRUE(u->commit().ok());
    EXPECT_THAT(StoreUpdate::begin(path_).status().message(), HasSubstr("busy"));
  }
  // Readers read on while the run holds the lock.
  expect_store(path_, content);
  // A lock on another file is refused.
  const std::string other = dir_.file("other.trove");
  ASSERT_TRUE(write_store(other, old_).ok());
  StoreUpdateOptions wrong;
  wrong.lock = &*run;
  EXPECT_THAT(StoreUpdate::begin(other, wrong).status().message(),
              HasSubstr("the writer lock given"));
  *run = StoreLock();
  EXPECT_TRUE(StoreUpdate::begin(path_).ok());
}

TEST_F(StoreUpdateTest, RewriteUnderTheRunsLockMovesTheLockToTheNewFile) {
  Result<StoreLock> run = StoreLock::acquire(path_);
  ASSERT_TRUE(run.ok());
  Result<StoreWriter> w = StoreWriter::create(path_, old_.provenance);
  ASSERT_TRUE(w.ok());
  for (const LayerData& l : old_.layers) {
    ASSERT_TRUE(w->begin_layer(l.name, l.info, l.table).ok());
    ASSERT_TRUE(w->append_records(l.records).ok());
    for (const DenseData& d : l.dense) ASSERT_TRUE(w->add_dense(d.name, d.shape, d.values).ok());
    ASSERT_TRUE(w->end_layer().ok());
  }
  ASSERT_TRUE(w->finish(&*run).ok());
  // The path names a new file, and it is locked: no second writer slipped in at the rename.
  EXPECT_THAT(StoreLock::acquire(path_).status().message(), HasSubstr("busy"));
  StoreUpdateOptions options;
  options.lock = &*run;
  EXPECT_TRUE(StoreUpdate::begin(path_, options).ok());
}

TEST_F(StoreUpdateTest, ReaderOfTheCommittingProcessIsToldToReopenNeverReadsTheNewBytes) {
  Result<StoreReader> mine = StoreReader::open(path_);
  ASSERT_TRUE(mine.ok());
  const StoreLayerInfo* l = mine->find_layer("L19");
  std::vector<uint8_t> out(l->table.stride);
  const int64_t id[] = {36};  // a record the commit changes
  ASSERT_TRUE(mine->read_records(*l, id, out).ok());
  // The commit cannot wait for its own process: it replaces the reader's generation.
  const StoreContent g2 = commit(old_, {});
  for (const Status& s : {mine->read_records(*l, id, out), mine->read_dense(*l, "keys").status(),
                          mine->verify().status()}) {
    EXPECT_EQ(s.code(), Status::Code::kAborted) << s.to_string();
    EXPECT_THAT(s.message(), HasSubstr("reopen the store"));
  }
  // Reopened, it reads the new generation; a second reader of the process pins as usual.
  expect_store(path_, g2);
  mine = Status::aborted("closed");
  expect_store(path_, g2);
}

TEST_F(StoreUpdateTest, ReadersNeverWaitForALiveWritersLock) {
  // A writer crashed after its commit point (journal committed, store untouched), and a live
  // run holds the lock now: a reader neither waits for the run nor replays its journal, and
  // reads the whole generation the store holds.
  const StoreContent g2 = committed_journal();
  Result<StoreLock> run = StoreLock::acquire(path_);
  ASSERT_TRUE(run.ok());
  const auto start = std::chrono::steady_clock::now();
  Result<StoreReader> r = StoreReader::open(path_);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
  EXPECT_EQ(r->generation(), 1u);
  Result<std::vector<StoreFault>> faults = r->verify();
  ASSERT_TRUE(faults.ok());
  EXPECT_TRUE(faults->empty());
  r = Status::aborted("closed");
  // With the lock free, the next open replays it.
  *run = StoreLock();
  expect_store(path_, g2);
}

TEST_F(StoreUpdateTest, CommittedJournalThatWouldGrowTheStorePastItsWritesIsRefused) {
  committed_journal();
  const std::string jpath = store_journal_path(path_);
  std::vector<uint8_t> journal = read_all(jpath);
  StoreJournalHeader h;
  std::memcpy(&h, journal.data(), sizeof(h));
  h.new_file_size = uint64_t{1} << 40;  // 1 TiB
  std::memcpy(journal.data(), &h, sizeof(h));
  // Re-sealed: the checksum is valid, so the journal reads as committed.
  const uint64_t sum = XXH3_64bits(journal.data(), journal.size() - 8);
  std::memcpy(journal.data() + journal.size() - 8, &sum, 8);
  write_all(jpath, journal);
  Result<StoreReader> r = StoreReader::open(path_);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().is_corruption());
  EXPECT_THAT(r.status().message(), HasSubstr("committed update journal is malformed"));
  EXPECT_THAT(r.status().message(), HasSubstr("new_file_size = 1099511627776, but its writes end"));
  EXPECT_TRUE(read_all(path_) == pristine_);
}

}  // namespace
}  // namespace trove
