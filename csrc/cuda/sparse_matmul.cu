// CUDA products of the sparse step (sparse_kernels.h), in the compute dtype (float or double):
//   spmm          out[r] = Σ_{e in row r} values[e]·dense[indices[e]]        one block per row
//   feature_sums  out[f] = Σ_{e of f} values[e]·rows[entry_rows[e]]         one block per feature
//                 sums[f] = Σ_{e of f} values[e]
//   sddmm         out[e] = left[row(e)] · dense[indices[e]]                  8 lanes per entry
// spmm and feature_sums share one gather: a block's threads split the d columns (kColumns per
// thread and pass, coalesced: column k0 + c·blockDim.x), and each thread adds the segment's
// entries into its columns one after another, in segment order. sddmm follows the CPU kernel's
// dot product (kDotLanes). No atomics anywhere, and every output element is summed in an order
// fixed by the contract and the shapes only, whatever the launch shape: bitwise reproducible.
// Products are rounded before the add, never contracted into an FMA (mul_rn), so the results are
// also those of the CPU kernels (cpu/sparse_matmul_cpu.cpp) wherever the C++ compiler does not
// contract a·b + c either (x86-64 without -mfma/-march: yes; aarch64 gcc contracts by default).
// Row, entry and feature ids are checked on the device (CUDA_KERNEL_ASSERT) before they address
// memory.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "../sparse_kernels.h"
#include "common.cuh"

namespace jumprelu_ext {
namespace cuda {
namespace {

constexpr int kColumns = 8;                       // columns per thread and pass of the gather
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride beyond this many rows/features

// Correctly rounded products that the compiler never contracts with the following add.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// For every column k < d: dst[k] = Σ_{p = begin … end−1} values[e_p]·src[index[e_p], k], with
// e_p = order[p] (p when order is null), added in p order. *sum (when not null) gets
// Σ values[e_p] in the same order, from thread 0. Empty segments write zeros.
template <typename T>
__device__ __forceinline__ void gather_rows(const int64_t* __restrict__ order,
                                            const int64_t* __restrict__ index,
                                            const T* __restrict__ values, const T* __restrict__ src,
                                            int64_t src_rows, int64_t nnz, int64_t d, int64_t begin,
                                            int64_t end, T* __restrict__ dst, T* __restrict__ sum) {
  const int64_t span = static_cast<int64_t>(blockDim.x) * kColumns;
  for (int64_t k0 = threadIdx.x; k0 < d; k0 += span) {
    const bool sums_here = sum != nullptr && k0 == 0;  // thread 0, first pass
    T acc[kColumns];
#pragma unroll
    for (int c = 0; c < kColumns; ++c) acc[c] = T(0);
    T s = T(0);
#pragma unroll 2
    for (int64_t p = begin; p < end; ++p) {
      const int64_t e = order != nullptr ? order[p] : p;
      CUDA_KERNEL_ASSERT(0 <= e && e < nnz);
      const int64_t j = index[e];
      CUDA_KERNEL_ASSERT(0 <= j && j < src_rows);
      const T v = values[e];
      const T* row = src + j * d;
#pragma unroll
      for (int c = 0; c < kColumns; ++c) {
        const int64_t k = k0 + static_cast<int64_t>(c) * blockDim.x;
        if (k < d) acc[c] += mul_rn(v, row[k]);
      }
      if (sums_here) s += v;
    }
#pragma unroll
    for (int c = 0; c < kColumns; ++c) {
      const int64_t k = k0 + static_cast<int64_t>(c) * blockDim.x;
      if (k < d) dst[k] = acc[c];
    }
    if (sums_here) *sum = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    spmm_kernel(const int64_t* __restrict__ offsets, const int64_t* __restrict__ indices,
                const T* __restrict__ values, const T* __restrict__ dense, T* __restrict__ out,
                int64_t rows, int64_t features, int64_t nnz, int64_t d) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t begin = offsets[r], end = offsets[r + 1];
    CUDA_KERNEL_ASSERT(0 <= begin && begin <= end && end <= nnz);
    gather_rows<T>(nullptr, indices, values, dense, features, nnz, d, begin, end, out + r * d,
                   nullptr);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    feature_rows_kernel(const int64_t* __restrict__ feature_offsets,
                        const int64_t* __restrict__ order, const int64_t* __restrict__ entry_rows,
                        const T* __restrict__ values, const T* __restrict__ rows_in,
                        T* __restrict__ out, T* __restrict__ sums, int64_t features, int64_t rows,
                        int64_t nnz, int64_t d) {
  for (int64_t f = blockIdx.x; f < features; f += gridDim.x) {
    const int64_t begin = feature_offsets[f], end = feature_offsets[f + 1];
    CUDA_KERNEL_ASSERT(0 <= begin && begin <= end && end <= nnz);
    gather_rows<T>(order, entry_rows, values, rows_in, rows, nnz, d, begin, end, out + f * d,
                   sums != nullptr ? sums + f : nullptr);
  }
}

// sums alone (no d-vectors): one thread per feature, its entries in order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    feature_value_sums_kernel(const int64_t* __restrict__ feature_offsets,
                              const int64_t* __restrict__ order, const T* __restrict__ values,
                              T* __restrict__ sums, int64_t features, int64_t nnz) {
  const int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (f >= features) return;
  const int64_t begin = feature_offsets[f], end = feature_offsets[f + 1];
  CUDA_KERNEL_ASSERT(0 <= begin && begin <= end && end <= nnz);
  T s = T(0);
#pragma unroll 4
  for (int64_t p = begin; p < end; ++p) {
    const int64_t e = order[p];
    CUDA_KERNEL_ASSERT(0 <= e && e < nnz);
    s += values[e];
  }
  sums[f] = s;
}

// Lanes per sddmm entry: the CPU kernel's dot product (cpu/sparse_matmul_cpu.cpp) keeps this many
// partial sums, lane i adding the columns k ≡ i (mod 8) below the last whole group of 8, then adds
// them in the tree ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)) and the tail columns one by
// one. Eight lanes doing exactly that (the xor-shuffle tree adds the same pairs) give the CPU's
// result bit for bit, for any launch shape.
constexpr int kDotLanes = 8;

// Each warp takes 32 / kDotLanes entries at a time (the block's warps stride over the row's).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sddmm_kernel(const int64_t* __restrict__ offsets, const int64_t* __restrict__ indices,
                 const T* __restrict__ left, const T* __restrict__ dense, T* __restrict__ out,
                 int64_t rows, int64_t features, int64_t nnz, int64_t d) {
  constexpr int kPerWarp = 32 / kDotLanes;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int sub = lane % kDotLanes;  // the lane's partial sum
  const int64_t d_main = d - d % kDotLanes;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t begin = offsets[r], end = offsets[r + 1];
    CUDA_KERNEL_ASSERT(0 <= begin && begin <= end && end <= nnz);
    const T* l = left + r * d;
    // The loop bound is uniform over the warp: all 32 lanes reach the shuffles.
    for (int64_t e0 = begin + static_cast<int64_t>(warp) * kPerWarp; e0 < end;
         e0 += static_cast<int64_t>(warps) * kPerWarp) {
      const int64_t e = e0 + lane / kDotLanes;
      const bool valid = e < end;
      const T* w = nullptr;
      T s = T(0);
      if (valid) {
        const int64_t j = indices[e];
        CUDA_KERNEL_ASSERT(0 <= j && j < features);
        w = dense + j * d;
#pragma unroll 4
        for (int64_t k = sub; k < d_main; k += kDotLanes) s += mul_rn(l[k], w[k]);
      }
#pragma unroll
      for (int offset = 1; offset < kDotLanes; offset <<= 1)
        s += __shfl_xor_sync(0xffffffffu, s, offset);
      if (valid && sub == 0) {
        for (int64_t k = d_main; k < d; ++k) s += mul_rn(l[k], w[k]);
        out[e] = s;
      }
    }
  }
}

// Threads for the gather: enough for one pass over d, in whole warps, at most kThreads.
int gather_threads(int64_t d) {
  return static_cast<int>(std::min<int64_t>(kThreads, ceil_div(ceil_div(d, kColumns), 32) * 32));
}

unsigned grid_for(int64_t items) { return static_cast<unsigned>(std::min(items, kMaxBlocks)); }

void check_compute(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda(), op, " (CUDA): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, op, " (CUDA): ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, " (CUDA): ", name, " must be contiguous");
}

}  // namespace
}  // namespace cuda

void spmm_cuda(const SpmmArgs& args) {
  using namespace cuda;
  const char* op = "sparse spmm";
  const at::ScalarType dtype = args.values.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              " (CUDA): values must be float32 or float64, got ", dtype);
  check_compute(op, args.offsets, "offsets", at::kLong);
  check_compute(op, args.indices, "indices", at::kLong);
  check_compute(op, args.values, "values", dtype);
  check_compute(op, args.dense, "dense", dtype);
  check_compute(op, args.out, "out", dtype);
  const int64_t rows = args.offsets.size(0) - 1, nnz = args.indices.size(0);
  TORCH_CHECK(args.dense.dim() == 2 && args.out.dim() == 2 && args.out.size(0) == rows &&
                  args.out.size(1) == args.dense.size(1),
              op, " (CUDA): out must be [rows = ", rows, ", d = dense.size(1)], got ",
              args.out.sizes(), " with dense ", args.dense.sizes());
  const int64_t features = args.dense.size(0), d = args.dense.size(1);
  if (rows <= 0 || d == 0) return;  // out has no elements
  const c10::cuda::CUDAGuard guard(args.out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "sparse_spmm_cuda", [&] {
    spmm_kernel<scalar_t><<<grid_for(rows), gather_threads(d), 0, stream>>>(
        args.offsets.const_data_ptr<int64_t>(), args.indices.const_data_ptr<int64_t>(),
        args.values.const_data_ptr<scalar_t>(), args.dense.const_data_ptr<scalar_t>(),
        args.out.mutable_data_ptr<scalar_t>(), rows, features, nnz, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void sddmm_cuda(const SddmmArgs& args) {
  using namespace cuda;
  const char* op = "sparse sddmm";
  const at::ScalarType dtype = args.left.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              " (CUDA): left must be float32 or float64, got ", dtype);
  check_compute(op, args.offsets, "offsets", at::kLong);
  check_compute(op, args.indices, "indices", at::kLong);
  check_compute(op, args.left, "left", dtype);
  check_compute(op, args.dense, "dense", dtype);
  check_compute(op, args.out, "out", dtype);
  const int64_t rows = args.offsets.size(0) - 1, nnz = args.indices.size(0);
  TORCH_CHECK(args.left.dim() == 2 && args.left.size(0) == rows && args.dense.dim() == 2 &&
                  args.dense.size(1) == args.left.size(1),
              op, " (CUDA): left must be [rows = ", rows, ", d] and dense [features, d], got ",
              args.left.sizes(), " and ", args.dense.sizes());
  TORCH_CHECK(args.out.dim() == 1 && args.out.size(0) == nnz, op,
              " (CUDA): out must be [nnz = ", nnz, "], got ", args.out.sizes());
  const int64_t features = args.dense.size(0), d = args.left.size(1);
  if (rows <= 0 || nnz == 0) return;  // out has no elements (d == 0 still writes zeros)
  const c10::cuda::CUDAGuard guard(args.out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Enough warps for a row's entries on average (the result does not depend on it).
  const int64_t entry_groups = ceil_div(ceil_div(nnz, rows), 32 / kDotLanes);
  const int warps = static_cast<int>(std::clamp<int64_t>(entry_groups, 1, kThreads / 32));
  AT_DISPATCH_FLOATING_TYPES(dtype, "sparse_sddmm_cuda", [&] {
    sddmm_kernel<scalar_t><<<grid_for(rows), warps * 32, 0, stream>>>(
        args.offsets.const_data_ptr<int64_t>(), args.indices.const_data_ptr<int64_t>(),
        args.left.const_data_ptr<scalar_t>(), args.dense.const_data_ptr<scalar_t>(),
        args.out.mutable_data_ptr<scalar_t>(), rows, features, nnz, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void feature_sums_cuda(const FeatureSumsArgs& args) {
  using namespace cuda;
  const char* op = "sparse feature_sums";
  const at::ScalarType dtype = args.values.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              " (CUDA): values must be float32 or float64, got ", dtype);
  check_compute(op, args.by_feature.feature_offsets, "feature_offsets", at::kLong);
  check_compute(op, args.by_feature.order, "order", at::kLong);
  check_compute(op, args.values, "values", dtype);
  const int64_t features = args.by_feature.feature_offsets.size(0) - 1, nnz = args.values.size(0);
  TORCH_CHECK(args.by_feature.order.dim() == 1 && args.by_feature.order.size(0) == nnz, op,
              " (CUDA): order must be [nnz = ", nnz, "], got ", args.by_feature.order.sizes());
  const bool want_out = args.out.defined(), want_sums = args.sums.defined();
  if (want_out && args.transposed) {  // rows into scratch, then one transposing copy on the device
    FeatureSumsArgs by_rows = args;
    by_rows.transposed = false;
    by_rows.out = at::empty({features, args.rows.size(1)}, args.values.options());
    feature_sums_cuda(by_rows);
    args.out.copy_(by_rows.out.t());
    return;
  }
  if (want_out) {
    check_compute(op, args.by_feature.entry_rows, "entry_rows", at::kLong);
    check_compute(op, args.rows, "rows", dtype);
    check_compute(op, args.out, "out", dtype);
    TORCH_CHECK(args.by_feature.entry_rows.dim() == 1 && args.by_feature.entry_rows.size(0) == nnz,
                op, " (CUDA): entry_rows must be [nnz = ", nnz, "], got ",
                args.by_feature.entry_rows.sizes());
    TORCH_CHECK(args.rows.dim() == 2 && args.out.dim() == 2 && args.out.size(0) == features &&
                    args.out.size(1) == args.rows.size(1),
                op, " (CUDA): out must be [features = ", features, ", d = rows.size(1)], got ",
                args.out.sizes(), " with rows ", args.rows.sizes());
  }
  if (want_sums) {
    check_compute(op, args.sums, "sums", dtype);
    TORCH_CHECK(args.sums.dim() == 1 && args.sums.size(0) == features, op,
                " (CUDA): sums must be [features = ", features, "], got ", args.sums.sizes());
  }
  if (features <= 0) return;
  const int64_t d = want_out ? args.rows.size(1) : 0;
  const c10::cuda::CUDAGuard guard(args.values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "sparse_feature_sums_cuda", [&] {
    scalar_t* sums = want_sums ? args.sums.mutable_data_ptr<scalar_t>() : nullptr;
    if (want_out && d > 0) {  // the sums ride along with the d-vectors
      feature_rows_kernel<scalar_t><<<grid_for(features), gather_threads(d), 0, stream>>>(
          args.by_feature.feature_offsets.const_data_ptr<int64_t>(),
          args.by_feature.order.const_data_ptr<int64_t>(),
          args.by_feature.entry_rows.const_data_ptr<int64_t>(),
          args.values.const_data_ptr<scalar_t>(), args.rows.const_data_ptr<scalar_t>(),
          args.out.mutable_data_ptr<scalar_t>(), sums, features, args.rows.size(0), nnz, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (want_sums) {
      feature_value_sums_kernel<scalar_t>
          <<<static_cast<unsigned>(ceil_div(features, kThreads)), kThreads, 0, stream>>>(
              args.by_feature.feature_offsets.const_data_ptr<int64_t>(),
              args.by_feature.order.const_data_ptr<int64_t>(),
              args.values.const_data_ptr<scalar_t>(), sums, features, nnz);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace jumprelu_ext
