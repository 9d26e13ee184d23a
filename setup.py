"""Build script for fastdd's optional native extension ``fastdd._C``.

Everything user-facing lives in pyproject.toml; this file only decides whether, and how, to build the
C++ (and CUDA) kernels in ``csrc/``.

Environment switches
--------------------
FASTDD_BUILD_EXT   auto (default) | 0 | 1
    auto: build the C++ extension when torch and a C++ compiler are available, otherwise install pure
    Python (every op then falls back to its plain-torch reference). 0: never build. 1: build, and fail
    loudly if that is impossible.
FASTDD_BUILD_CUDA  auto (default) | 0 | 1
    auto: add the CUDA sources (``csrc/**/*.cu``) when torch was built with CUDA and nvcc is found.
    0: CPU-only extension. 1: require a CUDA build.

``kernels/`` (Triton kernels, pure Python) is installed as the sub-package ``fastdd.kernels``.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in {"auto", "0", "1"}:
        raise SystemExit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def _extensions():
    build_ext_switch = _switch("FASTDD_BUILD_EXT")
    if build_ext_switch == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if build_ext_switch == "1":
            raise SystemExit("FASTDD_BUILD_EXT=1 but torch is not importable: install torch first") from None
        print("fastdd: torch not importable at build time; installing pure Python", file=sys.stderr)
        return [], {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        if build_ext_switch == "1":
            raise SystemExit(f"FASTDD_BUILD_EXT=1 but no C++ compiler ({compiler}) was found")
        print("fastdd: no C++ compiler; installing pure Python", file=sys.stderr)
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    headers = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))
    cuda_switch = _switch("FASTDD_BUILD_CUDA")
    have_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if cuda_switch == "1" and not have_cuda:
        raise SystemExit("FASTDD_BUILD_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME)")
    use_cuda = bool(cuda_sources) and have_cuda and cuda_switch != "0"

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # -ffp-contract=off: no fused multiply-add contraction, so scalar and vector code round alike (the
    # determinism contract of csrc/common.h)
    cxx_flags = ["-O3", "-std=c++20", "-ffp-contract=off", *openmp]
    define_macros = []
    if use_cuda:
        define_macros.append(("FASTDD_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "fastdd._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=openmp,
            define_macros=define_macros,
            depends=headers,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastdd._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
            define_macros=define_macros,
            depends=headers,
        )
    if not cpp_sources:
        return [], {}
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fastdd", "fastdd.*"]) + ["fastdd.kernels"],
    package_dir={"fastdd.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
