// The kernel's window K((pre−θ)/ε), K(u) = 1 iff −½ < u < ½, decided without a division.
//
// With d = pre − θ rounded to acc_t, the definition is fl(d/ε) ∈ (−½, ½). Correctly rounded
// division is monotone in d and odd in d, so that set is exactly −hi ≤ d ≤ hi, where hi is the
// largest acc_t whose rounded quotient by ε is still below ½. hi is found once per call here;
// each element then needs two comparisons instead of a division (docs/ops.md#window).
#pragma once

#include <cmath>
#include <limits>

namespace jumprelu_ext {

template <typename acc_t>
struct Window {
  acc_t lo;  // −hi
  acc_t hi;
};

// ε is positive, finite and normal in acc_t (checked by the op wrappers).
template <typename acc_t>
Window<acc_t> window_for(acc_t eps) {
  const acc_t half = acc_t(0.5);
  const acc_t up = std::numeric_limits<acc_t>::infinity();
  acc_t hi = eps * half;  // within an ulp or two of the answer
  while (!(hi / eps < half)) hi = std::nextafter(hi, -up);
  while (std::nextafter(hi, up) / eps < half) hi = std::nextafter(hi, up);
  return {-hi, hi};
}

}  // namespace jumprelu_ext
