// The tier and device flags `trove forward` and `trove bench` share.
#include "tools/commands.h"

namespace trove::cli {

void add_tier_flags(CLI::App* cmd, TierFlags* flags) {
  cmd->add_option("--policy", flags->policy, "Host-tier eviction policy: lru, clock or frequency")
      ->check(CLI::IsMember({"lru", "clock", "frequency"}))
      ->capture_default_str();
  cmd->add_option("--io", flags->io,
                  "Disk reads: auto (io_uring where the kernel allows, else pread threads),\n"
                  "io_uring or pread")
      ->check(CLI::IsMember({"auto", "io_uring", "pread"}))
      ->capture_default_str();
  cmd->add_option("--queue-depth", flags->queue_depth, "Disk reads in flight")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  cmd->add_option("--landing-groups", flags->landing_groups,
                  "Read a batch's host-tier misses in this many groups, two in flight, so that\n"
                  "--device cuda copies and computes each group as it lands (1: one group)")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
}

TieredSourceOptions tier_options(const TierFlags& flags, uint64_t host_budget_bytes) {
  TieredSourceOptions t;
  t.host_budget_bytes = host_budget_bytes;
  t.policy = parse_eviction_policy(flags.policy).value();  // checked by add_tier_flags
  t.io.engine = flags.io == "pread"      ? RecordReaderOptions::Engine::kPread
                : flags.io == "io_uring" ? RecordReaderOptions::Engine::kIoUring
                                         : RecordReaderOptions::Engine::kAuto;
  t.io.queue_depth = flags.queue_depth;
  t.io.pread_threads = std::min(flags.queue_depth, 64);
  t.landing_groups = flags.landing_groups;
  return t;
}

void add_h2d_flag(CLI::App* cmd, std::string* h2d) {
  cmd->add_option("--h2d", *h2d,
                  "With --device cuda: how the records a batch misses on the device get there:\n"
                  "slab (packed into pinned staging, one copy), batch (one cudaMemcpyBatchAsync\n"
                  "from the pinned host tier), gather (one kernel reading the pinned host tier),\n"
                  "or auto (the first batches try each, then the fastest is kept)")
      ->check(CLI::IsMember({"auto", "slab", "batch", "gather"}))
      ->capture_default_str();
}

void add_cpu_misses_flag(CLI::App* cmd, bool* cpu_misses) {
  cmd->add_flag("--cpu-misses", *cpu_misses,
                "With --device cuda and --host: compute some device-tier misses on the CPU from\n"
                "the host tier instead of copying them (Fiddler's placement), as many as the\n"
                "rates measured in the run say pay; y is then within fp32 rounding of the\n"
                "all-resident y, not the same bits");
}

Result<DeviceChoice> choose_device(const std::string& device, const std::string& vram,
                                   const std::string& backend, const std::string& h2d,
                                   bool cpu_misses) {
  DeviceChoice choice;
  TROVE_ASSIGN_OR_RETURN(choice.h2d, parse_h2d_method(h2d));
  if (device != "cuda" && cpu_misses) {
    return Status::invalid_argument(
        "--cpu-misses splits the device's misses between the device and the CPU; it needs "
        "--device cuda (on the CPU every expert is computed there already)");
  }
  if (device != "cuda" && choice.h2d != H2dMethod::kAuto) {
    return Status::invalid_argument("--h2d " + h2d +
                                    " says how records reach the device; it needs --device cuda");
  }
  if (device != "cuda") {
    if (!vram.empty()) {
      return Status::invalid_argument("--vram " + vram +
                                      " is the device tier's budget; it needs --device cuda");
    }
    TROVE_ASSIGN_OR_RETURN(choice.backend, parse_peer_backend(backend));
    return choice;
  }
  if (backend == "ref") {
    return Status::invalid_argument(
        "--backend ref is the CPU reference; it does not run with --device cuda (use --device "
        "cpu)");
  }
  const Status available = check_backend_available(PeerBackend::kCuda);
  if (!available.ok()) {
    return Status::not_supported(available.message() + "; run without --device cuda");
  }
  choice.backend = PeerBackend::kCuda;
  if (!vram.empty()) {
    TROVE_ASSIGN_OR_RETURN(choice.vram_budget_bytes, parse_bytes(vram));
    if (choice.vram_budget_bytes == 0) {
      return Status::invalid_argument(
          "--vram 0: the device tier needs a budget above 0 "
          "(leave --vram out to copy records per batch)");
    }
  }
  return choice;
}

}  // namespace trove::cli
