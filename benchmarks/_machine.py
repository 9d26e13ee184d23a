"""A description of the machine for the end-to-end benchmarks' Markdown (CPU model, cores, SIMD, versions)."""
from __future__ import annotations

import os
import re
from typing import List

import torch
from _harness import device_name, git_commit, triton_version

_SIMD = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> List[str]:
    """The SIMD-related flags of /proc/cpuinfo (empty when unreadable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            m = re.search(r"^flags\s*:\s*(.+)$", fh.read(), re.M)
    except OSError:
        return []
    have = set(m.group(1).split()) if m else set()
    return [f for f in _SIMD if f in have]


def machine_lines(device) -> List[str]:
    """Markdown bullet lines describing the machine and software of this run."""
    device = torch.device(device)
    lines = [f"- device: {device_name(device)}",
             f"- CPU: {device_name('cpu')}, {os.cpu_count()} logical cores visible, "
             f"SIMD: {' '.join(cpu_flags()) or 'unknown'}, torch CPU capability "
             f"{torch.backends.cpu.get_cpu_capability()}",
             f"- torch {torch.__version__}, triton {triton_version()}, commit {git_commit()}"]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        lines.append(f"- load average at the end of the run: {load[0]:.2f} (1 min); a value above the core "
                     "count means the timings are shared-machine timings")
    return lines
