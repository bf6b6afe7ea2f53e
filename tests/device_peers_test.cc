// The bench's GPU peers driver (runtime/bench/device_peers.h): the byte model of the fused kernel's
// roofline; bad options named before any device work; not_supported without CUDA or a device
// (these run on every machine); and on a device, every peer on the same batches: resident equals
// the host form of the fused kernel bit for bit on given routing, managed equals resident bit for
// bit, einsum stays near resident, also when the device routes (pk); and the HBM calibration.
#include "runtime/bench/device_peers.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/cpu/quant.h"
#include "runtime/bench/calibrate.h"
#include "tests/peer_test_util.h"

#if TROVE_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/peer_cuda.h"
#endif

namespace trove {
namespace {

using testing::make_config;

bool have_device() {
#if TROVE_HAVE_CUDA
  return cuda_device_count() > 0;
#else
  return false;
#endif
}

// A small layer's table, parameters and batches (given routing, or null routing for pk).
struct PeerFixture {
  PeerConfig config;
  RecordLayout layout;
  std::vector<uint8_t> table;
  PeerDenseParams params;
  std::vector<std::vector<float>> x;
  std::vector<PeerRouting> routing;

  PeerFixture(DType dtype, int64_t batch, int64_t batches, uint32_t seed) {
    config = make_config(96, 80, 4, 11, 8, 6, 3);  // N = 121
    config.activation = Activation::kSilu;
    config.gate = Gate::kRelu;
    config.input_norm = InputNorm::kRms;
    const testing::PeerLayer l = testing::random_layer({batch, config, dtype}, seed);
    config = l.config;
    layout = l.layout;
    table = l.table;
    params.query_weight = l.query_weight;
    params.keys = l.keys;
    params.norm_weight = l.norm_weight;
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int64_t> pick(0, config.num_experts() - 1);
    for (int64_t b = 0; b < batches; ++b) {
      x.push_back(testing::normal_values(sz(batch * config.dim), 1.0, &rng));
      PeerRouting r;
      r.resize(batch, config.heads, config.topk);
      for (int64_t& id : r.ids) id = pick(rng);
      for (float& g : r.gates) g = static_cast<float>(rng() % 1000) / 1000.0f;
      routing.push_back(std::move(r));
    }
  }

  DevicePeerOptions options(bool route_on_device) {
    DevicePeerOptions o;
    o.config = config;
    o.layout = layout;
    o.table = table;
    o.params = &params;
    o.batch = routing[0].tokens;
    o.batches = static_cast<int64_t>(x.size());
    o.source = [this, route_on_device](int64_t i, DevicePeerBatch* b) {
      b->x = x[sz(i)].data();
      b->routing = route_on_device ? nullptr : &routing[sz(i)];
      return Status::ok_status();
    };
    return o;
  }
};

TEST(DevicePeers, ExpertKernelBytesCountEachDistinctRecordOnceAndTheActivations) {
  PeerConfig c = make_config(2048, 2048, 4, 896, 64, 8, 8);  // the background's layer
  ASSERT_TRUE(c.validate_and_fill().ok());
  const RecordLayout l = testing::layout_of(DType::kI4, 2048, 2048);
  EXPECT_EQ(l.record_bytes, 2304u);  // 2 x (64 scales x 2 bytes + 1024 code bytes)
  // 512 tokens, 32 slots each, 10000 distinct experts.
  const uint64_t want = 10000ull * 2304 + 512ull * 2048 * 4 + 512ull * 32 * 12 + 512ull * 2048 * 4;
  EXPECT_EQ(expert_kernel_bytes(c, l, 512, 10000), want);
  EXPECT_EQ(expert_kernel_bytes(c, l, 0, 0), 0u);
  // D_out counts for y, D for xhat.
  PeerConfig narrow = make_config(96, 40, 1, 3, 4, 2, 2);
  ASSERT_TRUE(narrow.validate_and_fill().ok());
  const RecordLayout nl = testing::layout_of(DType::kBF16, 96, 40);
  EXPECT_EQ(expert_kernel_bytes(narrow, nl, 1, 2), 2 * nl.record_bytes + 96 * 4 + 2 * 12 + 40 * 4);
}

TEST(DevicePeers, BadOptionsAreNamedBeforeAnyDeviceWork) {
  PeerFixture f(DType::kI4, 4, 1, 1);
  auto message = [](const DevicePeerOptions& o) {
    Result<DevicePeerResult> r = run_device_peers(o);
    EXPECT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument) << r.status().to_string();
    return r.status().to_string();
  };
  DevicePeerOptions o = f.options(false);
  o.table = std::span<const uint8_t>(f.table.data(), f.table.size() - 1);
  EXPECT_NE(message(o).find("121 experts at stride"), std::string::npos) << message(o);
  o = f.options(false);
  o.params = nullptr;
  EXPECT_NE(message(o).find("params is null"), std::string::npos);
  o = f.options(false);
  o.source = nullptr;
  EXPECT_NE(message(o).find("source is empty"), std::string::npos);
  o = f.options(false);
  o.batches = 0;
  EXPECT_NE(message(o).find("batches 0 must be >= 1"), std::string::npos) << message(o);
  o = f.options(false);
  o.layout = testing::layout_of(DType::kI4, 64, 80);
  EXPECT_NE(message(o).find("layout is for dim 64"), std::string::npos) << message(o);
  o = f.options(false);
  o.config.heads = 0;
  EXPECT_NE(message(o).find("device peers: config"), std::string::npos) << message(o);
}

TEST(DevicePeers, WithoutCudaOrADeviceThePeersAndTheHbmCalibrationAreNotSupported) {
  if (have_device())
    GTEST_SKIP() << "a CUDA device is present; the no-device path is not reachable";
  PeerFixture f(DType::kI4, 4, 1, 1);
  Result<DevicePeerResult> r = run_device_peers(f.options(false));
  EXPECT_EQ(r.status().code(), Status::Code::kNotSupported) << r.status().to_string();
  Result<double> hbm = measure_hbm_bandwidth(1 << 20, 0);
  EXPECT_EQ(hbm.status().code(), Status::Code::kNotSupported) << hbm.status().to_string();
}

TEST(DevicePeers, HbmCalibrationRejectsBadArguments) {
  for (const auto& [bytes, seconds] :
       {std::pair<uint64_t, double>{100, 0.1}, {1 << 20, -1.0}, {1 << 20, std::nan("")}}) {
    Result<double> r = measure_hbm_bandwidth(bytes, seconds);
    EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument) << r.status().to_string();
    EXPECT_NE(r.status().message().find("HBM calibration"), std::string::npos);
  }
}

#if TROVE_HAVE_CUDA

class DevicePeersOnDevice : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_device()) {
      GTEST_SKIP() << "no CUDA device: cuda_device_count() is 0 (no driver or no GPU); the "
                      "device peers are compiled but not run";
    }
  }
};

// Outputs per (peer, batch).
using Outputs = std::map<std::string, std::vector<std::vector<float>>>;

Result<DevicePeerResult> run_collecting(DevicePeerOptions o, Outputs* out) {
  o.on_output = [out](const char* peer, int64_t index, std::span<const float> y) {
    auto& v = (*out)[peer];
    if (v.size() <= sz(index)) v.resize(sz(index) + 1);
    v[sz(index)].assign(y.begin(), y.end());
  };
  return run_device_peers(o);
}

TEST_F(DevicePeersOnDevice, EveryPeerComputesTheSameBatches) {
  for (DType t : {DType::kI4, DType::kI8, DType::kBF16}) {
    SCOPED_TRACE(dtype_name(t));
    PeerFixture f(t, 37, 3, 7);
    Outputs out;
    Result<DevicePeerResult> r = run_collecting(f.options(false), &out);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_GT(r->resident_tokens_per_second, 0);
    EXPECT_GT(r->einsum_tokens_per_second, 0);
    EXPECT_GT(r->managed_tokens_per_second, 0);
    EXPECT_TRUE(r->resident_skipped.empty() && r->einsum_skipped.empty() &&
                r->managed_skipped.empty());
    EXPECT_GT(r->expert_kernel_seconds, 0);
    EXPECT_GE(r->einsum_max_error, 0);
    EXPECT_LT(r->einsum_max_error, 0x1p-5) << "bf16's 8 bits, not a different computation";
    ASSERT_EQ(out["resident"].size(), 3u);
    ASSERT_EQ(out["managed"].size(), 3u);
    ASSERT_EQ(out["einsum"].size(), 3u);

    // Resident against the host form of the fused kernel on the same xhat and routing.
    Result<CudaPeerContext> ctx = CudaPeerContext::create();
    ASSERT_TRUE(ctx.ok());
    uint64_t bytes = 0;
    for (size_t b = 0; b < 3; ++b) {
      std::vector<float> xhat(f.x[b].size()), y(out["resident"][b].size());
      ASSERT_TRUE(
          ctx->norm(f.config, f.params.norm_weight.data(), f.x[b].data(), 37, xhat.data()).ok());
      std::vector<const uint8_t*> records(f.routing[b].slots());
      for (size_t s = 0; s < records.size(); ++s) {
        records[s] = f.table.data() + sz(f.routing[b].ids[s]) * f.layout.stride;
      }
      ASSERT_TRUE(
          ctx->experts(f.config, f.layout, xhat.data(), f.routing[b], records.data(), y.data())
              .ok());
      testing::expect_bits_equal(out["resident"][b], y, "resident vs host form");
      testing::expect_bits_equal(out["managed"][b], y, "managed vs host form");
      std::vector<int64_t> ids = f.routing[b].ids;
      std::sort(ids.begin(), ids.end());
      bytes += expert_kernel_bytes(f.config, f.layout, 37,
                                   std::unique(ids.begin(), ids.end()) - ids.begin());
    }
    EXPECT_EQ(r->expert_kernel_bytes, bytes);
  }
}

TEST_F(DevicePeersOnDevice, RoutingOnTheDeviceFeedsEveryPeerTheSameSelection) {
  PeerFixture f(DType::kI4, 29, 2, 11);
  Outputs out;
  Result<DevicePeerResult> r = run_collecting(f.options(true), &out);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  ASSERT_EQ(out["resident"].size(), 2u);
  for (size_t b = 0; b < 2; ++b) {
    testing::expect_bits_equal(out["managed"][b], out["resident"][b], "managed vs resident");
    double err = 0, scale = 0;
    for (size_t i = 0; i < out["resident"][b].size(); ++i) {
      err = std::max(err, std::abs(double{out["einsum"][b][i]} - out["resident"][b][i]));
      scale = std::max(scale, std::abs(double{out["resident"][b][i]}));
    }
    EXPECT_LT(err, 0x1p-5 * scale) << "batch " << b;
  }
}

TEST_F(DevicePeersOnDevice, PeersNotAskedForAreNotRun) {
  PeerFixture f(DType::kBF16, 8, 1, 3);
  DevicePeerOptions o = f.options(false);
  o.einsum = false;
  o.managed = false;
  Result<DevicePeerResult> r = run_device_peers(o);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_GT(r->resident_tokens_per_second, 0);
  EXPECT_EQ(r->einsum_tokens_per_second, 0);
  EXPECT_EQ(r->managed_tokens_per_second, 0);
  EXPECT_EQ(r->einsum_max_error, -1);
}

TEST_F(DevicePeersOnDevice, HbmBandwidthIsPositiveAndBelowAnyHbm) {
  Result<double> bw = measure_hbm_bandwidth(uint64_t{64} << 20, 0.05);
  ASSERT_TRUE(bw.ok()) << bw.status().to_string();
  EXPECT_GT(*bw, 1e10) << "any CUDA device copies more than 10 GB/s within its memory";
  EXPECT_LT(*bw, 1e14);
}

#endif  // TROVE_HAVE_CUDA

}  // namespace
}  // namespace trove
