// The contract between the sparse-step op wrappers (sparse_ops.h) and the per-backend kernels
// (cpu/sparse_*.cpp, cuda/sparse_*.cu). The format and the math: docs/ops.md#the-sparse-step.
//
// An SAE batch's activations are kept row-compressed (CSR) over their *support*: the entries
// that are active (pre > θ), in θ's window (window.h's rule for |pre − θ| < ε/2, the rectangle
// kernel's support), or whose value pre·H(pre − θ) is NaN (as in the dense step: NaN, −inf). Per
// row r the entries are offsets[r] … offsets[r+1]−1, features ascending. Wrappers validate,
// allocate and do the per-entry arithmetic in ATen; kernels do the row- and feature-wise loops.
// Everything but `select` runs in the compute dtype (float32, or float64 for float64 inputs): the
// wrappers cast operands, so those kernels dispatch on two dtypes.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace jumprelu_ext {

// flags[e]: why entry e is in the support.
constexpr uint8_t kActive = 1;  // pre > θ: the entry's value is pre
constexpr uint8_t kWindow = 2;  // K((pre−θ)/ε) = 1: the entry feeds the θ gradient
// (An entry kept only because its value is NaN carries neither bit.)

// One chunk of rows of pre → its support. The kernel allocates the variable-length outputs.
struct SelectArgs {
  at::Tensor pre;        // [rows, features], contiguous; float32/64, float16, bfloat16
  at::Tensor threshold;  // [features], contiguous; pre's dtype or float32
  at::Tensor bias;       // [features] in pre's dtype, added to pre in acc_t; or undefined
  double bandwidth = 0;  // ε > 0, finite (checked by the wrapper)
  at::Tensor
      fire_counts;  // [features] int64 or undefined: gains each feature's rows with value != 0
};

struct Support {
  at::Tensor row_counts;  // [rows] int64: entries per row
  at::Tensor indices;     // [nnz] int64: features, ascending within a row
  at::Tensor values;      // [nnz] compute dtype: pre·H(pre−θ) (±0 for window-only entries)
  at::Tensor flags;       // [nnz] uint8: kActive | kWindow
  at::Tensor l0;          // [rows] float32: Σ_features H(pre−θ), exactly as jumprelu_l0's
};

// out[r] = Σ_{e in row r} values[e] · dense[indices[e]]   (decoder forward; ∂x of the encoder)
struct SpmmArgs {
  at::Tensor offsets;  // [rows+1] int64
  at::Tensor indices;  // [nnz] int64, each in [0, features)
  at::Tensor values;   // [nnz] compute dtype
  at::Tensor dense;    // [features, d] contiguous, values' dtype
  at::Tensor out;      // [rows, d] contiguous, values' dtype: written (not added to)
};

// out[e] = Σ_k left[row(e), k] · dense[indices[e], k]   (∂acts at the support: g · W_decᵀ sampled)
struct SddmmArgs {
  at::Tensor offsets;  // [rows+1] int64
  at::Tensor indices;  // [nnz] int64
  at::Tensor left;     // [rows, d] contiguous, compute dtype
  at::Tensor dense;    // [features, d] contiguous, left's dtype
  at::Tensor out;      // [nnz], left's dtype: written
};

// Entries sorted by feature, stably (so by row within a feature), and each entry's row: the
// order feature_sums reads in.
struct FeatureOrder {
  at::Tensor
      feature_offsets;    // [features+1] int64: feature f's entries are order[fo[f] … fo[f+1]−1]
  at::Tensor order;       // [nnz] int64
  at::Tensor entry_rows;  // [nnz] int64
};

// Per feature f, over its entries in by_feature.order (by feature, then by row: a fixed order, so
// the sums are bitwise reproducible whatever the thread count):
//   out[f]  = Σ values[e] · rows[entry_rows[e]]   (∂W_dec; ∂W_enc with `transposed`)
//   sums[f] = Σ values[e]                         (∂b_enc, the θ gradient's terms)
// Features without entries get zeros. Either output may be undefined: not wanted. With
// `transposed`, out is [d, features] and out[:, f] gets feature f's sum: ∂W_enc in W_enc's own
// layout, so the step does not transpose a [features, d] result (a copy of all of W_enc).
struct FeatureSumsArgs {
  FeatureOrder by_feature;  // the entries' order and rows
  at::Tensor values;        // [nnz] compute dtype
  at::Tensor rows;          // [rows, d] contiguous, values' dtype; needed for `out`
  at::Tensor out;           // [features, d] ([d, features] if transposed) contiguous, or undefined
  at::Tensor sums;          // [features], values' dtype, or undefined
  bool transposed = false;
};

// A stable counting sort: linear in nnz + features (a comparison sort of 0.5M entries took
// longer than the rest of the backward's kernels together).
FeatureOrder feature_order_cpu(const at::Tensor& offsets, const at::Tensor& indices,
                               int64_t features);
// ATen's stable sort (a radix sort on the GPU).
FeatureOrder feature_order_sorted(const at::Tensor& offsets, const at::Tensor& indices,
                                  int64_t features);

Support select_support_cpu(const SelectArgs& args);
void spmm_cpu(const SpmmArgs& args);
void sddmm_cpu(const SddmmArgs& args);
void feature_sums_cpu(const FeatureSumsArgs& args);

Support select_support_cuda(const SelectArgs& args);
void spmm_cuda(const SpmmArgs& args);
void sddmm_cuda(const SddmmArgs& args);
void feature_sums_cuda(const FeatureSumsArgs& args);

// A backend's four kernels, as the wrappers' template argument (register_sparse_ops<...>).
// select_adds_bias: the encoder's product is formed without b_enc and select adds it (on the CPU
// that saves writing the bias into every chunk before the product and reading it back in it);
// on the GPU the product's epilogue adds it. tile_features: the width of the encoder's tiles
// (sparse_ops.h, default_chunk_rows); 0: whole rows.
struct CpuSparseKernels {
  static constexpr bool select_adds_bias = true;
  static constexpr int64_t tile_features = 2048;
  static constexpr auto feature_order = &feature_order_cpu;
  static constexpr auto select = &select_support_cpu;
  static constexpr auto spmm = &spmm_cpu;
  static constexpr auto sddmm = &sddmm_cpu;
  static constexpr auto feature_sums = &feature_sums_cpu;
};

struct CudaSparseKernels {
  static constexpr bool select_adds_bias = false;
  static constexpr int64_t tile_features = 0;
  static constexpr auto feature_order = &feature_order_sorted;
  static constexpr auto select = &select_support_cuda;
  static constexpr auto spmm = &spmm_cuda;
  static constexpr auto sddmm = &sddmm_cuda;
  static constexpr auto feature_sums = &feature_sums_cuda;
};

}  // namespace jumprelu_ext
