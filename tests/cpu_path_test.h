// A test fixture run once per CPU path (scalar, AVX2): the parameterized tests of kernels
// that dispatch at run time. AVX2 cases skip, with a message, on CPUs without it.
#pragma once

#include <gtest/gtest.h>

#include "kernels/cpu/quant.h"

namespace trove::testing {

class CpuPathTest : public ::testing::TestWithParam<CpuPath> {
 protected:
  void SetUp() override {
    set_cpu_path(CpuPath::kAuto);
    if (GetParam() == CpuPath::kAvx2 && active_cpu_path() != CpuPath::kAvx2) {
      GTEST_SKIP() << "this CPU lacks AVX2/FMA/F16C; the AVX2 path cannot run here";
    }
    set_cpu_path(GetParam());
  }
  void TearDown() override { set_cpu_path(CpuPath::kAuto); }
};

}  // namespace trove::testing
