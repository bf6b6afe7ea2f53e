// The disk tier's record reads (storage/record_io.h): random 2304-byte records (an int4 PEER
// record's size class, D = 2048) from a 1 GiB file with O_DIRECT and verification on,
// io_uring against the pread pool at queue depths 1, 16 and 64. O_DIRECT bypasses the page
// cache, so these are device figures; the buffered (direct:0) runs read the page cache once the
// file sits there and show the engines' own cost. Compare with the raw device limit from fio at the
// same depth and the same requests. With O_DIRECT a 2304-byte record at a multiple of 2304 is
// read as its extent aligned to the file's direct-I/O alignment (the "alignment" counter): at
// 512 always 2560 bytes (amplification 1.11), at 4096 one 4 KiB block or two, half the time
// each (6144 / 2304 = 2.67). runtime/bench/calibrate.h's run_fio_randread with
// FioOptions{.alignment, .record_stride = 2304} builds the matching fio command; by hand:
//
//   fio --name=r --filename=$FILE --rw=randread --bs=2560 --blockalign=512 --direct=1
//       --ioengine=io_uring --iodepth=16 --runtime=5 --time_based        # alignment 512
//   fio ... --bssplit=4k/50:8k/50 ...                                      # alignment 4096
//
//   record_io_bench                            # 1 GiB temporary file, removed at exit
//   TROVE_BENCH_FILE=/nvme/x.bin record_io_bench   # kept and reused (for fio too)
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "storage/file.h"
#include "storage/record_io.h"
#include "storage/store.h"

namespace trove {
namespace {

constexpr uint64_t kFileBytes = uint64_t{1} << 30;
constexpr uint32_t kRecordBytes = 2304;
constexpr uint64_t kRecords = kFileBytes / kRecordBytes;
constexpr size_t kBatch = 2048;

// The file and every record's XXH3-64. Created once per process (or reused from
// TROVE_BENCH_FILE when it already has the right size).
class RecordFile {
 public:
  static RecordFile& get() {
    static RecordFile f;
    return f;
  }
  const std::string& path() const { return path_; }
  uint64_t checksum(uint64_t record) const { return checksums_[record]; }

  ~RecordFile() {
    if (!keep_) std::filesystem::remove(path_);
  }

 private:
  RecordFile() {
    if (const char* env = std::getenv("TROVE_BENCH_FILE")) {
      path_ = env;
      keep_ = true;
    } else {
      std::string templ =
          std::filesystem::temp_directory_path().string() + "/trove-record-io-bench-XXXXXX";
      const int fd = ::mkstemp(templ.data());
      if (fd < 0) std::abort();
      ::close(fd);
      path_ = templ;
    }
    std::error_code ec;
    if (std::filesystem::file_size(path_, ec) != kFileBytes) write_random();
    Result<MappedFile> map = MappedFile::open(path_);
    if (!map.ok()) {
      std::fprintf(stderr, "%s\n", map.status().to_string().c_str());
      std::abort();
    }
    checksums_.resize(kRecords);
    for (uint64_t i = 0; i < kRecords; ++i) {
      checksums_[i] = store_checksum(map->bytes().subspan(i * kRecordBytes, kRecordBytes));
    }
  }

  void write_random() {
    std::FILE* f = std::fopen(path_.c_str(), "wb");
    if (f == nullptr) std::abort();
    std::mt19937_64 rng(7);
    std::vector<uint64_t> chunk((size_t{16} << 20) / 8);
    for (uint64_t done = 0; done < kFileBytes; done += chunk.size() * 8) {
      for (uint64_t& x : chunk) x = rng();
      if (std::fwrite(chunk.data(), 8, chunk.size(), f) != chunk.size()) std::abort();
    }
    if (std::fflush(f) != 0 || ::fsync(::fileno(f)) != 0 || std::fclose(f) != 0) std::abort();
  }

  std::string path_;
  bool keep_ = false;
  std::vector<uint64_t> checksums_;
};

// User + system CPU seconds of the whole process (every thread).
double process_cpu_seconds() {
  rusage u;
  ::getrusage(RUSAGE_SELF, &u);
  auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec * 1e-6; };
  return sec(u.ru_utime) + sec(u.ru_stime);
}

// Args: engine (0 pread, 1 io_uring), queue depth (io_uring SQ depth or pread threads),
// O_DIRECT (0: buffered reads, served from the page cache once the file is cached there).
void BM_RandomRecordReads(benchmark::State& state) {
  const RecordFile& file = RecordFile::get();
  RecordReaderOptions options;
  options.engine = state.range(0) == 1 ? RecordReaderOptions::Engine::kIoUring
                                       : RecordReaderOptions::Engine::kPread;
  options.queue_depth = static_cast<int>(state.range(1));
  options.pread_threads = static_cast<int>(state.range(1));
  options.direct_io = state.range(2) == 1;
  Result<std::unique_ptr<RecordReader>> opened = RecordReader::open(file.path(), options);
  if (!opened.ok()) {
    state.SkipWithError(opened.status().to_string().c_str());
    return;
  }
  RecordReader& reader = **opened;

  // Batches of random records, drawn anew per iteration from a pool of 16 batches.
  std::vector<uint8_t> dest(kBatch * kRecordBytes);
  std::vector<std::vector<RecordRead>> batches(16);
  std::mt19937_64 rng(1);
  for (std::vector<RecordRead>& batch : batches) {
    for (size_t i = 0; i < kBatch; ++i) {
      const uint64_t record = rng() % kRecords;
      batch.push_back({static_cast<int64_t>(record), record * kRecordBytes, kRecordBytes,
                       dest.data() + i * kRecordBytes, file.checksum(record)});
    }
  }
  size_t next = 0;
  const double cpu0 = process_cpu_seconds();
  for (auto _ : state) {
    const Status s = reader.read(batches[next++ % batches.size()]);
    if (!s.ok()) {
      state.SkipWithError(s.to_string().c_str());
      return;
    }
  }
  const double cpu = process_cpu_seconds() - cpu0;
  const RecordReaderStats st = reader.stats();
  state.SetLabel(reader.engine_name());
  state.SetItemsProcessed(static_cast<int64_t>(st.reads));
  state.SetBytesProcessed(static_cast<int64_t>(st.bytes_useful));
  state.counters["iops"] = st.iops();
  state.counters["mean_qd"] = st.mean_in_flight;
  state.counters["p50_us"] = st.latency_p50_us;
  state.counters["p99_us"] = st.latency_p99_us;
  state.counters["amplification"] = st.read_amplification();
  state.counters["alignment"] = reader.direct_alignment();
  state.counters["cpu_us_per_read"] = st.reads > 0 ? 1e6 * cpu / static_cast<double>(st.reads) : 0;
  state.counters["verify_pct"] =
      st.busy_seconds > 0 ? 100 * st.verify_seconds / st.busy_seconds : 0;
}
BENCHMARK(BM_RandomRecordReads)
    ->ArgNames({"io_uring", "qd", "direct"})
    ->ArgsProduct({{1, 0}, {1, 16, 64}, {1}})
    ->ArgsProduct({{1, 0}, {16}, {0}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace trove

BENCHMARK_MAIN();
