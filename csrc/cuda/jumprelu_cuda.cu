// Fused CUDA kernels, the GPU counterpart of cpu/jumprelu_cpu.cpp (same per-element arithmetic).
//
// Tiling (both kernels): each thread owns VEC consecutive columns (16 bytes of pre when
// features % VEC == 0, else one column); a block is blockDim.x threads across columns times
// blockDim.y threads down rows (blockDim.y > 1 only when the features are too few to fill 256
// threads); blockIdx.y picks a contiguous chunk of rows that the block walks. θ for the thread's
// columns is read once into registers. The backward writes one acc_t partial θ-gradient per
// (row chunk, threadIdx.y) and column, then a second kernel sums them in a fixed order: the
// layout depends only on (rows, features, dtype), so the θ gradient is bitwise reproducible.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../dispatch.h"
#include "../kernels.h"
#include "../ops.h"

namespace jumprelu_ext {
namespace {

constexpr int kThreads = 256;        // threads per block
constexpr int kVecBytes = 16;        // widest global load/store per thread (LDG.128)
// Rows whose loads are issued before any is processed: 64 bytes in flight per thread either way
// (the backward reads two tensors), which keeps enough memory parallelism at moderate registers.
constexpr int kForwardRowUnroll = 4;
constexpr int kBackwardRowUnroll = 2;
constexpr int64_t kMinRowsPerThread = 16;  // amortises the θ load over enough rows
constexpr int64_t kMaxRowChunks = 128;     // bounds the backward's partial-sum scratch
constexpr int64_t kMinBlocks = 1024;       // few column blocks: more row chunks to fill the GPU

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// VECTOR_IO: one N-wide access (pointer aligned to the Vec); otherwise N scalar accesses.
template <int N, bool VECTOR_IO, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  if constexpr (VECTOR_IO) {
    return *reinterpret_cast<const Vec<T, N>*>(p);
  } else {
    Vec<T, N> r;
#pragma unroll
    for (int i = 0; i < N; ++i) r.v[i] = p[i];
    return r;
  }
}

template <int N, bool VECTOR_IO, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  if constexpr (VECTOR_IO) {
    *reinterpret_cast<Vec<T, N>*>(p) = x;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = x.v[i];
  }
}

// Correctly rounded, and never contracted into an FMA with a following add, whatever the
// compiler flags: each element's value is that of the plain expression in the CPU kernel.
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

__device__ __forceinline__ int warp_sum(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(0xffffffffu, v);
#else
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
#endif
}

// θ as acc_t for the thread's VEC columns; read once per block, so scalar loads suffice
// whatever θ's dtype and alignment.
template <int VEC, typename theta_t, typename acc_t>
__device__ __forceinline__ void load_theta(const theta_t* theta, int64_t col, acc_t (&t)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) t[i] = static_cast<acc_t>(theta[col + i]);
}

template <typename scalar_t, typename theta_t, typename acc_t, int VEC, bool VECTOR_IO, bool STEP,
          bool WITH_L0>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ pre, const theta_t* __restrict__ theta,
                   scalar_t* __restrict__ out, unsigned long long* __restrict__ l0_count,
                   int64_t rows, int64_t features, int64_t rows_per_chunk) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  // VEC > 1 only when features % VEC == 0, so an active thread's columns are all in range.
  const bool active = col < features;
  acc_t t[VEC];
  if (active) load_theta<VEC>(theta, col, t);
  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = rows < chunk_begin + rows_per_chunk ? rows : chunk_begin + rows_per_chunk;
  const int64_t row_step = blockDim.y;

  // All lanes of a warp share threadIdx.y (blockDim.x is a multiple of 32), so they walk the
  // same rows and reach the warp reduction together, inactive lanes included.
#pragma unroll 1
  for (int64_t r0 = chunk_begin + threadIdx.y; r0 < row_end; r0 += kForwardRowUnroll * row_step) {
    Vec<scalar_t, VEC> x[kForwardRowUnroll];
#pragma unroll
    for (int u = 0; u < kForwardRowUnroll; ++u) {
      const int64_t r = r0 + u * row_step;
      if (active && r < row_end) x[u] = load_vec<VEC, VECTOR_IO>(pre + r * features + col);
    }
#pragma unroll
    for (int u = 0; u < kForwardRowUnroll; ++u) {
      const int64_t r = r0 + u * row_step;
      if (r >= row_end) break;
      int fired = 0;
      if (active) {
        Vec<scalar_t, VEC> y;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const acc_t xi = static_cast<acc_t>(x[u].v[i]);
          const bool fires = xi > t[i];
          const acc_t on = fires ? acc_t(1) : acc_t(0);
          y.v[i] = static_cast<scalar_t>(STEP ? on : xi * on);  // multiply keeps NaN, like pre·H
          fired += fires;
        }
        store_vec<VEC, VECTOR_IO>(out + r * features + col, y);
      }
      if constexpr (WITH_L0) {
        const int total = warp_sum(fired);
        if ((threadIdx.x & 31) == 0 && total != 0) {
          atomicAdd(l0_count + r, static_cast<unsigned long long>(total));
        }
      }
    }
  }
}

template <typename scalar_t, typename theta_t, typename acc_t, int VEC, bool VECTOR_IO,
          bool HAS_ELEM, bool HAS_ROW, bool WRITE_GRAD_PRE>
__global__ void __launch_bounds__(kThreads)
    backward_partial_kernel(const scalar_t* __restrict__ pre, const theta_t* __restrict__ theta,
                            const scalar_t* __restrict__ grad_elem,
                            const scalar_t* __restrict__ grad_row,
                            scalar_t* __restrict__ grad_pre, acc_t* __restrict__ partial,
                            int64_t rows, int64_t features, int64_t rows_per_chunk, acc_t eps,
                            bool elem_is_jumprelu) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= features) return;  // no warp-wide operations below
  // This thread's row of the partial sums: [row_chunks * blockDim.y, features].
  const unsigned slot = blockIdx.y * blockDim.y + threadIdx.y;
  acc_t t[VEC], sum[VEC];
  load_theta<VEC>(theta, col, t);
#pragma unroll
  for (int i = 0; i < VEC; ++i) sum[i] = acc_t(0);
  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = rows < chunk_begin + rows_per_chunk ? rows : chunk_begin + rows_per_chunk;
  const int64_t row_step = blockDim.y;

  // Each thread adds its rows in increasing order: a fixed summation order.
#pragma unroll 1
  for (int64_t r0 = chunk_begin + threadIdx.y; r0 < row_end; r0 += kBackwardRowUnroll * row_step) {
    Vec<scalar_t, VEC> x[kBackwardRowUnroll];
    Vec<scalar_t, VEC> g[kBackwardRowUnroll];
    acc_t g_row[kBackwardRowUnroll];
#pragma unroll
    for (int u = 0; u < kBackwardRowUnroll; ++u) {
      const int64_t r = r0 + u * row_step;
      if (r < row_end) {
        x[u] = load_vec<VEC, VECTOR_IO>(pre + r * features + col);
        if constexpr (HAS_ELEM) g[u] = load_vec<VEC, VECTOR_IO>(grad_elem + r * features + col);
        g_row[u] = HAS_ROW ? static_cast<acc_t>(grad_row[r]) : acc_t(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kBackwardRowUnroll; ++u) {
      const int64_t r = r0 + u * row_step;
      if (r >= row_end) break;
      Vec<scalar_t, VEC> gp;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t xi = static_cast<acc_t>(x[u].v[i]);
        const acc_t ui = div_rn(xi - t[i], eps);
        const acc_t in_window = (ui > acc_t(-0.5) && ui < acc_t(0.5)) ? acc_t(1) : acc_t(0);
        const acc_t gi = HAS_ELEM ? static_cast<acc_t>(g[u].v[i]) : acc_t(0);
        // Literal multiplies, as in the CPU kernel, so NaN/inf in a gradient or θ propagate.
        // The grad_elem weight is θ (JumpReLU) or 1 (step: 1·g == g). Without grad_row the
        // CPU's "+ 0" is skipped: it only turns -0 into +0, which a sum from +0 cannot see.
        const acc_t elem_term = elem_is_jumprelu ? mul_rn(t[i], gi) : gi;
        sum[i] += in_window * (HAS_ROW ? elem_term + g_row[u] : elem_term);
        if constexpr (WRITE_GRAD_PRE) {
          gp.v[i] = static_cast<scalar_t>(gi * (xi > t[i] ? acc_t(1) : acc_t(0)));
        }
      }
      if constexpr (WRITE_GRAD_PRE) {
        store_vec<VEC, VECTOR_IO>(grad_pre + r * features + col, gp);
      }
    }
  }
  // partial is allocated by the launcher, so its rows are always Vec-aligned.
  Vec<acc_t, VEC> s;
#pragma unroll
  for (int i = 0; i < VEC; ++i) s.v[i] = sum[i];
  store_vec<VEC, true>(partial + static_cast<int64_t>(slot) * features + col, s);
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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Columns per thread: 16 bytes of scalar_t when the rows split into whole vectors, else 1.
// Decided from features and dtype only (not alignment), so the θ-gradient layout is too.
template <typename scalar_t>
int columns_per_thread(int64_t features) {
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  return features % kVec == 0 ? kVec : 1;
}

struct Tiling {
  dim3 grid;
  dim3 block;
  int64_t rows_per_chunk;
};

// The one tiling rule for both kernels; a function of (rows, features, vec) only.
Tiling make_tiling(int64_t rows, int64_t features, int vec) {
  const int64_t column_threads = ceil_div(features, vec);
  const int block_x =
      static_cast<int>(std::min<int64_t>(kThreads, ceil_div(column_threads, 32) * 32));
  const int block_y = kThreads / block_x;
  const int64_t column_blocks = ceil_div(column_threads, block_x);
  // <= max(128, 1024) row chunks, far below gridDim.y's 65535.
  const int64_t max_chunks = std::max(kMaxRowChunks, ceil_div(kMinBlocks, column_blocks));
  const int64_t wanted = std::min(ceil_div(rows, block_y * kMinRowsPerThread), max_chunks);
  const int64_t rows_per_chunk = ceil_div(rows, wanted);
  const int64_t chunks = ceil_div(rows, rows_per_chunk);  // no empty chunk
  return {dim3(static_cast<unsigned>(column_blocks), static_cast<unsigned>(chunks)),
          dim3(block_x, block_y), rows_per_chunk};
}

bool aligned_for_vec(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<std::uintptr_t>(t.data_ptr()) % kVecBytes == 0;
}

// Calls body(vec, vector_io) with compile-time tags: VEC columns per thread, and whether its
// accesses are single 16-byte loads/stores (every listed pointer 16-byte aligned).
template <typename scalar_t, typename Body>
void dispatch_columns(int vec, bool aligned, Body&& body) {
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  if (vec == 1) {
    body(std::integral_constant<int, 1>{}, std::true_type{});
  } else if (aligned) {
    body(std::integral_constant<int, kVec>{}, std::true_type{});
  } else {
    body(std::integral_constant<int, kVec>{}, std::false_type{});
  }
}

template <typename Body>
void dispatch_bool(bool value, Body&& body) {
  if (value) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

}  // namespace

void forward_cuda(const ForwardArgs& args) {
  TORCH_CHECK(args.pre.is_cuda() && args.threshold.is_cuda() && args.out.is_cuda(),
              "jumprelu (CUDA): pre, threshold and the output must be CUDA tensors");
  const at::cuda::OptionalCUDAGuard guard(args.pre.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = args.pre.size(0), features = args.pre.size(1);
  const bool with_l0 = args.l0.defined();
  // Exact per-row counts via integer atomics (order-free); converted to pre's dtype below.
  const at::Tensor counts =
      with_l0 ? at::zeros({rows}, args.pre.options().dtype(at::kLong)) : at::Tensor();
  const bool aligned = aligned_for_vec(args.pre) && aligned_for_vec(args.out);

  JUMPRELU_DISPATCH(args.pre, args.threshold, "jumprelu_forward_cuda", [&] {
    const int vec = columns_per_thread<scalar_t>(features);
    const Tiling tiling = make_tiling(rows, features, vec);
    dispatch_columns<scalar_t>(vec, aligned, [&](auto vec_tag, auto io_tag) {
      dispatch_bool(args.step, [&](auto step_tag) {
        dispatch_bool(with_l0, [&](auto l0_tag) {
          constexpr int VEC = decltype(vec_tag)::value;
          constexpr bool VECTOR_IO = decltype(io_tag)::value;
          constexpr bool STEP = decltype(step_tag)::value;
          constexpr bool WITH_L0 = decltype(l0_tag)::value;
          forward_kernel<scalar_t, theta_t, acc_t, VEC, VECTOR_IO, STEP, WITH_L0>
              <<<tiling.grid, tiling.block, 0, stream>>>(
                  args.pre.const_data_ptr<scalar_t>(), args.threshold.const_data_ptr<theta_t>(),
                  args.out.mutable_data_ptr<scalar_t>(),
                  WITH_L0
                      ? reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>())
                      : nullptr,
                  rows, features, tiling.rows_per_chunk);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  if (with_l0) args.l0.copy_(counts);
}

void backward_cuda(const BackwardArgs& args) {
  TORCH_CHECK(args.pre.is_cuda() && args.threshold.is_cuda() && args.grad_threshold.is_cuda(),
              "jumprelu backward (CUDA): pre, threshold and the threshold gradient must be CUDA "
              "tensors");
  const bool has_elem = args.grad_elem.defined();
  const bool has_row = args.grad_row.defined();
  const bool write_grad_pre = args.grad_pre.defined();
  TORCH_CHECK(has_elem || has_row,
              "jumprelu backward (CUDA): needs an output gradient or an l0 gradient");
  TORCH_CHECK(!write_grad_pre || has_elem,
              "jumprelu backward (CUDA): grad_pre can only be computed from an output gradient");
  const at::cuda::OptionalCUDAGuard guard(args.pre.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = args.pre.size(0), features = args.pre.size(1);
  const bool aligned = aligned_for_vec(args.pre) && aligned_for_vec(args.grad_elem) &&
                       aligned_for_vec(args.grad_pre);

  JUMPRELU_DISPATCH(args.pre, args.threshold, "jumprelu_backward_cuda", [&] {
    const int vec = columns_per_thread<scalar_t>(features);
    const Tiling tiling = make_tiling(rows, features, vec);
    const int64_t slots = static_cast<int64_t>(tiling.grid.y) * tiling.block.y;
    const at::Tensor partial = at::empty(
        {slots, features}, args.pre.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const acc_t eps = static_cast<acc_t>(args.bandwidth);
    const scalar_t* grad_elem = has_elem ? args.grad_elem.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* grad_row = has_row ? args.grad_row.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_pre = write_grad_pre ? args.grad_pre.mutable_data_ptr<scalar_t>() : nullptr;

    dispatch_columns<scalar_t>(vec, aligned, [&](auto vec_tag, auto io_tag) {
      dispatch_bool(has_elem, [&](auto elem_tag) {
        dispatch_bool(has_row, [&](auto row_tag) {
          dispatch_bool(write_grad_pre, [&](auto grad_pre_tag) {
            constexpr int VEC = decltype(vec_tag)::value;
            constexpr bool VECTOR_IO = decltype(io_tag)::value;
            constexpr bool HAS_ELEM = decltype(elem_tag)::value;
            constexpr bool HAS_ROW = decltype(row_tag)::value;
            constexpr bool WRITE_GRAD_PRE = decltype(grad_pre_tag)::value;
            // Only the combinations the checks above allow are instantiated.
            if constexpr ((HAS_ELEM || HAS_ROW) && (HAS_ELEM || !WRITE_GRAD_PRE)) {
              backward_partial_kernel<scalar_t, theta_t, acc_t, VEC, VECTOR_IO, HAS_ELEM, HAS_ROW,
                                      WRITE_GRAD_PRE><<<tiling.grid, tiling.block, 0, stream>>>(
                  args.pre.const_data_ptr<scalar_t>(), args.threshold.const_data_ptr<theta_t>(),
                  grad_elem, grad_row, grad_pre, partial.mutable_data_ptr<acc_t>(), rows,
                  features, tiling.rows_per_chunk, eps, args.elem_is_jumprelu);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
          });
        });
      });
    });

    theta_grad_kernel<acc_t, theta_t>
        <<<static_cast<unsigned>(ceil_div(features, kThreads)), kThreads, 0, stream>>>(
            partial.const_data_ptr<acc_t>(), args.grad_threshold.mutable_data_ptr<theta_t>(),
            slots, features, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace jumprelu_ext

TORCH_LIBRARY_IMPL(jumprelu_ext, CUDA, m) {
  jumprelu_ext::register_ops<jumprelu_ext::forward_cuda, jumprelu_ext::backward_cuda>(m);
}
