// Operator schemas (the contract: docs/ops.md). Schema `float` is C++ `double`.
// The backward ops return an empty (0-element) tensor for an output that was not asked for.
#include <torch/library.h>

TORCH_LIBRARY(jumprelu_ext, m) {
  m.def(
      "jumprelu(Tensor pre, Tensor threshold, float bandwidth, bool ste_to_input=False) -> Tensor");
  m.def("step(Tensor pre, Tensor threshold, float bandwidth, bool ste_to_input=False) -> Tensor");
  m.def(
      "jumprelu_l0(Tensor pre, Tensor threshold, float bandwidth, bool ste_to_input=False)"
      " -> (Tensor, Tensor)");
  // The same ops, also adding each feature's count of rows with a non-zero output to fire_counts
  // (int64 [features], in place). Overloads rather than an optional argument: the plain ops stay
  // functional (register_autograd, no functionalisation), and inductor (torch 2.14) fails to
  // lower a single-output op whose optional mutable argument is None (docs/ops.md#fire-counts).
  m.def(
      "jumprelu.counted(Tensor pre, Tensor threshold, float bandwidth, bool ste_to_input,"
      " Tensor(a!) fire_counts) -> Tensor");
  m.def(
      "step.counted(Tensor pre, Tensor threshold, float bandwidth, bool ste_to_input,"
      " Tensor(a!) fire_counts) -> Tensor");
  m.def(
      "jumprelu_l0.counted(Tensor pre, Tensor threshold, float bandwidth, bool ste_to_input,"
      " Tensor(a!) fire_counts) -> (Tensor, Tensor)");
  m.def(
      "jumprelu_backward(Tensor grad_acts, Tensor pre, Tensor threshold, float bandwidth,"
      " bool ste_to_input=False, bool needs_grad_pre=True, bool needs_grad_threshold=True)"
      " -> (Tensor, Tensor)");
  m.def(
      "step_backward(Tensor grad_step, Tensor pre, Tensor threshold, float bandwidth,"
      " bool ste_to_input=False, bool needs_grad_pre=True, bool needs_grad_threshold=True)"
      " -> (Tensor, Tensor)");
  m.def(
      "jumprelu_l0_backward(Tensor? grad_acts, Tensor? grad_l0, Tensor pre, Tensor threshold,"
      " float bandwidth, bool ste_to_input=False, bool needs_grad_pre=True,"
      " bool needs_grad_threshold=True) -> (Tensor, Tensor)");

  // The sparse step (docs/ops.md#the-sparse-step): the activations kept row-compressed over their
  // support (active, in θ's window, or NaN). offsets [rows+1] and indices [nnz] int64, values [nnz]
  // in the compute dtype, flags [nnz] uint8 (1: active, 2: in the window), l0 [rows] float32.
  m.def(
      "sparse_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor threshold, float bandwidth,"
      " bool ste_to_input=False, int chunk_rows=0)"
      " -> (Tensor offsets, Tensor indices, Tensor values, Tensor flags, Tensor l0)");
  m.def(
      "sparse_encode.counted(Tensor x, Tensor W_enc, Tensor b_enc, Tensor threshold,"
      " float bandwidth, bool ste_to_input, int chunk_rows, Tensor(a!) fire_counts)"
      " -> (Tensor offsets, Tensor indices, Tensor values, Tensor flags, Tensor l0)");
  m.def(
      "sparse_encode_backward(Tensor? grad_values, Tensor? grad_l0, Tensor x, Tensor W_enc,"
      " Tensor threshold, Tensor offsets, Tensor indices, Tensor flags, float bandwidth,"
      " bool ste_to_input, bool needs_x, bool needs_W_enc, bool needs_b_enc,"
      " bool needs_threshold) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("sparse_decode(Tensor offsets, Tensor indices, Tensor values, Tensor W_dec) -> Tensor");
  m.def(
      "sparse_decode_backward(Tensor grad_out, Tensor offsets, Tensor indices, Tensor values,"
      " Tensor W_dec, bool needs_values=True, bool needs_W_dec=True) -> (Tensor, Tensor)");
}
