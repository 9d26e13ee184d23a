// Argument handling shared by the CPU and CUDA feature-moment kernels (contracts in feature_moments_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../common.h"

namespace fastdd_feature_moments {

// Checked, contiguous arguments of feature_moments_poly_backward: src [Rs, P], idx [R] int64 (undefined:
// R = Rs, row r reads source row r), center [Rs] and coef [Rs, 4] in the statistics dtype `sdt`.
struct PolyArgs {
  at::Tensor src, idx, center, coef;
  int64_t Rs, R, P;
  at::ScalarType sdt;
};

inline PolyArgs poly_args(const at::Tensor& src_in, const std::optional<at::Tensor>& row_index,
                          const at::Tensor& center_in, const at::Tensor& coef_in, int64_t degree,
                          at::ScalarType out_dtype) {
  TORCH_CHECK(degree == 1 || degree == 3, "feature_moments_poly_backward: degree must be 1 or 3");
  TORCH_CHECK(src_in.dim() == 2, "feature_moments_poly_backward: src must be [Rs, P]");
  PolyArgs a;
  a.src = src_in.contiguous();
  a.Rs = a.src.size(0);
  a.P = a.src.size(1);
  a.R = a.Rs;
  if (row_index.has_value() && row_index->defined()) {
    a.idx = row_index->to(at::kLong).contiguous();
    a.R = a.idx.numel();
  }
  a.sdt = fastdd::acc_scalar_type(out_dtype);
  a.center = center_in.to(a.sdt).contiguous();
  a.coef = coef_in.to(a.sdt).contiguous();
  TORCH_CHECK(a.center.numel() == a.Rs && a.coef.numel() == 4 * a.Rs,
              "feature_moments_poly_backward: center [Rs] and coef [Rs, 4] must match the source rows");
  TORCH_CHECK(a.src.scalar_type() == out_dtype || a.src.scalar_type() == a.sdt,
              "feature_moments_poly_backward: src must have the output dtype or ", a.sdt, ", got ",
              a.src.scalar_type());
  return a;
}

}  // namespace fastdd_feature_moments
