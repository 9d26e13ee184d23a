// Inner loops of the CPU low-rank kernels (see lowrank_cpu.cpp for the contracts).
//
// Compiled once per SIMD path by csrc/isa_variants.h (lowrank_cpu.cpp picks one at run time). No include
// guard and no includes on purpose. Every output element is a fixed sequence of operations: sums over k
// run k = 0..r-1, the dot products of the backward over fixed lanes (det_kernels.h), so the results do not
// depend on the SIMD path or the thread count.
//
// Per plane: a [H, r] (input dtype), b [r, W] and g [H, W] rows already in the accumulation type acc_t.
// R > 0 is a compile-time rank (the k loops unroll and the j loops vectorise); R == 0 handles any r.
namespace fastdd_lowrank {
namespace FASTDD_ISA {

#include "../det_kernels.h"

// x[i, :] = sum_k a[i, k] b[k, :] for every row i of one plane; row: scratch of W acc_t (R == 0 only).
template <typename scalar_t, typename acc_t, int R>
inline void fwd_plane(const scalar_t* a, const acc_t* b, scalar_t* x, int64_t H, int64_t W, int64_t r, acc_t* row) {
  if constexpr (R > 0) {
    int64_t i = 0;
    for (; i + 4 <= H; i += 4) {  // four rows share each load of b
      acc_t av[4][R];
      for (int t = 0; t < 4; ++t)
        for (int k = 0; k < R; ++k) av[t][k] = static_cast<acc_t>(a[(i + t) * R + k]);
      scalar_t* x0 = x + i * W;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) {
        acc_t s0 = av[0][0] * b[j], s1 = av[1][0] * b[j], s2 = av[2][0] * b[j], s3 = av[3][0] * b[j];
        for (int k = 1; k < R; ++k) {
          const acc_t bk = b[k * W + j];
          s0 += av[0][k] * bk;
          s1 += av[1][k] * bk;
          s2 += av[2][k] * bk;
          s3 += av[3][k] * bk;
        }
        x0[j] = static_cast<scalar_t>(s0);
        x0[W + j] = static_cast<scalar_t>(s1);
        x0[2 * W + j] = static_cast<scalar_t>(s2);
        x0[3 * W + j] = static_cast<scalar_t>(s3);
      }
    }
    for (; i < H; ++i) {
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

// dai[k] = sum_j gi[j] b[k, j] for k < R in one pass over gi: kDotLanes partial sums per k (one vector
// register each), combined in a fixed order at the end.
constexpr int kDotLanes = 8;
template <typename scalar_t, typename acc_t, int R>
inline void row_dots(const acc_t* gi, const acc_t* b, scalar_t* dai, int64_t W) {
  acc_t part[R][kDotLanes] = {};
  int64_t j = 0;
  for (; j + kDotLanes <= W; j += kDotLanes) {
    for (int k = 0; k < R; ++k) {
#pragma omp simd
      for (int l = 0; l < kDotLanes; ++l) part[k][l] += gi[j + l] * b[k * W + j + l];
    }
  }
  for (int l = 0; j < W; ++j, ++l)
    for (int k = 0; k < R; ++k) part[k][l] += gi[j] * b[k * W + j];
  for (int k = 0; k < R; ++k) {
    acc_t s = 0;
    for (int l = 0; l < kDotLanes; ++l) s += part[k][l];
    dai[k] = static_cast<scalar_t>(s);
  }
}

// Four rows of the fused backward at once (compile-time rank R): g0..g3 = dX rows i..i+3 (read once),
// ai = A[i, :] (rows i..i+3 follow at stride R), dai = dA[i, :] or null, gb [R, W] the dB accumulator or
// null. Blocking four rows cuts the read-modify-write traffic of gb by four.
template <typename scalar_t, typename acc_t, int R>
inline void bwd_rows4(const acc_t* g0, const acc_t* g1, const acc_t* g2, const acc_t* g3, const scalar_t* ai,
                      const acc_t* b, scalar_t* dai, acc_t* gb, int64_t W) {
  if (dai != nullptr) {
    row_dots<scalar_t, acc_t, R>(g0, b, dai, W);
    row_dots<scalar_t, acc_t, R>(g1, b, dai + R, W);
    row_dots<scalar_t, acc_t, R>(g2, b, dai + 2 * R, W);
    row_dots<scalar_t, acc_t, R>(g3, b, dai + 3 * R, W);
  }
  if (gb != nullptr) {
    for (int k = 0; k < R; ++k) {
      const acc_t a0 = static_cast<acc_t>(ai[k]), a1 = static_cast<acc_t>(ai[R + k]);
      const acc_t a2 = static_cast<acc_t>(ai[2 * R + k]), a3 = static_cast<acc_t>(ai[3 * R + k]);
      acc_t* gbk = gb + k * W;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) gbk[j] += (a0 * g0[j] + a1 * g1[j]) + (a2 * g2[j] + a3 * g3[j]);
    }
  }
}


// One row i of the fused backward: gi = dX[i, :] (read once by the caller), dai = dA[i, :] (or null),
// gb [r, W] the dB accumulator of the plane (or null).
template <typename scalar_t, typename acc_t, int R>
inline void bwd_row(const acc_t* gi, const scalar_t* ai, const acc_t* b, scalar_t* dai, acc_t* gb, int64_t W,
                    int64_t r_runtime) {
  const int64_t r = R > 0 ? R : r_runtime;
  if (dai != nullptr) {
    if constexpr (R > 0)
      row_dots<scalar_t, acc_t, R>(gi, b, dai, W);
    else
      for (int64_t k = 0; k < r; ++k) dai[k] = static_cast<scalar_t>(lane_dot(gi, b + k * W, W));
  }
  if (gb != nullptr) {
    for (int64_t k = 0; k < r; ++k) {
      const acc_t aik = static_cast<acc_t>(ai[k]);
      acc_t* gbk = gb + k * W;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) gbk[j] += aik * gi[j];
    }
  }
}


// Planes per task: enough work per task (~16k multiply-adds) to amortise the scheduling.
inline int64_t plane_grain(int64_t H, int64_t W, int64_t r) {
  const int64_t work = std::max<int64_t>(1, H * W * r);
  return std::max<int64_t>(1, 16384 / work);
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

template <typename scalar_t, typename acc_t, int R>
void fwd_planes(const scalar_t* A, const scalar_t* B, scalar_t* X, int64_t P, int64_t H, int64_t W, int64_t r) {
  at::parallel_for(0, P, plane_grain(H, W, r), [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> bbuf(std::is_same_v<scalar_t, acc_t> ? 0 : r * W), row(R > 0 ? 0 : W);
    for (int64_t p = p0; p < p1; ++p) {
      const acc_t* b = as_acc<scalar_t, acc_t>(B + p * r * W, r * W, bbuf);
      fwd_plane<scalar_t, acc_t, R>(A + p * H * r, b, X + p * H * W, H, W, r, row.data());
    }
  });
}

template <typename scalar_t, typename acc_t, int R>
void bwd_planes(const scalar_t* G, const scalar_t* A, const scalar_t* B, scalar_t* dA, scalar_t* dB, int64_t P,
                int64_t H, int64_t W, int64_t r) {
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
          bwd_rows4<scalar_t, acc_t, R>(g4, g4 + W, g4 + 2 * W, g4 + 3 * W, a + i * r, b, dai, gbp, W);
        }
      }
      for (; i < H; ++i) {
        const acc_t* gi = as_acc<scalar_t, acc_t>(G + (p * H + i) * W, W, gbuf);  // the one read of dX[p, i]
        scalar_t* dai = dA != nullptr ? dA + (p * H + i) * r : nullptr;
        bwd_row<scalar_t, acc_t, R>(gi, a + i * r, b, dai, gbp, W, r);
      }
      if (dB != nullptr) {
        scalar_t* db = dB + p * r * W;
        for (int64_t t = 0; t < r * W; ++t) db[t] = static_cast<scalar_t>(gb[t]);
      }
    }
  });
}

}  // namespace FASTDD_ISA
}  // namespace fastdd_lowrank
