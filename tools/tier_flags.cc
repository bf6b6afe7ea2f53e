// The host-tier flags `trove forward` and `trove bench` share.
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
  return t;
}

}  // namespace trove::cli
