// Eval-mode BatchNorm with the batch statistics of its input, CPU (C++ / OpenMP through at::parallel_for).
//
// Raw kernels registered as torch.ops.fastdd_C.bn_eval_stats*; the op layer (fastdd/ops/bn_eval_stats.py)
// folds the BatchNorm parameters into scale / shift, builds the backward coefficients and registers
// autograd / fake / compile. Contracts (x float32 or float64; scale, shift, c0, c1 [C] in x's dtype):
//
//   bn_eval_stats(x [N, C, H, W], scale [C], shift [C]) -> (y [N, C, H, W], stats [C, 2])
//       y = scale[c] * x + shift[c] in x's layout (channels_last stays channels_last, anything else is
//       made NCHW-contiguous), stats[c] = (mean, biased variance) of x over (N, H, W) in double then cast
//       to x's dtype: one pass over x that reads it once and writes y once.
//   bn_eval_stats_backward(gy [N, C, H, W], x, scale, c0 [C], c1 [C]) -> dx
//       dx = (c0[c] + c1[c] * x) + scale[c] * gy in x's layout: the BatchNorm gradient and the statistics'
//       gradient (c1 = 2 g_var / M, c0 = g_mean / M - c1 * mean, M = N*H*W) in one pass, no separate add.
//
// Deterministic: fixed row blocks (channels_last) or rows (NCHW) reduced in double, combined in a fixed
// order; no FMA contraction (-ffp-contract=off). Inner loops: bn_eval_stats_cpu_kernels.h, once per SIMD path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <tuple>
#include <vector>

#include "../common.h"

#define FASTDD_ISA_HEADER "bn_eval_stats/bn_eval_stats_cpu_kernels.h"
#include "../isa_variants.h"

namespace fastdd_bn_eval_stats {
namespace {

using at::Tensor;

#define BES_ISA_CALL(...) FASTDD_ISA_DISPATCH(fastdd_bn_eval_stats, __VA_ARGS__)

// channels_last-contiguous and not also NCHW-contiguous (a dense NCHW map takes the row path).
bool channels_last_only(const Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_args(const Tensor& x, const Tensor& v, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), "bn_eval_stats: ", name, " must be [C] = [", x.size(1),
              "], got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), "bn_eval_stats: ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", v.scalar_type());
}

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& x_in, const Tensor& scale_in, const Tensor& shift_in) {
  TORCH_CHECK(x_in.dim() == 4, "bn_eval_stats: x must be [N, C, H, W], got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "bn_eval_stats: x must be float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.numel() > 0, "bn_eval_stats: x must not be empty");
  check_args(x_in, scale_in, "scale");
  check_args(x_in, shift_in, "shift");
  const bool cl = channels_last_only(x_in);
  const Tensor x = cl ? x_in : x_in.contiguous();
  const Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  Tensor y = at::empty_like(x, cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  std::vector<double> stats(static_cast<size_t>(2 * C));
  if (cl) {
    const int64_t M = N * P;
    const int64_t nb = (M + isa_scalar::kRows - 1) / isa_scalar::kRows;  // the same on every path
    std::vector<double> part(static_cast<size_t>(nb * 2 * C));
    std::vector<double> sh(static_cast<size_t>(C));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_eval_stats_cl", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) sh[c] = static_cast<double>(xp[c]);
      BES_ISA_CALL(cols_forward<scalar_t>(xp, y.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                                          shift.data_ptr<scalar_t>(), sh.data(), part.data(), M, C));
    });
    for (int64_t c = 0; c < C; ++c) {
      double t1 = 0.0, t2 = 0.0;
      for (int64_t blk = 0; blk < nb; ++blk) {
        t1 += part[blk * 2 * C + c];
        t2 += part[blk * 2 * C + C + c];
      }
      const double dm = t1 / static_cast<double>(M);
      stats[2 * c] = sh[c] + dm;
      stats[2 * c + 1] = std::max(0.0, t2 / static_cast<double>(M) - dm * dm);
    }
  } else {
    std::vector<double> rowstats(static_cast<size_t>(2 * N * C));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_eval_stats_nchw", [&] {
      BES_ISA_CALL(rows_forward<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                                          shift.data_ptr<scalar_t>(), rowstats.data(), N * C, C, P));
    });
    // per channel: mean of the row means, then the mean of (m2 + (mu - mean)^2), samples in order
    for (int64_t c = 0; c < C; ++c) {
      double m = 0.0;
      for (int64_t n = 0; n < N; ++n) m += rowstats[2 * (n * C + c)];
      m /= static_cast<double>(N);
      double v = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        const double d = rowstats[2 * (n * C + c)] - m;
        v += rowstats[2 * (n * C + c) + 1] + d * d;
      }
      stats[2 * c] = m;
      stats[2 * c + 1] = v / static_cast<double>(N);
    }
  }
  Tensor out = at::empty({C, 2}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_eval_stats_out", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < 2 * C; ++i) op[i] = static_cast<scalar_t>(stats[i]);
  });
  return {y, out};
}

Tensor backward_cpu(const Tensor& gy_in, const Tensor& x_in, const Tensor& scale_in, const Tensor& c0_in,
                    const Tensor& c1_in) {
  TORCH_CHECK(x_in.dim() == 4 && gy_in.sizes() == x_in.sizes(), "bn_eval_stats_backward: gy ", gy_in.sizes(),
              " and x ", x_in.sizes(), " must be the same [N, C, H, W]");
  TORCH_CHECK(gy_in.scalar_type() == x_in.scalar_type(), "bn_eval_stats_backward: gy must have x's dtype");
  check_args(x_in, scale_in, "scale");
  check_args(x_in, c0_in, "c0");
  check_args(x_in, c1_in, "c1");
  const bool cl = channels_last_only(x_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const Tensor x = x_in.contiguous(fmt), gy = gy_in.contiguous(fmt);
  const Tensor scale = scale_in.contiguous(), c0 = c0_in.contiguous(), c1 = c1_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  Tensor dx = at::empty_like(x, fmt);
  if (x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_eval_stats_backward", [&] {
    const scalar_t *gp = gy.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>();
    const scalar_t *sp = scale.data_ptr<scalar_t>(), *a0 = c0.data_ptr<scalar_t>(), *a1 = c1.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    if (cl)
      BES_ISA_CALL(cols_backward<scalar_t>(gp, xp, sp, a0, a1, dp, N * P, C));
    else
      BES_ISA_CALL(rows_backward<scalar_t>(gp, xp, sp, a0, a1, dp, N * C, C, P));
  });
  return dx;
}

}  // namespace
}  // namespace fastdd_bn_eval_stats

TORCH_LIBRARY_FRAGMENT(fastdd_C, m) {
  m.def("bn_eval_stats(Tensor x, Tensor scale, Tensor shift) -> (Tensor, Tensor)");
  m.def("bn_eval_stats_backward(Tensor gy, Tensor x, Tensor scale, Tensor c0, Tensor c1) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdd_C, CPU, m) {
  m.impl("bn_eval_stats", &fastdd_bn_eval_stats::forward_cpu);
  m.impl("bn_eval_stats_backward", &fastdd_bn_eval_stats::backward_cpu);
}
