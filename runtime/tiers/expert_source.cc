#include "runtime/tiers/expert_source.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>

#include "base/strings.h"
#include "kernels/cpu/quant.h"
#include "kernels/quant.h"

namespace trove {

namespace {

// Tables from this size on ask for transparent huge pages (ResidentStoreExpertSource::open).
constexpr uint64_t kHugePageMinTable = uint64_t{32} << 20;

void check_ids(std::span<const int64_t> ids, std::span<const uint8_t*> records, int64_t n) {
  TROVE_CHECK(ids.size() == records.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    TROVE_CHECK_MSG(ids[i] >= 0 && ids[i] < n && (i == 0 || ids[i] > ids[i - 1]),
                    "expert ids must be unique, ascending and below %lld",
                    static_cast<long long>(n));
  }
}

}  // namespace

MemoryExpertSource::MemoryExpertSource(const RecordLayout& layout, std::vector<uint8_t> records)
    : layout_(layout), records_(std::move(records)) {
  TROVE_CHECK(layout_.stride > 0 && records_.size() % layout_.stride == 0);
  num_experts_ = static_cast<int64_t>(records_.size() / layout_.stride);
}

Result<std::unique_ptr<MemoryExpertSource>> MemoryExpertSource::pack(const RecordLayout& layout,
                                                                     std::span<const float> down,
                                                                     std::span<const float> up,
                                                                     int threads) {
  if (layout.width != 1 || down.size() % static_cast<size_t>(layout.dim) != 0) {
    return Status::invalid_argument(
        str_printf("expert table 'down' has %zu values, not a multiple of dim %lld", down.size(),
                   static_cast<long long>(layout.dim)));
  }
  const int64_t n = static_cast<int64_t>(down.size()) / layout.dim;
  if (up.size() != static_cast<size_t>(n * layout.dim_out)) {
    return Status::invalid_argument(
        str_printf("expert table 'up' has %zu values, expected %lld experts x dim_out %lld",
                   up.size(), static_cast<long long>(n), static_cast<long long>(layout.dim_out)));
  }
  for (auto [name, table, len] :
       {std::tuple{"down", down, layout.dim}, std::tuple{"up", up, layout.dim_out}}) {
    for (int64_t e = 0; e < n; ++e) {
      Status s = quant_check_range(layout.dtype, table.data() + e * len, len);
      if (!s.ok()) {
        return s.with_context(
            str_printf("expert table '%s', expert %lld", name, static_cast<long long>(e)));
      }
    }
  }
  std::vector<uint8_t> records(static_cast<size_t>(n) * layout.stride);
  pack_records(layout, down.data(), up.data(), n, records.data(), threads);
  return std::make_unique<MemoryExpertSource>(layout, std::move(records));
}

std::string MemoryExpertSource::describe() const {
  return str_printf("%lld %s records in memory", static_cast<long long>(num_experts_),
                    std::string(dtype_name(layout_.dtype)).c_str());
}

Status MemoryExpertSource::acquire(std::span<const int64_t> ids,
                                   std::span<const uint8_t*> records) {
  check_ids(ids, records, num_experts_);
  for (size_t i = 0; i < ids.size(); ++i) {
    records[i] = records_.data() + static_cast<size_t>(ids[i]) * layout_.stride;
  }
  return Status::ok_status();
}

ResidentStoreExpertSource::ResidentStoreExpertSource(const StoreReader& store,
                                                     const StoreLayerInfo& layer,
                                                     const RecordLayout& layout, bool verify,
                                                     uint8_t* table)
    : store_(store),
      layer_(layer),
      layout_(layout),
      verify_(verify),
      table_(table),
      loaded_((layer.table.count + 63) / 64, 0) {}

ResidentStoreExpertSource::~ResidentStoreExpertSource() {
  ::munmap(table_, layer_.table.bytes);
}

Result<std::unique_ptr<ResidentStoreExpertSource>> ResidentStoreExpertSource::open(
    const StoreReader& store, const StoreLayerInfo& layer, const RecordLayout& layout,
    bool verify) {
  TROVE_CHECK(layout.stride == layer.table.stride);
  // Address space for the whole table; pages are committed as records arrive.
  void* table = ::mmap(nullptr, layer.table.bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (table == MAP_FAILED) {
    const int err = errno;
    return Status::from_errno(str_printf("%s: layer %s: reserving %llu bytes of address space for "
                                         "its records",
                                         store.path().c_str(), layer.name.c_str(),
                                         static_cast<unsigned long long>(layer.table.bytes)),
                              err);
  }
  // The expert kernels read records at random addresses: with 4 KiB pages nearly every record
  // is a TLB miss. Transparent huge pages (where the system allows them on request) took 12-17%
  // off the int4 expert stage's CPU time (bench/results/2026-12-05-dev-cpu-vs-torch.md). A table
  // this source holds is meant to become resident whole, so committing 2 MiB at a first touch
  // costs nothing it would not have; small tables gain little and are left alone. Advice only:
  // an error (THP off) changes nothing.
  if (layer.table.bytes >= kHugePageMinTable) {
    ::madvise(table, layer.table.bytes, MADV_HUGEPAGE);
  }
  return std::unique_ptr<ResidentStoreExpertSource>(
      new ResidentStoreExpertSource(store, layer, layout, verify, static_cast<uint8_t*>(table)));
}

std::string ResidentStoreExpertSource::describe() const {
  return "store " + store_.path() + ", layer " + layer_.name + " (resident)";
}

Status ResidentStoreExpertSource::acquire(std::span<const int64_t> ids,
                                          std::span<const uint8_t*> records) {
  check_ids(ids, records, num_experts());
  const size_t stride = layout_.stride;
  auto is_loaded = [&](int64_t id) {
    return (loaded_[static_cast<size_t>(id) / 64] >> (id % 64) & 1) != 0;
  };
  missing_.clear();
  for (int64_t id : ids) {
    if (!is_loaded(id)) missing_.push_back(id);
  }
  if (!missing_.empty()) {
    // One batched read (neighbours coalesced), every record verified before any is kept.
    staging_.resize(missing_.size() * stride);
    TROVE_RETURN_IF_ERROR(store_.read_records(layer_, missing_, staging_, verify_));
    for (size_t i = 0; i < missing_.size(); ++i) {
      const int64_t id = missing_[i];
      std::memcpy(table_ + static_cast<size_t>(id) * stride, staging_.data() + i * stride, stride);
      loaded_[static_cast<size_t>(id) / 64] |= uint64_t{1} << (id % 64);
    }
    loaded_count_ += static_cast<int64_t>(missing_.size());
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    records[i] = table_ + static_cast<size_t>(ids[i]) * stride;
  }
  return Status::ok_status();
}

}  // namespace trove
