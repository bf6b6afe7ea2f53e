// Forward throughput of one PEER layer on the CPU (runtime/layer/peer_layer.h, kernels/cpu/peer.h)
// in the background's configuration: D = D_out = 2048, h = 4, k = k' = 8, dk = 64, silu, relu gate,
// no input norm, one batch of T tokens (2048 by default) per iteration, at N = 16K, 262K and 1M
// experts (n = 128, 512, 1024), records in int4 and bf16.
//
// Why: the expert stage reads T*h*k scattered records (2304 B in int4, 8192 B in bf16 at
// D = 2048) and does ~2 flops per weight, so its ceiling at large N is memory bandwidth, and
// int4 records could buy up to the 8192/2304 = 3.56x ratio of bytes in expert throughput; how
// much of that a kernel gets depends on what unpacking the codes costs (a frac_of_mem_bw well
// below 1 with a time ratio below the bytes ratio says compute-bound). Each figure therefore
// stands next to its limit (STYLE item 9): BM_MemoryBandwidth, run first, measures the
// machine's multi-threaded read bandwidth over a 1 GiB buffer (far beyond the last-level
// cache) in the same process, and every forward benchmark reports its expert-stage GB/s as a
// fraction of it.
//
//   BM_MemoryBandwidth              all threads summing 1 GiB: mem_GBps (the fastest pass)
//   BM_PeerForward/<dtype>/N:<N>    PeerLayer::forward on a random batch; counters:
//     tokens/s         whole forward (route + acquire + experts, input checks included)
//     route_tokens/s   norm + query + sub-key scores + top-k + gates alone
//     route_GFLOPs     the route stage's query and score multiply-adds (2 flops each) per s
//     expert_tokens/s  the expert kernels alone
//     route_ms acquire_ms expert_ms   stage times per batch: where the time goes
//     expert_GBps      record bytes the kernels read (slots * record bytes) / expert time; can
//                      exceed mem_GBps where experts repeat in a batch and hit in the cache
//     unique_GBps      unique records' bytes / expert time: the DRAM traffic floor
//     frac_of_mem_bw   expert_GBps / mem_GBps
//     unique_experts   distinct experts per batch (of T*h*k = 65536 slots at T = 2048)
//     active_slots     fraction of slots with a nonzero gate (a zero gate skips the up row,
//                      which would make the byte counts above overstate the traffic)
//   BM_PeerBackward/<dtype>/N:<N>   PeerLayer::backward on the same batch, dy ~ N(0, 1):
//                      tokens/s, backward_ms, dense_GFLOPs (its two router GEMMs' rate)
//   BM_ExpertsBf16VsInt4/N:<N>      the peer comparison: the same routing through a bf16 and
//                      an int4 table (kernels/cpu/peer.h peer_experts on leased records),
//                      bf16_ms, int4_ms, time_ratio = bf16/int4, bytes_ratio = 8192/2304, and
//                      each table's GB/s and fraction of mem_GBps (its Time is both runs);
//                      bf16_best_ms, int4_best_ms: the fastest pass of each (a loaded machine);
//                      bf16_cpu_ms, int4_cpu_ms: the least process CPU time (all threads) of a
//                      pass, which the others' work on a shared machine inflates far less.
//
// The expert tables are written directly as records (random int4 codes with fp16 scales in
// [0.01, 0.1]; bf16 values ~ N(0, 0.05)) rather than quantized from fp32: 1M bf16 records are
// 8.6 GB and 1M int4 records 2.4 GB. Tables are built in parallel once per (dtype, N) and kept
// while benchmarks at the same N run; one of another N is freed first, so memory peaks at both
// dtypes of the largest N (11 GB at 1M). A table that would not fit in free memory is skipped.
// Building one is mostly page faults (the 1M bf16 table took ~40 s on a 2-core VM).
// The router is W_q and keys ~ N(0, 0.02), the batch x ~ N(0, 1), all seeded.
//
//   build/bench/peer_bench --benchmark_counters_tabular=true
//   build/bench/peer_bench --benchmark_filter='MemoryBandwidth|N:(16K|262K)/'
//   build/bench/peer_bench --benchmark_filter='PeerForward/int4' --peer_tokens=512
//
// (Names end in /iterations:I/real_time, so anchor a filter on "N:16K/", not on "$".)
//
// Flags of this binary (also from the environment as TROVE_BENCH_TOKENS, TROVE_BENCH_ITERS):
//   --peer_tokens=T      tokens per batch (default 2048)
//   --peer_iterations=I  timed batches per forward benchmark (default 5; the comparison runs I
//                        batches per dtype). Iterations are fixed so that a full run at N up to
//                        1M takes minutes; --benchmark_min_time does not apply.
// A filter that skips BM_MemoryBandwidth still gets mem_GBps: it is measured on first need.
#include <benchmark/benchmark.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "base/check.h"
#include "base/dtype.h"
#include "base/half.h"
#include "base/strings.h"
#include "base/thread_pool.h"
#include "kernels/cpu/peer.h"
#include "kernels/peer.h"
#include "kernels/record.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/tiers/expert_source.h"

namespace trove {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kDim = 2048;
constexpr int64_t kHeads = 4;
constexpr int64_t kTopk = 8;
constexpr int64_t kDimKey = 64;
constexpr float kRouterStd = 0.02f;
constexpr float kBf16Std = 0.05f;
constexpr float kScaleMin = 0.01f;
constexpr float kScaleMax = 0.1f;
constexpr int64_t kRecordsPerFillBlock = 1024;  // one PRNG stream per block: thread-independent
constexpr size_t kBandwidthBytes = size_t{1} << 30;

int64_t g_tokens = 2048;
int64_t g_iterations = 5;
double g_mem_gbps = 0;  // fastest read pass of BM_MemoryBandwidth, GB/s

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// "16K", "262K", "1M": the names SPEC §8 gives the expert counts.
std::string experts_label(int64_t n) {
  const int64_t N = n * n;
  if (N >= 1000000) return str_printf("%lldM", static_cast<long long>(N >> 20));
  return str_printf("%lldK", static_cast<long long>(N / 1000));
}

// ---- memory bandwidth --------------------------------------------------------------------------

// One multi-threaded pass summing `words` (each thread a contiguous slice); seconds taken.
// Integer sums in four accumulators vectorize at -O2/-O3 on any x86-64, which is enough to
// saturate DRAM.
double timed_read_pass(const uint64_t* words, size_t count, uint64_t* checksum) {
  std::atomic<uint64_t> total{0};
  const auto start = Clock::now();
  parallel_for(static_cast<int64_t>(count), 0, [&](int64_t begin, int64_t end) {
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    int64_t i = begin;
    for (; i + 4 <= end; i += 4) {
      a0 += words[i];
      a1 += words[i + 1];
      a2 += words[i + 2];
      a3 += words[i + 3];
    }
    for (; i < end; ++i) a0 += words[i];
    total.fetch_add(a0 + a1 + a2 + a3, std::memory_order_relaxed);
  });
  const double seconds = seconds_since(start);
  *checksum += total.load();
  return seconds;
}

// A 1 GiB buffer, first touched by the threads that will read it (so its pages are real and
// local, not the shared zero page).
std::unique_ptr<uint64_t[]> bandwidth_buffer(size_t count) {
  std::unique_ptr<uint64_t[]> words(new uint64_t[count]);
  parallel_for(static_cast<int64_t>(count), 0, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) words[i] = static_cast<uint64_t>(i) * 0x9e3779b9u;
  });
  return words;
}

// mem_GBps: measured here (three passes) unless BM_MemoryBandwidth already did.
double memory_bandwidth_gbps() {
  if (g_mem_gbps > 0) return g_mem_gbps;
  const size_t count = kBandwidthBytes / sizeof(uint64_t);
  const auto words = bandwidth_buffer(count);
  uint64_t checksum = 0;
  double best = 1e30;
  timed_read_pass(words.get(), count, &checksum);  // warm-up
  for (int pass = 0; pass < 3; ++pass) {
    best = std::min(best, timed_read_pass(words.get(), count, &checksum));
  }
  benchmark::DoNotOptimize(checksum);
  g_mem_gbps = static_cast<double>(kBandwidthBytes) / best / 1e9;
  return g_mem_gbps;
}

void BM_MemoryBandwidth(benchmark::State& state) {
  const size_t count = kBandwidthBytes / sizeof(uint64_t);
  const auto words = bandwidth_buffer(count);
  uint64_t checksum = 0;
  timed_read_pass(words.get(), count, &checksum);  // warm-up: TLB, pool threads started
  double best = 1e30;
  for (auto _ : state) best = std::min(best, timed_read_pass(words.get(), count, &checksum));
  benchmark::DoNotOptimize(checksum);
  g_mem_gbps = static_cast<double>(kBandwidthBytes) / best / 1e9;
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBandwidthBytes));
  state.counters["mem_GBps"] = g_mem_gbps;
  state.counters["threads"] = resolve_thread_count(0);
  state.SetLabel("1 GiB, all threads, fastest pass");
}

// ---- synthetic layers --------------------------------------------------------------------------

uint64_t splitmix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// 16-bit patterns of bf16 N(0, kBf16Std) values and of fp16 scales uniform in
// [kScaleMin, kScaleMax], indexed by 16 random bits, so filling gigabytes costs one PRNG call
// per four values.
struct ValueTables {
  std::vector<uint16_t> bf16_normal = std::vector<uint16_t>(65536);
  std::vector<uint16_t> fp16_scale = std::vector<uint16_t>(65536);
  ValueTables() {
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, kBf16Std);
    for (size_t i = 0; i < 65536; ++i) {
      bf16_normal[i] = fp32_to_bf16(normal(rng));
      const float u = (static_cast<float>(i) + 0.5f) / 65536.0f;
      fp16_scale[i] = fp32_to_fp16(kScaleMin + (kScaleMax - kScaleMin) * u);
    }
  }
};

// Fills [begin, end) (a whole number of uint16 values) with table entries, four per PRNG call.
void fill_from_table(uint8_t* begin, uint8_t* end, const uint16_t* table, uint64_t* rng) {
  uint8_t* p = begin;
  for (; p + 8 <= end; p += 8) {
    const uint64_t bits = splitmix64(rng);
    const uint64_t v =
        uint64_t{table[bits & 0xffff]} | uint64_t{table[(bits >> 16) & 0xffff]} << 16 |
        uint64_t{table[(bits >> 32) & 0xffff]} << 32 | uint64_t{table[bits >> 48]} << 48;
    std::memcpy(p, &v, 8);
  }
  for (uint64_t bits = splitmix64(rng); p + 2 <= end; p += 2, bits >>= 16) {
    const uint16_t v = table[bits & 0xffff];
    std::memcpy(p, &v, 2);
  }
}

void fill_random_bytes(uint8_t* begin, uint8_t* end, uint64_t* rng) {
  uint8_t* p = begin;
  for (; p + 8 <= end; p += 8) {
    const uint64_t v = splitmix64(rng);
    std::memcpy(p, &v, 8);
  }
  const uint64_t v = splitmix64(rng);
  std::memcpy(p, &v, static_cast<size_t>(end - p));
}

// N random records of `layout` (bf16, or int8/int4 with random codes and scales), written in
// parallel.
std::vector<uint8_t> random_records(const RecordLayout& layout, int64_t N, uint64_t seed) {
  TROVE_CHECK(layout.dtype == DType::kBF16 || dtype_is_quantized(layout.dtype));
  static const ValueTables tables;
  std::vector<uint8_t> records(static_cast<size_t>(N) * layout.stride);
  const int64_t blocks = (N + kRecordsPerFillBlock - 1) / kRecordsPerFillBlock;
  parallel_for(blocks, 0, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
      uint64_t rng = seed ^ (static_cast<uint64_t>(b) * 0xd1b54a32d192ed03ull);
      const int64_t e_end = std::min(N, (b + 1) * kRecordsPerFillBlock);
      for (int64_t e = b * kRecordsPerFillBlock; e < e_end; ++e) {
        uint8_t* r = records.data() + static_cast<size_t>(e) * layout.stride;
        if (layout.dtype == DType::kBF16) {
          fill_from_table(r, r + layout.record_bytes, tables.bf16_normal.data(), &rng);
        } else {  // [down scales][up scales] fp16, then [down codes][up codes]
          fill_from_table(r, r + layout.down_codes_offset, tables.fp16_scale.data(), &rng);
          fill_random_bytes(r + layout.down_codes_offset, r + layout.record_bytes, &rng);
        }
      }
    }
  });
  return records;
}

std::vector<float> normal_floats(size_t count, float stddev, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(count);
  for (float& f : v) f = dist(rng);
  return v;
}

PeerConfig bench_config(int64_t n) {
  PeerConfig c;
  c.dim = kDim;
  c.dim_out = kDim;
  c.heads = kHeads;
  c.n_keys = n;
  c.dim_key = kDimKey;
  c.topk = kTopk;
  c.topk_per_half = kTopk;
  c.activation = Activation::kSilu;
  c.gate = Gate::kRelu;
  c.input_norm = InputNorm::kNone;
  return c;
}

// Layers built so far, at most one N at a time (both dtypes of it). Router parameters depend
// only on n, so the int4 and bf16 layers of one N route identically.
struct CachedLayer {
  DType dtype;
  int64_t n;
  std::unique_ptr<PeerLayer> layer;
};
std::vector<CachedLayer> g_layers;

// MemAvailable (free memory plus what the page cache would give back), or free pages where
// /proc/meminfo has no such line.
size_t available_memory_bytes() {
  if (std::FILE* f = std::fopen("/proc/meminfo", "r"); f != nullptr) {
    char line[256];
    unsigned long long kib = 0;
    bool found = false;
    while (!found && std::fgets(line, sizeof(line), f) != nullptr) {
      found = std::sscanf(line, "MemAvailable: %llu kB", &kib) == 1;
    }
    std::fclose(f);
    if (found) return static_cast<size_t>(kib) * 1024;
  }
  return static_cast<size_t>(sysconf(_SC_AVPHYS_PAGES)) * static_cast<size_t>(getpagesize());
}

// The layer of (dtype, n), built on first use; nullptr (and the benchmark skipped with the
// reason) when it cannot be.
PeerLayer* cached_layer(benchmark::State& state, DType dtype, int64_t n) {
  for (const CachedLayer& c : g_layers) {
    if (c.dtype == dtype && c.n == n) return c.layer.get();
  }
  std::erase_if(g_layers, [&](const CachedLayer& c) { return c.n != n; });
  const RecordLayout layout = RecordLayout::make(dtype, kDim, kDim).value();
  const int64_t N = n * n;
  const size_t bytes = static_cast<size_t>(N) * layout.stride;
  if (bytes > available_memory_bytes() / 10 * 9) {
    state.SkipWithError(str_printf("the %s table of %lld experts needs %.1f GB; %.1f GB free",
                                   std::string(dtype_name(dtype)).c_str(),
                                   static_cast<long long>(N), bytes / 1e9,
                                   available_memory_bytes() / 1e9)
                            .c_str());
    return nullptr;
  }
  const auto start = Clock::now();
  auto source = std::make_unique<MemoryExpertSource>(
      layout, random_records(layout, N, 0x7065657200000000ull + static_cast<uint64_t>(n)));
  const PeerConfig config = bench_config(n);
  PeerDenseParams params;
  params.query_weight =
      normal_floats(static_cast<size_t>(config.query_rows() * kDim), kRouterStd, 11);
  params.keys = normal_floats(static_cast<size_t>(kHeads * 2 * n * kDimKey), kRouterStd, 13 + n);
  auto layer = PeerLayer::create(config, std::move(params), std::move(source));
  if (!layer.ok()) {
    state.SkipWithError(layer.status().to_string().c_str());
    return nullptr;
  }
  std::fprintf(stderr, "peer_bench: built the %s table of %s experts (%.2f GB) in %.1f s\n",
               std::string(dtype_name(dtype)).c_str(), experts_label(n).c_str(), bytes / 1e9,
               seconds_since(start));
  g_layers.push_back({dtype, n, std::make_unique<PeerLayer>(std::move(layer).value())});
  return g_layers.back().layer.get();
}

// The batch x [T, D] ~ N(0, 1), shared by every benchmark.
const std::vector<float>& batch_input() {
  static const std::vector<float> x = normal_floats(static_cast<size_t>(g_tokens * kDim), 1.0f, 17);
  return x;
}

double active_slot_fraction(const PeerRouting& routing) {
  if (routing.gates.empty()) return 0;
  const auto active =
      std::count_if(routing.gates.begin(), routing.gates.end(), [](float g) { return g != 0.0f; });
  return static_cast<double>(active) / static_cast<double>(routing.gates.size());
}

// Multiply-adds of the route stage, as flops: the query W_q x and every sub-key score (the
// top-k selection and gates are O(n) and O(k^2) per head on top).
double route_flops(const PeerConfig& c, int64_t T) {
  const double query = 2.0 * static_cast<double>(c.query_rows() * c.dim);
  const double scores = 2.0 * static_cast<double>(c.heads * 2 * c.n_keys * c.dim_key);
  return static_cast<double>(T) * (query + scores);
}

// ---- benchmarks --------------------------------------------------------------------------------

void BM_PeerForward(benchmark::State& state, DType dtype, int64_t n) {
  const double mem_gbps = memory_bandwidth_gbps();
  PeerLayer* layer = cached_layer(state, dtype, n);
  if (layer == nullptr) return;
  const int64_t T = g_tokens;
  const std::vector<float>& x = batch_input();
  std::vector<float> y(static_cast<size_t>(T * kDim));
  PeerRouting routing;
  PeerBatchStats stats;
  if (Status s = layer->forward(x, T, y, &routing, &stats); !s.ok()) {  // warm-up
    state.SkipWithError(s.to_string().c_str());
    return;
  }
  double forward_s = 0, route_s = 0, acquire_s = 0, expert_s = 0;
  double used_bytes = 0, unique_bytes = 0, unique_experts = 0;
  for (auto _ : state) {
    const auto start = Clock::now();
    if (Status s = layer->forward(x, T, y, &routing, &stats); !s.ok()) {
      state.SkipWithError(s.to_string().c_str());
      return;
    }
    forward_s += seconds_since(start);
    route_s += stats.route_seconds;
    acquire_s += stats.acquire_seconds;
    expert_s += stats.expert_seconds;
    used_bytes += static_cast<double>(stats.record_bytes_used);
    unique_bytes += static_cast<double>(stats.record_bytes_unique);
    unique_experts += static_cast<double>(stats.unique_experts);
  }
  const auto iterations = static_cast<double>(state.iterations());
  const double tokens = static_cast<double>(T) * iterations;
  const double expert_gbps = used_bytes / expert_s / 1e9;
  state.counters["tokens/s"] = tokens / forward_s;
  state.counters["route_tokens/s"] = tokens / route_s;
  state.counters["expert_tokens/s"] = tokens / expert_s;
  state.counters["route_GFLOPs"] = route_flops(layer->config(), T) * iterations / route_s / 1e9;
  state.counters["route_ms"] = route_s / iterations * 1e3;
  state.counters["acquire_ms"] = acquire_s / iterations * 1e3;
  state.counters["expert_ms"] = expert_s / iterations * 1e3;
  state.counters["expert_GBps"] = expert_gbps;
  state.counters["unique_GBps"] = unique_bytes / expert_s / 1e9;
  state.counters["mem_GBps"] = mem_gbps;
  state.counters["frac_of_mem_bw"] = expert_gbps / mem_gbps;
  state.counters["unique_experts"] = unique_experts / iterations;
  state.counters["active_slots"] = active_slot_fraction(routing);
  state.SetLabel(str_printf("T=%lld, %zu B records", static_cast<long long>(T),
                            layer->record_layout().record_bytes));
}

// PeerLayer::backward on the batch with dy ~ N(0, 1): the layer's training step on the CPU less
// the update. Counters: tokens/s, backward_ms, and dense_GFLOPs, the rate of its two dense
// products (dx += dq W_q and dW_q = dq^T xhat, 2 * T * rows * D multiply-adds).
void BM_PeerBackward(benchmark::State& state, DType dtype, int64_t n) {
  PeerLayer* layer = cached_layer(state, dtype, n);
  if (layer == nullptr) return;
  const int64_t T = g_tokens;
  const std::vector<float>& x = batch_input();
  static const std::vector<float> dy = normal_floats(static_cast<size_t>(T * kDim), 1.0f, 19);
  PeerGrads grads;
  if (Status s = layer->backward(x, T, dy, &grads); !s.ok()) {  // warm-up
    state.SkipWithError(s.to_string().c_str());
    return;
  }
  double seconds = 0;
  for (auto _ : state) {
    const auto start = Clock::now();
    if (Status s = layer->backward(x, T, dy, &grads); !s.ok()) {
      state.SkipWithError(s.to_string().c_str());
      return;
    }
    seconds += seconds_since(start);
  }
  const auto iterations = static_cast<double>(state.iterations());
  const PeerConfig& c = layer->config();
  const double dense_flops = 4.0 * static_cast<double>(T * c.query_rows() * c.dim);
  state.counters["tokens/s"] = static_cast<double>(T) * iterations / seconds;
  state.counters["backward_ms"] = seconds / iterations * 1e3;
  state.counters["dense_GFLOPs"] = dense_flops * iterations / seconds / 1e9;
  state.SetLabel(str_printf("T=%lld", static_cast<long long>(T)));
}

// The expert stage of one table on a fixed routing: the records of its unique experts leased
// for the whole measurement.
struct ExpertStage {
  PeerLayer* layer = nullptr;
  std::vector<int64_t> unique_ids;
  std::vector<const uint8_t*> slot_records;

  Status lease(const PeerRouting& routing) {
    unique_ids = routing.ids;
    std::sort(unique_ids.begin(), unique_ids.end());
    unique_ids.erase(std::unique(unique_ids.begin(), unique_ids.end()), unique_ids.end());
    std::vector<const uint8_t*> unique_records(unique_ids.size());
    TROVE_RETURN_IF_ERROR(layer->experts().acquire(unique_ids, unique_records));
    slot_records.resize(routing.ids.size());
    for (size_t s = 0; s < routing.ids.size(); ++s) {
      const auto it = std::lower_bound(unique_ids.begin(), unique_ids.end(), routing.ids[s]);
      slot_records[s] = unique_records[static_cast<size_t>(it - unique_ids.begin())];
    }
    return Status::ok_status();
  }
  void release() { layer->experts().release(unique_ids); }

  // Wall seconds; *cpu_seconds (when given) gets the process's CPU seconds over the same call,
  // every thread's: on a machine others load, it does not count the time they hold the cores.
  double run(const float* xhat, const PeerRouting& routing, float* y,
             double* cpu_seconds = nullptr) const {
    const double cpu_start = process_cpu_seconds();
    const auto start = Clock::now();
    peer_experts(layer->config(), layer->record_layout(), xhat, routing, slot_records.data(), y);
    const double wall = seconds_since(start);
    if (cpu_seconds != nullptr) *cpu_seconds = process_cpu_seconds() - cpu_start;
    return wall;
  }

  static double process_cpu_seconds() {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  }
};

void BM_ExpertsBf16VsInt4(benchmark::State& state, int64_t n) {
  const double mem_gbps = memory_bandwidth_gbps();
  ExpertStage bf16, int4;
  bf16.layer = cached_layer(state, DType::kBF16, n);
  if (bf16.layer == nullptr) return;
  int4.layer = cached_layer(state, DType::kI4, n);
  if (int4.layer == nullptr) return;
  const int64_t T = g_tokens;
  const std::vector<float>& x = batch_input();
  std::vector<float> y(static_cast<size_t>(T * kDim));
  PeerRouting routing;
  Status status = int4.layer->forward(x, T, y, &routing);
  if (status.ok()) status = bf16.lease(routing);
  if (status.ok()) {
    status = int4.lease(routing);
    if (!status.ok()) bf16.release();
  }
  if (!status.ok()) {
    state.SkipWithError(status.to_string().c_str());
    return;
  }
  // input_norm is none, so xhat = x.
  bf16.run(x.data(), routing, y.data());  // warm-up
  int4.run(x.data(), routing, y.data());
  double bf16_s = 0, int4_s = 0, bf16_best = 1e30, int4_best = 1e30;
  double bf16_cpu_best = 1e30, int4_cpu_best = 1e30;
  for (auto _ : state) {
    double bf16_cpu = 0, int4_cpu = 0;
    const double b = bf16.run(x.data(), routing, y.data(), &bf16_cpu);
    const double i = int4.run(x.data(), routing, y.data(), &int4_cpu);
    bf16_s += b;
    int4_s += i;
    bf16_best = std::min(bf16_best, b);
    int4_best = std::min(int4_best, i);
    bf16_cpu_best = std::min(bf16_cpu_best, bf16_cpu);
    int4_cpu_best = std::min(int4_cpu_best, int4_cpu);
  }
  bf16.release();
  int4.release();
  const auto iterations = static_cast<double>(state.iterations());
  const double slots = static_cast<double>(routing.slots());
  const double bf16_record = static_cast<double>(bf16.layer->record_layout().record_bytes);
  const double int4_record = static_cast<double>(int4.layer->record_layout().record_bytes);
  const double bf16_gbps = slots * bf16_record * iterations / bf16_s / 1e9;
  const double int4_gbps = slots * int4_record * iterations / int4_s / 1e9;
  state.counters["bf16_ms"] = bf16_s / iterations * 1e3;
  state.counters["int4_ms"] = int4_s / iterations * 1e3;
  // The fastest pass of each: on a machine others load, the least disturbed.
  state.counters["bf16_best_ms"] = bf16_best * 1e3;
  state.counters["int4_best_ms"] = int4_best * 1e3;
  state.counters["bf16_cpu_ms"] = bf16_cpu_best * 1e3;  // all threads' CPU time, fastest pass
  state.counters["int4_cpu_ms"] = int4_cpu_best * 1e3;
  state.counters["time_ratio"] = bf16_s / int4_s;
  state.counters["bytes_ratio"] = bf16_record / int4_record;
  state.counters["bf16_GBps"] = bf16_gbps;
  state.counters["int4_GBps"] = int4_gbps;
  state.counters["mem_GBps"] = mem_gbps;
  state.counters["bf16_frac_bw"] = bf16_gbps / mem_gbps;
  state.counters["int4_frac_bw"] = int4_gbps / mem_gbps;
  state.counters["unique_experts"] = static_cast<double>(bf16.unique_ids.size());
  state.SetLabel(str_printf("T=%lld, time_ratio = bf16/int4", static_cast<long long>(T)));
}

// ---- flags -------------------------------------------------------------------------------------

// Reads --name=value (removed from argv) or the environment variable; `fallback` otherwise.
int64_t int_flag(int* argc, char** argv, std::string_view name, const char* env, int64_t fallback) {
  int64_t value = fallback;
  if (const char* e = std::getenv(env); e != nullptr && *e != '\0') value = std::atoll(e);
  const std::string prefix = "--" + std::string(name) + "=";
  int out = 1;
  for (int i = 1; i < *argc; ++i) {
    if (std::string_view(argv[i]).starts_with(prefix)) {
      value = std::atoll(argv[i] + prefix.size());
    } else {
      argv[out++] = argv[i];
    }
  }
  *argc = out;
  return value;
}

void register_benchmarks() {
  benchmark::RegisterBenchmark("BM_MemoryBandwidth", BM_MemoryBandwidth)
      ->Iterations(5)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  for (const int64_t n : {128, 512, 1024}) {
    const std::string experts = experts_label(n);
    for (const DType dtype : {DType::kI4, DType::kBF16}) {
      const std::string name = "BM_PeerForward/" + std::string(dtype_name(dtype)) + "/N:" + experts;
      benchmark::RegisterBenchmark(name.c_str(), BM_PeerForward, dtype, n)
          ->Iterations(g_iterations)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
    for (const DType dtype : {DType::kI4, DType::kBF16}) {
      const std::string name =
          "BM_PeerBackward/" + std::string(dtype_name(dtype)) + "/N:" + experts;
      benchmark::RegisterBenchmark(name.c_str(), BM_PeerBackward, dtype, n)
          ->Iterations(g_iterations)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
    const std::string name = "BM_ExpertsBf16VsInt4/N:" + experts;
    benchmark::RegisterBenchmark(name.c_str(), BM_ExpertsBf16VsInt4, n)
        ->Iterations(g_iterations)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace
}  // namespace trove

int main(int argc, char** argv) {
  trove::g_tokens = trove::int_flag(&argc, argv, "peer_tokens", "TROVE_BENCH_TOKENS", 2048);
  trove::g_iterations = trove::int_flag(&argc, argv, "peer_iterations", "TROVE_BENCH_ITERS", 5);
  if (trove::g_tokens < 1 || trove::g_iterations < 1) {
    std::fprintf(stderr, "peer_bench: --peer_tokens and --peer_iterations must be >= 1\n");
    return 2;
  }
  trove::register_benchmarks();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
