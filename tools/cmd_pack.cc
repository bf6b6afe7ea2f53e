// trove pack / trove unpack.
#include <algorithm>
#include <cstdio>

#include "base/bytes.h"
#include "base/strings.h"
#include "runtime/convert/pack.h"
#include "tools/commands.h"

namespace trove::cli {

namespace {

nlohmann::json error_json(const QuantError& e) {
  return {{"rmse", e.rmse()}, {"max_abs", e.max_abs}, {"rel_fro", e.rel_fro()}};
}

}  // namespace

void print_pack_report(const PackOptions& opt, const PackReport& r) {
  std::printf("%-48s %-16s %-5s %-5s %10s %10s %10s\n", "tensor", "shape", "from", "to", "rmse",
              "max abs", "rel fro");
  for (const PackedLayer& l : r.layers) {
    for (bool up : {false, true}) {
      const QuantError& e = up ? l.up_error : l.down_error;
      const int64_t cols = up ? l.config.dim_out : l.config.dim;
      std::string name = l.name + (up ? ".up" : ".down");
      std::printf("%-48s %-16s %-5s %-5s %10.3e %10.3e %10.3e\n", name.c_str(),
                  str_printf("[%lld, %lld]", static_cast<long long>(l.config.num_experts()),
                             static_cast<long long>(cols))
                      .c_str(),
                  l.source_dtype.c_str(), std::string(dtype_name(opt.dtype)).c_str(), e.rmse(),
                  e.max_abs, e.rel_fro());
    }
  }
  for (const PackedEngram& e : r.engram_layers) {
    std::printf("%-48s %-16s %-5s %-5s %10.3e %10.3e %10.3e\n", (e.name + ".rows").c_str(),
                str_printf("%lldx[%lld, %lld]", static_cast<long long>(e.tables),
                           static_cast<long long>(e.rows / std::max<int64_t>(1, e.tables)),
                           static_cast<long long>(e.dim))
                    .c_str(),
                e.source_dtype.c_str(), std::string(dtype_name(opt.dtype)).c_str(), e.error.rmse(),
                e.error.max_abs, e.error.rel_fro());
  }
  std::printf(
      "\nwrote %s: %zu layer%s, %s from %s of expert tables (%.2fx smaller) in %.2f s "
      "(%s)\n",
      opt.output.c_str(), r.layers.size() + r.engram_layers.size(),
      r.layers.size() + r.engram_layers.size() == 1 ? "" : "s",
      format_bytes(r.output_bytes).c_str(), format_bytes(r.source_bytes).c_str(),
      r.output_bytes ? static_cast<double>(r.source_bytes) / r.output_bytes : 0.0, r.seconds,
      format_rate(r.seconds > 0 ? r.source_bytes / r.seconds : 0).c_str());
  std::printf("next: trove inspect %s   |   trove verify %s\n", opt.output.c_str(),
              opt.output.c_str());
}

nlohmann::json pack_report_json(const PackOptions& opt, const PackReport& r) {
  nlohmann::json layers = nlohmann::json::array();
  for (const PackedLayer& l : r.layers) {
    layers.push_back(
        {{"name", l.name},
         {"prefix", l.prefix},
         {"experts", l.config.num_experts()},
         {"dtype", dtype_name(opt.dtype)},
         {"source_dtype", l.source_dtype},
         {"record_bytes", l.record.record_bytes},
         {"stride", l.record.stride},
         {"error", {{"down", error_json(l.down_error)}, {"up", error_json(l.up_error)}}}});
  }
  nlohmann::json engram = nlohmann::json::array();
  for (const PackedEngram& e : r.engram_layers) {
    engram.push_back({{"name", e.name},
                      {"prefix", e.prefix},
                      {"tables", e.tables},
                      {"rows", e.rows},
                      {"dim", e.dim},
                      {"dtype", dtype_name(opt.dtype)},
                      {"source_dtype", e.source_dtype},
                      {"table_bytes", e.table_bytes},
                      {"error", error_json(e.error)}});
  }
  return {{"output", opt.output},           {"engram_layers", engram},
          {"output_bytes", r.output_bytes}, {"source_bytes", r.source_bytes},
          {"seconds", r.seconds},           {"layers", layers}};
}

void add_pack(CLI::App& app, GlobalOptions& global) {
  auto* cmd = app.add_subcommand(
      "pack",
      "Pack PEER (and Engram) layers from safetensors checkpoint(s) into a .trove store.\n"
      "Example: trove pack model.safetensors -o model.trove --layout mikeybeez \\\n"
      "           --prefix model.layers.19.mlp.peer --prefix model.layers.21.mlp.peer \\\n"
      "           --engram model.layers.1.engram --engram model.layers.5.engram --quant int4");
  struct Args {
    std::vector<std::string> inputs;
    std::string output;
    std::string layout = "trove";
    std::vector<std::string> prefixes;
    std::vector<std::string> engram;
    std::string quant = "int4";
    int64_t heads = 0, topk = 0, topk_per_half = 0;
    std::string activation, gate, input_norm;
    float norm_eps = 0;
    int stride_align = 64;
    int threads = 0;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("inputs", args->inputs, "Checkpoint file(s): one .safetensors or its shards")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("-o,--output", args->output, "The .trove store to write (replaced atomically)")
      ->required();
  cmd->add_option("--layout", args->layout,
                  "How the checkpoint names and arranges tensors: trove, mikeybeez (the "
                  "PEER+Engram repo) or lucidrains (PEER-pytorch)")
      ->check(CLI::IsMember({"trove", "mikeybeez", "lucidrains"}))
      ->capture_default_str();
  cmd->add_option("--prefix", args->prefixes,
                  "Tensor-name prefix of a PEER layer, e.g. model.layers.19.mlp.peer; repeat for "
                  "several layers; PREFIX=NAME stores it under another name");
  cmd->add_option("--engram", args->engram,
                  "Tensor-name prefix of an Engram layer (--layout mikeybeez: LlamaEngram's "
                  "embeddings.J.weight, value_proj, key_proj, norm_k, norm_q, conv, hash_mult), "
                  "e.g. model.layers.1.engram; repeatable; PREFIX=NAME as for --prefix. Its "
                  "rows are stored in the --quant dtype");
  cmd->add_option("--quant", args->quant, "Record dtype: int4, int8, bf16, f16 or f32")
      ->check(CLI::IsMember({"int4", "int8", "bf16", "f16", "f32"}))
      ->capture_default_str();
  cmd->add_option("--heads", args->heads, "Override the number of heads h (else from shapes)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--topk", args->topk,
                  "Experts per head k (else the checkpoint's metadata, else 8; 16 for lucidrains)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--topk-per-half", args->topk_per_half, "Candidates per half k' (default k)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--activation", args->activation, "relu, gelu, gelu_tanh or silu")
      ->check(CLI::IsMember({"relu", "gelu", "gelu_tanh", "silu"}));
  cmd->add_option("--gate", args->gate, "softmax, relu or sigmoid")
      ->check(CLI::IsMember({"softmax", "relu", "sigmoid"}));
  cmd->add_option("--input-norm", args->input_norm, "none or rms")
      ->check(CLI::IsMember({"none", "rms"}));
  cmd->add_option("--norm-eps", args->norm_eps, "Epsilon of the rms input norm")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--stride-align", args->stride_align,
                  "Pad records to a multiple of this many bytes: 64 (compact), 512 or 4096 "
                  "(each O_DIRECT read fetches one record and none of its neighbours)")
      ->check(CLI::IsMember({64, 512, 4096}))
      ->capture_default_str();
  cmd->add_option("--threads", args->threads, "Worker threads (0: all cores)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->callback([args, &global] {
    PackOptions opt;
    opt.inputs = args->inputs;
    opt.output = args->output;
    opt.layout = parse_import_layout(args->layout).value();
    opt.dtype = parse_dtype(args->quant).value();
    for (const std::string& p : args->prefixes) {
      const size_t eq = p.find('=');
      opt.layers.push_back(eq == std::string::npos
                               ? PackLayerRequest{p, p}
                               : PackLayerRequest{p.substr(0, eq), p.substr(eq + 1)});
    }
    for (const std::string& p : args->engram) {
      const size_t eq = p.find('=');
      opt.engram_layers.push_back(eq == std::string::npos
                                      ? PackLayerRequest{p, p}
                                      : PackLayerRequest{p.substr(0, eq), p.substr(eq + 1)});
    }
    if (args->heads > 0) opt.overrides.heads = args->heads;
    if (args->topk > 0) opt.overrides.topk = args->topk;
    if (args->topk_per_half > 0) opt.overrides.topk_per_half = args->topk_per_half;
    if (!args->activation.empty())
      opt.overrides.activation = parse_activation(args->activation).value();
    if (!args->gate.empty()) opt.overrides.gate = parse_gate(args->gate).value();
    if (!args->input_norm.empty())
      opt.overrides.input_norm = parse_input_norm(args->input_norm).value();
    if (args->norm_eps > 0) opt.overrides.norm_eps = args->norm_eps;
    opt.stride_align = static_cast<size_t>(args->stride_align);
    opt.threads = args->threads;
    opt.command_line = global.command_line;
    Result<PackReport> r = pack_store(opt);
    if (!r.ok()) {
      global.exit_code = report_error("pack", r.status());
      return;
    }
    if (global.json) {
      print_json(pack_report_json(opt, *r));
    } else if (!global.quiet) {
      print_pack_report(opt, *r);
    }
  });
}

void add_unpack(CLI::App& app, GlobalOptions& global) {
  auto* cmd = app.add_subcommand(
      "unpack",
      "Write a store's layers back as safetensors in the trove layout (dequantized).\n"
      "Example: trove unpack model.trove -o back.safetensors --dtype bf16");
  struct Args {
    std::string input, output, dtype = "f32";
    std::vector<std::string> layers;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("store", args->input, "The .trove store")->required()->check(CLI::ExistingFile);
  cmd->add_option("-o,--output", args->output, "The .safetensors file to write")->required();
  cmd->add_option("--dtype", args->dtype, "Tensor dtype of the output: f32, f16 or bf16")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--layer", args->layers, "Only these layers (repeatable; default all)");
  cmd->callback([args, &global] {
    UnpackOptions opt;
    opt.input = args->input;
    opt.output = args->output;
    opt.dtype = args->dtype == "f32"   ? StDType::kF32
                : args->dtype == "f16" ? StDType::kF16
                                       : StDType::kBF16;
    opt.layers = args->layers;
    Result<UnpackReport> r = unpack_store(opt);
    if (!r.ok()) {
      global.exit_code = report_error("unpack", r.status());
      return;
    }
    if (global.json) {
      nlohmann::json j = {{"output", opt.output},
                          {"output_bytes", r->output_bytes},
                          {"tensors", r->tensors},
                          {"seconds", r->seconds}};
      print_json(j);
    } else if (!global.quiet) {
      std::printf("wrote %s: %lld tensors, %s in %.2f s\n", opt.output.c_str(),
                  static_cast<long long>(r->tensors), format_bytes(r->output_bytes).c_str(),
                  r->seconds);
    }
  });
}

}  // namespace trove::cli
