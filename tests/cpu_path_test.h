// A test fixture run once per CPU path (scalar, AVX2, ...): the parameterized tests of kernels
// that dispatch at run time. A path the CPU lacks skips, with a message.
#pragma once

#include <gtest/gtest.h>

#include "kernels/cpu/quant.h"

namespace trove::testing {

class CpuPathTest : public ::testing::TestWithParam<CpuPath> {
 protected:
  void SetUp() override {
    set_cpu_path(CpuPath::kAuto);
    if (!cpu_path_supported(GetParam())) {
      GTEST_SKIP() << "this CPU lacks the instructions of the " << cpu_path_name(GetParam())
                   << " path; it cannot run here";
    }
    set_cpu_path(GetParam());
  }
  void TearDown() override { set_cpu_path(CpuPath::kAuto); }
};

}  // namespace trove::testing
