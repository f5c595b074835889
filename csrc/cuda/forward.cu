// Fused CUDA forward, the GPU counterpart of cpu/forward_cpu.cpp (same per-element arithmetic).
// Tiling in common.cuh. The per-row L0 count is reduced in the block (warp shuffles, then the
// block's warps through shared memory) and added to the row's integer counter with one atomic
// per block and row. The per-feature fire counts (when asked) are kept per thread for its
// columns, reduced over the block's rows and added with one atomic per block and feature.
// Integer atomics are exact in any order, so both counts are deterministic.
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../dispatch.h"
#include "../kernels.h"
#include "common.cuh"

namespace jumprelu_ext {
namespace cuda {
namespace {

// Rows whose loads are issued before any is processed: 64 bytes in flight per thread.
constexpr int kRowUnroll = 4;

__device__ __forceinline__ int warp_sum(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(0xffffffffu, v);
#else
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
#endif
}

// Adds each of the kRowUnroll rows' fired counts, summed over the block's threads of that row,
// to l0_count. Every thread of the block must call it (it synchronises the block).
__device__ __forceinline__ void add_block_counts(const int (&fired)[kRowUnroll], int64_t row0,
                                                 int64_t row_step, int64_t row_end,
                                                 unsigned* __restrict__ l0_count) {
  __shared__ int warp_counts[kRowUnroll][kThreads / 32];
  const int warps_per_row = blockDim.x / 32;  // blockDim.x is a multiple of 32
  const int warp = threadIdx.y * warps_per_row + threadIdx.x / 32;
#pragma unroll
  for (int u = 0; u < kRowUnroll; ++u) {
    const int total = warp_sum(fired[u]);
    if ((threadIdx.x & 31) == 0) warp_counts[u][warp] = total;
  }
  __syncthreads();
  if (threadIdx.x < kRowUnroll) {
    const int u = threadIdx.x;
    const int64_t r = row0 + u * row_step;
    int total = 0;
    for (int w = 0; w < warps_per_row; ++w)
      total += warp_counts[u][threadIdx.y * warps_per_row + w];
    if (r < row_end && total != 0) atomicAdd(l0_count + r, static_cast<unsigned>(total));
  }
  __syncthreads();  // warp_counts is rewritten by the next group of rows
}

// Adds each of the thread's VEC columns' fire counts, summed over the threads of the block that
// share those columns (threadIdx.y), to fire_counts: one atomic per block and feature. Every
// thread of the block must call it (it synchronises the block).
template <int VEC>
__device__ __forceinline__ void add_column_counts(const unsigned (&fired)[VEC], bool active,
                                                  int64_t col,
                                                  unsigned long long* __restrict__ fire_counts) {
  __shared__ unsigned column_counts[kThreads];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    if (blockDim.y > 1) {
      column_counts[t] = fired[i];
      __syncthreads();
    }
    if (threadIdx.y == 0 && active) {
      unsigned long long total = fired[i];
      for (int y = 1; y < blockDim.y; ++y) total += column_counts[y * blockDim.x + threadIdx.x];
      if (total != 0) atomicAdd(fire_counts + col + i, total);
    }
    if (blockDim.y > 1) __syncthreads();  // column_counts is rewritten for the next column
  }
}

template <typename scalar_t, typename theta_t, typename acc_t, int VEC, bool VECTOR_IO,
          ForwardMode MODE>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ pre, const theta_t* __restrict__ theta,
                   scalar_t* __restrict__ out, unsigned* __restrict__ l0_count,
                   unsigned long long* __restrict__ fire_counts, int64_t rows, int64_t features,
                   int64_t rows_per_chunk) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  // VEC > 1 only when features % VEC == 0, so an active thread's columns are all in range.
  const bool active = col < features;
  acc_t t[VEC];
  if (active) load_theta<VEC>(theta, col, t);
  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = rows < chunk_begin + rows_per_chunk ? rows : chunk_begin + rows_per_chunk;
  const int64_t row_step = blockDim.y;

  // With L0 the loop bound is the same for the whole block, so that the L0 reduction can
  // synchronise it; without, each thread stops after its own last row.
  constexpr bool kWithL0 = MODE == ForwardMode::kJumpReLUL0;
  // Fire counting is a run-time choice (uniform over the grid): a template flag would double
  // the instantiations for a few integer adds per element. A thread's unsigned counts cannot
  // wrap: it sees one chunk's rows, at most rows / 128 + 1 (common.cuh), far below 2^32.
  const bool count_fires = fire_counts != nullptr;
  unsigned fired_in_column[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) fired_in_column[i] = 0;
  const int64_t first = chunk_begin + (kWithL0 ? 0 : threadIdx.y);
#pragma unroll 1
  for (int64_t base = first; base < row_end; base += kRowUnroll * row_step) {
    const int64_t r0 = kWithL0 ? base + threadIdx.y : base;
    Vec<scalar_t, VEC> x[kRowUnroll];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      const int64_t r = r0 + u * row_step;
      if (active && r < row_end) x[u] = load_vec<VEC, VECTOR_IO>(pre + r * features + col);
    }
    int fired[kRowUnroll];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      const int64_t r = r0 + u * row_step;
      fired[u] = 0;
      if (!kWithL0 && r >= row_end) break;
      if (!active || r >= row_end) continue;
      Vec<scalar_t, VEC> y;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t xi = static_cast<acc_t>(x[u].v[i]);
        const bool fires = xi > t[i];
        const acc_t on = fires ? acc_t(1) : acc_t(0);
        // The multiply keeps NaN, like pre·H.
        const acc_t yi = MODE == ForwardMode::kStep ? on : xi * on;
        y.v[i] = static_cast<scalar_t>(yi);  // exact: yi is xi, ±0, NaN or 1
        if constexpr (kWithL0) fired[u] += fires;
        if (count_fires) fired_in_column[i] += yi != acc_t(0);
      }
      store_vec<VEC, VECTOR_IO>(out + r * features + col, y);
    }
    if constexpr (kWithL0) add_block_counts(fired, r0, row_step, row_end, l0_count);
  }
  if (count_fires) add_column_counts<VEC>(fired_in_column, active, col, fire_counts);
}

}  // namespace
}  // namespace cuda

void forward_cuda(const ForwardArgs& args) {
  using namespace cuda;
  TORCH_CHECK(args.pre.is_cuda() && args.threshold.is_cuda() && args.out.is_cuda(),
              "jumprelu (CUDA): pre, threshold and the output must be CUDA tensors");
  const at::cuda::OptionalCUDAGuard guard(args.pre.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = args.pre.size(0), features = args.pre.size(1);
  const bool with_l0 = args.mode == ForwardMode::kJumpReLUL0;
  // Exact per-row counts (order-free integer atomics), converted to l0's float32 below.
  const at::Tensor counts =
      with_l0 ? at::zeros({rows}, args.pre.options().dtype(at::kInt)) : at::Tensor();
  unsigned* l0_count =
      with_l0 ? reinterpret_cast<unsigned*>(counts.mutable_data_ptr<int32_t>()) : nullptr;
  const bool aligned = aligned_for_vec(args.pre) && aligned_for_vec(args.out);
  // int64 counts added to with unsigned 64-bit atomics: the same two's-complement sum.
  unsigned long long* fire_counts =
      args.fire_counts.defined()
          ? reinterpret_cast<unsigned long long*>(args.fire_counts.mutable_data_ptr<int64_t>())
          : nullptr;

  JUMPRELU_DISPATCH(args.pre, args.threshold, "jumprelu_forward_cuda", [&] {
    const int vec = columns_per_thread<scalar_t>(features);
    const Tiling tiling = make_tiling(rows, features, vec);
    dispatch_columns<scalar_t>(vec, aligned, [&](auto vec_tag, auto io_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      constexpr bool VECTOR_IO = decltype(io_tag)::value;
      auto launch = [&](auto kernel) {
        kernel<<<tiling.grid, tiling.block, 0, stream>>>(
            args.pre.const_data_ptr<scalar_t>(), args.threshold.const_data_ptr<theta_t>(),
            args.out.mutable_data_ptr<scalar_t>(), l0_count, fire_counts, rows, features,
            tiling.rows_per_chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      switch (args.mode) {
        case ForwardMode::kJumpReLU:
          return launch(
              forward_kernel<scalar_t, theta_t, acc_t, VEC, VECTOR_IO, ForwardMode::kJumpReLU>);
        case ForwardMode::kStep:
          return launch(
              forward_kernel<scalar_t, theta_t, acc_t, VEC, VECTOR_IO, ForwardMode::kStep>);
        case ForwardMode::kJumpReLUL0:
          return launch(
              forward_kernel<scalar_t, theta_t, acc_t, VEC, VECTOR_IO, ForwardMode::kJumpReLUL0>);
      }
    });
  });
  if (with_l0) args.l0.copy_(counts);
}

}  // namespace jumprelu_ext
