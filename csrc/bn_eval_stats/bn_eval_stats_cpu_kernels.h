// Inner loops of the CPU eval-BatchNorm + statistics kernels (contracts in bn_eval_stats_cpu.cpp).
//
// Compiled once per SIMD path by csrc/isa_variants.h. No include guard and no includes on purpose. Every
// reduction runs over fixed lanes or fixed row blocks and is combined in a fixed order, so the results do
// not depend on the SIMD path or the thread count.

namespace fastdd_bn_eval_stats {
namespace FASTDD_ISA {

#include "../det_kernels.h"

// Rows per block of the channels_last passes (a fixed size: the block sums are combined in block order).
constexpr int64_t kRows = 128;

// channels_last, x [M, C] row-major: y = scale * x + shift per column; part[blk] = (sum d, sum d^2) per
// column in double over the block's rows, d = x - x[0, c] (the shift keeps the one-pass variance exact
// enough when the mean is large against the spread).
template <typename T>
void cols_forward(const T* x, T* y, const T* scale, const T* shift, const double* sh, double* part, int64_t M,
                  int64_t C) {
  const int64_t nb = (M + kRows - 1) / kRows;
  at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      double* s1 = part + blk * 2 * C;
      double* s2 = s1 + C;
      std::fill(s1, s1 + 2 * C, 0.0);
      const int64_t r1 = std::min(M, (blk + 1) * kRows);
      for (int64_t r = blk * kRows; r < r1; ++r) {
        const T* xr = x + r * C;
        T* yr = y + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T v = xr[c];
          yr[c] = scale[c] * v + shift[c];
          const double d = static_cast<double>(v) - sh[c];
          s1[c] += d;
          s2[c] += d * d;
        }
      }
    }
  });
}

// NCHW, x [R = N*C rows, P]: y = scale * x + shift with the row's channel; rowstats[r] = (mean, biased m2)
// of the row in double (two passes over fixed lanes, the row in L1/L2 for the second).
template <typename T>
void rows_forward(const T* x, T* y, const T* scale, const T* shift, double* rowstats, int64_t R, int64_t C,
                  int64_t P) {
  const int64_t grain = std::max<int64_t>(1, 32768 / P);
  at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + r * P;
      T* yr = y + r * P;
      const T a = scale[r % C], t = shift[r % C];
      double s1[kLanes] = {};
      int64_t p = 0;
      for (; p + kLanes <= P; p += kLanes)
        for (int l = 0; l < kLanes; ++l) s1[l] += static_cast<double>(xr[p + l]);
      for (int l = 0; p < P; ++p, ++l) s1[l] += static_cast<double>(xr[p]);
      const double mu = combine_lanes(s1) / static_cast<double>(P);
      double s2[kLanes] = {};
      p = 0;
      for (; p + kLanes <= P; p += kLanes)
        for (int l = 0; l < kLanes; ++l) {
          const double d = static_cast<double>(xr[p + l]) - mu;
          s2[l] += d * d;
        }
      for (int l = 0; p < P; ++p, ++l) {
        const double d = static_cast<double>(xr[p]) - mu;
        s2[l] += d * d;
      }
#pragma omp simd
      for (int64_t q = 0; q < P; ++q) yr[q] = a * xr[q] + t;
      rowstats[2 * r] = mu;
      rowstats[2 * r + 1] = combine_lanes(s2) / static_cast<double>(P);
    }
  });
}

// dx = (c0 + c1 * x) + scale * gy per channel; channels_last: x, gy, dx [M, C] row-major.
template <typename T>
void cols_backward(const T* gy, const T* x, const T* scale, const T* c0, const T* c1, T* dx, int64_t M,
                   int64_t C) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, M, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + r * C;
      const T* gr = gy + r * C;
      T* dr = dx + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dr[c] = (c0[c] + c1[c] * xr[c]) + scale[c] * gr[c];
    }
  });
}

// The same for NCHW: x, gy, dx [R = N*C rows, P], the row's channel r % C.
template <typename T>
void rows_backward(const T* gy, const T* x, const T* scale, const T* c0, const T* c1, T* dx, int64_t R,
                   int64_t C, int64_t P) {
  const int64_t grain = std::max<int64_t>(1, 32768 / P);
  at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t c = r % C;
      const T a0 = c0[c], a1 = c1[c], s = scale[c];
      const T* xr = x + r * P;
      const T* gr = gy + r * P;
      T* dr = dx + r * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) dr[p] = (a0 + a1 * xr[p]) + s * gr[p];
    }
  });
}

}  // namespace FASTDD_ISA
}  // namespace fastdd_bn_eval_stats
