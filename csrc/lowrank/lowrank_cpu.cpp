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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

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

// sum_j x[j] y[j] with kLanes independent partial sums (vectorisable without -ffast-math, and a shorter
// rounding chain than one running sum), combined pairwise; fixed order.
constexpr int64_t kLanes = 8;
template <typename acc_t>
inline acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += x[j + l] * y[j + l];
  for (int64_t l = 0; j < n; ++j, ++l) part[l] += x[j] * y[j];
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}

template <typename scalar_t>
void fwd_kernel(const scalar_t* A, const scalar_t* B, scalar_t* X, int64_t P, int64_t H, int64_t W, int64_t r) {
  using acc_t = typename AccOf<scalar_t>::type;
  at::parallel_for(0, P, plane_grain(H, W, r), [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> bacc(r * W), row(W);
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* a = A + p * H * r;
      const scalar_t* b = B + p * r * W;
      scalar_t* x = X + p * H * W;
      for (int64_t t = 0; t < r * W; ++t) bacc[t] = static_cast<acc_t>(b[t]);
      for (int64_t i = 0; i < H; ++i) {
        std::fill(row.begin(), row.end(), acc_t(0));
        for (int64_t k = 0; k < r; ++k) {
          const acc_t aik = static_cast<acc_t>(a[i * r + k]);
          const acc_t* bk = bacc.data() + k * W;
          for (int64_t j = 0; j < W; ++j) row[j] += aik * bk[j];
        }
        scalar_t* xi = x + i * W;
        for (int64_t j = 0; j < W; ++j) xi[j] = static_cast<scalar_t>(row[j]);
      }
    }
  });
}

template <typename scalar_t>
void bwd_kernel(const scalar_t* G, const scalar_t* A, const scalar_t* B, scalar_t* dA, scalar_t* dB, int64_t P,
                int64_t H, int64_t W, int64_t r) {
  using acc_t = typename AccOf<scalar_t>::type;
  at::parallel_for(0, P, plane_grain(H, W, r), [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> bacc(r * W), gb(r * W), grow(W), arow(r);
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* a = A + p * H * r;
      const scalar_t* b = B + p * r * W;
      const scalar_t* g = G + p * H * W;
      if (dA != nullptr)
        for (int64_t t = 0; t < r * W; ++t) bacc[t] = static_cast<acc_t>(b[t]);
      if (dB != nullptr) std::fill(gb.begin(), gb.end(), acc_t(0));
      for (int64_t i = 0; i < H; ++i) {
        const scalar_t* gi = g + i * W;
        for (int64_t j = 0; j < W; ++j) grow[j] = static_cast<acc_t>(gi[j]);  // the one read of dX[p, i]
        if (dA != nullptr) {
          scalar_t* dai = dA + p * H * r + i * r;
          for (int64_t k = 0; k < r; ++k) dai[k] = static_cast<scalar_t>(dot(grow.data(), bacc.data() + k * W, W));
        }
        if (dB != nullptr) {
          for (int64_t k = 0; k < r; ++k) {
            const acc_t aik = static_cast<acc_t>(a[i * r + k]);
            acc_t* gbk = gb.data() + k * W;
            for (int64_t j = 0; j < W; ++j) gbk[j] += aik * grow[j];
          }
        }
      }
      if (dB != nullptr) {
        scalar_t* db = dB + p * r * W;
        for (int64_t t = 0; t < r * W; ++t) db[t] = static_cast<scalar_t>(gb[t]);
      }
    }
  });
}

at::Tensor lowrank_fwd(const at::Tensor& a_in, const at::Tensor& b_in) {
  at::NoGradGuard no_grad;
  check_factors(a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), r = a.size(3), W = b.size(3);
  at::Tensor x = at::empty({N, C, H, W}, a.options());
  if (x.numel() == 0) return x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lowrank_fwd", [&] {
    fwd_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), x.mutable_data_ptr<scalar_t>(),
                         N * C, H, W, r);
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
    bwd_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                         need_a ? da.mutable_data_ptr<scalar_t>() : nullptr,
                         need_b ? db.mutable_data_ptr<scalar_t>() : nullptr, N * C, H, W, r);
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
