// CUDA select of the sparse step (sparse_kernels.h): one chunk of pre [rows, features] → its
// support, row-compressed, features ascending within a row. The per-element arithmetic is
// forward.cu's (values, l0) and backward.cu's (the window test, window.h).
//
// Two passes over pre. Each row is cut into `segments` equal runs of features (one, unless the
// rows are too few to fill the GPU: a function of the shape only), and one block takes one
// (row, segment) item at a time (a grid-stride loop over the items, row-major):
//   count: each item's support entries and fired (pre > θ) entries, reduced in the block; the
//   items' inclusive scan (at::cumsum) then places every item's entries, nnz is read back to the
//   host (the one sync) and the outputs are allocated; row_counts and l0 are the items' counts
//   summed per row (integers: exact);
//   fill: each item's entries written from its scan offset in ascending feature order.
// A block walks its item kUnroll tiles of blockDim.x features at a time: thread t of the block
// holds features base + u·blockDim.x + t (u < kUnroll), so every load is coalesced. The fill's
// ordered compaction: a ballot per warp and tile gives the warp's entries and each lane's rank
// among them; warp 0 scans the kUnroll × warps counts (at most 32: one warp-wide scan) in
// (tile, warp) order, which is feature order. The layout fixes every output position, and the
// fire counts are integer atomics (exact in any order), so the result is deterministic.
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../dispatch.h"
#include "../sparse_kernels.h"
#include "../window.h"
#include "common.cuh"

namespace jumprelu_ext {
namespace cuda {
namespace {

constexpr int kUnroll = 4;                // tiles of blockDim.x features per block iteration
constexpr int kMaxWarps = kThreads / 32;  // warps per block
static_assert(kUnroll * kMaxWarps <= 32, "one warp scans an iteration's per-(tile, warp) counts");
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride beyond this many items
// Rows are cut into segments only while there are fewer than kTargetItems rows, and into
// segments of at least kMinSegment features.
constexpr int64_t kTargetItems = 8192;
constexpr int64_t kMinSegment = 4096;

// Each row's features cut into `count` runs of `length` (the last one possibly shorter).
struct Segments {
  int64_t count;
  int64_t length;
};

constexpr uint8_t kActiveFlag = kActive;
constexpr uint8_t kWindowFlag = kWindow;

// One element's membership in the support, its flags and its value.
template <typename acc_t>
struct Entry {
  bool in_support;  // active, in the window, or with a NaN value
  uint8_t flags;    // kActive | kWindow (a NaN value: neither)
  acc_t value;      // pre·H(pre−θ): pre, ±0 or NaN
};

template <typename acc_t>
__device__ __forceinline__ Entry<acc_t> classify(acc_t x, acc_t t, const Window<acc_t>& w) {
  const bool active = x > t;
  const acc_t d = x - t;  // NaN (x or θ NaN, inf − inf) fails both comparisons
  const bool window = d >= w.lo && d <= w.hi;
  Entry<acc_t> e;
  // x · H rather than a select, as the forward: x NaN, x = −inf, or x = +inf with θ = +inf or
  // NaN give NaN, and a NaN value is kept (as by the CPU kernel), so x̂ gets it as in the dense
  // step.
  e.value = x * (active ? acc_t(1) : acc_t(0));
  e.in_support = active || window || e.value != e.value;
  e.flags = static_cast<uint8_t>((active ? kActiveFlag : 0) | (window ? kWindowFlag : 0));
  return e;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Loads the thread's kUnroll elements of the iteration at `base` (its first feature) as acc_t,
// with θ, those below `end` only (the others are left unset).
template <typename scalar_t, typename theta_t, typename acc_t>
__device__ __forceinline__ void load_tiles(const scalar_t* __restrict__ row,
                                           const theta_t* __restrict__ theta, int64_t base,
                                           int64_t end, acc_t (&x)[kUnroll], acc_t (&t)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t col = base + static_cast<int64_t>(u) * blockDim.x;
    if (col < end) {
      x[u] = static_cast<acc_t>(row[col]);
      t[u] = static_cast<acc_t>(theta[col]);
    }
  }
}

// For each item (row r, segment g): item_support[item] = its support entries, item_active[item]
// = its entries with pre > θ (item = r·segments + g).
template <typename scalar_t, typename theta_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    select_count_kernel(const scalar_t* __restrict__ pre, const theta_t* __restrict__ theta,
                        int64_t* __restrict__ item_support, int64_t* __restrict__ item_active,
                        int64_t rows, int64_t features, Segments seg, Window<acc_t> window) {
  __shared__ long long support_per_warp[kMaxWarps];
  __shared__ long long active_per_warp[kMaxWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kUnroll;
  const int64_t items = rows * seg.count;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t r = item / seg.count, begin = (item % seg.count) * seg.length;
    const int64_t end = begin + seg.length < features ? begin + seg.length : features;
    const scalar_t* row = pre + r * features;
    long long support = 0, active = 0;
    for (int64_t base = begin + threadIdx.x; base < end; base += step) {
      acc_t x[kUnroll], t[kUnroll];
      load_tiles(row, theta, base, end, x, t);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + static_cast<int64_t>(u) * blockDim.x >= end) break;
        const Entry<acc_t> e = classify(x[u], t[u], window);
        support += e.in_support;
        active += (e.flags & kActiveFlag) != 0;
      }
    }
    support = warp_sum(support);
    active = warp_sum(active);
    if (lane == 0) {
      support_per_warp[warp] = support;
      active_per_warp[warp] = active;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long sum_support = 0, sum_active = 0;
      for (int w = 0; w < warps; ++w) {
        sum_support += support_per_warp[w];
        sum_active += active_per_warp[w];
      }
      item_support[item] = sum_support;
      item_active[item] = sum_active;
    }
    __syncthreads();  // the per-warp counts are rewritten for the next item
  }
}

// Writes item's entries (row r, segment g; item = r·segments + g) at item_ends[item − 1] …
// item_ends[item] − 1, features ascending, and adds the fired ones (value != 0, NaN included)
// to fire_counts (when not null).
template <typename scalar_t, typename theta_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    select_fill_kernel(const scalar_t* __restrict__ pre, const theta_t* __restrict__ theta,
                       const int64_t* __restrict__ item_ends, int64_t* __restrict__ indices,
                       acc_t* __restrict__ values, uint8_t* __restrict__ flags,
                       unsigned long long* __restrict__ fire_counts, int64_t rows, int64_t features,
                       Segments seg, Window<acc_t> window) {
  __shared__ int offsets[32];  // per (tile, warp): its first entry's position in the iteration
  __shared__ int total;        // the iteration's entries
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kUnroll;
  const int64_t items = rows * seg.count;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t r = item / seg.count, begin = (item % seg.count) * seg.length;
    const int64_t end = begin + seg.length < features ? begin + seg.length : features;
    const scalar_t* row = pre + r * features;
    int64_t next = item == 0 ? 0 : item_ends[item - 1];  // the item's next entry's position
    // The loop bounds are uniform over the block: every thread reaches the barriers.
    for (int64_t base = begin; base < end; base += step) {
      const int64_t first = base + threadIdx.x;
      acc_t x[kUnroll], t[kUnroll];
      load_tiles(row, theta, first, end, x, t);
      Entry<acc_t> e[kUnroll];
      unsigned ballot[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const bool in_range = first + static_cast<int64_t>(u) * blockDim.x < end;
        if (in_range) {
          e[u] = classify(x[u], t[u], window);
        } else {
          e[u].in_support = false;
        }
        ballot[u] = __ballot_sync(0xffffffffu, e[u].in_support);
        if (lane == 0) offsets[u * warps + warp] = __popc(ballot[u]);
      }
      __syncthreads();
      if (warp == 0) {
        // Exclusive scan of the kUnroll·warps (<= 32) counts, in (tile, warp) order.
        const int n = kUnroll * warps;
        const int count = lane < n ? offsets[lane] : 0;
        int inclusive = count;
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
          const int below = __shfl_up_sync(0xffffffffu, inclusive, offset);
          if (lane >= offset) inclusive += below;
        }
        if (lane < n) offsets[lane] = inclusive - count;
        if (lane == 31) total = inclusive;
      }
      __syncthreads();
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!e[u].in_support) continue;
        const int64_t col = first + static_cast<int64_t>(u) * blockDim.x;
        const int64_t pos = next + offsets[u * warps + warp] + __popc(ballot[u] & lanes_below);
        indices[pos] = col;
        values[pos] = e[u].value;
        flags[pos] = e[u].flags;
        if (fire_counts != nullptr && e[u].value != acc_t(0)) atomicAdd(fire_counts + col, 1ull);
      }
      next += total;
      __syncthreads();  // offsets and total are rewritten by the next iteration
    }
  }
}

// Threads per block: enough for one iteration to cover the row, in whole warps, at most kThreads.
int select_threads(int64_t features) {
  const int64_t per_iteration = ceil_div(std::max<int64_t>(features, 1), kUnroll);
  return static_cast<int>(std::min<int64_t>(kThreads, ceil_div(per_iteration, 32) * 32));
}

// One segment per row, unless the rows are fewer than kTargetItems: then enough segments of at
// least kMinSegment features (whole block iterations) to make about kTargetItems items.
Segments segments_for(int64_t rows, int64_t features, int64_t step) {
  const int64_t wanted = ceil_div(kTargetItems, rows);
  const int64_t most = features / kMinSegment;
  if (rows >= kTargetItems || most < 2) return {1, features};
  const int64_t length = ceil_div(ceil_div(features, std::min(wanted, most)), step) * step;
  return {ceil_div(features, length), length};  // no empty segment
}

}  // namespace
}  // namespace cuda

Support select_support_cuda(const SelectArgs& args) {
  using namespace cuda;
  const at::Tensor& pre = args.pre;
  const at::Tensor& threshold = args.threshold;
  TORCH_CHECK(pre.is_cuda() && threshold.is_cuda(),
              "sparse select (CUDA): pre and threshold must be CUDA tensors");
  TORCH_CHECK(pre.dim() == 2 && pre.is_contiguous(),
              "sparse select (CUDA): pre must be a contiguous [rows, features] tensor");
  const int64_t rows = pre.size(0), features = pre.size(1);
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == features && threshold.is_contiguous(),
              "sparse select (CUDA): threshold must be a contiguous [", features, "] tensor");
  if (args.fire_counts.defined()) {
    TORCH_CHECK(args.fire_counts.is_cuda() && args.fire_counts.scalar_type() == at::kLong &&
                    args.fire_counts.dim() == 1 && args.fire_counts.size(0) == features &&
                    args.fire_counts.is_contiguous(),
                "sparse select (CUDA): fire_counts must be a contiguous int64 [", features,
                "] CUDA tensor");
  }
  const c10::cuda::CUDAGuard guard(pre.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto long_options = pre.options().dtype(at::kLong);
  const auto acc_options =
      pre.options().dtype(pre.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const auto float_options = pre.options().dtype(at::kFloat);
  const auto byte_options = pre.options().dtype(at::kByte);
  Support s;
  if (rows == 0) {
    s.row_counts = at::empty({0}, long_options);
    s.l0 = at::empty({0}, float_options);
    s.indices = at::empty({0}, long_options);
    s.values = at::empty({0}, acc_options);
    s.flags = at::empty({0}, byte_options);
    return s;
  }
  // int64 counts added to with unsigned 64-bit atomics: the same two's-complement sum.
  unsigned long long* fire_counts =
      args.fire_counts.defined()
          ? reinterpret_cast<unsigned long long*>(args.fire_counts.mutable_data_ptr<int64_t>())
          : nullptr;
  const int threads = select_threads(features);
  const Segments seg = segments_for(rows, features, int64_t{threads} * kUnroll);
  const int64_t items = rows * seg.count;
  const dim3 grid(static_cast<unsigned>(std::min(items, kMaxBlocks)));
  const dim3 block(threads);
  const at::Tensor item_support = at::empty({items}, long_options);
  const at::Tensor item_active = at::empty({items}, long_options);

  JUMPRELU_DISPATCH(pre, threshold, "sparse_select_cuda", [&] {
    static_assert(std::is_same_v<acc_t, float> || std::is_same_v<acc_t, double>,
                  "values are stored in the compute dtype, acc_t");
    const Window<acc_t> window = window_for(static_cast<acc_t>(args.bandwidth));
    select_count_kernel<scalar_t, theta_t, acc_t><<<grid, block, 0, stream>>>(
        pre.const_data_ptr<scalar_t>(), threshold.const_data_ptr<theta_t>(),
        item_support.mutable_data_ptr<int64_t>(), item_active.mutable_data_ptr<int64_t>(), rows,
        features, seg, window);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (seg.count == 1) {
      s.row_counts = item_support;
      s.l0 = item_active.to(at::kFloat);  // rounded to nearest, like the forward's int → float
    } else {
      s.row_counts = item_support.view({rows, seg.count}).sum(1);
      s.l0 = item_active.view({rows, seg.count}).sum(1).to(at::kFloat);
    }
    const at::Tensor item_ends = at::cumsum(item_support, 0);
    const int64_t nnz = item_ends.select(0, items - 1).item<int64_t>();  // the one sync
    s.indices = at::empty({nnz}, long_options);
    s.values = at::empty({nnz}, acc_options);
    s.flags = at::empty({nnz}, byte_options);
    if (nnz == 0) return;  // no entries, so nothing fired either

    select_fill_kernel<scalar_t, theta_t, acc_t><<<grid, block, 0, stream>>>(
        pre.const_data_ptr<scalar_t>(), threshold.const_data_ptr<theta_t>(),
        item_ends.const_data_ptr<int64_t>(), s.indices.mutable_data_ptr<int64_t>(),
        s.values.mutable_data_ptr<acc_t>(), s.flags.mutable_data_ptr<uint8_t>(), fire_counts, rows,
        features, seg, window);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return s;
}

}  // namespace jumprelu_ext
