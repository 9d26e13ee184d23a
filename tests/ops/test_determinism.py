"""The determinism contract of the C++ CPU kernels (csrc/common.h): every op gives bit-identical results,
forward and backward, whatever the thread count and whichever SIMD path (FASTDD_SIMD=scalar|avx2|avx512)
runs it. Paths the CPU lacks are skipped here and run on a machine that has them."""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from fastdd.ops import _backend
from fastdd.ops import bn_eval_stats as bes_ops
from fastdd.ops import class_mmd as mmd_ops
from fastdd.ops import feature_moments as fm_ops
from fastdd.ops import infonce as nce_ops
from fastdd.ops import lowrank as lr_ops

pytestmark = pytest.mark.skipif(_backend.native_module() is None, reason="fastdd._C not built")

ALL_PATHS = ("scalar", "avx2", "avx512")
THREADS = (1, 2, 3)


def supported_paths():
    return list(_backend.native_module().simd_paths()) if _backend.native_module() is not None else []


@contextmanager
def simd_path(path: str, threads: int):
    """Run the C++ kernels on SIMD ``path`` with ``threads`` intra-op threads (both restored after)."""
    old_env, old_threads = os.environ.get("FASTDD_SIMD"), torch.get_num_threads()
    os.environ["FASTDD_SIMD"] = path
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_env is None:
            os.environ.pop("FASTDD_SIMD", None)
        else:
            os.environ["FASTDD_SIMD"] = old_env


def forward_backward(fn, *inputs):
    """fn(*leaves) and the gradients of its sum with respect to every floating input."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]  # clone keeps the layout
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), [t for t in leaves if t.requires_grad])
    return [out.detach(), *grads]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def labels(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    out = torch.arange(n) % k  # every class present
    return out[torch.randperm(n, generator=g)]


def case_class_mmd(dtype):
    g = gen(1)
    real, syn = torch.randn(301, 67, generator=g, dtype=dtype), torch.randn(43, 67, generator=g, dtype=dtype)
    rl, sl = labels(301, 5, g), labels(43, 5, g)
    return (lambda r, s: mmd_ops.class_mmd(r, rl, s, sl, 5, backend="cpp")), (real, syn)


def case_gaussian_mmd(dtype):
    g = gen(2)
    real, syn = torch.randn(290, 37, generator=g, dtype=dtype), torch.randn(21, 37, generator=g, dtype=dtype)
    rl, sl = labels(290, 2, g), labels(21, 2, g)
    return (lambda r, s: mmd_ops.gaussian_class_mmd(r, rl, s, sl, 2, (0.5, 2.0), backend="cpp")), (real, syn)


def case_infonce(form):
    def make(dtype):
        g = gen(3)
        syn, real = torch.randn(70, 45, generator=g, dtype=dtype), torch.randn(300, 45, generator=g, dtype=dtype)
        sl, rl = labels(70, 4, g), labels(300, 4, g)
        return (lambda s, r: nce_ops.infonce_loss(s, sl, r, rl, form=form, backend="cpp")), (syn, real)
    return make


def case_moments(mode):
    def make(dtype):
        g = gen(4)
        x = torch.randn(12, 5, 9, 11, generator=g, dtype=dtype)
        lab = labels(12, 3, g)
        return (lambda t: torch.cat(fm_ops.class_moments(t, lab, 3, mode=mode, higher=True, backend="cpp"))), (x,)
    return make


def case_bn_stat(dtype):
    g = gen(5)
    x = torch.randn(6, 7, 13, 5, generator=g, dtype=dtype)
    rm, rv = torch.randn(7, generator=g, dtype=dtype), torch.rand(7, generator=g, dtype=dtype) + 0.5
    return (lambda t: fm_ops.bn_stat_loss(t, rm, rv, backend="cpp")), (x,)


def case_bn_stat_channels_last(dtype):
    """A channels_last map (the column kernel): 390 rows of 7 channels, several fixed row blocks."""
    fn, (x,) = case_bn_stat(dtype)
    return fn, (x.contiguous(memory_format=torch.channels_last),)


def case_bn_eval_stats(layout):
    """Both layouts; 6 x 13 x 5 = 390 rows of 7 channels: several channels_last row blocks."""
    def make(dtype):
        g = gen(7)
        x = torch.randn(6, 7, 13, 5, generator=g, dtype=dtype).contiguous(memory_format=layout)
        scale, shift = torch.randn(7, generator=g, dtype=dtype), torch.randn(7, generator=g, dtype=dtype)

        def fn(t):
            y, mean, var = bes_ops.bn_eval_stats(t, scale, shift, backend="cpp")
            return torch.cat([(y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().view(1),
                              mean * 3.0, var * -2.0])
        return fn, (x,)
    return make


def case_lowrank(rank):
    def make(dtype):
        g = gen(6)
        a = torch.randn(3, 2, 29, rank, generator=g, dtype=dtype)
        b = torch.randn(3, 2, rank, 35, generator=g, dtype=dtype)
        return (lambda fa, fb: lr_ops.lowrank_reconstruct(fa, fb, backend="cpp")), (a, b)
    return make


CASES = {
    "class_mmd": case_class_mmd,
    "gaussian_class_mmd": case_gaussian_mmd,
    "infonce_supcon": case_infonce("supcon"),
    "infonce_nce": case_infonce("nce"),
    "moments_batchavg": case_moments("batchavg"),
    "moments_persample": case_moments("persample"),
    "bn_stat_loss": case_bn_stat,
    "bn_stat_loss_channels_last": case_bn_stat_channels_last,
    "bn_eval_stats_nchw": case_bn_eval_stats(torch.contiguous_format),
    "bn_eval_stats_channels_last": case_bn_eval_stats(torch.channels_last),
    "lowrank_r3": case_lowrank(3),
    "lowrank_r11": case_lowrank(11),  # the runtime-rank kernels
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bit_identical_across_threads_and_simd_paths(case, dtype):
    fn, inputs = CASES[case](dtype)
    paths = supported_paths()
    assert "scalar" in paths
    results = {}
    for path in paths:
        for threads in THREADS:
            with simd_path(path, threads):
                results[(path, threads)] = forward_backward(fn, *inputs)
    (first_key, first), *rest = results.items()
    for key, got in rest:
        assert len(got) == len(first)
        for a, b in zip(first, got):
            assert torch.equal(a, b), f"{case}: {key} differs from {first_key}"


@pytest.mark.parametrize("path", ALL_PATHS)
def test_forcing_a_path_runs_it_or_says_why(path):
    fn, inputs = CASES["gaussian_class_mmd"](torch.float32)
    with simd_path(path, 1):
        if path in supported_paths():
            assert _backend.native_module().simd_path() == path
            fn(*inputs)
        else:
            with pytest.raises(RuntimeError, match=f"FASTDD_SIMD={path}: this CPU"):
                fn(*inputs)


def test_unknown_path_is_a_clear_error():
    fn, inputs = CASES["lowrank_r3"](torch.float32)
    with simd_path("sse9", 1):
        with pytest.raises(RuntimeError, match="FASTDD_SIMD=sse9 is not one of auto, scalar, avx2, avx512"):
            fn(*inputs)


def test_auto_takes_the_widest_supported_path():
    with simd_path("auto", 1):
        assert _backend.native_module().simd_path() == supported_paths()[-1]
