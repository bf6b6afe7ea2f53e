// A real disk error under the CLI: a store on ext4 over a loop device whose backing image is
// cut short under the mounted file system, so that reads of the store's later records fail
// with EIO in the kernel (the way the issue reproduced SIGBUS). `trove verify` must list every
// unreadable expert and check the rest, `trove forward` (resident and --host) and `trove unpack`
// must fail with an error naming the expert and the errno, never die of a signal.
//
// The pages of the store outside the cut stay cached (mlocked), so only records fail.
//
// Needs root, mkfs.ext4, losetup and mount (loop devices); skips with the reason otherwise.
#include <fcntl.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "runtime/bench/synthetic.h"
#include "storage/safetensors.h"
#include "storage/store.h"
#include "tests/cli_util.h"
#include "tests/test_util.h"

namespace trove {
namespace {

using testing::run;
using testing::RunResult;
using testing::ScratchDir;

// A shell command's exit status and its first line of output.
int sh(const std::string& command, std::string* out = nullptr) {
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  std::string text;
  char buf[256];
  while (std::fgets(buf, sizeof(buf), p) != nullptr) text += buf;
  const int status = ::pclose(p);
  if (out != nullptr) *out = text.substr(0, text.find('\n'));
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// A loop device over an ext4 image (no journal), mounted; torn down (unmounted, detached) on
// destruction.
class LoopMount {
 public:
  // Empty when it could not be set up; then why() says why.
  LoopMount(const std::string& image, const std::string& mount_point, uint64_t bytes) {
    if (::geteuid() != 0) {
      why_ = "needs root for a loop device";
      return;
    }
    for (const char* tool : {"mkfs.ext4", "losetup", "mount", "umount"}) {
      if (sh(std::string("command -v ") + tool) != 0) {
        why_ = std::string(tool) + " is not installed";
        return;
      }
    }
    std::filesystem::create_directories(mount_point);
    if (sh("truncate -s " + std::to_string(bytes) + " " + image) != 0 ||
        sh("mkfs.ext4 -q -F -b 4096 -O ^has_journal " + image) != 0) {
      why_ = "mkfs.ext4 failed";
      return;
    }
    std::string dev;
    if (sh("losetup -f --show " + image, &dev) != 0 || dev.rfind("/dev/", 0) != 0) {
      why_ = "losetup failed (no loop devices here?): " + dev;
      return;
    }
    device_ = dev;
    std::string err;
    if (sh("mount -o noatime " + device_ + " " + mount_point, &err) != 0) {
      why_ = "mount failed: " + err;
      return;
    }
    mount_point_ = mount_point;
  }
  ~LoopMount() {
    // A plain unmount (retried: the CLI's last reader may be closing), lazy only as a last
    // resort; then the device goes.
    bool unmounted = mount_point_.empty();
    for (int attempt = 0; attempt < 20 && !unmounted; ++attempt) {
      unmounted = sh("umount " + mount_point_) == 0;
      if (!unmounted) ::usleep(100 * 1000);
    }
    if (!unmounted) sh("umount -l " + mount_point_);
    if (!device_.empty()) sh("losetup -d " + device_);
  }
  LoopMount(const LoopMount&) = delete;
  LoopMount& operator=(const LoopMount&) = delete;

  bool ok() const { return !mount_point_.empty(); }
  const std::string& why() const { return why_; }
  const std::string& device() const { return device_; }

 private:
  std::string device_;
  std::string mount_point_;
  std::string why_;
};

// The physical byte address on the device of file byte `offset` (FIEMAP); -1 when unmapped.
int64_t physical_of(int fd, uint64_t offset) {
  std::vector<uint8_t> buf(sizeof(fiemap) + 64 * sizeof(fiemap_extent));
  auto* fm = reinterpret_cast<fiemap*>(buf.data());
  fm->fm_start = 0;
  fm->fm_length = ~uint64_t{0};
  fm->fm_flags = FIEMAP_FLAG_SYNC;
  fm->fm_extent_count = 64;
  if (::ioctl(fd, FS_IOC_FIEMAP, fm) != 0) return -1;
  for (uint32_t i = 0; i < fm->fm_mapped_extents; ++i) {
    const fiemap_extent& e = fm->fm_extents[i];
    if (offset >= e.fe_logical && offset < e.fe_logical + e.fe_length) {
      return static_cast<int64_t>(e.fe_physical + (offset - e.fe_logical));
    }
  }
  return -1;
}

void write_range(int fd, const std::vector<uint8_t>& bytes, uint64_t begin, uint64_t end) {
  ASSERT_EQ(::pwrite(fd, bytes.data() + begin, end - begin, static_cast<off_t>(begin)),
            static_cast<ssize_t>(end - begin));
}

TEST(CliEio, VerifyForwardAndUnpackNameTheUnreadableExpertInsteadOfDying) {
  ScratchDir dir;
  LoopMount loop(dir.file("disk.img"), dir.file("mnt"), 64 << 20);
  if (!loop.ok()) GTEST_SKIP() << "no real-EIO test here: " << loop.why();

  // A store with a 32-block record table (1024 experts of 128 bytes).
  SyntheticCheckpoint spec;
  spec.layout = ImportLayout::kMikeybeez;
  spec.prefixes = {"p"};
  spec.config.dim = 64;
  spec.config.heads = 2;
  spec.config.n_keys = 32;
  spec.config.dim_key = 8;
  spec.config.topk = 4;
  spec.dtype = StDType::kF32;
  ASSERT_TRUE(write_synthetic_checkpoint(dir.file("c.safetensors"), spec).ok());
  RunResult p = run(dir, {"pack", dir.file("c.safetensors"), "-o", dir.file("m.trove"), "--layout",
                          "mikeybeez", "--prefix", "p", "--quant", "int4", "-q"});
  ASSERT_EQ(p.exit_code, 0) << p.err;
  StoreTableInfo table;
  {
    Result<StoreReader> r = StoreReader::open(dir.file("m.trove"));
    ASSERT_TRUE(r.ok());
    table = r->layers()[0].table;
  }
  ASSERT_GE(table.bytes, 8 * 4096u);

  // Onto the loop file system. Every page of the store stays in the page cache (locked there)
  // except the second half of the record table, which is dropped: once the device is cut at
  // that half's first block, it and everything physically after it read as EIO, while the
  // header, manifest, checksums and dense tensors still come from memory.
  const std::string store = dir.file("mnt/m.trove");
  const std::vector<uint8_t> bytes = testing::read_all(dir.file("m.trove"));
  const int fd = ::open(store.c_str(), O_CREAT | O_RDWR | O_TRUNC, 0644);
  ASSERT_GE(fd, 0);
  write_range(fd, bytes, 0, bytes.size());
  ASSERT_EQ(::fsync(fd), 0);
  const uint64_t cut_at = table.offset + (table.bytes / 2 / 4096) * 4096;  // file offset
  const uint64_t table_end = table.offset + table.bytes;
  ASSERT_EQ(table_end % 4096, 0u);
  // Nothing of the store cached; then the pages outside the cut read back in (the device is
  // still whole) and kept mapped, which fadvise and reclaim leave alone, without read-around
  // (it would pull in pages of the cut range too).
  ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  struct Mapped {
    void* p = MAP_FAILED;
    size_t n = 0;
    ~Mapped() {
      if (p != MAP_FAILED) ::munmap(p, n);
    }
  } head, tail;
  head.n = cut_at;
  head.p = ::mmap(nullptr, head.n, PROT_READ, MAP_SHARED, fd, 0);
  tail.n = bytes.size() - table_end;
  tail.p = ::mmap(nullptr, tail.n, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(table_end));
  ASSERT_TRUE(head.p != MAP_FAILED && tail.p != MAP_FAILED);
  volatile uint8_t sink = 0;
  for (const Mapped* m : {&head, &tail}) {
    ASSERT_EQ(::madvise(m->p, m->n, MADV_RANDOM), 0);
    for (size_t i = 0; i < m->n; i += 4096) sink = sink + static_cast<const uint8_t*>(m->p)[i];
    ::mlock(m->p, m->n);  // best effort: keeps them cached under memory pressure
  }
  const int64_t cut_physical = physical_of(fd, cut_at);
  bool contiguous = cut_physical >= 0;
  for (uint64_t at = cut_at; at < table_end && contiguous; at += 4096) {
    contiguous = physical_of(fd, at) >= cut_physical;
  }
  ::close(fd);
  if (!contiguous) {
    GTEST_SKIP() << "the record table's second half is not laid out after its first block";
  }
  // Shrink the device under the mounted file system: reads past its new end fail with EIO.
  ASSERT_EQ(sh("truncate -s " + std::to_string(cut_physical) + " " + dir.file("disk.img")), 0);
  ASSERT_EQ(sh("losetup -c " + loop.device()), 0);
  {
    // The cut is real: a read of the first dropped block fails in the kernel.
    const int probe = ::open(store.c_str(), O_RDONLY);
    std::vector<uint8_t> block(4096);
    errno = 0;
    const ssize_t n = ::pread(probe, block.data(), block.size(), static_cast<off_t>(cut_at));
    const int err = errno;
    ::close(probe);
    std::string size;
    sh("blockdev --getsize64 " + loop.device(), &size);
    const int direct = ::open(store.c_str(), O_RDONLY | O_DIRECT);
    void* aligned = nullptr;
    (void)::posix_memalign(&aligned, 4096, 4096);
    const ssize_t dn = ::pread(direct, aligned, 4096, static_cast<off_t>(cut_at));
    ::close(direct);
    std::free(aligned);
    ASSERT_EQ(n, -1) << "the device still reads past the cut (physical " << cut_physical
                     << ", device " << size << " bytes, O_DIRECT read " << dn << ")";
    ASSERT_EQ(err, EIO);
  }
  const int64_t first_bad = static_cast<int64_t>((cut_at - table.offset) / table.stride);
  const int64_t bad = static_cast<int64_t>(table.count) - first_bad;

  auto no_signal = [](const RunResult& r) {
    EXPECT_LT(r.exit_code, 128) << "died of signal " << r.exit_code - 128 << ": " << r.err;
  };

  // verify: every unreadable expert listed with the errno, every readable one checked.
  RunResult v = run(dir, {"verify", store, "--json"});
  no_signal(v);
  EXPECT_EQ(v.exit_code, 3) << v.err;
  const nlohmann::json j = nlohmann::json::parse(v.out);
  int64_t eio = 0;
  for (const auto& f : j["faults"]) {
    EXPECT_EQ(f["region"], "records") << f.dump();
    EXPECT_NE(f["error"].get<std::string>().find("errno 5"), std::string::npos) << f.dump();
    ++eio;
  }
  EXPECT_EQ(eio, bad);
  EXPECT_EQ(j["faults"][0]["item"], "expert " + std::to_string(first_bad));

  // forward, resident and through the host tier: an error naming an expert and EIO.
  std::vector<float> x(256 * 64);
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal;
  for (float& value : x) value = normal(rng);
  ASSERT_TRUE(write_safetensors(dir.file("x.safetensors"),
                                {{"x",
                                  StDType::kF32,
                                  {256, 64},
                                  {reinterpret_cast<const uint8_t*>(x.data()), x.size() * 4},
                                  nullptr}},
                                {})
                  .ok());
  for (bool host : {false, true}) {
    SCOPED_TRACE(host ? "forward --host" : "forward");
    std::vector<std::string> args = {"forward", store,
                                     "--layer", "p",
                                     "--input", dir.file("x.safetensors"),
                                     "-o",      dir.file("y.safetensors")};
    if (host) args.insert(args.end(), {"--host", "256KiB"});
    RunResult f = run(dir, args);
    no_signal(f);
    EXPECT_EQ(f.exit_code, 1) << f.err;
    EXPECT_NE(f.err.find("expert"), std::string::npos) << f.err;
    EXPECT_NE(f.err.find("Input/output error"), std::string::npos) << f.err;
  }

  // unpack: the same.
  RunResult u = run(dir, {"unpack", store, "-o", dir.file("back.safetensors"), "-q"});
  no_signal(u);
  EXPECT_EQ(u.exit_code, 1) << u.err;
  EXPECT_NE(u.err.find("expert " + std::to_string(first_bad)), std::string::npos) << u.err;
  EXPECT_NE(u.err.find("Input/output error"), std::string::npos) << u.err;
}

}  // namespace
}  // namespace trove
