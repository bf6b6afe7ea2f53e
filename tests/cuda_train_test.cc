// The CUDA training update (kernels/cuda/train_cuda.h) against the oracle
// (kernels/cpu/ref/train_ref.h): records, Adagrad accumulators and stats byte for byte, on the
// shapes, gradient regimes and optimizers of tests/train_update_test.cc's CPU parity test,
// through both the host-pointer and the device-pointer entry. Tests that need a GPU skip with a
// message when none is present; argument checks, bad input and the no-device error run
// everywhere (they come before any device work).
#include <cuda_runtime.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "base/half.h"
#include "kernels/cpu/ref/train_ref.h"
#include "kernels/cpu/train.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/train_cuda.h"
#include "kernels/quant.h"
#include "kernels/record.h"
#include "kernels/train.h"
#include "tests/train_test_util.h"

namespace trove {
namespace {

using ::testing::HasSubstr;

using testing::adagrad;
using testing::layout_of;
using testing::normal;
using testing::row_of;
using testing::sgd;

// tests/train_update_test.cc's records, with the bytes after record_bytes 0xA5, which no path may
// touch.
std::vector<uint8_t> random_training_records(const RecordLayout& l, int64_t count,
                                             std::mt19937& rng) {
  return testing::random_training_records(l, count, rng, /*zero_scale_rate=*/0.1, /*tail=*/0xA5);
}

bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Owns device memory for the device-pointer entry's tests (cudaMalloc/cudaFree).
template <typename T>
class DeviceVector {
 public:
  explicit DeviceVector(const std::vector<T>& host) : size_(host.size()) {
    if (size_ == 0) return;
    EXPECT_EQ(cudaMalloc(&ptr_, size_ * sizeof(T)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(ptr_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  ~DeviceVector() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceVector(const DeviceVector&) = delete;
  DeviceVector& operator=(const DeviceVector&) = delete;

  T* get() const { return static_cast<T*>(ptr_); }
  std::vector<T> to_host() const {
    std::vector<T> host(size_);
    if (size_ > 0) {
      EXPECT_EQ(cudaMemcpy(host.data(), ptr_, size_ * sizeof(T), cudaMemcpyDeviceToHost),
                cudaSuccess);
    }
    return host;
  }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

class CudaTrainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) {
      GTEST_SKIP() << "no CUDA device: cuda_device_count() is 0 (no driver or no GPU); the "
                      "CUDA training update is compiled but not run";
    }
  }
};

// ---- parity with the oracle ----------------------------------------------------------------

struct Case {
  int64_t dim, dim_out, width, count;
};

// The CPU parity test's cases: odd dims 1..257, widths 1..4; gradients from small steps to zero
// to saturating ones that force doublings; both optimizers; three steps each, so accumulators
// and rescaled scales carry over. 7 shapes x 4 regimes x 2 optimizers = 56 cases, each run
// through the host entry and the device entry.
TEST_F(CudaTrainTest, EqualsTheOracleByteForByteAcrossShapesRegimesAndOptimizers) {
  const Case cases[] = {{32, 32, 1, 1},  {45, 70, 3, 5},  {1, 1, 1, 7},  {100, 33, 2, 4},
                        {257, 31, 1, 3}, {64, 200, 4, 9}, {96, 17, 1, 2}};
  const float sigmas[] = {0.002f, 0.0f, 0.05f, 3.0f};
  const int kTolerances[] = {0, 64, 16};
  std::mt19937 rng(61);
  int cases_run = 0;
  int64_t rescales = 0, inits = 0;
  for (const Case& c : cases) {
    const RecordLayout l = layout_of(DType::kI8, c.dim, c.dim_out, c.width);
    for (float sigma : sigmas) {
      for (TrainOptimizer opt : {TrainOptimizer::kSgd, TrainOptimizer::kAdagrad}) {
        SCOPED_TRACE("shape " + std::to_string(c.dim) + "x" + std::to_string(c.dim_out) + "x" +
                     std::to_string(c.width) + " count " + std::to_string(c.count) + " sigma " +
                     std::to_string(sigma) + (opt == TrainOptimizer::kSgd ? " sgd" : " adagrad"));
        const auto start = random_training_records(l, c.count, rng);
        std::vector<int64_t> experts(static_cast<size_t>(c.count));
        for (auto& e : experts) e = rng() % 100000;
        std::vector<float> acc0(static_cast<size_t>(c.count * 2 * c.width));
        for (float& a : acc0) a = std::uniform_real_distribution<float>(0.0f, 1e-3f)(rng);
        std::vector<std::vector<float>> downs, ups;
        for (int s = 0; s < 3; ++s) {
          downs.push_back(normal(static_cast<size_t>(c.count * c.width * c.dim), sigma, rng));
          ups.push_back(normal(static_cast<size_t>(c.count * c.width * c.dim_out), sigma, rng));
        }
        const auto step_of = [&](int s) {
          TrainStep st = opt == TrainOptimizer::kSgd ? sgd(0.5f, 100 + s) : adagrad(0.05f, s);
          st.saturation_tolerance = kTolerances[s];  // rescale-always, then clamping
          return st;
        };

        auto want = start;
        auto want_acc = acc0;
        std::vector<TrainStats> want_stats;
        for (int s = 0; s < 3; ++s) {
          auto r = train_update_records_ref(l, step_of(s), experts.data(), c.count, downs[s].data(),
                                            ups[s].data(), want.data(), want_acc.data());
          ASSERT_TRUE(r.ok()) << r.status().to_string();
          want_stats.push_back(*r);
          rescales += r->rescales;
          inits += r->scale_inits;
        }

        // Host entry.
        auto got = start;
        auto got_acc = acc0;
        for (int s = 0; s < 3; ++s) {
          auto r =
              cuda_train_update_records(l, step_of(s), experts.data(), c.count, downs[s].data(),
                                        ups[s].data(), got.data(), got_acc.data());
          ASSERT_TRUE(r.ok()) << r.status().to_string();
          EXPECT_EQ(*r, want_stats[static_cast<size_t>(s)]) << "step " << s;
        }
        ASSERT_EQ(got, want) << "host entry: records differ";
        ASSERT_TRUE(bits_equal(got_acc, want_acc)) << "host entry: accumulators differ";

        // Device entry on the default stream, inputs checked on the device.
        DeviceVector<uint8_t> d_recs(start);
        DeviceVector<float> d_acc(acc0);
        DeviceVector<int64_t> d_experts(experts);
        for (int s = 0; s < 3; ++s) {
          DeviceVector<float> d_down(downs[s]), d_up(ups[s]);
          auto r = cuda_train_update_records_device(
              l, step_of(s), d_experts.get(), c.count, d_down.get(), d_up.get(), d_recs.get(),
              opt == TrainOptimizer::kAdagrad ? d_acc.get() : nullptr);
          ASSERT_TRUE(r.ok()) << r.status().to_string();
          EXPECT_EQ(*r, want_stats[static_cast<size_t>(s)]) << "device entry, step " << s;
        }
        ASSERT_EQ(d_recs.to_host(), want) << "device entry: records differ";
        if (opt == TrainOptimizer::kAdagrad) {
          ASSERT_TRUE(bits_equal(d_acc.to_host(), want_acc)) << "device entry: accumulators";
        }
        ++cases_run;
      }
    }
  }
  EXPECT_EQ(cases_run, 56);
  EXPECT_GT(rescales, 0);  // the saturating regime did saturate
  EXPECT_GT(inits, 0);     // and zero scales took a scale
  std::printf("[ figure ] %d CUDA parity cases, %lld rescales, %lld scale inits\n", cases_run,
              static_cast<long long>(rescales), static_cast<long long>(inits));
}

// Many records per launch (more than the grid holds at once) and a long row: the grid-stride
// loop over records and the warp-per-group loop of a wide record.
TEST_F(CudaTrainTest, ManyRecordsAndWideRowsEqualTheOracle) {
  const Case cases[] = {{2048, 2048, 1, 300}, {33, 65, 2, 20000}};
  std::mt19937 rng(71);
  for (const Case& c : cases) {
    const RecordLayout l = layout_of(DType::kI8, c.dim, c.dim_out, c.width);
    const auto start = random_training_records(l, c.count, rng);
    std::vector<int64_t> experts(static_cast<size_t>(c.count));
    for (size_t i = 0; i < experts.size(); ++i) experts[i] = static_cast<int64_t>(i) * 7919;
    std::vector<float> acc(static_cast<size_t>(c.count * 2 * c.width), 1e-4f);
    const auto down = normal(static_cast<size_t>(c.count * c.width * c.dim), 0.05f, rng);
    const auto up = normal(static_cast<size_t>(c.count * c.width * c.dim_out), 0.05f, rng);
    auto want = start;
    auto want_acc = acc;
    auto w = train_update_records(l, adagrad(0.05f, 9), experts.data(), c.count, down.data(),
                                  up.data(), want.data(), want_acc.data());
    ASSERT_TRUE(w.ok()) << w.status().to_string();
    auto got = start;
    auto got_acc = acc;
    auto g = cuda_train_update_records(l, adagrad(0.05f, 9), experts.data(), c.count, down.data(),
                                       up.data(), got.data(), got_acc.data());
    ASSERT_TRUE(g.ok()) << g.status().to_string();
    EXPECT_EQ(*g, *w);
    EXPECT_EQ(got, want) << c.dim << "x" << c.dim_out << "x" << c.width;
    EXPECT_TRUE(bits_equal(got_acc, want_acc));
  }
}

TEST_F(CudaTrainTest, ScaleOverflowIsAnErrorThatLeavesOnlyThatRecordUnchanged) {
  const RecordLayout l = layout_of(DType::kI8, 32, 32, 1);
  std::vector<uint8_t> recs(3 * l.stride, 0);
  for (int i = 0; i < 3; ++i) {
    for (int r = 0; r < 2; ++r) {
      row_of(l, recs.data() + i * l.stride, r).scales[0] = fp32_to_fp16(i == 1 ? 60000.0f : 1.0f);
    }
  }
  std::vector<float> down(96, 0.0f), up(96, 0.0f);
  down[0] = 0.1f;        // record 0: fine
  down[32 + 3] = -1e9f;  // record 1: needs d far beyond fp16
  up[64 + 7] = 0.2f;     // record 2: fine
  std::vector<float> acc(6, 0.5f);
  const int64_t experts[3] = {4, 7, 9};
  // Adagrad normalizes the step; at lr 1e5 record 1 still needs a doubling past 65504 while
  // records 0 and 2 rescale and fit.
  for (const TrainStep& st : {sgd(1.0f), adagrad(1e5f)}) {
    auto want = recs;
    auto want_acc = acc;
    auto w = train_update_records_ref(l, st, experts, 3, down.data(), up.data(), want.data(),
                                      want_acc.data());
    ASSERT_FALSE(w.ok());
    auto got = recs;
    auto got_acc = acc;
    auto g = cuda_train_update_records(l, st, experts, 3, down.data(), up.data(), got.data(),
                                       got_acc.data());
    ASSERT_FALSE(g.ok());
    EXPECT_EQ(g.status().code(), Status::Code::kOutOfRange);
    EXPECT_EQ(g.status().message(), w.status().message());  // the CPU's words exactly
    EXPECT_THAT(g.status().message(), HasSubstr("expert 7"));
    EXPECT_EQ(got, want);  // records 0 and 2 updated, record 1 untouched
    EXPECT_TRUE(bits_equal(got_acc, want_acc));
    EXPECT_TRUE(
        std::equal(recs.begin() + l.stride, recs.begin() + 2 * l.stride, got.begin() + l.stride));
  }
  // A zero scale whose init does not fit fp16 is the other overflow.
  std::vector<uint8_t> zero(l.stride, 0);
  std::vector<float> huge(32, 0.0f), none(32, 0.0f);
  huge[9] = 1e9f;
  const int64_t expert = 5;
  auto want = zero;
  auto w = train_update_records_ref(l, sgd(1.0f), &expert, 1, huge.data(), none.data(), want.data(),
                                    nullptr);
  auto got = zero;
  auto g = cuda_train_update_records(l, sgd(1.0f), &expert, 1, huge.data(), none.data(), got.data(),
                                     nullptr);
  ASSERT_FALSE(w.ok());
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().message(), w.status().message());
  EXPECT_EQ(got, zero);
}

TEST_F(CudaTrainTest, DeviceEntryNamesBadInputWithTheCpuMessage) {
  std::mt19937 rng(51);
  const RecordLayout l = layout_of(DType::kI8, 40, 24, 2);
  const int64_t count = 3;
  const auto recs = random_training_records(l, count, rng);
  auto down = normal(static_cast<size_t>(count * 2 * 40), 0.1f, rng);
  const auto up = normal(static_cast<size_t>(count * 2 * 24), 0.1f, rng);
  const std::vector<float> acc(static_cast<size_t>(count * 4), 0.0f);
  const std::vector<int64_t> experts = {10, 12, 14};
  down[2 * 40 + 40 + 5] = std::numeric_limits<float>::quiet_NaN();  // expert 12, down row 1
  DeviceVector<uint8_t> d_recs(recs);
  DeviceVector<float> d_acc(acc), d_down(down), d_up(up);
  DeviceVector<int64_t> d_experts(experts);
  auto r = cuda_train_update_records_device(l, adagrad(0.1f), d_experts.get(), count, d_down.get(),
                                            d_up.get(), d_recs.get(), d_acc.get());
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().is_invalid_argument()) << r.status().to_string();
  EXPECT_THAT(r.status().message(), HasSubstr("expert 12: gradient of down row 1 element 5"));
  EXPECT_EQ(d_recs.to_host(), recs);
  EXPECT_TRUE(bits_equal(d_acc.to_host(), acc));
}

// ---- everywhere: argument checks and the no-device path ---------------------------------------

TEST(CudaTrainArgs, BadInputIsTheCpuErrorAndChangesNothing) {
  std::mt19937 rng(51);
  const RecordLayout l = layout_of(DType::kI8, 40, 24, 2);
  const int64_t count = 3;
  const auto recs = random_training_records(l, count, rng);
  const auto down = normal(static_cast<size_t>(count * 2 * 40), 0.1f, rng);
  const auto up = normal(static_cast<size_t>(count * 2 * 24), 0.1f, rng);
  std::vector<float> acc(static_cast<size_t>(count * 4), 0.0f);
  const int64_t experts[3] = {10, 12, 14};
  auto run = [&](const TrainStep& st, const std::vector<float>& dg, const std::vector<float>& ug,
                 const std::vector<float>& a, bool with_acc) {
    auto r2 = recs;
    auto a2 = a;
    auto r = cuda_train_update_records(l, st, experts, count, dg.data(), ug.data(), r2.data(),
                                       with_acc ? a2.data() : nullptr);
    EXPECT_EQ(r2, recs);
    EXPECT_TRUE(bits_equal(a2, a));
    EXPECT_FALSE(r.ok());
    return r.status();
  };
  auto bad_down = down;
  bad_down[2 * 40 + 40 + 5] = std::numeric_limits<float>::quiet_NaN();
  Status s = run(adagrad(0.1f), bad_down, up, acc, true);
  EXPECT_TRUE(s.is_invalid_argument());
  EXPECT_THAT(s.message(), HasSubstr("expert 12: gradient of down row 1 element 5"));
  auto bad_up = up;
  bad_up[23] = std::numeric_limits<float>::infinity();
  EXPECT_THAT(run(sgd(0.1f), down, bad_up, acc, false).message(),
              HasSubstr("expert 10: gradient of up row 0 element 23 (record element 103) is inf"));
  for (float lr : {0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN()}) {
    EXPECT_THAT(run(sgd(lr), down, up, acc, false).message(),
                HasSubstr("learning rate must be > 0"));
  }
  TrainStep no_eps = adagrad(0.1f);
  no_eps.eps = 0.0f;
  EXPECT_THAT(run(no_eps, down, up, acc, true).message(), HasSubstr("eps must be > 0"));
  EXPECT_THAT(run(adagrad(0.1f), down, up, acc, false).message(),
              HasSubstr("needs the row accumulators"));
  auto bad_acc = acc;
  bad_acc[5] = -1.0f;
  EXPECT_THAT(run(adagrad(0.1f), down, up, bad_acc, true).message(),
              HasSubstr("expert 12: Adagrad accumulator of row 1"));

  const RecordLayout i4 = layout_of(DType::kI4, 40, 24, 2);
  std::vector<uint8_t> buf(4096);
  auto r = cuda_train_update_records(i4, sgd(0.1f), experts, 1, down.data(), up.data(), buf.data(),
                                     nullptr);
  EXPECT_THAT(r.status().message(), HasSubstr("must be int8"));
  r = cuda_train_update_records(l, sgd(0.1f), experts, -1, down.data(), up.data(), buf.data(),
                                nullptr);
  EXPECT_THAT(r.status().message(), HasSubstr("record count must be >= 0"));
  r = cuda_train_update_records(l, sgd(0.1f), experts, 1, nullptr, up.data(), buf.data(), nullptr);
  EXPECT_THAT(r.status().message(), HasSubstr("null pointer for down_grad"));

  // The device entry's pointer checks need no device: nothing is dereferenced.
  r = cuda_train_update_records_device(l, sgd(0.1f), experts, 1, down.data(), up.data(),
                                       buf.data() + 1, nullptr);
  EXPECT_THAT(r.status().message(), HasSubstr("not 16-byte aligned"));
  r = cuda_train_update_records_device(l, sgd(0.1f), nullptr, 1, down.data(), up.data(), buf.data(),
                                       nullptr);
  EXPECT_THAT(r.status().message(), HasSubstr("null pointer for experts"));
}

TEST(CudaTrainArgs, EmptyBatchIsFineAndANonEmptyOneNeedsADevice) {
  const RecordLayout l = layout_of(DType::kI8, 40, 24, 1);
  auto r =
      cuda_train_update_records(l, adagrad(0.1f), nullptr, 0, nullptr, nullptr, nullptr, nullptr);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(*r, TrainStats{});
  r = cuda_train_update_records_device(l, adagrad(0.1f), nullptr, 0, nullptr, nullptr, nullptr,
                                       nullptr);
  ASSERT_TRUE(r.ok()) << r.status().to_string();

  if (cuda_device_count() > 0) {
    GTEST_SKIP() << "a CUDA device is present; the no-device path is not reachable";
  }
  std::mt19937 rng(3);
  const auto recs = random_training_records(l, 1, rng);
  auto got = recs;
  const std::vector<float> down(40, 0.01f), up(24, 0.01f);
  const int64_t expert = 1;
  r = cuda_train_update_records(l, sgd(0.1f), &expert, 1, down.data(), up.data(), got.data(),
                                nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kNotSupported) << r.status().to_string();
  EXPECT_THAT(r.status().message(), HasSubstr("no CUDA device is available"));
  EXPECT_EQ(got, recs);
}

}  // namespace
}  // namespace trove
