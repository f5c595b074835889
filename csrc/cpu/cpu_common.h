// Helpers shared by the CPU forward and backward kernels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

// The hot loops (select's scan over pre, the sparse products' d-vector loops) get an AVX-512
// (x86-64-v4) clone beside the baseline build, picked when the library loads (gcc's function
// multi-versioning): the extension still runs on any x86-64 CPU, and 16 floats a vector where
// the CPU has them (the build's baseline is SSE2). The clones may fuse multiply-adds, so a sum
// can differ in its last bit between CPUs; on one CPU it is the same for every run and thread
// count.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 11
#define JUMPRELU_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define JUMPRELU_SIMD_CLONES
#endif

namespace jumprelu_ext {

// Elements per parallel task: ATen's at::internal::GRAIN_SIZE (declared in the much heavier
// TensorIterator.h), so that work per task is worth a thread.
constexpr int64_t kGrainSize = 32768;

// Rows handled together.
inline int64_t row_grain(int64_t features) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(features, 1));
}

template <typename acc_t, typename theta_t>
std::vector<acc_t> threshold_as_acc(const at::Tensor& threshold) {
  const theta_t* src = threshold.const_data_ptr<theta_t>();
  return std::vector<acc_t>(src, src + threshold.numel());
}

}  // namespace jumprelu_ext
