// Inner loops of the CPU feature-moment kernels (see feature_moments_cpu.cpp for the contracts).
//
// Compiled once per SIMD path by csrc/isa_variants.h; the op functions pick one at run time. No include
// guard and no includes on purpose. Row sums run over fixed lanes (det_kernels.h) and the class sums in
// sample order, so the results do not depend on the SIMD path or the thread count.

namespace fastdd_feature_moments {
namespace FASTDD_ISA {

#include "../det_kernels.h"

template <typename T>
inline double to_acc(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
inline double to_acc<double>(double v) {
  return v;
}

// f(i, lane) for i < n, lane = i % kLanes, in blocks of kLanes (the inner loop vectorises across lanes).
template <typename F>
inline void for_lanes(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) f(i + l, l);
  for (int l = 0; i < n; ++i, ++l) f(i, l);
}

// Mean and biased central moments (m2, m3, m4; m3 = m4 = 0 unless ORDER == 4) of one contiguous row:
// two passes (the row is in L1/L2 for the second), double accumulation over fixed lanes.
template <typename T, int ORDER>
inline void row_moments(const T* row, int64_t P, double out[4]) {
  double s1[kLanes] = {};
  for_lanes(P, [&](int64_t p, int l) { s1[l] += to_acc(row[p]); });
  const double mu = combine_lanes(s1) / static_cast<double>(P);
  double s2[kLanes] = {}, s3[kLanes] = {}, s4[kLanes] = {};
  if constexpr (ORDER == 4) {
    for_lanes(P, [&](int64_t p, int l) {
      const double d = to_acc(row[p]) - mu;
      const double d2 = d * d;
      s2[l] += d2;
      s3[l] += d2 * d;
      s4[l] += d2 * d2;
    });
  } else {
    for_lanes(P, [&](int64_t p, int l) {
      const double d = to_acc(row[p]) - mu;
      s2[l] += d * d;
    });
  }
  const double inv = 1.0 / static_cast<double>(P);
  out[0] = mu;
  out[1] = combine_lanes(s2) * inv;
  out[2] = combine_lanes(s3) * inv;
  out[3] = combine_lanes(s4) * inv;
}

template <typename in_t, typename out_t>
void rows_impl(const in_t* xp, out_t* op, int64_t R, int64_t P, int64_t order) {
  const int64_t grain = std::max<int64_t>(1, 32768 / P);
  at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) {
    double m[4];
    for (int64_t r = b; r < e; ++r) {
      if (order == 4)
        row_moments<in_t, 4>(xp + r * P, P, m);
      else
        row_moments<in_t, 2>(xp + r * P, P, m);
      for (int j = 0; j < 4; ++j) op[r * 4 + j] = static_cast<out_t>(m[j]);
    }
  });
}

// Column mean and biased variance of x [M, C] (row-major: a channels_last map seen as [N*H*W, C]).
// Blocks of kColRows rows (a fixed size, whatever the thread count) accumulate, per column and in double,
// the sums of d = x - x[0, c] and of d^2; the block sums are then added in block order. The shift by the
// first row keeps the one-pass variance accurate when the mean is large against the spread.
constexpr int64_t kColRows = 128;

template <typename in_t, typename out_t>
void cols_impl(const in_t* xp, out_t* op, int64_t M, int64_t C) {
  const int64_t nb = (M + kColRows - 1) / kColRows;
  std::vector<double> shift(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) shift[c] = to_acc(xp[c]);
  std::vector<double> part(static_cast<size_t>(nb * 2 * C));
  const double* sh = shift.data();
  at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      double* s1 = part.data() + blk * 2 * C;
      double* s2 = s1 + C;
      std::fill(s1, s1 + 2 * C, 0.0);
      const int64_t r1 = std::min(M, (blk + 1) * kColRows);
      for (int64_t r = blk * kColRows; r < r1; ++r) {
        const in_t* row = xp + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double d = to_acc(row[c]) - sh[c];
          s1[c] += d;
          s2[c] += d * d;
        }
      }
    }
  });
  std::vector<double> t1(static_cast<size_t>(C), 0.0), t2(static_cast<size_t>(C), 0.0);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const double* s1 = part.data() + blk * 2 * C;
    const double* s2 = s1 + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      t1[c] += s1[c];
      t2[c] += s2[c];
    }
  }
  const double inv = 1.0 / static_cast<double>(M);
  for (int64_t c = 0; c < C; ++c) {
    const double dm = t1[c] * inv;
    op[c * 2] = static_cast<out_t>(sh[c] + dm);
    op[c * 2 + 1] = static_cast<out_t>(std::max(0.0, t2[c] * inv - dm * dm));
  }
}

// Class-mean map and its row moments. Work item = (class k, channels c0:c1); the samples of the class
// stream through a partial-sum buffer in the input's opmath type (float for fp32/fp16/bf16), four at a
// time, flushed every kFlush samples into a double accumulator.
template <typename in_t, typename out_t>
void class_map_impl(const in_t* xp, const int64_t* oi, const int64_t* off, out_t* rs, out_t* am, int64_t K,
                    int64_t C, int64_t P, int64_t cb, int64_t order) {
  using part_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
  constexpr int64_t kFlush = 32;
  const int64_t nblk = (C + cb - 1) / cb;
  at::parallel_for(0, K * nblk, 1, [&](int64_t b, int64_t e) {
    std::vector<double> buf(static_cast<size_t>(cb * P));
    std::vector<part_t> part(static_cast<size_t>(cb * P));
    double m[4];
    for (int64_t item = b; item < e; ++item) {
      const int64_t k = item / nblk;
      const int64_t c0 = (item % nblk) * cb;
      const int64_t c1 = std::min(C, c0 + cb);
      const int64_t len = (c1 - c0) * P;
      double* bp = buf.data();
      part_t* pp = part.data();
      std::fill(bp, bp + len, 0.0);
      for (int64_t i0 = off[k]; i0 < off[k + 1]; i0 += kFlush) {
        const int64_t i1 = std::min(off[k + 1], i0 + kFlush);
        int64_t i = i0;
        {
          const in_t* s0 = xp + (oi[i] * C + c0) * P;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) pp[j] = static_cast<part_t>(s0[j]);
          ++i;
        }
        for (; i + 3 < i1; i += 4) {
          const in_t* s0 = xp + (oi[i] * C + c0) * P;
          const in_t* s1 = xp + (oi[i + 1] * C + c0) * P;
          const in_t* s2 = xp + (oi[i + 2] * C + c0) * P;
          const in_t* s3 = xp + (oi[i + 3] * C + c0) * P;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j)
            pp[j] += (static_cast<part_t>(s0[j]) + static_cast<part_t>(s1[j])) +
                     (static_cast<part_t>(s2[j]) + static_cast<part_t>(s3[j]));
        }
        for (; i < i1; ++i) {
          const in_t* s0 = xp + (oi[i] * C + c0) * P;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) pp[j] += static_cast<part_t>(s0[j]);
        }
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) bp[j] += static_cast<double>(pp[j]);
      }
      const double inv = 1.0 / static_cast<double>(off[k + 1] - off[k]);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) bp[j] *= inv;
      for (int64_t c = c0; c < c1; ++c) {
        const double* row = bp + (c - c0) * P;
        if (order == 4)
          row_moments<double, 4>(row, P, m);
        else
          row_moments<double, 2>(row, P, m);
        for (int j = 0; j < 4; ++j) rs[(k * C + c) * 4 + j] = static_cast<out_t>(m[j]);
      }
      if (am != nullptr) {
        out_t* dst = am + (k * C + c0) * P;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<out_t>(bp[j]);
      }
    }
  });
}

// One output row: o[p] = a0 + a1 d (+ a2 d^2 + a3 d^3), d = s[p] - mu.
template <typename src_t, typename out_t, typename op_t, int DEG>
inline void poly_row(const src_t* s, out_t* o, int64_t P, op_t mu, op_t a0, op_t a1, op_t a2, op_t a3) {
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) {
    const op_t d = static_cast<op_t>(s[p]) - mu;
    op_t v;
    if constexpr (DEG == 1)
      v = a0 + a1 * d;
    else
      v = a0 + d * (a1 + d * (a2 + d * a3));
    o[p] = static_cast<out_t>(v);
  }
}

template <typename src_t, typename out_t, typename st_t, int DEG>
void poly_loop(const src_t* src, const int64_t* idx, const st_t* center, const st_t* coef, out_t* out, int64_t R,
               int64_t P) {
  using op_t = std::conditional_t<std::is_same_v<st_t, double>, double, float>;
  const int64_t grain = std::max<int64_t>(1, 32768 / P);
  at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t sr = idx ? idx[r] : r;
      const st_t* a = coef + sr * 4;
      poly_row<src_t, out_t, op_t, DEG>(src + sr * P, out + r * P, P, static_cast<op_t>(center[sr]),
                                        static_cast<op_t>(a[0]), static_cast<op_t>(a[1]),
                                        static_cast<op_t>(a[2]), static_cast<op_t>(a[3]));
    }
  });
}

// Batch-average backward, class-major: A[k, c0:c1, :] is read once per work item (it stays in L1/L2)
// and dx[n, c0:c1, :] written for every sample n of class k.
template <typename src_t, typename out_t, typename st_t, int DEG>
void class_poly_loop(const src_t* amap, const int64_t* oi, const int64_t* off, const st_t* center,
                     const st_t* coef, out_t* out, int64_t K, int64_t C, int64_t P, int64_t cb) {
  using op_t = std::conditional_t<std::is_same_v<st_t, double>, double, float>;
  const int64_t nblk = (C + cb - 1) / cb;
  at::parallel_for(0, K * nblk, 1, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t k = item / nblk;
      const int64_t c0 = (item % nblk) * cb;
      const int64_t c1 = std::min(C, c0 + cb);
      for (int64_t i = off[k]; i < off[k + 1]; ++i) {
        const int64_t n = oi[i];
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t sr = k * C + c;
          const st_t* a = coef + sr * 4;
          poly_row<src_t, out_t, op_t, DEG>(amap + sr * P, out + (n * C + c) * P, P,
                                            static_cast<op_t>(center[sr]), static_cast<op_t>(a[0]),
                                            static_cast<op_t>(a[1]), static_cast<op_t>(a[2]),
                                            static_cast<op_t>(a[3]));
        }
      }
    }
  });
}

}  // namespace FASTDD_ISA
}  // namespace fastdd_feature_moments
