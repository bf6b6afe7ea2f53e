// The int4 training update (train_update_records, kernels/train.h) timed beside memcpy of the
// bytes it touches: the update reads every gradient (fp32), reads and writes every record and
// accumulator, so a memcpy moving the same number of bytes (half read, half written) is the
// physical limit of a pass over that data. Both report the same two rates:
//   elements/s  record elements updated per second (for memcpy: the elements of the update it
//               stands for, i.e. the element rate at which the update would be memory-bound);
//   bytes/s     bytes touched per second (read + written).
// The update's fraction of the limit is its bytes/s over memcpy's at the same shape and threads.
//
// Shapes: the background config (D = D_out = 2048, width 1) and a small one (D = D_out = 256),
// int8 training layout, records imported from int4 serving records packed from N(0, 1)
// weights (so scales are ~0.3 and codes multiples of 16). Gradient regimes, for both
// optimizers (Adagrad's first step has a ~= lr, so the same lr gives the same step):
//   small       |16Δ/d| ~ 0.5 code LSB: the common case; still a quarter of the groups rescale
//               once (Q4_0 puts each group's largest weight on code -128 or 112);
//   saturating  |16Δ/d| ~ 250 code LSB: most groups double their scale a few times.
// Each iteration restores the records and accumulators (untimed), so every iteration does the
// same work. Paths: ref (the oracle, one thread), scalar and avx2 (the dispatching kernel with
// set_cpu_path), threads 1 and the hardware concurrency.
//
//   train_bench --benchmark_min_time=0.2
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "base/check.h"
#include "base/thread_pool.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/ref/train_ref.h"
#include "kernels/cpu/train.h"
#include "kernels/quant.h"
#include "kernels/record.h"
#include "kernels/train.h"

namespace trove {
namespace {

// Elements per iteration, about the same for both shapes: 4 Mi fp32 gradients (16 MiB) plus
// 4 MiB of codes, beyond the caches of the machines we run on.
constexpr int64_t kElements = int64_t{1} << 22;

enum class Path { kRef, kScalar, kAvx2 };
enum class Regime { kSmall, kSaturating };

RecordLayout layout_of(DType t, int64_t dim) {
  auto l = RecordLayout::make(t, dim, dim, 1);
  TROVE_CHECK(l.ok());
  return *l;
}

struct Workload {
  RecordLayout training;
  int64_t count = 0;
  std::vector<int64_t> experts;
  std::vector<uint8_t> records;  // pristine: restored before each iteration
  std::vector<float> down, up;
  int64_t elements = 0;       // record elements updated per iteration
  int64_t bytes_touched = 0;  // read + written per iteration
};

Workload make_workload(int64_t dim, bool adagrad) {
  Workload w;
  const RecordLayout serving = layout_of(DType::kI4, dim);
  w.training = layout_of(DType::kI8, dim);
  w.count = kElements / (2 * dim);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto normals = [&](int64_t n) {
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = normal(rng);
    return v;
  };
  const auto wd = normals(w.count * dim);
  const auto wu = normals(w.count * dim);
  std::vector<uint8_t> served(static_cast<size_t>(w.count) * serving.stride);
  pack_records(serving, wd.data(), wu.data(), w.count, served.data());
  w.records.resize(static_cast<size_t>(w.count) * w.training.stride);
  TROVE_CHECK(
      train_import_records(serving, w.training, served.data(), w.count, w.records.data()).ok());
  w.down = normals(w.count * dim);
  w.up = normals(w.count * dim);
  w.experts.resize(static_cast<size_t>(w.count));
  for (int64_t i = 0; i < w.count; ++i) w.experts[static_cast<size_t>(i)] = 1000 + 3 * i;
  w.elements = w.count * 2 * dim;
  const int64_t accum_bytes = adagrad ? w.count * 2 * static_cast<int64_t>(sizeof(float)) : 0;
  w.bytes_touched = w.elements * static_cast<int64_t>(sizeof(float)) +
                    2 * w.count * static_cast<int64_t>(w.training.record_bytes) + 2 * accum_bytes;
  return w;
}

void set_rates(benchmark::State& state, const Workload& w) {
  state.counters["elements/s"] = benchmark::Counter(
      static_cast<double>(state.iterations() * w.elements), benchmark::Counter::kIsRate);
  state.SetBytesProcessed(state.iterations() * w.bytes_touched);
}

// Selects the path for the dispatching kernel; false (the benchmark skipped) when the CPU
// cannot run it.
bool select_path(benchmark::State& state, Path path) {
  set_cpu_path(CpuPath::kAuto);
  if (path == Path::kAvx2) {
    if (!cpu_path_supported(CpuPath::kAvx2)) {
      state.SkipWithError("CPU lacks AVX2/FMA/F16C");
      return false;
    }
    set_cpu_path(CpuPath::kAvx2);
  } else if (path == Path::kScalar) {
    set_cpu_path(CpuPath::kScalar);
  }
  return true;
}

// Args: dim, threads (0: hardware concurrency).
void BM_TrainUpdate(benchmark::State& state, Path path, TrainOptimizer opt, Regime regime) {
  if (!select_path(state, path)) return;
  const int64_t dim = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const bool adagrad = opt == TrainOptimizer::kAdagrad;
  const Workload w = make_workload(dim, adagrad);
  TrainStep step;
  step.optimizer = opt;
  step.lr = regime == Regime::kSmall ? 0.01f : 5.0f;
  step.eps = 1e-8f;
  step.seed = 0x5eed;
  step.step = 12;
  step.table = 2;
  std::vector<uint8_t> records = w.records;
  const std::vector<float> accum0(adagrad ? static_cast<size_t>(w.count * 2) : 0, 0.0f);
  std::vector<float> accum = accum0;
  TrainStats stats;
  for (auto _ : state) {
    state.PauseTiming();
    std::memcpy(records.data(), w.records.data(), records.size());
    std::copy(accum0.begin(), accum0.end(), accum.begin());
    state.ResumeTiming();
    auto r = path == Path::kRef ? train_update_records_ref(
                                      w.training, step, w.experts.data(), w.count, w.down.data(),
                                      w.up.data(), records.data(), adagrad ? accum.data() : nullptr)
                                : train_update_records(w.training, step, w.experts.data(), w.count,
                                                       w.down.data(), w.up.data(), records.data(),
                                                       adagrad ? accum.data() : nullptr, threads);
    if (!r.ok()) {
      state.SkipWithError(r.status().to_string().c_str());
      break;
    }
    stats = *r;
    benchmark::DoNotOptimize(records.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, w);
  const double groups = static_cast<double>(w.elements) / kQuantGroup;
  state.counters["rescales/group"] = static_cast<double>(stats.rescales) / groups;
  state.counters["changed/element"] =
      static_cast<double>(stats.elements_changed) / static_cast<double>(w.elements);
  set_cpu_path(CpuPath::kAuto);
}

// The limit: memcpy of bytes_touched / 2 bytes (so bytes_touched are read + written), split
// over the threads as the update is. Args: dim, threads.
void BM_MemcpyLimit(benchmark::State& state) {
  const int64_t dim = state.range(0);
  const int threads = resolve_thread_count(static_cast<int>(state.range(1)));
  const Workload w = make_workload(dim, /*adagrad=*/false);
  const auto half = static_cast<size_t>(w.bytes_touched / 2);
  std::vector<uint8_t> src(half, 0x5a), dst(half);
  for (auto _ : state) {
    parallel_for(threads, threads, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const size_t lo = half * static_cast<size_t>(c) / static_cast<size_t>(threads);
        const size_t hi = half * static_cast<size_t>(c + 1) / static_cast<size_t>(threads);
        std::memcpy(dst.data() + lo, src.data() + lo, hi - lo);
      }
    });
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  set_rates(state, w);
}

void shape_args(benchmark::internal::Benchmark* b) {
  const int all = resolve_thread_count(0);
  for (int64_t dim : {2048, 256}) {
    b->Args({dim, 1});
    if (all > 1) b->Args({dim, all});
  }
  b->ArgNames({"D", "threads"});
  b->UseRealTime();
  b->Unit(benchmark::kMillisecond);
}

void ref_args(benchmark::internal::Benchmark* b) {
  for (int64_t dim : {2048, 256}) b->Args({dim, 1});
  b->ArgNames({"D", "threads"});
  b->UseRealTime();
  b->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_MemcpyLimit)->Apply(shape_args);

#define TROVE_TRAIN_BENCH(name, path, opt, regime, args) \
  BENCHMARK_CAPTURE(BM_TrainUpdate, name, path, opt, regime)->Apply(args)

TROVE_TRAIN_BENCH(sgd_small_avx2, Path::kAvx2, TrainOptimizer::kSgd, Regime::kSmall, shape_args);
TROVE_TRAIN_BENCH(sgd_saturating_avx2, Path::kAvx2, TrainOptimizer::kSgd, Regime::kSaturating,
                  shape_args);
TROVE_TRAIN_BENCH(adagrad_small_avx2, Path::kAvx2, TrainOptimizer::kAdagrad, Regime::kSmall,
                  shape_args);
TROVE_TRAIN_BENCH(adagrad_saturating_avx2, Path::kAvx2, TrainOptimizer::kAdagrad,
                  Regime::kSaturating, shape_args);
TROVE_TRAIN_BENCH(sgd_small_scalar, Path::kScalar, TrainOptimizer::kSgd, Regime::kSmall,
                  shape_args);
TROVE_TRAIN_BENCH(sgd_saturating_scalar, Path::kScalar, TrainOptimizer::kSgd, Regime::kSaturating,
                  shape_args);
TROVE_TRAIN_BENCH(adagrad_small_scalar, Path::kScalar, TrainOptimizer::kAdagrad, Regime::kSmall,
                  shape_args);
TROVE_TRAIN_BENCH(adagrad_saturating_scalar, Path::kScalar, TrainOptimizer::kAdagrad,
                  Regime::kSaturating, shape_args);
TROVE_TRAIN_BENCH(sgd_small_ref, Path::kRef, TrainOptimizer::kSgd, Regime::kSmall, ref_args);
TROVE_TRAIN_BENCH(adagrad_saturating_ref, Path::kRef, TrainOptimizer::kAdagrad, Regime::kSaturating,
                  ref_args);

#undef TROVE_TRAIN_BENCH

}  // namespace
}  // namespace trove

BENCHMARK_MAIN();
