// The feature order of the sparse step's support on the CPU (sparse_kernels.h): a stable counting
// sort, linear in nnz + features. Entries are visited in CSR order (by row), so within a feature
// they stay in row order; the order, and so every sum formed in it, is independent of threads.
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "../sparse_kernels.h"

namespace jumprelu_ext {

FeatureOrder feature_order_cpu(const at::Tensor& offsets, const at::Tensor& indices,
                               int64_t features) {
  const int64_t rows = offsets.size(0) - 1, nnz = indices.size(0);
  const auto options = indices.options();
  FeatureOrder f;
  f.feature_offsets = at::zeros({features + 1}, options);
  f.order = at::empty({nnz}, options);
  f.entry_rows = at::empty({nnz}, options);
  const int64_t* offset = offsets.const_data_ptr<int64_t>();
  const int64_t* index = indices.const_data_ptr<int64_t>();
  int64_t* start = f.feature_offsets.mutable_data_ptr<int64_t>();
  int64_t* order = f.order.mutable_data_ptr<int64_t>();
  int64_t* entry_rows = f.entry_rows.mutable_data_ptr<int64_t>();
  TORCH_CHECK(offset[0] == 0 && offset[rows] == nnz,
              "sparse step: offsets must run from 0 to nnz (", nnz, "), got ", offset[0], " … ",
              offset[rows]);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(offset[r] <= offset[r + 1], "sparse step: offsets must not decrease (row ", r, ")");
  }
  for (int64_t e = 0; e < nnz; ++e) {
    TORCH_CHECK(index[e] >= 0 && index[e] < features, "sparse step: feature index ", index[e],
                " is outside [0, ", features, ")");
    ++start[index[e] + 1];
  }
  for (int64_t j = 0; j < features; ++j) start[j + 1] += start[j];
  std::vector<int64_t> next(start, start + features);  // each feature's next free slot
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t e = offset[r]; e < offset[r + 1]; ++e) {
      entry_rows[e] = r;
      order[next[index[e]]++] = e;
    }
  }
  return f;
}

}  // namespace jumprelu_ext
