// Inner loops of the CPU low-rank kernels (see lowrank_cpu.cpp for the contracts).
//
// Included twice by lowrank_cpu.cpp: once as namespace `generic` (the build's default ISA) and once as
// namespace `avx2` inside `#pragma GCC target("avx2,fma")`; lowrank_cpu.cpp picks one at run time (as
// csrc/feature_moments does). No include guard on purpose.
//
// Per plane: a [H, r] (input dtype), b [r, W] and g [H, W] rows already in the accumulation type acc_t.
// R > 0 is a compile-time rank (the k loops unroll and the j loops vectorise); R == 0 handles any r.
#ifndef LR_KERNEL_NS
#error "lowrank_cpu_kernels.h is included by lowrank_cpu.cpp with LR_KERNEL_NS defined"
#endif

namespace fastdd_lowrank {
namespace LR_KERNEL_NS {

// x[i, :] = sum_k a[i, k] b[k, :] for every row i of one plane; row: scratch of W acc_t (R == 0 only).
template <typename scalar_t, typename acc_t, int R>
inline void fwd_plane(const scalar_t* a, const acc_t* b, scalar_t* x, int64_t H, int64_t W, int64_t r, acc_t* row) {
  if constexpr (R > 0) {
    for (int64_t i = 0; i < H; ++i) {
      acc_t av[R];
      for (int k = 0; k < R; ++k) av[k] = static_cast<acc_t>(a[i * R + k]);
      scalar_t* xi = x + i * W;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) {
        acc_t s = av[0] * b[j];
        for (int k = 1; k < R; ++k) s += av[k] * b[k * W + j];
        xi[j] = static_cast<scalar_t>(s);
      }
    }
  } else {
    for (int64_t i = 0; i < H; ++i) {
      for (int64_t j = 0; j < W; ++j) row[j] = acc_t(0);
      for (int64_t k = 0; k < r; ++k) {
        const acc_t aik = static_cast<acc_t>(a[i * r + k]);
        const acc_t* bk = b + k * W;
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) row[j] += aik * bk[j];
      }
      scalar_t* xi = x + i * W;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) xi[j] = static_cast<scalar_t>(row[j]);
    }
  }
}

template <typename acc_t>
inline acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += x[j] * y[j];
  return s;
}

// One row i of the fused backward: gi = dX[i, :] (read once by the caller), dai = dA[i, :] (or null),
// gb [r, W] the dB accumulator of the plane (or null).
template <typename scalar_t, typename acc_t, int R>
inline void bwd_row(const acc_t* gi, const scalar_t* ai, const acc_t* b, scalar_t* dai, acc_t* gb, int64_t W,
                    int64_t r_runtime) {
  const int64_t r = R > 0 ? R : r_runtime;
  if (dai != nullptr)
    for (int64_t k = 0; k < r; ++k) dai[k] = static_cast<scalar_t>(dot(gi, b + k * W, W));
  if (gb != nullptr) {
    for (int64_t k = 0; k < r; ++k) {
      const acc_t aik = static_cast<acc_t>(ai[k]);
      acc_t* gbk = gb + k * W;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) gbk[j] += aik * gi[j];
    }
  }
}

}  // namespace LR_KERNEL_NS
}  // namespace fastdd_lowrank
