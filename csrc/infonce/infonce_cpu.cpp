// InfoNCE / binary NCE between synthetic anchors and real rows: C++ CPU kernels (at::parallel_for over
// row blocks, similarity tiles from BLAS through at::mm, fp32 accumulation, double for double inputs).
//
// Raw kernels in the `fastdd_C` torch library namespace; fastdd/ops/infonce.py wraps them in the
// `fastdd::infonce*` custom ops (weights, row scales and the normalisation backward live there).
// Shapes: syn [Ns, D], real [Nr, D], labels int64/int32; syn_scale [Ns], real_scale [Nr] (z = scale * x);
// weights [2, Ns] (row 0: positive weight v_i, row 1: LSE weight w_i (form 0) or negative weight u_i
// (form 1)); logc [Ns] (form 1); lse [Ns]. s_ij = z_s_i . z_r_j / tau, pos_ij = [syn_labels_i == real_labels_j].
//
//   infonce_fwd -> (row_loss [Ns], lse [Ns]) in the accumulation dtype
//       form 0: row_loss_i = w_i lse_i - v_i sum_j pos_ij s_ij   (online log-sum-exp over column tiles)
//       form 1: row_loss_i = v_i sum_j pos softplus(logc_i - s) + u_i sum_j (1 - pos) softplus(s - logc_i)
//   infonce_bwd -> (dz_syn [Ns, D] or [0, D], dz_real [Nr, D] or [0, D]) in the accumulation dtype:
//       dS_ij = w_i exp(s_ij - lse_i) - v_i pos_ij (form 0), -v_i (1 - h) pos + u_i h (1 - pos) with
//       h = sigmoid(s - logc_i) (form 1); dz_syn = dS Z_r / tau (parallel over syn blocks),
//       dz_real = dS^T Z_s / tau (parallel over real blocks; S^T tiles recomputed).
// Only kBM x kBN tiles of S exist at any time (one per thread); every output row block is written by one
// task in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace fastdd_infonce {
namespace {

constexpr int64_t kBM = 256;   // anchor rows per task / tile
constexpr int64_t kBN = 1024;  // columns per tile

at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_features(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, ": expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, name, ": expected a 2-d tensor [N, D], got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, ": expected a floating dtype, got ", x.scalar_type());
}

at::Tensor checked_labels(const at::Tensor& labels, int64_t n, const char* name) {
  TORCH_CHECK(labels.device().is_cpu(), name, ": expected a CPU tensor, got ", labels.device());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, name, ": expected shape [", n, "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, name,
              ": expected int64 or int32 labels, got ", labels.scalar_type());
  return labels.to(at::kLong).contiguous();
}

at::Tensor checked_vector(const at::Tensor& v, int64_t n, at::ScalarType acc, const char* name) {
  TORCH_CHECK(v.numel() == n, name, ": expected ", n, " entries, got ", v.numel());
  return v.to(acc).reshape({n}).contiguous();
}

struct Prepared {
  at::Tensor zs_tau, zr, ls, lr, w, logc;  // zs_tau = syn_scale * syn / tau, zr = real_scale * real
  int64_t Ns, Nr, D;
  double tau;
};

Prepared prepare(const at::Tensor& syn, const at::Tensor& syn_labels, const at::Tensor& real,
                 const at::Tensor& real_labels, const at::Tensor& syn_scale, const at::Tensor& real_scale,
                 const at::Tensor& weights, const at::Tensor& logc, double tau, int64_t form) {
  check_features(syn, "syn");
  check_features(real, "real");
  TORCH_CHECK(syn.size(1) == real.size(1), "real: feature dimension ", real.size(1), " does not match syn's ",
              syn.size(1));
  TORCH_CHECK(syn.scalar_type() == real.scalar_type(), "real: dtype ", real.scalar_type(), " does not match syn's ",
              syn.scalar_type());
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "temperature: must be a positive finite number, got ", tau);
  TORCH_CHECK(form == 0 || form == 1, "form: expected 0 (supcon) or 1 (nce), got ", form);
  Prepared p;
  p.Ns = syn.size(0);
  p.Nr = real.size(0);
  p.D = syn.size(1);
  p.tau = tau;
  const auto acc = acc_scalar_type(syn.scalar_type());
  const at::Tensor ss = checked_vector(syn_scale, p.Ns, acc, "syn_scale");
  const at::Tensor rs = checked_vector(real_scale, p.Nr, acc, "real_scale");
  p.zs_tau = (syn.to(acc) * (ss / tau).unsqueeze(1)).contiguous();
  p.zr = (real.to(acc) * rs.unsqueeze(1)).contiguous();
  p.ls = checked_labels(syn_labels, p.Ns, "syn_labels");
  p.lr = checked_labels(real_labels, p.Nr, "real_labels");
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == 2 && weights.size(1) == p.Ns, "weights: expected [2, ",
              p.Ns, "], got ", weights.sizes());
  p.w = weights.to(acc).contiguous();
  p.logc = checked_vector(logc, p.Ns, acc, "logc");
  return p;
}

at::Tensor softplus_exact(const at::Tensor& x) { return x.clamp_min(0) + at::log1p(at::exp(-x.abs())); }

// Positive mask of a tile, in the accumulation dtype: rows labelled a[r0:r1], columns b[c0:c1].
at::Tensor pos_mask(const at::Tensor& a, int64_t r0, int64_t r1, const at::Tensor& b, int64_t c0, int64_t c1,
                    at::ScalarType acc) {
  return a.slice(0, r0, r1).unsqueeze(1).eq(b.slice(0, c0, c1).unsqueeze(0)).to(acc);
}

std::tuple<at::Tensor, at::Tensor> infonce_fwd(const at::Tensor& syn, const at::Tensor& syn_labels,
                                               const at::Tensor& real, const at::Tensor& real_labels,
                                               const at::Tensor& syn_scale, const at::Tensor& real_scale,
                                               const at::Tensor& weights, const at::Tensor& logc, double tau,
                                               int64_t form) {
  at::NoGradGuard no_grad;
  const Prepared p = prepare(syn, syn_labels, real, real_labels, syn_scale, real_scale, weights, logc, tau, form);
  const auto acc = p.zr.scalar_type();
  at::Tensor row_loss = at::empty({p.Ns}, p.zr.options());
  at::Tensor lse = at::zeros({p.Ns}, p.zr.options());
  const int64_t nblk = (p.Ns + kBM - 1) / kBM;
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBM, i1 = std::min(p.Ns, i0 + kBM);
      const at::Tensor zi = p.zs_tau.slice(0, i0, i1);
      const at::Tensor v = p.w[0].slice(0, i0, i1), w = p.w[1].slice(0, i0, i1);
      if (form == 0) {
        at::Tensor m = at::full({i1 - i0}, -std::numeric_limits<double>::infinity(), p.zr.options());
        at::Tensor l = at::zeros({i1 - i0}, p.zr.options());
        at::Tensor psum = at::zeros({i1 - i0}, p.zr.options());
        for (int64_t j0 = 0; j0 < p.Nr; j0 += kBN) {
          const int64_t j1 = std::min(p.Nr, j0 + kBN);
          const at::Tensor s = at::mm(zi, p.zr.slice(0, j0, j1).t());
          const at::Tensor m_new = at::maximum(m, std::get<0>(s.max(1)));
          l = l * at::exp(m - m_new) + at::exp(s - m_new.unsqueeze(1)).sum(1);
          m = m_new;
          psum += (s * pos_mask(p.ls, i0, i1, p.lr, j0, j1, acc)).sum(1);
        }
        const at::Tensor lse_b = m + at::log(l);
        lse.slice(0, i0, i1).copy_(lse_b);
        row_loss.slice(0, i0, i1).copy_(w * lse_b - v * psum);
      } else {
        const at::Tensor lc = p.logc.slice(0, i0, i1).unsqueeze(1);
        at::Tensor sp = at::zeros({i1 - i0}, p.zr.options()), sn = at::zeros({i1 - i0}, p.zr.options());
        for (int64_t j0 = 0; j0 < p.Nr; j0 += kBN) {
          const int64_t j1 = std::min(p.Nr, j0 + kBN);
          const at::Tensor s = at::mm(zi, p.zr.slice(0, j0, j1).t());
          const at::Tensor pos = pos_mask(p.ls, i0, i1, p.lr, j0, j1, acc);
          sp += (softplus_exact(lc - s) * pos).sum(1);
          sn += (softplus_exact(s - lc) * (1 - pos)).sum(1);
        }
        row_loss.slice(0, i0, i1).copy_(v * sp + w * sn);
      }
    }
  });
  return {row_loss, lse};
}

// dS for a tile of anchors i0:i1 (rows) against real j0:j1 (columns), given the scores s [i1-i0, j1-j0].
at::Tensor tile_grad(const Prepared& p, const at::Tensor& s, const at::Tensor& lse, int64_t form, int64_t i0,
                     int64_t i1, int64_t j0, int64_t j1) {
  const auto acc = s.scalar_type();
  const at::Tensor pos = pos_mask(p.ls, i0, i1, p.lr, j0, j1, acc);
  const at::Tensor v = p.w[0].slice(0, i0, i1).unsqueeze(1), w = p.w[1].slice(0, i0, i1).unsqueeze(1);
  if (form == 0) return w * at::exp(s - lse.slice(0, i0, i1).unsqueeze(1)) - v * pos;
  const at::Tensor h = at::sigmoid(s - p.logc.slice(0, i0, i1).unsqueeze(1));
  return w * h * (1 - pos) - v * (1 - h) * pos;
}

std::tuple<at::Tensor, at::Tensor> infonce_bwd(const at::Tensor& syn, const at::Tensor& syn_labels,
                                               const at::Tensor& real, const at::Tensor& real_labels,
                                               const at::Tensor& syn_scale, const at::Tensor& real_scale,
                                               const at::Tensor& weights, const at::Tensor& logc,
                                               const at::Tensor& lse_in, double tau, int64_t form, bool need_syn,
                                               bool need_real) {
  at::NoGradGuard no_grad;
  const Prepared p = prepare(syn, syn_labels, real, real_labels, syn_scale, real_scale, weights, logc, tau, form);
  const at::Tensor lse = checked_vector(lse_in, p.Ns, p.zr.scalar_type(), "lse");
  at::Tensor dzs = need_syn ? at::empty({p.Ns, p.D}, p.zr.options()) : at::empty({0, p.D}, p.zr.options());
  at::Tensor dzr = need_real ? at::empty({p.Nr, p.D}, p.zr.options()) : at::empty({0, p.D}, p.zr.options());
  if (need_syn) {
    at::parallel_for(0, (p.Ns + kBM - 1) / kBM, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBM, i1 = std::min(p.Ns, i0 + kBM);
        const at::Tensor zi = p.zs_tau.slice(0, i0, i1);
        at::Tensor out = dzs.slice(0, i0, i1);
        out.zero_();
        for (int64_t j0 = 0; j0 < p.Nr; j0 += kBN) {
          const int64_t j1 = std::min(p.Nr, j0 + kBN);
          const at::Tensor zj = p.zr.slice(0, j0, j1);
          const at::Tensor ds = tile_grad(p, at::mm(zi, zj.t()), lse, form, i0, i1, j0, j1);
          out.addmm_(ds, zj, 1.0, 1.0 / p.tau);
        }
      }
    });
  }
  if (need_real) {
    // one task per block of real rows; S^T tiles against every anchor block (recomputed)
    at::parallel_for(0, (p.Nr + kBM - 1) / kBM, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t j0 = b * kBM, j1 = std::min(p.Nr, j0 + kBM);
        const at::Tensor zj = p.zr.slice(0, j0, j1);
        at::Tensor out = dzr.slice(0, j0, j1);
        out.zero_();
        for (int64_t i0 = 0; i0 < p.Ns; i0 += kBN) {
          const int64_t i1 = std::min(p.Ns, i0 + kBN);
          const at::Tensor zi = p.zs_tau.slice(0, i0, i1);
          const at::Tensor ds = tile_grad(p, at::mm(zi, zj.t()), lse, form, i0, i1, j0, j1);  // [BN_i, BM_j]
          out.addmm_(ds.t(), zi, 1.0, 1.0);  // dS^T Z_s / tau = dS^T zs_tau
        }
      }
    });
  }
  return {dzs, dzr};
}

}  // namespace
}  // namespace fastdd_infonce

TORCH_LIBRARY_FRAGMENT(fastdd_C, m) {
  m.def("infonce_fwd(Tensor syn, Tensor syn_labels, Tensor real, Tensor real_labels, Tensor syn_scale,"
        " Tensor real_scale, Tensor weights, Tensor logc, float temperature, int form) -> (Tensor, Tensor)");
  m.def("infonce_bwd(Tensor syn, Tensor syn_labels, Tensor real, Tensor real_labels, Tensor syn_scale,"
        " Tensor real_scale, Tensor weights, Tensor logc, Tensor lse, float temperature, int form,"
        " bool need_syn, bool need_real) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdd_C, CPU, m) {
  m.impl("infonce_fwd", &fastdd_infonce::infonce_fwd);
  m.impl("infonce_bwd", &fastdd_infonce::infonce_bwd);
}
