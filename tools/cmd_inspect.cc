// trove inspect / trove verify.
#include <chrono>
#include <cstdio>

#include "base/bytes.h"
#include "base/progress.h"
#include "runtime/convert/inspect.h"
#include "storage/store.h"
#include "tools/commands.h"

namespace trove::cli {

void add_inspect(CLI::App& app, GlobalOptions& global) {
  auto* cmd = app.add_subcommand(
      "inspect",
      "Show a store's layers, configs, record formats, read amplification, quantization error,\n"
      "provenance and how its tables split over tier budgets.\n"
      "Example: trove inspect model.trove --vram 12GiB --host 48GiB");
  struct Args {
    std::string path, vram, host;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("store", args->path, "The .trove store")->required()->check(CLI::ExistingFile);
  cmd->add_option("--vram", args->vram, "GPU memory budget for expert tables, e.g. 12GiB");
  cmd->add_option("--host", args->host, "Host memory budget for expert tables, e.g. 48GiB");
  cmd->callback([args, &global] {
    TierBudgets budgets;
    for (auto [text, out] : {std::pair{&args->vram, &budgets.vram}, {&args->host, &budgets.host}}) {
      if (text->empty()) continue;
      Result<uint64_t> b = parse_bytes(*text);
      if (!b.ok()) {
        global.exit_code = report_error("inspect", b.status());
        return;
      }
      *out = *b;
    }
    Result<StoreReader> store = StoreReader::open(args->path);
    if (!store.ok()) {
      global.exit_code = report_error("inspect", store.status());
      return;
    }
    Result<nlohmann::json> report = inspect_store(*store, budgets);
    if (!report.ok()) {
      global.exit_code = report_error("inspect", report.status());
      return;
    }
    if (global.json) {
      print_json(*report);
    } else {
      std::printf("%s", render_inspect(*report).c_str());
    }
  });
}

// Runs verify on an open store; prints the result; returns the exit code.
int run_verify(const std::string& path, const GlobalOptions& global) {
  const auto start = std::chrono::steady_clock::now();
  // Checksums are verified explicitly below; open() itself checks header, trailer, manifest.
  Result<StoreReader> store = StoreReader::open(path);
  if (!store.ok()) {
    if (global.json) {
      nlohmann::json j = {{"file", path}, {"ok", false}, {"error", store.status().to_string()}};
      print_json(j);
    }
    report_error("verify", store.status());
    return store.status().is_corruption() ? kExitCorrupt : kExitError;
  }
  ProgressBar bar("verifying", store->file_size(), ProgressBar::Unit::kBytes);
  Result<std::vector<StoreFault>> faults =
      store->verify([&bar](uint64_t done, uint64_t) { bar.update(done); });
  bar.finish();
  if (!faults.ok()) return report_error("verify", faults.status());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  uint64_t records = 0;
  for (const auto& l : store->layers()) records += l.table.count;
  if (global.json) {
    nlohmann::json list = nlohmann::json::array();
    for (const StoreFault& f : *faults) {
      list.push_back({{"region", f.region},
                      {"layer", f.layer},
                      {"item", f.item},
                      {"offset", f.offset},
                      {"bytes", f.bytes},
                      {"error", f.error},
                      {"message", f.message()}});
    }
    nlohmann::json j = {{"file", path},       {"ok", faults->empty()},
                        {"faults", list},     {"layers", store->layers().size()},
                        {"records", records}, {"bytes", store->file_size()},
                        {"seconds", seconds}};
    print_json(j);
  } else if (faults->empty()) {
    if (!global.quiet) {
      std::printf(
          "%s: OK: header, trailer, manifest, %zu layer%s, %llu records and their dense "
          "tensors match their XXH3 checksums (%s in %.2f s, %s)\n",
          path.c_str(), store->layers().size(), store->layers().size() == 1 ? "" : "s",
          static_cast<unsigned long long>(records), format_bytes(store->file_size()).c_str(),
          seconds, format_rate(seconds > 0 ? store->file_size() / seconds : 0).c_str());
    }
  } else {
    std::fprintf(stderr, "trove verify: %s: %zu damaged extent%s:\n", path.c_str(), faults->size(),
                 faults->size() == 1 ? "" : "s");
    for (const StoreFault& f : *faults) std::fprintf(stderr, "  %s\n", f.message().c_str());
    std::fprintf(stderr,
                 "The store is damaged; re-create it with `trove pack` from its source (see "
                 "`trove inspect` for provenance) or restore a copy.\n");
  }
  return faults->empty() ? kExitOk : kExitCorrupt;
}

void add_verify(CLI::App& app, GlobalOptions& global) {
  auto* cmd = app.add_subcommand(
      "verify",
      "Check every checksum of a store: header, trailer, manifest, dense tensors and each\n"
      "expert record. Exit 0 when intact, 3 when damaged (each damaged extent is named).");
  auto path = std::make_shared<std::string>();
  cmd->add_option("store", *path, "The .trove store")->required()->check(CLI::ExistingFile);
  cmd->callback([path, &global] { global.exit_code = run_verify(*path, global); });
}

void print_json(const nlohmann::json& j) {
  std::printf("%s\n", j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
}

int report_error(const std::string& command, const Status& status) {
  std::fprintf(stderr, "trove %s: error: %s\n", command.c_str(), status.to_string().c_str());
  return kExitError;
}

}  // namespace trove::cli
