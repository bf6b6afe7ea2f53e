// The bench's GPU peers at the kernel level (kernels/cuda/peer_einsum.h, CudaManagedMemory):
// the bf16 tables are the CPU dequantizer's values rounded to bf16, bit for bit; the gather +
// einsum forward matches the fp32 oracle (kernels/cpu/ref/peer_ref.h) and the fused kernel within
// a bf16 bound written down below, at shapes with odd D and D_out, k not a power of two, h = 1
// and 4, N not a power of two, every record dtype and activation; the fused kernel over a table
// in managed memory equals the same kernel over device memory bit for bit.
//
// Tests that need a GPU skip with a message when none is present; the argument checks run
// everywhere (through an empty peer and context).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "base/half.h"
#include "kernels/cpu/quant.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/peer_cuda.h"
#include "kernels/cuda/peer_einsum.h"
#include "kernels/peer.h"
#include "tests/peer_test_util.h"

namespace trove {
namespace {

using testing::describe;
using testing::expect_bits_equal;
using testing::make_config;
using testing::PeerLayer;
using testing::PeerShape;
using testing::random_layer;
using testing::ref_forward;
using testing::RefForward;

// ---- the bf16 bound ----------------------------------------------------------------------------
// The einsum rounds u, xhat, v and w = gate * act(z) to bf16 (8 significant bits: each within
// 2^-9 relative) and accumulates in fp32. So z is within 2^-8 * sum_d |u_d x_d| of the oracle's,
// act(z) within max|act'| (< 1.14 for every activation) times that, and each term of y within
// 2^-8 |g a v| more for the roundings of w and v. Per element j of y:
//
//   |y_j - oracle_j| <= 1.05 * 2^-8 * sum_s |g_s| |v_sj| (|a_s| + 1.14 * sum_d |u_sd x_d|)
//                       + 1e-5 * max|oracle|
//
// (1.14 > max|act'| of gelu, the steepest; 1.05 covers the second-order terms and fp32
// accumulation; the last term is the fused kernel's own tolerance, so the same bound holds
// against it.)
std::vector<double> bf16_bound(const PeerLayer& l, const RefForward& ref) {
  const PeerConfig& c = l.config;
  const int64_t slots = c.heads * c.topk;
  std::vector<float> down(sz(c.dim)), up(sz(c.dim_out));
  std::vector<double> bound(sz(l.tokens * c.dim_out), 0.0);
  double scale = 0;
  for (float y : ref.y) scale = std::max(scale, std::abs(static_cast<double>(y)));
  for (int64_t t = 0; t < l.tokens; ++t) {
    const float* x = &ref.xhat[sz(t * c.dim)];
    for (int64_t s = 0; s < slots; ++s) {
      const size_t slot = sz(t * slots + s);
      const uint8_t* record = l.table.data() + sz(ref.routing.ids[slot]) * l.layout.stride;
      unpack_records(l.layout, record, 1, down.data(), up.data(), 1);
      double z = 0, zabs = 0;
      for (int64_t d = 0; d < c.dim; ++d) {
        z += static_cast<double>(down[sz(d)]) * x[d];
        zabs += std::abs(static_cast<double>(down[sz(d)]) * x[d]);
      }
      const double g = std::abs(static_cast<double>(ref.routing.gates[slot]));
      const double a = std::abs(activation_ref(c.activation, z));
      for (int64_t j = 0; j < c.dim_out; ++j) {
        bound[sz(t * c.dim_out + j)] +=
            1.05 * 0x1p-8 * g * std::abs(static_cast<double>(up[sz(j)])) * (a + 1.14 * zabs);
      }
    }
  }
  for (double& b : bound) b += 1e-5 * scale;
  return bound;
}

void expect_within(const std::vector<float>& got, const std::vector<float>& want,
                   const std::vector<double>& bound, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, worst = 0;
  double worst_ratio = 0, max_ratio = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double ratio = std::abs(static_cast<double>(got[i]) - want[i]) / bound[i];
    max_ratio = std::max(max_ratio, ratio);
    if (!(ratio <= 1.0)) {
      if (bad == 0 || ratio > worst_ratio) {
        worst = i;
        worst_ratio = ratio;
      }
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << want.size()
                     << " elements outside the bf16 bound; worst at " << worst << ": got "
                     << (bad ? got[worst] : 0.0f) << " want " << (bad ? want[worst] : 0.0f)
                     << " bound " << (bad ? bound[worst] : 0.0);
  // A bound that is never approached would not test anything: the roundings show.
  EXPECT_GT(max_ratio, 0.0) << what << ": bit-identical to an fp32 computation?";
  // The bound is a worst case: roundings of random sign mostly cancel, so a systematic error
  // (a whole input off by 1%) could hide under it. On average the error must be bf16's size:
  // rms(error) <= 2^-7 rms(want) (measured on the emulator's fp32 GEMM: 2^-9 to 2^-8).
  double err2 = 0, want2 = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = static_cast<double>(got[i]) - want[i];
    err2 += e * e;
    want2 += static_cast<double>(want[i]) * want[i];
  }
  EXPECT_LE(std::sqrt(err2), 0x1p-7 * std::sqrt(want2))
      << what << ": rms error " << std::sqrt(err2 / want2) << " of rms(want)";
}

class CudaPeersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) {
      GTEST_SKIP() << "no CUDA device: cuda_device_count() is 0 (no driver or no GPU); the "
                      "einsum peer and managed memory are compiled but not run";
    }
    Result<CudaPeerContext> ctx = CudaPeerContext::create();
    ASSERT_TRUE(ctx.ok()) << ctx.status().to_string();
    ctx_ = std::move(*ctx);
  }

  static CudaEinsumPeer make_peer(const PeerLayer& l) {
    Result<CudaEinsumPeer> peer =
        CudaEinsumPeer::create(l.config, l.layout, l.table.data(), l.config.num_experts());
    EXPECT_TRUE(peer.ok()) << peer.status().to_string();
    return peer.ok() ? std::move(*peer) : CudaEinsumPeer();
  }

  CudaPeerContext ctx_;
};

// The shapes: odd D and D_out (partial groups, rows not a multiple of 8 bf16 for the gather's
// vector path), k not a power of two, N = n^2 not a power of two, one and four heads.
std::vector<PeerShape> einsum_shapes() {
  std::vector<PeerShape> shapes;
  const Activation acts[] = {Activation::kSilu, Activation::kRelu, Activation::kGelu,
                             Activation::kGeluTanh, Activation::kSilu};
  int i = 0;
  for (DType t : testing::kAllDTypes) {
    PeerConfig a = make_config(96, 80, 4, 11, 8, 6, 3);   // N = 121, 24 slots
    PeerConfig b = make_config(37, 53, 1, 3, 5, 9, 3);    // odd dims, k = N = 9
    PeerConfig d = make_config(200, 136, 2, 7, 6, 5, 4);  // N = 49, rows a multiple of 8
    for (PeerConfig* c : {&a, &b, &d}) {
      c->activation = acts[i % 5];
      c->gate = testing::kAllGates[i % 3];
      ++i;
    }
    shapes.push_back({33, a, t});
    shapes.push_back({5, b, t});
    shapes.push_back({19, d, t});
  }
  return shapes;
}

TEST_F(CudaPeersTest, TablesAreTheRecordsDequantizedAndRoundedToBf16BitForBit) {
  for (const PeerShape& shape : einsum_shapes()) {
    SCOPED_TRACE(describe(shape));
    const PeerLayer l = random_layer(shape, 5);
    const PeerConfig& c = l.config;
    CudaEinsumPeer peer = make_peer(l);
    ASSERT_TRUE(peer.has_device());
    EXPECT_EQ(peer.experts(), c.num_experts());
    std::vector<uint16_t> down, up;
    ASSERT_TRUE(peer.download_tables(&down, &up).ok());
    std::vector<float> want_down(sz(c.num_experts() * c.dim)),
        want_up(sz(c.num_experts() * c.dim_out));
    unpack_records(l.layout, l.table.data(), c.num_experts(), want_down.data(), want_up.data(), 1);
    ASSERT_EQ(down.size(), want_down.size());
    ASSERT_EQ(up.size(), want_up.size());
    size_t bad = 0;
    for (size_t i = 0; i < down.size(); ++i) bad += down[i] != fp32_to_bf16(want_down[i]);
    for (size_t i = 0; i < up.size(); ++i) bad += up[i] != fp32_to_bf16(want_up[i]);
    EXPECT_EQ(bad, 0u);
  }
}

TEST_F(CudaPeersTest, EinsumMatchesTheOracleAndTheFusedKernelWithinTheBf16Bound) {
  for (const PeerShape& shape : einsum_shapes()) {
    SCOPED_TRACE(describe(shape));
    const PeerLayer l = random_layer(shape, 17);
    const PeerConfig& c = l.config;
    const RefForward ref = ref_forward(l);
    CudaEinsumPeer peer = make_peer(l);
    std::vector<float> einsum(ref.y.size(), -1.0f), fused(ref.y.size(), -1.0f);
    Status s = peer.forward(ctx_, ref.xhat.data(), ref.routing, einsum.data());
    ASSERT_TRUE(s.ok()) << s.to_string();
    const std::vector<const uint8_t*> records = l.slot_records(ref.routing);
    s = ctx_.experts(c, l.layout, ref.xhat.data(), ref.routing, records.data(), fused.data());
    ASSERT_TRUE(s.ok()) << s.to_string();
    const std::vector<double> bound = bf16_bound(l, ref);
    expect_within(einsum, ref.y, bound, "einsum vs oracle");
    expect_within(einsum, fused, bound, "einsum vs fused kernel");
  }
}

TEST_F(CudaPeersTest, EinsumDeviceFormGivesTheHostFormsBits) {
  // Background-like widths (a multiple of 8: the gather's 16-byte path) on int4 records.
  PeerConfig c = make_config(256, 256, 4, 16, 8, 8, 8);
  c.activation = Activation::kSilu;
  c.gate = Gate::kRelu;
  const PeerLayer l = random_layer({130, c, DType::kI4}, 23);
  const RefForward ref = ref_forward(l);
  CudaEinsumPeer peer = make_peer(l);
  std::vector<float> host(ref.y.size());
  ASSERT_TRUE(peer.forward(ctx_, ref.xhat.data(), ref.routing, host.data()).ok());

  const int64_t T = l.tokens;
  const size_t slots = ref.routing.slots();
  Result<CudaDeviceMemory> xhat = CudaDeviceMemory::allocate(ref.xhat.size() * sizeof(float));
  Result<CudaDeviceMemory> ids = CudaDeviceMemory::allocate(slots * sizeof(int64_t));
  Result<CudaDeviceMemory> gates = CudaDeviceMemory::allocate(slots * sizeof(float));
  Result<CudaDeviceMemory> y = CudaDeviceMemory::allocate(ref.y.size() * sizeof(float));
  ASSERT_TRUE(xhat.ok() && ids.ok() && gates.ok() && y.ok());
  ASSERT_TRUE(ctx_.copy_async(xhat->data(), ref.xhat.data(), xhat->bytes()).ok());
  ASSERT_TRUE(ctx_.copy_async(ids->data(), ref.routing.ids.data(), ids->bytes()).ok());
  ASSERT_TRUE(ctx_.copy_async(gates->data(), ref.routing.gates.data(), gates->bytes()).ok());
  PeerDeviceRouting r;
  r.ids = reinterpret_cast<int64_t*>(ids->data());
  r.gates = reinterpret_cast<float*>(gates->data());
  ASSERT_TRUE(peer.forward_device(ctx_, reinterpret_cast<float*>(xhat->data()), T, r,
                                  reinterpret_cast<float*>(y->data()))
                  .ok());
  std::vector<float> device(ref.y.size());
  ASSERT_TRUE(ctx_.copy_async(device.data(), y->data(), y->bytes()).ok());
  ASSERT_TRUE(ctx_.synchronize().ok());
  expect_bits_equal(device, host, "device form vs host form");
  expect_within(host, ref.y, bf16_bound(l, ref), "einsum vs oracle");
}

TEST_F(CudaPeersTest, FusedKernelOverManagedMemoryEqualsDeviceMemoryBitForBit) {
  for (DType t : {DType::kI4, DType::kI8, DType::kBF16}) {
    PeerConfig c = make_config(96, 80, 4, 11, 8, 6, 3);
    c.activation = Activation::kSilu;
    const PeerLayer l = random_layer({41, c, t}, 29);
    const PeerConfig& lc = l.config;
    SCOPED_TRACE(dtype_name(t));
    const RefForward ref = ref_forward(l);
    const size_t slots = ref.routing.slots();
    Result<CudaDeviceMemory> table = CudaDeviceMemory::allocate(l.table.size());
    Result<CudaManagedMemory> managed = CudaManagedMemory::allocate(l.table.size());
    Result<CudaDeviceMemory> xhat = CudaDeviceMemory::allocate(ref.xhat.size() * sizeof(float));
    Result<CudaDeviceMemory> ids = CudaDeviceMemory::allocate(slots * sizeof(int64_t));
    Result<CudaDeviceMemory> gates = CudaDeviceMemory::allocate(slots * sizeof(float));
    Result<CudaDeviceMemory> y1 = CudaDeviceMemory::allocate(ref.y.size() * sizeof(float));
    Result<CudaDeviceMemory> y2 = CudaDeviceMemory::allocate(ref.y.size() * sizeof(float));
    ASSERT_TRUE(table.ok() && managed.ok() && xhat.ok() && ids.ok() && gates.ok() && y1.ok() &&
                y2.ok());
    std::memcpy(managed->data(), l.table.data(), l.table.size());  // the host writes it
    ASSERT_TRUE(ctx_.copy_async(table->data(), l.table.data(), l.table.size()).ok());
    ASSERT_TRUE(ctx_.copy_async(xhat->data(), ref.xhat.data(), xhat->bytes()).ok());
    ASSERT_TRUE(ctx_.copy_async(ids->data(), ref.routing.ids.data(), ids->bytes()).ok());
    ASSERT_TRUE(ctx_.copy_async(gates->data(), ref.routing.gates.data(), gates->bytes()).ok());
    const auto* x = reinterpret_cast<const float*>(xhat->data());
    const auto* g = reinterpret_cast<const float*>(gates->data());
    const auto* id = reinterpret_cast<const int64_t*>(ids->data());
    ASSERT_TRUE(ctx_.experts_device_indexed(lc, l.layout, x, l.tokens, g, table->data(), id,
                                            reinterpret_cast<float*>(y1->data()))
                    .ok());
    ASSERT_TRUE(ctx_.experts_device_indexed(lc, l.layout, x, l.tokens, g, managed->data(), id,
                                            reinterpret_cast<float*>(y2->data()))
                    .ok());
    std::vector<float> from_device(ref.y.size()), from_managed(ref.y.size());
    ASSERT_TRUE(ctx_.copy_async(from_device.data(), y1->data(), y1->bytes()).ok());
    ASSERT_TRUE(ctx_.copy_async(from_managed.data(), y2->data(), y2->bytes()).ok());
    ASSERT_TRUE(ctx_.synchronize().ok());
    expect_bits_equal(from_managed, from_device, "managed vs device memory");
    testing::expect_close(from_device, ref.y, 1e-5, 1e-5, "fused vs oracle");
  }
}

TEST_F(CudaPeersTest, ContextEventsTimeTheWorkBetweenThem) {
  Result<CudaEvent> start = CudaEvent::create();
  Result<CudaEvent> end = CudaEvent::create();
  ASSERT_TRUE(start.ok() && end.ok());
  Result<CudaDeviceMemory> a = CudaDeviceMemory::allocate(size_t{1} << 20);
  Result<CudaDeviceMemory> b = CudaDeviceMemory::allocate(size_t{1} << 20);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(ctx_.record(*start).ok());
  ASSERT_TRUE(ctx_.copy_async(b->data(), a->data(), a->bytes()).ok());
  ASSERT_TRUE(ctx_.record(*end).ok());
  ASSERT_TRUE(ctx_.synchronize().ok());
  Result<double> seconds = CudaEvent::elapsed_seconds(*start, *end);
  ASSERT_TRUE(seconds.ok()) << seconds.status().to_string();
  EXPECT_GE(*seconds, 0.0);
  EXPECT_LT(*seconds, 1.0);
}

// ---- arguments (no device needed) -----------------------------------------------------------

TEST(CudaPeersArgsTest, CreateNamesTheBadArgumentBeforeLookingForADevice) {
  PeerConfig c = make_config(96, 80, 4, 11, 8, 6, 3);
  const PeerLayer l = random_layer({1, c, DType::kI4}, 3);
  auto message = [](const Result<CudaEinsumPeer>& r) {
    return r.ok() ? std::string("ok") : r.status().to_string();
  };
  Result<CudaEinsumPeer> r = CudaEinsumPeer::create(l.config, l.layout, nullptr, 121);
  EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument);
  EXPECT_NE(message(r).find("records is null"), std::string::npos) << message(r);
  r = CudaEinsumPeer::create(l.config, l.layout, l.table.data(), 0);
  EXPECT_NE(message(r).find("experts must be >= 1 (got 0)"), std::string::npos) << message(r);
  RecordLayout other = testing::layout_of(DType::kI4, 64, 80);
  r = CudaEinsumPeer::create(l.config, other, l.table.data(), 121);
  EXPECT_NE(message(r).find("layout is for dim 64"), std::string::npos) << message(r);
  PeerConfig bad = l.config;
  bad.heads = 0;
  r = CudaEinsumPeer::create(bad, l.layout, l.table.data(), 121);
  EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument) << message(r);
  EXPECT_EQ(CudaEinsumPeer::table_bytes(l.config, 121), uint64_t{2} * 121 * (96 + 80));
}

TEST(CudaPeersArgsTest, AnEmptyPeerOrContextChecksArgumentsThenRefuses) {
  CudaEinsumPeer peer;
  CudaPeerContext ctx;
  EXPECT_FALSE(peer.has_device());
  EXPECT_EQ(peer.experts(), 0);
  PeerDeviceRouting r;
  Status s = peer.forward_device(ctx, nullptr, 3, r, nullptr);
  EXPECT_NE(s.message().find("xhat is null (tokens 3)"), std::string::npos) << s.to_string();
  s = peer.forward_device(ctx, nullptr, -1, r, nullptr);
  EXPECT_NE(s.message().find("tokens must be in"), std::string::npos) << s.to_string();
  s = peer.forward_device(ctx, nullptr, 0, r, nullptr);
  EXPECT_NE(s.message().find("empty CudaEinsumPeer"), std::string::npos) << s.to_string();
  PeerRouting routing;
  s = peer.forward(ctx, nullptr, routing, nullptr);
  EXPECT_NE(s.message().find("empty CudaEinsumPeer"), std::string::npos) << s.to_string();
  std::vector<uint16_t> down, up;
  EXPECT_FALSE(peer.download_tables(&down, &up).ok());

  s = ctx.copy_async(nullptr, &r, 8);
  EXPECT_NE(s.message().find("dst is null (bytes 8)"), std::string::npos) << s.to_string();
  s = ctx.copy_async(&r, &r, 0);
  EXPECT_NE(s.message().find("empty CudaPeerContext"), std::string::npos) << s.to_string();
}

TEST(CudaPeersArgsTest, WithoutADeviceCreateAndManagedMemoryAreNotSupported) {
  if (cuda_device_count() > 0) {
    GTEST_SKIP() << "a CUDA device is present; the no-device path is not reachable";
  }
  PeerConfig c = make_config(96, 80, 4, 11, 8, 6, 3);
  const PeerLayer l = random_layer({1, c, DType::kI4}, 3);
  Result<CudaEinsumPeer> r = CudaEinsumPeer::create(l.config, l.layout, l.table.data(), 121);
  EXPECT_EQ(r.status().code(), Status::Code::kNotSupported) << r.status().to_string();
  Result<CudaManagedMemory> m = CudaManagedMemory::allocate(4096);
  EXPECT_EQ(m.status().code(), Status::Code::kNotSupported) << m.status().to_string();
  Result<CudaManagedMemory> none = CudaManagedMemory::allocate(0);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->data(), nullptr);
}

}  // namespace
}  // namespace trove
