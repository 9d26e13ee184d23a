"""Triton kernels and their launchers (installed as ``fastdd.kernels``; no autograd, no dispatch).

One module per op, named like its op in ``fastdd/ops/`` and its C++/CUDA folder in ``csrc/``:
``class_mmd.py`` <-> ``fastdd/ops/class_mmd.py`` <-> ``csrc/class_mmd/``.
Modules import triton at import time; ``fastdd.ops`` imports them lazily.
"""
