// The .trove store: round trips, the exact packed bytes of header and trailer, a flipped byte
// in every region, truncation, foreign and newer files, hand-made bad manifests, writer misuse
// and abandonment, and O_DIRECT reads. storage/FORMAT.md is the specification tested here.
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "storage/file.h"
#include "storage/store.h"
#include "storage/store_format.h"
#include "tests/fault_injection.h"

namespace trove {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

// ---- sample store -----------------------------------------------------------------------------

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

  std::span<const uint8_t> record(int64_t id) const {
    return std::span<const uint8_t>(records).subspan(static_cast<size_t>(id) * table.stride,
                                                     table.stride);
  }
};

std::vector<float> random_floats(size_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

LayerData make_layer(std::string name, std::string dtype, uint64_t count, uint64_t record_bytes,
                     uint64_t stride,
                     std::vector<std::pair<std::string, std::vector<int64_t>>> dense,
                     std::mt19937_64& rng) {
  LayerData l;
  l.name = std::move(name);
  l.info = {{"dim", 64}, {"dtype", dtype}, {"note", "opaque to storage"}};
  l.table = {std::move(dtype), count, record_bytes, stride};
  l.records.assign(count * stride, 0);
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint64_t i = 0; i < count; ++i) {
    for (uint64_t b = 0; b < record_bytes; ++b) {
      l.records[i * stride + b] = static_cast<uint8_t>(byte(rng));  // padding stays zero
    }
  }
  for (auto& [dense_name, shape] : dense) {
    size_t numel = 1;
    for (int64_t d : shape) numel *= static_cast<size_t>(d);
    l.dense.push_back({dense_name, shape, random_floats(numel, rng)});
  }
  return l;
}

// Two layers with different strides and counts that are not powers of two; the second has a
// scalar and an empty tensor among its dense tensors.
std::vector<LayerData> sample_layers(uint64_t seed = 7) {
  std::mt19937_64 rng(seed);
  std::vector<LayerData> layers;
  layers.push_back(make_layer("L19", "int4", 37, 2304, 2304,
                              {{"query.weight", {24, 10}}, {"keys", {1, 2, 7, 4}}}, rng));
  layers.push_back(make_layer(
      "L21", "int8", 1000, 170, 192,
      {{"query.weight", {6, 5}}, {"norm.weight", {13}}, {"scale", {}}, {"empty", {0, 3}}}, rng));
  return layers;
}

const json kProvenance = {{"source", "model.safetensors"}, {"layout", "trove"}, {"seed", 7}};

// Writes `layers`, appending records in seeded uneven chunks and dense tensors between them.
Status write_store(const std::string& path, const std::vector<LayerData>& layers,
                   uint64_t seed = 11) {
  std::mt19937_64 rng(seed);
  TROVE_ASSIGN_OR_RETURN(StoreWriter w, StoreWriter::create(path, kProvenance));
  for (const LayerData& l : layers) {
    TROVE_RETURN_IF_ERROR(w.begin_layer(l.name, l.info, l.table));
    size_t next_dense = 0;
    uint64_t done = 0;
    while (done < l.table.count) {
      const uint64_t n = std::min<uint64_t>(l.table.count - done, 1 + rng() % 97);
      TROVE_RETURN_IF_ERROR(w.append_records(
          std::span<const uint8_t>(l.records).subspan(done * l.table.stride, n * l.table.stride)));
      done += n;
      if (next_dense < l.dense.size()) {
        const DenseData& d = l.dense[next_dense++];
        TROVE_RETURN_IF_ERROR(w.add_dense(d.name, d.shape, d.values));
      }
    }
    for (; next_dense < l.dense.size(); ++next_dense) {
      const DenseData& d = l.dense[next_dense];
      TROVE_RETURN_IF_ERROR(w.add_dense(d.name, d.shape, d.values));
    }
    TROVE_RETURN_IF_ERROR(w.end_layer());
  }
  return w.finish();
}

// ---- file helpers -----------------------------------------------------------------------------

std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

void write_all(const std::string& path, std::span<const uint8_t> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// XORs the byte at `offset` with `mask` in place (calling it twice restores the file).
void xor_byte(const std::string& path, uint64_t offset, uint8_t mask) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0) << path;
  uint8_t b = 0;
  ASSERT_EQ(::pread(fd, &b, 1, static_cast<off_t>(offset)), 1);
  b ^= mask;
  ASSERT_EQ(::pwrite(fd, &b, 1, static_cast<off_t>(offset)), 1);
  ::close(fd);
}

// Rewrites the store at `path` with its manifest edited (or replaced by `raw_manifest`) and its
// header edited, then recomputes every checksum the edit invalidates (manifest, header,
// trailer) so that only the edited content can fail.
void rewrite_store(const std::string& path, const std::function<void(json&)>& edit_manifest,
                   const std::function<void(StoreHeader&)>& edit_header = nullptr,
                   const std::string* raw_manifest = nullptr) {
  std::vector<uint8_t> bytes = read_all(path);
  ASSERT_GE(bytes.size(), kStoreHeaderBytes + kStoreTrailerBytes);
  const StoreHeader old = decode_store_header(bytes);
  std::string text;
  if (raw_manifest != nullptr) {
    text = *raw_manifest;
  } else {
    json manifest = json::parse(
        bytes.begin() + static_cast<ptrdiff_t>(old.manifest_offset),
        bytes.begin() + static_cast<ptrdiff_t>(old.manifest_offset + old.manifest_bytes));
    if (edit_manifest) edit_manifest(manifest);
    text = manifest.dump(1);
  }
  bytes.resize(old.manifest_offset);
  bytes.insert(bytes.end(), text.begin(), text.end());
  const std::span<const uint8_t> manifest_bytes(bytes.data() + old.manifest_offset, text.size());
  StoreHeader h = make_store_header(bytes.size() + kStoreTrailerBytes, old.manifest_offset,
                                    text.size(), store_checksum(manifest_bytes), old.generation);
  if (edit_header) edit_header(h);
  h.header_xxh3 = store_header_checksum(h);
  encode_store_header(h, std::span<uint8_t, kStoreHeaderBytes>(bytes.data(), kStoreHeaderBytes));
  uint8_t trailer[kStoreTrailerBytes];
  encode_store_trailer(make_store_trailer(h), trailer);
  bytes.insert(bytes.end(), trailer, trailer + kStoreTrailerBytes);
  write_all(path, bytes);
}

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "trove_store_test_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    layers_ = sample_layers();
    path_ = dir_ + "/model.trove";
    ASSERT_TRUE(write_store(path_, layers_).ok());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // A fresh copy of the sample store, for tests that damage it.
  std::string copy_store(const std::string& name) {
    const std::string p = dir_ + "/" + name;
    std::filesystem::copy_file(path_, p, std::filesystem::copy_options::overwrite_existing);
    return p;
  }

  StoreReader open_ok(const std::string& p, StoreOpenOptions options = {}) {
    Result<StoreReader> r = StoreReader::open(p, options);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    return std::move(r).value();
  }

  std::string dir_;
  std::string path_;
  std::vector<LayerData> layers_;
};

void expect_records(const StoreReader& reader, const StoreLayerInfo& info, const LayerData& l,
                    const std::vector<int64_t>& ids) {
  std::vector<uint8_t> out(ids.size() * l.table.stride, 0xEE);
  const Status s = reader.read_records(info, ids, out);
  ASSERT_TRUE(s.ok()) << s.to_string();
  for (size_t i = 0; i < ids.size(); ++i) {
    const auto want = l.record(ids[i]);
    ASSERT_TRUE(std::equal(want.begin(), want.end(), out.begin() + i * l.table.stride))
        << "layer " << l.name << " expert " << ids[i] << " (position " << i << ")";
  }
}

std::vector<int64_t> shuffled_ids_with_duplicates(uint64_t count, std::mt19937_64& rng) {
  std::vector<int64_t> ids(count);
  for (uint64_t i = 0; i < count; ++i) ids[i] = static_cast<int64_t>(i);
  for (int k = 0; k < 5; ++k) ids.push_back(static_cast<int64_t>(rng() % count));
  ids.push_back(0);
  ids.push_back(static_cast<int64_t>(count - 1));
  std::shuffle(ids.begin(), ids.end(), rng);
  return ids;
}

// ---- round trip -------------------------------------------------------------------------------

TEST_F(StoreTest, RoundTripsRecordsDenseAndManifest) {
  for (bool direct : {true, false}) {
    SCOPED_TRACE(direct ? "direct_io" : "buffered");
    StoreReader reader = open_ok(path_, {.verify_checksums = true, .direct_io = direct});
    EXPECT_EQ(reader.path(), path_);
    EXPECT_EQ(reader.version_major(), 1);
    EXPECT_EQ(reader.version_minor(), 0);
    EXPECT_EQ(reader.generation(), 1u);
    EXPECT_EQ(reader.file_size(), std::filesystem::file_size(path_));
    EXPECT_EQ(reader.provenance(), kProvenance);
    EXPECT_EQ(reader.manifest()["format"], "trove");
    EXPECT_EQ(reader.manifest()["checksum"]["algorithm"], "xxh3-64");
    ASSERT_EQ(reader.layers().size(), layers_.size());
    EXPECT_EQ(reader.find_layer("nope"), nullptr);

    std::mt19937_64 rng(3);
    for (const LayerData& l : layers_) {
      SCOPED_TRACE(l.name);
      const StoreLayerInfo* info = reader.find_layer(l.name);
      ASSERT_NE(info, nullptr);
      EXPECT_EQ(info->info, l.info);
      EXPECT_EQ(info->table.dtype, l.table.dtype);
      EXPECT_EQ(info->table.count, l.table.count);
      EXPECT_EQ(info->table.record_bytes, l.table.record_bytes);
      EXPECT_EQ(info->table.stride, l.table.stride);
      EXPECT_EQ(info->table.offset % kStoreTableAlignment, 0u);
      EXPECT_EQ(info->table.bytes, l.table.count * l.table.stride);

      expect_records(reader, *info, l, shuffled_ids_with_duplicates(l.table.count, rng));
      expect_records(reader, *info, l, {static_cast<int64_t>(l.table.count - 1)});
      expect_records(reader, *info, l, {});

      const std::span<const uint8_t> mapped = reader.mapped_records(*info);
      ASSERT_EQ(mapped.size(), l.records.size());
      EXPECT_TRUE(std::equal(mapped.begin(), mapped.end(), l.records.begin()));
      for (int64_t id : {int64_t{0}, static_cast<int64_t>(l.table.count / 2)}) {
        EXPECT_TRUE(reader.verify_record(*info, id, l.record(id).data()).ok());
        EXPECT_EQ(reader.record_checksum(*info, id), store_checksum(l.record(id)));
      }

      ASSERT_EQ(info->dense.size(), l.dense.size());
      for (const DenseData& d : l.dense) {
        const StoreDenseInfo* di = info->find_dense(d.name);
        ASSERT_NE(di, nullptr) << d.name;
        EXPECT_EQ(di->shape, d.shape);
        EXPECT_EQ(di->bytes, d.values.size() * sizeof(float));
        EXPECT_EQ(di->offset % kStoreDenseAlignment, 0u);
        Result<std::vector<float>> got = reader.read_dense(*info, d.name);
        ASSERT_TRUE(got.ok()) << got.status().to_string();
        EXPECT_EQ(*got, d.values) << d.name;
      }
    }

    // A copy of a layer's info (not the reader's own object) is looked up by name.
    StoreLayerInfo copy = reader.layers()[1];
    expect_records(reader, copy, layers_[1], {5, 999, 5});

    uint64_t last_done = 0, last_total = 0;
    Result<std::vector<StoreFault>> faults = reader.verify([&](uint64_t done, uint64_t total) {
      EXPECT_GE(done, last_done);
      last_done = done;
      last_total = total;
    });
    ASSERT_TRUE(faults.ok()) << faults.status().to_string();
    EXPECT_TRUE(faults->empty());
    EXPECT_EQ(last_total, reader.file_size());
    EXPECT_EQ(last_done, last_total);
  }
}

TEST_F(StoreTest, LayoutMatchesFormatMd) {
  const std::vector<uint8_t> bytes = read_all(path_);
  ASSERT_GT(bytes.size(), kStoreHeaderBytes + kStoreTrailerBytes);
  // Header: magic, version 1.0, endian bytes 04 03 02 01, all little-endian.
  const uint8_t magic[8] = {'T', 'R', 'O', 'V', 'E', 0x00, '\r', '\n'};
  EXPECT_EQ(std::memcmp(bytes.data(), magic, 8), 0);
  const std::vector<uint8_t> version_and_endian = {1, 0, 0, 0, 4, 3, 2, 1};
  EXPECT_EQ(std::vector<uint8_t>(bytes.begin() + 8, bytes.begin() + 16), version_and_endian);
  uint64_t file_size = 0;
  for (int i = 7; i >= 0; --i) file_size = file_size << 8 | bytes[16 + i];
  EXPECT_EQ(file_size, bytes.size());
  EXPECT_TRUE(
      std::all_of(bytes.begin() + 72, bytes.begin() + 4096, [](uint8_t b) { return b == 0; }));
  const StoreHeader h = decode_store_header(bytes);
  EXPECT_EQ(h.header_xxh3, store_checksum(std::span<const uint8_t>(bytes).first(64)));
  EXPECT_EQ(h.generation, 1u);
  EXPECT_EQ(h.flags, 0u);

  // Trailer: the last 64 bytes, "TROVEEND", the same fields as the header.
  const auto trailer = std::span<const uint8_t>(bytes).last(kStoreTrailerBytes);
  EXPECT_EQ(std::memcmp(trailer.data(), "TROVEEND", 8), 0);
  EXPECT_EQ(std::vector<uint8_t>(trailer.begin() + 8, trailer.begin() + 16), version_and_endian);
  EXPECT_EQ(std::memcmp(trailer.data() + 16, bytes.data() + 16, 40), 0);  // size .. generation
  EXPECT_EQ(decode_store_trailer(trailer).trailer_xxh3, store_checksum(trailer.first(56)));

  // The manifest ends where the trailer begins; the first table starts right after the header.
  EXPECT_EQ(h.manifest_offset + h.manifest_bytes, bytes.size() - kStoreTrailerBytes);
  StoreReader reader = open_ok(path_);
  EXPECT_EQ(reader.layers()[0].table.offset, kStoreHeaderBytes);
  const json& t0 = reader.manifest()["layers"][0]["table"];
  EXPECT_EQ(t0["checksums"]["bytes"], 8 * 37);
  EXPECT_EQ(t0["checksums"]["offset"].get<uint64_t>() % 4096, 0u);
  // Checksum arrays are u64 LE XXH3 of each record's full stride.
  const uint64_t sums_offset = t0["checksums"]["offset"];
  uint64_t first_sum = 0;
  std::memcpy(&first_sum, bytes.data() + sums_offset, 8);
  EXPECT_EQ(first_sum, store_checksum(layers_[0].record(0)));
}

TEST_F(StoreTest, SingleRecordLayerWithoutDenseTensors) {
  const std::string p = dir_ + "/one.trove";
  std::mt19937_64 rng(5);
  std::vector<LayerData> layers = {make_layer("only", "fp32", 1, 64, 64, {}, rng)};
  ASSERT_TRUE(write_store(p, layers).ok());
  StoreReader reader = open_ok(p);
  expect_records(reader, reader.layers()[0], layers[0], {0, 0});
  Result<std::vector<StoreFault>> faults = reader.verify();
  ASSERT_TRUE(faults.ok());
  EXPECT_TRUE(faults->empty());
}

TEST_F(StoreTest, ReadRecordsCoalescesRunsLongerThanOneRead) {
  // 777 records of 1600 bytes: 1.2 MiB, more than one coalesced read; unaligned records.
  const std::string p = dir_ + "/long.trove";
  std::mt19937_64 rng(9);
  std::vector<LayerData> layers = {make_layer("long", "bf16", 777, 1555, 1600, {}, rng)};
  ASSERT_TRUE(write_store(p, layers).ok());
  for (bool direct : {true, false}) {
    StoreReader reader = open_ok(p, {.verify_checksums = true, .direct_io = direct});
    std::vector<int64_t> ids(777);
    for (int64_t i = 0; i < 777; ++i) ids[static_cast<size_t>(i)] = i;
    expect_records(reader, reader.layers()[0], layers[0], ids);
    std::reverse(ids.begin(), ids.end());
    expect_records(reader, reader.layers()[0], layers[0], ids);
    std::vector<int64_t> sparse;
    for (int64_t i = 776; i >= 0; i -= 3) sparse.push_back(i);
    expect_records(reader, reader.layers()[0], layers[0], sparse);
  }
}

// ---- O_DIRECT ---------------------------------------------------------------------------------

TEST(StoreDirectIo, SpansAndReadAmplification) {
  const StoreDirectSpan s = store_direct_span(4096 + 192 * 21, 192);  // [8128, 8320)
  EXPECT_EQ(s.begin, 4096u);
  EXPECT_EQ(s.end, 12288u);
  EXPECT_EQ(store_direct_span(8192, 4096).bytes(), 4096u);
  EXPECT_EQ(store_direct_span(8192, 4097).bytes(), 8192u);
}

// O_DIRECT refuses misaligned reads with EINVAL, and read_records has no buffered retry, so a
// successful direct read on a filesystem that accepts O_DIRECT shows the alignment is honoured.
// On a filesystem that refuses O_DIRECT (tmpfs) the reader falls back to buffered reads.
TEST(StoreDirectIo, ReadsWithAndWithoutODirectOnEveryFilesystem) {
  std::vector<std::string> roots = {::testing::TempDir(), std::string(TROVE_BINARY_DIR) + "/"};
  if (::access("/dev/shm", W_OK) == 0) roots.push_back("/dev/shm/");
  std::mt19937_64 rng(21);
  const std::vector<LayerData> layers = sample_layers(21);
  for (const std::string& root : roots) {
    std::string tmpl = root + "trove_direct_XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) continue;
    const std::string p = tmpl + "/direct.trove";
    ASSERT_TRUE(write_store(p, layers).ok());
    const bool fs_direct = File::open_read(p, /*direct=*/true).ok();
    SCOPED_TRACE(root + (fs_direct ? " (O_DIRECT supported)" : " (O_DIRECT refused)"));
    for (bool direct : {true, false}) {
      Result<StoreReader> reader =
          StoreReader::open(p, {.verify_checksums = true, .direct_io = direct});
      ASSERT_TRUE(reader.ok()) << reader.status().to_string();
      for (size_t li = 0; li < layers.size(); ++li) {
        expect_records(*reader, reader->layers()[li], layers[li],
                       shuffled_ids_with_duplicates(layers[li].table.count, rng));
      }
    }
    std::filesystem::remove_all(tmpl);
  }
}

// ---- corruption: one flipped byte per region --------------------------------------------------

struct Flip {
  uint64_t offset;
  uint8_t mask;
};

std::vector<Flip> seeded_flips(uint64_t begin, uint64_t end, int n, std::mt19937_64& rng) {
  std::vector<Flip> flips;
  for (int i = 0; i < n; ++i) {
    flips.push_back({begin + rng() % (end - begin), static_cast<uint8_t>(1u << (rng() % 8))});
  }
  return flips;
}

std::string flip_trace(const Flip& f) {
  return "flip at offset " + std::to_string(f.offset) + " mask " + std::to_string(f.mask);
}

// open() itself must fail, with corruption naming `what`.
void expect_open_corruption(const std::string& p, const Flip& f, const std::string& what) {
  SCOPED_TRACE(flip_trace(f));
  xor_byte(p, f.offset, f.mask);
  Result<StoreReader> r = StoreReader::open(p);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().is_corruption()) << r.status().to_string();
  EXPECT_THAT(r.status().message(), HasSubstr(p));
  EXPECT_THAT(r.status().message(), HasSubstr(what));
  xor_byte(p, f.offset, f.mask);
}

// open() succeeds and verify() reports exactly one fault, in `region`.
StoreFault expect_single_fault(const std::string& p, const char* region) {
  Result<StoreReader> reader = StoreReader::open(p);
  EXPECT_TRUE(reader.ok()) << reader.status().to_string();
  if (!reader.ok()) return {};
  Result<std::vector<StoreFault>> faults = reader->verify();
  EXPECT_TRUE(faults.ok());
  if (!faults.ok()) return {};
  EXPECT_EQ(faults->size(), 1u);
  if (faults->size() != 1) return {};
  EXPECT_EQ((*faults)[0].region, region) << (*faults)[0].message();
  return (*faults)[0];
}

TEST_F(StoreTest, FlippedHeaderByteFailsOpen) {
  std::mt19937_64 rng(101);
  // Past magic, version and endian_check (tested on their own below): the 1.x fields, the
  // header checksum and the zero padding.
  for (const Flip& f : seeded_flips(16, 72, 12, rng)) expect_open_corruption(path_, f, "header");
  for (const Flip& f : seeded_flips(72, 4096, 6, rng)) {
    expect_open_corruption(path_, f, "header padding");
  }
  expect_open_corruption(path_, {8 + 2, 0x01}, "header checksum mismatch");  // version_minor
  expect_open_corruption(path_, {12, 0x10}, "header endian_check");
}

TEST_F(StoreTest, FlippedTrailerByteFailsOpen) {
  std::mt19937_64 rng(102);
  const uint64_t size = std::filesystem::file_size(path_);
  for (const Flip& f : seeded_flips(size - kStoreTrailerBytes, size, 16, rng)) {
    expect_open_corruption(path_, f, "trailer");
  }
}

TEST_F(StoreTest, FlippedManifestByteFailsOpen) {
  std::mt19937_64 rng(103);
  const StoreHeader h = decode_store_header(read_all(path_));
  for (const Flip& f :
       seeded_flips(h.manifest_offset, h.manifest_offset + h.manifest_bytes, 8, rng)) {
    expect_open_corruption(path_, f, "manifest at offset");
  }
}

TEST_F(StoreTest, FlippedChecksumArrayByteFailsOpen) {
  std::mt19937_64 rng(104);
  StoreReader reader = open_ok(path_);
  for (const json& layer : reader.manifest()["layers"]) {
    const uint64_t off = layer["table"]["checksums"]["offset"];
    const uint64_t bytes = layer["table"]["checksums"]["bytes"];
    for (const Flip& f : seeded_flips(off, off + bytes, 4, rng)) {
      expect_open_corruption(path_, f,
                             "checksums of layer " + layer["name"].get<std::string>() +
                                 " at offset " + std::to_string(off));
    }
  }
}

TEST_F(StoreTest, FlippedRecordByteIsFoundByVerifyAndReadRecords) {
  std::mt19937_64 rng(105);
  StoreReader pristine = open_ok(path_);
  for (size_t li = 0; li < layers_.size(); ++li) {
    const LayerData& l = layers_[li];
    const StoreTableInfo& t = pristine.layers()[li].table;
    // Every record of the small table; seeded records of the large one.
    std::vector<int64_t> victims;
    if (t.count <= 64) {
      for (int64_t id = 0; id < static_cast<int64_t>(t.count); ++id) victims.push_back(id);
    } else {
      victims = {0, static_cast<int64_t>(t.count - 1)};
      for (int k = 0; k < 4; ++k) victims.push_back(static_cast<int64_t>(rng() % t.count));
    }
    for (int64_t id : victims) {
      // Anywhere in the stride, padding included (the checksum covers it).
      const Flip f = {t.offset + static_cast<uint64_t>(id) * t.stride + rng() % t.stride,
                      static_cast<uint8_t>(1u << (rng() % 8))};
      SCOPED_TRACE(l.name + " expert " + std::to_string(id) + ", " + flip_trace(f));
      xor_byte(path_, f.offset, f.mask);

      const StoreFault fault = expect_single_fault(path_, "records");
      EXPECT_EQ(fault.layer, l.name);
      EXPECT_EQ(fault.item, "expert " + std::to_string(id));
      EXPECT_EQ(fault.offset, t.offset + static_cast<uint64_t>(id) * t.stride);
      EXPECT_EQ(fault.bytes, t.stride);
      EXPECT_THAT(fault.message(), HasSubstr("records of layer " + l.name + ", expert " +
                                             std::to_string(id) + " at offset"));

      StoreReader reader = open_ok(path_);
      const StoreLayerInfo& info = reader.layers()[li];
      std::vector<uint8_t> out(t.stride);
      const int64_t one[] = {id};
      const Status s = reader.read_records(info, one, out);
      ASSERT_FALSE(s.ok());
      EXPECT_TRUE(s.is_corruption());
      EXPECT_THAT(s.message(),
                  HasSubstr(path_ + ": layer " + l.name + " expert " + std::to_string(id) +
                            " at offset " + std::to_string(fault.offset) + " (" +
                            std::to_string(t.stride) + " bytes): checksum mismatch"));
      // The neighbours, read in the same coalesced extent, are fine.
      std::vector<int64_t> others;
      for (int64_t k = std::max<int64_t>(0, id - 40);
           k < std::min<int64_t>(static_cast<int64_t>(t.count), id + 40); ++k) {
        if (k != id) others.push_back(k);
      }
      expect_records(reader, info, l, others);
      EXPECT_FALSE(
          reader.verify_record(info, id, reader.mapped_records(info).data() + id * t.stride).ok());

      // With verification off the damaged bytes come back as stored.
      StoreReader unchecked = open_ok(path_, {.verify_checksums = false, .direct_io = true});
      EXPECT_TRUE(unchecked.read_records(unchecked.layers()[li], one, out).ok());
      EXPECT_EQ(out[f.offset - fault.offset], l.record(id)[f.offset - fault.offset] ^ f.mask);

      xor_byte(path_, f.offset, f.mask);
    }
  }
}

TEST_F(StoreTest, FlippedDenseByteIsFoundByVerifyAndReadDense) {
  std::mt19937_64 rng(106);
  StoreReader pristine = open_ok(path_);
  for (size_t li = 0; li < layers_.size(); ++li) {
    for (const StoreDenseInfo& d : pristine.layers()[li].dense) {
      if (d.bytes == 0) continue;
      for (const Flip& f : seeded_flips(d.offset, d.offset + d.bytes, 2, rng)) {
        SCOPED_TRACE(d.name + ", " + flip_trace(f));
        xor_byte(path_, f.offset, f.mask);
        const StoreFault fault = expect_single_fault(path_, "dense");
        EXPECT_EQ(fault.layer, layers_[li].name);
        EXPECT_EQ(fault.item, d.name);
        EXPECT_EQ(fault.offset, d.offset);
        EXPECT_EQ(fault.bytes, d.bytes);

        StoreReader reader = open_ok(path_);
        const StoreLayerInfo& info = reader.layers()[li];
        Result<std::vector<float>> got = reader.read_dense(info, d.name);
        ASSERT_FALSE(got.ok());
        EXPECT_TRUE(got.status().is_corruption());
        EXPECT_THAT(got.status().message(),
                    HasSubstr("layer " + layers_[li].name + " dense tensor " + d.name +
                              " at offset " + std::to_string(d.offset)));
        EXPECT_THAT(got.status().message(), HasSubstr("checksum mismatch"));
        for (const StoreDenseInfo& other : info.dense) {
          if (other.name != d.name) {
            EXPECT_TRUE(reader.read_dense(info, other.name).ok()) << other.name;
          }
        }
        xor_byte(path_, f.offset, f.mask);
      }
    }
  }
}

TEST_F(StoreTest, FlippedPaddingByteIsFoundByVerify) {
  // Between the end of the first table (37 * 2304 bytes) and the next 4096 boundary.
  StoreReader pristine = open_ok(path_);
  const StoreTableInfo& t = pristine.layers()[0].table;
  const uint64_t gap = t.offset + t.bytes;
  ASSERT_NE(gap % 4096, 0u);
  xor_byte(path_, gap + 5, 0x80);
  const StoreFault fault = expect_single_fault(path_, "padding");
  EXPECT_EQ(fault.offset, gap);
  EXPECT_EQ(fault.bytes, store_align_up(gap, 4096) - gap);
  xor_byte(path_, gap + 5, 0x80);
}

TEST_F(StoreTest, ShortReadAfterOpenIsCorruptionNamingTheExpert) {
  for (bool direct : {true, false}) {
    SCOPED_TRACE(direct ? "direct_io" : "buffered");
    const std::string p = copy_store("shrinking.trove");
    StoreReader reader = open_ok(p, {.verify_checksums = true, .direct_io = direct});
    const StoreLayerInfo& l = reader.layers()[1];
    // Cut the file under the open reader, 50 bytes into record 100.
    std::filesystem::resize_file(p, l.table.offset + 100 * l.table.stride + 50);
    std::vector<uint8_t> out(2 * l.table.stride);
    const int64_t cut[] = {97, 100};  // one coalesced read; the error names the cut record
    const Status s = reader.read_records(l, cut, out);
    EXPECT_TRUE(s.is_corruption()) << s.to_string();
    EXPECT_THAT(s.message(), HasSubstr(p + ": layer L21 expert 100 at offset " +
                                       std::to_string(l.table.offset + 100 * l.table.stride) +
                                       " (192 bytes): truncated: the file ends at offset " +
                                       std::to_string(l.table.offset + 100 * l.table.stride + 50)));
    // The record before the cut still reads (its aligned extent ends past the new EOF).
    expect_records(reader, l, layers_[1], {99, 98});
  }
}

TEST_F(StoreTest, UnreadableExtentsAreErrorsNamingExpertAndErrnoAndVerifyReadsAroundThem) {
  // Bad sectors under three records of L21 (a real one is in tests/cli_eio_test.cc).
  auto faults = std::make_shared<FaultyFileOps>();
  StoreOpenOptions options;
  options.direct_io = false;
  options.file_ops = faults;
  StoreReader reader = open_ok(path_, options);
  const StoreLayerInfo& l = reader.layers()[1];
  ASSERT_EQ(l.name, "L21");
  const std::vector<int64_t> bad = {40, 41, 200};
  for (int64_t id : bad) faults->fail_offset(l.table.offset + id * l.table.stride + 10, EIO);

  Result<std::vector<StoreFault>> found = reader.verify();
  ASSERT_TRUE(found.ok()) << found.status().to_string();
  ASSERT_EQ(found->size(), bad.size());
  for (size_t i = 0; i < bad.size(); ++i) {
    const StoreFault& f = (*found)[i];
    EXPECT_EQ(f.region, "records");
    EXPECT_EQ(f.layer, "L21");
    EXPECT_EQ(f.item, "expert " + std::to_string(bad[i]));
    EXPECT_EQ(f.offset, l.table.offset + bad[i] * l.table.stride);
    EXPECT_EQ(f.error, "read failed: Input/output error (errno 5)");
    EXPECT_THAT(f.message(), HasSubstr("expert " + std::to_string(bad[i])));
  }

  // A coalesced read over a bad record names that record, not the run.
  std::vector<uint8_t> out(3 * l.table.stride);
  const int64_t ids[] = {42, 39, 41};
  const Status s = reader.read_records(l, ids, out);
  EXPECT_TRUE(s.is_io_error()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr(path_ + ": layer L21 expert 41: read of"));
  EXPECT_THAT(s.message(), HasSubstr("Input/output error"));
  // Its neighbours read and verify.
  expect_records(reader, l, layers_[1], {39, 42, 199, 201});
}

// ---- truncation, foreign files, versions ------------------------------------------------------

TEST_F(StoreTest, TruncatedFilesFailWithClearErrors) {
  const uint64_t size = std::filesystem::file_size(path_);
  const uint64_t cuts[] = {8, 100, 4095, 4096, 50000, size / 2, size - 64, size - 30, size - 1};
  for (uint64_t cut : cuts) {
    SCOPED_TRACE("cut at " + std::to_string(cut));
    const std::string p = copy_store("cut.trove");
    std::filesystem::resize_file(p, cut);
    Result<StoreReader> r = StoreReader::open(p);
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(r.status().is_corruption()) << r.status().to_string();
    EXPECT_THAT(r.status().message(), HasSubstr(p + ": truncated"));
  }
  for (uint64_t cut : {0, 7}) {
    const std::string p = copy_store("tiny.trove");
    std::filesystem::resize_file(p, cut);
    Result<StoreReader> r = StoreReader::open(p);
    ASSERT_FALSE(r.ok());
    EXPECT_THAT(r.status().message(), HasSubstr("not a trove store"));
  }
}

TEST_F(StoreTest, TrailingBytesFailOpen) {
  const std::string p = copy_store("long.trove");
  std::vector<uint8_t> bytes = read_all(p);
  bytes.insert(bytes.end(), {'g', 'a', 'r', 'b', 'a', 'g', 'e'});
  write_all(p, bytes);
  Result<StoreReader> r = StoreReader::open(p);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().is_corruption());
  EXPECT_THAT(r.status().message(), HasSubstr(p + ": has 7 trailing bytes"));
}

TEST_F(StoreTest, WrongMagicIsNotATroveStore) {
  const std::string text = dir_ + "/notes.txt";
  const std::string hello(5000, 'x');
  write_all(text,
            std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(hello.data()), hello.size()));
  Result<StoreReader> r = StoreReader::open(text);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr(text + ": not a trove store"));

  // The same store with its CR LF turned into LF by a text-mode copy.
  const std::string p = copy_store("mangled.trove");
  std::vector<uint8_t> bytes = read_all(p);
  bytes.erase(bytes.begin() + 6);
  write_all(p, bytes);
  r = StoreReader::open(p);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr(p + ": not a trove store"));

  EXPECT_TRUE(StoreReader::open(dir_ + "/absent.trove").status().is_not_found());
}

TEST_F(StoreTest, NewerMajorVersionIsNotSupported) {
  const std::string p = copy_store("v2.trove");
  rewrite_store(p, nullptr, [](StoreHeader& h) { h.version_major = 2; });
  Result<StoreReader> r = StoreReader::open(p);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kNotSupported);
  EXPECT_THAT(r.status().message(),
              HasSubstr(p + ": written by a newer trove (format 2.x); this build reads 1.x"));
}

TEST_F(StoreTest, NewerMinorVersionIsRead) {
  const std::string p = copy_store("v1_3.trove");
  rewrite_store(
      p,
      [](json& m) {
        m["version"] = {1, 3};
        m["a_field_from_1_3"] = {{"ignored", true}};
      },
      [](StoreHeader& h) { h.version_minor = 3; });
  StoreReader reader = open_ok(p);
  EXPECT_EQ(reader.version_minor(), 3);
  expect_records(reader, reader.layers()[1], layers_[1], {3, 1, 4, 1, 5});
}

TEST_F(StoreTest, UnknownFlagsAndForeignEndiannessAreNotSupported) {
  std::string p = copy_store("flags.trove");
  rewrite_store(p, nullptr, [](StoreHeader& h) { h.flags = 4; });
  Result<StoreReader> r = StoreReader::open(p);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kNotSupported);
  EXPECT_THAT(r.status().message(), HasSubstr("header flags"));

  p = copy_store("big_endian.trove");
  rewrite_store(p, nullptr, [](StoreHeader& h) { h.endian_check = 0x04030201; });
  r = StoreReader::open(p);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kNotSupported);
  EXPECT_THAT(r.status().message(), HasSubstr("big-endian"));
}

TEST_F(StoreTest, TrailerThatDisagreesWithHeaderFailsOpen) {
  const std::string p = copy_store("disagree.trove");
  std::vector<uint8_t> bytes = read_all(p);
  StoreTrailer t = decode_store_trailer(std::span<const uint8_t>(bytes).last(kStoreTrailerBytes));
  t.generation = 2;
  t.trailer_xxh3 = store_trailer_checksum(t);
  encode_store_trailer(
      t, std::span<uint8_t, kStoreTrailerBytes>(bytes.data() + bytes.size() - kStoreTrailerBytes,
                                                kStoreTrailerBytes));
  write_all(p, bytes);
  Result<StoreReader> r = StoreReader::open(p);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().is_corruption());
  EXPECT_THAT(r.status().message(),
              HasSubstr(p + ": trailer generation = 2 does not match header generation = 1"));
}

// ---- hand-made bad manifests ------------------------------------------------------------------

TEST_F(StoreTest, BadManifestFieldsAreNamed) {
  struct Case {
    const char* what;
    std::function<void(json&)> edit;
    std::string message;
    Status::Code code = Status::Code::kCorruption;
  };
  StoreReader pristine = open_ok(path_);
  const uint64_t t0 = pristine.layers()[0].table.offset;
  const std::vector<Case> cases = {
      {"stride not a multiple of 64", [](json& m) { m["layers"][1]["table"]["stride"] = 100; },
       "manifest layers[1].table.stride = 100 is not a multiple of 64"},
      {"stride below record_bytes", [](json& m) { m["layers"][1]["table"]["stride"] = 128; },
       "manifest layers[1].table.stride = 128 is smaller than record_bytes = 170"},
      {"overlapping tables", [t0](json& m) { m["layers"][1]["table"]["offset"] = t0; },
       "manifest layers[1].table (bytes [4096, 196096)) overlaps layers[0].table (bytes [4096, "
       "89344))"},
      {"table offset beyond the file",
       [](json& m) { m["layers"][0]["table"]["offset"] = uint64_t{1} << 40; },
       "manifest layers[0].table.offset = 1099511627776: bytes [1099511627776, 1099511713024) "
       "lie outside the data area"},
      {"dense offset that overflows",
       [](json& m) { m["layers"][0]["dense"][0]["offset"] = UINT64_MAX - 63; },
       "manifest layers[0].dense[0].offset = 18446744073709551552"},
      {"table offset inside the header", [](json& m) { m["layers"][0]["table"]["offset"] = 0; },
       "manifest layers[0].table.offset = 0: bytes [0, 85248) lie outside the data area"},
      {"table offset not 4096-aligned",
       [t0](json& m) { m["layers"][0]["table"]["offset"] = t0 + 64; },
       "manifest layers[0].table.offset = 4160 is not a multiple of 4096"},
      {"count 0", [](json& m) { m["layers"][0]["table"]["count"] = 0; },
       "manifest layers[0].table.count = 0 is not at least 1"},
      {"count of the wrong type", [](json& m) { m["layers"][0]["table"]["count"] = "37"; },
       "manifest layers[0].table.count = \"37\" is not an unsigned integer"},
      {"negative record_bytes", [](json& m) { m["layers"][0]["table"]["record_bytes"] = -1; },
       "manifest layers[0].table.record_bytes = -1 is not an unsigned integer"},
      {"bytes not count * stride",
       [](json& m) { m["layers"][0]["table"]["bytes"] = 37 * 2304 - 64; },
       "manifest layers[0].table.bytes = 85184 is not count * stride = 37 * 2304"},
      {"missing dtype", [](json& m) { m["layers"][1]["table"].erase("dtype"); },
       "manifest layers[1].table.dtype is missing"},
      {"checksum array of the wrong size",
       [](json& m) { m["layers"][1]["table"]["checksums"]["bytes"] = 7992; },
       "manifest layers[1].table.checksums.bytes = 7992 is not 8 * count = 8 * 1000"},
      {"dense shape that does not match bytes",
       [](json& m) {
         m["layers"][0]["dense"][1]["shape"] = {1, 2, 7, 5};
       },
       "manifest layers[0].dense[1].bytes = 224 is not 4 * (elements of shape) = 4 * 70"},
      {"dense dtype", [](json& m) { m["layers"][1]["dense"][0]["dtype"] = "f16"; },
       "manifest layers[1].dense[0].dtype = \"f16\" is not \"f32\""},
      {"duplicate layer names", [](json& m) { m["layers"][1]["name"] = "L19"; },
       "manifest layers[1].name = \"L19\" repeats an earlier layer's name"},
      {"no layers", [](json& m) { m["layers"] = json::array(); }, "manifest layers = [] is empty"},
      {"wrong format", [](json& m) { m["format"] = "gguf"; }, "manifest format = \"gguf\""},
      {"version unlike the header",
       [](json& m) {
         m["version"] = {1, 5};
       },
       "manifest version = [1,5] does not match the header's version [1, 0]"},
      {"generation unlike the header", [](json& m) { m["generation"] = 3; },
       "manifest generation = 3 does not match the header's generation 1"},
      {"missing provenance", [](json& m) { m.erase("provenance"); },
       "manifest provenance is missing"},
      {"unknown checksum algorithm", [](json& m) { m["checksum"]["algorithm"] = "crc32"; },
       "manifest checksum.algorithm = \"crc32\" is not supported", Status::Code::kNotSupported},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const std::string p = copy_store("bad_manifest.trove");
    rewrite_store(p, c.edit);
    Result<StoreReader> r = StoreReader::open(p);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), c.code) << r.status().to_string();
    EXPECT_THAT(r.status().message(), HasSubstr(p + ": " + c.message));
  }

  const std::string p = copy_store("not_json.trove");
  const std::string broken = "{\"format\": \"trove\", ";
  rewrite_store(p, nullptr, nullptr, &broken);
  Result<StoreReader> r = StoreReader::open(p);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr(p + ": manifest is not valid JSON"));
}

// ---- reader argument errors -------------------------------------------------------------------

TEST_F(StoreTest, ReadRecordsRejectsBadArguments) {
  StoreReader reader = open_ok(path_);
  const StoreLayerInfo& l = reader.layers()[0];
  std::vector<uint8_t> out(2304);
  for (int64_t bad : {int64_t{-1}, int64_t{37}, int64_t{1} << 40}) {
    const int64_t ids[] = {bad};
    const Status s = reader.read_records(l, ids, out);
    EXPECT_EQ(s.code(), Status::Code::kOutOfRange);
    EXPECT_THAT(s.message(), HasSubstr(path_ + ": layer L19 expert " + std::to_string(bad) +
                                       " is out of range (the table has 37 experts)"));
  }
  const int64_t two[] = {1, 2};
  EXPECT_TRUE(reader.read_records(l, two, out).is_invalid_argument());
  StoreLayerInfo stranger;
  stranger.name = "L20";
  const int64_t one[] = {1};
  EXPECT_THAT(reader.read_records(stranger, one, out).message(), HasSubstr("no layer named 'L20'"));
  Result<std::vector<float>> missing = reader.read_dense(l, "bias");
  EXPECT_TRUE(missing.status().is_not_found());
  EXPECT_THAT(missing.status().message(), HasSubstr("no dense tensor named 'bias'"));
  EXPECT_EQ(reader.verify_record(l, 37, out.data()).code(), Status::Code::kOutOfRange);
}

// ---- writer -----------------------------------------------------------------------------------

TEST_F(StoreTest, WriterRejectsMisuse) {
  const std::string p = dir_ + "/misuse.trove";
  Result<StoreWriter> created = StoreWriter::create(p, kProvenance);
  ASSERT_TRUE(created.ok());
  StoreWriter w = std::move(created).value();
  const StoreTableSpec good{"int8", 3, 100, 128};
  const std::vector<uint8_t> one(128, 1);
  const std::vector<float> four(4, 1.0f);

  auto expect_misuse = [&](const Status& s, const std::string& message) {
    EXPECT_TRUE(s.is_invalid_argument()) << s.to_string();
    EXPECT_THAT(s.message(), HasSubstr(message));
  };
  expect_misuse(w.finish(), "finish: the store has no layers");
  expect_misuse(w.append_records(one), "append_records: no layer is open");
  expect_misuse(w.add_dense("w", {4}, four), "add_dense: no layer is open");
  expect_misuse(w.end_layer(), "end_layer: no layer is open");
  expect_misuse(w.begin_layer("", {}, good), "the layer name is empty");
  expect_misuse(w.begin_layer("a", {}, {"int8", 0, 100, 128}), "table count is 0");
  expect_misuse(w.begin_layer("a", {}, {"int8", 3, 0, 128}), "record_bytes is 0");
  expect_misuse(w.begin_layer("a", {}, {"", 3, 100, 128}), "dtype is empty");
  expect_misuse(w.begin_layer("a", {}, {"int8", 3, 100, 96}),
                "table stride 96 is smaller than record_bytes 100");
  expect_misuse(w.begin_layer("a", {}, {"int8", 3, 100, 100}),
                "table stride 100 is not a multiple of 64");
  expect_misuse(w.begin_layer("a", {}, {"int8", uint64_t{1} << 60, 100, 128}), "too large");

  ASSERT_TRUE(w.begin_layer("a", {}, good).ok());
  expect_misuse(w.begin_layer("b", {}, good), "layer 'a' is still open");
  expect_misuse(w.append_records(std::span<const uint8_t>(one).first(100)),
                "100 bytes is not a whole number of 128-byte records");
  expect_misuse(w.add_dense("w", {2, 3}, four), "the shape holds 6 elements but 4 were given");
  expect_misuse(w.add_dense("w", {-4}, four), "negative");
  expect_misuse(w.add_dense("", {4}, four), "the tensor name is empty");
  ASSERT_TRUE(w.add_dense("w", {4}, four).ok());
  expect_misuse(w.add_dense("w", {4}, four), "layer 'a' already has a dense tensor 'w'");
  ASSERT_TRUE(w.append_records(one).ok());
  expect_misuse(w.end_layer(), "layer 'a' has 1 of its 3 records");
  expect_misuse(w.finish(), "layer 'a' is still open");
  const std::vector<uint8_t> three(3 * 128, 2);
  expect_misuse(w.append_records(three),
                "3 more records would make 4, past the table's count of 3");
  ASSERT_TRUE(w.append_records(std::span<const uint8_t>(three).first(256)).ok());
  ASSERT_TRUE(w.end_layer().ok());
  expect_misuse(w.begin_layer("a", {}, good), "a layer named 'a' already exists");
  EXPECT_FALSE(file_exists(p));

  // The rejected calls left the writer usable.
  ASSERT_TRUE(w.finish().ok());
  expect_misuse(w.finish(), "already finished");
  expect_misuse(w.begin_layer("c", {}, good), "already finished");
  StoreReader reader = open_ok(p);
  ASSERT_EQ(reader.layers().size(), 1u);
  EXPECT_EQ(reader.layers()[0].table.count, 3u);

  EXPECT_TRUE(StoreWriter::create(dir_ + "/no/such/folder/x.trove", {}).status().is_not_found());
}

TEST_F(StoreTest, UpdateLayerInfoReplacesTheOpenLayersInfo) {
  const std::string p = dir_ + "/info.trove";
  Result<StoreWriter> w = StoreWriter::create(p, kProvenance);
  ASSERT_TRUE(w.ok());
  EXPECT_THAT(w->update_layer_info({{"x", 1}}).message(), HasSubstr("no layer is open"));
  ASSERT_TRUE(w->begin_layer("a", {{"stage", "before"}}, {"int8", 1, 64, 64}).ok());
  ASSERT_TRUE(w->append_records(std::vector<uint8_t>(64, 3)).ok());
  ASSERT_TRUE(w->update_layer_info({{"stage", "after"}, {"rmse", 0.086}}).ok());
  ASSERT_TRUE(w->end_layer().ok());
  ASSERT_TRUE(w->finish().ok());
  StoreReader reader = open_ok(p);
  EXPECT_EQ(reader.layers()[0].info, json({{"stage", "after"}, {"rmse", 0.086}}));
}

// A source path from a file system whose names are not UTF-8 must not fail an hour-long pack:
// the bad byte is stored as U+FFFD (FORMAT.md, "Manifest").
TEST_F(StoreTest, NonUtf8ProvenanceAndInfoAreStoredLossily) {
  const std::string p = dir_ + "/latin1.trove";
  const std::string latin1_path = "/models/caf\xe9.safetensors";
  const std::string replaced = "/models/caf\xef\xbf\xbd.safetensors";  // U+FFFD
  Result<StoreWriter> w = StoreWriter::create(p, {{"source", latin1_path}});
  ASSERT_TRUE(w.ok()) << w.status().to_string();
  ASSERT_TRUE(
      w->begin_layer("a", {{"file", latin1_path}, {"caf\xe9", 1}}, {"int8", 1, 64, 64}).ok());
  ASSERT_TRUE(w->append_records(std::vector<uint8_t>(64, 3)).ok());
  ASSERT_TRUE(w->update_layer_info({{"file", latin1_path}, {"note", "\xe9"}}).ok());
  ASSERT_TRUE(w->end_layer().ok());
  const Status finished = w->finish();
  ASSERT_TRUE(finished.ok()) << finished.to_string();

  StoreReader reader = open_ok(p);
  EXPECT_EQ(reader.provenance(), json({{"source", replaced}}));
  EXPECT_EQ(reader.layers()[0].info, json({{"file", replaced}, {"note", "\xef\xbf\xbd"}}));
}

// `depth` nested arrays around 1: "[[...[1]...]]".
std::string nested_arrays(size_t depth) {
  return std::string(depth, '[') + "1" + std::string(depth, ']');
}

// The sample store with layers[0].info replaced by `info_text`, checksums fixed up.
void rewrite_layer0_info(const std::string& p, const std::string& info_text) {
  const std::vector<uint8_t> bytes = read_all(p);
  const StoreHeader h = decode_store_header(bytes);
  json manifest =
      json::parse(bytes.begin() + static_cast<ptrdiff_t>(h.manifest_offset),
                  bytes.begin() + static_cast<ptrdiff_t>(h.manifest_offset + h.manifest_bytes));
  const std::string placeholder = "INFO-PLACEHOLDER";
  manifest["layers"][0]["info"] = placeholder;
  std::string text = manifest.dump(1);
  const size_t at = text.find('"' + placeholder + '"');
  ASSERT_NE(at, std::string::npos);
  text.replace(at, placeholder.size() + 2, info_text);
  rewrite_store(p, nullptr, nullptr, &text);
}

// nlohmann copies values recursively: a checksum-valid manifest with 300,000 nested arrays in
// a layer's info overflowed the stack at `layer.info = *info`. The depth is checked on the
// text, before parsing. Levels: the root object, "layers", the layer object, then the info.
TEST_F(StoreTest, DeeplyNestedManifestIsRejectedBeforeParsing) {
  const std::string p = copy_store("deep.trove");
  rewrite_layer0_info(p, nested_arrays(300000));
  Result<StoreReader> r = StoreReader::open(p);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().is_corruption()) << r.status().to_string();
  EXPECT_THAT(r.status().message(), HasSubstr(p + ": manifest nesting depth 300003 exceeds 64"));

  // The boundary: 64 levels open, 65 do not. Brackets inside strings are not levels.
  rewrite_layer0_info(
      p, "{\"s\": \"" + std::string(100, '[') + "\", \"v\": " + nested_arrays(60) + "}");
  StoreReader reader = open_ok(p);
  EXPECT_EQ(reader.layers()[0].info["s"], std::string(100, '['));
  expect_records(reader, reader.layers()[0], layers_[0], {0, 36});
  rewrite_layer0_info(p, nested_arrays(62));
  r = StoreReader::open(p);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr(p + ": manifest nesting depth 65 exceeds 64"));
}

// The writer refuses what the reader would refuse, before any record is written.
TEST_F(StoreTest, WriterRefusesInfoAndProvenanceNestedBeyondWhatReadersAccept) {
  const std::string p = dir_ + "/deep_writer.trove";
  const StoreTableSpec table{"int8", 1, 64, 64};
  Result<StoreWriter> w = StoreWriter::create(p, json::parse(nested_arrays(63)));
  ASSERT_TRUE(w.ok()) << w.status().to_string();
  Status s = w->begin_layer("a", json::parse(nested_arrays(62)), table);
  EXPECT_TRUE(s.is_invalid_argument()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr("layer 'a' info nests too deeply: the manifest would be 65 "
                                     "levels deep; readers accept 64"));
  ASSERT_TRUE(w->begin_layer("a", json::parse(nested_arrays(61)), table).ok());
  ASSERT_TRUE(w->append_records(std::vector<uint8_t>(64, 1)).ok());
  EXPECT_TRUE(w->update_layer_info(json::parse(nested_arrays(62))).is_invalid_argument());
  ASSERT_TRUE(w->end_layer().ok());
  ASSERT_TRUE(w->finish().ok());
  StoreReader reader = open_ok(p);
  EXPECT_EQ(reader.layers()[0].info, json::parse(nested_arrays(61)));

  const Status deep_provenance =
      StoreWriter::create(dir_ + "/x.trove", json::parse(nested_arrays(64))).status();
  EXPECT_TRUE(deep_provenance.is_invalid_argument()) << deep_provenance.to_string();
  EXPECT_THAT(deep_provenance.message(), HasSubstr("provenance nests too deeply"));
}

TEST_F(StoreTest, AbandonedWriterLeavesPreviousFileIntact) {
  const std::vector<uint8_t> before = read_all(path_);
  {
    Result<StoreWriter> w = StoreWriter::create(path_, {{"attempt", 2}});
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE(w->begin_layer("L19", layers_[0].info, layers_[0].table).ok());
    ASSERT_TRUE(w->append_records(layers_[0].record(0)).ok());
  }  // destroyed without finish()
  EXPECT_EQ(read_all(path_), before);
  {
    Result<StoreWriter> w = StoreWriter::create(dir_ + "/fresh.trove", {});
    ASSERT_TRUE(w.ok());
  }
  EXPECT_FALSE(file_exists(dir_ + "/fresh.trove"));
  // No temporaries left beside the store.
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir_)) {
    names.push_back(e.path().filename().string());
  }
  EXPECT_EQ(names, std::vector<std::string>{"model.trove"});
  StoreReader reader = open_ok(path_);
  EXPECT_EQ(reader.provenance(), kProvenance);
}

TEST_F(StoreTest, RewritingReplacesTheWholeStore) {
  std::vector<LayerData> other = sample_layers(99);
  other.pop_back();
  ASSERT_TRUE(write_store(path_, other).ok());
  StoreReader reader = open_ok(path_);
  ASSERT_EQ(reader.layers().size(), 1u);
  expect_records(reader, reader.layers()[0], other[0], {0, 36, 17});
}

// ---- fuzz ------------------------------------------------------------------------------------

// Random damage to a small store: 1-3 bytes flipped anywhere, or the file cut anywhere. Every
// case must be caught by open() or verify(), and reading records and dense tensors of a store
// that opened must return (data or an error) without crashing; under ASan this also checks
// that no read goes out of bounds.
TEST_F(StoreTest, RandomDamageIsAlwaysDetectedAndNeverCrashes) {
  std::mt19937_64 rng(2026);
  std::vector<LayerData> small;
  small.push_back(make_layer("A", "int8", 5, 100, 128, {{"query.weight", {3, 7}}}, rng));
  small.push_back(make_layer("B", "int4", 3, 64, 64, {{"keys", {2, 2}}}, rng));
  const std::string clean = dir_ + "/small.trove";
  ASSERT_TRUE(write_store(clean, small).ok());
  const std::vector<uint8_t> image = read_all(clean);
  const std::string damaged = dir_ + "/damaged.trove";

  int caught_at_open = 0, caught_by_verify = 0;
  for (int it = 0; it < 1500; ++it) {
    std::vector<uint8_t> bytes = image;
    if (it % 10 == 9) {
      bytes.resize(rng() % bytes.size());  // truncated somewhere
    } else {
      std::vector<uint64_t> positions;
      const int flips = 1 + static_cast<int>(rng() % 3);
      while (static_cast<int>(positions.size()) < flips) {
        const uint64_t p = rng() % bytes.size();
        if (std::find(positions.begin(), positions.end(), p) == positions.end()) {
          positions.push_back(p);
        }
      }
      for (uint64_t p : positions) bytes[p] ^= static_cast<uint8_t>(1 + rng() % 255);
    }
    write_all(damaged, bytes);
    Result<StoreReader> reader = StoreReader::open(damaged);
    if (!reader.ok()) {
      ++caught_at_open;
      continue;
    }
    Result<std::vector<StoreFault>> faults = reader->verify();
    ASSERT_TRUE(faults.ok()) << faults.status().to_string();
    ASSERT_FALSE(faults->empty()) << "iteration " << it << ": damage went unnoticed";
    ++caught_by_verify;
    for (const StoreLayerInfo& layer : reader->layers()) {
      std::vector<int64_t> ids(layer.table.count);
      for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i);
      std::vector<uint8_t> out(ids.size() * layer.table.stride);
      (void)reader->read_records(layer, ids, out);
      for (const StoreDenseInfo& d : layer.dense) (void)reader->read_dense(layer, d.name);
    }
  }
  EXPECT_GT(caught_at_open, 0);
  EXPECT_GT(caught_by_verify, 0);
}

}  // namespace
}  // namespace trove
