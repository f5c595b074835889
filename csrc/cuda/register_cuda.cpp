// The CUDA kernels behind the op wrappers of ops.h and sparse_ops.h.
#include <torch/library.h>

#include "../kernels.h"
#include "../ops.h"
#include "../sparse_ops.h"

TORCH_LIBRARY_IMPL(jumprelu_ext, CUDA, m) {
  jumprelu_ext::register_ops<jumprelu_ext::forward_cuda, jumprelu_ext::backward_cuda>(m);
  jumprelu_ext::register_sparse_ops<jumprelu_ext::CudaSparseKernels>(m);
}
