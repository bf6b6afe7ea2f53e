// Running the built `trove` binary from tests: its exit code, stdout and stderr.
// REQUIRES: the test target defines TROVE_BINARY_DIR (tests/CMakeLists.txt does).
#pragma once

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "tests/test_util.h"

namespace trove::testing {

inline const std::string kTrove = std::string(TROVE_BINARY_DIR) + "/trove";

struct RunResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

inline std::string slurp(const std::string& path) {
  auto bytes = read_all(path);
  return {bytes.begin(), bytes.end()};
}

// Starts `trove args...` with stdout and stderr going to the files `out` and `err`.
inline pid_t spawn(const std::vector<std::string>& args, const std::string& out,
                   const std::string& err) {
  pid_t pid = fork();
  if (pid == 0) {
    int o = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(o, 1);
    dup2(e, 2);
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(kTrove.c_str()));
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(kTrove.c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

// Runs `trove args...` to completion (its output files live in `dir` meanwhile).
inline RunResult run(const ScratchDir& dir, const std::vector<std::string>& args) {
  const std::string out = dir.path() + "/.stdout", err = dir.path() + "/.stderr";
  pid_t pid = spawn(args, out, err);
  int status = 0;
  waitpid(pid, &status, 0);
  RunResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(out);
  r.err = slurp(err);
  unlink(out.c_str());
  unlink(err.c_str());
  return r;
}

}  // namespace trove::testing
