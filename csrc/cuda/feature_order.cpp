// The feature order of the sparse step's support on the GPU (sparse_kernels.h): ATen's stable sort
// of the feature indices (a radix sort there), so entries of one feature stay in row order.
#include <ATen/ATen.h>

#include "../sparse_kernels.h"

namespace jumprelu_ext {

FeatureOrder feature_order_sorted(const at::Tensor& offsets, const at::Tensor& indices,
                                  int64_t features) {
  const int64_t rows = offsets.size(0) - 1, nnz = indices.size(0);
  FeatureOrder f;
  f.order = std::get<1>(at::sort(indices, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  f.feature_offsets = at::zeros({features + 1}, indices.options());
  if (nnz > 0) f.feature_offsets.slice(0, 1).copy_(at::bincount(indices, {}, features).cumsum(0));
  const at::Tensor counts = offsets.slice(0, 1) - offsets.slice(0, 0, rows);
  f.entry_rows = at::repeat_interleave(at::arange(rows, indices.options()), counts, 0, nnz);
  return f;
}

}  // namespace jumprelu_ext
