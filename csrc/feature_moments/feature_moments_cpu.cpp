// Feature-moment kernels, CPU (C++ / OpenMP through at::parallel_for).
//
// Raw kernels registered as torch.ops.fastdd_C.feature_moments*; the op layer
// (fastdd/ops/feature_moments.py) turns their per-row results into per-class statistics, the loss-gradient
// coefficients and the autograd / fake / compile registrations. Shapes and contracts:
//
//   feature_moments(x [R, P], order) -> [R, 4]
//       per row r: the mean mu_r and the biased central moments m2, m3, m4 (m3 = m4 = 0 unless
//       order == 4) over the P columns; two passes over each row while it sits in L1/L2.
//   feature_moments_cols(x [M, C]) -> [C, 2]
//       per column c the mean and the biased variance over the M rows (a channels_last map [N, C, H, W]
//       is [N*H*W, C] row-major): one pass, shifted sums in double over fixed row blocks.
//   feature_moments_class_map(x [N, C, P], order_idx [N], offsets [K+1], order, save_map)
//       -> (amap [K, C, P] or [0], rowstats [K*C, 4])
//       per class k (samples order_idx[offsets[k]:offsets[k+1]], i.e. the labels' stable argsort) the
//       batch-mean map A[k,c,p] = mean_n x[n,c,p] and the moments of each row A[k,c,:] as above (every
//       class all at once, no loop over classes outside); A is returned only when save_map.
//   feature_moments_poly_backward(src [Rs, P], row_index [R] or None, center [Rs], coef [Rs, 4], degree,
//                                 out_dtype) -> out [R, P]
//       out[r,p] = c0 + c1 d + c2 d^2 + c3 d^3, d = src[s,p] - center[s], (c0..c3) = coef[s], s = row_index[r]
//       (or r). Every closed-form gradient of the op has this form, so a backward is one read of x and
//       one write of dx.
//   feature_moments_class_map_backward(amap [K, C, P], order_idx [N], offsets [K+1], center [K*C],
//                                      coef [K*C, 4], degree, out_dtype) -> out [N, C, P]
//       the same polynomial for the batch-average estimator, out[n,c,:] from A[label(n), c, :], computed
//       class-major so that A is read once (CPU only; CUDA uses the row-indexed poly kernel).
//
// Statistics are float64 for float64 input and float32 otherwise; accumulation in double (class-map
// partial sums of <= 32 samples in float for fp32/fp16/bf16 input). The inner loops
// (feature_moments_cpu_kernels.h) are compiled once per SIMD path (csrc/isa_variants.h, FASTDD_SIMD) and
// give bit-identical results on every path and thread count.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common.h"
#include "feature_moments_args.h"

#define FASTDD_ISA_HEADER "feature_moments/feature_moments_cpu_kernels.h"
#include "../isa_variants.h"

namespace fastdd_feature_moments {
namespace {

using at::Tensor;

// Positions per (class, channel-block) work item of the class-map passes (64 KiB of float partial sums).
constexpr int64_t kBlockElems = 16384;

// Run a kernel template of the active SIMD path.
#define FM_ISA_CALL(...) FASTDD_ISA_DISPATCH(fastdd_feature_moments, __VA_ARGS__)


// A fresh large output is written exactly once, so its cost is dominated by first-touch page faults
// (one per 4 KiB page). Ask for transparent huge pages on the 2 MiB-aligned interior before the first
// write (a hint: no effect where THP is off; the memory stays owned by torch's allocator).
Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor t = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (bytes >= 4 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t e = (p + bytes) & ~(kHuge - 1);
    if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// Channels per (class, channel-block) work item: about kBlockElems positions, halved until there are at
// least 4 items per thread.
int64_t channel_block(int64_t K, int64_t C, int64_t P) {
  int64_t cb = std::clamp<int64_t>(kBlockElems / P, 1, C);
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  while (cb > 1 && K * ((C + cb - 1) / cb) < want) cb = (cb + 1) / 2;
  return cb;
}

void check_order(int64_t order) {
  TORCH_CHECK(order == 2 || order == 4, "feature_moments: order must be 2 or 4, got ", order);
}

// Grouping of the samples by class: offsets non-decreasing from 0 to N, order_idx within [0, N).
void check_grouping(const int64_t* oi, const int64_t* off, int64_t N, int64_t K, const char* name,
                    bool nonempty) {
  TORCH_CHECK(off[0] == 0 && off[K] == N, name, ": offsets must run from 0 to N = ", N);
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(off[k + 1] >= off[k], name, ": offsets must be non-decreasing");
    TORCH_CHECK(!nonempty || off[k + 1] > off[k], name, ": class ", k, " has no samples");
  }
  for (int64_t i = 0; i < N; ++i) TORCH_CHECK(oi[i] >= 0 && oi[i] < N, name, ": order_idx out of range");
}

// ------------------------------------------------------------------------------------------------
Tensor rows_cpu(const Tensor& x_in, int64_t order) {
  check_order(order);
  TORCH_CHECK(x_in.dim() == 2, "feature_moments: x must be [R, P], got ", x_in.sizes());
  TORCH_CHECK(x_in.size(1) > 0, "feature_moments: rows must be non-empty");
  const Tensor x = x_in.contiguous();
  const int64_t R = x.size(0), P = x.size(1);
  Tensor out = at::empty({R, 4}, x.options().dtype(fastdd::acc_scalar_type(x.scalar_type())));
  if (R == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "feature_moments_rows", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "feature_moments_rows_out", [&] {
      FM_ISA_CALL(rows_impl<in_t, scalar_t>(x.data_ptr<in_t>(), out.data_ptr<scalar_t>(), R, P, order));
    });
  });
  return out;
}

Tensor cols_cpu(const Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "feature_moments_cols: x must be [M, C], got ", x_in.sizes());
  TORCH_CHECK(x_in.size(0) > 0, "feature_moments_cols: x must have at least one row");
  const Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), C = x.size(1);
  Tensor out = at::empty({C, 2}, x.options().dtype(fastdd::acc_scalar_type(x.scalar_type())));
  if (C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "feature_moments_cols", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "feature_moments_cols_out", [&] {
      FM_ISA_CALL(cols_impl<in_t, scalar_t>(x.data_ptr<in_t>(), out.data_ptr<scalar_t>(), M, C));
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> class_map_cpu(const Tensor& x_in, const Tensor& order_idx_in, const Tensor& offsets_in,
                                         int64_t order, bool save_map) {
  check_order(order);
  TORCH_CHECK(x_in.dim() == 3, "feature_moments_class_map: x must be [N, C, P], got ", x_in.sizes());
  TORCH_CHECK(offsets_in.dim() == 1 && offsets_in.size(0) >= 2,
              "feature_moments_class_map: offsets must be [K+1] with K >= 1");
  const Tensor x = x_in.contiguous();
  const Tensor order_idx = order_idx_in.to(at::kLong).contiguous();
  const Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2);
  const int64_t K = offsets.size(0) - 1;
  TORCH_CHECK(P > 0, "feature_moments_class_map: maps must have at least one position");
  TORCH_CHECK(order_idx.numel() == N, "feature_moments_class_map: order_idx must have N entries");
  const int64_t* oi = order_idx.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_grouping(oi, off, N, K, "feature_moments_class_map", /*nonempty=*/true);
  const auto sdt = fastdd::acc_scalar_type(x.scalar_type());
  Tensor rowstats = at::empty({K * C, 4}, x.options().dtype(sdt));
  Tensor amap = save_map ? empty_output({K, C, P}, x.options().dtype(sdt)) : at::empty({0}, x.options().dtype(sdt));
  if (C == 0) return {amap, rowstats};
  const int64_t cb = channel_block(K, C, P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "feature_moments_class_map", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(sdt, "feature_moments_class_map_out", [&] {
      FM_ISA_CALL(class_map_impl<in_t, scalar_t>(x.data_ptr<in_t>(), oi, off, rowstats.data_ptr<scalar_t>(),
                                                 save_map ? amap.data_ptr<scalar_t>() : nullptr, K, C, P, cb,
                                                 order));
    });
  });
  return {amap, rowstats};
}

Tensor poly_backward_cpu(const Tensor& src_in, const std::optional<Tensor>& row_index, const Tensor& center_in,
                         const Tensor& coef_in, int64_t degree, at::ScalarType out_dtype) {
  const PolyArgs args = poly_args(src_in, row_index, center_in, coef_in, degree, out_dtype);
  const Tensor &src = args.src, &center = args.center, &coef = args.coef;
  const int64_t Rs = args.Rs, R = args.R, P = args.P;
  const auto sdt = args.sdt;
  Tensor out = empty_output({R, P}, src.options().dtype(out_dtype));
  if (R == 0 || P == 0) return out;
  const int64_t* ip = args.idx.defined() ? args.idx.data_ptr<int64_t>() : nullptr;
  if (ip) {
    for (int64_t r = 0; r < R; ++r)
      TORCH_CHECK(ip[r] >= 0 && ip[r] < Rs, "feature_moments_poly_backward: row_index out of range");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "feature_moments_poly_backward", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(sdt, "feature_moments_poly_stat", [&] {
      using st_t = scalar_t;
      const st_t* cp = center.data_ptr<st_t>();
      const st_t* kp = coef.data_ptr<st_t>();
      out_t* op = out.data_ptr<out_t>();
      if (src.scalar_type() == out_dtype) {
        const out_t* sp = src.data_ptr<out_t>();
        if (degree == 1)
          FM_ISA_CALL(poly_loop<out_t, out_t, st_t, 1>(sp, ip, cp, kp, op, R, P));
        else
          FM_ISA_CALL(poly_loop<out_t, out_t, st_t, 3>(sp, ip, cp, kp, op, R, P));
      } else {
        const st_t* sp = src.data_ptr<st_t>();
        if (degree == 1)
          FM_ISA_CALL(poly_loop<st_t, out_t, st_t, 1>(sp, ip, cp, kp, op, R, P));
        else
          FM_ISA_CALL(poly_loop<st_t, out_t, st_t, 3>(sp, ip, cp, kp, op, R, P));
      }
    });
  });
  return out;
}

Tensor class_map_backward_cpu(const Tensor& amap_in, const Tensor& order_idx_in, const Tensor& offsets_in,
                              const Tensor& center_in, const Tensor& coef_in, int64_t degree,
                              at::ScalarType out_dtype) {
  TORCH_CHECK(degree == 1 || degree == 3, "feature_moments_class_map_backward: degree must be 1 or 3");
  TORCH_CHECK(amap_in.dim() == 3, "feature_moments_class_map_backward: amap must be [K, C, P]");
  const Tensor amap = amap_in.contiguous();
  const Tensor order_idx = order_idx_in.to(at::kLong).contiguous();
  const Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t K = amap.size(0), C = amap.size(1), P = amap.size(2);
  const int64_t N = order_idx.numel();
  TORCH_CHECK(offsets.numel() == K + 1, "feature_moments_class_map_backward: offsets must be [K+1]");
  const auto sdt = fastdd::acc_scalar_type(out_dtype);
  TORCH_CHECK(amap.scalar_type() == sdt, "feature_moments_class_map_backward: amap must be ", sdt);
  const Tensor center = center_in.to(sdt).contiguous();
  const Tensor coef = coef_in.to(sdt).contiguous();
  TORCH_CHECK(center.numel() == K * C && coef.numel() == 4 * K * C,
              "feature_moments_class_map_backward: center [K*C] and coef [K*C, 4] expected");
  const int64_t* oi = order_idx.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_grouping(oi, off, N, K, "feature_moments_class_map_backward", /*nonempty=*/false);
  // every output row is written exactly once when order_idx is a permutation of [0, N)
  Tensor out = empty_output({N, C, P}, amap.options().dtype(out_dtype));
  if (N == 0 || C == 0 || P == 0) return out;
  const int64_t cb = channel_block(K, C, P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "feature_moments_class_map_backward", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(sdt, "feature_moments_class_map_backward_stat", [&] {
      using st_t = scalar_t;
      const st_t* ap = amap.data_ptr<st_t>();
      const st_t* cp = center.data_ptr<st_t>();
      const st_t* kp = coef.data_ptr<st_t>();
      out_t* op = out.data_ptr<out_t>();
      if (degree == 1)
        FM_ISA_CALL(class_poly_loop<st_t, out_t, st_t, 1>(ap, oi, off, cp, kp, op, K, C, P, cb));
      else
        FM_ISA_CALL(class_poly_loop<st_t, out_t, st_t, 3>(ap, oi, off, cp, kp, op, K, C, P, cb));
    });
  });
  return out;
}

}  // namespace
}  // namespace fastdd_feature_moments

TORCH_LIBRARY_FRAGMENT(fastdd_C, m) {
  m.def("feature_moments(Tensor x, int order) -> Tensor");
  m.def("feature_moments_cols(Tensor x) -> Tensor");
  m.def(
      "feature_moments_class_map(Tensor x, Tensor order_idx, Tensor offsets, int order, bool save_map)"
      " -> (Tensor, Tensor)");
  m.def(
      "feature_moments_poly_backward(Tensor src, Tensor? row_index, Tensor center, Tensor coef, int degree,"
      " ScalarType out_dtype) -> Tensor");
  m.def(
      "feature_moments_class_map_backward(Tensor amap, Tensor order_idx, Tensor offsets, Tensor center,"
      " Tensor coef, int degree, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdd_C, CPU, m) {
  m.impl("feature_moments", &fastdd_feature_moments::rows_cpu);
  m.impl("feature_moments_cols", &fastdd_feature_moments::cols_cpu);
  m.impl("feature_moments_class_map", &fastdd_feature_moments::class_map_cpu);
  m.impl("feature_moments_poly_backward", &fastdd_feature_moments::poly_backward_cpu);
  m.impl("feature_moments_class_map_backward", &fastdd_feature_moments::class_map_backward_cpu);
}
