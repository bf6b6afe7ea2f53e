#include "runtime/expert_source.h"

#include "base/strings.h"
#include "kernels/cpu/quant.h"
#include "kernels/quant.h"

namespace trove {

namespace {

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

MappedStoreExpertSource::MappedStoreExpertSource(const StoreReader& store,
                                                 const StoreLayerInfo& layer,
                                                 const RecordLayout& layout, bool verify)
    : store_(store),
      layer_(layer),
      layout_(layout),
      table_(store.mapped_records(layer)),
      verify_(verify),
      verified_((layer.table.count + 63) / 64, 0) {
  TROVE_CHECK(layout_.stride == layer.table.stride);
}

std::string MappedStoreExpertSource::describe() const {
  return "store " + store_.path() + ", layer " + layer_.name + " (mapped)";
}

Status MappedStoreExpertSource::acquire(std::span<const int64_t> ids,
                                        std::span<const uint8_t*> records) {
  check_ids(ids, records, num_experts());
  for (size_t i = 0; i < ids.size(); ++i) {
    const uint64_t id = static_cast<uint64_t>(ids[i]);
    const uint8_t* record = table_.data() + id * layout_.stride;
    uint64_t& word = verified_[id / 64];
    const uint64_t bit = uint64_t{1} << (id % 64);
    if (verify_ && (word & bit) == 0) {
      TROVE_RETURN_IF_ERROR(store_.verify_record(layer_, ids[i], record));
      word |= bit;
      ++verified_count_;
    }
    records[i] = record;
  }
  return Status::ok_status();
}

}  // namespace trove
