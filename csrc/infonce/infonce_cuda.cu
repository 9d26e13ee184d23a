// InfoNCE / binary NCE: CUDA kernels for the CUDA dispatch key of the `fastdd_C::infonce_*` ops whose
// schemas infonce_cpu.cpp defines. Same contracts as the CPU kernels (see there and fastdd/ops/infonce.py);
// fp32 / fp16 / bf16 (and fp64) inputs, accumulation in float (double for double inputs). Deterministic:
// every output element is written by one thread, no floating-point atomics.
//
//   fwd_kernel  grid cdiv(Ns, BM), 256 threads: a BM-row block of anchors against every BM x BM tile of real
//               rows. Tiles of raw dot products come from shared-memory chunks of kBK features (each thread
//               a (BM/16) x (BM/16) micro-tile), are staged in shared memory and consumed by TPR = 256/BM
//               threads per anchor row, each keeping its own online max / sum of exponentials (or softplus
//               sums) over all tiles; the TPR partial states are merged by warp shuffles at the end.
//   bwd_kernel  grid cdiv(Na, BM): output rows a (syn rows for dZ_s, real rows for dZ_r) against every
//               tile of the other side b: recompute the tile, P = dS * scale_b / tau in shared memory, then
//               out[a, d-chunk] += P @ b[tile, d-chunk] per BM-wide feature chunk (read-modify-write of the
//               block's own fp32 output rows). The Ns x Nr matrix is never stored.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "infonce_args.h"

#include <cmath>

namespace fastdd_infonce_cuda {
namespace {

using fastdd::AccOf;
using fastdd::acc_scalar_type;

constexpr int kThreads = 256;
constexpr int kBK = 16;  // features per shared-memory chunk of the dot-product tiles

// Tile edge: 64 for float accumulation, 32 for double (shared memory stays under 48 KB).
template <typename acc_t>
struct TileOf {
  static constexpr int BM = sizeof(acc_t) == 8 ? 32 : 64;
  static constexpr int MT = BM / 16;         // micro-tile edge per thread (16 x 16 thread grid)
  static constexpr int TPR = kThreads / BM;  // threads per anchor row in the forward statistics
};

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float dexp(float x) { return __expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dlog1p(double x) { return log1p(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t softplus(acc_t x) {
  return (x > acc_t(0) ? x : acc_t(0)) + dlog1p(dexp(-fabs(x)));
}

// acc[r][c] = a[a0 + ty + 16 r] . b[b0 + tx + 16 c] (raw rows; zero outside the matrices).
template <typename scalar_t, typename acc_t>
__device__ void dot_tile(const scalar_t* __restrict__ a, int64_t a0, int64_t Na, const scalar_t* __restrict__ b,
                         int64_t b0, int64_t Nb, int64_t D, acc_t (*As)[TileOf<acc_t>::BM],
                         acc_t (*Bs)[TileOf<acc_t>::BM], acc_t acc[TileOf<acc_t>::MT][TileOf<acc_t>::MT]) {
  constexpr int BM = TileOf<acc_t>::BM, MT = TileOf<acc_t>::MT;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
#pragma unroll
  for (int r = 0; r < MT; ++r)
#pragma unroll
    for (int c = 0; c < MT; ++c) acc[r][c] = acc_t(0);
  for (int64_t k0 = 0; k0 < D; k0 += kBK) {
    for (int e = tid; e < kBK * BM; e += kThreads) {
      const int r = e / kBK, k = e % kBK;
      const bool kin = k0 + k < D;
      As[k][r] = (kin && a0 + r < Na) ? static_cast<acc_t>(a[(a0 + r) * D + k0 + k]) : acc_t(0);
      Bs[k][r] = (kin && b0 + r < Nb) ? static_cast<acc_t>(b[(b0 + r) * D + k0 + k]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      acc_t av[MT], bv[MT];
#pragma unroll
      for (int r = 0; r < MT; ++r) av[r] = As[k][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < MT; ++c) bv[c] = Bs[k][tx + 16 * c];
#pragma unroll
      for (int r = 0; r < MT; ++r)
#pragma unroll
        for (int c = 0; c < MT; ++c) acc[r][c] += av[r] * bv[c];
    }
    __syncthreads();
  }
}

template <typename scalar_t, typename acc_t, int FORM>
__global__ void __launch_bounds__(kThreads) fwd_kernel(
    const scalar_t* __restrict__ syn, const int64_t* __restrict__ sl, const acc_t* __restrict__ ss,
    const scalar_t* __restrict__ real, const int64_t* __restrict__ rl, const acc_t* __restrict__ rs,
    const acc_t* __restrict__ w, const acc_t* __restrict__ logc, acc_t* __restrict__ row_out,
    acc_t* __restrict__ lse_out, int64_t Ns, int64_t Nr, int64_t D, acc_t inv_tau) {
  constexpr int BM = TileOf<acc_t>::BM, MT = TileOf<acc_t>::MT, TPR = TileOf<acc_t>::TPR;
  __shared__ acc_t As[kBK][BM];
  __shared__ acc_t Bs[kBK][BM];
  __shared__ acc_t S[BM][BM + 1];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int row = tid / TPR, part = tid % TPR;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM, i = i0 + row;
  const bool active = i < Ns;
  const acc_t a = active ? ss[i] * inv_tau : acc_t(0);
  const int64_t lab = active ? sl[i] : -1;
  const acc_t lc = active ? logc[i] : acc_t(0);
  const acc_t neg_inf = -INFINITY;
  acc_t m = neg_inf, l = 0, tpos = 0, tneg = 0;
  acc_t acc[MT][MT];
  for (int64_t j0 = 0; j0 < Nr; j0 += BM) {
    dot_tile<scalar_t, acc_t>(syn, i0, Ns, real, j0, Nr, D, As, Bs, acc);
#pragma unroll
    for (int r = 0; r < MT; ++r)
#pragma unroll
      for (int c = 0; c < MT; ++c) S[ty + 16 * r][tx + 16 * c] = acc[r][c];
    __syncthreads();
    if (active) {
      for (int c = part; c < BM; c += TPR) {
        const int64_t j = j0 + c;
        if (j >= Nr) break;
        const acc_t s = S[row][c] * a * rs[j];
        const bool pos = rl[j] == lab;
        if (FORM == 0) {
          if (s > m) {
            l = l * dexp(m - s) + acc_t(1);
            m = s;
          } else {
            l += dexp(s - m);
          }
          if (pos) tpos += s;
        } else {
          if (pos) tpos += softplus(lc - s);
          else tneg += softplus(s - lc);
        }
      }
    }
    __syncthreads();
  }
  // merge the TPR partial states of a row (consecutive lanes of one warp)
#pragma unroll
  for (int off = TPR / 2; off > 0; off /= 2) {
    const acc_t m_o = __shfl_xor_sync(0xffffffffu, m, off);
    const acc_t l_o = __shfl_xor_sync(0xffffffffu, l, off);
    tpos += __shfl_xor_sync(0xffffffffu, tpos, off);
    tneg += __shfl_xor_sync(0xffffffffu, tneg, off);
    const acc_t mm = m > m_o ? m : m_o;
    if (mm != neg_inf) l = (m != neg_inf ? l * dexp(m - mm) : acc_t(0)) + (m_o != neg_inf ? l_o * dexp(m_o - mm) : acc_t(0));
    m = mm;
  }
  if (active && part == 0) {
    const acc_t v = w[i], u = w[Ns + i];
    if (FORM == 0) {
      const acc_t lse = m + log(l);
      lse_out[i] = lse;
      row_out[i] = u * lse - v * tpos;
    } else {
      lse_out[i] = acc_t(0);
      row_out[i] = v * tpos + u * tneg;
    }
  }
}

// out[a rows] += sum over b tiles of (dS * scale_b / tau) @ b; per-anchor statistics indexed by the a rows
// (SYN_ROWS) or the b columns.
template <typename scalar_t, typename acc_t, int FORM, bool SYN_ROWS>
__global__ void __launch_bounds__(kThreads) bwd_kernel(
    const scalar_t* __restrict__ A, const int64_t* __restrict__ al, const acc_t* __restrict__ as,
    const scalar_t* __restrict__ B, const int64_t* __restrict__ bl, const acc_t* __restrict__ bs,
    const acc_t* __restrict__ w, const acc_t* __restrict__ logc, const acc_t* __restrict__ lse,
    acc_t* __restrict__ out, int64_t Na, int64_t Nb, int64_t D, int64_t Ns, acc_t inv_tau) {
  constexpr int BM = TileOf<acc_t>::BM, MT = TileOf<acc_t>::MT;
  __shared__ acc_t As[kBK][BM];
  __shared__ acc_t Bs[kBK][BM];
  __shared__ acc_t P[BM][BM + 1];
  __shared__ acc_t Bt[BM][BM + 1];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * BM;
  acc_t acc[MT][MT];
  for (int64_t j0 = 0; j0 < Nb; j0 += BM) {
    dot_tile<scalar_t, acc_t>(A, a0, Na, B, j0, Nb, D, As, Bs, acc);
#pragma unroll
    for (int r = 0; r < MT; ++r) {
#pragma unroll
      for (int c = 0; c < MT; ++c) {
        const int64_t i = a0 + ty + 16 * r, j = j0 + tx + 16 * c;
        acc_t p = 0;
        if (i < Na && j < Nb) {
          const acc_t s = acc[r][c] * as[i] * bs[j] * inv_tau;
          const int64_t k = SYN_ROWS ? i : j;
          const bool pos = al[i] == bl[j];
          acc_t ds;
          if (FORM == 0) {
            ds = w[Ns + k] * dexp(s - lse[k]) - (pos ? w[k] : acc_t(0));
          } else {
            const acc_t h = acc_t(1) / (acc_t(1) + dexp(logc[k] - s));
            ds = pos ? -w[k] * (acc_t(1) - h) : w[Ns + k] * h;
          }
          p = ds * bs[j] * inv_tau;
        }
        P[ty + 16 * r][tx + 16 * c] = p;
      }
    }
    __syncthreads();
    for (int64_t d0 = 0; d0 < D; d0 += BM) {
      for (int e = tid; e < BM * BM; e += kThreads) {
        const int k = e / BM, dd = e % BM;
        Bt[k][dd] = (j0 + k < Nb && d0 + dd < D) ? static_cast<acc_t>(B[(j0 + k) * D + d0 + dd]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < MT; ++r) {
#pragma unroll
        for (int c = 0; c < MT; ++c) {
          const int64_t i = a0 + ty + 16 * r, d = d0 + tx + 16 * c;
          acc_t sum = 0;
#pragma unroll 8
          for (int k = 0; k < BM; ++k) sum += P[ty + 16 * r][k] * Bt[k][tx + 16 * c];
          if (i < Na && d < D) out[i * D + d] += sum;
        }
      }
      __syncthreads();
    }
  }
}

struct Inputs {
  at::Tensor syn, real, sl, rl, ss, rs, w, logc;
  int64_t Ns, Nr, D;
};

Inputs prepare(const at::Tensor& syn, const at::Tensor& syn_labels, const at::Tensor& real,
               const at::Tensor& real_labels, const at::Tensor& syn_scale, const at::Tensor& real_scale,
               const at::Tensor& weights, const at::Tensor& logc, double tau, int64_t form) {
  TORCH_CHECK(syn.is_cuda(), "syn: expected a CUDA tensor, got ", syn.device());
  TORCH_CHECK(real.device() == syn.device(), "real: on device ", real.device(), ", expected ", syn.device());
  fastdd_infonce::check_infonce_args(syn, real, weights, tau, form);
  Inputs in;
  in.Ns = syn.size(0);
  in.Nr = real.size(0);
  in.D = syn.size(1);
  const auto acc = acc_scalar_type(syn.scalar_type());
  TORCH_CHECK(syn_labels.numel() == in.Ns && real_labels.numel() == in.Nr, "syn_labels/real_labels: one label per row");
  TORCH_CHECK(syn_scale.numel() == in.Ns && real_scale.numel() == in.Nr && logc.numel() == in.Ns,
              "syn_scale/real_scale/logc: one entry per row");
  in.syn = syn.contiguous();
  in.real = real.contiguous();
  in.sl = syn_labels.to(at::kLong).contiguous();
  in.rl = real_labels.to(at::kLong).contiguous();
  in.ss = syn_scale.to(acc).contiguous();
  in.rs = real_scale.to(acc).contiguous();
  in.w = weights.to(acc).contiguous();
  in.logc = logc.to(acc).contiguous();
  return in;
}

std::tuple<at::Tensor, at::Tensor> infonce_fwd(const at::Tensor& syn, const at::Tensor& syn_labels,
                                               const at::Tensor& real, const at::Tensor& real_labels,
                                               const at::Tensor& syn_scale, const at::Tensor& real_scale,
                                               const at::Tensor& weights, const at::Tensor& logc, double tau,
                                               int64_t form) {
  const c10::cuda::CUDAGuard guard(syn.device());
  const Inputs in = prepare(syn, syn_labels, real, real_labels, syn_scale, real_scale, weights, logc, tau, form);
  const auto acc = acc_scalar_type(syn.scalar_type());
  at::Tensor row = at::empty({in.Ns}, in.syn.options().dtype(acc));
  at::Tensor lse = at::empty({in.Ns}, in.syn.options().dtype(acc));
  if (in.Ns == 0) return {row, lse};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.syn.scalar_type(), "infonce_fwd_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const int64_t grid = cdiv(in.Ns, TileOf<acc_t>::BM);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(
          in.syn.const_data_ptr<scalar_t>(), in.sl.const_data_ptr<int64_t>(), in.ss.const_data_ptr<acc_t>(),
          in.real.const_data_ptr<scalar_t>(), in.rl.const_data_ptr<int64_t>(), in.rs.const_data_ptr<acc_t>(),
          in.w.const_data_ptr<acc_t>(), in.logc.const_data_ptr<acc_t>(), row.mutable_data_ptr<acc_t>(),
          lse.mutable_data_ptr<acc_t>(), in.Ns, in.Nr, in.D, static_cast<acc_t>(1.0 / tau));
    };
    if (form == 0) launch(fwd_kernel<scalar_t, acc_t, 0>);
    else launch(fwd_kernel<scalar_t, acc_t, 1>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {row, lse};
}

std::tuple<at::Tensor, at::Tensor> infonce_bwd(const at::Tensor& syn, const at::Tensor& syn_labels,
                                               const at::Tensor& real, const at::Tensor& real_labels,
                                               const at::Tensor& syn_scale, const at::Tensor& real_scale,
                                               const at::Tensor& weights, const at::Tensor& logc,
                                               const at::Tensor& lse_in, double tau, int64_t form, bool need_syn,
                                               bool need_real) {
  const c10::cuda::CUDAGuard guard(syn.device());
  const Inputs in = prepare(syn, syn_labels, real, real_labels, syn_scale, real_scale, weights, logc, tau, form);
  const auto acc = acc_scalar_type(syn.scalar_type());
  TORCH_CHECK(lse_in.numel() == in.Ns, "lse: expected ", in.Ns, " entries");
  const at::Tensor lse = lse_in.to(acc).contiguous();
  const auto opts = in.syn.options().dtype(acc);
  at::Tensor dzs = need_syn ? at::zeros({in.Ns, in.D}, opts) : at::empty({0, in.D}, opts);
  at::Tensor dzr = need_real ? at::zeros({in.Nr, in.D}, opts) : at::empty({0, in.D}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.syn.scalar_type(), "infonce_bwd_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    constexpr int BM = TileOf<acc_t>::BM;
    const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
    auto launch = [&](auto kernel, const at::Tensor& A, const at::Tensor& al, const at::Tensor& as,
                      const at::Tensor& B, const at::Tensor& bl, const at::Tensor& bs, at::Tensor& out) {
      const int64_t Na = A.size(0);
      if (Na == 0 || B.size(0) == 0) return;
      kernel<<<cdiv(Na, BM), kThreads, 0, stream>>>(
          A.const_data_ptr<scalar_t>(), al.const_data_ptr<int64_t>(), as.const_data_ptr<acc_t>(),
          B.const_data_ptr<scalar_t>(), bl.const_data_ptr<int64_t>(), bs.const_data_ptr<acc_t>(),
          in.w.const_data_ptr<acc_t>(), in.logc.const_data_ptr<acc_t>(), lse.const_data_ptr<acc_t>(),
          out.mutable_data_ptr<acc_t>(), Na, B.size(0), in.D, in.Ns, inv_tau);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (need_syn) {
      if (form == 0) launch(bwd_kernel<scalar_t, acc_t, 0, true>, in.syn, in.sl, in.ss, in.real, in.rl, in.rs, dzs);
      else launch(bwd_kernel<scalar_t, acc_t, 1, true>, in.syn, in.sl, in.ss, in.real, in.rl, in.rs, dzs);
    }
    if (need_real) {
      if (form == 0) launch(bwd_kernel<scalar_t, acc_t, 0, false>, in.real, in.rl, in.rs, in.syn, in.sl, in.ss, dzr);
      else launch(bwd_kernel<scalar_t, acc_t, 1, false>, in.real, in.rl, in.rs, in.syn, in.sl, in.ss, dzr);
    }
  });
  return {dzs, dzr};
}

}  // namespace
}  // namespace fastdd_infonce_cuda

#ifdef FASTDD_WITH_CUDA
TORCH_LIBRARY_IMPL(fastdd_C, CUDA, m) {
  m.impl("infonce_fwd", &fastdd_infonce_cuda::infonce_fwd);
  m.impl("infonce_bwd", &fastdd_infonce_cuda::infonce_bwd);
}
#endif
