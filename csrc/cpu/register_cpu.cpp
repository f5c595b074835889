// The CPU kernels behind the op wrappers of ops.h and sparse_ops.h.
#include <torch/library.h>

#include "../kernels.h"
#include "../ops.h"
#include "../sparse_ops.h"

TORCH_LIBRARY_IMPL(jumprelu_ext, CPU, m) {
  jumprelu_ext::register_ops<jumprelu_ext::forward_cpu, jumprelu_ext::backward_cpu,
                             jumprelu_ext::empty_cpu>(m);
  jumprelu_ext::register_sparse_ops<jumprelu_ext::CpuSparseKernels>(m);
}
