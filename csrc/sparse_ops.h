// Backend-independent wrappers of the sparse-step ops (schemas in schemas.cpp, the contract in
// docs/ops.md#the-sparse-step): input checks, the encoder's row chunks, the per-entry arithmetic
// of the backward (ATen on [nnz] vectors), the feature order, casts to the compute dtype and
// output allocation. Each backend registers them with its four kernels (sparse_kernels.h):
//   register_sparse_ops<CpuSparseKernels>(m);
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "ops.h"
#include "sparse_kernels.h"

namespace jumprelu_ext {

inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The encoder's pre-activations are formed a tile at a time, so the forward never holds
// [rows, features] whole (docs/ops.md#row-chunks): chunks of rows, and on the CPU tiles of
// K::tile_features features within a chunk. A tile is about 8M elements (32 MB in fp32) on the
// CPU, a chunk 128M on a GPU, but never fewer than 512 rows, since every product call streams (and
// on the CPU packs) its slice of W_enc: at d_sae 262,144, 32-row chunks spent longer on that than
// on the product. On the CPU, whole-batch tiles of 2,048 features ran the product 7-8% faster
// than 512-row chunks of every feature.
// The features of one tile (at least 1, so that a 0-feature SAE still gets its one empty tile).
template <typename K>
int64_t tile_width(int64_t features) {
  return std::max<int64_t>(1,
                           K::tile_features > 0 ? std::min(features, K::tile_features) : features);
}

template <typename K>
int64_t default_chunk_rows(const at::Tensor& x, int64_t features) {
  const int64_t budget = x.is_cuda() ? (int64_t{1} << 27) : (int64_t{1} << 23);
  return std::max<int64_t>(512, budget / tile_width<K>(features));
}

// One chunk's tiles (in feature order) as one support: per row, the tiles' entries in tile order,
// so features stay ascending. The permutation is a stable sort of the entries by row (the feature
// order's counting sort, with rows for features and tiles for rows).
template <typename K>
Support merge_tiles(const std::vector<Support>& tiles, int64_t rows) {
  if (tiles.size() == 1) return tiles.front();
  std::vector<at::Tensor> counts, indices, values, flags, l0, entry_rows;
  std::vector<int64_t> tile_offsets{0};
  for (const Support& t : tiles) {
    counts.push_back(t.row_counts);
    indices.push_back(t.indices);
    values.push_back(t.values);
    flags.push_back(t.flags);
    l0.push_back(t.l0);
    entry_rows.push_back(
        at::repeat_interleave(t.row_counts, std::optional<int64_t>(t.indices.size(0))));
    tile_offsets.push_back(tile_offsets.back() + t.indices.size(0));
  }
  const at::Tensor tile_starts =
      at::tensor(tile_offsets, at::kLong).to(tiles.front().indices.device());
  const at::Tensor by_row = K::feature_order(tile_starts, at::cat(entry_rows), rows).order;
  Support s;
  s.row_counts = at::stack(counts).sum(0);
  s.l0 = at::stack(l0).sum(0);  // integer counts in float32: exact
  s.indices = at::cat(indices).index_select(0, by_row);
  s.values = at::cat(values).index_select(0, by_row);
  s.flags = at::cat(flags).index_select(0, by_row);
  return s;
}

inline void check_csr(const char* op, const at::Tensor& offsets, const at::Tensor& indices,
                      const at::Tensor& values, const at::Tensor& like) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong, op,
              ": offsets must be int64 [rows + 1], got ", offsets.scalar_type(), " ",
              offsets.sizes());
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong, op,
              ": indices must be int64 [nnz], got ", indices.scalar_type(), " ", indices.sizes());
  TORCH_CHECK(values.dim() == 1 && values.size(0) == indices.size(0), op,
              ": values must be [nnz] like indices (", indices.size(0), "), got ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, op,
              ": values must be float32 or float64 (the compute dtype), got ",
              values.scalar_type());
  for (const at::Tensor* t : {&offsets, &indices, &values}) {
    TORCH_CHECK(t->device() == like.device(), op, ": the sparse activations are on ", t->device(),
                " but the weights are on ", like.device());
  }
}

// feature_sums with its outputs allocated; `transposed`: out as [d, features].
template <typename K>
at::Tensor feature_sums_out(const FeatureOrder& f, const at::Tensor& values, const at::Tensor& rows,
                            bool want_out, bool want_sums, int64_t features, at::Tensor* sums_out,
                            bool transposed = false) {
  FeatureSumsArgs a;
  a.by_feature = f;
  a.values = values.contiguous();
  a.transposed = transposed;
  if (want_out) {
    a.rows = rows.contiguous();
    a.out = transposed ? at::empty({rows.size(1), features}, values.options())
                       : at::empty({features, rows.size(1)}, values.options());
  }
  if (want_sums) a.sums = at::empty({features}, values.options());
  K::feature_sums(a);
  if (sums_out) *sums_out = a.sums;
  return a.out;
}

// ---------------------------------------------------------------- encoder

inline void check_encoder(const char* op, const at::Tensor& x, const at::Tensor& W_enc,
                          const at::Tensor& threshold, double bandwidth) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [rows, d_in], got shape ", x.sizes());
  TORCH_CHECK(W_enc.dim() == 2 && W_enc.size(0) == x.size(1), op,
              ": W_enc must be [d_in = ", x.size(1), ", features], got shape ", W_enc.sizes());
  TORCH_CHECK(W_enc.scalar_type() == x.scalar_type(), op, ": W_enc (", W_enc.scalar_type(),
              ") must have x's dtype (", x.scalar_type(), ")");
  TORCH_CHECK(W_enc.device() == x.device(), op, ": x is on ", x.device(), " but W_enc is on ",
              W_enc.device());
  // θ against a [0, features] stand-in for pre: the same checks and messages as the dense ops.
  check_inputs(op, at::empty({0, W_enc.size(1)}, x.options()), threshold, bandwidth);
}

template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_encode_counted_op(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
    const at::Tensor& threshold, double bandwidth, bool /*ste_to_input*/, int64_t chunk_rows,
    const at::Tensor& fire_counts) {
  const char* op = "sparse_encode";
  check_encoder(op, x, W_enc, threshold, bandwidth);
  const int64_t rows = x.size(0), features = W_enc.size(1);
  TORCH_CHECK(b_enc.dim() == 1 && b_enc.size(0) == features, op, ": b_enc must be [", features,
              "], got shape ", b_enc.sizes());
  TORCH_CHECK(b_enc.scalar_type() == x.scalar_type() && b_enc.device() == x.device(), op,
              ": b_enc must have x's dtype and device");
  TORCH_CHECK(chunk_rows >= 0, op, ": chunk_rows must be >= 0 (0: automatic), got ", chunk_rows);
  SelectArgs select;
  select.bandwidth = bandwidth;
  if (fire_counts.defined()) check_fire_counts(op, fire_counts, RowView{rows, features, {}}, x);
  if (chunk_rows == 0) chunk_rows = default_chunk_rows<K>(x, features);
  const int64_t tile_features = tile_width<K>(features);
  const at::Tensor xc = x.contiguous(), wc = W_enc.contiguous();
  const at::Tensor theta = threshold.contiguous(), bias = b_enc.contiguous();
  at::Tensor buffer;
  std::vector<at::Tensor> counts, indices, values, flags, l0;
  for (int64_t start = 0; start < rows; start += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - start);
    const at::Tensor x_chunk = xc.narrow(0, start, n);
    if (!buffer.defined()) buffer = at::empty({n * tile_features}, x.options());
    std::vector<Support> tiles;
    // At least one tile, so that a chunk of a 0-feature SAE still has its (empty) rows.
    for (int64_t first = 0; first < std::max<int64_t>(features, 1); first += tile_features) {
      const int64_t width = std::min(tile_features, features - first);
      at::Tensor pre = buffer.narrow(0, 0, n * width).view({n, width});
      const at::Tensor w = wc.narrow(1, first, width);  // strided: the product reads it in place
      if constexpr (K::select_adds_bias) {
        at::mm_out(pre, x_chunk, w);
        select.bias = bias.narrow(0, first, width);
      } else {
        at::addmm_out(pre, bias.narrow(0, first, width), x_chunk, w);
      }
      select.pre = pre;
      select.threshold = theta.narrow(0, first, width);
      if (fire_counts.defined()) select.fire_counts = fire_counts.narrow(0, first, width);
      Support s = K::select(select);
      if (first > 0) s.indices.add_(first);
      tiles.push_back(s);
    }
    Support s = merge_tiles<K>(tiles, n);
    counts.push_back(s.row_counts);
    indices.push_back(s.indices);
    values.push_back(s.values);
    flags.push_back(s.flags);
    l0.push_back(s.l0);
  }
  const auto acc = x.options().dtype(compute_dtype(x.scalar_type()));
  if (rows == 0) {
    return {at::zeros({1}, x.options().dtype(at::kLong)),
            at::empty({0}, x.options().dtype(at::kLong)), at::empty({0}, acc),
            at::empty({0}, x.options().dtype(at::kByte)),
            at::empty({0}, x.options().dtype(at::kFloat))};
  }
  at::Tensor offsets = at::zeros({rows + 1}, x.options().dtype(at::kLong));
  offsets.slice(0, 1).copy_(at::cat(counts).cumsum(0));
  return {offsets, at::cat(indices), at::cat(values), at::cat(flags), at::cat(l0)};
}

template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_encode_op(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
    const at::Tensor& threshold, double bandwidth, bool ste_to_input, int64_t chunk_rows) {
  return sparse_encode_counted_op<K>(x, W_enc, b_enc, threshold, bandwidth, ste_to_input,
                                     chunk_rows, {});
}

// Per entry (compute dtype): term = [window]·(θ·grad_values + grad_l0[row]) (a missing gradient
// adds nothing), grad_pre = [active]·grad_values (+ term/ε with ste_to_input). Then
// ∂θ = −Σ term/ε, ∂b_enc = Σ grad_pre, ∂W_encᵀ[f] = Σ grad_pre·x[row], ∂x[r] = Σ
// grad_pre·W_encᵀ[f].
template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_encode_backward_op(
    const std::optional<at::Tensor>& grad_values, const std::optional<at::Tensor>& grad_l0,
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& threshold,
    const at::Tensor& offsets, const at::Tensor& indices, const at::Tensor& flags, double bandwidth,
    bool ste_to_input, bool needs_x, bool needs_W_enc, bool needs_b_enc, bool needs_threshold) {
  const char* op = "sparse_encode_backward";
  check_encoder(op, x, W_enc, threshold, bandwidth);
  const int64_t rows = x.size(0), features = W_enc.size(1), nnz = indices.size(0);
  const at::ScalarType acc = compute_dtype(x.scalar_type());
  const auto acc_options = x.options().dtype(acc);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == rows + 1, op,
              ": offsets must be [rows + 1 = ", rows + 1, "], got ", offsets.sizes());
  TORCH_CHECK(flags.dim() == 1 && flags.size(0) == nnz && flags.scalar_type() == at::kByte, op,
              ": flags must be uint8 [nnz]");
  const bool has_values = grad_values.has_value() && grad_values->defined();
  const bool has_l0 = grad_l0.has_value() && grad_l0->defined();
  if (has_values) {
    TORCH_CHECK(grad_values->sizes() == indices.sizes(), op,
                ": the values gradient must be [nnz], got ", grad_values->sizes());
  }
  if (has_l0) {
    TORCH_CHECK(grad_l0->dim() == 1 && grad_l0->size(0) == rows, op,
                ": the l0 gradient must be [rows], got ", grad_l0->sizes());
  }
  const FeatureOrder f = K::feature_order(offsets.contiguous(), indices.contiguous(), features);
  const at::Tensor window = flags.bitwise_and(kWindow).ne(0);
  const at::Tensor active = flags.bitwise_and(kActive).ne(0);
  const at::Tensor eps = at::full({}, bandwidth, acc_options);
  const at::Tensor gv = has_values ? grad_values->to(acc) : at::Tensor();
  at::Tensor term = at::zeros({nnz}, acc_options);
  if (has_values) term = term + threshold.to(acc).index_select(0, indices) * gv;
  if (has_l0) term = term + grad_l0->to(acc).index_select(0, f.entry_rows);
  term = at::where(window, term, at::zeros({}, acc_options));
  at::Tensor grad_pre = has_values ? at::where(active, gv, at::zeros({}, acc_options))
                                   : at::zeros({nnz}, acc_options);
  if (ste_to_input) grad_pre = grad_pre + term / eps;

  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_W_enc = at::empty({0}, W_enc.options());
  at::Tensor grad_b_enc = at::empty({0}, x.options());
  at::Tensor grad_threshold = at::empty({0}, threshold.options());
  if (needs_threshold) {
    at::Tensor sums;
    feature_sums_out<K>(f, term, {}, false, true, features, &sums);
    grad_threshold = (-sums / eps).to(threshold.scalar_type());
  }
  if (needs_W_enc || needs_b_enc) {
    at::Tensor sums;
    at::Tensor w = feature_sums_out<K>(f, grad_pre, x.to(acc), needs_W_enc, needs_b_enc, features,
                                       &sums, /*transposed=*/true);
    if (needs_W_enc) grad_W_enc = w.to(W_enc.scalar_type());
    if (needs_b_enc) grad_b_enc = sums.to(x.scalar_type());
  }
  if (needs_x) {
    SpmmArgs a;
    a.offsets = offsets.contiguous();
    a.indices = indices.contiguous();
    a.values = grad_pre;
    a.dense = W_enc.to(acc).t().contiguous();
    a.out = at::empty({rows, x.size(1)}, acc_options);
    K::spmm(a);
    grad_x = a.out.to(x.scalar_type());
  }
  return {grad_x, grad_W_enc, grad_b_enc, grad_threshold};
}

// ---------------------------------------------------------------- decoder

inline void check_decoder(const char* op, const at::Tensor& offsets, const at::Tensor& indices,
                          const at::Tensor& values, const at::Tensor& W_dec) {
  check_csr(op, offsets, indices, values, W_dec);
  TORCH_CHECK(W_dec.dim() == 2, op, ": W_dec must be [features, d_in], got shape ", W_dec.sizes());
  TORCH_CHECK(is_supported_float(W_dec.scalar_type()), op,
              ": W_dec must be float32, float64, float16 or bfloat16, got ", W_dec.scalar_type());
}

template <typename K>
at::Tensor sparse_decode_op(const at::Tensor& offsets, const at::Tensor& indices,
                            const at::Tensor& values, const at::Tensor& W_dec) {
  check_decoder("sparse_decode", offsets, indices, values, W_dec);
  SpmmArgs a;
  a.offsets = offsets.contiguous();
  a.indices = indices.contiguous();
  a.values = values.contiguous();
  a.dense = W_dec.to(values.scalar_type()).contiguous();
  a.out = at::empty({offsets.size(0) - 1, W_dec.size(1)}, values.options());
  if (a.out.numel() > 0) K::spmm(a);
  return a.out;
}

template <typename K>
std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_op(
    const at::Tensor& grad_out, const at::Tensor& offsets, const at::Tensor& indices,
    const at::Tensor& values, const at::Tensor& W_dec, bool needs_values, bool needs_W_dec) {
  const char* op = "sparse_decode_backward";
  check_decoder(op, offsets, indices, values, W_dec);
  const int64_t rows = offsets.size(0) - 1, features = W_dec.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == W_dec.size(1),
              op, ": the output gradient must be [", rows, ", ", W_dec.size(1), "], got ",
              grad_out.sizes());
  const at::Tensor g = grad_out.to(values.scalar_type()).contiguous();
  at::Tensor grad_values = at::empty({0}, values.options());
  at::Tensor grad_W_dec = at::empty({0}, W_dec.options());
  if (needs_values) {
    SddmmArgs a;
    a.offsets = offsets.contiguous();
    a.indices = indices.contiguous();
    a.left = g;
    a.dense = W_dec.to(values.scalar_type()).contiguous();
    a.out = at::empty({indices.size(0)}, values.options());
    if (a.out.numel() > 0) K::sddmm(a);
    grad_values = a.out;
  }
  if (needs_W_dec) {
    const FeatureOrder f = K::feature_order(offsets.contiguous(), indices.contiguous(), features);
    grad_W_dec =
        feature_sums_out<K>(f, values, g, true, false, features, nullptr).to(W_dec.scalar_type());
  }
  return {grad_values, grad_W_dec};
}

template <typename K>
void register_sparse_ops(torch::Library& m) {
  m.impl("sparse_encode", &sparse_encode_op<K>);
  m.impl("sparse_encode.counted", &sparse_encode_counted_op<K>);
  m.impl("sparse_encode_backward", &sparse_encode_backward_op<K>);
  m.impl("sparse_decode", &sparse_decode_op<K>);
  m.impl("sparse_decode_backward", &sparse_decode_backward_op<K>);
}

}  // namespace jumprelu_ext
