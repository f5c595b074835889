// The sparse step's products (sparse_kernels.h): spmm (row-compressed × dense), sddmm (dense ×
// dense sampled at the support) and the per-feature sums of the weight gradients. All run in the
// compute dtype (float32 or float64). Each output row / entry / feature is formed by one thread
// in a fixed order, so every result is bitwise the same for any thread count.
//
// The inner loops are plain functions with __restrict pointers (inside the parallel_for lambdas
// gcc cannot prove the arrays disjoint and stops vectorising, as in forward_cpu.cpp).
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../sparse_kernels.h"
#include "cpu_common.h"

namespace jumprelu_ext {
namespace {

// Units of work (multiply-adds) per parallel task.
int64_t grain_for(int64_t items, int64_t work) {
  const int64_t per_item = std::max<int64_t>(1, work / std::max<int64_t>(items, 1));
  return std::max<int64_t>(1, kGrainSize / per_item);
}

// The ops are public: a malformed CSR fails here rather than reading out of bounds (or leaving
// entries unwritten).
void check_offsets(const char* op, const at::Tensor& offsets, int64_t nnz) {
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t rows = offsets.size(0) - 1;
  TORCH_CHECK(o[0] == 0, op, ": offsets[0] must be 0, got ", o[0]);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(o[r] <= o[r + 1], op, ": offsets must be non-decreasing; offsets[", r, "] = ", o[r],
                " > offsets[", r + 1, "] = ", o[r + 1]);
  }
  TORCH_CHECK(o[rows] == nnz, op, ": offsets[rows] = ", o[rows], " must be nnz = ", nnz);
}

// out = Σ_{i in [begin, end)} values[e]·dense[dense_rows[e]], e = entries[i] (entries null: e = i),
// accumulated in i order. spmm's output rows and feature_sums' feature rows are both this.
template <typename T>
JUMPRELU_SIMD_CLONES void weighted_row_sum(const int64_t* __restrict entries,
                                           const int64_t* __restrict dense_rows,
                                           const T* __restrict values, const T* __restrict dense,
                                           int64_t begin, int64_t end, int64_t d,
                                           T* __restrict out) {
  std::fill(out, out + d, T(0));
  for (int64_t i = begin; i < end; ++i) {
    const int64_t e = entries ? entries[i] : i;
    const T v = values[e];
    const T* __restrict w = dense + dense_rows[e] * d;
    for (int64_t k = 0; k < d; ++k) out[k] += v * w[k];
  }
}

// Σ a[k]·b[k] with kLanes partial sums (vectorisable without reassociating: lane i sums the
// k ≡ i (mod kLanes)), combined pairwise, then the tail. The order depends on d only. 16 lanes:
// one AVX-512 register, or four SSE ones; with 8, the AVX-512 clone waited on one chain of
// fused multiply-adds and ran at half the baseline's speed.
constexpr int64_t kLanes = 16;

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t d) {
  T s[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    for (int64_t i = 0; i < kLanes; ++i) s[i] += a[k + i] * b[k + i];
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t i = 0; i < width; ++i) s[i] += s[i + width];
  }
  T sum = s[0];
  for (; k < d; ++k) sum += a[k] * b[k];
  return sum;
}

// out[e] = left · dense[indices[e]] for one row's entries [begin, end).
template <typename T>
JUMPRELU_SIMD_CLONES void row_dots(const T* __restrict left, const int64_t* __restrict indices,
                                   const T* __restrict dense, int64_t begin, int64_t end, int64_t d,
                                   T* __restrict out) {
  for (int64_t e = begin; e < end; ++e) out[e] = dot<T>(left, dense + indices[e] * d, d);
}

void check_indices(const char* op, const at::Tensor& indices, int64_t features) {
  const int64_t* index = indices.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < indices.size(0); ++e) {
    TORCH_CHECK(index[e] >= 0 && index[e] < features, op, ": index ", index[e],
                " out of range for ", features, " features");
  }
}

template <typename T>
void spmm_kernel(const SpmmArgs& a) {
  const char* op = "sparse spmm";
  const int64_t rows = a.out.size(0), d = a.out.size(1), features = a.dense.size(0);
  const int64_t nnz = a.indices.size(0);
  TORCH_CHECK(a.offsets.size(0) == rows + 1 && a.dense.size(1) == d, op, ": shape mismatch");
  check_offsets(op, a.offsets, nnz);
  check_indices(op, a.indices, features);
  const int64_t* offsets = a.offsets.const_data_ptr<int64_t>();
  const int64_t* indices = a.indices.const_data_ptr<int64_t>();
  const T* values = a.values.const_data_ptr<T>();
  const T* dense = a.dense.const_data_ptr<T>();
  T* out = a.out.mutable_data_ptr<T>();
  at::parallel_for(0, rows, grain_for(rows, (nnz + rows) * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      weighted_row_sum<T>(nullptr, indices, values, dense, offsets[r], offsets[r + 1], d,
                          out + r * d);
    }
  });
}

template <typename T>
void sddmm_kernel(const SddmmArgs& a) {
  const char* op = "sparse sddmm";
  const int64_t rows = a.left.size(0), d = a.left.size(1), features = a.dense.size(0);
  const int64_t nnz = a.indices.size(0);
  TORCH_CHECK(a.offsets.size(0) == rows + 1 && a.dense.size(1) == d && a.out.size(0) == nnz, op,
              ": shape mismatch");
  check_offsets(op, a.offsets, nnz);
  check_indices(op, a.indices, features);
  const int64_t* offsets = a.offsets.const_data_ptr<int64_t>();
  const int64_t* indices = a.indices.const_data_ptr<int64_t>();
  const T* left = a.left.const_data_ptr<T>();
  const T* dense = a.dense.const_data_ptr<T>();
  T* out = a.out.mutable_data_ptr<T>();
  at::parallel_for(0, rows, grain_for(rows, (nnz + rows) * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      row_dots<T>(left + r * d, indices, dense, offsets[r], offsets[r + 1], d, out);
    }
  });
}

// Features per block: with `transposed` a block's d-vectors are formed in a scratch tile and
// written column-wise, kBlock features (one 64-byte line of fp32) to each row of out.
constexpr int64_t kBlock = 16;

template <typename T>
void feature_sums_kernel(const FeatureSumsArgs& a) {
  const bool want_out = a.out.defined(), want_sums = a.sums.defined();
  if (!want_out && !want_sums) return;
  const int64_t features = a.by_feature.feature_offsets.size(0) - 1;
  const int64_t d = want_out ? a.rows.size(1) : 0;
  const int64_t nnz = a.by_feature.order.size(0);
  const int64_t* fo = a.by_feature.feature_offsets.const_data_ptr<int64_t>();
  const int64_t* order = a.by_feature.order.const_data_ptr<int64_t>();
  const int64_t* entry_rows = a.by_feature.entry_rows.const_data_ptr<int64_t>();
  const T* values = a.values.const_data_ptr<T>();
  const T* rows = want_out ? a.rows.const_data_ptr<T>() : nullptr;
  T* out = want_out ? a.out.mutable_data_ptr<T>() : nullptr;
  T* sums = want_sums ? a.sums.mutable_data_ptr<T>() : nullptr;
  const bool transposed = want_out && a.transposed;
  const int64_t blocks = (features + kBlock - 1) / kBlock;
  const int64_t work = (nnz + features) * std::max<int64_t>(d, 1);
  at::parallel_for(0, blocks, grain_for(blocks, work), [&](int64_t begin, int64_t end) {
    std::vector<T> tile(transposed ? kBlock * d : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * kBlock, count = std::min(kBlock, features - first);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t f = first + j;
        if (want_out) {
          T* o = transposed ? tile.data() + j * d : out + f * d;
          weighted_row_sum<T>(order, entry_rows, values, rows, fo[f], fo[f + 1], d, o);
        }
        if (want_sums) {
          T sum = 0;
          for (int64_t i = fo[f]; i < fo[f + 1]; ++i) sum += values[order[i]];
          sums[f] = sum;
        }
      }
      if (!transposed) continue;
      for (int64_t k = 0; k < d; ++k) {
        for (int64_t j = 0; j < count; ++j) out[k * features + first + j] = tile[j * d + k];
      }
    }
  });
}

}  // namespace

void spmm_cpu(const SpmmArgs& args) {
  AT_DISPATCH_FLOATING_TYPES(args.values.scalar_type(), "sparse_spmm_cpu",
                             [&] { spmm_kernel<scalar_t>(args); });
}

void sddmm_cpu(const SddmmArgs& args) {
  AT_DISPATCH_FLOATING_TYPES(args.left.scalar_type(), "sparse_sddmm_cpu",
                             [&] { sddmm_kernel<scalar_t>(args); });
}

void feature_sums_cpu(const FeatureSumsArgs& args) {
  AT_DISPATCH_FLOATING_TYPES(args.values.scalar_type(), "sparse_feature_sums_cpu",
                             [&] { feature_sums_kernel<scalar_t>(args); });
}

}  // namespace jumprelu_ext
