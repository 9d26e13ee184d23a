// Inner loops of the CPU InfoNCE kernels (contracts in infonce_cpu.cpp), compiled once per SIMD path by
// csrc/isa_variants.h. No include guard and no includes on purpose.
//
// Pointers: zs [Ns, D] = syn_scale * syn / tau, zr [Nr, D] = real_scale * real, ls [Ns] / lr [Nr] int64
// labels, w [2, Ns] (row 0: v, row 1: w or u), logc [Ns], all in the accumulation type T. Similarity
// tiles come from det_kernels.h's gemm_nt, so s_ij has the same bits in every pass and on every path;
// each output row is owned by one task and summed over tiles in a fixed order.

namespace fastdd_infonce {
namespace FASTDD_ISA {

#include "../det_kernels.h"

constexpr int64_t kRowBlock = 32;   // output rows per task
constexpr int64_t kColTile = 256;   // columns per similarity tile

template <typename T>
inline T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// dL/ds_ij for one similarity s of anchor i (weights v, w, log-partition lse or logc) and positivity pos.
template <typename T>
inline T score_grad(T s, bool pos, T v, T w, T lse, T logc, int64_t form) {
  if (form == 0) return w * std::exp(s - lse) - (pos ? v : T(0));
  const T h = sigmoid(s - logc);
  return pos ? -v * (T(1) - h) : w * h;
}

// row_loss [Ns] and lse [Ns] (form 0; lse untouched for form 1).
template <typename T>
void forward(const Problem& p, const T* zs, const T* zr, const int64_t* ls, const int64_t* lr, const T* wts,
             const T* logc, T* row_loss, T* lse) {
  const int64_t nblk = (p.Ns + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> s(static_cast<size_t>(kRowBlock * kColTile));
    T acc0[kRowBlock], acc1[kRowBlock], acc2[kRowBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kRowBlock, ni = std::min(p.Ns, i0 + kRowBlock) - i0;
      for (int64_t r = 0; r < ni; ++r) {  // form 0: running max, scaled sum, positive sum; form 1: two sums
        acc0[r] = p.form == 0 ? -std::numeric_limits<T>::infinity() : T(0);
        acc1[r] = T(0);
        acc2[r] = T(0);
      }
      for (int64_t j0 = 0; j0 < p.Nr; j0 += kColTile) {
        const int64_t nj = std::min(p.Nr, j0 + kColTile) - j0;
        gemm_nt(zs + i0 * p.D, p.D, zr + j0 * p.D, p.D, s.data(), nj, ni, nj, p.D);
        for (int64_t r = 0; r < ni; ++r) {
          const T* sr = s.data() + r * nj;
          const int64_t li = ls[i0 + r];
          if (p.form == 0) {
            T mx = acc0[r];
            for (int64_t j = 0; j < nj; ++j) mx = std::max(mx, sr[j]);
            T e = T(0), ps = T(0);
            for (int64_t j = 0; j < nj; ++j) {
              e += std::exp(sr[j] - mx);
              if (lr[j0 + j] == li) ps += sr[j];
            }
            acc1[r] = acc1[r] * std::exp(acc0[r] - mx) + e;
            acc0[r] = mx;
            acc2[r] += ps;
          } else {
            const T lc = logc[i0 + r];
            T sp = T(0), sn = T(0);
            for (int64_t j = 0; j < nj; ++j) {
              if (lr[j0 + j] == li)
                sp += softplus(lc - sr[j]);
              else
                sn += softplus(sr[j] - lc);
            }
            acc1[r] += sp;
            acc2[r] += sn;
          }
        }
      }
      for (int64_t r = 0; r < ni; ++r) {
        const int64_t i = i0 + r;
        const T v = wts[i], w = wts[p.Ns + i];
        if (p.form == 0) {
          const T l = acc0[r] + std::log(acc1[r]);
          lse[i] = l;
          row_loss[i] = w * l - v * acc2[r];
        } else {
          row_loss[i] = v * acc1[r] + w * acc2[r];
        }
      }
    }
  });
}

// One gradient pass: out [n_out, D] (zeroed here) in blocks of kRowBlock rows, one task per block; for
// every tile of kColTile rows of the other side, in order, tile(buffer, o0, no, t0, nt) adds its terms.
template <typename T, typename Tile>
void gradient_pass(int64_t n_out, int64_t n_other, int64_t D, T* out, Tile&& tile) {
  at::parallel_for(0, (n_out + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(static_cast<size_t>(kRowBlock * kColTile));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o0 = b * kRowBlock, no = std::min(n_out, o0 + kRowBlock) - o0;
      std::fill(out + o0 * D, out + (o0 + no) * D, T(0));
      for (int64_t t0 = 0; t0 < n_other; t0 += kColTile)
        tile(buf.data(), o0, no, t0, std::min(n_other, t0 + kColTile) - t0);
    }
  });
}

// dzs [Ns, D] (if dzs) and dzr [Nr, D] (if dzr) of sum_i row_loss_i: dzs_i = sum_j dS_ij zr_j / tau,
// dzr_j = sum_i dS_ij zs_i (zs already carries 1 / tau). Each pass recomputes its similarity tiles.
template <typename T>
void backward(const Problem& p, const T* zs, const T* zr, const int64_t* ls, const int64_t* lr, const T* wts,
              const T* logc, const T* lse, T* dzs, T* dzr) {
  const T inv_tau = static_cast<T>(1.0 / p.tau);
  // dS of anchors i0..i0+ni (rows) against real rows j0..j0+nj (columns), in s [ni, nj].
  auto score_grads = [&](T* s, int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
    gemm_nt(zs + i0 * p.D, p.D, zr + j0 * p.D, p.D, s, nj, ni, nj, p.D);
    for (int64_t r = 0; r < ni; ++r) {
      const int64_t i = i0 + r;
      const T v = wts[i], w = wts[p.Ns + i];
      const T l = p.form == 0 ? lse[i] : T(0), lc = p.form == 1 ? logc[i] : T(0);
      for (int64_t j = 0; j < nj; ++j)
        s[r * nj + j] = score_grad(s[r * nj + j], lr[j0 + j] == ls[i], v, w, l, lc, p.form);
    }
  };
  if (dzs != nullptr)
    gradient_pass(p.Ns, p.Nr, p.D, dzs, [&](T* s, int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
      score_grads(s, i0, ni, j0, nj);
      for (int64_t r = 0; r < ni; ++r)
        add_weighted_rows(dzs + (i0 + r) * p.D, s + r * nj, 1, zr + j0 * p.D, p.D, nj, p.D, inv_tau);
    });
  if (dzr != nullptr)
    gradient_pass(p.Nr, p.Ns, p.D, dzr, [&](T* s, int64_t j0, int64_t nj, int64_t i0, int64_t ni) {
      score_grads(s, i0, ni, j0, nj);
      for (int64_t c = 0; c < nj; ++c)
        add_weighted_rows(dzr + (j0 + c) * p.D, s + c, nj, zs + i0 * p.D, p.D, ni, p.D, T(1));
    });
}

}  // namespace FASTDD_ISA
}  // namespace fastdd_infonce
