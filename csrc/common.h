// Shared pieces of fastdd's C++ CPU kernels: accumulation types, argument checks, and the SIMD-path
// switch.
//
// Determinism contract (tested in tests/ops/test_determinism.py): every CPU kernel of fastdd computes
// each output element with one fixed sequence of floating-point operations, whatever the thread count and
// whatever SIMD path runs it:
//   * threads split work over *outputs* only; a reduction is never split across threads (or it is split
//     into fixed-size pieces, independent of the thread count, combined in a fixed order);
//   * SIMD vectorises across independent outputs, or across a fixed number of lanes (kLanes in
//     det_kernels.h) combined in a fixed order, never by re-associating a reduction to the vector width;
//   * no fused multiply-add contraction (setup.py builds with -ffp-contract=off), so a*b+c rounds the same
//     in scalar and vector code;
//   * no BLAS or ATen compute inside a kernel (their blocking depends on threads and ISA); the GEMM-like
//     tiles use det_kernels.h.
//
// SIMD paths: kernels that have them are compiled three times (isa_variants.h): `scalar` (the build's
// baseline ISA, auto-vectorisation off), `avx2` and `avx512` (x86-64, GCC/Clang). FASTDD_SIMD=auto (the
// default) takes the widest path the CPU supports; FASTDD_SIMD=scalar|avx2|avx512 forces one (an error if
// the CPU lacks it). The variable is read at every call, so tests can switch paths inside one process.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace fastdd {

// ------------------------------------------------------------------------------ accumulation types
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// float64 stays float64, every other floating dtype accumulates in float32.
inline at::ScalarType acc_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// -------------------------------------------------------------------------------- argument checks
inline void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, ": expected a CPU tensor, got ", x.device());
}

// A CPU feature matrix [N, D] of a floating dtype.
inline void check_features(const at::Tensor& x, const char* name) {
  check_cpu(x, name);
  TORCH_CHECK(x.dim() == 2, name, ": expected a 2-d tensor [N, D], got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, ": expected a floating dtype, got ", x.scalar_type());
}

// Two feature matrices that must share D and dtype (`a_name` is reported for a mismatch of `b`).
inline void check_feature_pair(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  check_features(a, a_name);
  check_features(b, b_name);
  TORCH_CHECK(a.size(1) == b.size(1), b_name, ": feature dimension ", b.size(1), " does not match ", a_name, "'s ",
              a.size(1));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), b_name, ": dtype ", b.scalar_type(), " does not match ", a_name,
              "'s ", a.scalar_type());
}

// Integer labels [n] on the CPU, returned as contiguous int64.
inline at::Tensor checked_labels(const at::Tensor& labels, int64_t n, const char* name) {
  check_cpu(labels, name);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, name, ": expected shape [", n, "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, name,
              ": expected int64 or int32 labels, got ", labels.scalar_type());
  return labels.to(at::kLong).contiguous();
}

// Class counts of int64 labels, with a range check (an out-of-range label would write out of bounds).
inline std::vector<int64_t> count_labels(const at::Tensor& labels, int64_t K, const char* name) {
  std::vector<int64_t> counts(K, 0);
  const int64_t* l = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = labels.numel(); i < n; ++i) {
    TORCH_CHECK(l[i] >= 0 && l[i] < K, name, ": label ", l[i], " at index ", i, " is outside [0, ", K, ")");
    ++counts[l[i]];
  }
  return counts;
}

// A vector of n entries in dtype `acc`, contiguous.
inline at::Tensor checked_vector(const at::Tensor& v, int64_t n, at::ScalarType acc, const char* name) {
  TORCH_CHECK(v.numel() == n, name, ": expected ", n, " entries, got ", v.numel());
  return v.to(acc).reshape({n}).contiguous();
}

// ------------------------------------------------------------------------------------ SIMD paths
// (host CPU code only: the CUDA sources include this header for the pieces above)
#ifndef __CUDACC__
enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define FASTDD_X86_ISA_VARIANTS 1
#endif

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

// Whether this build and this CPU can run `isa`.
inline bool isa_supported(Isa isa) {
  if (isa == Isa::Scalar) return true;
#ifdef FASTDD_X86_ISA_VARIANTS
  if (isa == Isa::Avx2) return __builtin_cpu_supports("avx2");
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

inline Isa widest_isa() {
  static const Isa best = isa_supported(Isa::Avx512) ? Isa::Avx512 : isa_supported(Isa::Avx2) ? Isa::Avx2 : Isa::Scalar;
  return best;
}

// The path the kernels take now: FASTDD_SIMD (read at every call) or the widest supported one.
inline Isa active_isa() {
  const char* env = std::getenv("FASTDD_SIMD");
  if (env == nullptr || *env == '\0') return widest_isa();
  const std::string v(env);
  if (v == "auto") return widest_isa();
  Isa want;
  if (v == "scalar")
    want = Isa::Scalar;
  else if (v == "avx2")
    want = Isa::Avx2;
  else if (v == "avx512")
    want = Isa::Avx512;
  else
    TORCH_CHECK(false, "FASTDD_SIMD=", v, " is not one of auto, scalar, avx2, avx512");
  TORCH_CHECK(isa_supported(want), "FASTDD_SIMD=", v, ": this CPU (or this build) cannot run the ", v,
              " path; supported here: ", isa_supported(Isa::Avx512) ? "avx512, " : "",
              isa_supported(Isa::Avx2) ? "avx2, " : "", "scalar");
  return want;
}

#endif  // __CUDACC__

}  // namespace fastdd

#ifndef __CUDACC__
// Call `ns::<isa namespace>::call` for the active SIMD path; `ns` is the op's namespace holding the
// variants that isa_variants.h instantiated.
#ifdef FASTDD_X86_ISA_VARIANTS
#define FASTDD_ISA_DISPATCH(ns, ...)          \
  do {                                        \
    switch (::fastdd::active_isa()) {         \
      case ::fastdd::Isa::Avx512:             \
        ns::isa_avx512::__VA_ARGS__;          \
        break;                                \
      case ::fastdd::Isa::Avx2:               \
        ns::isa_avx2::__VA_ARGS__;            \
        break;                                \
      default:                                \
        ns::isa_scalar::__VA_ARGS__;          \
    }                                         \
  } while (0)
#else
#define FASTDD_ISA_DISPATCH(ns, ...) \
  do {                               \
    (void)::fastdd::active_isa();    \
    ns::isa_scalar::__VA_ARGS__;     \
  } while (0)
#endif
#endif  // __CUDACC__
