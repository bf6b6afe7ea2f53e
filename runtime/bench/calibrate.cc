// Calibration (runtime/bench/calibrate.h): a vectorized streaming sum over host memory, random
// record reads through RecordReader, and fio run as a child process for the raw disk's figure.
#include "runtime/bench/calibrate.h"

#if TROVE_HAVE_CUDA
#include "kernels/cuda/cuda_memory.h"
#endif

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/numeric.h"
#include "base/strings.h"
#include "base/thread_pool.h"
#include "runtime/tiers/expert_cache.h"
#include "storage/file.h"

extern char** environ;

namespace trove {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

unsigned long long llu(uint64_t v) {
  return static_cast<unsigned long long>(v);
}
// ---- host bandwidth -------------------------------------------------------------------------

// Two 64-bit lanes: SSE2, which every x86-64 has (and plain pairs elsewhere). Eight
// independent accumulators keep 128 bytes of loads in flight per iteration, far more than one
// core's share of DRAM bandwidth needs, so the loop is never the bottleneck.
using Lanes = uint64_t __attribute__((vector_size(16)));
constexpr int64_t kBlockLanes = 8;
constexpr uint64_t kBlockBytes = uint64_t{kBlockLanes} * sizeof(Lanes);  // 128

uint64_t sum_blocks(const Lanes* p, int64_t begin, int64_t end) {
  // Named accumulators, so they stay in registers (an array of them stays on the stack at -O2).
  Lanes a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
  for (const Lanes* b = p + begin * kBlockLanes; b < p + end * kBlockLanes; b += kBlockLanes) {
    a0 += b[0];
    a1 += b[1];
    a2 += b[2];
    a3 += b[3];
    a4 += b[4];
    a5 += b[5];
    a6 += b[6];
    a7 += b[7];
  }
  const Lanes total = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
  return total[0] + total[1];
}

// Units [0, n) of `lanes_per_unit` lanes each, written with distinct values by the threads of
// parallel_for(n, workers), so each slice's pages are faulted in (and on NUMA machines placed)
// where the same split reads them.
void fill_lanes(Lanes* data, int64_t n, int64_t lanes_per_unit, int workers) {
  parallel_for(n, workers, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * lanes_per_unit; i < end * lanes_per_unit; ++i) {
      data[i] = Lanes{static_cast<uint64_t>(i), ~static_cast<uint64_t>(i)};
    }
  });
}

// The thread count (0: every core) and the least duration of a bandwidth measurement.
Status check_threads_and_duration(int threads, double min_seconds) {
  if (threads < 0) {
    return Status::invalid_argument(str_printf("thread count %d must be >= 0", threads));
  }
  if (!(min_seconds >= 0) || !std::isfinite(min_seconds)) {
    return Status::invalid_argument(str_printf("duration %g s must be >= 0", min_seconds));
  }
  return Status::ok_status();
}

// The least seconds of a pass of sum over [0, n) split by parallel_for(n, workers); passes
// repeat until min_seconds have passed (at least two). The sums are used, so no read is dropped.
double best_pass_seconds(int64_t n, int workers, double min_seconds,
                         const std::function<uint64_t(int64_t, int64_t)>& sum) {
  double best = INFINITY;
  volatile uint64_t sink = 0;
  const Clock::time_point start = Clock::now();
  for (int pass = 0; pass < 2 || seconds_since(start) < min_seconds; ++pass) {
    std::atomic<uint64_t> total{0};
    const Clock::time_point t0 = Clock::now();
    parallel_for(n, workers, [&](int64_t begin, int64_t end) {
      total.fetch_add(sum(begin, end), std::memory_order_relaxed);
    });
    best = std::min(best, seconds_since(t0));
    sink = sink + total.load(std::memory_order_relaxed);
  }
  return best;
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// ---- disk: shared argument checks -----------------------------------------------------------

constexpr uint32_t kMaxBlockBytes = uint32_t{1} << 30;
constexpr double kMaxSeconds = 86400;

// Opens `path` and checks the region; returns the file size.
Result<uint64_t> check_region(const std::string& path, uint64_t region_offset,
                              uint64_t region_bytes, uint32_t block_bytes, int queue_depth,
                              double seconds) {
  if (block_bytes == 0 || block_bytes > kMaxBlockBytes) {
    return Status::invalid_argument(
        str_printf("block size %u bytes must be in [1, %u]", block_bytes, kMaxBlockBytes));
  }
  if (queue_depth < 1) {
    return Status::invalid_argument(str_printf("queue depth %d must be >= 1", queue_depth));
  }
  if (!(seconds > 0 && seconds <= kMaxSeconds)) {
    return Status::invalid_argument(
        str_printf("duration %g s must be > 0 and at most %.0f", seconds, kMaxSeconds));
  }
  TROVE_ASSIGN_OR_RETURN(File file, File::open_read(path));
  TROVE_ASSIGN_OR_RETURN(const uint64_t size, file.size());
  if (region_offset > size || region_bytes > size - region_offset) {
    return Status::invalid_argument(
        str_printf("%s: region [%llu, +%llu) reaches past the end of the file (%llu bytes)",
                   path.c_str(), llu(region_offset), llu(region_bytes), llu(size)));
  }
  if (region_bytes < block_bytes) {
    return Status::invalid_argument(
        str_printf("%s: region [%llu, +%llu) is smaller than one %u-byte block", path.c_str(),
                   llu(region_offset), llu(region_bytes), block_bytes));
  }
  return size;
}

// ---- fio --------------------------------------------------------------------------------------

// One request size of a mix and its share in whole percents.
struct BlockShare {
  uint64_t bytes = 0;
  int percent = 0;
};

// The requests RecordReader makes of records of `block` bytes at `stride` from
// `region_offset` (those that fit in the region) at O_DIRECT alignment `align`.
struct ExtentShape {
  // Extent sizes, smallest first, with their shares in whole percents summing to 100 (at most
  // two sizes: ceil(block / align) or one more alignment unit).
  std::vector<BlockShare> sizes;
  // The largest power of two (from `align` to 1 MiB) dividing every extent's offset from the
  // region's aligned start (fio's blocks are aligned relative to its --offset).
  uint64_t offset_align = 0;
};

// Offsets modulo 1 MiB (and so sizes) repeat every 1 MiB / gcd(stride, 1 MiB) records, so one
// such period (or the region, when shorter) is counted.
ExtentShape extent_shape(uint64_t region_offset, uint64_t region_bytes, uint32_t block,
                         uint64_t stride, uint64_t align) {
  constexpr uint64_t kPeriodBytes = uint64_t{1} << 20;
  const uint64_t records = (region_bytes - block) / stride + 1;
  const uint64_t counted = std::min(records, kPeriodBytes / std::gcd(stride, kPeriodBytes));
  std::map<uint64_t, uint64_t> counts;  // extent bytes -> records
  const uint64_t start = align_down(region_offset, align);
  uint64_t offsets = 0;  // every extent's offset from `start`, or-ed: its lowest bit decides
  for (uint64_t k = 0; k < counted; ++k) {
    const uint64_t at = region_offset + k * stride;
    ++counts[align_up(at + block, align) - align_down(at, align)];
    offsets |= align_down(at, align) - start;
  }
  ExtentShape shape;
  shape.offset_align = align;
  while (shape.offset_align < kPeriodBytes && (offsets & shape.offset_align) == 0) {
    shape.offset_align *= 2;
  }
  // Whole percents by largest remainders.
  int total = 0;
  for (const auto& [bytes, count] : counts) {
    shape.sizes.push_back({bytes, static_cast<int>(count * 100 / counted)});
    total += shape.sizes.back().percent;
  }
  std::vector<size_t> by_remainder(shape.sizes.size());
  std::iota(by_remainder.begin(), by_remainder.end(), size_t{0});
  auto remainder = [&](size_t i) { return counts[shape.sizes[i].bytes] * 100 % counted; };
  std::stable_sort(by_remainder.begin(), by_remainder.end(),
                   [&](size_t a, size_t b) { return remainder(a) > remainder(b); });
  for (size_t i = 0; total < 100; ++i, ++total) {
    ++shape.sizes[by_remainder[i % by_remainder.size()]].percent;
  }
  std::erase_if(shape.sizes, [](const BlockShare& b) { return b.percent == 0; });
  return shape;
}

// fio's --bssplit value for `sizes`: "4096/75:8192/25".
std::string bssplit(const std::vector<BlockShare>& sizes) {
  std::string s;
  for (const BlockShare& b : sizes) {
    s += str_printf("%s%llu/%d", s.empty() ? "" : ":", llu(b.bytes), b.percent);
  }
  return s;
}

// The executable `name` in the first PATH folder that has one (an empty entry is the current
// folder, as execvp reads it); empty when none does.
std::string find_on_path(const std::string& name) {
  const char* env = std::getenv("PATH");
  const std::string path = env != nullptr ? env : "/usr/local/bin:/usr/bin:/bin";
  for (const std::string& dir : str_split(path, ':')) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    struct stat st;
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        ::access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
  }
  return "";
}

// fio reads ':' in --filename as a separator between files; a backslash before it makes it a
// literal colon.
std::string fio_filename(const std::string& path) {
  std::string out;
  for (char c : path) {
    if (c == ':') out += '\\';
    out += c;
  }
  return out;
}

std::string shell_quote(const std::string& arg) {
  const bool plain = !arg.empty() && std::all_of(arg.begin(), arg.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || std::strchr("_-./=:,+@%", c) != nullptr;
  });
  if (plain) return arg;
  std::string q = "'";
  for (char c : arg) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string join_command(const std::vector<std::string>& argv) {
  std::string s;
  for (const std::string& a : argv) s += (s.empty() ? "" : " ") + shell_quote(a);
  return s;
}

// The last `max_bytes` of `s`, trimmed, for quoting a child's stderr in an error.
std::string tail(const std::string& s, size_t max_bytes = 600) {
  size_t end = s.size();
  while (end > 0 && std::isspace(static_cast<unsigned char>(s[end - 1]))) --end;
  const size_t begin = end > max_bytes ? end - max_bytes : 0;
  return (begin > 0 ? "..." : "") + s.substr(begin, end - begin);
}

struct ChildOutput {
  int exit_code = 0;  // 128 + signal when killed by one
  std::string out;
  std::string err;
  bool timed_out = false;
};

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

class SpawnActions {
 public:
  SpawnActions() { ok_ = posix_spawn_file_actions_init(&actions_) == 0; }
  ~SpawnActions() {
    if (ok_) posix_spawn_file_actions_destroy(&actions_);
  }
  SpawnActions(const SpawnActions&) = delete;
  SpawnActions& operator=(const SpawnActions&) = delete;
  bool ok() const { return ok_; }
  posix_spawn_file_actions_t* get() { return &actions_; }

 private:
  posix_spawn_file_actions_t actions_;
  bool ok_ = false;
};

class SpawnAttributes {
 public:
  SpawnAttributes() { ok_ = posix_spawnattr_init(&attributes_) == 0; }
  ~SpawnAttributes() {
    if (ok_) posix_spawnattr_destroy(&attributes_);
  }
  SpawnAttributes(const SpawnAttributes&) = delete;
  SpawnAttributes& operator=(const SpawnAttributes&) = delete;
  bool ok() const { return ok_; }
  posix_spawnattr_t* get() { return &attributes_; }

 private:
  posix_spawnattr_t attributes_;
  bool ok_ = false;
};

// Runs argv[0] (a path) with stdin from /dev/null, collecting stdout and stderr; SIGKILL
// after `timeout_seconds`. No shell: arguments reach the child as they are.
Result<ChildOutput> run_child(const std::vector<std::string>& argv, double timeout_seconds) {
  const std::string command = join_command(argv);
  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) return Status::from_errno("pipe for " + command, errno);
  Fd out_r(out_pipe[0]), out_w(out_pipe[1]);
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) return Status::from_errno("pipe for " + command, errno);
  Fd err_r(err_pipe[0]), err_w(err_pipe[1]);

  SpawnActions actions;
  if (!actions.ok()) return Status::resource_exhausted("posix_spawn_file_actions_init failed");
  // dup2 onto 1 and 2 clears O_CLOEXEC there; the pipes' own descriptors close at exec.
  if (posix_spawn_file_actions_addopen(actions.get(), 0, "/dev/null", O_RDONLY, 0) != 0 ||
      posix_spawn_file_actions_adddup2(actions.get(), out_w.get(), 1) != 0 ||
      posix_spawn_file_actions_adddup2(actions.get(), err_w.get(), 2) != 0) {
    return Status::resource_exhausted("posix_spawn_file_actions for " + command + " failed");
  }
  // Its own process group, so a timeout kills fio's job processes too.
  SpawnAttributes attributes;
  if (!attributes.ok() || posix_spawnattr_setflags(attributes.get(), POSIX_SPAWN_SETPGROUP) != 0 ||
      posix_spawnattr_setpgroup(attributes.get(), 0) != 0) {
    return Status::resource_exhausted("posix_spawnattr for " + command + " failed");
  }
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc =
      ::posix_spawn(&pid, argv[0].c_str(), actions.get(), attributes.get(), args.data(), environ);
  if (rc != 0) return Status::from_errno("starting " + command, rc);
  out_w.reset();
  err_w.reset();

  ChildOutput result;
  const Clock::time_point t0 = Clock::now();
  pollfd fds[2] = {{out_r.get(), POLLIN, 0}, {err_r.get(), POLLIN, 0}};
  std::string* sinks[2] = {&result.out, &result.err};
  int open_pipes = 2;
  while (open_pipes > 0) {
    const double left = timeout_seconds - seconds_since(t0);
    if (left <= 0) {
      result.timed_out = true;
      ::kill(-pid, SIGKILL);
      break;
    }
    const int n = ::poll(fds, 2, static_cast<int>(std::min(left * 1000 + 1, 1e6)));
    if (n < 0 && errno != EINTR) {
      const int err = errno;
      ::kill(-pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      return Status::from_errno("waiting for " + command, err);
    }
    for (int i = 0; i < 2 && n > 0; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buf[16384];
      const ssize_t got = ::read(fds[i].fd, buf, sizeof buf);
      if (got > 0) {
        sinks[i]->append(buf, static_cast<size_t>(got));
      } else if (got == 0 || errno != EINTR) {
        fds[i].fd = -1;  // EOF (or a broken pipe): stop polling it
        --open_pipes;
      }
    }
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return Status::from_errno("waiting for " + command, errno);
  }
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

const nlohmann::json* find_key(const nlohmann::json& j, const char* key) {
  if (!j.is_object()) return nullptr;
  const auto it = j.find(key);
  return it == j.end() ? nullptr : &*it;
}

// jobs[0] of fio's JSON output; `what` receives why not when null.
const nlohmann::json* first_job(const nlohmann::json& doc, std::string* what) {
  const nlohmann::json* jobs = find_key(doc, "jobs");
  if (jobs == nullptr || !jobs->is_array() || jobs->empty()) {
    *what = "no \"jobs\" array";
    return nullptr;
  }
  return &(*jobs)[0];
}

Result<double> number_at(const nlohmann::json& job, std::initializer_list<const char*> keys) {
  const nlohmann::json* j = &job;
  std::string path = "jobs[0]";
  for (const char* key : keys) {
    path += std::string(".") + key;
    j = find_key(*j, key);
    if (j == nullptr) return Status::io_error("fio's JSON has no " + path);
  }
  if (!j->is_number()) return Status::io_error("fio's JSON " + path + " is not a number");
  return j->get<double>();
}

}  // namespace

// ---- measure_disk_write_bandwidth -------------------------------------------------------------

Result<double> measure_disk_write_bandwidth(const std::string& dir, uint64_t bytes) {
  constexpr uint64_t kPiece = uint64_t{1} << 20;
  if (bytes < kPiece) {
    return Status::invalid_argument(str_printf(
        "disk write calibration of %llu bytes is too small (at least 1 MiB)", llu(bytes)));
  }
  const std::string path = (dir.empty() ? std::string(".") : dir) + "/.trove-write-calibration-" +
                           std::to_string(getpid());
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Status::from_errno("disk write calibration: " + path, errno);
  std::vector<uint8_t> piece(kPiece);
  std::mt19937_64 rng(7);  // incompressible, in case the filesystem compresses
  for (size_t i = 0; i + 8 <= piece.size(); i += 8) {
    const uint64_t v = rng();
    std::memcpy(&piece[i], &v, 8);
  }
  Status status = Status::ok_status();
  const auto t0 = std::chrono::steady_clock::now();
  for (uint64_t done = 0; done < bytes && status.ok();) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kPiece, bytes - done));
    const ssize_t w = ::write(fd, piece.data(), n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      status = Status::from_errno("disk write calibration: writing " + path, w < 0 ? errno : EIO);
    } else {
      done += static_cast<uint64_t>(w);
    }
  }
  if (status.ok() && ::fdatasync(fd) != 0) {
    status = Status::from_errno("disk write calibration: fdatasync " + path, errno);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ::close(fd);
  ::unlink(path.c_str());
  TROVE_RETURN_IF_ERROR(status);
  return static_cast<double>(bytes) / std::max(seconds, 1e-9);
}

// ---- measure_host_read_bandwidth --------------------------------------------------------------

Result<double> measure_host_read_bandwidth(uint64_t bytes, int threads, double min_seconds) {
  if (bytes < 4096) {
    return Status::invalid_argument(
        str_printf("host bandwidth buffer of %llu bytes is too small (at least 4096)", llu(bytes)));
  }
  TROVE_RETURN_IF_ERROR(check_threads_and_duration(threads, min_seconds));
  const int workers = resolve_thread_count(threads);
  const int64_t blocks = static_cast<int64_t>(bytes / kBlockBytes);
  std::unique_ptr<Lanes, FreeDeleter> buffer(
      static_cast<Lanes*>(std::aligned_alloc(64, static_cast<size_t>(blocks) * kBlockBytes)));
  if (buffer == nullptr) {
    return Status::resource_exhausted(
        str_printf("allocating %llu bytes for the host bandwidth measurement failed", llu(bytes)));
  }
  Lanes* data = buffer.get();
  fill_lanes(data, blocks, kBlockLanes, workers);
  const double best = best_pass_seconds(
      blocks, workers, min_seconds, [&](int64_t b, int64_t e) { return sum_blocks(data, b, e); });
  return static_cast<double>(blocks) * kBlockBytes / std::max(best, 1e-9);
}

// ---- measure_host_record_read_bandwidth ------------------------------------------------------

namespace {

constexpr int64_t kLineLanes = 64 / sizeof(Lanes);
// The record whose lines a thread prefetches is this many picks ahead of the one it sums, and
// it issues them kPrefetchChunk at a time, each chunk before as many lines of its own. On 2 Zen 3
// cores (2026-12-06, 2304-byte records in a 604 MB table) this read 0.54-0.57 of the stream
// read; a whole record's 36 lines at once, 1 to 16 records ahead, 0.43-0.49; no prefetching 0.34.
constexpr uint64_t kPrefetchAhead = 2;
constexpr int64_t kPrefetchChunk = 6;

uint64_t sum_records(const Lanes* table, uint64_t stride, const uint32_t* picks, uint64_t count) {
  const int64_t lines = static_cast<int64_t>(stride / 64);
  const int64_t record_lanes = static_cast<int64_t>(stride / sizeof(Lanes));
  Lanes a0 = {}, a1 = {}, a2 = {}, a3 = {};
  for (uint64_t i = 0; i < count; ++i) {
    const Lanes* r = table + picks[i] * record_lanes;
    const char* ahead =
        i + kPrefetchAhead < count
            ? reinterpret_cast<const char*>(table + picks[i + kPrefetchAhead] * record_lanes)
            : nullptr;
    for (int64_t l0 = 0; l0 < lines; l0 += kPrefetchChunk) {
      const int64_t l1 = std::min(lines, l0 + kPrefetchChunk);
      if (ahead != nullptr) {
        for (int64_t l = l0; l < l1; ++l) __builtin_prefetch(ahead + l * 64, 0, 1);
      }
      for (const Lanes* b = r + l0 * kLineLanes; b < r + l1 * kLineLanes; b += kLineLanes) {
        a0 += b[0];
        a1 += b[1];
        a2 += b[2];
        a3 += b[3];
      }
    }
  }
  const Lanes total = (a0 + a1) + (a2 + a3);
  return total[0] + total[1];
}

}  // namespace

Result<double> measure_host_record_read_bandwidth(uint64_t stride, uint64_t records, uint64_t picks,
                                                  int threads, double min_seconds) {
  if (stride == 0 || stride % 64 != 0) {
    return Status::invalid_argument(
        str_printf("record stride %llu must be a positive multiple of 64 bytes", llu(stride)));
  }
  if (records < 1 || records > (uint64_t{1} << 32)) {
    return Status::invalid_argument(
        str_printf("record count %llu must be in [1, 2^32]", llu(records)));
  }
  if (picks < 1) return Status::invalid_argument("pick count must be >= 1");
  TROVE_RETURN_IF_ERROR(check_threads_and_duration(threads, min_seconds));
  if (records > std::numeric_limits<uint64_t>::max() / stride) {
    return Status::invalid_argument(str_printf("a table of %llu records of %llu bytes is too large",
                                               llu(records), llu(stride)));
  }
  const size_t bytes = static_cast<size_t>(records * stride);
  // The host tier's blocks: anonymous memory with huge pages advised, as record tables get.
  Result<uint8_t*> table = allocate_host_block(bytes);
  if (!table.ok()) {
    return Status::resource_exhausted(
        str_printf("allocating %llu bytes for the record read measurement failed: %s", llu(bytes),
                   table.status().message().c_str()));
  }
  struct Release {
    uint8_t* p;
    size_t n;
    ~Release() { free_host_block(p, n); }
  } release{*table, bytes};
  const int workers = resolve_thread_count(threads);
  Lanes* data = reinterpret_cast<Lanes*>(*table);
  // Faulted in before the timing (its records are read at random, by any thread).
  fill_lanes(data, static_cast<int64_t>(bytes / 64), kLineLanes, workers);
  std::vector<uint32_t> order(static_cast<size_t>(picks));
  std::mt19937_64 rng(0x74726f7665ULL);  // "trove"
  std::uniform_int_distribution<uint64_t> pick(0, records - 1);
  for (uint32_t& p : order) p = static_cast<uint32_t>(pick(rng));
  const double best = best_pass_seconds(
      static_cast<int64_t>(picks), workers, min_seconds, [&](int64_t b, int64_t e) {
        return sum_records(data, stride, order.data() + b, static_cast<uint64_t>(e - b));
      });
  return static_cast<double>(picks) * static_cast<double>(stride) / std::max(best, 1e-9);
}

// ---- measure_disk_iops ----------------------------------------------------------------------

Result<DiskCalibration> measure_disk_iops(const std::string& path, uint64_t region_offset,
                                          uint64_t region_bytes, uint32_t block_bytes,
                                          uint64_t stride, int queue_depth,
                                          RecordReaderOptions::Engine engine, double seconds) {
  if (stride == 0) return Status::invalid_argument("record stride must be > 0 bytes");
  TROVE_RETURN_IF_ERROR(
      check_region(path, region_offset, region_bytes, block_bytes, queue_depth, seconds));
  const uint64_t slots = (region_bytes - block_bytes) / stride + 1;

  RecordReaderOptions options;
  options.engine = engine;
  options.queue_depth = queue_depth;
  options.pread_threads = queue_depth;
  options.direct_io = true;
  options.verify = false;
  // Room for queue_depth aligned extents (up to 1 GiB), so the reader is not what caps the
  // queue; max_in_flight in the result shows what it reached.
  const uint64_t extent = align_up(block_bytes, kDirectAlignment) + kDirectAlignment;
  options.max_bounce_bytes = std::clamp<uint64_t>(extent * static_cast<uint64_t>(queue_depth),
                                                  options.max_bounce_bytes, uint64_t{1} << 30);
  TROVE_ASSIGN_OR_RETURN(std::unique_ptr<RecordReader> reader, RecordReader::open(path, options));

  // The queue drains at each batch's end (the reader takes one batch at a time): for about one
  // request latency it runs below queue_depth, costing about queue_depth / 2 reads' time. At
  // 256 x queue_depth reads a batch that is under 0.2%; destinations are capped at 64 MiB.
  const uint64_t max_batch_by_memory = std::max<uint64_t>(1, (uint64_t{64} << 20) / block_bytes);
  const size_t batch = static_cast<size_t>(std::min<uint64_t>(
      std::max<uint64_t>(1024, uint64_t{256} * static_cast<uint64_t>(queue_depth)),
      std::max<uint64_t>(static_cast<uint64_t>(queue_depth), max_batch_by_memory)));
  std::vector<uint8_t> dest(batch * block_bytes);
  std::mt19937_64 rng(0x74726f7665ULL);  // "trove"
  std::uniform_int_distribution<uint64_t> pick(0, slots - 1);
  auto draw = [&](std::vector<RecordRead>& reads) {
    reads.resize(batch);
    for (size_t i = 0; i < batch; ++i) {
      const uint64_t k = pick(rng);
      reads[i] = {static_cast<int64_t>(k), region_offset + k * stride, block_bytes,
                  dest.data() + i * block_bytes, 0};
    }
  };

  std::vector<RecordRead> current, next;
  draw(current);
  const Clock::time_point t0 = Clock::now();
  TROVE_RETURN_IF_ERROR(reader->start(current));
  for (;;) {
    draw(next);  // while `current` is in flight
    TROVE_RETURN_IF_ERROR(reader->wait());
    if (seconds_since(t0) >= seconds) break;
    std::swap(current, next);
    TROVE_RETURN_IF_ERROR(reader->start(current));
  }
  const double wall = seconds_since(t0);

  const RecordReaderStats stats = reader->stats();
  DiskCalibration c;
  c.reads = stats.reads;
  c.seconds = wall;
  c.iops = static_cast<double>(stats.reads) / wall;
  c.mb_per_s = static_cast<double>(stats.bytes_useful) / wall / 1e6;
  c.latency_p50_us = stats.latency_p50_us;
  c.latency_p99_us = stats.latency_p99_us;
  c.engine = reader->engine_name();
  c.direct_io = reader->direct_io();
  c.queue_depth = queue_depth;
  c.max_in_flight = stats.max_in_flight;
  c.mean_in_flight = stats.mean_in_flight;
  c.read_amplification = stats.read_amplification();
  c.direct_alignment = reader->direct_alignment();
  c.alignment_source = reader->direct_alignment_source();
  c.batch_reads = batch;
  return c;
}

// ---- run_fio_randread -----------------------------------------------------------------------

Result<FioResult> run_fio_randread(const std::string& path, uint64_t region_offset,
                                   uint64_t region_bytes, uint32_t block_bytes, int queue_depth,
                                   bool direct, double seconds) {
  FioOptions options;
  options.direct = direct;
  return run_fio_randread(path, region_offset, region_bytes, block_bytes, queue_depth, options,
                          seconds);
}

Result<FioResult> run_fio_randread(const std::string& path, uint64_t region_offset,
                                   uint64_t region_bytes, uint32_t block_bytes, int queue_depth,
                                   const FioOptions& options, double seconds) {
  TROVE_RETURN_IF_ERROR(
      check_region(path, region_offset, region_bytes, block_bytes, queue_depth, seconds));
  const bool direct = options.direct;
  const uint64_t align = options.alignment;
  if (direct && (align < 512 || (align & (align - 1)) != 0 || align > kMaxBlockBytes)) {
    return Status::invalid_argument(
        str_printf("fio alignment %llu must be a power of two >= 512", llu(align)));
  }
  FioResult r;
  r.block_bytes = block_bytes;
  r.offset = region_offset;
  r.size = region_bytes;
  uint64_t blockalign = 0;  // fio's --blockalign where its default (the smallest block) differs
  if (direct) {
    std::vector<BlockShare> sizes = {{align_up(block_bytes, align), 100}};
    if (options.record_stride > 0) {
      ExtentShape shape =
          extent_shape(region_offset, region_bytes, block_bytes, options.record_stride, align);
      sizes = std::move(shape.sizes);
      if (shape.offset_align != sizes.front().bytes) blockalign = shape.offset_align;
    }
    r.block_bytes = static_cast<uint32_t>(sizes.front().bytes);
    if (sizes.size() > 1) r.block_split = bssplit(sizes);
    // O_DIRECT wants aligned offsets and lengths: whole blocks inside the region.
    const uint64_t largest = sizes.back().bytes;
    const uint64_t end = align_down(region_offset + region_bytes, align);
    r.offset = align_up(region_offset, align);
    if (end < r.offset || end - r.offset < largest) {
      return Status::invalid_argument(
          str_printf("%s: region [%llu, +%llu) holds no aligned %llu-byte block for fio "
                     "--direct=1",
                     path.c_str(), llu(region_offset), llu(region_bytes), llu(largest)));
    }
    r.size = align_down(end - r.offset, r.block_split.empty() ? r.block_bytes : align);
  }

  const std::string fio = find_on_path("fio");
  if (fio.empty()) {
    return Status::not_found(
        "fio not found on PATH: install it (apt install fio) to compare against the raw disk");
  }
  const long long runtime_ms = std::max(1LL, std::llround(seconds * 1000));
  std::string failures;
  for (const char* engine : {"io_uring", "libaio", "psync"}) {
    std::vector<std::string> argv = {
        fio,
        "--name=trove",
        "--filename=" + fio_filename(path),
        "--readonly",
        "--rw=randread",
        r.block_split.empty() ? str_printf("--bs=%u", r.block_bytes) : "--bssplit=" + r.block_split,
    };
    if (blockalign > 0) argv.push_back(str_printf("--blockalign=%llu", llu(blockalign)));
    argv.insert(argv.end(), {
                                str_printf("--iodepth=%d", queue_depth),
                                std::string("--ioengine=") + engine,
                                direct ? "--direct=1" : "--direct=0",
                                str_printf("--offset=%llu", llu(r.offset)),
                                str_printf("--size=%llu", llu(r.size)),
                                "--time_based",
                                str_printf("--runtime=%lldms", runtime_ms),
                                "--output-format=json",
                                "--numjobs=1",
                            });
    const std::string command = join_command(argv);
    TROVE_ASSIGN_OR_RETURN(ChildOutput child, run_child(argv, seconds + 60));
    if (child.timed_out) {
      return Status::io_error(str_printf("`%s` ran %.0f s past its %g s runtime and was killed",
                                         command.c_str(), 60.0, seconds));
    }
    // fio may print notes before the JSON document.
    const size_t json_at = child.out.find('{');
    nlohmann::json doc = json_at == std::string::npos
                             ? nlohmann::json(nullptr)
                             : nlohmann::json::parse(child.out.substr(json_at), nullptr,
                                                     /*allow_exceptions=*/false);
    std::string why;
    const nlohmann::json* job = doc.is_discarded() ? nullptr : first_job(doc, &why);
    const nlohmann::json* job_error = job != nullptr ? find_key(*job, "error") : nullptr;
    const bool failed =
        child.exit_code != 0 || (job_error != nullptr && job_error->is_number() && *job_error != 0);
    if (failed) {
      // An engine fio lacks or the kernel refuses fails at setup, in well under a second, so
      // trying the next one costs little.
      failures += str_printf("\n  `%s` exited with %d: %s", command.c_str(), child.exit_code,
                             tail(child.err).c_str());
      continue;
    }
    if (job == nullptr) {
      return Status::io_error(str_printf("`%s`: output is not fio's JSON report (%s): %s",
                                         command.c_str(), why.empty() ? "unparsable" : why.c_str(),
                                         clip(tail(child.out), 300).c_str()));
    }
    Status bad;
    auto get = [&](std::initializer_list<const char*> keys) {
      Result<double> v = number_at(*job, keys);
      if (!v.ok() && bad.ok()) bad = v.status();
      return v.ok() ? *v : 0.0;
    };
    r.iops = get({"read", "iops"});
    r.bw_mb_per_s = get({"read", "bw_bytes"}) / 1e6;
    r.ios = static_cast<uint64_t>(get({"read", "total_ios"}));
    r.seconds = get({"read", "runtime"}) / 1000;  // ms
    r.clat_p50_us = get({"read", "clat_ns", "percentile", "50.000000"}) / 1000;
    r.clat_p99_us = get({"read", "clat_ns", "percentile", "99.000000"}) / 1000;
    if (!bad.ok()) return bad.with_context("`" + command + "`");
    r.engine = engine;
    r.command_line = command;
    return r;
  }
  return Status::io_error("fio failed with every I/O engine it was given:" + failures);
}

Result<double> measure_h2d_bandwidth(uint64_t bytes, double min_seconds) {
  if (bytes < 4096 || !std::isfinite(min_seconds) || min_seconds < 0) {
    return Status::invalid_argument(
        str_printf("H2D calibration: %llu bytes (at least 4096) for %g s (finite, >= 0)",
                   static_cast<unsigned long long>(bytes), min_seconds));
  }
#if TROVE_HAVE_CUDA
  TROVE_RETURN_IF_ERROR(cuda_device_available());
  TROVE_ASSIGN_OR_RETURN(PinnedHostBuffer host, PinnedHostBuffer::allocate(bytes));
  if (!host.pinned()) {
    return Status::resource_exhausted("H2D calibration: the host buffer could not be pinned");
  }
  std::memset(host.data(), 1, bytes);
  TROVE_ASSIGN_OR_RETURN(CudaDeviceMemory device, CudaDeviceMemory::allocate(bytes));
  TROVE_ASSIGN_OR_RETURN(CudaCopyStream stream, CudaCopyStream::create());
  TROVE_ASSIGN_OR_RETURN(CudaEvent start, CudaEvent::create());
  TROVE_ASSIGN_OR_RETURN(CudaEvent end, CudaEvent::create());
  double best = 0, spent = 0;
  for (int pass = 0; pass < 2 || spent < min_seconds; ++pass) {
    TROVE_RETURN_IF_ERROR(start.record(stream));
    TROVE_RETURN_IF_ERROR(stream.copy_async(device.data(), host.data(), bytes));
    TROVE_RETURN_IF_ERROR(end.record(stream));
    TROVE_RETURN_IF_ERROR(end.synchronize());
    TROVE_ASSIGN_OR_RETURN(const double seconds, CudaEvent::elapsed_seconds(start, end));
    spent += seconds;
    if (seconds > 0) best = std::max(best, static_cast<double>(bytes) / seconds);
    if (pass > 10000) break;  // a clock that does not advance
  }
  return best;
#else
  return Status::not_supported("H2D calibration: trove was built without CUDA");
#endif
}

Result<double> measure_h2d_gather_bandwidth(uint64_t bytes, uint64_t record_bytes,
                                            double min_seconds) {
  if (bytes < 4096 || !std::isfinite(min_seconds) || min_seconds < 0 || record_bytes == 0 ||
      record_bytes > bytes / 2) {
    return Status::invalid_argument(str_printf(
        "H2D gather calibration: %llu bytes (at least 4096) of records of %llu bytes (1 to half "
        "of it) for %g s (finite, >= 0)",
        static_cast<unsigned long long>(bytes), static_cast<unsigned long long>(record_bytes),
        min_seconds));
  }
#if TROVE_HAVE_CUDA
  TROVE_RETURN_IF_ERROR(cuda_device_available());
  const uint64_t stride = (record_bytes + 15) / 16 * 16;  // records as the tiers align them
  const uint64_t count = bytes / stride;
  TROVE_ASSIGN_OR_RETURN(PinnedHostBuffer host, PinnedHostBuffer::allocate(count * stride));
  if (!host.pinned() || host.device_data() == nullptr) {
    return Status::resource_exhausted(
        "H2D gather calibration: the host buffer could not be pinned and mapped");
  }
  std::memset(host.data(), 1, count * stride);
  TROVE_ASSIGN_OR_RETURN(CudaDeviceMemory device, CudaDeviceMemory::allocate(count * stride));
  // The pointer tables, in device memory: sources shuffled (the tier's slots are read at random),
  // destinations in order.
  std::vector<const void*> srcs(count);
  std::vector<void*> dsts(count);
  std::vector<uint64_t> order(count);
  for (uint64_t i = 0; i < count; ++i) order[i] = i;
  std::mt19937_64 rng(1);
  std::shuffle(order.begin(), order.end(), rng);
  for (uint64_t i = 0; i < count; ++i) {
    srcs[i] = host.device_data() + order[i] * stride;
    dsts[i] = device.data() + i * stride;
  }
  TROVE_ASSIGN_OR_RETURN(CudaDeviceMemory tables, CudaDeviceMemory::allocate(2 * count * 8));
  TROVE_ASSIGN_OR_RETURN(CudaCopyStream stream, CudaCopyStream::create());
  TROVE_RETURN_IF_ERROR(stream.copy_async(tables.data(), srcs.data(), count * 8));
  TROVE_RETURN_IF_ERROR(stream.copy_async(tables.data() + count * 8, dsts.data(), count * 8));
  TROVE_RETURN_IF_ERROR(stream.synchronize());
  TROVE_ASSIGN_OR_RETURN(CudaEvent start, CudaEvent::create());
  TROVE_ASSIGN_OR_RETURN(CudaEvent end, CudaEvent::create());
  double best = 0, spent = 0;
  for (int pass = 0; pass < 2 || spent < min_seconds; ++pass) {
    TROVE_RETURN_IF_ERROR(start.record(stream));
    TROVE_RETURN_IF_ERROR(
        stream.gather_async(reinterpret_cast<void* const*>(tables.data() + count * 8),
                            reinterpret_cast<const void* const*>(tables.data()), stride, count));
    TROVE_RETURN_IF_ERROR(end.record(stream));
    TROVE_RETURN_IF_ERROR(end.synchronize());
    TROVE_ASSIGN_OR_RETURN(const double seconds, CudaEvent::elapsed_seconds(start, end));
    spent += seconds;
    if (seconds > 0) best = std::max(best, static_cast<double>(count * stride) / seconds);
    if (pass > 10000) break;  // a clock that does not advance
  }
  return best;
#else
  return Status::not_supported("H2D gather calibration: trove was built without CUDA");
#endif
}

Result<double> measure_hbm_bandwidth(uint64_t bytes, double min_seconds) {
  if (bytes < 4096 || !std::isfinite(min_seconds) || min_seconds < 0) {
    return Status::invalid_argument(
        str_printf("HBM calibration: %llu bytes (at least 4096) for %g s (finite, >= 0)",
                   static_cast<unsigned long long>(bytes), min_seconds));
  }
#if TROVE_HAVE_CUDA
  TROVE_RETURN_IF_ERROR(cuda_device_available());
  TROVE_ASSIGN_OR_RETURN(CudaDeviceMemory src, CudaDeviceMemory::allocate(bytes));
  TROVE_ASSIGN_OR_RETURN(CudaDeviceMemory dst, CudaDeviceMemory::allocate(bytes));
  TROVE_ASSIGN_OR_RETURN(CudaCopyStream stream, CudaCopyStream::create());
  TROVE_ASSIGN_OR_RETURN(CudaEvent start, CudaEvent::create());
  TROVE_ASSIGN_OR_RETURN(CudaEvent end, CudaEvent::create());
  // One untimed copy first: the first touch of fresh device memory maps its pages.
  TROVE_RETURN_IF_ERROR(stream.copy_async(dst.data(), src.data(), bytes));
  TROVE_RETURN_IF_ERROR(stream.synchronize());
  double best = 0, spent = 0;
  for (int pass = 0; pass < 2 || spent < min_seconds; ++pass) {
    TROVE_RETURN_IF_ERROR(start.record(stream));
    TROVE_RETURN_IF_ERROR(stream.copy_async(dst.data(), src.data(), bytes));
    TROVE_RETURN_IF_ERROR(end.record(stream));
    TROVE_RETURN_IF_ERROR(end.synchronize());
    TROVE_ASSIGN_OR_RETURN(const double seconds, CudaEvent::elapsed_seconds(start, end));
    spent += seconds;
    if (seconds > 0) best = std::max(best, 2.0 * static_cast<double>(bytes) / seconds);
    if (pass > 10000) break;  // a clock that does not advance
  }
  return best;
#else
  return Status::not_supported("HBM calibration: trove was built without CUDA");
#endif
}

}  // namespace trove
