// trove export / import (storage/archive.h): a store round-trips byte for byte, the archive is a
// plain zstd stream, per-dtype ratios add up, and damaged, truncated, foreign or mismatched
// archives and damaged stores are refused with nothing at the destination changed.
#include "storage/archive.h"

#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <zstd.h>

#include "storage/file.h"
#include "storage/store.h"

namespace trove {
namespace {

using ::testing::HasSubstr;

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

// Records whose bytes look like their dtype's: uniform nibbles for int4 (incompressible but for
// the stride's zero padding), bf16 halves of gaussian floats (the exponent byte compresses).
std::vector<uint8_t> make_records(const std::string& dtype, uint64_t count, uint64_t record_bytes,
                                  uint64_t stride, std::mt19937_64& rng) {
  std::vector<uint8_t> r(count * stride, 0);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (uint64_t i = 0; i < count; ++i) {
    uint8_t* rec = r.data() + i * stride;
    if (dtype == "bf16") {
      for (uint64_t b = 0; b + 1 < record_bytes; b += 2) {
        const float x = normal(rng);
        uint32_t bits;
        std::memcpy(&bits, &x, 4);
        rec[b] = static_cast<uint8_t>(bits >> 16);
        rec[b + 1] = static_cast<uint8_t>(bits >> 24);
      }
    } else {
      for (uint64_t b = 0; b < record_bytes; ++b) rec[b] = static_cast<uint8_t>(rng());
    }
  }
  return r;
}

class ArchiveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/trove_archive_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    store_ = dir_ + "/model.trove";
    archive_ = dir_ + "/model.trove.zst";
    std::mt19937_64 rng(5);
    Result<StoreWriter> w = StoreWriter::create(store_, {{"source", "test"}});
    ASSERT_TRUE(w.ok()) << w.status().to_string();
    struct Spec {
      const char* name;
      const char* dtype;
      uint64_t count, record_bytes, stride;
    };
    for (const Spec& s :
         {Spec{"L19", "int4", 333, 1100, 1152}, Spec{"L21", "bf16", 257, 768, 768}}) {
      ASSERT_TRUE(
          w->begin_layer(s.name, {{"dtype", s.dtype}}, {s.dtype, s.count, s.record_bytes, s.stride})
              .ok());
      const std::vector<uint8_t> records =
          make_records(s.dtype, s.count, s.record_bytes, s.stride, rng);
      ASSERT_TRUE(w->append_records(records).ok());
      std::vector<float> q(48 * 7);
      for (float& x : q) x = static_cast<float>(rng() % 1000) / 999.0f;
      ASSERT_TRUE(w->add_dense("query.weight", {48, 7}, q).ok());
      ASSERT_TRUE(w->end_layer().ok());
    }
    ASSERT_TRUE(w->finish().ok());
    store_bytes_ = read_all(store_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // The files in dir_ other than the ones a test names.
  std::vector<std::string> files() const {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(dir_)) {
      names.push_back(e.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }

  std::string dir_, store_, archive_;
  std::vector<uint8_t> store_bytes_;
};

TEST_F(ArchiveTest, RoundTripIsByteIdenticalAndPlainZstdDecodesIt) {
  for (int threads : {1, 2}) {
    SCOPED_TRACE(threads);
    ExportOptions options;
    options.threads = threads;
    options.overwrite = true;
    uint64_t last_progress = 0;
    options.progress = [&](uint64_t done, uint64_t total) {
      EXPECT_GE(done, last_progress);
      EXPECT_EQ(total, store_bytes_.size());
      last_progress = done;
    };
    Result<ExportReport> report = export_store(store_, archive_, options);
    ASSERT_TRUE(report.ok()) << report.status().to_string();
    EXPECT_EQ(last_progress, store_bytes_.size());
    EXPECT_EQ(report->store_bytes, store_bytes_.size());
    EXPECT_EQ(report->archive_bytes, std::filesystem::file_size(archive_));
    EXPECT_TRUE(report->verified);

    // Regions tile the store; each record table is its own frame.
    uint64_t at = 0, compressed = 0;
    int tables = 0;
    for (const ArchiveRegion& r : report->regions) {
      EXPECT_EQ(r.offset, at);
      at += r.bytes;
      compressed += r.compressed_bytes;
      EXPECT_GT(r.compressed_bytes, 0u);
      tables += r.kind == "records";
    }
    EXPECT_EQ(at, store_bytes_.size());
    EXPECT_EQ(tables, 2);
    EXPECT_LT(compressed, report->archive_bytes);  // plus the description frame

    // bf16 compresses (sign+exponent byte), int4 nibbles barely (only the stride padding).
    const nlohmann::json by = archive_ratios_json(report->regions);
    EXPECT_LT(by["bf16"]["ratio"].get<double>(), 0.9);
    EXPECT_GT(by["int4"]["ratio"].get<double>(), 0.9);
    EXPECT_LT(by["int4"]["ratio"].get<double>(), 1.0);

    // Any zstd decoder gives the store back (the description is a skippable frame).
    const std::vector<uint8_t> archive = read_all(archive_);
    std::vector<uint8_t> plain(store_bytes_.size() + 1);
    const size_t n = ZSTD_decompress(plain.data(), plain.size(), archive.data(), archive.size());
    ASSERT_FALSE(ZSTD_isError(n)) << ZSTD_getErrorName(n);
    plain.resize(n);
    EXPECT_TRUE(plain == store_bytes_);

    const std::string restored = dir_ + "/restored.trove";
    ImportOptions import_options;
    import_options.overwrite = true;
    Result<ImportReport> imported = import_store(archive_, restored, import_options);
    ASSERT_TRUE(imported.ok()) << imported.status().to_string();
    EXPECT_EQ(imported->store_bytes, store_bytes_.size());
    EXPECT_TRUE(read_all(restored) == store_bytes_);
  }
  // No temporaries left behind.
  EXPECT_EQ(files(),
            (std::vector<std::string>{"model.trove", "model.trove.zst", "restored.trove"}));
}

TEST_F(ArchiveTest, ExportRefusesADamagedStoreAndWritesNothing) {
  uint64_t offset = 0;
  {
    Result<StoreReader> reader = StoreReader::open(store_);
    ASSERT_TRUE(reader.ok());
    const StoreLayerInfo& l = reader->layers()[1];
    offset = l.table.offset + 100 * l.table.stride + 17;
  }
  std::vector<uint8_t> bytes = store_bytes_;
  bytes[offset] ^= 0x40;
  write_all(store_, bytes);

  Result<ExportReport> report = export_store(store_, archive_);
  ASSERT_FALSE(report.ok());
  EXPECT_TRUE(report.status().is_corruption()) << report.status().to_string();
  EXPECT_THAT(report.status().message(), HasSubstr("L21"));
  EXPECT_THAT(report.status().message(), HasSubstr("expert 100"));
  EXPECT_FALSE(file_exists(archive_));

  // Without verification it exports what is there (a forensic copy).
  ExportOptions no_verify;
  no_verify.verify = false;
  EXPECT_TRUE(export_store(store_, archive_, no_verify).ok());
}

TEST_F(ArchiveTest, ExportRefusesBadOptionsAndAnExistingArchive) {
  ExportOptions o;
  o.level = 20;
  EXPECT_THAT(export_store(store_, archive_, o).status().message(), HasSubstr("level 20"));
  o.level = 3;
  o.threads = 0;
  EXPECT_THAT(export_store(store_, archive_, o).status().message(), HasSubstr("threads 0"));
  EXPECT_TRUE(export_store(dir_ + "/missing.trove", archive_).status().is_not_found());
  ASSERT_TRUE(export_store(store_, archive_).ok());
  const std::vector<uint8_t> first = read_all(archive_);
  Result<ExportReport> again = export_store(store_, archive_);
  EXPECT_THAT(again.status().message(), HasSubstr("already exists"));
  EXPECT_TRUE(read_all(archive_) == first);
}

TEST_F(ArchiveTest, TruncatedAndDamagedArchivesNeverTouchTheDestination) {
  ASSERT_TRUE(export_store(store_, archive_).ok());
  const std::vector<uint8_t> archive = read_all(archive_);
  const std::string dest = dir_ + "/dest.trove";
  const std::vector<uint8_t> old = {'o', 'l', 'd'};
  write_all(dest, old);
  ImportOptions overwrite;
  overwrite.overwrite = true;

  std::mt19937_64 rng(3);
  std::vector<size_t> cuts = {
      0, 3, 8, 40, archive.size() / 3, archive.size() / 2, archive.size() - 1};
  for (size_t cut : cuts) {
    SCOPED_TRACE("cut at " + std::to_string(cut));
    write_all(dir_ + "/cut.zst", {archive.data(), cut});
    Result<ImportReport> r = import_store(dir_ + "/cut.zst", dest, overwrite);
    ASSERT_FALSE(r.ok());
    EXPECT_THAT(r.status().message(), HasSubstr("cut.zst"));
    EXPECT_TRUE(read_all(dest) == old);
  }
  // Flipped bytes past the description: zstd's checks or the store's checksums catch each.
  uint32_t description_bytes = 0;
  std::memcpy(&description_bytes, archive.data() + 4, 4);
  const size_t body = 8 + description_bytes;
  for (int trial = 0; trial < 12; ++trial) {
    std::vector<uint8_t> bad = archive;
    const size_t at = body + rng() % (bad.size() - body);
    bad[at] ^= static_cast<uint8_t>(1u << (rng() % 8));
    SCOPED_TRACE("flip at " + std::to_string(at));
    write_all(dir_ + "/bad.zst", bad);
    Result<ImportReport> r = import_store(dir_ + "/bad.zst", dest, overwrite);
    ASSERT_FALSE(r.ok());
    EXPECT_THAT(r.status().message(), HasSubstr("bad.zst"));
    EXPECT_TRUE(read_all(dest) == old);
  }
  std::vector<std::string> left = files();
  EXPECT_EQ(left, (std::vector<std::string>{"bad.zst", "cut.zst", "dest.trove", "model.trove",
                                            "model.trove.zst"}));
}

TEST_F(ArchiveTest, ImportRefusesForeignArchivesAndMismatchedDescriptions) {
  // A plain zstd of the store (no description) is not an export.
  std::vector<uint8_t> plain(ZSTD_compressBound(store_bytes_.size()));
  plain.resize(
      ZSTD_compress(plain.data(), plain.size(), store_bytes_.data(), store_bytes_.size(), 3));
  write_all(dir_ + "/plain.zst", plain);
  Result<ImportReport> r = import_store(dir_ + "/plain.zst", dir_ + "/a.trove");
  EXPECT_THAT(r.status().message(), HasSubstr("not a trove export"));

  // A description naming another generation: the bytes restore but do not match it.
  ASSERT_TRUE(export_store(store_, archive_).ok());
  std::vector<uint8_t> archive = read_all(archive_);
  const std::string text(archive.begin() + 8, archive.end());
  const size_t g = text.find("\"generation\":1");
  ASSERT_NE(g, std::string::npos);
  archive[8 + g + 13] = '7';
  write_all(dir_ + "/gen.zst", archive);
  r = import_store(dir_ + "/gen.zst", dir_ + "/b.trove");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("not the generation"));
  EXPECT_FALSE(file_exists(dir_ + "/b.trove"));

  // An existing store is replaced only when asked.
  r = import_store(archive_, store_);
  EXPECT_THAT(r.status().message(), HasSubstr("already exists"));
}

}  // namespace
}  // namespace trove
