// trove export / trove import: a store generation as a zstd archive and back (storage/archive.h).
#include <cstdio>
#include <memory>
#include <string>

#include "base/bytes.h"
#include "base/progress.h"
#include "storage/archive.h"
#include "tools/commands.h"

namespace trove::cli {
namespace {

void print_export_report(const ExportReport& r) {
  std::printf("%s: generation %llu, %s -> %s (%.3f of the store) in %.2f s, %s, zstd level %d%s\n",
              r.archive_path.c_str(), static_cast<unsigned long long>(r.generation),
              format_bytes(r.store_bytes).c_str(), format_bytes(r.archive_bytes).c_str(),
              r.store_bytes ? static_cast<double>(r.archive_bytes) / r.store_bytes : 0.0, r.seconds,
              format_rate(r.seconds > 0 ? r.store_bytes / r.seconds : 0).c_str(), r.level,
              r.verified ? ", every checksum verified" : ", NOT verified");
  std::printf("  %-8s %12s %12s %7s\n", "part", "bytes", "compressed", "ratio");
  const nlohmann::json by_dtype = archive_ratios_json(r.regions);
  for (const auto& [part, e] : by_dtype.items()) {
    std::printf("  %-8s %12s %12s %7.3f\n", part == "other" ? "dense+meta" : part.c_str(),
                format_bytes(e["bytes"].get<uint64_t>()).c_str(),
                format_bytes(e["compressed_bytes"].get<uint64_t>()).c_str(),
                e["ratio"].get<double>());
  }
}

}  // namespace

void add_export(CLI::App& app, GlobalOptions& global) {
  auto* cmd = app.add_subcommand(
      "export",
      "Compress a store's current generation into a zstd archive for shipping or keeping, "
      "checking\n"
      "every record and dense tensor against its checksum on the way (a damaged store is "
      "refused).\n"
      "The archive is a plain zstd stream (`zstd -d` restores the store too); `trove import`\n"
      "restores it and verifies it. Reports the ratio each record dtype reaches.\n"
      "Example: trove export model.trove model.trove.zst --level 9 --threads 8");
  struct Args {
    std::string store, archive;
    int level = 3;
    int threads = 1;
    bool no_verify = false;
    bool force = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("store", args->store, "The .trove store")->required()->check(CLI::ExistingFile);
  cmd->add_option("archive", args->archive, "The archive to write, e.g. model.trove.zst")
      ->required();
  cmd->add_option("--level", args->level,
                  "zstd level: 1-19 (higher is smaller and slower), -7..-1 zstd's fast levels")
      ->capture_default_str();
  cmd->add_option("--threads", args->threads, "zstd worker threads")->capture_default_str();
  cmd->add_flag("--no-verify", args->no_verify,
                "Do not check checksums (a copy of a damaged store, for forensics)");
  cmd->add_flag("--force", args->force, "Replace an existing archive");
  cmd->callback([args, &global] {
    ExportOptions options;
    options.level = args->level;
    options.threads = args->threads;
    options.verify = !args->no_verify;
    options.overwrite = args->force;
    std::unique_ptr<ProgressBar> progress;
    options.progress = [&progress](uint64_t done, uint64_t total) {
      if (!progress)
        progress = std::make_unique<ProgressBar>("exporting", total, ProgressBar::Unit::kBytes);
      progress->update(done);
    };
    Result<ExportReport> report = export_store(args->store, args->archive, options);
    if (progress) progress->finish();
    if (!report.ok()) {
      global.exit_code = report_error("export", report.status());
      if (report.status().is_corruption()) {
        std::fprintf(stderr,
                     "Run `trove verify %s` for every damaged extent; --no-verify exports it "
                     "as it is.\n",
                     args->store.c_str());
        global.exit_code = kExitCorrupt;
      }
      return;
    }
    if (global.json) {
      print_json(export_report_json(*report));
    } else if (!global.quiet) {
      print_export_report(*report);
    }
  });
}

void add_import(CLI::App& app, GlobalOptions& global) {
  auto* cmd = app.add_subcommand(
      "import",
      "Restore a store from a `trove export` archive. The result is checked against the archive's\n"
      "description and every checksum before it appears at its path; on any error nothing there\n"
      "changes.\n"
      "Example: trove import model.trove.zst model.trove");
  struct Args {
    std::string archive, store;
    bool force = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("archive", args->archive, "The archive")->required()->check(CLI::ExistingFile);
  cmd->add_option("store", args->store, "The .trove store to write")->required();
  cmd->add_flag("--force", args->force,
                "Replace an existing store (refused while a writer, e.g. training, holds it)");
  cmd->callback([args, &global] {
    ImportOptions options;
    options.overwrite = args->force;
    std::unique_ptr<ProgressBar> progress;
    options.progress = [&progress](uint64_t done, uint64_t total) {
      if (!progress)
        progress = std::make_unique<ProgressBar>("importing", total, ProgressBar::Unit::kBytes);
      progress->update(done);
    };
    Result<ImportReport> report = import_store(args->archive, args->store, options);
    if (progress) progress->finish();
    if (!report.ok()) {
      global.exit_code = report_error("import", report.status());
      if (report.status().is_corruption()) global.exit_code = kExitCorrupt;
      return;
    }
    if (global.json) {
      print_json(import_report_json(*report));
    } else if (!global.quiet) {
      std::printf("%s: generation %llu restored from %s (%s) and verified in %.2f s\n",
                  report->store_path.c_str(), static_cast<unsigned long long>(report->generation),
                  report->archive_path.c_str(), format_bytes(report->store_bytes).c_str(),
                  report->seconds);
    }
  });
}

}  // namespace trove::cli
