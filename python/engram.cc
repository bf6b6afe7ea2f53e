// trove._core.EngramTable: a stored Engram layer's tables (runtime/engram/engram_table.h) for
// trove.torch.Engram. Hash, prefetch, lookup and the sparse row gradients cross as ndarrays,
// read and written in place; the config and stats as JSON text.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "base/bytes.h"
#include "base/status.h"
#include "kernels/engram.h"
#include "runtime/engram/engram_table.h"
#include "runtime/tiers/cache_policy.h"
#include "storage/store.h"

namespace nb = nanobind;

namespace trove {
namespace {

using I64In = nb::ndarray<const int64_t, nb::c_contig, nb::device::cpu>;
using I64Out = nb::ndarray<int64_t, nb::c_contig, nb::device::cpu>;
using F32In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using F32Out = nb::ndarray<float, nb::c_contig, nb::device::cpu>;

void check(const Status& s) {
  if (s.ok()) return;
  if (s.code() == Status::Code::kInvalidArgument || s.code() == Status::Code::kOutOfRange) {
    throw nb::value_error(s.message().c_str());
  }
  if (s.code() == Status::Code::kNotFound) throw nb::key_error(s.message().c_str());
  throw std::runtime_error(s.to_string());
}

template <typename T>
T take(Result<T> r) {
  check(r.status());
  return std::move(*r);
}

template <typename A>
void want_size(const A& a, size_t n, const char* what) {
  if (a.size() != n) {
    throw nb::value_error((std::string(what) + " has " + std::to_string(a.size()) +
                           " elements, expected " + std::to_string(n))
                              .c_str());
  }
}

class PyEngramTable {
 public:
  PyEngramTable(const std::string& path, const std::string& name, const std::string& host,
                const std::string& policy, int threads, bool verify) {
    store_ = std::make_unique<StoreReader>(take(StoreReader::open(path)));
    const StoreLayerInfo* layer = store_->find_layer(name);
    if (layer == nullptr) {
      check(Status::not_found(path + " has no layer '" + name + "'"));
    }
    EngramTableOptions o;
    o.threads = threads;
    o.verify_checksums = verify;
    if (!host.empty()) {
      TieredSourceOptions t;
      t.host_budget_bytes = take(parse_bytes(host));
      t.policy = take(parse_eviction_policy(policy));
      o.tiers = t;
    }
    table_ = take(EngramTable::open(*store_, *layer, o));
    layer_ = layer;
  }

  std::string config_json() const {
    nlohmann::json j = engram_config_json(table_->config());
    j["dtype"] = std::string(dtype_name(table_->rows().dtype));
    j["row_bytes"] = table_->rows().row_bytes;
    j["rows_per_record"] = table_->rows().rows_per_record;
    j["table_bytes"] = layer_->table.bytes;
    j["source"] = table_->describe();
    return j.dump();
  }

  // The layer's dense tensor `name` (fp32, flat).
  std::vector<float> dense(const std::string& name) const {
    return take(store_->read_dense(*layer_, name));
  }

  // ids [tables, batch * seq] of tokens [batch, seq].
  void hash(I64In tokens, int64_t batch, int64_t seq, I64Out ids) const {
    want_size(tokens, static_cast<size_t>(batch * seq), "tokens");
    want_size(ids, static_cast<size_t>(table_->config().tables() * batch * seq), "ids");
    check(engram_hash(table_->config().hash, tokens.data(), batch, seq, ids.data()));
  }

  void preload() {
    nb::gil_scoped_release unlocked;
    check(table_->preload());
  }

  void prefetch(I64In ids, int64_t n) {
    nb::gil_scoped_release unlocked;
    check(table_->prefetch({ids.data(), ids.size()}, n));
  }

  std::string lookup(I64In ids, int64_t n, F32Out out) {
    want_size(out, static_cast<size_t>(n * table_->config().concat_dim()), "out");
    {
      nb::gil_scoped_release unlocked;
      check(table_->lookup({ids.data(), ids.size()}, n, out.data()));
    }
    const EngramLookupStats& s = table_->last_lookup();
    return nlohmann::json{{"rows", s.rows},
                          {"unique_records", s.unique_records},
                          {"prefetched", s.prefetched},
                          {"hits", s.fetch.hits},
                          {"misses", s.fetch.misses},
                          {"bytes_read", s.fetch.bytes_read},
                          {"stall_seconds", s.fetch.stall_seconds},
                          {"acquire_seconds", s.acquire_seconds},
                          {"gather_seconds", s.gather_seconds}}
        .dump();
  }

  // The sparse backward of table k's lookup: dy [n, E] (the gradient of the concatenated
  // rows) -> (unique ids, their summed gradients [U, e]) as flat lists.
  nb::tuple row_grads(I64In ids, int64_t n, F32In dy, int64_t k) const {
    const int64_t e = table_->config().embed_per_head;
    const int64_t tables = table_->config().tables();
    if (k < 0 || k >= tables) throw nb::value_error("table index out of range");
    want_size(ids, static_cast<size_t>(tables * n), "ids");
    want_size(dy, static_cast<size_t>(n * tables * e), "dy");
    auto* unique = new std::vector<int64_t>();
    auto* grads = new std::vector<float>();
    engram_row_grads(ids.data() + k * n, n, dy.data() + k * e, tables * e, e, unique, grads);
    nb::capsule u_owner(unique,
                        [](void* p) noexcept { delete static_cast<std::vector<int64_t>*>(p); });
    nb::capsule g_owner(grads,
                        [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
    const size_t u = unique->size();
    return nb::make_tuple(
        nb::ndarray<nb::numpy, int64_t>(unique->data(), {u}, u_owner),
        nb::ndarray<nb::numpy, float>(grads->data(), {u, static_cast<size_t>(e)}, g_owner));
  }

 private:
  std::unique_ptr<StoreReader> store_;
  const StoreLayerInfo* layer_ = nullptr;
  std::unique_ptr<EngramTable> table_;
};

}  // namespace

void bind_engram(nb::module_& m) {
  nb::class_<PyEngramTable>(m, "EngramTable")
      .def(nb::init<const std::string&, const std::string&, const std::string&, const std::string&,
                    int, bool>(),
           nb::arg("path"), nb::arg("name"), nb::arg("host") = "", nb::arg("policy") = "frequency",
           nb::arg("threads") = 1, nb::arg("verify") = true)
      .def("config_json", &PyEngramTable::config_json)
      .def("dense", &PyEngramTable::dense, nb::arg("name"))
      .def("hash", &PyEngramTable::hash, nb::arg("tokens"), nb::arg("batch"), nb::arg("seq"),
           nb::arg("ids"))
      .def("preload", &PyEngramTable::preload)
      .def("prefetch", &PyEngramTable::prefetch, nb::arg("ids"), nb::arg("n"))
      .def("lookup", &PyEngramTable::lookup, nb::arg("ids"), nb::arg("n"), nb::arg("out"))
      .def("row_grads", &PyEngramTable::row_grads, nb::arg("ids"), nb::arg("n"), nb::arg("dy"),
           nb::arg("table"));
}

}  // namespace trove
