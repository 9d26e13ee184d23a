// Per-class MMD: C++ (OpenMP through ATen's parallel_for) CPU kernels.
//
// Raw kernels registered in the `fastdd_C` torch library namespace; the Python op layer
// (fastdd/ops/class_mmd.py) wraps them in the `fastdd::class_mmd*` custom ops with fake kernels and
// autograd. Shapes: real [Nr, D], syn [Ns, D], labels int64/int32 [Nr] / [Ns] in [0, K).
// Accumulation is in double for double inputs and in float otherwise; partial losses are summed in
// double in a fixed order, so the result does not depend on the thread count.
//
//   class_mmd_fwd   -> (loss [] in real.dtype, diff [K, D] = mean_real - mean_syn (acc dtype),
//                       inv_nr [K], inv_ns [K] = 1 / class counts (0 for an empty class), acc dtype)
//   class_mmd_bwd   -> (grad_real [Nr, D] or [0, D], grad_syn [Ns, D] or [0, D]) in `dtype`
//                       grad_real[i] = 2 g inv_nr[c_i] diff[c_i], grad_syn[j] = -2 g inv_ns[c_j] diff[c_j]
//   class_means     -> [K, D] per-class mean of x in x.dtype (zeros for an empty class)
//   gaussian_class_mmd_fwd / _bwd: sum over classes of the biased MMD^2 with
//                       k(x, y) = sum_b exp(-||x - y||^2 / (2 sigma_b^2)), tiled per class (rows grouped by
//                       a counting sort), Gram tiles from det_kernels.h (class_mmd_cpu_kernels.h, one copy
//                       per SIMD path), never more than a kTile x kTile block.
// Every output is summed in a fixed order: the results depend neither on the thread count nor on the SIMD
// path (csrc/common.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../common.h"

#define FASTDD_ISA_HEADER "class_mmd/class_mmd_cpu_kernels.h"
#include "../isa_variants.h"

namespace fastdd_class_mmd {
namespace {

using fastdd::AccOf;
using fastdd::acc_scalar_type;
using fastdd::check_features;
using fastdd::checked_labels;
using fastdd::count_labels;

constexpr int64_t kGranule = 16;   // columns per partial loss (fixed: the sum order ignores the threads)

// Columns per task of the segmented reductions: about four tasks per thread, a multiple of kGranule.
int64_t column_block(int64_t D) {
  const int64_t tasks = 4 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t cols = ((D + tasks - 1) / tasks + kGranule - 1) / kGranule * kGranule;
  return std::clamp<int64_t>(cols, kGranule, 256);
}
template <typename acc_t>
at::Tensor inverse_counts(const std::vector<int64_t>& counts, at::ScalarType acc) {
  at::Tensor inv = at::empty({static_cast<int64_t>(counts.size())}, at::TensorOptions().dtype(acc));
  acc_t* p = inv.mutable_data_ptr<acc_t>();
  for (size_t c = 0; c < counts.size(); ++c) p[c] = counts[c] > 0 ? acc_t(1) / acc_t(counts[c]) : acc_t(0);
  return inv;
}

// out[c, d0:d1] += x[i, d0:d1] for every row i of class c (one pass over the rows, vectorised over d).
template <typename scalar_t, typename acc_t>
inline void segment_sum_cols(const scalar_t* x, const int64_t* labels, int64_t n, int64_t D, int64_t d0,
                             int64_t d1, acc_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* xr = x + i * D;
    acc_t* o = out + labels[i] * D;
    for (int64_t d = d0; d < d1; ++d) o[d] += static_cast<acc_t>(xr[d]);
  }
}

// ------------------------------------------------------------------------------------------ linear MMD
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> class_mmd_fwd(const at::Tensor& real_in,
                                                                         const at::Tensor& real_labels_in,
                                                                         const at::Tensor& syn_in,
                                                                         const at::Tensor& syn_labels_in,
                                                                         int64_t K) {
  at::NoGradGuard no_grad;
  fastdd::check_feature_pair(real_in, "real", syn_in, "syn");
  TORCH_CHECK(K >= 1, "num_classes: must be >= 1, got ", K);
  const at::Tensor real = real_in.contiguous(), syn = syn_in.contiguous();
  const at::Tensor rl = checked_labels(real_labels_in, real.size(0), "real_labels");
  const at::Tensor sl = checked_labels(syn_labels_in, syn.size(0), "syn_labels");
  const int64_t Nr = real.size(0), Ns = syn.size(0), D = real.size(1);
  const auto acc = acc_scalar_type(real.scalar_type());
  const auto cr = count_labels(rl, K, "real_labels");
  const auto cs = count_labels(sl, K, "syn_labels");

  at::Tensor diff = at::zeros({K, D}, real.options().dtype(acc));
  at::Tensor loss;
  at::Tensor inv_nr, inv_ns;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, real.scalar_type(), "class_mmd_fwd", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    inv_nr = inverse_counts<acc_t>(cr, acc);
    inv_ns = inverse_counts<acc_t>(cs, acc);
    at::Tensor syn_sum = at::zeros({K, D}, real.options().dtype(acc));
    const scalar_t* pr = real.const_data_ptr<scalar_t>();
    const scalar_t* ps = syn.const_data_ptr<scalar_t>();
    const int64_t* plr = rl.const_data_ptr<int64_t>();
    const int64_t* pls = sl.const_data_ptr<int64_t>();
    const acc_t* ir = inv_nr.const_data_ptr<acc_t>();
    const acc_t* is = inv_ns.const_data_ptr<acc_t>();
    acc_t* pd = diff.mutable_data_ptr<acc_t>();
    acc_t* pss = syn_sum.mutable_data_ptr<acc_t>();
    const int64_t cb = column_block(D);
    const int64_t nblk = (D + cb - 1) / cb;
    std::vector<double> partial((D + kGranule - 1) / kGranule, 0.0);
    // Each task owns a range of columns for every class: read its slice of every row once, then turn the
    // sums into means, the difference and the squared norm of that slice (per 16-column granule).
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      const int64_t d0 = b0 * cb, d1 = std::min(D, b1 * cb);
      segment_sum_cols(pr, plr, Nr, D, d0, d1, pd);
      segment_sum_cols(ps, pls, Ns, D, d0, d1, pss);
      for (int64_t e0 = d0; e0 < d1; e0 += kGranule) {
        const int64_t e1 = std::min(d1, e0 + kGranule);
        double total = 0.0;
        for (int64_t c = 0; c < K; ++c) {
          acc_t* dc = pd + c * D;
          const acc_t* sc = pss + c * D;
          const acc_t a = ir[c], s = is[c];
          acc_t part = 0;
          for (int64_t d = e0; d < e1; ++d) {
            const acc_t v = dc[d] * a - sc[d] * s;
            dc[d] = v;
            part += v * v;
          }
          total += static_cast<double>(part);
        }
        partial[e0 / kGranule] = total;
      }
    });
    double total = 0.0;
    for (double p : partial) total += p;
    loss = at::scalar_tensor(total, real.options());
  });
  return {loss, diff, inv_nr, inv_ns};
}

std::tuple<at::Tensor, at::Tensor> class_mmd_bwd(const at::Tensor& grad, const at::Tensor& diff_in,
                                                 const at::Tensor& inv_nr_in, const at::Tensor& inv_ns_in,
                                                 const at::Tensor& real_labels_in, const at::Tensor& syn_labels_in,
                                                 bool need_real, bool need_syn, at::ScalarType dtype) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(grad.numel() == 1, "grad: expected a scalar gradient, got shape ", grad.sizes());
  TORCH_CHECK(diff_in.dim() == 2, "diff: expected [K, D], got ", diff_in.sizes());
  const at::Tensor diff = diff_in.contiguous();
  const int64_t K = diff.size(0), D = diff.size(1);
  const auto acc = diff.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "diff: expected float32 or float64, got ", acc);
  const at::Tensor inv_nr = inv_nr_in.to(acc).contiguous(), inv_ns = inv_ns_in.to(acc).contiguous();
  TORCH_CHECK(inv_nr.numel() == K && inv_ns.numel() == K, "inv_nr/inv_ns: expected ", K, " entries");
  const double g = grad.item<double>();
  auto one_side = [&](const at::Tensor& labels_in, const at::Tensor& inv, double sign, bool need,
                      const char* name) {
    const int64_t n = labels_in.size(0);
    if (!need) return at::empty({0, D}, diff.options().dtype(dtype));
    const at::Tensor labels = checked_labels(labels_in, n, name);
    const int64_t* pl = labels.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(pl[i] >= 0 && pl[i] < K, name, ": label ", pl[i], " at index ", i, " is outside [0, ", K, ")");
    at::Tensor out = at::empty({n, D}, diff.options().dtype(dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "class_mmd_bwd", [&] {
      // diff / inv are float, or double for double inputs: `run` is instantiated for both
      auto run = [&](const auto* pdiff, const auto* pinv) {
        using dacc_t = std::remove_const_t<std::remove_pointer_t<decltype(pdiff)>>;
        std::vector<dacc_t> coef(K);
        for (int64_t c = 0; c < K; ++c) coef[c] = static_cast<dacc_t>(sign * 2.0 * g) * pinv[c];
        scalar_t* po = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const dacc_t a = coef[pl[i]];
            const dacc_t* dr = pdiff + pl[i] * D;
            scalar_t* orow = po + i * D;
            for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<scalar_t>(a * dr[d]);
          }
        });
      };
      if (acc == at::kDouble)
        run(diff.const_data_ptr<double>(), inv.const_data_ptr<double>());
      else
        run(diff.const_data_ptr<float>(), inv.const_data_ptr<float>());
    });
    return out;
  };
  at::Tensor gr = one_side(real_labels_in, inv_nr, 1.0, need_real, "real_labels");
  at::Tensor gs = one_side(syn_labels_in, inv_ns, -1.0, need_syn, "syn_labels");
  return {gr, gs};
}

at::Tensor class_means(const at::Tensor& x_in, const at::Tensor& labels_in, int64_t K) {
  at::NoGradGuard no_grad;
  check_features(x_in, "x");
  TORCH_CHECK(K >= 1, "num_classes: must be >= 1, got ", K);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor labels = checked_labels(labels_in, x.size(0), "labels");
  const int64_t N = x.size(0), D = x.size(1);
  const auto acc = acc_scalar_type(x.scalar_type());
  const auto counts = count_labels(labels, K, "labels");
  at::Tensor sums = at::zeros({K, D}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_means", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const at::Tensor inv = inverse_counts<acc_t>(counts, acc);
    const acc_t* pi = inv.const_data_ptr<acc_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const int64_t* pl = labels.const_data_ptr<int64_t>();
    acc_t* ps = sums.mutable_data_ptr<acc_t>();
    const int64_t cb = column_block(D);
    const int64_t nblk = (D + cb - 1) / cb;
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      const int64_t d0 = b0 * cb, d1 = std::min(D, b1 * cb);
      segment_sum_cols(px, pl, N, D, d0, d1, ps);
      for (int64_t c = 0; c < K; ++c)
        for (int64_t d = d0; d < d1; ++d) ps[c * D + d] *= pi[c];
    });
  });
  return sums.scalar_type() == x.scalar_type() ? sums : sums.to(x.scalar_type());
}

// ---------------------------------------------------------------------------------------- Gaussian MMD
// Rows of each class, by a stable counting sort: rows of class c are order[offsets[c] : offsets[c + 1]].
struct Grouping {
  std::vector<int64_t> counts, offsets, order;
};

Grouping group_rows(const at::Tensor& labels, int64_t K, const char* name) {
  Grouping g;
  g.counts = count_labels(labels, K, name);
  g.offsets.assign(K + 1, 0);
  for (int64_t c = 0; c < K; ++c) g.offsets[c + 1] = g.offsets[c] + g.counts[c];
  g.order.resize(labels.numel());
  std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
  const int64_t* l = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = labels.numel(); i < n; ++i) g.order[next[l[i]]++] = i;
  return g;
}

// Rows of one class in the accumulation dtype, with their squared norms.
struct ClassRows {
  at::Tensor index;  // int64 [n] rows of the class in the input
  at::Tensor x;      // [n, D] rows in the accumulation dtype, contiguous
  at::Tensor norms;  // [n] squared norms
};

ClassRows class_rows(const at::Tensor& x, const Grouping& g, int64_t c, at::ScalarType acc) {
  ClassRows r;
  const int64_t n = g.counts[c];
  r.index = at::from_blob(const_cast<int64_t*>(g.order.data()) + g.offsets[c], {n}, at::kLong);
  r.x = x.index_select(0, r.index).to(acc).contiguous();
  r.norms = at::empty({n}, r.x.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "class_rows", [&] {
    FASTDD_ISA_DISPATCH(fastdd_class_mmd, row_norms<scalar_t>(r.x.const_data_ptr<scalar_t>(), n, x.size(1),
                                                              r.norms.mutable_data_ptr<scalar_t>()));
  });
  return r;
}

template <typename acc_t>
double pair_sum(const ClassRows& a, const ClassRows& b, const std::vector<acc_t>& gamma, bool symmetric) {
  double total = 0.0;
  FASTDD_ISA_DISPATCH(fastdd_class_mmd,
                      pair_kernel_sum<acc_t>(a.x.const_data_ptr<acc_t>(), a.norms.const_data_ptr<acc_t>(),
                                             a.x.size(0), b.x.const_data_ptr<acc_t>(), b.norms.const_data_ptr<acc_t>(),
                                             b.x.size(0), a.x.size(1), gamma.data(),
                                             static_cast<int64_t>(gamma.size()), symmetric, &total));
  return total;
}

template <typename acc_t>
void pair_grad(const ClassRows& a, const ClassRows& b, const std::vector<acc_t>& gamma, bool symmetric, double ca,
               double cb, at::Tensor& ga, acc_t* rowa, at::Tensor* gb, acc_t* rowb) {
  FASTDD_ISA_DISPATCH(fastdd_class_mmd,
                      pair_kernel_grad<acc_t>(a.x.const_data_ptr<acc_t>(), a.norms.const_data_ptr<acc_t>(),
                                              a.x.size(0), b.x.const_data_ptr<acc_t>(),
                                              b.norms.const_data_ptr<acc_t>(), b.x.size(0), a.x.size(1),
                                              gamma.data(), static_cast<int64_t>(gamma.size()), symmetric, ca, cb,
                                              ga.mutable_data_ptr<acc_t>(), rowa,
                                              gb != nullptr ? gb->mutable_data_ptr<acc_t>() : nullptr, rowb));
}

template <typename acc_t>
std::vector<acc_t> gammas(const std::vector<double>& bandwidths) {
  TORCH_CHECK(!bandwidths.empty(), "bandwidths: expected at least one bandwidth");
  std::vector<acc_t> out;
  for (double s : bandwidths) {
    TORCH_CHECK(std::isfinite(s) && s > 0, "bandwidths: every bandwidth must be a positive finite number, got ", s);
    out.push_back(static_cast<acc_t>(1.0 / (2.0 * s * s)));
  }
  return out;
}

// Checks and groups the rows of both sides by class, then runs body(c, R, S, gamma) for every class c with
// rows (in parallel over classes; gamma is a std::vector of the accumulation type).
template <typename Body>
void for_each_class(const at::Tensor& real, const at::Tensor& real_labels_in, const at::Tensor& syn,
                    const at::Tensor& syn_labels_in, int64_t K, at::ArrayRef<double> bandwidths, Body&& body) {
  fastdd::check_feature_pair(real, "real", syn, "syn");
  TORCH_CHECK(K >= 1, "num_classes: must be >= 1, got ", K);
  const at::Tensor rl = checked_labels(real_labels_in, real.size(0), "real_labels");
  const at::Tensor sl = checked_labels(syn_labels_in, syn.size(0), "syn_labels");
  const Grouping gr = group_rows(rl, K, "real_labels"), gs = group_rows(sl, K, "syn_labels");
  const auto acc = acc_scalar_type(real.scalar_type());
  const std::vector<double> bws(bandwidths.begin(), bandwidths.end());
  AT_DISPATCH_FLOATING_TYPES(acc, "gaussian_class_mmd", [&] {
    const auto gamma = gammas<scalar_t>(bws);
    at::parallel_for(0, K, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        if (gr.counts[c] == 0 && gs.counts[c] == 0) continue;
        body(c, class_rows(real, gr, c, acc), class_rows(syn, gs, c, acc), gamma);
      }
    });
  });
}

at::Tensor gaussian_class_mmd_fwd(const at::Tensor& real, const at::Tensor& real_labels, const at::Tensor& syn,
                                  const at::Tensor& syn_labels, int64_t K, at::ArrayRef<double> bandwidths) {
  at::NoGradGuard no_grad;
  std::vector<double> per_class(std::max<int64_t>(K, 0), 0.0);
  for_each_class(real, real_labels, syn, syn_labels, K, bandwidths,
                 [&](int64_t c, const ClassRows& R, const ClassRows& S, const auto& gamma) {
                   using acc_t = typename std::decay_t<decltype(gamma)>::value_type;
                   const int64_t nr = R.x.size(0), ns = S.x.size(0);
                   double v = 0.0;
                   if (nr > 0) v += pair_sum<acc_t>(R, R, gamma, true) / (double(nr) * nr);
                   if (ns > 0) v += pair_sum<acc_t>(S, S, gamma, true) / (double(ns) * ns);
                   if (nr > 0 && ns > 0) v -= 2.0 * pair_sum<acc_t>(R, S, gamma, false) / (double(nr) * ns);
                   per_class[c] = v;
                 });
  double total = 0.0;
  for (double v : per_class) total += v;
  return at::scalar_tensor(total, real.options());
}

std::tuple<at::Tensor, at::Tensor> gaussian_class_mmd_bwd(const at::Tensor& grad, const at::Tensor& real,
                                                          const at::Tensor& real_labels, const at::Tensor& syn,
                                                          const at::Tensor& syn_labels, int64_t K,
                                                          at::ArrayRef<double> bandwidths, bool need_real,
                                                          bool need_syn) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(grad.numel() == 1, "grad: expected a scalar gradient, got shape ", grad.sizes());
  fastdd::check_feature_pair(real, "real", syn, "syn");
  const int64_t D = real.size(1);
  const double g = grad.item<double>();
  at::Tensor out_r = at::empty({need_real ? real.size(0) : 0, D}, real.options());
  at::Tensor out_s = at::empty({need_syn ? syn.size(0) : 0, D}, syn.options());
  for_each_class(real, real_labels, syn, syn_labels, K, bandwidths,
                 [&](int64_t, const ClassRows& R, const ClassRows& S, const auto& gamma) {
    using acc_t = typename std::decay_t<decltype(gamma)>::value_type;
    const int64_t nr = R.x.size(0), ns = S.x.size(0);
    // d/dr_i = -(2/nr^2) sum_i' W (r_i - r_i') + (2/(nr ns)) sum_j W (r_i - s_j), and symmetrically for s.
    const double c_rr = nr > 0 ? -2.0 * g / (double(nr) * nr) : 0.0;
    const double c_ss = ns > 0 ? -2.0 * g / (double(ns) * ns) : 0.0;
    const double c_rs = (nr > 0 && ns > 0) ? 2.0 * g / (double(nr) * ns) : 0.0;
    at::Tensor gR = at::zeros({nr, D}, R.x.options()), gS = at::zeros({ns, D}, S.x.options());
    std::vector<acc_t> rowR(nr, acc_t(0)), rowS(ns, acc_t(0));
    if (need_real && nr > 0) pair_grad<acc_t>(R, R, gamma, true, c_rr, 0.0, gR, rowR.data(), nullptr, nullptr);
    if (need_syn && ns > 0) pair_grad<acc_t>(S, S, gamma, true, c_ss, 0.0, gS, rowS.data(), nullptr, nullptr);
    if (nr > 0 && ns > 0 && (need_real || need_syn))
      pair_grad<acc_t>(R, S, gamma, false, c_rs, c_rs, gR, rowR.data(), &gS, rowS.data());
    auto finish = [&](at::Tensor& gX, const ClassRows& X, const std::vector<acc_t>& rows, at::Tensor& out) {
      FASTDD_ISA_DISPATCH(fastdd_class_mmd, add_scaled_rows<acc_t>(gX.mutable_data_ptr<acc_t>(), rows.data(),
                                                                   X.x.const_data_ptr<acc_t>(), X.x.size(0), D));
      out.index_copy_(0, X.index, gX.to(out.scalar_type()));
    };
    if (need_real && nr > 0) finish(gR, R, rowR, out_r);
    if (need_syn && ns > 0) finish(gS, S, rowS, out_s);
  });
  return {out_r, out_s};
}

}  // namespace
}  // namespace fastdd_class_mmd

TORCH_LIBRARY_FRAGMENT(fastdd_C, m) {
  m.def("class_mmd_fwd(Tensor real, Tensor real_labels, Tensor syn, Tensor syn_labels, int num_classes)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("class_mmd_bwd(Tensor grad, Tensor diff, Tensor inv_nr, Tensor inv_ns, Tensor real_labels,"
        " Tensor syn_labels, bool need_real, bool need_syn, ScalarType dtype) -> (Tensor, Tensor)");
  m.def("class_means(Tensor x, Tensor labels, int num_classes) -> Tensor");
  m.def("gaussian_class_mmd_fwd(Tensor real, Tensor real_labels, Tensor syn, Tensor syn_labels,"
        " int num_classes, float[] bandwidths) -> Tensor");
  m.def("gaussian_class_mmd_bwd(Tensor grad, Tensor real, Tensor real_labels, Tensor syn, Tensor syn_labels,"
        " int num_classes, float[] bandwidths, bool need_real, bool need_syn) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdd_C, CPU, m) {
  m.impl("class_mmd_fwd", &fastdd_class_mmd::class_mmd_fwd);
  m.impl("class_mmd_bwd", &fastdd_class_mmd::class_mmd_bwd);
  m.impl("class_means", &fastdd_class_mmd::class_means);
  m.impl("gaussian_class_mmd_fwd", &fastdd_class_mmd::gaussian_class_mmd_fwd);
  m.impl("gaussian_class_mmd_bwd", &fastdd_class_mmd::gaussian_class_mmd_bwd);
}
