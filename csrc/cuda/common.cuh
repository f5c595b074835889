// Shared by the CUDA forward (forward.cu) and backward (backward.cu) kernels.
//
// Tiling (both kernels): each thread owns VEC consecutive columns (16 bytes of pre when
// features % VEC == 0, else one column); a block is blockDim.x threads across columns times
// blockDim.y threads down rows (blockDim.y > 1 only when the features are too few to fill 256
// threads); blockIdx.y picks a contiguous chunk of rows that the block walks. θ for the thread's
// columns is read once into registers. The layout depends only on (rows, features, dtype), which
// keeps the backward's θ gradient bitwise reproducible (docs/ops.md#determinism).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace jumprelu_ext {
namespace cuda {

constexpr int kThreads = 256;              // threads per block
constexpr int kVecBytes = 16;              // widest global load/store per thread (LDG.128)
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

// θ as acc_t for the thread's VEC columns; read once per block, so scalar loads suffice
// whatever θ's dtype and alignment.
template <int VEC, typename theta_t, typename acc_t>
__device__ __forceinline__ void load_theta(const theta_t* theta, int64_t col, acc_t (&t)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) t[i] = static_cast<acc_t>(theta[col + i]);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
inline Tiling make_tiling(int64_t rows, int64_t features, int vec) {
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

inline bool aligned_for_vec(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % kVecBytes == 0;
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

}  // namespace cuda
}  // namespace jumprelu_ext
