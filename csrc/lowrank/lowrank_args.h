// Argument checks shared by the CPU and CUDA low-rank kernels (contracts in lowrank_cpu.cpp); the callers
// check the device themselves.
#pragma once

#include <ATen/ATen.h>

namespace fastdd_lowrank {

// factor_a [N, C, H, r] and factor_b [N, C, r, W]: floating, one dtype, matching N, C and r.
inline void check_factor_shapes(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 4, "factor_a: expected a 4-d tensor [N, C, H, r], got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 4, "factor_b: expected a 4-d tensor [N, C, r, W], got shape ", b.sizes());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "factor_a: expected a floating dtype, got ", a.scalar_type());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "factor_b: dtype ", b.scalar_type(), " does not match factor_a's ",
              a.scalar_type());
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(1) == b.size(1), "factor_b: leading dims [N, C] ",
              b.sizes().slice(0, 2), " do not match factor_a's ", a.sizes().slice(0, 2));
  TORCH_CHECK(a.size(3) == b.size(2), "factor_b: rank ", b.size(2), " (dim 2) does not match factor_a's rank ",
              a.size(3), " (dim 3)");
}

// grad [N, C, H, W] of the reconstruction A @ B.
inline void check_grad_shape(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b) {
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = b.size(3);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == N && grad.size(1) == C && grad.size(2) == H && grad.size(3) == W,
              "grad: expected shape [", N, ", ", C, ", ", H, ", ", W, "], got ", grad.sizes());
}

}  // namespace fastdd_lowrank
