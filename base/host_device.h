// TROVE_HD marks a function that host and device code both call (a constexpr hash, a code
// conversion): __host__ __device__ when nvcc compiles the translation unit, nothing otherwise,
// so the header stays plain C++ for CPU-only builds. Headers that use it must stay C++17
// (the CUDA translation units are C++17; see the top-level CMakeLists.txt).
#pragma once

#if defined(__CUDACC__)
#define TROVE_HD __host__ __device__
#else
#define TROVE_HD
#endif
