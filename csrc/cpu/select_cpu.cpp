// The sparse step's select kernel (sparse_kernels.h, SelectArgs): one pass over a chunk of pre
// finds each row's support (active, in θ's window, or with a NaN value) and writes it
// row-compressed, with the per-row L0 count and, when asked, the per-feature fire counts.
//
// Almost every element is outside the support (tens to hundreds of 65536 per row), so a
// vectorised superset test skips stretches of 64 elements without a candidate, and only the
// stretches with one get the exact test. pre arrives without b_enc on the CPU (SelectArgs::bias).
// The exact test and the value are those of the dense kernels: H and the value x·H as in
// forward_cpu.cpp, the window as in backward_cpu.cpp.
//
// Rows are cut into fixed blocks (a function of the shape only), each collecting its entries in
// vectors of its own; after a prefix sum the blocks are copied into the outputs in row order.
// The outputs and the (integer) fire counts are therefore identical for any thread count.
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../dispatch.h"
#include "../sparse_kernels.h"
#include "../window.h"
#include "cpu_common.h"

namespace jumprelu_ext {
namespace {

// The fast path: whether any of kSkip elements may be in the support, one vectorisable pass with
// no stores. A superset of the exact test: x > θ gives d = x − θ > 0 ≥ lo; the window is
// lo ≤ d ≤ hi; a NaN value x·H needs x NaN (then d is NaN), x = ±inf with θ = ±inf or NaN (d NaN),
// or x = −inf (tested on its own). Only comparisons and correctly rounded additions, so
// vectorising it changes nothing.
constexpr int64_t kSkip = 64;

template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline bool any_candidate(const scalar_t* __restrict pre,
                                                         const acc_t* __restrict bias,
                                                         const acc_t* __restrict theta, acc_t lo) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  uint8_t any = 0;
  for (int64_t k = 0; k < kSkip; ++k) {
    const acc_t x = static_cast<acc_t>(pre[k]) + bias[k];
    const acc_t d = x - theta[k];
    any |= (!(d < lo) | (x == kNegInf)) ? 1 : 0;
  }
  return any != 0;
}

// One block's entries, in row order.
template <typename acc_t>
struct Entries {
  std::vector<int64_t> indices;
  std::vector<acc_t> values;
  std::vector<uint8_t> flags;
};

// The exact test of element j: appends it when in the support, returns whether it is active.
template <typename scalar_t, typename acc_t>
inline bool select_one(const scalar_t* pre, const acc_t* bias, const acc_t* theta, Window<acc_t> w,
                       int64_t j, Entries<acc_t>& out) {
  const acc_t x = static_cast<acc_t>(pre[j]) + bias[j];
  const acc_t d = x - theta[j];
  const bool active = x > theta[j];
  const bool window = (d >= w.lo) & (d <= w.hi);
  // x * on rather than a select, as forward_cpu: NaN and −inf in pre give NaN, like pre·H.
  const acc_t value = x * (active ? acc_t(1) : acc_t(0));
  if (active | window | std::isnan(value)) {
    out.indices.push_back(j);
    out.values.push_back(value);
    out.flags.push_back(static_cast<uint8_t>((active ? kActive : 0) | (window ? kWindow : 0)));
  }
  return active;
}

// The numbers of a row's full stretches that may hold a support entry, ascending, into `found`;
// returns how many. The scan over all of pre: the loop that gets the AVX-512 clone.
template <typename scalar_t, typename acc_t>
JUMPRELU_SIMD_CLONES int64_t candidate_stretches(const scalar_t* __restrict pre,
                                                 const acc_t* __restrict bias,
                                                 const acc_t* __restrict theta, acc_t lo,
                                                 int64_t stretches, int64_t* __restrict found) {
  int64_t n = 0;
  for (int64_t s = 0; s < stretches; ++s) {
    const int64_t j = s * kSkip;
    if (any_candidate<scalar_t, acc_t>(pre + j, bias + j, theta + j, lo)) found[n++] = s;
  }
  return n;
}

// One row: appends its entries, returns its active count. Only stretches of kSkip elements with
// a candidate (and the row's last, shorter stretch) reach the exact test. `found`: scratch for
// features / kSkip stretch numbers.
template <typename scalar_t, typename acc_t>
int64_t select_row(const scalar_t* pre, const acc_t* bias, const acc_t* theta, Window<acc_t> w,
                   int64_t features, int64_t* found, Entries<acc_t>& out) {
  const int64_t full = features / kSkip;
  const int64_t candidates =
      candidate_stretches<scalar_t, acc_t>(pre, bias, theta, w.lo, full, found);
  int64_t active_count = 0;
  for (int64_t i = 0; i < candidates; ++i) {
    for (int64_t k = found[i] * kSkip; k < (found[i] + 1) * kSkip; ++k) {
      active_count += select_one<scalar_t, acc_t>(pre, bias, theta, w, k, out) ? 1 : 0;
    }
  }
  for (int64_t k = full * kSkip; k < features; ++k) {
    active_count += select_one<scalar_t, acc_t>(pre, bias, theta, w, k, out) ? 1 : 0;
  }
  return active_count;
}

template <typename scalar_t, typename theta_t, typename acc_t>
Support select_kernel(const SelectArgs& a) {
  const int64_t rows = a.pre.size(0), features = a.pre.size(1);
  const auto options = a.pre.options();
  Support s;
  s.row_counts = at::empty({rows}, options.dtype(at::kLong));
  s.l0 = at::empty({rows}, options.dtype(at::kFloat));
  const scalar_t* pre = a.pre.const_data_ptr<scalar_t>();
  int64_t* row_counts = s.row_counts.mutable_data_ptr<int64_t>();
  float* l0 = s.l0.mutable_data_ptr<float>();
  const std::vector<acc_t> theta = threshold_as_acc<acc_t, theta_t>(a.threshold);
  // pre + bias in acc_t (the product came without it: one pass over the chunk fewer).
  const std::vector<acc_t> bias = a.bias.defined() ? threshold_as_acc<acc_t, scalar_t>(a.bias)
                                                   : std::vector<acc_t>(features, acc_t(0));
  const Window<acc_t> window = window_for(static_cast<acc_t>(a.bandwidth));

  // Pass 1: each fixed block of rows collects its entries.
  const int64_t block_rows = row_grain(features);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  std::vector<Entries<acc_t>> entries(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> found(features / kSkip);
    for (int64_t b = begin; b < end; ++b) {
      Entries<acc_t>& e = entries[b];
      const int64_t row_end = std::min(rows, (b + 1) * block_rows);
      for (int64_t r = b * block_rows; r < row_end; ++r) {
        const size_t before = e.indices.size();
        const int64_t active = select_row<scalar_t, acc_t>(
            pre + r * features, bias.data(), theta.data(), window, features, found.data(), e);
        row_counts[r] = static_cast<int64_t>(e.indices.size() - before);
        l0[r] = static_cast<float>(active);
      }
    }
  });

  // Pass 2: the blocks' places in the outputs, then the copies.
  std::vector<int64_t> starts(blocks + 1, 0);
  for (int64_t b = 0; b < blocks; ++b) {
    starts[b + 1] = starts[b] + static_cast<int64_t>(entries[b].indices.size());
  }
  const int64_t nnz = starts[blocks];
  s.indices = at::empty({nnz}, options.dtype(at::kLong));
  s.values = at::empty({nnz}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
  s.flags = at::empty({nnz}, options.dtype(at::kByte));
  int64_t* indices = s.indices.mutable_data_ptr<int64_t>();
  acc_t* values = s.values.mutable_data_ptr<acc_t>();
  uint8_t* flags = s.flags.mutable_data_ptr<uint8_t>();
  int64_t* fire_counts =
      a.fire_counts.defined() ? a.fire_counts.mutable_data_ptr<int64_t>() : nullptr;
  // Tasks of about kGrainSize entries: the usual few entries per row are copied inline.
  const int64_t copy_grain = std::max<int64_t>(1, blocks * kGrainSize / std::max<int64_t>(nnz, 1));
  at::parallel_for(0, blocks, copy_grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      Entries<acc_t>& e = entries[b];
      const size_t n = e.indices.size();
      if (n == 0) continue;
      std::memcpy(indices + starts[b], e.indices.data(), n * sizeof(int64_t));
      std::memcpy(values + starts[b], e.values.data(), n * sizeof(acc_t));
      std::memcpy(flags + starts[b], e.flags.data(), n * sizeof(uint8_t));
      if (fire_counts) {
        for (size_t i = 0; i < n; ++i) {
          // NaN != 0 counts, ±0 does not: as the dense ops. Integer additions: exact and
          // order-independent, so atomic adds give the same counts for any thread count.
          if (e.values[i] != acc_t(0)) {
            std::atomic_ref<int64_t>(fire_counts[e.indices[i]])
                .fetch_add(1, std::memory_order_relaxed);
          }
        }
      }
      e = Entries<acc_t>();  // free as we go
    }
  });
  return s;
}

}  // namespace

Support select_support_cpu(const SelectArgs& args) {
  TORCH_CHECK(args.pre.dim() == 2 && args.pre.is_contiguous(),
              "select_support_cpu: pre must be a contiguous [rows, features] tensor");
  Support s;
  JUMPRELU_DISPATCH(args.pre, args.threshold, "select_support_cpu",
                    [&] { s = select_kernel<scalar_t, theta_t, acc_t>(args); });
  return s;
}

}  // namespace jumprelu_ext
