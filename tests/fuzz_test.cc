// Time-boxed mutation fuzzing of the three parsers that read untrusted bytes: the safetensors
// header (SafetensorsFile::parse), the store manifest (StoreReader::open, then the runtime's
// reading of a layer's info and a forward through it) and the update journal (recovery in
// StoreReader::open). Each target mutates valid seeds (bit flips, interesting bytes and u64s,
// insertions, deletions, splices, number and string tokens swapped) and re-seals what a
// checksum would otherwise reject at once (the manifest's and the journal's XXH3), so the
// mutations reach the parsers behind the checksums.
//
// A finding is a crash (the process dies; run under ./dev sanitize for memory errors) or a
// broken invariant (a test failure, the input saved beside the test's scratch folder). Each
// target runs TROVE_FUZZ_SECONDS (default 1: a smoke run in the unit suite; `./dev soak` runs
// each for 60) from seed TROVE_FUZZ_SEED (default 1), and prints its run count.
#include <sys/stat.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "base/log.h"
#include "runtime/bench/synthetic.h"
#include "runtime/convert/pack.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/layer/store_layer.h"
#include "storage/safetensors.h"
#include "storage/store.h"
#include "storage/store_format.h"
#include "storage/store_update.h"
#include "tests/fault_injection.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using testing::ScratchDir;

double fuzz_seconds() {
  const char* s = std::getenv("TROVE_FUZZ_SECONDS");
  return s != nullptr ? std::atof(s) : 1.0;
}

uint64_t fuzz_seed() {
  const char* s = std::getenv("TROVE_FUZZ_SEED");
  return s != nullptr ? std::strtoull(s, nullptr, 10) : 1;
}

// Runs `one(rng)` until the time box closes; returns the number of runs.
template <typename F>
uint64_t fuzz_for(const char* target, F one) {
  std::mt19937_64 rng(fuzz_seed());
  const auto end = std::chrono::steady_clock::now() +
                   std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                       std::chrono::duration<double>(fuzz_seconds()));
  uint64_t runs = 0;
  while (std::chrono::steady_clock::now() < end && !::testing::Test::HasFailure()) {
    one(rng);
    ++runs;
  }
  std::printf("[ fuzz     ] %s: %llu runs in %.0f s, seed %llu, %s\n", target,
              static_cast<unsigned long long>(runs), fuzz_seconds(),
              static_cast<unsigned long long>(fuzz_seed()),
              ::testing::Test::HasFailure() ? "FINDINGS (see above)" : "no findings");
  return runs;
}

// ---- the mutator ------------------------------------------------------------------------------

const char* const kNumbers[] = {"0",
                                "-1",
                                "1",
                                "4096",
                                "18446744073709551615",
                                "1e308",
                                "-0",
                                "0.5",
                                "65",
                                "9223372036854775808",
                                "1099511627776",
                                "4095",
                                "[]",
                                "{}",
                                "null",
                                "true",
                                "\"\"",
                                "64",
                                "32"};
const uint64_t kU64s[] = {0,
                          1,
                          63,
                          64,
                          4095,
                          4096,
                          4097,
                          UINT32_MAX,
                          uint64_t{1} << 32,
                          uint64_t{1} << 40,
                          INT64_MAX,
                          UINT64_MAX,
                          UINT64_MAX - 63};

// One random mutation of `b` (which may change its size).
void mutate(std::vector<uint8_t>& b, std::mt19937_64& rng) {
  auto pick = [&](size_t n) { return n == 0 ? size_t{0} : static_cast<size_t>(rng() % n); };
  switch (rng() % 9) {
    case 0:  // bit flips
      for (int i = 0, n = 1 + static_cast<int>(rng() % 4); i < n && !b.empty(); ++i) {
        b[pick(b.size())] ^= static_cast<uint8_t>(1u << (rng() % 8));
      }
      break;
    case 1: {  // an interesting byte
      static const uint8_t kBytes[] = {0,   0xff, 0x7f, 0x80, '0', '9', '"', '{', '}',
                                       '[', ']',  ',',  ':',  '-', '.', 'e', '\\'};
      if (!b.empty()) b[pick(b.size())] = kBytes[pick(sizeof(kBytes))];
      break;
    }
    case 2: {  // an interesting u64, anywhere
      if (b.size() < 8) break;
      const uint64_t v = kU64s[pick(std::size(kU64s))] + (rng() % 3) - 1;
      std::memcpy(b.data() + pick(b.size() - 7), &v, 8);
      break;
    }
    case 3: {  // insert random bytes
      const size_t at = pick(b.size() + 1);
      std::vector<uint8_t> ins(1 + rng() % 16);
      for (uint8_t& x : ins) x = static_cast<uint8_t>(rng());
      b.insert(b.begin() + static_cast<ptrdiff_t>(at), ins.begin(), ins.end());
      break;
    }
    case 4: {  // delete a range
      if (b.empty()) break;
      const size_t at = pick(b.size());
      const size_t n = std::min<size_t>(b.size() - at, 1 + rng() % 32);
      b.erase(b.begin() + static_cast<ptrdiff_t>(at), b.begin() + static_cast<ptrdiff_t>(at + n));
      break;
    }
    case 5: {  // duplicate a range somewhere else
      if (b.empty()) break;
      const size_t at = pick(b.size());
      const size_t n = std::min<size_t>(b.size() - at, 1 + rng() % 64);
      const std::vector<uint8_t> piece(b.begin() + static_cast<ptrdiff_t>(at),
                                       b.begin() + static_cast<ptrdiff_t>(at + n));
      b.insert(b.begin() + static_cast<ptrdiff_t>(pick(b.size() + 1)), piece.begin(), piece.end());
      break;
    }
    case 6:
    case 7: {  // a number token (or a value) replaced by an interesting one
      std::vector<size_t> starts;
      for (size_t i = 0; i < b.size(); ++i) {
        if ((b[i] >= '0' && b[i] <= '9') && (i == 0 || !(b[i - 1] >= '0' && b[i - 1] <= '9'))) {
          starts.push_back(i);
        }
      }
      if (starts.empty()) break;
      const size_t at = starts[pick(starts.size())];
      size_t end = at;
      while (end < b.size() && ((b[end] >= '0' && b[end] <= '9') || b[end] == '.' ||
                                b[end] == 'e' || b[end] == '-' || b[end] == '+')) {
        ++end;
      }
      const std::string n = kNumbers[pick(std::size(kNumbers))];
      b.erase(b.begin() + static_cast<ptrdiff_t>(at), b.begin() + static_cast<ptrdiff_t>(end));
      b.insert(b.begin() + static_cast<ptrdiff_t>(at), n.begin(), n.end());
      break;
    }
    default: {  // a string token's contents replaced
      std::vector<size_t> quotes;
      for (size_t i = 0; i < b.size(); ++i) {
        if (b[i] == '"') quotes.push_back(i);
      }
      if (quotes.size() < 2) break;
      const size_t k = pick(quotes.size() - 1);
      static const char* const kStrings[] = {
          "",          "f32", "int4", "int8", "F64",    "BF16",   "x",           "ggml_q4_0",
          "msb_first", "f16", "bf16", "none", "layers", "offset", "__metadata__"};
      const std::string s = kStrings[pick(std::size(kStrings))];
      b.erase(b.begin() + static_cast<ptrdiff_t>(quotes[k] + 1),
              b.begin() + static_cast<ptrdiff_t>(quotes[k + 1]));
      b.insert(b.begin() + static_cast<ptrdiff_t>(quotes[k] + 1), s.begin(), s.end());
      break;
    }
  }
}

void save_finding(const std::string& name, const std::vector<uint8_t>& bytes) {
  const std::string path = ::testing::TempDir() + "trove-fuzz-" + name;
  testing::write_all(path, bytes);
  ADD_FAILURE() << "input saved to " << path;
}

// ---- seeds ------------------------------------------------------------------------------------

PeerConfig small_config() {
  PeerConfig c;
  c.dim = 24;
  c.heads = 2;
  c.n_keys = 6;
  c.dim_key = 8;
  c.topk = 3;
  return c;
}

// A packed int4 store (one layer "p") in `dir`; its path.
std::string packed_store(const ScratchDir& dir) {
  SyntheticCheckpoint spec;
  spec.layout = ImportLayout::kTrove;  // the config travels in the metadata
  spec.prefixes = {"p"};
  spec.config = small_config();
  spec.dtype = StDType::kF32;
  const std::string ckpt = dir.file("c.safetensors");
  EXPECT_TRUE(write_synthetic_checkpoint(ckpt, spec).ok());
  PackOptions o;
  o.inputs = {ckpt};
  o.output = dir.file("seed.trove");
  o.layout = ImportLayout::kTrove;
  o.layers = {{"p", "p"}};
  o.threads = 1;
  const Result<PackReport> r = pack_store(o);
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return o.output;
}

// ---- targets ----------------------------------------------------------------------------------

TEST(Fuzz, SafetensorsHeader) {
  ScratchDir dir;
  std::vector<std::vector<uint8_t>> seeds;
  {
    SyntheticCheckpoint spec;
    spec.config = small_config();
    for (ImportLayout layout : {ImportLayout::kMikeybeez, ImportLayout::kTrove}) {
      spec.layout = layout;
      ASSERT_TRUE(write_synthetic_checkpoint(dir.file("s.safetensors"), spec).ok());
      seeds.push_back(testing::read_all(dir.file("s.safetensors")));
    }
  }
  fuzz_for("safetensors header", [&](std::mt19937_64& rng) {
    std::vector<uint8_t> image = seeds[rng() % seeds.size()];
    uint64_t header_len = 0;
    std::memcpy(&header_len, image.data(), 8);
    // Mostly the header; sometimes anywhere (data, length field).
    for (int i = 0, n = 1 + static_cast<int>(rng() % 3); i < n; ++i) {
      if (rng() % 4 == 0) {
        mutate(image, rng);
        continue;
      }
      std::vector<uint8_t> header(image.begin() + 8,
                                  image.begin() + 8 + static_cast<ptrdiff_t>(header_len));
      mutate(header, rng);
      const int64_t delta = static_cast<int64_t>(header.size()) - static_cast<int64_t>(header_len);
      image.erase(image.begin() + 8, image.begin() + 8 + static_cast<ptrdiff_t>(header_len));
      image.insert(image.begin() + 8, header.begin(), header.end());
      if (rng() % 2 == 0)
        header_len = static_cast<uint64_t>(static_cast<int64_t>(header_len) + delta);
      std::memcpy(image.data(), &header_len, 8);
    }
    Result<SafetensorsFile> f = SafetensorsFile::parse(image, "fuzz.safetensors");
    if (!f.ok()) return;
    // Accepted: every tensor lies in the data section, its size is its shape's, and the tensors
    // tile the data section.
    uint64_t len = 0;
    std::memcpy(&len, image.data(), 8);
    const uint64_t data_size = image.size() - 8 - len;
    uint64_t covered = 0;
    for (const StTensorView& t : f->tensors()) {
      const bool inside = t.bytes.data() >= image.data() + 8 + len &&
                          t.bytes.data() + t.bytes.size() <= image.data() + image.size();
      const bool sized =
          static_cast<uint64_t>(t.numel()) * st_dtype_size(t.dtype) == t.bytes.size();
      if (!inside || !sized) save_finding("safetensors", image);
      covered += t.bytes.size();
    }
    if (covered != data_size) save_finding("safetensors-tiling", image);
  });
}

// Rebuilds `file` (a store image) around `manifest` in place of its own: header and trailer
// re-sealed, so the manifest's checksum passes and the validator sees the mutation.
std::vector<uint8_t> with_manifest(const std::vector<uint8_t>& file, const std::string& manifest) {
  const StoreHeader h = decode_store_header(file);
  std::vector<uint8_t> out(file.begin(), file.begin() + static_cast<ptrdiff_t>(h.manifest_offset));
  out.insert(out.end(), manifest.begin(), manifest.end());
  const uint64_t size = out.size() + kStoreTrailerBytes;
  const StoreHeader nh =
      make_store_header(size, h.manifest_offset, manifest.size(),
                        XXH3_64bits(manifest.data(), manifest.size()), h.generation);
  out.resize(size);
  encode_store_trailer(make_store_trailer(nh),
                       std::span<uint8_t, kStoreTrailerBytes>(
                           out.data() + size - kStoreTrailerBytes, kStoreTrailerBytes));
  encode_store_header(nh, std::span<uint8_t, kStoreHeaderBytes>(out.data(), kStoreHeaderBytes));
  return out;
}

TEST(Fuzz, StoreManifest) {
  set_log_level(LogLevel::kError);
  ScratchDir dir;
  const std::vector<uint8_t> seed = testing::read_all(packed_store(dir));
  const StoreHeader h = decode_store_header(seed);
  const std::string manifest(
      seed.begin() + static_cast<ptrdiff_t>(h.manifest_offset),
      seed.begin() + static_cast<ptrdiff_t>(h.manifest_offset + h.manifest_bytes));
  const std::string path = dir.file("m.trove");
  std::vector<float> x(3 * 24, 0.5f);
  std::vector<float> y;
  fuzz_for("store manifest", [&](std::mt19937_64& rng) {
    std::vector<uint8_t> text(manifest.begin(), manifest.end());
    for (int i = 0, n = 1 + static_cast<int>(rng() % 3); i < n; ++i) mutate(text, rng);
    const std::vector<uint8_t> file = with_manifest(seed, std::string(text.begin(), text.end()));
    testing::write_all(path, file);
    Result<StoreReader> r = StoreReader::open(path);
    if (!r.ok()) return;
    // Accepted: everything the manifest describes can be read or is refused with a Status.
    for (const StoreLayerInfo& l : r->layers()) {
      std::vector<uint8_t> rec(l.table.stride);
      const int64_t ids[] = {0, static_cast<int64_t>(l.table.count) - 1};
      for (int64_t id : ids) (void)r->read_records(l, {&id, 1}, rec);
      for (const StoreDenseInfo& d : l.dense) (void)r->read_dense(l, d.name);
      if (!load_stored_layer(*r, l).ok()) continue;
      Result<PeerLayer> layer = PeerLayer::open(*r, l.name);
      if (!layer.ok()) continue;
      y.resize(static_cast<size_t>(3 * layer->config().dim_out));
      PeerRouting routing;
      if (layer->config().dim == 24) (void)layer->forward(x, 3, y, &routing);
    }
    (void)r->verify();
  });
  set_log_level(LogLevel::kInfo);
}

TEST(Fuzz, UpdateJournal) {
  set_log_level(LogLevel::kOff);
  ScratchDir dir;
  const std::string seed_path = packed_store(dir);
  const std::vector<uint8_t> pristine = testing::read_all(seed_path);
  const std::string path = dir.file("j.trove");
  const std::string jpath = store_journal_path(path);
  // A committed journal left beside generation 1: an update "crashed" just after its commit
  // point (the first folder sync).
  auto run_update = [&](const std::shared_ptr<CrashingStoreUpdateOps>& ops) {
    testing::write_all(path, pristine);
    StoreUpdateOptions o;
    o.ops = ops;
    Result<StoreUpdate> u = StoreUpdate::begin(path, o);
    ASSERT_TRUE(u.ok()) << u.status().to_string();
    Result<StoreReader> seed = StoreReader::open(seed_path);
    ASSERT_TRUE(seed.ok());
    std::vector<uint8_t> strides(2 * seed->layers()[0].table.stride, 0x5a);
    const int64_t ids[] = {1, 7};
    ASSERT_TRUE(u->put_records("p", ids, strides).ok());
    ASSERT_TRUE(u->set_provenance({{"note", std::string(200, 'n')}}).ok());
    (void)u->commit();
  };
  uint64_t commit_point = 0;
  {
    auto ops = std::make_shared<CrashingStoreUpdateOps>();
    run_update(ops);
    for (size_t i = 0; i < ops->trace().size() && commit_point == 0; ++i) {
      if (ops->trace()[i].rfind("sync_dir ", 0) == 0) commit_point = i + 1;
    }
  }
  ASSERT_GT(commit_point, 0u);
  auto ops = std::make_shared<CrashingStoreUpdateOps>();
  ops->crash_at(commit_point + 1);
  run_update(ops);
  const std::vector<uint8_t> journal = testing::read_all(jpath);
  ASSERT_GT(journal.size(), 104u);

  fuzz_for("update journal", [&](std::mt19937_64& rng) {
    std::vector<uint8_t> j = journal;
    for (int i = 0, n = 1 + static_cast<int>(rng() % 3); i < n; ++i) mutate(j, rng);
    if (rng() % 8 != 0 && j.size() >= 104) {
      // Re-sealed as committed: the length and checksum in its commit record made to match.
      const uint64_t size = j.size();
      std::memcpy(j.data() + size - 24, &size, 8);
      const uint64_t sum = XXH3_64bits(j.data(), size - 8);
      std::memcpy(j.data() + size - 8, &sum, 8);
    }
    testing::write_all(path, pristine);
    testing::write_all(jpath, j);
    Result<StoreReader> r = StoreReader::open(path);
    // Whatever the journal said, the store never grew past what it could write.
    struct stat st;
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    if (static_cast<uint64_t>(st.st_size) > pristine.size() + j.size()) {
      save_finding("journal", j);
    }
    if (r.ok()) (void)r->verify();
    std::filesystem::remove(jpath);
  });
  set_log_level(LogLevel::kInfo);
}

}  // namespace
}  // namespace trove
