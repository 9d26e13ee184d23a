// Deterministic reductions and GEMM-like tiles for the CPU kernels (the contract is in common.h).
//
// No include guard and no includes on purpose: an op's kernel header includes this file inside its
// `namespace FASTDD_ISA`, so every SIMD path gets its own copy compiled for its ISA. Every function here
// gives bit-identical results on every path: a reduction runs over kLanes lanes (element i goes to lane
// i % kLanes, in order), and the lanes are added in a fixed order at the end; vector code only ever
// computes several lanes or several independent outputs at once.

constexpr int kLanes = 16;

// part[0] + part[1] + ... + part[kLanes - 1], left to right.
template <typename T>
inline T combine_lanes(const T* part) {
  T s = part[0];
  for (int l = 1; l < kLanes; ++l) s += part[l];
  return s;
}

// sum_i x[i] for i < n, accumulated in T.
template <typename T, typename In>
inline T lane_sum(const In* x, int64_t n) {
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += static_cast<T>(x[i + l]);
  for (int l = 0; i < n; ++i, ++l) part[l] += static_cast<T>(x[i]);
  return combine_lanes(part);
}

// sum_i x[i] * y[i] for i < n.
template <typename T>
inline T lane_dot(const T* x, const T* y, int64_t n) {
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += x[i + l] * y[i + l];
  for (int l = 0; i < n; ++i, ++l) part[l] += x[i] * y[i];
  return combine_lanes(part);
}

// out[t] = lane_dot(x + t * ldx, y, n) for t < 4, bit for bit, with each load of y shared by the four.
template <typename T>
inline void lane_dot4(const T* x, int64_t ldx, const T* y, int64_t n, T out[4]) {
  T p0[kLanes] = {}, p1[kLanes] = {}, p2[kLanes] = {}, p3[kLanes] = {};
  const T *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T v = y[i + l];
      p0[l] += x0[i + l] * v;
      p1[l] += x1[i + l] * v;
      p2[l] += x2[i + l] * v;
      p3[l] += x3[i + l] * v;
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const T v = y[i];
    p0[l] += x0[i] * v;
    p1[l] += x1[i] * v;
    p2[l] += x2[i] * v;
    p3[l] += x3[i] * v;
  }
  out[0] = combine_lanes(p0);
  out[1] = combine_lanes(p1);
  out[2] = combine_lanes(p2);
  out[3] = combine_lanes(p3);
}

// C[i * ldc + j] = sum_k A[i * lda + k] * B[j * ldb + k] for i < M, j < N (C = A B^T; every entry equals
// lane_dot of its two rows, whatever M and N).
template <typename T>
inline void gemm_nt(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t M, int64_t N,
                    int64_t K) {
  int64_t j = 0;
  for (; j + 4 <= N; j += 4) {
    for (int64_t i = 0; i < M; ++i) {
      T out[4];
      lane_dot4(B + j * ldb, ldb, A + i * lda, K, out);
      for (int t = 0; t < 4; ++t) C[i * ldc + j + t] = out[t];
    }
  }
  for (; j < N; ++j)
    for (int64_t i = 0; i < M; ++i) C[i * ldc + j] = lane_dot(A + i * lda, B + j * ldb, K);
}

// y[d] += sum_t (scale * c[t * cs]) * X[t * ldx + d] for d < D, adding the rows t = 0, 1, ..., nrows - 1
// in order (vectorised across d only).
template <typename T>
inline void add_weighted_rows(T* y, const T* c, int64_t cs, const T* X, int64_t ldx, int64_t nrows, int64_t D,
                              T scale) {
  for (int64_t t = 0; t < nrows; ++t) {
    const T ct = scale * c[t * cs];
    const T* xt = X + t * ldx;
    for (int64_t d = 0; d < D; ++d) y[d] += ct * xt[d];
  }
}
