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

inline void check_index(const char* op, int64_t index, int64_t features) {
  TORCH_CHECK(index >= 0 && index < features, op, ": index ", index, " out of range for ", features,
              " features");
}

// out += v · w over d elements.
template <typename T>
void axpy(T v, const T* __restrict w, T* __restrict out, int64_t d) {
  for (int64_t k = 0; k < d; ++k) out[k] += v * w[k];
}

// Σ a[k]·b[k] with kLanes partial sums (vectorisable without reassociating: lane i sums the
// k ≡ i (mod kLanes)), combined in a fixed tree, then the tail. The order depends on d only.
constexpr int64_t kLanes = 8;

template <typename T>
T dot(const T* __restrict a, const T* __restrict b, int64_t d) {
  T s[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    for (int64_t i = 0; i < kLanes; ++i) s[i] += a[k + i] * b[k + i];
  }
  T sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; k < d; ++k) sum += a[k] * b[k];
  return sum;
}

template <typename T>
void spmm_kernel(const SpmmArgs& a) {
  const char* op = "sparse spmm";
  const int64_t rows = a.out.size(0), d = a.out.size(1), features = a.dense.size(0);
  const int64_t nnz = a.indices.size(0);
  TORCH_CHECK(a.offsets.size(0) == rows + 1 && a.dense.size(1) == d, op, ": shape mismatch");
  check_offsets(op, a.offsets, nnz);
  const int64_t* offsets = a.offsets.const_data_ptr<int64_t>();
  const int64_t* indices = a.indices.const_data_ptr<int64_t>();
  const T* values = a.values.const_data_ptr<T>();
  const T* dense = a.dense.const_data_ptr<T>();
  T* out = a.out.mutable_data_ptr<T>();
  at::parallel_for(0, rows, grain_for(rows, (nnz + rows) * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* o = out + r * d;
      std::fill(o, o + d, T(0));
      for (int64_t e = offsets[r]; e < offsets[r + 1]; ++e) {
        check_index(op, indices[e], features);
        axpy<T>(values[e], dense + indices[e] * d, o, d);
      }
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
  const int64_t* offsets = a.offsets.const_data_ptr<int64_t>();
  const int64_t* indices = a.indices.const_data_ptr<int64_t>();
  const T* left = a.left.const_data_ptr<T>();
  const T* dense = a.dense.const_data_ptr<T>();
  T* out = a.out.mutable_data_ptr<T>();
  at::parallel_for(0, rows, grain_for(rows, (nnz + rows) * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t e = offsets[r]; e < offsets[r + 1]; ++e) {
        check_index(op, indices[e], features);
        out[e] = dot<T>(left + r * d, dense + indices[e] * d, d);
      }
    }
  });
}

template <typename T>
void feature_sums_kernel(const FeatureSumsArgs& a) {
  const bool want_out = a.out.defined(), want_sums = a.sums.defined();
  if (!want_out && !want_sums) return;
  const int64_t features = a.by_feature.feature_offsets.size(0) - 1;
  const int64_t d = want_out ? a.out.size(1) : 0;
  const int64_t nnz = a.by_feature.order.size(0);
  const int64_t* fo = a.by_feature.feature_offsets.const_data_ptr<int64_t>();
  const int64_t* order = a.by_feature.order.const_data_ptr<int64_t>();
  const int64_t* entry_rows = a.by_feature.entry_rows.const_data_ptr<int64_t>();
  const T* values = a.values.const_data_ptr<T>();
  const T* rows = want_out ? a.rows.const_data_ptr<T>() : nullptr;
  T* out = want_out ? a.out.mutable_data_ptr<T>() : nullptr;
  T* sums = want_sums ? a.sums.mutable_data_ptr<T>() : nullptr;
  const int64_t work = (nnz + features) * std::max<int64_t>(d, 1);
  at::parallel_for(0, features, grain_for(features, work), [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      if (want_out) {
        T* o = out + f * d;
        std::fill(o, o + d, T(0));
        for (int64_t i = fo[f]; i < fo[f + 1]; ++i) {
          const int64_t e = order[i];
          axpy<T>(values[e], rows + entry_rows[e] * d, o, d);
        }
      }
      if (want_sums) {
        T sum = 0;
        for (int64_t i = fo[f]; i < fo[f + 1]; ++i) sum += values[order[i]];
        sums[f] = sum;
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
