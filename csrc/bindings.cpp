// fastdd._C: the single Python module that carries every native kernel.
//
// Each op lives in csrc/<op>/ and registers its raw kernels in the `fastdd_C` torch library namespace
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in its own .cpp / .cu files). The Python op layer
// (fastdd/ops/<op>.py) wraps them in torch.library custom ops with autograd and fake implementations.
// This file only provides the module object and build-time facts.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {
bool with_cuda() {
#ifdef FASTDD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

std::vector<std::string> simd_paths() {
  std::vector<std::string> out;
  for (auto isa : {fastdd::Isa::Scalar, fastdd::Isa::Avx2, fastdd::Isa::Avx512})
    if (fastdd::isa_supported(isa)) out.emplace_back(fastdd::isa_name(isa));
  return out;
}

std::string simd_path() { return fastdd::isa_name(fastdd::active_isa()); }
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdd native kernels (C++/OpenMP CPU, optional CUDA)";
  m.def("with_cuda", &with_cuda, "True when the CUDA kernels were compiled in");
  m.def("with_openmp", &with_openmp, "True when the CPU kernels use OpenMP");
  m.def("simd_paths", &simd_paths, "SIMD paths of the CPU kernels that this build and CPU can run");
  m.def("simd_path", &simd_path, "The SIMD path the CPU kernels take now (FASTDD_SIMD or the widest)");
}
