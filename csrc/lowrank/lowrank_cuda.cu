// Low-rank image reconstruction: CUDA kernels (registered for the CUDA dispatch key of the `fastdd_C`
// ops whose schemas lowrank_cpu.cpp defines). Same contracts as the CPU kernels: A [N, C, H, r],
// B [N, C, r, W], X / dX [N, C, H, W], P = N * C planes; fp32/fp16/bf16 (and fp64) inputs, accumulation
// in float (double for double). Deterministic: no floating-point atomics.
//
//   fwd_kernel  grid (P, cdiv(H, 8), cdiv(W, 32)), block (32, 8): one thread per X element; the A row is
//               a broadcast read within a warp, the B row a coalesced one (both stay in L1/L2; the op is
//               bound by writing X).
//   bwd_kernel  grid (P, cdiv(W, 32), cdiv(r, 16)), block (32, 8): a block owns a 32-column strip of one
//               plane and a chunk of up to 16 ranks. Thread (tx, ty) holds B[chunk, j] for its column j in
//               registers and walks rows i = ty, ty + 8, ...; each dX[i, j] is read once and gives
//                 * dB[chunk, j] += A[i, chunk] dX[i, j]   (register accumulators, summed over the 8 row
//                   stripes through shared memory at the end),
//                 * dA[i, chunk]  = sum_j dX[i, j] B[chunk, j] over the strip (warp shuffle reduction);
//                   with W <= 32 that is the whole row, otherwise a partial written to an acc-precision
//                   workspace [cdiv(W, 32), P, H, r] and summed in a fixed order afterwards.
//               Ranks above 16 take more rank chunks, each reading dX once more.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "lowrank_args.h"

namespace fastdd_lowrank_cuda {
namespace {

using fastdd::AccOf;

constexpr int kStrip = 32;   // columns per block (one warp wide)
constexpr int kStripes = 8;  // row stripes per block
constexpr int kRankChunk = 16;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_factors(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.is_cuda(), "factor_a: expected a CUDA tensor, got ", a.device());
  TORCH_CHECK(b.device() == a.device(), "factor_b: on device ", b.device(), ", expected factor_a's ", a.device());
  fastdd_lowrank::check_factor_shapes(a, b);
  TORCH_CHECK(a.size(2) <= 65535 * 8 && b.size(3) <= 65535 * 32, "image planes larger than the launch grid");
}

template <typename scalar_t, typename acc_t>
__global__ void fwd_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ B, scalar_t* __restrict__ X,
                           int64_t H, int64_t W, int64_t r) {
  const int64_t p = blockIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kStripes + threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.z) * kStrip + threadIdx.x;
  if (i >= H || j >= W) return;
  const scalar_t* a = A + (p * H + i) * r;
  const scalar_t* b = B + p * r * W + j;
  acc_t s = 0;
  for (int64_t k = 0; k < r; ++k) s += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k * W]);
  X[(p * H + i) * W + j] = static_cast<scalar_t>(s);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kStrip / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// da_out: dA itself (split == false, written in scalar_t) or the acc_t workspace [n_strips, P, H, r].
template <typename scalar_t, typename acc_t>
__global__ void bwd_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ A,
                           const scalar_t* __restrict__ B, scalar_t* __restrict__ dA, acc_t* __restrict__ dA_split,
                           scalar_t* __restrict__ dB, int64_t P, int64_t H, int64_t W, int64_t r) {
  __shared__ acc_t db_smem[kStripes][kRankChunk][kStrip];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t p = blockIdx.x;
  const int64_t strip = blockIdx.y;
  const int64_t k0 = static_cast<int64_t>(blockIdx.z) * kRankChunk;
  const int kc = static_cast<int>(r - k0 < kRankChunk ? r - k0 : kRankChunk);
  const int64_t j = strip * kStrip + tx;
  const bool col_ok = j < W;
  const bool need_a = dA != nullptr || dA_split != nullptr;
  const bool need_b = dB != nullptr;

  acc_t b_reg[kRankChunk];
  acc_t db_acc[kRankChunk];
#pragma unroll
  for (int k = 0; k < kRankChunk; ++k) {
    b_reg[k] = (k < kc && col_ok) ? static_cast<acc_t>(B[(p * r + k0 + k) * W + j]) : acc_t(0);
    db_acc[k] = 0;
  }
  const scalar_t* a_plane = A + p * H * r + k0;
  for (int64_t i = ty; i < H; i += kStripes) {
    const acc_t g = col_ok ? static_cast<acc_t>(G[(p * H + i) * W + j]) : acc_t(0);  // the one read of dX
    const scalar_t* a_row = a_plane + i * r;
#pragma unroll
    for (int k = 0; k < kRankChunk; ++k) {
      if (k < kc) {
        if (need_b) db_acc[k] += static_cast<acc_t>(a_row[k]) * g;
        if (need_a) {
          const acc_t part = warp_sum(g * b_reg[k]);
          if (tx == 0) {
            if (dA_split != nullptr)
              dA_split[((strip * P + p) * H + i) * r + k0 + k] = part;
            else
              dA[(p * H + i) * r + k0 + k] = static_cast<scalar_t>(part);
          }
        }
      }
    }
  }
  if (!need_b) return;
#pragma unroll
  for (int k = 0; k < kRankChunk; ++k) db_smem[ty][k][tx] = db_acc[k];
  __syncthreads();
  // 8 x 32 threads write the kc x 32 outputs of the strip, each summing the 8 stripes in a fixed order
  for (int idx = ty * kStrip + tx; idx < kc * kStrip; idx += kStripes * kStrip) {
    const int k = idx / kStrip, c = idx % kStrip;
    const int64_t jj = strip * kStrip + c;
    if (jj >= W) continue;
    acc_t s = 0;
#pragma unroll
    for (int t = 0; t < kStripes; ++t) s += db_smem[t][k][c];
    dB[(p * r + k0 + k) * W + jj] = static_cast<scalar_t>(s);
  }
}

at::Tensor lowrank_fwd(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_factors(a_in, b_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), r = a.size(3), W = b.size(3);
  at::Tensor x = at::empty({N, C, H, W}, a.options());
  if (x.numel() == 0) return x;
  const dim3 block(kStrip, kStripes);
  const dim3 grid(static_cast<unsigned>(N * C), static_cast<unsigned>(cdiv(H, kStripes)),
                  static_cast<unsigned>(cdiv(W, kStrip)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lowrank_fwd_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    fwd_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                                             x.mutable_data_ptr<scalar_t>(), H, W, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return x;
}

std::tuple<at::Tensor, at::Tensor> lowrank_bwd(const at::Tensor& grad_in, const at::Tensor& a_in,
                                               const at::Tensor& b_in, bool need_a, bool need_b) {
  check_factors(a_in, b_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const int64_t N = a_in.size(0), C = a_in.size(1), H = a_in.size(2), r = a_in.size(3), W = b_in.size(3);
  const int64_t P = N * C;
  TORCH_CHECK(grad_in.device() == a_in.device(), "grad: on device ", grad_in.device(), ", expected ", a_in.device());
  fastdd_lowrank::check_grad_shape(grad_in, a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor g = grad_in.to(a.scalar_type()).contiguous();
  at::Tensor da = need_a ? at::empty_like(a) : at::empty({0}, a.options());
  at::Tensor db = need_b ? at::empty_like(b) : at::empty({0}, b.options());
  if ((!need_a && !need_b) || P == 0) return {da, db};
  if (H == 0 || W == 0) {
    if (need_a) da.zero_();
    if (need_b) db.zero_();
    return {da, db};
  }
  const int64_t n_strips = cdiv(W, kStrip);
  const bool split = need_a && n_strips > 1;
  const auto acc_type = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor ws = split ? at::empty({n_strips, N, C, H, r}, a.options().dtype(acc_type)) : at::Tensor();
  const dim3 block(kStrip, kStripes);
  const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(n_strips),
                  static_cast<unsigned>(cdiv(r, kRankChunk)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lowrank_bwd_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    bwd_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        (need_a && !split) ? da.mutable_data_ptr<scalar_t>() : nullptr,
        split ? ws.mutable_data_ptr<acc_t>() : nullptr, need_b ? db.mutable_data_ptr<scalar_t>() : nullptr, P, H, W,
        r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (split) da.copy_(at::sum(ws, {0}));
  return {da, db};
}

}  // namespace
}  // namespace fastdd_lowrank_cuda

#ifdef FASTDD_WITH_CUDA
TORCH_LIBRARY_IMPL(fastdd_C, CUDA, m) {
  m.impl("lowrank_fwd", &fastdd_lowrank_cuda::lowrank_fwd);
  m.impl("lowrank_bwd", &fastdd_lowrank_cuda::lowrank_bwd);
}
#endif
