// RecordReader (storage/record_io.h): both engines read random batches of records equal to the
// file's bytes at many queue depths and batch sizes; faults injected through FaultyFileOps
// (EIO, EAGAIN, short reads, a flipped byte, a slow disk) and a truncated file surface as the
// documented errors or are retried; the file is never written. The io_uring cases skip with a
// message where the kernel refuses io_uring.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "storage/record_io.h"
#include "storage/store.h"
#include "tests/fault_injection.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using Engine = RecordReaderOptions::Engine;

// Two layers whose strides do not divide 4096, so records straddle block boundaries: "small"
// (2304-byte stride, a PEER int4 record's size class) and "wide" (4160 bytes, each record's
// aligned extent spans two or three blocks).
constexpr uint64_t kSmallCount = 3001;
constexpr uint64_t kSmallStride = 2304;
constexpr uint64_t kWideCount = 97;
constexpr uint64_t kWideStride = 4160;

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (uint8_t& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

void write_store(const std::string& path) {
  Result<StoreWriter> w = StoreWriter::create(path, {{"source", "record_io_test"}});
  ASSERT_TRUE(w.ok()) << w.status().to_string();
  struct Layer {
    const char* name;
    uint64_t count, stride;
  };
  for (const Layer& l :
       {Layer{"small", kSmallCount, kSmallStride}, Layer{"wide", kWideCount, kWideStride}}) {
    ASSERT_TRUE(w->begin_layer(l.name, {}, {"int8", l.count, l.stride - 64, l.stride}).ok());
    const std::vector<uint8_t> records =
        random_bytes(l.count * l.stride, static_cast<uint32_t>(l.stride));
    ASSERT_TRUE(w->append_records(records).ok());
    ASSERT_TRUE(w->end_layer().ok());
  }
  const Status s = w->finish();
  ASSERT_TRUE(s.ok()) << s.to_string();
}

// The store every test reads; written once per test binary.
class StoreFile {
 public:
  static StoreFile& get() {
    static StoreFile f;  // removed at exit
    return f;
  }
  const std::string& path() const { return path_; }
  const StoreReader& store() const { return *store_; }
  const std::vector<uint8_t>& bytes() const { return bytes_; }
  const StoreLayerInfo& layer(const char* name) const { return *store_->find_layer(name); }

 private:
  StoreFile() {
    write_store(path_);
    Result<StoreReader> r = StoreReader::open(path_);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    store_ = std::make_unique<StoreReader>(std::move(r).value());
    bytes_ = testing::read_all(path_);
  }
  testing::ScratchDir dir_;
  std::string path_ = dir_.file("model.trove");
  std::unique_ptr<StoreReader> store_;
  std::vector<uint8_t> bytes_;
};

// A batch of records and the memory they are read into: one buffer, each dest at an odd
// address, filled with a marker byte so untouched dests can be recognised.
class ReadBatch {
 public:
  static constexpr uint8_t kUntouched = 0xa5;

  ReadBatch() = default;
  // Moves keep the dests valid (the buffer moves with them); copies would not.
  ReadBatch(ReadBatch&&) = default;
  ReadBatch(const ReadBatch&) = delete;
  ReadBatch& operator=(const ReadBatch&) = delete;

  void add(const StoreLayerInfo& layer, int64_t id) {
    const StoreTableInfo& t = layer.table;
    RecordRead r;
    r.id = id;
    r.offset = t.offset + static_cast<uint64_t>(id) * t.stride;
    r.bytes = static_cast<uint32_t>(t.stride);
    r.xxh3 = StoreFile::get().store().record_checksum(layer, id);
    reads_.push_back(r);
  }
  // Lays out the dests; call after the last add().
  void allocate() {
    uint64_t total = 3;
    for (const RecordRead& r : reads_) total += r.bytes + 1;
    memory_.assign(total, kUntouched);
    uint64_t at = 3;  // odd: no dest is aligned
    for (RecordRead& r : reads_) {
      r.dest = memory_.data() + at;
      at += r.bytes + 1;
    }
  }
  std::span<const RecordRead> reads() const { return reads_; }
  std::vector<RecordRead>& mutable_reads() { return reads_; }
  const RecordRead& operator[](size_t i) const { return reads_[i]; }
  size_t size() const { return reads_.size(); }

  // Whether read i's dest holds its record's bytes from the file.
  bool holds_record(size_t i) const {
    const RecordRead& r = reads_[i];
    return std::memcmp(r.dest, StoreFile::get().bytes().data() + r.offset, r.bytes) == 0;
  }
  bool untouched(size_t i) const {
    const RecordRead& r = reads_[i];
    return std::all_of(r.dest, r.dest + r.bytes, [](uint8_t b) { return b == kUntouched; });
  }
  // The bytes between dests are never written.
  bool gaps_untouched() const {
    if (memory_[0] != kUntouched || memory_[1] != kUntouched || memory_[2] != kUntouched) {
      return false;
    }
    for (const RecordRead& r : reads_) {
      if (r.dest[r.bytes] != kUntouched) return false;
    }
    return true;
  }

 private:
  std::vector<RecordRead> reads_;
  std::vector<uint8_t> memory_;
};

// `n` records drawn from both layers (mostly "small"), seeded; repeats allowed.
ReadBatch random_batch(size_t n, uint32_t seed) {
  const StoreFile& f = StoreFile::get();
  std::mt19937 rng(seed);
  ReadBatch b;
  for (size_t i = 0; i < n; ++i) {
    if (rng() % 8 == 0) {
      b.add(f.layer("wide"), static_cast<int64_t>(rng() % kWideCount));
    } else {
      b.add(f.layer("small"), static_cast<int64_t>(rng() % kSmallCount));
    }
  }
  b.allocate();
  return b;
}

ReadBatch batch_of(const char* layer, std::initializer_list<int64_t> ids) {
  ReadBatch b;
  for (int64_t id : ids) b.add(StoreFile::get().layer(layer), id);
  b.allocate();
  return b;
}

std::string engine_label(Engine e) {
  return e == Engine::kIoUring ? "IoUring" : "Pread";
}

// ---- both engines ---------------------------------------------------------------------------

class RecordReaderTest : public ::testing::TestWithParam<Engine> {
 protected:
  void SetUp() override {
    const StoreFile& f = StoreFile::get();
    ASSERT_FALSE(f.bytes().empty());
    struct stat st;
    ASSERT_EQ(::stat(f.path().c_str(), &st), 0);
    mtime_ = st.st_mtim;
  }
  void TearDown() override {
    // Whatever a test did, the file is unchanged: same bytes, never written.
    const StoreFile& f = StoreFile::get();
    EXPECT_TRUE(testing::read_all(f.path()) == f.bytes()) << "the store file changed";
    struct stat st;
    ASSERT_EQ(::stat(f.path().c_str(), &st), 0);
    EXPECT_EQ(st.st_mtim.tv_sec, mtime_.tv_sec);
    EXPECT_EQ(st.st_mtim.tv_nsec, mtime_.tv_nsec);
  }

  RecordReaderOptions options(int depth = 16) const {
    RecordReaderOptions o;
    o.engine = GetParam();
    o.queue_depth = depth;
    o.pread_threads = depth;
    return o;
  }

  // The reader; null with skip_ set when the kernel refuses io_uring.
  std::unique_ptr<RecordReader> open(RecordReaderOptions o, const std::string& path = "") {
    Result<std::unique_ptr<RecordReader>> r =
        RecordReader::open(path.empty() ? StoreFile::get().path() : path, o);
    if (!r.ok() && GetParam() == Engine::kIoUring &&
        r.status().code() == Status::Code::kNotSupported) {
      skip_ = "the kernel refuses io_uring here: " + r.status().to_string();
      return nullptr;
    }
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    if (!r.ok()) return nullptr;
    EXPECT_STREQ(r.value()->engine_name(), GetParam() == Engine::kIoUring ? "io_uring" : "pread");
    return std::move(r).value();
  }

  std::shared_ptr<FaultyFileOps> faults_ = std::make_shared<FaultyFileOps>();
  std::string skip_;

 private:
  timespec mtime_{};
};

// Opens `var`, or skips the test when the kernel refuses io_uring (returns on failure).
#define OPEN_OR_SKIP(var, ...)                           \
  std::unique_ptr<RecordReader> var = open(__VA_ARGS__); \
  if (var == nullptr) {                                  \
    if (!skip_.empty()) GTEST_SKIP() << skip_;           \
    return;                                              \
  }                                                      \
  static_assert(true)

TEST_P(RecordReaderTest, RandomBatchesEqualTheFileBytesAtEveryDepthAndBatchSize) {
  uint32_t seed = 1;
  for (int depth : {1, 4, 64}) {
    OPEN_OR_SKIP(reader, options(depth));
    EXPECT_TRUE(reader->direct_io());
    for (size_t n : {size_t{1}, size_t{1000}}) {
      ReadBatch b = random_batch(n, seed++);
      const Status s = reader->read(b.reads());
      ASSERT_TRUE(s.ok()) << s.to_string();
      for (size_t i = 0; i < b.size(); ++i) {
        ASSERT_TRUE(b.holds_record(i)) << "depth " << depth << ", read " << i;
      }
      EXPECT_TRUE(b.gaps_untouched());
    }
    const RecordReaderStats st = reader->stats();
    EXPECT_EQ(st.batches, 2u);
    EXPECT_EQ(st.reads, 1001u);
    EXPECT_LE(st.max_in_flight, static_cast<uint32_t>(depth));
    if (depth > 1) {
      EXPECT_GT(st.max_in_flight, 1u) << "no deep queue at depth " << depth;
    }
    EXPECT_EQ(st.eagain_retries + st.short_read_retries + st.checksum_failures + st.io_errors, 0u);
    EXPECT_GT(st.iops(), 0);
    EXPECT_GT(st.latency_p99_us, 0);
    EXPECT_GE(st.latency_p99_us, st.latency_p50_us);
  }
}

TEST_P(RecordReaderTest, MatchesStoreReaderReadRecords) {
  OPEN_OR_SKIP(reader, options());
  const StoreLayerInfo& layer = StoreFile::get().layer("small");
  const std::vector<int64_t> ids = {0, 3000, 17, 17, 1776, 1777, 5};
  ReadBatch b;
  for (int64_t id : ids) b.add(layer, id);
  b.allocate();
  ASSERT_TRUE(reader->read(b.reads()).ok());
  std::vector<uint8_t> expected(ids.size() * kSmallStride);
  ASSERT_TRUE(StoreFile::get().store().read_records(layer, ids, expected).ok());
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_EQ(std::memcmp(b[i].dest, expected.data() + i * kSmallStride, kSmallStride), 0) << i;
  }
}

TEST_P(RecordReaderTest, ReadsWholeAlignedExtentsWithDirectIo) {
  for (uint32_t align : {0u, 512u, 4096u}) {  // the file's own, then forced
    RecordReaderOptions o = options();
    o.direct_alignment = align;
    OPEN_OR_SKIP(reader, o);
    const uint64_t a = reader->direct_alignment();
    if (align != 0) {
      EXPECT_EQ(a, align);
      EXPECT_STREQ(reader->direct_alignment_source(), "option");
    }
    // "small" record 1 sits at table offset + 2304: bytes [2304, 4608) of the table (which
    // starts 4096-aligned): 2560 bytes at 512, two blocks at 4096.
    ReadBatch b = batch_of("small", {1});
    ASSERT_TRUE(reader->read(b.reads()).ok());
    EXPECT_TRUE(b.holds_record(0));
    const RecordReaderStats st = reader->stats();
    if (st.alignment_fallbacks > 0) continue;  // the kernel refused `a`: covered below
    const uint64_t extent = (4608 + a - 1) / a * a - 2304 / a * a;
    EXPECT_EQ(st.bytes_useful, kSmallStride);
    EXPECT_EQ(st.bytes_read, extent) << "alignment " << a;
    EXPECT_DOUBLE_EQ(st.read_amplification(), static_cast<double>(extent) / kSmallStride);
  }
}

// The file's O_DIRECT alignment is what the kernel says it is where statx knows it.
TEST_P(RecordReaderTest, DirectAlignmentIsTheFilesOwn) {
  OPEN_OR_SKIP(reader, options());
  const uint32_t a = reader->direct_alignment();
  EXPECT_GE(a, 512u);
  EXPECT_LE(a, 1u << 20);
  EXPECT_EQ(a & (a - 1), 0u) << a << " is not a power of two";
  const std::string source = reader->direct_alignment_source();
  EXPECT_THAT(source, ::testing::AnyOf("statx", "BLKSSZGET", "sysfs", "probe", "default"));
#ifdef STATX_DIOALIGN
  struct statx sx {};
  if (::statx(AT_FDCWD, StoreFile::get().path().c_str(), 0, STATX_DIOALIGN, &sx) == 0 &&
      (sx.stx_mask & STATX_DIOALIGN) != 0 && sx.stx_dio_offset_align != 0) {
    EXPECT_EQ(source, "statx");
    EXPECT_EQ(a, std::max({sx.stx_dio_offset_align, sx.stx_dio_mem_align, 512u}));
  }
#endif
}

// Records at strides that are not multiples of the alignment (and one not even of 64) from a
// 4096-aligned table start: each is read as its own aligned extent and arrives intact, and
// the bytes read are exactly those extents.
TEST_P(RecordReaderTest, OddStridesReadCorrectlyAtEachAlignment) {
  testing::ScratchDir dir;
  const std::string path = dir.file("strides.bin");
  constexpr uint64_t kTable = 12288;
  // A whole number of pages past the last record: every extent is read whole.
  const std::vector<uint8_t> bytes = random_bytes((kTable + 700 * 2368) / 4096 * 4096 + 8192, 31);
  testing::write_all(path, bytes);
  for (uint32_t align : {0u, 512u, 4096u}) {
    RecordReaderOptions o = options(8);
    o.direct_alignment = align;
    OPEN_OR_SKIP(reader, o, path);
    const uint64_t a = reader->direct_alignment();
    std::mt19937 rng(align + 1);
    for (uint32_t stride : {1152u, 2368u, 1000u, 4160u}) {
      const uint64_t count = (bytes.size() - kTable) / stride;
      std::vector<uint8_t> dest(300 * stride + 1);  // +1: each dest at an odd address
      std::vector<RecordRead> reads;
      uint64_t extents = 0;
      for (int i = 0; i < 300; ++i) {
        const uint64_t k = rng() % count;
        const uint64_t at = kTable + k * stride;
        reads.push_back({static_cast<int64_t>(k), at, stride, dest.data() + 1 + i * stride,
                         store_checksum({bytes.data() + at, stride})});
        extents += (at + stride + a - 1) / a * a - at / a * a;
      }
      const RecordReaderStats before = reader->stats();
      const Status s = reader->read(reads);
      ASSERT_TRUE(s.ok()) << s.to_string();
      for (const RecordRead& r : reads) {
        ASSERT_EQ(std::memcmp(r.dest, bytes.data() + r.offset, stride), 0)
            << "stride " << stride << ", record " << r.id << ", alignment " << a;
      }
      const RecordReaderStats after = reader->stats();
      ASSERT_EQ(after.alignment_fallbacks, 0u) << "the kernel refused " << a;
      EXPECT_EQ(after.bytes_read - before.bytes_read, extents)
          << "stride " << stride << ", alignment " << a;
    }
  }
}

// A device that wants 4096-byte alignment behind a filesystem that claimed 512: the first
// refused read switches the reader to 4096 and every record still arrives whole and verified.
TEST_P(RecordReaderTest, EinvalAtASmallerAlignmentFallsBackToThePageSize) {
  RecordReaderOptions o = options(8);
  o.direct_alignment = 512;
  o.file_ops = faults_;
  OPEN_OR_SKIP(reader, o);
  EXPECT_EQ(reader->direct_alignment(), 512u);
  faults_->refuse_unaligned(4096);
  ReadBatch b = random_batch(200, 21);
  Status s = reader->read(b.reads());
  ASSERT_TRUE(s.ok()) << s.to_string();
  for (size_t i = 0; i < b.size(); ++i) ASSERT_TRUE(b.holds_record(i)) << i;
  EXPECT_TRUE(b.gaps_untouched());
  EXPECT_EQ(reader->direct_alignment(), 4096u);
  EXPECT_STREQ(reader->direct_alignment_source(), "fallback");
  const RecordReaderStats first = reader->stats();
  EXPECT_GE(first.alignment_fallbacks, 1u);
  EXPECT_LE(first.alignment_fallbacks, 8u) << "only reads issued before the switch fall back";
  EXPECT_EQ(first.io_errors, 0u);
  // From now on every read is cut at 4096: no more refusals.
  ReadBatch again = random_batch(200, 22);
  s = reader->read(again.reads());
  ASSERT_TRUE(s.ok()) << s.to_string();
  for (size_t i = 0; i < again.size(); ++i) ASSERT_TRUE(again.holds_record(i)) << i;
  EXPECT_EQ(reader->stats().alignment_fallbacks, first.alignment_fallbacks);
}

// The fallback happens once per read: EINVAL at 4096 as well is the error it is.
TEST_P(RecordReaderTest, EinvalAtThePageSizeIsAnError) {
  RecordReaderOptions o = options(2);
  o.direct_alignment = 512;
  o.file_ops = faults_;
  OPEN_OR_SKIP(reader, o);
  ReadBatch b = batch_of("small", {77});
  faults_->fail_offset(b[0].offset, EINVAL);
  const Status s = reader->read(b.reads());
  ASSERT_TRUE(s.is_io_error()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr(": expert 77 at offset " + std::to_string(b[0].offset) +
                                     " (2304 bytes): Invalid argument"));
  EXPECT_TRUE(b.untouched(0));
  EXPECT_EQ(reader->stats().alignment_fallbacks, 1u);
  EXPECT_EQ(reader->stats().requests, 2u);
}

TEST_P(RecordReaderTest, BufferedReadsReadExactlyTheRecord) {
  RecordReaderOptions o = options();
  o.direct_io = false;
  OPEN_OR_SKIP(reader, o);
  EXPECT_FALSE(reader->direct_io());
  ReadBatch b = random_batch(300, 7);
  ASSERT_TRUE(reader->read(b.reads()).ok());
  for (size_t i = 0; i < b.size(); ++i) ASSERT_TRUE(b.holds_record(i)) << i;
  EXPECT_DOUBLE_EQ(reader->stats().read_amplification(), 1.0);
}

TEST_P(RecordReaderTest, EmptyBatchAndWaitWithoutStartAreOk) {
  OPEN_OR_SKIP(reader, options());
  EXPECT_TRUE(reader->wait().ok());
  EXPECT_TRUE(reader->read({}).ok());
  EXPECT_EQ(reader->stats().batches, 0u);
}

TEST_P(RecordReaderTest, BadRequestsAreInvalidArgumentAndStartNothing) {
  OPEN_OR_SKIP(reader, options());
  ReadBatch b = batch_of("small", {4, 5, 6});
  b.mutable_reads()[1].bytes = 0;
  Status s = reader->start(b.reads());
  EXPECT_TRUE(s.is_invalid_argument()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr("expert 5"));
  b.mutable_reads()[1].bytes = kSmallStride;
  b.mutable_reads()[2].dest = nullptr;
  s = reader->start(b.reads());
  EXPECT_TRUE(s.is_invalid_argument()) << s.to_string();
  EXPECT_TRUE(reader->wait().ok());
  EXPECT_TRUE(b.untouched(0));
  EXPECT_EQ(reader->stats().requests, 0u);
}

TEST_P(RecordReaderTest, EioIsAnErrorNamingFileOffsetAndExpert) {
  RecordReaderOptions o = options();
  o.file_ops = faults_;
  OPEN_OR_SKIP(reader, o);
  ReadBatch b = random_batch(200, 11);
  b.add(StoreFile::get().layer("small"), 1234);
  b.allocate();
  const RecordRead& bad = b[b.size() - 1];
  faults_->fail_offset(bad.offset);  // a bad sector under expert 1234's first byte
  const Status s = reader->read(b.reads());
  ASSERT_TRUE(s.is_io_error()) << s.to_string();
  EXPECT_THAT(s.message(),
              HasSubstr(StoreFile::get().path() + ": expert 1234 at offset " +
                        std::to_string(bad.offset) + " (2304 bytes): Input/output error"));
  // Every dest holds its record or was left alone; nothing was zero-filled.
  EXPECT_TRUE(b.untouched(b.size() - 1));
  for (size_t i = 0; i < b.size(); ++i) {
    EXPECT_TRUE(b.holds_record(i) || b.untouched(i)) << i;
  }
  EXPECT_TRUE(b.gaps_untouched());
  EXPECT_GE(reader->stats().io_errors, 1u);
}

TEST_P(RecordReaderTest, EioOnTheNthReadFailsTheBatchAndTheReaderStaysUsable) {
  RecordReaderOptions o = options(4);
  o.file_ops = faults_;
  OPEN_OR_SKIP(reader, o);
  faults_->fail_nth_read(5);
  ReadBatch b = random_batch(50, 12);
  const Status s = reader->read(b.reads());
  ASSERT_TRUE(s.is_io_error()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr(": expert "));
  EXPECT_THAT(s.message(), HasSubstr("Input/output error"));
  // The fault was one read: the same batch reads cleanly now.
  ReadBatch again = random_batch(50, 12);
  const Status s2 = reader->read(again.reads());
  ASSERT_TRUE(s2.ok()) << s2.to_string();
  for (size_t i = 0; i < again.size(); ++i) ASSERT_TRUE(again.holds_record(i)) << i;
}

TEST_P(RecordReaderTest, ShortReadsAreRetriedAndCounted) {
  for (bool direct : {true, false}) {
    RecordReaderOptions o = options(8);
    o.direct_io = direct;
    o.file_ops = faults_;
    OPEN_OR_SKIP(reader, o);
    faults_->short_read_every(3);
    ReadBatch b = random_batch(400, 13);
    const Status s = reader->read(b.reads());
    ASSERT_TRUE(s.ok()) << s.to_string();
    for (size_t i = 0; i < b.size(); ++i) ASSERT_TRUE(b.holds_record(i)) << i;
    EXPECT_GT(reader->stats().short_read_retries, 0u);
    EXPECT_EQ(reader->stats().reads, 400u);
  }
}

TEST_P(RecordReaderTest, ShortReadsThatNeverBringABlockAreAnError) {
  // Buffered: every retry gets half of the rest, and the record still arrives.
  {
    RecordReaderOptions o = options(2);
    o.direct_io = false;
    o.file_ops = faults_;
    OPEN_OR_SKIP(reader, o);
    faults_->short_read_every(1, /*retries_too=*/true);
    ReadBatch b = batch_of("small", {0, 1});
    const Status s = reader->read(b.reads());
    ASSERT_TRUE(s.ok()) << s.to_string();
    EXPECT_TRUE(b.holds_record(0));
    EXPECT_TRUE(b.holds_record(1));
    EXPECT_GE(reader->stats().short_read_retries, 2u * 11);  // 2304 halves to 1 in 11 steps
  }
  // O_DIRECT resumes only at block boundaries: half blocks forever are given up on.
  RecordReaderOptions o = options(2);
  o.direct_alignment = 4096;  // a block stays whole longer at 512: where halving stalls differs
  o.file_ops = faults_;
  OPEN_OR_SKIP(reader, o);
  ReadBatch b = batch_of("small", {0});
  const Status s = reader->read(b.reads());
  ASSERT_TRUE(s.is_io_error()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr(": expert 0 at offset " + std::to_string(b[0].offset) +
                                     " (2304 bytes): 9 short reads in a row"));
  EXPECT_TRUE(b.untouched(0));
}

TEST_P(RecordReaderTest, EagainIsReissuedAndCounted) {
  RecordReaderOptions o = options(8);
  o.file_ops = faults_;
  OPEN_OR_SKIP(reader, o);
  faults_->eagain_every(4);
  ReadBatch b = random_batch(300, 14);
  const Status s = reader->read(b.reads());
  ASSERT_TRUE(s.ok()) << s.to_string();
  for (size_t i = 0; i < b.size(); ++i) ASSERT_TRUE(b.holds_record(i)) << i;
  EXPECT_GE(reader->stats().eagain_retries, 300u / 4);
}

TEST_P(RecordReaderTest, EndlessEagainIsAnError) {
  RecordReaderOptions o = options(2);
  o.direct_io = false;  // page-cache reads: 1000 retries take milliseconds
  o.file_ops = faults_;
  OPEN_OR_SKIP(reader, o);
  faults_->eagain_every(1);
  ReadBatch b = batch_of("small", {42});
  const Status s = reader->read(b.reads());
  ASSERT_TRUE(s.is_io_error()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr(": expert 42 at offset " + std::to_string(b[0].offset) +
                                     " (2304 bytes): 1000 retries in a row: Resource "
                                     "temporarily unavailable"));
  EXPECT_TRUE(b.untouched(0));
}

TEST_P(RecordReaderTest, FlippedByteIsCorruptionNamingTheExpert) {
  RecordReaderOptions o = options();
  o.file_ops = faults_;
  OPEN_OR_SKIP(reader, o);
  ReadBatch b = batch_of("wide", {3, 40, 41, 96});
  faults_->flip_byte(b[1].offset + 4100);  // in expert 40's second block
  const Status s = reader->read(b.reads());
  ASSERT_TRUE(s.is_corruption()) << s.to_string();
  EXPECT_THAT(s.message(),
              HasSubstr(StoreFile::get().path() + ": expert 40 at offset " +
                        std::to_string(b[1].offset) + " (4160 bytes): checksum mismatch"));
  EXPECT_TRUE(b.untouched(1)) << "a record failing its checksum reached its dest";
  for (size_t i : {0, 2, 3}) EXPECT_TRUE(b.holds_record(i) || b.untouched(i)) << i;
  EXPECT_EQ(reader->stats().checksum_failures, 1u);
}

TEST_P(RecordReaderTest, WithoutVerifyAFlippedByteIsDeliveredUnchecked) {
  RecordReaderOptions o = options();
  o.verify = false;
  o.file_ops = faults_;
  OPEN_OR_SKIP(reader, o);
  ReadBatch b = batch_of("small", {9});
  faults_->flip_byte(b[0].offset + 7);
  ASSERT_TRUE(reader->read(b.reads()).ok());
  EXPECT_FALSE(b.holds_record(0));
  EXPECT_EQ(b[0].dest[7], static_cast<uint8_t>(~StoreFile::get().bytes()[b[0].offset + 7]));
  EXPECT_EQ(reader->stats().verify_seconds, 0);
}

TEST_P(RecordReaderTest, SlowDiskStartReturnsWhileReadsAreInFlight) {
  RecordReaderOptions o = options(4);
  o.file_ops = faults_;
  OPEN_OR_SKIP(reader, o);
  constexpr auto kDelay = std::chrono::milliseconds(60);
  faults_->delay_each_read(kDelay);
  ReadBatch b = random_batch(4, 15);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(reader->start(b.reads()).ok());
  const auto started = std::chrono::steady_clock::now() - t0;
  // The caller is free while the disk works: nothing has arrived yet.
  EXPECT_LT(started, kDelay / 4);
  EXPECT_EQ(reader->stats().reads, 0u);  // (the dests are the reader's until wait returns)
  const Status s = reader->wait();
  const auto total = std::chrono::steady_clock::now() - t0;
  ASSERT_TRUE(s.ok()) << s.to_string();
  EXPECT_GE(total, kDelay);
  for (size_t i = 0; i < b.size(); ++i) EXPECT_TRUE(b.holds_record(i)) << i;
  EXPECT_GE(reader->stats().busy_seconds, 0.06);
}

TEST_P(RecordReaderTest, DestroyingTheReaderWaitsForTheBatchInFlight) {
  RecordReaderOptions o = options(4);
  o.file_ops = faults_;
  ReadBatch b = random_batch(8, 16);
  {
    OPEN_OR_SKIP(reader, o);
    faults_->delay_each_read(std::chrono::milliseconds(2));
    ASSERT_TRUE(reader->start(b.reads()).ok());
  }
  for (size_t i = 0; i < b.size(); ++i) EXPECT_TRUE(b.holds_record(i)) << i;
}

TEST_P(RecordReaderTest, TruncatedFileIsCorruptionNamingTheExpert) {
  testing::ScratchDir dir;
  const std::string path = dir.file("cut.trove");
  std::filesystem::copy_file(StoreFile::get().path(), path);
  const StoreTableInfo& t = StoreFile::get().layer("small").table;
  // Cut 100 bytes into expert 2000 (not on a block boundary).
  const uint64_t cut = t.offset + 2000 * kSmallStride + 100;
  OPEN_OR_SKIP(reader, options(), path);
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(cut)), 0);
  for (int64_t id : {2000, 2500}) {  // straddling the cut; wholly past it
    ReadBatch b = batch_of("small", {1999, id});
    const Status s = reader->read(b.reads());
    ASSERT_TRUE(s.is_corruption()) << s.to_string();
    EXPECT_THAT(s.message(), HasSubstr(path + ": expert " + std::to_string(id) + " at offset " +
                                       std::to_string(b[1].offset) +
                                       " (2304 bytes): truncated: "
                                       "the file ends at offset " +
                                       std::to_string(cut)));
    EXPECT_TRUE(b.untouched(1));
  }
  EXPECT_GE(reader->stats().io_errors, 2u);
}

// Any file works, not only stores: a record ending at the file's end, where the aligned
// extent runs past it, and a record far larger than the bounce slots a reader starts with.
TEST_P(RecordReaderTest, RecordsAtTheEndOfTheFileAndLargeRecords) {
  testing::ScratchDir dir;
  const std::string path = dir.file("raw.bin");
  const std::vector<uint8_t> bytes = random_bytes(300001, 99);
  testing::write_all(path, bytes);
  std::vector<uint8_t> tail(1001), large(200000), one(1);
  std::vector<RecordRead> reads = {
      {1, 299000, 1001, tail.data(), store_checksum({bytes.data() + 299000, 1001})},
      {2, 4095, 200000, large.data(), store_checksum({bytes.data() + 4095, 200000})},
      {3, 300000, 1, one.data(), store_checksum({bytes.data() + 300000, 1})},
  };
  OPEN_OR_SKIP(reader, options(), path);
  const Status s = reader->read(reads);
  ASSERT_TRUE(s.ok()) << s.to_string();
  EXPECT_EQ(std::memcmp(tail.data(), bytes.data() + 299000, tail.size()), 0);
  EXPECT_EQ(std::memcmp(large.data(), bytes.data() + 4095, large.size()), 0);
  EXPECT_EQ(one[0], bytes[300000]);
  // A record past the end of the file.
  RecordRead past{4, 300001, 10, one.data(), 0};
  const Status e = reader->read({&past, 1});
  EXPECT_TRUE(e.is_corruption()) << e.to_string();
  EXPECT_THAT(e.message(), HasSubstr("expert 4 at offset 300001 (10 bytes): truncated"));
}

TEST_P(RecordReaderTest, FallsBackToBufferedReadsWhereODirectIsRefused) {
  if (!std::filesystem::is_directory("/dev/shm")) GTEST_SKIP() << "no /dev/shm (tmpfs) here";
  char templ[] = "/dev/shm/trove-record-io-XXXXXX";
  const int fd = ::mkstemp(templ);
  ASSERT_GE(fd, 0);
  ::close(fd);
  const std::string path = templ;
  std::filesystem::copy_file(StoreFile::get().path(), path,
                             std::filesystem::copy_options::overwrite_existing);
  {
    OPEN_OR_SKIP(reader, options(), path);
    if (reader->direct_io()) {
      std::filesystem::remove(path);
      GTEST_SKIP() << "/dev/shm accepts O_DIRECT here";
    }
    ReadBatch b = random_batch(100, 17);
    EXPECT_TRUE(reader->read(b.reads()).ok());
    for (size_t i = 0; i < b.size(); ++i) EXPECT_TRUE(b.holds_record(i)) << i;
  }
  std::filesystem::remove(path);
}

TEST_P(RecordReaderTest, MissingFileIsNotFound) {
  Result<std::unique_ptr<RecordReader>> r =
      RecordReader::open(StoreFile::get().path() + ".missing", options());
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().is_not_found()) << r.status().to_string();
}

INSTANTIATE_TEST_SUITE_P(Engines, RecordReaderTest,
                         ::testing::Values(Engine::kPread, Engine::kIoUring),
                         [](const auto& param_info) { return engine_label(param_info.param); });

// ---- engine choice --------------------------------------------------------------------------

class RefusesIoUring : public FileOps {
 public:
  int io_uring_setup_fault() override { return -EPERM; }
};

TEST(RecordReaderEngine, AutoFallsBackToPreadWhenTheKernelRefusesIoUring) {
  RecordReaderOptions o;
  o.file_ops = std::make_shared<RefusesIoUring>();
  Result<std::unique_ptr<RecordReader>> r = RecordReader::open(StoreFile::get().path(), o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_STREQ(r.value()->engine_name(), "pread");
  ReadBatch b = random_batch(64, 18);
  ASSERT_TRUE(r.value()->read(b.reads()).ok());
  for (size_t i = 0; i < b.size(); ++i) EXPECT_TRUE(b.holds_record(i)) << i;
}

TEST(RecordReaderEngine, ExplicitIoUringIsAClearErrorWhenRefused) {
  RecordReaderOptions o;
  o.engine = Engine::kIoUring;
  o.file_ops = std::make_shared<RefusesIoUring>();
  Result<std::unique_ptr<RecordReader>> r = RecordReader::open(StoreFile::get().path(), o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kNotSupported);
  EXPECT_THAT(r.status().message(), HasSubstr("io_uring is unavailable"));
  EXPECT_THAT(r.status().message(), HasSubstr("Operation not permitted"));
}

// submit_batch trades syscalls for how soon reads reach the device; the bytes are the same.
TEST(RecordReaderEngine, IoUringSubmitsEachReadOrGroupsOfSubmitBatch) {
  uint64_t calls_each = 0;
  for (int submit_batch : {1, 16}) {
    RecordReaderOptions o;
    o.engine = Engine::kIoUring;
    o.queue_depth = 16;
    o.submit_batch = submit_batch;
    Result<std::unique_ptr<RecordReader>> r = RecordReader::open(StoreFile::get().path(), o);
    if (!r.ok() && r.status().code() == Status::Code::kNotSupported) {
      GTEST_SKIP() << "the kernel refuses io_uring here: " << r.status().to_string();
    }
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    ReadBatch b = random_batch(500, 23);
    const Status s = r.value()->read(b.reads());
    ASSERT_TRUE(s.ok()) << s.to_string();
    for (size_t i = 0; i < b.size(); ++i) ASSERT_TRUE(b.holds_record(i)) << i;
    const RecordReaderStats st = r.value()->stats();
    if (submit_batch == 1) {
      // One io_uring_submit per read, plus the waits.
      EXPECT_GE(st.submit_calls, st.requests);
      calls_each = st.submit_calls;
    } else {
      EXPECT_LT(st.submit_calls, calls_each);
    }
  }
}

TEST(RecordReaderEngine, BadOptionsAreInvalidArgument) {
  RecordReaderOptions o;
  o.queue_depth = 0;
  EXPECT_TRUE(RecordReader::open(StoreFile::get().path(), o).status().is_invalid_argument());
  o.queue_depth = 8;
  o.pread_threads = 0;
  EXPECT_TRUE(RecordReader::open(StoreFile::get().path(), o).status().is_invalid_argument());
  o.pread_threads = 8;
  for (int submit_batch : {0, 9}) {
    o.submit_batch = submit_batch;
    const Status s = RecordReader::open(StoreFile::get().path(), o).status();
    EXPECT_TRUE(s.is_invalid_argument()) << submit_batch << ": " << s.to_string();
    EXPECT_THAT(s.message(), HasSubstr("submit_batch"));
  }
  o.submit_batch = 1;
  for (uint32_t align : {256u, 1000u, 3072u, 2u << 20}) {
    o.direct_alignment = align;
    const Status s = RecordReader::open(StoreFile::get().path(), o).status();
    EXPECT_TRUE(s.is_invalid_argument()) << align << ": " << s.to_string();
    EXPECT_THAT(s.message(), HasSubstr("direct_alignment"));
  }
}

}  // namespace
}  // namespace trove
