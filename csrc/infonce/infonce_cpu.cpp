// InfoNCE / binary NCE between synthetic anchors and real rows: C++ CPU kernels (at::parallel_for over
// row blocks, similarity tiles from det_kernels.h's gemm_nt, fp32 accumulation, double for double inputs;
// the loops are in infonce_cpu_kernels.h, one copy per SIMD path).
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
// Only kRowBlock x kColTile tiles of S exist at any time (one per thread); every output row is written by
// one task, summed in a fixed order, so results do not depend on the thread count or the SIMD path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "infonce_args.h"

namespace fastdd_infonce {
// Sizes and options shared by the kernels of every SIMD path.
struct Problem {
  int64_t Ns, Nr, D;
  int64_t form;  // 0: supcon (multi-positive InfoNCE), 1: nce (binary critic)
  double tau;
};
}  // namespace fastdd_infonce

#define FASTDD_ISA_HEADER "infonce/infonce_cpu_kernels.h"
#include "../isa_variants.h"

namespace fastdd_infonce {
namespace {

using fastdd::checked_labels;
using fastdd::checked_vector;

struct Prepared {
  at::Tensor zs_tau, zr, ls, lr, w, logc;  // zs_tau = syn_scale * syn / tau, zr = real_scale * real
  Problem shape;
};

Prepared prepare(const at::Tensor& syn, const at::Tensor& syn_labels, const at::Tensor& real,
                 const at::Tensor& real_labels, const at::Tensor& syn_scale, const at::Tensor& real_scale,
                 const at::Tensor& weights, const at::Tensor& logc, double tau, int64_t form) {
  fastdd::check_cpu(syn, "syn");
  fastdd::check_cpu(real, "real");
  check_infonce_args(syn, real, weights, tau, form);
  Prepared p;
  p.shape = Problem{syn.size(0), real.size(0), syn.size(1), form, tau};
  const int64_t Ns = p.shape.Ns, Nr = p.shape.Nr;
  const auto acc = fastdd::acc_scalar_type(syn.scalar_type());
  const at::Tensor ss = checked_vector(syn_scale, Ns, acc, "syn_scale");
  const at::Tensor rs = checked_vector(real_scale, Nr, acc, "real_scale");
  p.zs_tau = (syn.to(acc) * (ss / tau).unsqueeze(1)).contiguous();
  p.zr = (real.to(acc) * rs.unsqueeze(1)).contiguous();
  p.ls = checked_labels(syn_labels, Ns, "syn_labels");
  p.lr = checked_labels(real_labels, Nr, "real_labels");
  p.w = weights.to(acc).contiguous();
  p.logc = checked_vector(logc, Ns, acc, "logc");
  return p;
}

std::tuple<at::Tensor, at::Tensor> infonce_fwd(const at::Tensor& syn, const at::Tensor& syn_labels,
                                               const at::Tensor& real, const at::Tensor& real_labels,
                                               const at::Tensor& syn_scale, const at::Tensor& real_scale,
                                               const at::Tensor& weights, const at::Tensor& logc, double tau,
                                               int64_t form) {
  at::NoGradGuard no_grad;
  const Prepared p = prepare(syn, syn_labels, real, real_labels, syn_scale, real_scale, weights, logc, tau, form);
  at::Tensor row_loss = at::empty({p.shape.Ns}, p.zr.options());
  at::Tensor lse = at::zeros({p.shape.Ns}, p.zr.options());
  AT_DISPATCH_FLOATING_TYPES(p.zr.scalar_type(), "infonce_fwd", [&] {
    FASTDD_ISA_DISPATCH(fastdd_infonce,
                        forward<scalar_t>(p.shape, p.zs_tau.const_data_ptr<scalar_t>(), p.zr.const_data_ptr<scalar_t>(),
                                          p.ls.const_data_ptr<int64_t>(), p.lr.const_data_ptr<int64_t>(),
                                          p.w.const_data_ptr<scalar_t>(), p.logc.const_data_ptr<scalar_t>(),
                                          row_loss.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>()));
  });
  return {row_loss, lse};
}

std::tuple<at::Tensor, at::Tensor> infonce_bwd(const at::Tensor& syn, const at::Tensor& syn_labels,
                                               const at::Tensor& real, const at::Tensor& real_labels,
                                               const at::Tensor& syn_scale, const at::Tensor& real_scale,
                                               const at::Tensor& weights, const at::Tensor& logc,
                                               const at::Tensor& lse_in, double tau, int64_t form, bool need_syn,
                                               bool need_real) {
  at::NoGradGuard no_grad;
  const Prepared p = prepare(syn, syn_labels, real, real_labels, syn_scale, real_scale, weights, logc, tau, form);
  const int64_t Ns = p.shape.Ns, Nr = p.shape.Nr, D = p.shape.D;
  const at::Tensor lse = checked_vector(lse_in, Ns, p.zr.scalar_type(), "lse");
  at::Tensor dzs = at::empty({need_syn ? Ns : 0, D}, p.zr.options());
  at::Tensor dzr = at::empty({need_real ? Nr : 0, D}, p.zr.options());
  AT_DISPATCH_FLOATING_TYPES(p.zr.scalar_type(), "infonce_bwd", [&] {
    FASTDD_ISA_DISPATCH(fastdd_infonce,
                        backward<scalar_t>(p.shape, p.zs_tau.const_data_ptr<scalar_t>(),
                                           p.zr.const_data_ptr<scalar_t>(), p.ls.const_data_ptr<int64_t>(),
                                           p.lr.const_data_ptr<int64_t>(), p.w.const_data_ptr<scalar_t>(),
                                           p.logc.const_data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(),
                                           need_syn ? dzs.mutable_data_ptr<scalar_t>() : nullptr,
                                           need_real ? dzr.mutable_data_ptr<scalar_t>() : nullptr));
  });
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
