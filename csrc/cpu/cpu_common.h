// Helpers shared by the CPU forward and backward kernels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

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
