// Low-rank image reconstruction: C++ (OpenMP through ATen's parallel_for) CPU kernels.
//
// Raw kernels registered in the `fastdd_C` torch library namespace; the Python op layer
// (fastdd/ops/lowrank.py) wraps them in the `fastdd::lowrank_reconstruct*` custom ops with fake kernels
// and autograd. Shapes: A [N, C, H, r], B [N, C, r, W], X / dX [N, C, H, W]; P = N * C planes.
// Accumulation is in double for double inputs and in float otherwise; every output element is summed in
// a fixed order, so the results do not depend on the thread count.
//
//   lowrank_fwd(A, B)                        -> X [N, C, H, W], X[p] = A[p] @ B[p]
//   lowrank_bwd(dX, A, B, need_a, need_b)    -> (dA [N, C, H, r] or [0], dB [N, C, r, W] or [0])
//        dA[p] = dX[p] @ B[p]^T and dB[p] = A[p]^T @ dX[p] from ONE pass over dX[p]: each row i of dX
//        is read once, giving dA[p, i, :] (a dot product with each row of B) and its rank-1 update
//        A[p, i, :]^T dX[p, i, :] of the dB accumulator (kept in acc precision for the whole plane).
// Ranks 1..8 are compile-time template arguments (unrolled k loops, vectorised j loops); the inner loops
// (lowrank_cpu_kernels.h) are compiled once per SIMD path (csrc/isa_variants.h, FASTDD_SIMD) and give
// bit-identical results on every path and thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "lowrank_args.h"

#define FASTDD_ISA_HEADER "lowrank/lowrank_cpu_kernels.h"
#include "../isa_variants.h"

namespace fastdd_lowrank {
namespace {

using fastdd::AccOf;

void check_factors(const at::Tensor& a, const at::Tensor& b) {
  fastdd::check_cpu(a, "factor_a");
  fastdd::check_cpu(b, "factor_b");
  check_factor_shapes(a, b);
}

// Compile-time ranks 1..8 (the common ones), any other rank through the R = 0 kernels.
template <typename F>
void with_rank(int64_t r, F&& f) {
  switch (r) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

at::Tensor lowrank_fwd(const at::Tensor& a_in, const at::Tensor& b_in) {
  at::NoGradGuard no_grad;
  check_factors(a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), r = a.size(3), W = b.size(3);
  at::Tensor x = at::empty({N, C, H, W}, a.options());
  if (x.numel() == 0) return x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lowrank_fwd", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    with_rank(r, [&](auto R) {
      FASTDD_ISA_DISPATCH(fastdd_lowrank, fwd_planes<scalar_t, acc_t, decltype(R)::value>(
                                              a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                              x.mutable_data_ptr<scalar_t>(), N * C, H, W, r));
    });
  });
  return x;
}

std::tuple<at::Tensor, at::Tensor> lowrank_bwd(const at::Tensor& grad_in, const at::Tensor& a_in,
                                               const at::Tensor& b_in, bool need_a, bool need_b) {
  at::NoGradGuard no_grad;
  check_factors(a_in, b_in);
  const int64_t N = a_in.size(0), C = a_in.size(1), H = a_in.size(2), r = a_in.size(3), W = b_in.size(3);
  fastdd::check_cpu(grad_in, "grad");
  check_grad_shape(grad_in, a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor g = grad_in.to(a.scalar_type()).contiguous();
  at::Tensor da = need_a ? at::empty_like(a) : at::empty({0}, a.options());
  at::Tensor db = need_b ? at::empty_like(b) : at::empty({0}, b.options());
  if ((!need_a && !need_b) || N * C == 0) return {da, db};
  if (H == 0 || W == 0) {  // empty image planes: the gradients are sums over nothing
    if (need_a) da.zero_();
    if (need_b) db.zero_();
    return {da, db};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lowrank_bwd", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    with_rank(r, [&](auto R) {
      FASTDD_ISA_DISPATCH(fastdd_lowrank, bwd_planes<scalar_t, acc_t, decltype(R)::value>(
                                              g.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                                              b.const_data_ptr<scalar_t>(),
                                              need_a ? da.mutable_data_ptr<scalar_t>() : nullptr,
                                              need_b ? db.mutable_data_ptr<scalar_t>() : nullptr, N * C, H, W, r));
    });
  });
  return {da, db};
}

}  // namespace
}  // namespace fastdd_lowrank

TORCH_LIBRARY_FRAGMENT(fastdd_C, m) {
  m.def("lowrank_fwd(Tensor factor_a, Tensor factor_b) -> Tensor");
  m.def("lowrank_bwd(Tensor grad, Tensor factor_a, Tensor factor_b, bool need_a, bool need_b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdd_C, CPU, m) {
  m.impl("lowrank_fwd", &fastdd_lowrank::lowrank_fwd);
  m.impl("lowrank_bwd", &fastdd_lowrank::lowrank_bwd);
}
