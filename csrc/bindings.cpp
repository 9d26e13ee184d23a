// fastdd._C: the single Python module that carries every native kernel.
//
// Each op lives in csrc/<op>/ and registers its raw kernels in the `fastdd_C` torch library namespace
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in its own .cpp / .cu files). The Python op layer
// (fastdd/ops/<op>.py) wraps them in torch.library custom ops with autograd and fake implementations.
// This file only provides the module object and build-time facts.
#include <torch/extension.h>

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
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdd native kernels (C++/OpenMP CPU, optional CUDA)";
  m.def("with_cuda", &with_cuda, "True when the CUDA kernels were compiled in");
  m.def("with_openmp", &with_openmp, "True when the CPU kernels use OpenMP");
}
