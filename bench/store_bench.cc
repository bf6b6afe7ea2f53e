// What checksums cost on the read path (SPEC §4: verified whenever data comes from disk, cost
// reported): XXH3-64 over record-sized extents beside memcpy of the same bytes, and
// StoreReader::read_records of random experts with verification on and off. The store sits in
// the page cache (a hot read path); disk-bound figures belong to `trove bench` (tiers issue).
//
//   store_bench --benchmark_min_time=0.2
#include <benchmark/benchmark.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <vector>

#include "storage/store.h"

namespace trove {
namespace {

constexpr size_t kTableBytes = size_t{64} << 20;

std::vector<uint8_t> random_bytes(size_t n) {
  std::mt19937_64 rng(42);
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i + 8 <= n; i += 8) {
    const uint64_t x = rng();
    std::memcpy(v.data() + i, &x, 8);
  }
  return v;
}

// Checksums every `extent`-byte piece of a 64 MiB buffer (records of that size).
void BM_Xxh3(benchmark::State& state) {
  const size_t extent = static_cast<size_t>(state.range(0));
  const std::vector<uint8_t> data = random_bytes(kTableBytes);
  for (auto _ : state) {
    uint64_t acc = 0;
    for (size_t off = 0; off + extent <= data.size(); off += extent) {
      acc ^= store_checksum({data.data() + off, extent});
    }
    benchmark::DoNotOptimize(acc);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kTableBytes));
}
BENCHMARK(BM_Xxh3)->Arg(320)->Arg(2304)->Arg(4096);

void BM_Memcpy(benchmark::State& state) {
  const std::vector<uint8_t> src = random_bytes(kTableBytes);
  std::vector<uint8_t> dst(src.size());
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), src.size());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kTableBytes));
}
BENCHMARK(BM_Memcpy);

// A store of 2304-byte records (int4, D = 2048) in the system temp folder, removed at exit.
class StoreFixture {
 public:
  static constexpr uint64_t kStride = 2304;
  static constexpr uint64_t kCount = kTableBytes / kStride;

  StoreFixture() {
    std::string templ = std::filesystem::temp_directory_path().string() + "/trove-bench-XXXXXX";
    if (mkdtemp(templ.data()) == nullptr) std::abort();
    dir_ = templ;
    path_ = dir_ + "/bench.trove";
    auto w = StoreWriter::create(path_, {{"tool", "store_bench"}});
    StoreTableSpec table{"int4", kCount, kStride, kStride};
    const std::vector<uint8_t> records = random_bytes(kCount * kStride);
    if (!w.ok() || !w->begin_layer("L", nlohmann::json::object(), table).ok() ||
        !w->append_records(records).ok() || !w->end_layer().ok() || !w->finish().ok()) {
      std::abort();
    }
  }
  ~StoreFixture() { std::filesystem::remove_all(dir_); }
  const std::string& path() const { return path_; }

 private:
  std::string dir_, path_;
};

void BM_ReadRecords(benchmark::State& state) {
  static StoreFixture fixture;
  StoreOpenOptions options;
  options.verify_checksums = state.range(0) != 0;
  options.direct_io = false;  // page cache: measures the CPU side, not the disk
  auto store = StoreReader::open(fixture.path(), options);
  if (!store.ok()) {
    state.SkipWithError(store.status().to_string().c_str());
    return;
  }
  const StoreLayerInfo& layer = store->layers()[0];
  std::mt19937_64 rng(7);
  std::vector<int64_t> ids(1024);
  std::vector<uint8_t> out(ids.size() * StoreFixture::kStride);
  for (auto _ : state) {
    for (int64_t& id : ids) id = static_cast<int64_t>(rng() % StoreFixture::kCount);
    Status s = store->read_records(layer, ids, out);
    if (!s.ok()) state.SkipWithError(s.to_string().c_str());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * out.size()));
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * ids.size()));
  state.SetLabel(options.verify_checksums ? "verified" : "unverified");
}
BENCHMARK(BM_ReadRecords)->Arg(0)->Arg(1);

}  // namespace
}  // namespace trove

BENCHMARK_MAIN();
