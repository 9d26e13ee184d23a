"""Every CUDA source under csrc/ compiles with nvcc (device code is never run here).

One test per ``csrc/**/*.cu`` file: ``nvcc -c -std=c++20 -O1 --expt-relaxed-constexpr -DFASTDD_WITH_CUDA
-x cu`` with torch's include directories (``torch.utils.cpp_extension.include_paths()``), writing the
object to a temporary directory. Skipped when nvcc is absent. CPU-only torch wheels ship the c10/ATen
CUDA headers but not the build-generated ``c10/cuda/impl/cuda_cmake_macros.h``; when it is missing a
one-line stand-in (what a CUDA build generates) is put on the include path. They do not ship the
cuBLAS/cuSPARSE headers either, so sources should include ``c10/cuda/CUDAStream.h`` /
``c10/cuda/CUDAGuard.h`` rather than ``ATen/cuda/CUDAContext.h`` to stay checkable here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(ROOT.glob("csrc/**/*.cu"))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()


def _include_flags(tmp_path: Path):
    from torch.utils.cpp_extension import include_paths

    paths = [Path(p) for p in include_paths()]
    python_include = sysconfig.get_paths().get("include")
    if python_include:
        paths.append(Path(python_include))
    if not any((p / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in paths):
        stub = tmp_path / "stub_include"
        header = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        header.parent.mkdir(parents=True)
        header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        paths.append(stub)
    return [f"-I{p}" for p in paths]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.skipif(not SOURCES, reason="no CUDA sources under csrc/")
@pytest.mark.parametrize("source", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_cuda_source_compiles(source: Path, tmp_path: Path):
    cmd = [
        NVCC, "-c", "-std=c++20", "-O1", "--expt-relaxed-constexpr", "-DFASTDD_WITH_CUDA",
        *_include_flags(tmp_path), "-x", "cu", str(source), "-o", str(tmp_path / (source.stem + ".o")),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    errors = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower())
    assert proc.returncode == 0, f"nvcc failed on {source.relative_to(ROOT)}:\n{errors[-8000:] or proc.stderr[-8000:]}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0
