// trove: pack, inspect, verify and unpack PEER expert stores; `trove demo` shows the whole
// path on a generated checkpoint.
#include <cstdio>
#include <string>

#include "base/progress.h"
#include "tools/commands.h"

int main(int argc, char** argv) {
  using namespace trove::cli;
  GlobalOptions global;
  for (int i = 0; i < argc; ++i) global.command_line += (i ? " " : "") + std::string(argv[i]);

  CLI::App app{
      "trove: a tiered, out-of-core runtime for PEER expert layers.\n"
      "Packs safetensors checkpoints into .trove stores of int4/int8 expert records, runs their\n"
      "PEER layers on activations (forward), checks and "
      "inspects them, turns them back into safetensors, and ships them as zstd archives\n"
      "(export/import).\n\n"
      "Exit codes: 0 success, 1 error (message on stderr), 2 bad command line, 3 verify, export\n"
      "or import found damage. Start with `trove demo`."};
  app.name("trove");
  app.set_version_flag("--version", "trove " TROVE_VERSION);
  app.require_subcommand(1);
  app.fallthrough();
  app.add_flag("--json", global.json, "Print a machine-readable JSON report on stdout");
  app.add_flag("-q,--quiet", global.quiet,
               "No progress bars, and no summary from pack, unpack, verify and demo (errors are "
               "always printed)");

  add_pack(app, global);
  add_unpack(app, global);
  add_inspect(app, global);
  add_verify(app, global);
  add_forward(app, global);
  add_bench(app, global);
  add_train(app, global);
  add_export(app, global);
  add_import(app, global);
  add_demo(app, global);

  app.parse_complete_callback([&global] {
    if (global.quiet || global.json) trove::ProgressBar::set_enabled(false);
  });
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  } catch (const std::exception& e) {
    // The libraries report errors as Status; this is a last line of defence so that a bug
    // surfaces as a message and exit code 1, not as std::terminate.
    std::fprintf(stderr, "trove: internal error: %s\n", e.what());
    return kExitError;
  }
  return global.exit_code;
}
