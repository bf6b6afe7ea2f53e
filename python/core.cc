// trove._core: the thin nanobind layer under the `trove` Python package (python/trove). It
// binds the C++ API as it is: pack_store (runtime/convert/pack.h), a stored PEER layer
// (runtime/layer/peer_layer.h) over a mapped store or a host tier, and its int4 trainer
// (train/table_trainer.h). Nothing here knows torch: tensors cross as DLPack/buffer-protocol
// ndarrays (nanobind), read and written in place, never copied; trove/torch.py does the
// autograd, dtypes and shapes. Configs and statistics cross as JSON text, which Python parses.
//
// Errors are Status values turned into Python exceptions: ValueError (invalid argument, out of
// range), KeyError (not found), RuntimeError (the rest), the message as trove wrote it.
// Long calls release the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/bytes.h"
#include "base/dtype.h"
#include "base/status.h"
#include "base/strings.h"
#include "runtime/convert/pack.h"
#include "runtime/layer/lookahead.h"
#include "runtime/layer/peer_config_json.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/layer/store_layer.h"
#include "runtime/tiers/cache_policy.h"
#include "storage/store.h"
#include "train/table_trainer.h"

namespace nb = nanobind;

namespace trove {
void bind_engram(nb::module_& m);  // python/engram.cc
}  // namespace trove

namespace trove {
namespace {

// Contiguous host arrays, as any DLPack producer (torch, numpy) hands them over.
using F32In = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using F32Out = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
using I64Out = nb::ndarray<int64_t, nb::c_contig, nb::device::cpu>;

[[noreturn]] void raise(const Status& s) {
  switch (s.code()) {
    case Status::Code::kInvalidArgument:
    case Status::Code::kOutOfRange:
      throw nb::value_error(s.message().c_str());
    case Status::Code::kNotFound:
      throw nb::key_error(s.message().c_str());
    default:
      throw std::runtime_error(s.to_string());
  }
}

void check(const Status& s) {
  if (!s.ok()) raise(s);
}

template <typename T>
T take(Result<T> r) {
  if (!r.ok()) raise(r.status());
  return std::move(*r);
}

template <typename A>
std::span<const float> in_span(const A& a) {
  return {a.data(), a.size()};
}
std::span<float> out_span(F32Out& a) {
  return {a.data(), a.size()};
}

// `what` must hold `want` elements (the binding's own contract with trove/torch.py).
template <typename A>
void check_size(const A& a, size_t want, const char* what) {
  if (a.size() != want) {
    throw nb::value_error((std::string(what) + " has " + std::to_string(a.size()) +
                           " elements, expected " + std::to_string(want))
                              .c_str());
  }
}

// A stored layer with its store, opened for Python. With `train`, the layer computes over a
// TableTrainer's overlay of the records changed since the last checkpoint, and backward()
// adds the expert rows' gradients to the trainer's pending step (they never reach Python).
class Layer {
 public:
  Layer(const std::string& path, const std::string& name, const std::string& host,
        const std::string& policy, const std::string& backend, const std::string& vram, int threads,
        bool verify, bool train, int lookahead, int64_t batch, const std::string& routing_math)
      : lookahead_(lookahead), batch_(batch), routing_math_(routing_math) {
    if (lookahead < 0 || lookahead > kMaxLookahead) {
      throw nb::value_error(
          str_printf("lookahead=%d: expected 0 (off) to %d batches", lookahead, kMaxLookahead)
              .c_str());
    }
    if (batch < 1) {
      throw nb::value_error(
          str_printf("batch=%lld: expected a positive number of tokens", (long long)batch).c_str());
    }
    PeerLayerOptions o;
    o.backend = take(parse_peer_backend(backend));
    if (routing_math == "bf16" || routing_math == "int8") {
      if (o.backend != PeerBackend::kCpu || train) {
        throw nb::value_error(("routing_math='" + routing_math +
                               "' is a mode of the CPU backend's inference; use device='cpu' "
                               "and leave it out for training (routing_math='f32')")
                                  .c_str());
      }
      o.cpu.routing_precision =
          routing_math == "int8" ? RoutingPrecision::kInt8 : RoutingPrecision::kBf16;
    } else if (routing_math != "f32") {
      throw nb::value_error(
          ("routing_math='" + routing_math + "': expected 'f32', 'bf16' or 'int8'").c_str());
    }
    o.threads = threads;
    o.verify_checksums = verify;
    if (!host.empty()) {
      TieredSourceOptions t;
      t.host_budget_bytes = take(parse_bytes(host));
      t.policy = take(parse_eviction_policy(policy));
      t.io.verify = verify;
      o.tiers = t;
    }
    if (!vram.empty()) o.cuda.vram_budget_bytes = take(parse_bytes(vram));
    if (train) {
      trainer_ = take(TableTrainer::open(path, name, o));
      return;
    }
    store_ = std::make_unique<StoreReader>(take(StoreReader::open(path)));
    layer_.emplace(take(PeerLayer::open(*store_, name, o)));
  }

  PeerLayer& layer() { return trainer_ ? trainer_->layer() : *layer_; }
  bool training() const { return trainer_ != nullptr; }

  std::string config_json() { return peer_config_to_json(layer().config()).dump(); }
  std::string record_dtype() { return std::string(dtype_name(layer().record_layout().dtype)); }

  // The router's tensors (copies) in the canonical arrangement (kernels/peer.h), by name.
  nb::dict router() {
    nb::dict d;
    const PeerDenseParams& p = layer().params();
    auto put = [&](const char* name, const std::vector<float>& v) {
      if (v.empty()) return;
      auto* copy = new std::vector<float>(v);
      nb::capsule owner(copy, [](void* q) noexcept { delete static_cast<std::vector<float>*>(q); });
      d[name] = nb::ndarray<nb::numpy, float>(copy->data(), {copy->size()}, owner);
    };
    put("query_weight", p.query_weight);
    put("query_bias", p.query_bias);
    put("keys", p.keys);
    put("norm_weight", p.norm_weight);
    return d;
  }

  // Copies Python's router tensors into the layer (after an optimizer changed them).
  void set_router(F32In qw, std::optional<F32In> qb, F32In keys, std::optional<F32In> norm) {
    PeerDenseParams& p = layer().mutable_params();
    auto set = [](std::vector<float>& dst, const std::optional<F32In>& src, const char* what) {
      if (dst.empty() && !src) return;
      if (!src) throw nb::value_error((std::string(what) + " is missing").c_str());
      check_size(*src, dst.size(), what);
      std::memcpy(dst.data(), src->data(), dst.size() * sizeof(float));
    };
    set(p.query_weight, qw, "query_weight");
    set(p.query_bias, qb, "query_bias");
    set(p.keys, keys, "keys");
    set(p.norm_weight, norm, "norm_weight");
  }

  // y [T, D_out] for x [T, D]; ids/gates [T, h, k] when given. Returns the stats as JSON.
  std::string forward(F32In x, F32Out y, std::optional<I64Out> ids, std::optional<F32Out> gates) {
    const PeerConfig& c = layer().config();
    const int64_t T = static_cast<int64_t>(x.size()) / c.dim;
    check_size(x, static_cast<size_t>(T * c.dim), "x");
    check_size(y, static_cast<size_t>(T * c.dim_out), "y");
    Metrics stats;  // a forward split into look-ahead batches reports their sum
    PeerRouting routing;
    const bool want_routing = ids.has_value() || gates.has_value();
    if (lookahead_ > 0 && T > batch_) {
      // Batches of batch_ tokens, later ones routed and their experts prefetched while one
      // computes (runtime/layer/lookahead.h); y is the same bit for bit.
      const int64_t per_token = c.heads * c.topk;
      if (want_routing) {
        routing.tokens = T;
        routing.heads = c.heads;
        routing.topk = c.topk;
        routing.ids.resize(static_cast<size_t>(T * per_token));
        routing.gates.resize(routing.ids.size());
      }
      const float* xs = x.data();
      float* ys = y.data();
      nb::gil_scoped_release unlocked;
      check(forward_with_lookahead(
          layer(), (T + batch_ - 1) / batch_, lookahead_,
          [&](int64_t b, std::vector<float>* xb, int64_t* n) {
            const int64_t first = b * batch_;
            *n = std::min(batch_, T - first);
            xb->assign(xs + first * c.dim, xs + (first + *n) * c.dim);
            return Status::ok_status();
          },
          [&](int64_t b, std::span<const float> yb, const PeerRouting& r, const PeerBatchStats& s) {
            const int64_t first = b * batch_;
            std::copy(yb.begin(), yb.end(), ys + first * c.dim_out);
            if (want_routing) {
              std::copy(r.ids.begin(), r.ids.end(), routing.ids.begin() + first * per_token);
              std::copy(r.gates.begin(), r.gates.end(), routing.gates.begin() + first * per_token);
            }
            stats += batch_metrics(s);
            return Status::ok_status();
          }));
    } else {
      PeerBatchStats s;
      {
        nb::gil_scoped_release unlocked;
        check(layer().forward(in_span(x), T, out_span(y), want_routing ? &routing : nullptr, &s));
      }
      stats = batch_metrics(s);
    }
    if (ids) {
      check_size(*ids, routing.ids.size(), "ids");
      std::memcpy(ids->data(), routing.ids.data(), routing.ids.size() * sizeof(int64_t));
    }
    if (gates) {
      check_size(*gates, routing.gates.size(), "gates");
      std::memcpy(gates->data(), routing.gates.data(), routing.gates.size() * sizeof(float));
    }
    return stats.to_json().dump();
  }

  // The gradients of sum(dy * y) at x: dx and the router's, written into the given arrays (a
  // router tensor the layer lacks is None).
  void backward(F32In x, F32In dy, F32Out dx, F32Out dqw, std::optional<F32Out> dqb, F32Out dkeys,
                std::optional<F32Out> dnorm) {
    const PeerConfig& c = layer().config();
    const int64_t T = static_cast<int64_t>(x.size()) / c.dim;
    check_size(x, static_cast<size_t>(T * c.dim), "x");
    check_size(dy, static_cast<size_t>(T * c.dim_out), "dy");
    check_size(dx, x.size(), "dx");
    if (routing_math_ != "f32") {
      throw nb::value_error(("backward through a layer opened with routing_math='" + routing_math_ +
                             "': its gradients are those of f32 routing; open it with "
                             "routing_math='f32' to train or differentiate")
                                .c_str());
    }
    {
      nb::gil_scoped_release unlocked;
      check(layer().backward(in_span(x), T, in_span(dy), &grads_));
      if (trainer_) check(trainer_->accumulate(grads_));
    }
    auto put = [](const std::vector<float>& src, float* dst, size_t n, const char* what) {
      if (src.size() != n) {
        throw nb::value_error((std::string(what) + ": the layer's gradient has " +
                               std::to_string(src.size()) + " elements, the output " +
                               std::to_string(n))
                                  .c_str());
      }
      std::memcpy(dst, src.data(), n * sizeof(float));
    };
    put(grads_.dx, dx.data(), dx.size(), "dx");
    put(grads_.d_query_weight, dqw.data(), dqw.size(), "d_query_weight");
    if (dqb) put(grads_.d_query_bias, dqb->data(), dqb->size(), "d_query_bias");
    put(grads_.d_keys, dkeys.data(), dkeys.size(), "d_keys");
    if (dnorm) put(grads_.d_norm_weight, dnorm->data(), dnorm->size(), "d_norm_weight");
  }

  TableTrainer& trainer() {
    if (!trainer_) {
      throw nb::value_error("this layer was opened for inference, not with train=True");
    }
    return *trainer_;
  }

  std::string step(float lr, int saturation_tolerance, const std::string& optimizer) {
    TableTrainer& t = trainer();
    if (optimizer != "adagrad" && optimizer != "sgd") {
      throw nb::value_error(("optimizer '" + optimizer + "': adagrad or sgd").c_str());
    }
    const TrainOptimizer o = optimizer == "sgd" ? TrainOptimizer::kSgd : TrainOptimizer::kAdagrad;
    std::optional<Result<nlohmann::json>> r;
    {
      nb::gil_scoped_release unlocked;
      r.emplace(t.step(lr, saturation_tolerance, o));
    }
    return take(std::move(*r)).dump();
  }

  std::string checkpoint() {
    TableTrainer& t = trainer();
    std::optional<Result<nlohmann::json>> r;
    {
      nb::gil_scoped_release unlocked;
      r.emplace(t.checkpoint());
    }
    return take(std::move(*r)).dump();
  }

  // The training view of experts `ids` (weight = d/16 * b) into down [n, D] and up [n, D_out].
  void training_rows(nb::ndarray<const int64_t, nb::c_contig, nb::device::cpu> ids, F32Out down,
                     F32Out up) {
    std::vector<float> d, u;
    check(trainer().training_rows({ids.data(), ids.size()}, &d, &u));
    check_size(down, d.size(), "down");
    check_size(up, u.size(), "up");
    std::memcpy(down.data(), d.data(), d.size() * sizeof(float));
    std::memcpy(up.data(), u.data(), u.size() * sizeof(float));
  }

 private:
  int lookahead_ = 0;  // forward(): batches routed and prefetched ahead (0: one call)
  int64_t batch_ = 0;  // forward() with look-ahead: tokens per batch
  std::string routing_math_ = "f32";  // the router's products (backward needs f32)
  std::unique_ptr<TableTrainer> trainer_;
  std::unique_ptr<StoreReader> store_;
  std::optional<PeerLayer> layer_;
  PeerGrads grads_;
};

// pack_store from safetensors files in a named layout; returns the report as JSON.
std::string pack(const std::vector<std::string>& inputs, const std::string& output,
                 const std::string& layout, const std::vector<std::string>& prefixes,
                 const std::vector<std::string>& names, const std::string& quant,
                 const std::string& overrides_json, int threads, const std::string& command_line,
                 const std::vector<std::string>& engram_prefixes,
                 const std::vector<std::string>& engram_names) {
  PackOptions o;
  o.inputs = inputs;
  o.output = output;
  o.layout = take(parse_import_layout(layout));
  o.dtype = take(parse_dtype(quant));
  o.threads = threads;
  o.command_line = command_line;
  for (size_t i = 0; i < prefixes.size(); ++i) {
    o.layers.push_back({prefixes[i], i < names.size() ? names[i] : std::string()});
  }
  for (size_t i = 0; i < engram_prefixes.size(); ++i) {
    o.engram_layers.push_back(
        {engram_prefixes[i], i < engram_names.size() ? engram_names[i] : std::string()});
  }
  const nlohmann::json ov = nlohmann::json::parse(overrides_json);
  if (ov.contains("topk")) o.overrides.topk = ov["topk"].get<int64_t>();
  if (ov.contains("topk_per_half")) o.overrides.topk_per_half = ov["topk_per_half"].get<int64_t>();
  if (ov.contains("activation")) {
    o.overrides.activation = take(parse_activation(ov["activation"].get<std::string>()));
  }
  if (ov.contains("gate")) o.overrides.gate = take(parse_gate(ov["gate"].get<std::string>()));
  if (ov.contains("input_norm")) {
    o.overrides.input_norm = take(parse_input_norm(ov["input_norm"].get<std::string>()));
  }
  if (ov.contains("norm_eps")) o.overrides.norm_eps = ov["norm_eps"].get<float>();
  std::optional<Result<PackReport>> done;
  {
    nb::gil_scoped_release unlocked;
    done.emplace(pack_store(o));
  }
  const PackReport r = take(std::move(*done));
  nlohmann::json j = {{"output_bytes", r.output_bytes}, {"seconds", r.seconds}};
  for (const PackedLayer& l : r.layers) {
    j["layers"].push_back(nlohmann::json{{"name", l.name},
                                         {"config", peer_config_to_json(l.config)},
                                         {"dtype", std::string(dtype_name(l.record.dtype))},
                                         {"down_rmse", l.down_error.rmse()},
                                         {"up_rmse", l.up_error.rmse()}});
  }
  for (const PackedEngram& e : r.engram_layers) {
    j["engram_layers"].push_back(nlohmann::json{{"name", e.name},
                                                {"tables", e.tables},
                                                {"rows", e.rows},
                                                {"table_bytes", e.table_bytes},
                                                {"rmse", e.error.rmse()}});
  }
  return j.dump();
}

std::vector<std::string> store_layers(const std::string& path) {
  StoreReader store = take(StoreReader::open(path));
  std::vector<std::string> names;
  for (const StoreLayerInfo& l : store.layers()) names.push_back(l.name);
  return names;
}

}  // namespace
}  // namespace trove

NB_MODULE(_core, m) {
  using trove::Layer;
  // Layers held by Python objects alive at interpreter exit are reclaimed by the OS, not
  // reported as leaks (trove.torch keeps its layers in a registry for the custom ops).
  nb::set_leak_warnings(false);
  m.doc() = "trove's C++ core (runtime/layer/peer_layer.h, runtime/convert/pack.h, the trainer)";
  m.def("pack", &trove::pack, nb::arg("inputs"), nb::arg("output"), nb::arg("layout"),
        nb::arg("prefixes"), nb::arg("names"), nb::arg("quant"), nb::arg("overrides_json"),
        nb::arg("threads") = 0, nb::arg("command_line") = "",
        nb::arg("engram_prefixes") = std::vector<std::string>(),
        nb::arg("engram_names") = std::vector<std::string>());
  m.def("store_layers", &trove::store_layers, nb::arg("path"));
  trove::bind_engram(m);

  nb::class_<Layer>(m, "Layer")
      .def(nb::init<const std::string&, const std::string&, const std::string&, const std::string&,
                    const std::string&, const std::string&, int, bool, bool, int, int64_t,
                    const std::string&>(),
           nb::arg("path"), nb::arg("name"), nb::arg("host") = "", nb::arg("policy") = "frequency",
           nb::arg("backend") = "cpu", nb::arg("vram") = "", nb::arg("threads") = 0,
           nb::arg("verify") = true, nb::arg("train") = false, nb::arg("lookahead") = 0,
           nb::arg("batch") = 4096, nb::arg("routing_math") = "f32")
      .def("config_json", &Layer::config_json)
      .def_prop_ro("training", &Layer::training)
      .def("step", &Layer::step, nb::arg("lr"), nb::arg("saturation_tolerance"),
           nb::arg("optimizer"))
      .def("zero_grad", [](Layer& l) { l.trainer().zero_grad(); })
      .def("pending_experts", [](Layer& l) { return l.trainer().pending_experts(); })
      .def("steps", [](Layer& l) { return l.trainer().steps(); })
      .def("checkpoint", &Layer::checkpoint)
      .def("training_rows", &Layer::training_rows, nb::arg("ids"), nb::arg("down"), nb::arg("up"))
      .def("record_dtype", &Layer::record_dtype)
      .def("router", &Layer::router)
      .def("set_router", &Layer::set_router, nb::arg("query_weight"), nb::arg("query_bias").none(),
           nb::arg("keys"), nb::arg("norm_weight").none())
      .def("forward", &Layer::forward, nb::arg("x"), nb::arg("y"),
           nb::arg("ids").none() = nb::none(), nb::arg("gates").none() = nb::none())
      .def("backward", &Layer::backward, nb::arg("x"), nb::arg("dy"), nb::arg("dx"),
           nb::arg("d_query_weight"), nb::arg("d_query_bias").none(), nb::arg("d_keys"),
           nb::arg("d_norm_weight").none());
}
