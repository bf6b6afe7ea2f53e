// kernels/cuda/cuda_memory.h and kernels/cuda/residency.h: the SM-driven gather copies records
// from mapped pinned host memory and from device memory to scattered device destinations byte
// for byte (16-byte and byte-wise paths, odd counts); the residency lookup and scatter equal a
// host loop, misses counted, out-of-range ids missed; events order a copy stream after another
// stream. Without a device: pinned buffers and registrations fall back to pageable memory
// (device_data null) and the functions' argument checks answer before any device call.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/residency.h"

namespace trove {
namespace {

bool have_device() {
  return cuda_device_available().ok();
}

TEST(CudaMemoryNoDevice, PinnedMemoryFallsBackToPageableAndArgumentsAreChecked) {
  if (have_device()) GTEST_SKIP() << "a CUDA device is present; the fallback is not reachable";
  auto b = PinnedHostBuffer::allocate(10000);
  ASSERT_TRUE(b.ok()) << b.status().to_string();
  EXPECT_FALSE(b->pinned());
  EXPECT_EQ(b->device_data(), nullptr);
  std::memset(b->data(), 1, 10000);  // usable memory all the same
  std::vector<uint8_t> block(8192);
  HostRegistration r = HostRegistration::register_range(block.data(), block.size());
  EXPECT_FALSE(r.registered());
  EXPECT_EQ(r.device_data(), nullptr);
  CudaCopyStream empty;
  EXPECT_EQ(empty.gather_async(nullptr, nullptr, 16, 1).code(), Status::Code::kInvalidArgument);
  const Status s = resolve_resident_async(nullptr, 10, nullptr, 5, nullptr, nullptr, nullptr);
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(s.message().find("resolve_resident_async: null"), std::string::npos) << s.to_string();
  const Status z = scatter_resident_async(nullptr, 0, nullptr, nullptr, 1, nullptr);
  EXPECT_NE(z.message().find("1 updates of a table of 0 experts"), std::string::npos)
      << z.to_string();
}

class CudaMemoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_device()) {
      GTEST_SKIP() << "compiled but not run: " << cuda_device_available().message();
    }
  }
};

// count records of `bytes` gathered from a mapped host block (or a device block) into a shuffled
// set of device slots.
void check_gather(size_t bytes, size_t count, bool from_device) {
  SCOPED_TRACE(std::to_string(count) + " records of " + std::to_string(bytes) + " bytes from " +
               (from_device ? "device" : "mapped host") + " memory");
  std::mt19937 rng(static_cast<uint32_t>(bytes * 31 + count));
  const size_t stride = (bytes + 15) / 16 * 16;
  std::vector<uint8_t> host(count * stride + 4096);
  for (uint8_t& v : host) v = static_cast<uint8_t>(rng());
  HostRegistration pin = HostRegistration::register_range(host.data(), host.size());
  ASSERT_TRUE(pin.registered());
  auto dev_src = CudaDeviceMemory::allocate(host.size());
  ASSERT_TRUE(dev_src.ok());
  ASSERT_EQ(cudaMemcpy(dev_src->data(), host.data(), host.size(), cudaMemcpyHostToDevice),
            cudaSuccess);
  auto dst = CudaDeviceMemory::allocate(count * stride + 16);
  ASSERT_TRUE(dst.ok());
  ASSERT_EQ(cudaMemset(dst->data(), 0, dst->bytes()), cudaSuccess);
  std::vector<size_t> perm(count);
  for (size_t i = 0; i < count; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<const void*> srcs(count);
  std::vector<void*> dsts(count);
  for (size_t i = 0; i < count; ++i) {
    const uint8_t* base = from_device ? dev_src->data() : pin.device_data();
    srcs[i] = base + i * stride;
    dsts[i] = dst->data() + perm[i] * stride;
  }
  auto tables = CudaDeviceMemory::allocate(2 * count * sizeof(void*));
  ASSERT_TRUE(tables.ok());
  ASSERT_EQ(cudaMemcpy(tables->data(), srcs.data(), count * 8, cudaMemcpyHostToDevice),
            cudaSuccess);
  ASSERT_EQ(cudaMemcpy(tables->data() + count * 8, dsts.data(), count * 8, cudaMemcpyHostToDevice),
            cudaSuccess);
  auto stream = CudaCopyStream::create();
  ASSERT_TRUE(stream.ok());
  ASSERT_TRUE(stream
                  ->gather_async(reinterpret_cast<void* const*>(tables->data() + count * 8),
                                 reinterpret_cast<const void* const*>(tables->data()), bytes, count)
                  .ok());
  ASSERT_TRUE(stream->synchronize().ok());
  std::vector<uint8_t> got(dst->bytes());
  ASSERT_EQ(cudaMemcpy(got.data(), dst->data(), got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (size_t i = 0; i < count; ++i) {
    ASSERT_EQ(std::memcmp(got.data() + perm[i] * stride, host.data() + i * stride, bytes), 0)
        << "record " << i;
    for (size_t k = bytes; k < stride; ++k) {
      ASSERT_EQ(got[perm[i] * stride + k], 0) << "record " << i << " wrote past its end";
    }
  }
}

TEST_F(CudaMemoryTest, GatherCopiesEveryRecordExactly) {
  for (bool from_device : {false, true}) {
    for (size_t bytes : {size_t{16}, size_t{1}, size_t{37}, size_t{1168}, size_t{4096}}) {
      for (size_t count : {size_t{1}, size_t{7}, size_t{33}, size_t{5000}}) {
        check_gather(bytes, count, from_device);
      }
    }
  }
  auto stream = CudaCopyStream::create();
  ASSERT_TRUE(stream.ok());
  EXPECT_TRUE(stream->gather_async(nullptr, nullptr, 16, 0).ok());  // nothing to do
}

TEST_F(CudaMemoryTest, ResidencyLookupAndScatterEqualAHostLoop) {
  std::mt19937 rng(5);
  const int64_t n = 1000;
  std::vector<const uint8_t*> table(n, nullptr);
  static uint8_t slots[64];
  for (int64_t i = 0; i < n; i += 3) table[i] = slots + i % 64;
  std::vector<int64_t> ids = {0, 1, 2, 3, 999, 1000, -1, 500};
  for (int i = 0; i < 3000; ++i) ids.push_back(static_cast<int64_t>(rng() % n));
  auto d_table = CudaDeviceMemory::allocate(n * 8);
  auto d_ids = CudaDeviceMemory::allocate(ids.size() * 8);
  auto d_ptrs = CudaDeviceMemory::allocate(ids.size() * 8);
  auto d_count = CudaDeviceMemory::allocate(4);
  ASSERT_TRUE(d_table.ok() && d_ids.ok() && d_ptrs.ok() && d_count.ok());
  ASSERT_EQ(cudaMemcpy(d_table->data(), table.data(), n * 8, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_ids->data(), ids.data(), ids.size() * 8, cudaMemcpyHostToDevice),
            cudaSuccess);
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreate(&s), cudaSuccess);
  auto lookup = [&](std::vector<const uint8_t*>* ptrs) {
    ASSERT_TRUE(resolve_resident_async(reinterpret_cast<const uint8_t* const*>(d_table->data()), n,
                                       reinterpret_cast<const int64_t*>(d_ids->data()),
                                       static_cast<int64_t>(ids.size()),
                                       reinterpret_cast<const uint8_t**>(d_ptrs->data()),
                                       reinterpret_cast<uint32_t*>(d_count->data()), s)
                    .ok());
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    ptrs->resize(ids.size());
    ASSERT_EQ(cudaMemcpy(ptrs->data(), d_ptrs->data(), ids.size() * 8, cudaMemcpyDeviceToHost),
              cudaSuccess);
    uint32_t misses = 0;
    ASSERT_EQ(cudaMemcpy(&misses, d_count->data(), 4, cudaMemcpyDeviceToHost), cudaSuccess);
    uint32_t want = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      const uint8_t* w = ids[i] >= 0 && ids[i] < n ? table[ids[i]] : nullptr;
      EXPECT_EQ((*ptrs)[i], w) << "slot " << i << " id " << ids[i];
      want += w == nullptr;
    }
    EXPECT_EQ(misses, want);
  };
  std::vector<const uint8_t*> ptrs;
  lookup(&ptrs);
  // Scatter some changes, then look up again.
  std::vector<int64_t> up_ids = {0, 1, 2, 998, 999};
  std::vector<const uint8_t*> up_values = {nullptr, slots + 5, slots + 6, slots, nullptr};
  for (size_t i = 0; i < up_ids.size(); ++i) table[up_ids[i]] = up_values[i];
  auto d_up = CudaDeviceMemory::allocate(up_ids.size() * 16);
  ASSERT_TRUE(d_up.ok());
  ASSERT_EQ(cudaMemcpy(d_up->data(), up_ids.data(), up_ids.size() * 8, cudaMemcpyHostToDevice),
            cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_up->data() + up_ids.size() * 8, up_values.data(), up_ids.size() * 8,
                       cudaMemcpyHostToDevice),
            cudaSuccess);
  ASSERT_TRUE(scatter_resident_async(
                  reinterpret_cast<const uint8_t**>(d_table->data()), n,
                  reinterpret_cast<const int64_t*>(d_up->data()),
                  reinterpret_cast<const uint8_t* const*>(d_up->data() + up_ids.size() * 8),
                  static_cast<int64_t>(up_ids.size()), s)
                  .ok());
  lookup(&ptrs);
  ASSERT_EQ(cudaStreamDestroy(s), cudaSuccess);
}

}  // namespace
}  // namespace trove
