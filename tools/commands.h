// The `trove` subcommands. Each registers its options on the CLI11 app and returns the exit
// code when run. tools/ is a thin layer: the work happens in runtime/ and storage/.
#pragma once

#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "base/bytes.h"
#include "base/status.h"
#include "runtime/convert/pack.h"
#include "runtime/layer/peer_layer.h"
#include "runtime/tiers/tiered_source.h"

namespace trove::cli {

// Options every subcommand shares.
struct GlobalOptions {
  bool json = false;   // machine-readable output on stdout
  bool quiet = false;  // no progress bars, no human report
  std::string command_line;
  int exit_code = 0;  // set by the subcommand that ran
};

// Exit codes, documented in `trove --help`.
inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 1;    // bad input, I/O error, ...
inline constexpr int kExitCorrupt = 3;  // verify found damage (export, import: damaged data)

void add_pack(CLI::App& app, GlobalOptions& global);
void add_unpack(CLI::App& app, GlobalOptions& global);
void add_inspect(CLI::App& app, GlobalOptions& global);
void add_verify(CLI::App& app, GlobalOptions& global);
void add_demo(CLI::App& app, GlobalOptions& global);
void add_forward(CLI::App& app, GlobalOptions& global);
void add_bench(CLI::App& app, GlobalOptions& global);
void add_train(CLI::App& app, GlobalOptions& global);
void add_export(CLI::App& app, GlobalOptions& global);
void add_import(CLI::App& app, GlobalOptions& global);

// `trove demo`'s last step: `trove bench` on an int4 table of `experts` (e.g. "256K") records
// of `dim` (written in `dir`) through a host budget of 10% of it. The --json document goes to
// `json`.
int run_demo_bench(const std::string& dir, const std::string& experts, int64_t dim,
                   const GlobalOptions& global, nlohmann::json* json);

// A CLI11 check for byte sizes ("2GiB", "512 MiB", "4096"; base/bytes.h).
inline const CLI::Validator valid_bytes(
    [](std::string& text) {
      Result<uint64_t> b = parse_bytes(text);
      return b.ok() ? std::string() : b.status().message();
    },
    "SIZE");

// --policy, --io and --queue-depth: how a host tier over the store file is run.
struct TierFlags {
  std::string policy = "frequency";
  std::string io = "auto";
  int queue_depth = 64;
  int landing_groups = 1;  // TieredSourceOptions::landing_groups
};
void add_tier_flags(CLI::App* cmd, TierFlags* flags);
TieredSourceOptions tier_options(const TierFlags& flags, uint64_t host_budget_bytes);

// --device cpu|cuda and --vram, as `trove forward` and `trove bench` take them, checked
// before any work: --device cuda on a machine without a usable device is kNotSupported
// "no CUDA device is available (...); run without --device cuda"; --vram needs --device cuda;
// --backend ref (the CPU oracle) does not run on the device.
// --h2d (auto unless given) and --cpu-misses need --device cuda.
struct DeviceChoice {
  PeerBackend backend = PeerBackend::kCpu;
  uint64_t vram_budget_bytes = 0;
  H2dMethod h2d = H2dMethod::kAuto;
};
Result<DeviceChoice> choose_device(const std::string& device, const std::string& vram,
                                   const std::string& backend, const std::string& h2d = "auto",
                                   bool cpu_misses = false);
// --cpu-misses (CudaExecutorOptions::cpu_misses), for `trove forward` and `trove bench`.
void add_cpu_misses_flag(CLI::App* cmd, bool* cpu_misses);
// --h2d auto|slab|batch|gather: how records reach the device (PeerLayerOptions::h2d).
void add_h2d_flag(CLI::App* cmd, std::string* h2d);

// The --json form of a pack report (shared by pack and demo).
nlohmann::json pack_report_json(const PackOptions& options, const PackReport& report);
void print_pack_report(const PackOptions& options, const PackReport& report);

// Verifies the store at `path`, prints the outcome, returns the exit code.
int run_verify(const std::string& path, const GlobalOptions& global);

// Prints `j` indented on stdout; strings that are not valid UTF-8 (paths can be any bytes)
// are printed with replacement characters rather than failing.
void print_json(const nlohmann::json& j);

// Prints "trove <command>: error: <message>" (and a hint when one helps) to stderr and returns
// kExitError.
int report_error(const std::string& command, const Status& status);

}  // namespace trove::cli
