// Dtype dispatch shared by the CPU and CUDA kernels: pre is float32/64, float16 or
// bfloat16; θ is pre's dtype or float32 (the mixed-precision case).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

namespace jumprelu_ext {

// Calls body(theta_tag) where decltype(theta_tag) is θ's C++ type.
template <typename scalar_t, typename Body>
void dispatch_threshold_type(const at::Tensor& threshold, Body&& body) {
  if (threshold.scalar_type() == at::kFloat) {
    body(float{});
  } else {
    body(scalar_t{});
  }
}

}  // namespace jumprelu_ext

// Runs body with scalar_t (pre's type), theta_t (θ's type) and acc_t (fp32, or fp64 for fp64).
#define JUMPRELU_DISPATCH(pre, threshold, name, ...)                                         \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (pre).scalar_type(), name, [&] { \
    using acc_t = at::opmath_type<scalar_t>;                                                 \
    ::jumprelu_ext::dispatch_threshold_type<scalar_t>((threshold), [&](auto theta_tag) {     \
      using theta_t = decltype(theta_tag);                                                   \
      __VA_ARGS__();                                                                         \
    });                                                                                      \
  })
