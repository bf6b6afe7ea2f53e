// Calibration (runtime/bench/calibrate.h): host bandwidth is a sane positive number; our reader's
// random-read IOPS on a scratch file with both engines, counted reads and sane latencies;
// fio's figures parsed from its JSON when fio is installed (skipped with a message
// otherwise); fio asked for the requests our reader makes (a fake fio shows the command);
// and bad arguments, a missing file and a missing fio are errors that say so. Each
// measurement runs for a fraction of a second. OursAgainstFio.Table, run by hand on a real
// disk, prints the comparison the calibration exists for.
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "runtime/bench/calibrate.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using ::testing::HasSubstr;
using Engine = RecordReaderOptions::Engine;

constexpr uint64_t kFileBytes = uint64_t{8} << 20;

// A scratch file of random bytes (not sparse: reads reach the disk or the page cache).
class CalibrateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::mt19937 rng(7);
    std::vector<uint8_t> bytes(kFileBytes);
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng());
    testing::write_all(path_, bytes);
  }
  testing::ScratchDir dir_;
  const std::string path_ = dir_.file("region.bin");
};

bool fio_installed() {
  return std::system("command -v fio >/dev/null 2>&1") == 0;
}

TEST(HostBandwidth, IsPositiveAndFinite) {
  Result<double> bw = measure_host_read_bandwidth(uint64_t{32} << 20, 0, 0.05);
  ASSERT_TRUE(bw.ok()) << bw.status().to_string();
  EXPECT_TRUE(std::isfinite(*bw));
  EXPECT_GT(*bw, 1e8) << "any machine streams more than 100 MB/s from memory";
  EXPECT_LT(*bw, 1e13);

  Result<double> one = measure_host_read_bandwidth(uint64_t{4} << 20, 1, 0);
  ASSERT_TRUE(one.ok()) << one.status().to_string();
  EXPECT_GT(*one, 0);
}

TEST(RecordReadBandwidth, IsPositiveFiniteAndBelowTheMachinesLimits) {
  // 4096 records of 2304 bytes (int4 at D = 2048), 8192 picks, repeats included.
  Result<double> bw = measure_host_record_read_bandwidth(2304, 4096, 8192, 0, 0.02);
  ASSERT_TRUE(bw.ok()) << bw.status().to_string();
  EXPECT_TRUE(std::isfinite(*bw));
  EXPECT_GT(*bw, 1e8);
  EXPECT_LT(*bw, 1e13);
  // One record, read once by each of more threads than picks: still a rate.
  Result<double> one = measure_host_record_read_bandwidth(64, 1, 1, 4, 0);
  ASSERT_TRUE(one.ok()) << one.status().to_string();
  EXPECT_GT(*one, 0);
}

TEST(RecordReadBandwidth, RejectsBadArgumentsNamingThem) {
  auto stride = measure_host_record_read_bandwidth(100, 16, 16, 1, 0);
  ASSERT_TRUE(stride.status().is_invalid_argument());
  EXPECT_NE(stride.status().message().find("stride 100"), std::string::npos);
  EXPECT_TRUE(measure_host_record_read_bandwidth(0, 16, 16, 1, 0).status().is_invalid_argument());
  EXPECT_TRUE(measure_host_record_read_bandwidth(64, 0, 16, 1, 0).status().is_invalid_argument());
  EXPECT_TRUE(measure_host_record_read_bandwidth(64, 16, 0, 1, 0).status().is_invalid_argument());
  EXPECT_TRUE(measure_host_record_read_bandwidth(64, 16, 16, -1, 0).status().is_invalid_argument());
  EXPECT_TRUE(
      measure_host_record_read_bandwidth(64, 16, 16, 1, NAN).status().is_invalid_argument());
  auto huge = measure_host_record_read_bandwidth(uint64_t{1} << 40, uint64_t{1} << 30, 1, 1, 0);
  ASSERT_FALSE(huge.ok());
  EXPECT_NE(huge.status().message().find("too large"), std::string::npos)
      << huge.status().to_string();
}

TEST(DiskWriteBandwidth, IsPositiveLeavesNoFileAndNamesABadFolder) {
  testing::ScratchDir dir;
  auto bw = measure_disk_write_bandwidth(dir.path(), 4 << 20);
  ASSERT_TRUE(bw.ok()) << bw.status().to_string();
  EXPECT_GT(*bw, 0.0);
  EXPECT_TRUE(std::isfinite(*bw));
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
  EXPECT_FALSE(measure_disk_write_bandwidth(dir.path(), 1000).ok());
  auto missing = measure_disk_write_bandwidth(dir.file("no/such"), 1 << 20);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("no/such"), std::string::npos);
}

TEST(HostBandwidth, RejectsBadArguments) {
  EXPECT_TRUE(measure_host_read_bandwidth(100, 0, 0.01).status().is_invalid_argument());
  EXPECT_TRUE(measure_host_read_bandwidth(1 << 20, -1, 0.01).status().is_invalid_argument());
  EXPECT_TRUE(measure_host_read_bandwidth(1 << 20, 1, NAN).status().is_invalid_argument());
}

// Host -> device by copy engine and by SM-driven gather: positive on a device; without one (or
// without CUDA) kNotSupported; bad arguments are invalid first either way.
TEST(H2dBandwidth, IsPositiveOnADeviceElseNotSupportedAndRejectsBadArguments) {
  EXPECT_EQ(measure_h2d_bandwidth(100, 0.01).status().code(), Status::Code::kInvalidArgument);
  for (uint64_t record : {uint64_t{0}, uint64_t{1} << 20}) {
    const Status s = measure_h2d_gather_bandwidth(1 << 20, record, 0.01).status();
    EXPECT_EQ(s.code(), Status::Code::kInvalidArgument) << s.to_string();
    EXPECT_NE(s.message().find("records of " + std::to_string(record) + " bytes"),
              std::string::npos)
        << s.to_string();
  }
  Result<double> copy = measure_h2d_bandwidth(16 << 20, 0.01);
  Result<double> gather = measure_h2d_gather_bandwidth(16 << 20, 1168, 0.01);
  if (!copy.ok()) {
    EXPECT_EQ(copy.status().code(), Status::Code::kNotSupported) << copy.status().to_string();
    EXPECT_EQ(gather.status().code(), Status::Code::kNotSupported) << gather.status().to_string();
    GTEST_SKIP() << "no CUDA device: " << copy.status().message();
  }
  ASSERT_TRUE(gather.ok()) << gather.status().to_string();
  EXPECT_GT(*copy, 1e8);
  EXPECT_GT(*gather, 1e8);
  EXPECT_TRUE(std::isfinite(*copy) && std::isfinite(*gather));
}

TEST_F(CalibrateTest, OurReaderCountsRandomReadsWithEitherEngine) {
  for (Engine engine : {Engine::kAuto, Engine::kPread}) {
    // Records of 2304 bytes (an int4 PEER record) at a 2304 stride, like a table's layout.
    Result<DiskCalibration> c =
        measure_disk_iops(path_, 4096, kFileBytes - 8192, 2304, 2304, 4, engine, 0.1);
    ASSERT_TRUE(c.ok()) << c.status().to_string();
    EXPECT_GT(c->reads, 0u);
    EXPECT_GT(c->iops, 0);
    EXPECT_NEAR(c->iops, static_cast<double>(c->reads) / c->seconds, 1e-6 * c->iops);
    EXPECT_NEAR(c->mb_per_s, c->iops * 2304 / 1e6, 1e-6 * c->mb_per_s);
    EXPECT_GE(c->seconds, 0.1);
    EXPECT_GT(c->latency_p50_us, 0);
    EXPECT_GE(c->latency_p99_us, c->latency_p50_us);
    EXPECT_EQ(c->queue_depth, 4);
    EXPECT_GE(c->max_in_flight, 1u);
    EXPECT_LE(c->max_in_flight, 4u);
    EXPECT_GE(c->read_amplification, 1.0);
    EXPECT_GE(c->batch_reads, 1024u);
    if (c->direct_io) {
      EXPECT_GE(c->direct_alignment, 512u);
      EXPECT_EQ(c->direct_alignment & (c->direct_alignment - 1), 0u);
      EXPECT_FALSE(c->alignment_source.empty());
      // 2304 bytes from a page boundary at a 2304 stride: 2560 bytes at 512, 4 or 8 KiB at
      // 4096 (6144 on average).
      if (c->direct_alignment == 512) {
        EXPECT_NEAR(c->read_amplification, 2560.0 / 2304, 1e-9);
      }
    } else {
      EXPECT_EQ(c->direct_alignment, 0u);
    }
    if (engine == Engine::kPread) {
      EXPECT_EQ(c->engine, "pread");
    }
    EXPECT_TRUE(c->engine == "pread" || c->engine == "io_uring") << c->engine;
  }
}

TEST_F(CalibrateTest, IoUringAtQueueDepth16ReachesTheDepth) {
  Result<DiskCalibration> c =
      measure_disk_iops(path_, 0, kFileBytes, 4096, 4096, 16, Engine::kIoUring, 0.1);
  if (!c.ok() && c.status().code() == Status::Code::kNotSupported) {
    GTEST_SKIP() << "io_uring refused here: " << c.status().to_string();
  }
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(c->engine, "io_uring");
  EXPECT_GT(c->iops, 0);
  EXPECT_GT(c->max_in_flight, 1u);
  EXPECT_LE(c->max_in_flight, 16u);
  if (c->direct_io) {
    EXPECT_DOUBLE_EQ(c->read_amplification, 1.0) << "aligned 4096-byte records";
  }
}

TEST_F(CalibrateTest, BadRegionsAndArgumentsAreInvalid) {
  auto status = [&](uint64_t off, uint64_t len, uint32_t block, uint64_t stride, int qd, double s) {
    return measure_disk_iops(path_, off, len, block, stride, qd, Engine::kPread, s).status();
  };
  Status s = status(kFileBytes - 4096, 8192, 4096, 4096, 1, 0.01);
  EXPECT_TRUE(s.is_invalid_argument()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr("past the end of the file"));
  EXPECT_THAT(s.message(), HasSubstr(path_));
  EXPECT_THAT(status(0, 1000, 4096, 4096, 1, 0.01).message(), HasSubstr("smaller than one"));
  EXPECT_TRUE(status(0, kFileBytes, 0, 4096, 1, 0.01).is_invalid_argument());
  EXPECT_TRUE(status(0, kFileBytes, 4096, 0, 1, 0.01).is_invalid_argument());
  EXPECT_TRUE(status(0, kFileBytes, 4096, 4096, 0, 0.01).is_invalid_argument());
  EXPECT_TRUE(status(0, kFileBytes, 4096, 4096, 1, 0).is_invalid_argument());
  EXPECT_TRUE(
      run_fio_randread(path_, 0, kFileBytes, 4096, 0, true, 0.1).status().is_invalid_argument());
  // Under O_DIRECT fio needs a whole aligned block inside the region.
  s = run_fio_randread(path_, 100, 5000, 2304, 1, true, 0.1).status();
  EXPECT_TRUE(s.is_invalid_argument()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr("no aligned 4096-byte block"));
}

TEST(Calibrate, AMissingFileIsNotFoundNamingThePath) {
  const std::string missing = "/nonexistent-trove-dir/store.trove";
  Status s = measure_disk_iops(missing, 0, 4096, 4096, 4096, 1, Engine::kAuto, 0.01).status();
  EXPECT_TRUE(s.is_not_found()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr(missing));
  s = run_fio_randread(missing, 0, 4096, 4096, 1, true, 0.01).status();
  EXPECT_TRUE(s.is_not_found()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr(missing));
}

TEST_F(CalibrateTest, FioRandomReadsAreParsed) {
  if (!fio_installed()) GTEST_SKIP() << "fio is not installed (apt install fio)";
  // 2304-byte records: fio reads whole 4096-byte blocks under O_DIRECT.
  Result<FioResult> f = run_fio_randread(path_, 100, kFileBytes - 100, 2304, 8, true, 0.2);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_GT(f->iops, 0);
  EXPECT_GT(f->ios, 0u);
  EXPECT_GT(f->seconds, 0);
  EXPECT_NEAR(f->iops * f->seconds, static_cast<double>(f->ios), 0.05 * f->ios + 2);
  EXPECT_NEAR(f->bw_mb_per_s, f->iops * 4096 / 1e6, 0.05 * f->bw_mb_per_s + 0.01);
  EXPECT_GT(f->clat_p50_us, 0);
  EXPECT_GE(f->clat_p99_us, f->clat_p50_us);
  EXPECT_TRUE(f->engine == "io_uring" || f->engine == "libaio" || f->engine == "psync");
  EXPECT_EQ(f->block_bytes, 4096u);
  EXPECT_EQ(f->offset, 4096u);
  EXPECT_EQ(f->size % 4096, 0u);
  EXPECT_LE(f->offset + f->size, kFileBytes);
  EXPECT_THAT(f->command_line, HasSubstr("--filename=" + path_));
  EXPECT_THAT(f->command_line, HasSubstr("--rw=randread --bs=4096 --iodepth=8"));
  EXPECT_THAT(f->command_line, HasSubstr("--ioengine=" + f->engine));
  EXPECT_THAT(f->command_line, HasSubstr("--direct=1 --offset=4096"));
  EXPECT_THAT(f->command_line, HasSubstr("--readonly"));
}

TEST_F(CalibrateTest, FioBufferedKeepsTheBlockSizeAndReadsAPathWithAColon) {
  if (!fio_installed()) GTEST_SKIP() << "fio is not installed (apt install fio)";
  const std::string colon = dir_.file("a:b.bin");  // fio splits --filename at unescaped ':'
  ASSERT_EQ(rename(path_.c_str(), colon.c_str()), 0);
  Result<FioResult> f = run_fio_randread(colon, 0, kFileBytes, 2304, 1, false, 0.1);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_GT(f->ios, 0u);
  EXPECT_GT(f->iops, 0);
  EXPECT_EQ(f->block_bytes, 2304u);
  EXPECT_THAT(f->command_line, HasSubstr("--bs=2304"));
  EXPECT_THAT(f->command_line, HasSubstr("--direct=0"));
}

// Puts only `dir` on PATH for its lifetime.
class ScopedPath {
 public:
  explicit ScopedPath(const std::string& dir) {
    const char* old = std::getenv("PATH");
    had_ = old != nullptr;
    if (had_) saved_ = old;
    setenv("PATH", dir.c_str(), 1);
  }
  ~ScopedPath() {
    if (had_) {
      setenv("PATH", saved_.c_str(), 1);
    } else {
      unsetenv("PATH");
    }
  }
  ScopedPath(const ScopedPath&) = delete;
  ScopedPath& operator=(const ScopedPath&) = delete;

 private:
  bool had_ = false;
  std::string saved_;
};

// A stand-in `fio` (a shell script) in a scratch folder: `body` runs with the arguments.
void write_fake_fio(const testing::ScratchDir& dir, const std::string& body) {
  const std::string path = dir.file("fio");
  const std::string script = "#!/bin/sh\n" + body;
  testing::write_all(path, std::vector<uint8_t>(script.begin(), script.end()));
  ASSERT_EQ(chmod(path.c_str(), 0755), 0);
}

constexpr const char* kFakeReport =
    R"({"fio version": "fake", "jobs": [{"jobname": "trove", "error": 0, "read": {)"
    R"("iops": 1234.5, "bw_bytes": 5056512, "total_ios": 617, "runtime": 500, "clat_ns": {)"
    R"("percentile": {"50.000000": 80000, "99.000000": 250000}}}}]})";

// With the records' stride and our reader's alignment, fio is asked for the requests our reader
// makes: the aligned extents' sizes in their proportions, at offsets aligned as theirs.
TEST_F(CalibrateTest, FioReadsTheExtentsOurReaderReads) {
  testing::ScratchDir bin;
  ASSERT_NO_FATAL_FAILURE(write_fake_fio(bin, std::string("echo '") + kFakeReport + "'\n"));
  ScopedPath only(bin.path());
  struct Case {
    uint32_t block;
    uint64_t stride;
    uint32_t alignment;
    const char* requests;  // what the command line must say
    uint32_t block_bytes;
    const char* block_split;
  };
  for (const Case& c : {
           // 1152-byte records straddle a page boundary 8 times in 32 at 4096.
           Case{1152, 1152, 4096, "--bssplit=4096/75:8192/25 --iodepth=4", 4096, "4096/75:8192/25"},
           // At 512 every one is three sectors, at 512-aligned offsets.
           Case{1152, 1152, 512, "--bs=1536 --blockalign=512 --iodepth=4", 1536, ""},
           // 2368 at 4096: 28 of every 64 records fit one page (43.75%, rounded up).
           Case{2368, 2368, 4096, "--bssplit=4096/44:8192/56 --iodepth=4", 4096, "4096/44:8192/56"},
           Case{2368, 2368, 512, "--bssplit=2560/50:3072/50 --blockalign=512 --iodepth=4", 2560,
                "2560/50:3072/50"},
           // Whole pages: the same command at any alignment.
           Case{4096, 4096, 512, "--bs=4096 --iodepth=4", 4096, ""},
           // Every other page: 4096-byte reads at 8192-aligned offsets.
           Case{4096, 8192, 4096, "--bs=4096 --blockalign=8192 --iodepth=4", 4096, ""},
       }) {
    FioOptions o;
    o.alignment = c.alignment;
    o.record_stride = c.stride;
    Result<FioResult> f = run_fio_randread(path_, 4096, kFileBytes - 8192, c.block, 4, o, 0.5);
    ASSERT_TRUE(f.ok()) << f.status().to_string();
    EXPECT_THAT(f->command_line, HasSubstr(std::string("--rw=randread ") + c.requests))
        << c.block << " at " << c.stride << ", alignment " << c.alignment;
    EXPECT_EQ(f->block_bytes, c.block_bytes);
    EXPECT_EQ(f->block_split, c.block_split);
    EXPECT_THAT(f->command_line, HasSubstr("--offset=4096 "));
  }
  FioOptions bad;
  bad.alignment = 1000;
  const Status s = run_fio_randread(path_, 0, kFileBytes, 4096, 4, bad, 0.1).status();
  EXPECT_TRUE(s.is_invalid_argument()) << s.to_string();
}

TEST_F(CalibrateTest, FioReadsAMixOfBlocksAtSmallAlignment) {
  if (!fio_installed()) GTEST_SKIP() << "fio is not installed (apt install fio)";
  // fio takes --bssplit with --blockalign (which turns off its random map, as it says).
  FioOptions o;
  o.alignment = 512;
  o.record_stride = 2368;
  Result<FioResult> f = run_fio_randread(path_, 4096, kFileBytes - 8192, 2368, 4, o, 0.2);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_GT(f->ios, 0u) << f->command_line;
  EXPECT_EQ(f->block_split, "2560/50:3072/50");
  EXPECT_THAT(f->command_line, HasSubstr("--blockalign=512"));
}

TEST_F(CalibrateTest, NoFioOnPathIsNotFoundSayingHowToInstallIt) {
  testing::ScratchDir empty;
  ScopedPath only(empty.path());
  const Status s = run_fio_randread(path_, 0, kFileBytes, 4096, 1, true, 0.1).status();
  EXPECT_TRUE(s.is_not_found()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr("fio not found on PATH"));
  EXPECT_THAT(s.message(), HasSubstr("apt install fio"));
}

TEST_F(CalibrateTest, FioFallsBackToTheNextEngineWhenOneIsRejected) {
  testing::ScratchDir bin;
  ASSERT_NO_FATAL_FAILURE(write_fake_fio(bin, std::string(R"(
case "$*" in
  *--ioengine=io_uring*) echo "fio: engine io_uring not loadable" >&2; exit 1 ;;
esac
echo "note: a line before the report"
echo ')") + kFakeReport + "'\n"));
  ScopedPath only(bin.path());
  Result<FioResult> f = run_fio_randread(path_, 0, kFileBytes, 4096, 32, true, 0.5);
  ASSERT_TRUE(f.ok()) << f.status().to_string();
  EXPECT_EQ(f->engine, "libaio");
  EXPECT_DOUBLE_EQ(f->iops, 1234.5);
  EXPECT_DOUBLE_EQ(f->bw_mb_per_s, 5.056512);
  EXPECT_EQ(f->ios, 617u);
  EXPECT_DOUBLE_EQ(f->seconds, 0.5);
  EXPECT_DOUBLE_EQ(f->clat_p50_us, 80);
  EXPECT_DOUBLE_EQ(f->clat_p99_us, 250);
  EXPECT_EQ(f->command_line,
            bin.file("fio") + " --name=trove --filename=" + path_ +
                " --readonly --rw=randread --bs=4096 --iodepth=32 --ioengine=libaio --direct=1"
                " --offset=0 --size=8388608 --time_based --runtime=500ms"
                " --output-format=json --numjobs=1");
}

TEST_F(CalibrateTest, FioFailingWithEveryEngineIsAnIoErrorQuotingItsStderr) {
  testing::ScratchDir bin;
  ASSERT_NO_FATAL_FAILURE(write_fake_fio(bin, "echo \"fio: failed with $7\" >&2; exit 1\n"));
  ScopedPath only(bin.path());
  const Status s = run_fio_randread(path_, 0, kFileBytes, 4096, 1, true, 0.1).status();
  EXPECT_TRUE(s.is_io_error()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr("--ioengine=io_uring --direct=1"));
  EXPECT_THAT(s.message(), HasSubstr("--ioengine=psync"));
  EXPECT_THAT(s.message(), HasSubstr("exited with 1: fio: failed with --ioengine=psync"));
}

TEST_F(CalibrateTest, FioOutputThatIsNotItsReportIsAnIoError) {
  testing::ScratchDir bin;
  ASSERT_NO_FATAL_FAILURE(write_fake_fio(bin, "echo '{\"jobs\": [{\"error\": 0}]}'\n"));
  ScopedPath only(bin.path());
  const Status s = run_fio_randread(path_, 0, kFileBytes, 4096, 1, true, 0.1).status();
  EXPECT_TRUE(s.is_io_error()) << s.to_string();
  EXPECT_THAT(s.message(), HasSubstr("fio's JSON has no jobs[0].read"));
  EXPECT_THAT(s.message(), HasSubstr("--ioengine=io_uring"));
}

// Not a unit test: ours against fio on a real disk at equal requests and queue depths, as a
// table of medians over repeats (ours and fio alternate, so a busy neighbour hurts both).
// Runs only when TROVE_CALIBRATE_FILE names a large file on the disk to measure, e.g.
//
//   fio --name=fill --filename=/var/tmp/cal.bin --rw=write --bs=1M --size=4G --direct=1
//   TROVE_CALIBRATE_FILE=/var/tmp/cal.bin TROVE_CALIBRATE_SECONDS=3 TROVE_CALIBRATE_REPEATS=3
//       build/tests/calibrate_test --gtest_filter='OursAgainstFio.*'    (one line)
TEST(OursAgainstFio, Table) {
  const char* file = std::getenv("TROVE_CALIBRATE_FILE");
  if (file == nullptr) GTEST_SKIP() << "set TROVE_CALIBRATE_FILE to a large file on the disk";
  if (!fio_installed()) GTEST_SKIP() << "fio is not installed (apt install fio)";
  auto env = [](const char* name, double fallback) {
    const char* v = std::getenv(name);
    return v != nullptr ? std::atof(v) : fallback;
  };
  const double secs = env("TROVE_CALIBRATE_SECONDS", 3);
  const int repeats = static_cast<int>(env("TROVE_CALIBRATE_REPEATS", 3));
  // Comma-separated lists narrow the table.
  auto list = [](const char* name, const char* fallback) {
    const char* v = std::getenv(name);
    std::vector<std::string> items;
    std::string item;
    for (const char* c = v != nullptr ? v : fallback;; ++c) {
      if (*c == ',' || *c == '\0') {
        items.push_back(item);
        item.clear();
        if (*c == '\0') break;
      } else {
        item += *c;
      }
    }
    return items;
  };
  struct stat st;
  ASSERT_EQ(::stat(file, &st), 0) << file;
  const uint64_t region = static_cast<uint64_t>(st.st_size) / 4096 * 4096;
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::string last_fio_command;
  std::printf("%6s %6s %3s %-8s %9s %9s %6s %5s %5s %6s %6s  %s\n", "block", "stride", "qd",
              "engine", "ours", "fio", "ratio", "align", "ampl", "meanqd", "p50us", "fio blocks");
  for (const std::string& block_item : list("TROVE_CALIBRATE_BLOCKS", "4096,1152")) {
    const auto block = static_cast<uint32_t>(std::stoul(block_item));
    for (const std::string& qd_item : list("TROVE_CALIBRATE_DEPTHS", "1,16,64")) {
      const int qd = std::stoi(qd_item);
      for (const std::string& engine_name : list("TROVE_CALIBRATE_ENGINES", "io_uring,pread")) {
        const Engine engine = engine_name == "pread" ? Engine::kPread : Engine::kIoUring;
        std::vector<double> ours_iops, fio_iops, ratios;
        DiskCalibration ours;
        FioResult fio;
        for (int rep = 0; rep < repeats; ++rep) {
          Result<DiskCalibration> o =
              measure_disk_iops(file, 0, region, block, block, qd, engine, secs);
          ASSERT_TRUE(o.ok()) << o.status().to_string();
          FioOptions fo;
          fo.alignment = std::max(o->direct_alignment, 512u);
          fo.record_stride = block;
          Result<FioResult> f = run_fio_randread(file, 0, region, block, qd, fo, secs);
          ASSERT_TRUE(f.ok()) << f.status().to_string();
          ours_iops.push_back(o->iops);
          fio_iops.push_back(f->iops);
          ratios.push_back(o->iops / f->iops);
          ours = *o;
          fio = *f;
        }
        std::printf("%6u %6u %3d %-8s %9.0f %9.0f %6.3f %5u %5.2f %6.1f %6.0f  %s\n", block, block,
                    qd, ours.engine.c_str(), median(ours_iops), median(fio_iops), median(ratios),
                    ours.direct_alignment, ours.read_amplification, ours.mean_in_flight,
                    ours.latency_p50_us,
                    fio.block_split.empty() ? std::to_string(fio.block_bytes).c_str()
                                            : fio.block_split.c_str());
        std::fflush(stdout);
        last_fio_command = fio.command_line;
      }
    }
    std::printf("  fio: %s\n", last_fio_command.c_str());
  }
}

}  // namespace
}  // namespace trove
