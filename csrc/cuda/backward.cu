// Fused CUDA backward, the GPU counterpart of cpu/backward_cpu.cpp (same per-element
// arithmetic; formulas in kernels.h, the window test in window.h, tiling in common.cuh).
// The pass writes grad_pre (when wanted) and one acc_t partial θ-gradient per
// (row chunk, threadIdx.y) and column; a second kernel sums the partials in a fixed order, so
// the θ gradient is bitwise reproducible without floating-point atomics.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../dispatch.h"
#include "../kernels.h"
#include "../window.h"
#include "common.cuh"

namespace jumprelu_ext {
namespace cuda {
namespace {

// Rows whose loads are issued before any is processed: 64 bytes in flight per thread (the
// pass reads two tensors), which keeps enough memory parallelism at moderate registers.
constexpr int kRowUnroll = 2;

// Correctly rounded, and never contracted into an FMA with a following add, whatever the
// compiler flags: each element's value is that of the plain expression in the CPU kernel.
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Per-call constants, uniform across the grid.
template <typename acc_t>
struct PassConsts {
  acc_t eps;
  Window<acc_t> window;
  acc_t pass;         // weight of H(pre−θ)·grad_acts in grad_pre: 1 (JumpReLU) or 0 (step)
  bool step;          // grad_acts weighs 1 in the θ term instead of θ
  bool ste_to_input;  // grad_pre also gets term/ε
};

template <typename scalar_t, typename theta_t, typename acc_t, int VEC, bool VECTOR_IO,
          BackwardMode MODE>
__global__ void __launch_bounds__(kThreads)
    backward_partial_kernel(const scalar_t* __restrict__ pre, const theta_t* __restrict__ theta,
                            const scalar_t* __restrict__ grad_acts,
                            const float* __restrict__ grad_l0, scalar_t* __restrict__ grad_pre,
                            acc_t* __restrict__ partial, int64_t rows, int64_t features,
                            int64_t rows_per_chunk, PassConsts<acc_t> k) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= features) return;  // no block-wide operations below
  acc_t t[VEC], sum[VEC];
  load_theta<VEC>(theta, col, t);
#pragma unroll
  for (int i = 0; i < VEC; ++i) sum[i] = acc_t(0);
  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = rows < chunk_begin + rows_per_chunk ? rows : chunk_begin + rows_per_chunk;
  const int64_t row_step = blockDim.y;

  // Each thread adds its rows in increasing order: a fixed summation order.
#pragma unroll 1
  for (int64_t r0 = chunk_begin + threadIdx.y; r0 < row_end; r0 += kRowUnroll * row_step) {
    Vec<scalar_t, VEC> x[kRowUnroll];
    Vec<scalar_t, VEC> g[kRowUnroll];
    acc_t g_l0[kRowUnroll];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      const int64_t r = r0 + u * row_step;
      if (r < row_end) {
        x[u] = load_vec<VEC, VECTOR_IO>(pre + r * features + col);
        if constexpr (reads_grad_acts(MODE)) {
          g[u] = load_vec<VEC, VECTOR_IO>(grad_acts + r * features + col);
        }
        g_l0[u] = grad_l0 != nullptr ? static_cast<acc_t>(grad_l0[r]) : acc_t(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      const int64_t r = r0 + u * row_step;
      if (r >= row_end) break;
      Vec<scalar_t, VEC> gp;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t xi = static_cast<acc_t>(x[u].v[i]);
        const acc_t d = xi - t[i];
        const acc_t in_window = (d >= k.window.lo && d <= k.window.hi) ? acc_t(1) : acc_t(0);
        // Literal multiplies, as in the CPU kernel, so NaN/inf in a gradient propagate.
        acc_t term;
        if constexpr (reads_grad_acts(MODE)) {
          const acc_t gi = static_cast<acc_t>(g[u].v[i]);
          term = in_window * ((k.step ? gi : mul_rn(t[i], gi)) + g_l0[u]);
          if constexpr (writes_grad_pre(MODE)) {
            acc_t v = gi * (xi > t[i] ? k.pass : acc_t(0));
            if (k.ste_to_input) v += div_rn(term, k.eps);
            gp.v[i] = static_cast<scalar_t>(v);
          }
        } else {
          term = in_window * g_l0[u];
          if constexpr (writes_grad_pre(MODE)) gp.v[i] = static_cast<scalar_t>(div_rn(term, k.eps));
        }
        sum[i] += term;
      }
      if constexpr (writes_grad_pre(MODE))
        store_vec<VEC, VECTOR_IO>(grad_pre + r * features + col, gp);
    }
  }
  if (partial == nullptr) return;  // θ needs no gradient
  // This thread's row of the partial sums [row_chunks * blockDim.y, features]; allocated by the
  // launcher, so its rows are always Vec-aligned.
  const int64_t slot = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  Vec<acc_t, VEC> s;
#pragma unroll
  for (int i = 0; i < VEC; ++i) s.v[i] = sum[i];
  store_vec<VEC, true>(partial + slot * features + col, s);
}

// grad_θ[j] = −(Σ_slots partial[slot, j]) / ε, slots added in index order.
template <typename acc_t, typename theta_t>
__global__ void __launch_bounds__(kThreads)
    theta_grad_kernel(const acc_t* __restrict__ partial, theta_t* __restrict__ grad_threshold,
                      int64_t slots, int64_t features, acc_t eps) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= features) return;
  acc_t sum = 0;
#pragma unroll 4
  for (int64_t s = 0; s < slots; ++s) sum += partial[s * features + j];
  grad_threshold[j] = static_cast<theta_t>(div_rn(-sum, eps));
}

}  // namespace
}  // namespace cuda

void backward_cuda(const BackwardArgs& args) {
  using namespace cuda;
  TORCH_CHECK(args.pre.is_cuda() && args.threshold.is_cuda(),
              "jumprelu backward (CUDA): pre and threshold must be CUDA tensors");
  const at::cuda::OptionalCUDAGuard guard(args.pre.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = args.pre.size(0), features = args.pre.size(1);
  const BackwardMode mode = backward_mode(args);
  const bool with_theta = args.grad_threshold.defined();
  const bool aligned = aligned_for_vec(args.pre) && aligned_for_vec(args.grad_acts) &&
                       aligned_for_vec(args.grad_pre);

  JUMPRELU_DISPATCH(args.pre, args.threshold, "jumprelu_backward_cuda", [&] {
    const int vec = columns_per_thread<scalar_t>(features);
    const Tiling tiling = make_tiling(rows, features, vec);
    const int64_t slots = static_cast<int64_t>(tiling.grid.y) * tiling.block.y;
    const at::Tensor partial =
        with_theta ? at::empty({slots, features},
                               args.pre.options().dtype(c10::CppTypeToScalarType<acc_t>::value))
                   : at::Tensor();
    const acc_t eps = static_cast<acc_t>(args.bandwidth);
    const PassConsts<acc_t> consts{eps, window_for(eps), args.step ? acc_t(0) : acc_t(1), args.step,
                                   args.ste_to_input};

    dispatch_columns<scalar_t>(vec, aligned, [&](auto vec_tag, auto io_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      constexpr bool VECTOR_IO = decltype(io_tag)::value;
      auto launch = [&](auto kernel) {
        kernel<<<tiling.grid, tiling.block, 0, stream>>>(
            args.pre.const_data_ptr<scalar_t>(), args.threshold.const_data_ptr<theta_t>(),
            args.grad_acts.defined() ? args.grad_acts.const_data_ptr<scalar_t>() : nullptr,
            args.grad_l0.defined() ? args.grad_l0.const_data_ptr<float>() : nullptr,
            args.grad_pre.defined() ? args.grad_pre.mutable_data_ptr<scalar_t>() : nullptr,
            with_theta ? partial.mutable_data_ptr<acc_t>() : nullptr, rows, features,
            tiling.rows_per_chunk, consts);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      switch (mode) {
        case BackwardMode::kActs:
          return launch(backward_partial_kernel<scalar_t, theta_t, acc_t, VEC, VECTOR_IO,
                                                BackwardMode::kActs>);
        case BackwardMode::kActsToPre:
          return launch(backward_partial_kernel<scalar_t, theta_t, acc_t, VEC, VECTOR_IO,
                                                BackwardMode::kActsToPre>);
        case BackwardMode::kL0:
          return launch(
              backward_partial_kernel<scalar_t, theta_t, acc_t, VEC, VECTOR_IO, BackwardMode::kL0>);
        case BackwardMode::kL0ToPre:
          return launch(backward_partial_kernel<scalar_t, theta_t, acc_t, VEC, VECTOR_IO,
                                                BackwardMode::kL0ToPre>);
      }
    });

    if (!with_theta) return;
    theta_grad_kernel<acc_t, theta_t>
        <<<static_cast<unsigned>(ceil_div(features, kThreads)), kThreads, 0, stream>>>(
            partial.const_data_ptr<acc_t>(), args.grad_threshold.mutable_data_ptr<theta_t>(), slots,
            features, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace jumprelu_ext
