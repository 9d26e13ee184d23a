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
// (lowrank_cpu_kernels.h) are compiled for the default ISA and for AVX2+FMA, chosen at run time
// (FASTDD_CPU_ISA=generic forces the former; the two differ in rounding by the use of FMA).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#define LR_KERNEL_NS generic
#include "lowrank_cpu_kernels.h"
#undef LR_KERNEL_NS

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && !defined(__AVX2__)
#define FASTDD_LR_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define LR_KERNEL_NS avx2
#include "lowrank_cpu_kernels.h"
#undef LR_KERNEL_NS
#pragma GCC pop_options
#endif

namespace fastdd_lowrank {
namespace {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

void check_factors(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.device().is_cpu(), "factor_a: expected a CPU tensor, got ", a.device());
  TORCH_CHECK(b.device().is_cpu(), "factor_b: expected a CPU tensor, got ", b.device());
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

// Planes per task: enough work per task (~16k multiply-adds) to amortise the scheduling.
int64_t plane_grain(int64_t H, int64_t W, int64_t r) {
  const int64_t work = std::max<int64_t>(1, H * W * r);
  return std::max<int64_t>(1, 16384 / work);
}

bool use_avx2() {
#ifdef FASTDD_LR_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* isa = std::getenv("FASTDD_CPU_ISA");
  return supported && !(isa != nullptr && std::strcmp(isa, "generic") == 0);
#else
  return false;
#endif
}

// B of one plane in acc precision: the input itself for float / double, else converted into `buf`.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, int64_t n, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t t = 0; t < n; ++t) buf[t] = static_cast<acc_t>(src[t]);
    return buf.data();
  }
}

template <typename scalar_t, int R, bool AVX2>
void fwd_kernel(const scalar_t* A, const scalar_t* B, scalar_t* X, int64_t P, int64_t H, int64_t W, int64_t r) {
  using acc_t = typename AccOf<scalar_t>::type;
  at::parallel_for(0, P, plane_grain(H, W, r), [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> bbuf(std::is_same_v<scalar_t, acc_t> ? 0 : r * W), row(R > 0 ? 0 : W);
    for (int64_t p = p0; p < p1; ++p) {
      const acc_t* b = as_acc<scalar_t, acc_t>(B + p * r * W, r * W, bbuf);
#ifdef FASTDD_LR_AVX2
      if constexpr (AVX2) {
        avx2::fwd_plane<scalar_t, acc_t, R>(A + p * H * r, b, X + p * H * W, H, W, r, row.data());
        continue;
      }
#endif
      generic::fwd_plane<scalar_t, acc_t, R>(A + p * H * r, b, X + p * H * W, H, W, r, row.data());
    }
  });
}

template <typename scalar_t, int R, bool AVX2>
void bwd_kernel(const scalar_t* G, const scalar_t* A, const scalar_t* B, scalar_t* dA, scalar_t* dB, int64_t P,
                int64_t H, int64_t W, int64_t r) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  at::parallel_for(0, P, plane_grain(H, W, r), [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> bbuf(same ? 0 : r * W), gbuf(same ? 0 : 4 * W), gb(dB != nullptr ? r * W : 0);
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* a = A + p * H * r;
      const acc_t* b = dA != nullptr ? as_acc<scalar_t, acc_t>(B + p * r * W, r * W, bbuf) : nullptr;
      std::fill(gb.begin(), gb.end(), acc_t(0));
      acc_t* gbp = dB != nullptr ? gb.data() : nullptr;
      int64_t i = 0;
      if constexpr (R > 0) {
        for (; i + 4 <= H; i += 4) {  // four rows of dX per step, each read once
          const acc_t* g4 = as_acc<scalar_t, acc_t>(G + (p * H + i) * W, 4 * W, gbuf);
          scalar_t* dai = dA != nullptr ? dA + (p * H + i) * r : nullptr;
#ifdef FASTDD_LR_AVX2
          if constexpr (AVX2) {
            avx2::bwd_rows4<scalar_t, acc_t, R>(g4, g4 + W, g4 + 2 * W, g4 + 3 * W, a + i * r, b, dai, gbp, W);
            continue;
          }
#endif
          generic::bwd_rows4<scalar_t, acc_t, R>(g4, g4 + W, g4 + 2 * W, g4 + 3 * W, a + i * r, b, dai, gbp, W);
        }
      }
      for (; i < H; ++i) {
        const acc_t* gi = as_acc<scalar_t, acc_t>(G + (p * H + i) * W, W, gbuf);  // the one read of dX[p, i]
        scalar_t* dai = dA != nullptr ? dA + (p * H + i) * r : nullptr;
#ifdef FASTDD_LR_AVX2
        if constexpr (AVX2) {
          avx2::bwd_row<scalar_t, acc_t, R>(gi, a + i * r, b, dai, gbp, W, r);
          continue;
        }
#endif
        generic::bwd_row<scalar_t, acc_t, R>(gi, a + i * r, b, dai, gbp, W, r);
      }
      if (dB != nullptr) {
        scalar_t* db = dB + p * r * W;
        for (int64_t t = 0; t < r * W; ++t) db[t] = static_cast<scalar_t>(gb[t]);
      }
    }
  });
}

// Compile-time ranks 1..8 (the common ones), any other rank through the R = 0 kernels.
template <typename F>
void with_rank(int64_t r, bool avx2, F&& f) {
#define LR_CASE(RR)                                      \
  case RR:                                               \
    if (avx2)                                            \
      f(std::integral_constant<int, RR>{}, std::true_type{}); \
    else                                                 \
      f(std::integral_constant<int, RR>{}, std::false_type{}); \
    return;
  switch (r) {
    LR_CASE(1)
    LR_CASE(2)
    LR_CASE(3)
    LR_CASE(4)
    LR_CASE(5)
    LR_CASE(6)
    LR_CASE(7)
    LR_CASE(8)
    default:
      break;
  }
  if (avx2)
    f(std::integral_constant<int, 0>{}, std::true_type{});
  else
    f(std::integral_constant<int, 0>{}, std::false_type{});
#undef LR_CASE
}

at::Tensor lowrank_fwd(const at::Tensor& a_in, const at::Tensor& b_in) {
  at::NoGradGuard no_grad;
  check_factors(a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), r = a.size(3), W = b.size(3);
  at::Tensor x = at::empty({N, C, H, W}, a.options());
  if (x.numel() == 0) return x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lowrank_fwd", [&] {
    with_rank(r, use_avx2(), [&](auto R, auto AVX2) {
      fwd_kernel<scalar_t, decltype(R)::value, decltype(AVX2)::value>(
          a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), x.mutable_data_ptr<scalar_t>(), N * C, H, W, r);
    });
  });
  return x;
}

std::tuple<at::Tensor, at::Tensor> lowrank_bwd(const at::Tensor& grad_in, const at::Tensor& a_in,
                                               const at::Tensor& b_in, bool need_a, bool need_b) {
  at::NoGradGuard no_grad;
  check_factors(a_in, b_in);
  const int64_t N = a_in.size(0), C = a_in.size(1), H = a_in.size(2), r = a_in.size(3), W = b_in.size(3);
  TORCH_CHECK(grad_in.device().is_cpu(), "grad: expected a CPU tensor, got ", grad_in.device());
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == N && grad_in.size(1) == C && grad_in.size(2) == H &&
                  grad_in.size(3) == W,
              "grad: expected shape [", N, ", ", C, ", ", H, ", ", W, "], got ", grad_in.sizes());
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
    with_rank(r, use_avx2(), [&](auto R, auto AVX2) {
      bwd_kernel<scalar_t, decltype(R)::value, decltype(AVX2)::value>(
          g.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
          need_a ? da.mutable_data_ptr<scalar_t>() : nullptr, need_b ? db.mutable_data_ptr<scalar_t>() : nullptr,
          N * C, H, W, r);
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
