// Argument checks shared by the CPU and CUDA InfoNCE kernels (contracts in infonce_cpu.cpp); the callers
// check the device themselves.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace fastdd_infonce {

// syn [Ns, D] and real [Nr, D] of one floating dtype, weights [2, Ns], tau > 0, form 0 or 1.
inline void check_infonce_args(const at::Tensor& syn, const at::Tensor& real, const at::Tensor& weights, double tau,
                               int64_t form) {
  TORCH_CHECK(syn.dim() == 2, "syn: expected a 2-d tensor [N, D], got shape ", syn.sizes());
  TORCH_CHECK(real.dim() == 2, "real: expected a 2-d tensor [N, D], got shape ", real.sizes());
  TORCH_CHECK(at::isFloatingType(syn.scalar_type()), "syn: expected a floating dtype, got ", syn.scalar_type());
  TORCH_CHECK(syn.size(1) == real.size(1), "real: feature dimension ", real.size(1), " does not match syn's ",
              syn.size(1));
  TORCH_CHECK(syn.scalar_type() == real.scalar_type(), "real: dtype ", real.scalar_type(), " does not match syn's ",
              syn.scalar_type());
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "temperature: must be a positive finite number, got ", tau);
  TORCH_CHECK(form == 0 || form == 1, "form: expected 0 (supcon) or 1 (nce), got ", form);
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == 2 && weights.size(1) == syn.size(0), "weights: expected [2, ",
              syn.size(0), "], got ", weights.sizes());
}

}  // namespace fastdd_infonce
