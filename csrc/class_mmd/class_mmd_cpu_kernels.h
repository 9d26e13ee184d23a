// Inner loops of the CPU Gaussian per-class MMD (contracts in class_mmd_cpu.cpp), compiled once per SIMD
// path by csrc/isa_variants.h. No include guard and no includes on purpose.
//
// a [m, D] and b [n, D] are the rows of one class (accumulation type T, contiguous) with their squared
// norms an [m], bn [n]; gamma [nb] = 1 / (2 sigma_b^2). Gram tiles come from det_kernels.h's gemm_nt and
// are at most kTile x kTile; every sum runs in a fixed order, so results do not depend on the SIMD path.

namespace fastdd_class_mmd {
namespace FASTDD_ISA {

#include "../det_kernels.h"

constexpr int64_t kTile = 256;  // rows per Gram tile

// out[i] = ||x_i||^2 for the n rows of x [n, D].
template <typename T>
void row_norms(const T* x, int64_t n, int64_t D, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = lane_dot(x + i * D, x + i * D, D);
}

// *total = sum_{i, j} sum_b exp(-gamma_b ||a_i - b_j||^2); `symmetric` (a is b) visits the upper
// triangle of tiles and counts the off-diagonal ones twice.
template <typename T>
void pair_kernel_sum(const T* a, const T* an, int64_t m, const T* b, const T* bn, int64_t n, int64_t D,
                     const T* gamma, int64_t nb, bool symmetric, double* total) {
  std::vector<T> g(static_cast<size_t>(kTile * kTile));
  double sum = 0.0;
  for (int64_t i0 = 0; i0 < m; i0 += kTile) {
    const int64_t ni = std::min(m, i0 + kTile) - i0;
    for (int64_t j0 = symmetric ? i0 : 0; j0 < n; j0 += kTile) {
      const int64_t nj = std::min(n, j0 + kTile) - j0;
      gemm_nt(a + i0 * D, D, b + j0 * D, D, g.data(), nj, ni, nj, D);
      double tile = 0.0;
      for (int64_t i = 0; i < ni; ++i) {
        T row = 0;
        for (int64_t j = 0; j < nj; ++j) {
          const T d2 = std::max(an[i0 + i] + bn[j0 + j] - 2 * g[i * nj + j], T(0));
          for (int64_t q = 0; q < nb; ++q) row += std::exp(-gamma[q] * d2);
        }
        tile += row;
      }
      sum += (symmetric && j0 != i0) ? 2.0 * tile : tile;
    }
  }
  *total = sum;
}

// Gradient contributions of the pairs (a_i, b_j), with W_ij = sum_b 2 gamma_b exp(-gamma_b ||a_i - b_j||^2):
//   ga[i] += ca (sum_j W_ij) a_i - ca sum_j W_ij b_j      (the first term through rowa[i])
//   gb[j] += cb (sum_i W_ij) b_j - cb sum_i W_ij a_i      (when gb; the first term through rowb[j])
// `symmetric` (a is b, gb null) visits the upper triangle of tiles and mirrors the off-diagonal ones.
template <typename T>
void pair_kernel_grad(const T* a, const T* an, int64_t m, const T* b, const T* bn, int64_t n, int64_t D,
                      const T* gamma, int64_t nb, bool symmetric, double ca, double cb, T* ga, T* rowa, T* gb,
                      T* rowb) {
  std::vector<T> w(static_cast<size_t>(kTile * kTile)), colsum(static_cast<size_t>(kTile));
  const T tca = static_cast<T>(ca), tcb = static_cast<T>(cb);
  for (int64_t i0 = 0; i0 < m; i0 += kTile) {
    const int64_t ni = std::min(m, i0 + kTile) - i0;
    for (int64_t j0 = symmetric ? i0 : 0; j0 < n; j0 += kTile) {
      const int64_t nj = std::min(n, j0 + kTile) - j0;
      const bool mirror = symmetric && j0 != i0;  // tile (j, i) contributes the transposed terms too
      gemm_nt(a + i0 * D, D, b + j0 * D, D, w.data(), nj, ni, nj, D);
      std::fill(colsum.begin(), colsum.begin() + nj, T(0));
      for (int64_t i = 0; i < ni; ++i) {
        T row = 0;
        for (int64_t j = 0; j < nj; ++j) {
          T& e = w[i * nj + j];
          const T d2 = std::max(an[i0 + i] + bn[j0 + j] - 2 * e, T(0));
          T wij = 0;
          for (int64_t q = 0; q < nb; ++q) wij += 2 * gamma[q] * std::exp(-gamma[q] * d2);
          e = wij;
          row += wij;
          colsum[j] += wij;
        }
        rowa[i0 + i] += tca * row;
      }
      if (rowb != nullptr || mirror) {
        T* target = mirror ? rowa : rowb;
        const T coef = mirror ? tca : tcb;
        for (int64_t j = 0; j < nj; ++j) target[j0 + j] += coef * colsum[j];
      }
      for (int64_t i = 0; i < ni; ++i)
        add_weighted_rows(ga + (i0 + i) * D, w.data() + i * nj, 1, b + j0 * D, D, nj, D, -tca);
      if (mirror)
        for (int64_t j = 0; j < nj; ++j)
          add_weighted_rows(ga + (j0 + j) * D, w.data() + j, nj, a + i0 * D, D, ni, D, -tca);
      if (gb != nullptr)
        for (int64_t j = 0; j < nj; ++j)
          add_weighted_rows(gb + (j0 + j) * D, w.data() + j, nj, a + i0 * D, D, ni, D, -tcb);
    }
  }
}

// g[i] += coef[i] * x[i] for the n rows of g, x [n, D].
template <typename T>
void add_scaled_rows(T* g, const T* coef, const T* x, int64_t n, int64_t D) {
  for (int64_t i = 0; i < n; ++i) {
    const T c = coef[i];
    for (int64_t d = 0; d < D; ++d) g[i * D + d] += c * x[i * D + d];
  }
}

}  // namespace FASTDD_ISA
}  // namespace fastdd_class_mmd
