// Per-class MMD: CUDA kernels (registered for the CUDA dispatch key of the `fastdd_C` ops whose schemas
// class_mmd_cpu.cpp defines). Same contracts as the CPU kernels; fp32/fp16/bf16 (and fp64) inputs,
// accumulation in float (double for double inputs). Deterministic: no floating-point atomics.
//
// Rows are grouped by class with a stable sort of the labels (perm) and per-class offsets found by a
// lower-bound search, then read through perm (no gathered copy of the features).
//   linear:   mean_diff_kernel   grid (K, cdiv(D, 64)), block (64, 4): class sums over a column block,
//                                diff = mean_r - mean_s, per-block partial loss; sum_kernel adds them.
//             mean_grad_kernel   grid-stride over N x D: grad[i] = sign 2 g inv_n[c_i] diff[c_i].
//   Gaussian: pair_sum_kernel / pair_grad_kernel, one 32-row tile of class-sorted x rows per block
//             against the 32-column tiles of class-sorted y rows whose classes overlap it; Gram tiles via
//             shared memory (16 x 16 threads, 2 x 2 outputs each); the Nx x Ny matrix is never stored.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"

#include <vector>

namespace fastdd_class_mmd_cuda {
namespace {

using fastdd::AccOf;
using fastdd::acc_scalar_type;

constexpr int kCols = 64;        // columns per block of the segmented reductions
constexpr int kRowStripes = 4;   // row stripes per block of the segmented reductions
constexpr int kTile = 32;        // rows / columns per Gram tile
constexpr int kTileK = 32;       // feature chunk per shared-memory step
constexpr int kMaxBandwidths = 16;


void check_features(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, ": expected a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, name, ": expected a 2-d tensor [N, D], got shape ", x.sizes());
}

void check_labels(const at::Tensor& labels, const at::Tensor& x, const char* name) {
  TORCH_CHECK(labels.device() == x.device(), name, ": on device ", labels.device(), ", expected ", x.device());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), name, ": expected shape [", x.size(0), "], got ",
              labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, name,
              ": expected int64 or int32 labels, got ", labels.scalar_type());
}

void check_pair(const at::Tensor& real, const at::Tensor& syn) {
  check_features(real, "real");
  check_features(syn, "syn");
  TORCH_CHECK(real.device() == syn.device(), "syn: on device ", syn.device(), ", expected ", real.device());
  TORCH_CHECK(real.size(1) == syn.size(1), "syn: feature dimension ", syn.size(1), " does not match real's ",
              real.size(1));
  TORCH_CHECK(real.scalar_type() == syn.scalar_type(), "syn: dtype ", syn.scalar_type(), " does not match real's ",
              real.scalar_type());
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// offsets[c] = first position in `sorted` whose label is >= c, for c in [0, K].
__global__ void class_offsets_kernel(const int64_t* __restrict__ sorted, int64_t n, int64_t K,
                                     int64_t* __restrict__ offsets) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c > K) return;
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted[mid] < c) lo = mid + 1; else hi = mid;
  }
  offsets[c] = lo;
}

struct Grouping {
  at::Tensor sorted;   // int64 [N] labels in class order
  at::Tensor perm;     // int64 [N] row of the input at each sorted position
  at::Tensor offsets;  // int64 [K + 1]
};

Grouping group_by_class(const at::Tensor& labels, int64_t K) {
  Grouping g;
  const at::Tensor l = labels.to(at::kLong).contiguous();
  auto sorted = at::sort(l, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  g.sorted = std::get<0>(sorted).contiguous();
  g.perm = std::get<1>(sorted).contiguous();
  g.offsets = at::empty({K + 1}, l.options());
  const int threads = 256;
  class_offsets_kernel<<<cdiv(K + 1, threads), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      g.sorted.const_data_ptr<int64_t>(), l.numel(), K, g.offsets.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g;
}

template <typename acc_t>
__device__ inline acc_t inverse_count(int64_t n) {
  return n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0);
}

// Sum over the rows [start, stop) of the sorted order for column d, split over threadIdx.y stripes and
// combined through shared memory; returns the full sum on threadIdx.y == 0.
template <typename scalar_t, typename acc_t>
__device__ acc_t class_column_sum(const scalar_t* __restrict__ x, const int64_t* __restrict__ perm, int64_t start,
                                  int64_t stop, int64_t D, int64_t d, acc_t (*shared)[kCols]) {
  acc_t s = 0;
  if (d < D) {
    for (int64_t r = start + threadIdx.y; r < stop; r += kRowStripes) s += static_cast<acc_t>(x[perm[r] * D + d]);
  }
  shared[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.y == 0) {
    for (int y = 0; y < kRowStripes; ++y) total += shared[y][threadIdx.x];
  }
  __syncthreads();
  return total;
}

template <typename scalar_t, typename acc_t>
__global__ void mean_diff_kernel(const scalar_t* __restrict__ real, const int64_t* __restrict__ perm_r,
                                 const int64_t* __restrict__ off_r, const scalar_t* __restrict__ syn,
                                 const int64_t* __restrict__ perm_s, const int64_t* __restrict__ off_s, int64_t D,
                                 acc_t* __restrict__ diff, acc_t* __restrict__ inv_nr, acc_t* __restrict__ inv_ns,
                                 acc_t* __restrict__ partial) {
  __shared__ acc_t shared[kRowStripes][kCols];
  const int64_t c = blockIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kCols + threadIdx.x;
  const int64_t r0 = off_r[c], r1 = off_r[c + 1], s0 = off_s[c], s1 = off_s[c + 1];
  const acc_t sr = class_column_sum<scalar_t, acc_t>(real, perm_r, r0, r1, D, d, shared);
  const acc_t ss = class_column_sum<scalar_t, acc_t>(syn, perm_s, s0, s1, D, d, shared);
  const acc_t ir = inverse_count<acc_t>(r1 - r0), is = inverse_count<acc_t>(s1 - s0);
  acc_t sq = 0;
  if (threadIdx.y == 0 && d < D) {
    const acc_t v = sr * ir - ss * is;
    diff[c * D + d] = v;
    sq = v * v;
  }
  if (threadIdx.y == 0) shared[0][threadIdx.x] = sq;
  __syncthreads();
  if (threadIdx.y == 0 && threadIdx.x == 0) {
    acc_t total = 0;
    for (int i = 0; i < kCols; ++i) total += shared[0][i];
    partial[c * gridDim.y + blockIdx.y] = total;
    if (blockIdx.y == 0) {
      inv_nr[c] = ir;
      inv_ns[c] = is;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void segment_mean_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ perm,
                                    const int64_t* __restrict__ off, int64_t D, scalar_t* __restrict__ out) {
  __shared__ acc_t shared[kRowStripes][kCols];
  const int64_t c = blockIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kCols + threadIdx.x;
  const acc_t s = class_column_sum<scalar_t, acc_t>(x, perm, off[c], off[c + 1], D, d, shared);
  if (threadIdx.y == 0 && d < D) out[c * D + d] = static_cast<scalar_t>(s * inverse_count<acc_t>(off[c + 1] - off[c]));
}

// out = scale * sum(partial) written in out's dtype (one block, fixed order: deterministic).
template <typename acc_t, typename out_t>
__global__ void sum_kernel(const acc_t* __restrict__ partial, int64_t n, acc_t scale, out_t* __restrict__ out) {
  __shared__ acc_t shared[256];
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
  shared[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = static_cast<out_t>(scale * shared[0]);
}

template <typename acc_t, typename out_t>
__global__ void mean_grad_kernel(const acc_t* __restrict__ grad, const acc_t* __restrict__ diff,
                                 const acc_t* __restrict__ inv, const int64_t* __restrict__ labels, int64_t N,
                                 int64_t D, acc_t sign, out_t* __restrict__ out) {
  const acc_t g2 = acc_t(2) * sign * grad[0];
  const int64_t total = N * D;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / D, d = e - i * D;
    const int64_t c = labels[i];
    out[e] = static_cast<out_t>(g2 * inv[c] * diff[c * D + d]);
  }
}

int grid_for(int64_t elements, int threads) {
  const int64_t blocks = cdiv(elements, threads);
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 8));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> class_mmd_fwd(const at::Tensor& real_in,
                                                                         const at::Tensor& real_labels,
                                                                         const at::Tensor& syn_in,
                                                                         const at::Tensor& syn_labels, int64_t K) {
  check_pair(real_in, syn_in);
  check_labels(real_labels, real_in, "real_labels");
  check_labels(syn_labels, syn_in, "syn_labels");
  TORCH_CHECK(K >= 1, "num_classes: must be >= 1, got ", K);
  const c10::cuda::CUDAGuard guard(real_in.device());
  const at::Tensor real = real_in.contiguous(), syn = syn_in.contiguous();
  const int64_t D = real.size(1);
  const auto acc = acc_scalar_type(real.scalar_type());
  const Grouping gr = group_by_class(real_labels, K), gs = group_by_class(syn_labels, K);
  const int64_t nblk = std::max<int64_t>(cdiv(D, kCols), 1);
  TORCH_CHECK(nblk <= 65535, "real: feature dimension too large for the CUDA kernel (", D, ")");
  at::Tensor diff = at::zeros({K, D}, real.options().dtype(acc));
  at::Tensor inv_nr = at::empty({K}, real.options().dtype(acc));
  at::Tensor inv_ns = at::empty({K}, real.options().dtype(acc));
  at::Tensor partial = at::zeros({K * nblk}, real.options().dtype(acc));
  at::Tensor loss = at::empty({}, real.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, real.scalar_type(), "class_mmd_fwd_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(nblk));
    const dim3 block(kCols, kRowStripes);
    mean_diff_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        real.const_data_ptr<scalar_t>(), gr.perm.const_data_ptr<int64_t>(), gr.offsets.const_data_ptr<int64_t>(),
        syn.const_data_ptr<scalar_t>(), gs.perm.const_data_ptr<int64_t>(), gs.offsets.const_data_ptr<int64_t>(), D,
        diff.mutable_data_ptr<acc_t>(), inv_nr.mutable_data_ptr<acc_t>(), inv_ns.mutable_data_ptr<acc_t>(),
        partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_kernel<acc_t, scalar_t><<<1, 256, 0, stream>>>(partial.const_data_ptr<acc_t>(), partial.numel(), acc_t(1),
                                                        loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, diff, inv_nr, inv_ns};
}

std::tuple<at::Tensor, at::Tensor> class_mmd_bwd(const at::Tensor& grad, const at::Tensor& diff_in,
                                                 const at::Tensor& inv_nr, const at::Tensor& inv_ns,
                                                 const at::Tensor& real_labels, const at::Tensor& syn_labels,
                                                 bool need_real, bool need_syn, at::ScalarType dtype) {
  TORCH_CHECK(diff_in.is_cuda() && diff_in.dim() == 2, "diff: expected a CUDA tensor [K, D]");
  TORCH_CHECK(grad.numel() == 1, "grad: expected a scalar gradient, got shape ", grad.sizes());
  const c10::cuda::CUDAGuard guard(diff_in.device());
  const at::Tensor diff = diff_in.contiguous();
  const auto acc = diff.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "diff: expected float32 or float64, got ", acc);
  const int64_t K = diff.size(0), D = diff.size(1);
  const at::Tensor g = grad.reshape({}).to(acc).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto one_side = [&](const at::Tensor& labels_in, const at::Tensor& inv_in, double sign, bool need) {
    const int64_t n = need ? labels_in.size(0) : 0;
    at::Tensor out = at::empty({n, D}, diff.options().dtype(dtype));
    if (n == 0 || D == 0) return out;
    const at::Tensor labels = labels_in.to(at::kLong).contiguous();
    const at::Tensor inv = inv_in.to(acc).contiguous();
    TORCH_CHECK(inv.numel() == K, "inv counts: expected ", K, " entries");
    const int threads = 256;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "class_mmd_bwd_cuda", [&] {
      using out_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(acc, "class_mmd_bwd_cuda_acc", [&] {
        mean_grad_kernel<scalar_t, out_t><<<grid_for(n * D, threads), threads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), diff.const_data_ptr<scalar_t>(), inv.const_data_ptr<scalar_t>(),
            labels.const_data_ptr<int64_t>(), n, D, static_cast<scalar_t>(sign), out.mutable_data_ptr<out_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return out;
  };
  return {one_side(real_labels, inv_nr, 1.0, need_real), one_side(syn_labels, inv_ns, -1.0, need_syn)};
}

at::Tensor class_means(const at::Tensor& x_in, const at::Tensor& labels, int64_t K) {
  check_features(x_in, "x");
  check_labels(labels, x_in, "labels");
  TORCH_CHECK(K >= 1, "num_classes: must be >= 1, got ", K);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t D = x.size(1);
  const Grouping gx = group_by_class(labels, K);
  at::Tensor out = at::empty({K, D}, x.options());
  if (D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_means_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(cdiv(D, kCols)));
    segment_mean_kernel<scalar_t, acc_t><<<grid, dim3(kCols, kRowStripes), 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), gx.perm.const_data_ptr<int64_t>(), gx.offsets.const_data_ptr<int64_t>(), D,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------- Gaussian MMD
template <typename acc_t>
struct Bandwidths {
  acc_t gamma[kMaxBandwidths];  // 1 / (2 sigma^2)
  int n;
};

template <typename scalar_t, typename acc_t>
__global__ void row_norms_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t D, acc_t* __restrict__ out) {
  // one warp per row
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  acc_t s = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const acc_t v = static_cast<acc_t>(x[row * D + d]);
    s += v * v;
  }
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
  if (lane == 0) out[row] = s;
}

// Per-block state of a tile of class-sorted x rows and the matching range of class-sorted y rows.
struct TileRange {
  int64_t row0, rows, lo, hi;
};

__device__ inline TileRange tile_range(const int64_t* __restrict__ x_sorted, int64_t Nx,
                                       const int64_t* __restrict__ y_off) {
  TileRange t;
  t.row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  t.rows = min(static_cast<int64_t>(kTile), Nx - t.row0);
  t.lo = y_off[x_sorted[t.row0]];
  t.hi = y_off[x_sorted[t.row0 + t.rows - 1] + 1];
  return t;
}

// Gram block G[i][j] = x_{row0+i} . y_{j0+j} for a 16 x 16 thread block computing 2 x 2 entries each
// (rows ty and ty + 16, columns tx and tx + 16). xs / ys: shared staging [kTile][kTileK + 1].
template <typename scalar_t, typename acc_t>
__device__ void gram_tile(const scalar_t* __restrict__ x, const int64_t* __restrict__ x_perm, const TileRange& t,
                          const scalar_t* __restrict__ y, const int64_t* __restrict__ y_perm, int64_t j0, int64_t D,
                          acc_t (*xs)[kTileK + 1], acc_t (*ys)[kTileK + 1], acc_t acc[2][2]) {
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) acc[a][b] = 0;
  for (int64_t k0 = 0; k0 < D; k0 += kTileK) {
    for (int e = tid; e < kTile * kTileK; e += 256) {
      const int r = e / kTileK, k = e % kTileK;
      const int64_t d = k0 + k;
      acc_t xv = 0, yv = 0;
      if (r < t.rows && d < D) xv = static_cast<acc_t>(x[x_perm[t.row0 + r] * D + d]);
      if (j0 + r < t.hi && d < D) yv = static_cast<acc_t>(y[y_perm[j0 + r] * D + d]);
      xs[r][k] = xv;
      ys[r][k] = yv;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kTileK; ++k) {
      const acc_t x0 = xs[ty][k], x1 = xs[ty + 16][k], y0 = ys[tx][k], y1 = ys[tx + 16][k];
      acc[0][0] += x0 * y0;
      acc[0][1] += x0 * y1;
      acc[1][0] += x1 * y0;
      acc[1][1] += x1 * y1;
    }
    __syncthreads();
  }
}

template <typename scalar_t, typename acc_t>
__global__ void pair_sum_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ x_perm,
                                const int64_t* __restrict__ x_sorted, const acc_t* __restrict__ x_norms, int64_t Nx,
                                const scalar_t* __restrict__ y, const int64_t* __restrict__ y_perm,
                                const int64_t* __restrict__ y_sorted, const int64_t* __restrict__ y_off,
                                const acc_t* __restrict__ y_norms, int64_t D, const acc_t* __restrict__ w,
                                Bandwidths<acc_t> bw, acc_t* __restrict__ partial) {
  __shared__ acc_t xs[kTile][kTileK + 1];
  __shared__ acc_t ys[kTile][kTileK + 1];
  __shared__ acc_t red[256];
  const TileRange t = tile_range(x_sorted, Nx, y_off);
  const int tx = threadIdx.x, ty = threadIdx.y;
  acc_t total = 0;
  for (int64_t j0 = t.lo; j0 < t.hi; j0 += kTile) {
    acc_t g[2][2];
    gram_tile<scalar_t, acc_t>(x, x_perm, t, y, y_perm, j0, D, xs, ys, g);
    for (int a = 0; a < 2; ++a) {
      const int64_t i = t.row0 + ty + 16 * a;
      if (ty + 16 * a >= t.rows) continue;
      const int64_t ci = x_sorted[i];
      const acc_t ni = x_norms[x_perm[i]];
      for (int b = 0; b < 2; ++b) {
        const int64_t j = j0 + tx + 16 * b;
        if (j >= t.hi || y_sorted[j] != ci) continue;
        const acc_t d2 = max(ni + y_norms[y_perm[j]] - acc_t(2) * g[a][b], acc_t(0));
        acc_t k = 0;
        for (int s = 0; s < bw.n; ++s) k += exp(-bw.gamma[s] * d2);
        total += w[ci] * k;
      }
    }
  }
  const int tid = ty * 16 + tx;
  red[tid] = total;
  __syncthreads();
  for (int stride = 128; stride > 0; stride /= 2) {
    if (tid < stride) red[tid] += red[tid + stride];
    __syncthreads();
  }
  if (tid == 0) partial[blockIdx.x] = red[0];
}

template <typename scalar_t, typename acc_t>
__global__ void pair_grad_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ x_perm,
                                 const int64_t* __restrict__ x_sorted, const acc_t* __restrict__ x_norms, int64_t Nx,
                                 const scalar_t* __restrict__ y, const int64_t* __restrict__ y_perm,
                                 const int64_t* __restrict__ y_sorted, const int64_t* __restrict__ y_off,
                                 const acc_t* __restrict__ y_norms, int64_t D, const acc_t* __restrict__ coef,
                                 Bandwidths<acc_t> bw, acc_t* __restrict__ out) {
  __shared__ acc_t xs[kTile][kTileK + 1];
  __shared__ acc_t ys[kTile][kTileK + 1];
  __shared__ acc_t ws[kTile][kTile + 1];
  __shared__ acc_t rowsum[kTile];
  const TileRange t = tile_range(x_sorted, Nx, y_off);
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
  if (tid < kTile) rowsum[tid] = 0;
  __syncthreads();
  for (int64_t j0 = t.lo; j0 < t.hi; j0 += kTile) {
    acc_t g[2][2];
    gram_tile<scalar_t, acc_t>(x, x_perm, t, y, y_perm, j0, D, xs, ys, g);
    for (int a = 0; a < 2; ++a) {
      const int r = ty + 16 * a;
      const int64_t i = t.row0 + r;
      for (int b = 0; b < 2; ++b) {
        const int cidx = tx + 16 * b;
        const int64_t j = j0 + cidx;
        acc_t wv = 0;
        if (r < t.rows && j < t.hi && y_sorted[j] == x_sorted[i]) {
          const acc_t d2 = max(x_norms[x_perm[i]] + y_norms[y_perm[j]] - acc_t(2) * g[a][b], acc_t(0));
          for (int s = 0; s < bw.n; ++s) wv += acc_t(2) * bw.gamma[s] * exp(-bw.gamma[s] * d2);
          wv *= coef[x_sorted[i]];
        }
        ws[r][cidx] = wv;
      }
    }
    __syncthreads();
    if (tid < kTile) {
      acc_t s = 0;
      for (int c = 0; c < kTile; ++c) s += ws[tid][c];
      rowsum[tid] += s;
    }
    // out[i] -= sum_j W_ij y_j, one feature chunk at a time (this block owns rows row0 .. row0 + rows)
    for (int64_t k0 = 0; k0 < D; k0 += kTileK) {
      for (int e = tid; e < kTile * kTileK; e += 256) {
        const int r = e / kTileK, k = e % kTileK;
        const int64_t d = k0 + k;
        ys[r][k] = (j0 + r < t.hi && d < D) ? static_cast<acc_t>(y[y_perm[j0 + r] * D + d]) : acc_t(0);
      }
      __syncthreads();
      for (int e = tid; e < kTile * kTileK; e += 256) {
        const int r = e / kTileK, k = e % kTileK;
        const int64_t d = k0 + k;
        if (r < t.rows && d < D) {
          acc_t s = 0;
          for (int c = 0; c < kTile; ++c) s += ws[r][c] * ys[c][k];
          out[x_perm[t.row0 + r] * D + d] -= s;
        }
      }
      __syncthreads();
    }
  }
  // out[i] += (sum_j W_ij) x_i
  for (int64_t e = tid; e < kTile * D; e += 256) {
    const int64_t r = e / D;
    const int64_t d = e - r * D;
    if (r < t.rows) {
      const int64_t row = x_perm[t.row0 + r];
      out[row * D + d] += rowsum[r] * static_cast<acc_t>(x[row * D + d]);
    }
  }
}

template <typename acc_t>
Bandwidths<acc_t> make_bandwidths(at::ArrayRef<double> bandwidths) {
  TORCH_CHECK(!bandwidths.empty(), "bandwidths: expected at least one bandwidth");
  TORCH_CHECK(bandwidths.size() <= kMaxBandwidths, "bandwidths: at most ", kMaxBandwidths, " on CUDA, got ",
              bandwidths.size());
  Bandwidths<acc_t> bw{};
  bw.n = static_cast<int>(bandwidths.size());
  for (size_t i = 0; i < bandwidths.size(); ++i) {
    const double s = bandwidths[i];
    TORCH_CHECK(s > 0 && s < INFINITY, "bandwidths: every bandwidth must be a positive finite number, got ", s);
    bw.gamma[i] = static_cast<acc_t>(1.0 / (2.0 * s * s));
  }
  return bw;
}

struct Side {
  at::Tensor x;      // contiguous features
  Grouping g;
  at::Tensor norms;  // acc [N]
  at::Tensor inv;    // acc [K] 1 / count (0 if empty)
};

template <typename scalar_t, typename acc_t>
Side make_side(const at::Tensor& x_in, const at::Tensor& labels, int64_t K, at::ScalarType acc) {
  Side s;
  s.x = x_in.contiguous();
  s.g = group_by_class(labels, K);
  const int64_t N = s.x.size(0), D = s.x.size(1);
  s.norms = at::empty({N}, s.x.options().dtype(acc));
  if (N > 0) {
    row_norms_kernel<scalar_t, acc_t><<<cdiv(N, 8), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s.x.const_data_ptr<scalar_t>(), N, D, s.norms.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor counts = s.g.offsets.narrow(0, 1, K).sub(s.g.offsets.narrow(0, 0, K)).to(acc);
  s.inv = counts.clamp_min(1).reciprocal().mul(counts.gt(0).to(acc)).contiguous();
  return s;
}

at::Tensor gaussian_class_mmd_fwd(const at::Tensor& real_in, const at::Tensor& real_labels, const at::Tensor& syn_in,
                                  const at::Tensor& syn_labels, int64_t K, at::ArrayRef<double> bandwidths) {
  check_pair(real_in, syn_in);
  check_labels(real_labels, real_in, "real_labels");
  check_labels(syn_labels, syn_in, "syn_labels");
  TORCH_CHECK(K >= 1, "num_classes: must be >= 1, got ", K);
  const c10::cuda::CUDAGuard guard(real_in.device());
  const auto acc = acc_scalar_type(real_in.scalar_type());
  const int64_t D = real_in.size(1);
  at::Tensor loss = at::empty({}, real_in.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, real_in.scalar_type(), "gaussian_class_mmd_fwd_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const auto bw = make_bandwidths<acc_t>(bandwidths);
    const Side R = make_side<scalar_t, acc_t>(real_in, real_labels, K, acc);
    const Side S = make_side<scalar_t, acc_t>(syn_in, syn_labels, K, acc);
    const int64_t nr = R.x.size(0), ns = S.x.size(0);
    const int64_t br = cdiv(nr, kTile), bs = cdiv(ns, kTile);
    at::Tensor partial = at::zeros({2 * br + bs}, R.x.options().dtype(acc));
    struct Term {
      const Side* a;
      const Side* b;
      at::Tensor w;
      int64_t offset;
    };
    const Term terms[3] = {{&R, &R, R.inv.mul(R.inv), 0}, {&S, &S, S.inv.mul(S.inv), br},
                           {&R, &S, R.inv.mul(S.inv).mul(-2.0), br + bs}};
    for (const Term& term : terms) {
      const int64_t nx = term.a->x.size(0), ny = term.b->x.size(0);
      if (nx == 0 || ny == 0) continue;
      const at::Tensor w = term.w.contiguous();
      pair_sum_kernel<scalar_t, acc_t><<<cdiv(nx, kTile), dim3(16, 16), 0, stream>>>(
          term.a->x.const_data_ptr<scalar_t>(), term.a->g.perm.const_data_ptr<int64_t>(),
          term.a->g.sorted.const_data_ptr<int64_t>(), term.a->norms.const_data_ptr<acc_t>(), nx,
          term.b->x.const_data_ptr<scalar_t>(), term.b->g.perm.const_data_ptr<int64_t>(),
          term.b->g.sorted.const_data_ptr<int64_t>(), term.b->g.offsets.const_data_ptr<int64_t>(),
          term.b->norms.const_data_ptr<acc_t>(), D, w.const_data_ptr<acc_t>(), bw,
          partial.mutable_data_ptr<acc_t>() + term.offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    sum_kernel<acc_t, scalar_t><<<1, 256, 0, stream>>>(partial.const_data_ptr<acc_t>(), partial.numel(), acc_t(1),
                                                        loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> gaussian_class_mmd_bwd(const at::Tensor& grad, const at::Tensor& real_in,
                                                          const at::Tensor& real_labels, const at::Tensor& syn_in,
                                                          const at::Tensor& syn_labels, int64_t K,
                                                          at::ArrayRef<double> bandwidths, bool need_real,
                                                          bool need_syn) {
  check_pair(real_in, syn_in);
  check_labels(real_labels, real_in, "real_labels");
  check_labels(syn_labels, syn_in, "syn_labels");
  TORCH_CHECK(grad.numel() == 1, "grad: expected a scalar gradient, got shape ", grad.sizes());
  TORCH_CHECK(K >= 1, "num_classes: must be >= 1, got ", K);
  const c10::cuda::CUDAGuard guard(real_in.device());
  const auto acc = acc_scalar_type(real_in.scalar_type());
  const int64_t D = real_in.size(1);
  at::Tensor out_r, out_s;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, real_in.scalar_type(), "gaussian_class_mmd_bwd_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const auto bw = make_bandwidths<acc_t>(bandwidths);
    const Side R = make_side<scalar_t, acc_t>(real_in, real_labels, K, acc);
    const Side S = make_side<scalar_t, acc_t>(syn_in, syn_labels, K, acc);
    const at::Tensor g = grad.reshape({}).to(acc);
    // d/dx_i = sum over the two terms containing x of coef[c] (sum_j W_ij x_i - sum_j W_ij y_j)
    const at::Tensor c_cross = R.inv.mul(S.inv).mul(g).mul(2.0).contiguous();
    auto side_grad = [&](const Side& X, const Side& Y, bool need) {
      const int64_t nx = need ? X.x.size(0) : 0;
      at::Tensor acc_out = at::zeros({nx, D}, X.x.options().dtype(acc));
      if (nx == 0 || D == 0) return acc_out.to(X.x.scalar_type());
      const at::Tensor c_self = X.inv.mul(X.inv).mul(g).mul(-2.0).contiguous();
      const std::pair<const Side*, const at::Tensor*> terms[2] = {{&X, &c_self}, {&Y, &c_cross}};
      for (const auto& term : terms) {
        const Side& Z = *term.first;
        if (Z.x.size(0) == 0) continue;
        pair_grad_kernel<scalar_t, acc_t><<<cdiv(nx, kTile), dim3(16, 16), 0, stream>>>(
            X.x.const_data_ptr<scalar_t>(), X.g.perm.const_data_ptr<int64_t>(), X.g.sorted.const_data_ptr<int64_t>(),
            X.norms.const_data_ptr<acc_t>(), nx, Z.x.const_data_ptr<scalar_t>(), Z.g.perm.const_data_ptr<int64_t>(),
            Z.g.sorted.const_data_ptr<int64_t>(), Z.g.offsets.const_data_ptr<int64_t>(),
            Z.norms.const_data_ptr<acc_t>(), D, term.second->const_data_ptr<acc_t>(), bw,
            acc_out.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return acc_out.to(X.x.scalar_type());
    };
    out_r = side_grad(R, S, need_real);
    out_s = side_grad(S, R, need_syn);
  });
  return {out_r, out_s};
}

}  // namespace
}  // namespace fastdd_class_mmd_cuda

#ifdef FASTDD_WITH_CUDA
TORCH_LIBRARY_IMPL(fastdd_C, CUDA, m) {
  m.impl("class_mmd_fwd", &fastdd_class_mmd_cuda::class_mmd_fwd);
  m.impl("class_mmd_bwd", &fastdd_class_mmd_cuda::class_mmd_bwd);
  m.impl("class_means", &fastdd_class_mmd_cuda::class_means);
  m.impl("gaussian_class_mmd_fwd", &fastdd_class_mmd_cuda::gaussian_class_mmd_fwd);
  m.impl("gaussian_class_mmd_bwd", &fastdd_class_mmd_cuda::gaussian_class_mmd_bwd);
}
#endif
