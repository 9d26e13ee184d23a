// Feature-moment kernels, CUDA. Same three raw kernels and contracts as feature_moments_cpu.cpp (see the
// header there); registered for the CUDA dispatch key of torch.ops.fastdd_C.feature_moments*. The schemas are
// defined once, in the CPU file. Accumulation in float (double for double input); fp16 / bf16 / fp32 / fp64.
//
//   feature_moments               one warp per row: two sweeps (sum, then central powers), shuffle reduction.
//   feature_moments_class_map     grid (K*C, P/256): per class k and channel c, each thread sums its
//                                 position over the class's samples (segmented reduction, all classes in
//                                 one launch), then the row kernel runs on the [K*C, P] map.
//   feature_moments_poly_backward grid (R, P/256): out = c0 + d (c1 + d (c2 + d c3)), d = src - center.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "feature_moments_args.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace fastdd_feature_moments_cuda {
namespace {

using at::Tensor;

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // warps per block in the row kernel
constexpr int kThreads = 256;

using fastdd::acc_scalar_type;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename in_t, typename acc_t, int ORDER>
__global__ void rows_kernel(const in_t* __restrict__ x, acc_t* __restrict__ out, int64_t R, int64_t P) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= R) return;  // whole warp exits together
  const in_t* row = x + r * P;
  acc_t s = 0;
  for (int64_t p = lane; p < P; p += kWarp) s += static_cast<acc_t>(row[p]);
  const acc_t mu = warp_sum(s) / static_cast<acc_t>(P);
  acc_t s2 = 0, s3 = 0, s4 = 0;
  for (int64_t p = lane; p < P; p += kWarp) {
    const acc_t d = static_cast<acc_t>(row[p]) - mu;
    const acc_t d2 = d * d;
    s2 += d2;
    if constexpr (ORDER == 4) {
      s3 += d2 * d;
      s4 += d2 * d2;
    }
  }
  s2 = warp_sum(s2);
  if constexpr (ORDER == 4) {
    s3 = warp_sum(s3);
    s4 = warp_sum(s4);
  }
  if (lane == 0) {
    const acc_t inv = acc_t(1) / static_cast<acc_t>(P);
    out[r * 4 + 0] = mu;
    out[r * 4 + 1] = s2 * inv;
    out[r * 4 + 2] = s3 * inv;
    out[r * 4 + 3] = s4 * inv;
  }
}

template <typename in_t, typename acc_t>
__global__ void class_map_kernel(const in_t* __restrict__ x, const int64_t* __restrict__ idx,
                                 const int64_t* __restrict__ offsets, acc_t* __restrict__ amap, int64_t C,
                                 int64_t P) {
  const int64_t kc = blockIdx.x;
  const int64_t p = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (p >= P) return;
  const int64_t k = kc / C, c = kc % C;
  const int64_t start = offsets[k], end = offsets[k + 1];
  acc_t s = 0;
  for (int64_t i = start; i < end; ++i) s += static_cast<acc_t>(x[(idx[i] * C + c) * P + p]);
  amap[kc * P + p] = s / static_cast<acc_t>(end - start);
}

template <typename src_t, typename out_t, typename st_t, int DEG>
__global__ void poly_kernel(const src_t* __restrict__ src, const int64_t* __restrict__ idx,
                            const st_t* __restrict__ center, const st_t* __restrict__ coef, out_t* __restrict__ out,
                            int64_t P) {
  const int64_t r = blockIdx.x;
  const int64_t p = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (p >= P) return;
  const int64_t sr = idx != nullptr ? idx[r] : r;
  const st_t d = static_cast<st_t>(src[sr * P + p]) - center[sr];
  const st_t* a = coef + sr * 4;
  st_t v;
  if constexpr (DEG == 1)
    v = a[0] + a[1] * d;
  else
    v = a[0] + d * (a[1] + d * (a[2] + d * a[3]));
  out[r * P + p] = static_cast<out_t>(v);
}

void check_order(int64_t order) {
  TORCH_CHECK(order == 2 || order == 4, "feature_moments: order must be 2 or 4, got ", order);
}

void launch_rows(const Tensor& x, Tensor& out, int64_t order) {
  const int64_t R = x.size(0), P = x.size(1);
  if (R == 0) return;
  const dim3 grid(static_cast<unsigned>((R + kRowsPerBlock - 1) / kRowsPerBlock));
  const dim3 block(kRowsPerBlock * kWarp);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "feature_moments_rows_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (order == 4)
      rows_kernel<scalar_t, acc_t, 4><<<grid, block, 0, stream>>>(x.data_ptr<scalar_t>(), out.data_ptr<acc_t>(), R, P);
    else
      rows_kernel<scalar_t, acc_t, 2><<<grid, block, 0, stream>>>(x.data_ptr<scalar_t>(), out.data_ptr<acc_t>(), R, P);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor rows_cuda(const Tensor& x_in, int64_t order) {
  check_order(order);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) > 0, "feature_moments: x must be [R, P] with P > 0");
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  Tensor out = at::empty({x.size(0), 4}, x.options().dtype(acc_scalar_type(x.scalar_type())));
  launch_rows(x, out, order);
  return out;
}

std::tuple<Tensor, Tensor> class_map_cuda(const Tensor& x_in, const Tensor& idx_in, const Tensor& offsets_in,
                                          int64_t order, bool save_map) {
  check_order(order);
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(2) > 0, "feature_moments_class_map: x must be [N, C, P], P > 0");
  TORCH_CHECK(offsets_in.dim() == 1 && offsets_in.size(0) >= 2, "feature_moments_class_map: offsets [K+1]");
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor idx = idx_in.to(at::kLong).contiguous();
  const Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t C = x.size(1), P = x.size(2), K = offsets.size(0) - 1;
  const auto sdt = acc_scalar_type(x.scalar_type());
  Tensor amap = at::empty({K, C, P}, x.options().dtype(sdt));
  Tensor rowstats = at::empty({K * C, 4}, x.options().dtype(sdt));
  if (K * C > 0) {
    const dim3 grid(static_cast<unsigned>(K * C), static_cast<unsigned>((P + kThreads - 1) / kThreads));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "feature_moments_class_map_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      class_map_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), amap.data_ptr<acc_t>(), C, P);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Tensor flat = amap.view({K * C, P});
    launch_rows(flat, rowstats, order);
  }
  if (!save_map) amap = at::empty({0}, x.options().dtype(sdt));
  return {amap, rowstats};
}

template <typename src_t, typename out_t, typename st_t>
void launch_poly(const Tensor& src, const int64_t* ip, const Tensor& center, const Tensor& coef, Tensor& out,
                 int64_t degree) {
  const int64_t R = out.size(0), P = out.size(1);
  const dim3 grid(static_cast<unsigned>(R), static_cast<unsigned>((P + kThreads - 1) / kThreads));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (degree == 1)
    poly_kernel<src_t, out_t, st_t, 1><<<grid, kThreads, 0, stream>>>(
        src.data_ptr<src_t>(), ip, center.data_ptr<st_t>(), coef.data_ptr<st_t>(), out.data_ptr<out_t>(), P);
  else
    poly_kernel<src_t, out_t, st_t, 3><<<grid, kThreads, 0, stream>>>(
        src.data_ptr<src_t>(), ip, center.data_ptr<st_t>(), coef.data_ptr<st_t>(), out.data_ptr<out_t>(), P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor poly_backward_cuda(const Tensor& src_in, const std::optional<Tensor>& row_index, const Tensor& center_in,
                          const Tensor& coef_in, int64_t degree, at::ScalarType out_dtype) {
  c10::cuda::CUDAGuard guard(src_in.device());
  const auto a = fastdd_feature_moments::poly_args(src_in, row_index, center_in, coef_in, degree, out_dtype);
  Tensor out = at::empty({a.R, a.P}, a.src.options().dtype(out_dtype));
  if (a.R == 0 || a.P == 0) return out;
  const int64_t* ip = a.idx.defined() ? a.idx.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "feature_moments_poly_cuda", [&] {
    using out_t = scalar_t;
    using st_t = at::opmath_type<out_t>;
    if (a.src.scalar_type() == out_dtype)
      launch_poly<out_t, out_t, st_t>(a.src, ip, a.center, a.coef, out, degree);
    else
      launch_poly<st_t, out_t, st_t>(a.src, ip, a.center, a.coef, out, degree);
  });
  return out;
}

}  // namespace
}  // namespace fastdd_feature_moments_cuda

TORCH_LIBRARY_IMPL(fastdd_C, CUDA, m) {
  m.impl("feature_moments", &fastdd_feature_moments_cuda::rows_cuda);
  m.impl("feature_moments_class_map", &fastdd_feature_moments_cuda::class_map_cuda);
  m.impl("feature_moments_poly_backward", &fastdd_feature_moments_cuda::poly_backward_cuda);
}
