"""Feature-moment op (fastdd/ops/feature_moments.py): every CPU backend against a float64 reference,
gradcheck, opcheck, torch.compile(fullgraph=True) of MomentMatcher, backend forcing, bad-input errors.

CPU backends: ``cpp`` (compiled extension), ``torch`` (the reference, autograd) and ``triton`` under the
interpreter on small fp32 shapes. Triton decides when triton itself is imported whether ``@triton.jit``
functions are interpreted, so the ``[triton]`` cases are skipped in a normal run and executed by
``test_triton_interpreter_subprocess`` in one child pytest started with TRITON_INTERPRET=1 (they also run
directly under ``TRITON_INTERPRET=1 pytest ...``). GPU cases are marked ``gpu``.

Tolerance rule: a backend's max error against the float64 reference (computed from the same, already
rounded inputs) is at most 2x that of the plain-torch reference run in the input dtype, plus a floor of a
few units in the last place (relative to the output's magnitude).

H = W = 1 (P = 1): the batch-average estimator's unbiased spatial variance is undefined; fastdd defines
it as 0, so std = sqrt(eps) and its gradient is 0 (checked below, as is the biased per-sample variance 0).
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_compiled_matches_eager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triton_interpreter import compile_for_gpu, run_triton_cases_in_child, select_cpu_backend

from fastdd.matchers.moments import MomentMatcher
from fastdd.ops import _backend
from fastdd.ops import feature_moments as fm
from fastdd.ops._backend import BackendUnavailableError
from fastdd.ops._common import channels_last_only

HAS_CPP = _backend.native_has_op("feature_moments")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="fastdd._C not built with the feature_moments kernels")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CPU_BACKENDS = ["cpp", "torch", "triton"]


@pytest.fixture
def cpu_backend(request):
    """Parametrised backend name; 'triton' only runs when the interpreter was on from the start."""
    return select_cpu_backend(request.param, HAS_CPP, "feature_moments")


def make_maps(n, k, shapes, *, dtype=torch.float32, seed=0, device="cpu", sort=False, offset=0.3):
    """Random maps [n, C, H, W] per shape (C, H, W) and labels with every class present (unsorted)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=g)])
    labels = labels.sort().values if sort else labels[torch.randperm(n, generator=g)]
    maps = [(torch.randn(n, c, h, w, generator=g) * (1.0 + 0.5 * i) + offset * (i + 1)).to(dtype).to(device)
            for i, (c, h, w) in enumerate(shapes)]
    return maps, labels.to(device)


def _floor(ref64, dtype):
    scale = ref64.abs().max().item() if ref64.numel() else 1.0
    return 8 * torch.finfo(dtype).eps * max(1.0, scale)


def assert_rule(out, ref64, baseline, dtype, what):
    """|out - ref64|_max <= 2 |baseline - ref64|_max + floor."""
    out, ref64, baseline = (t.detach().double().cpu() for t in (out, ref64, baseline))
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = (out - ref64).abs().max().item() if out.numel() else 0.0
    base = (baseline - ref64).abs().max().item() if out.numel() else 0.0
    floor = _floor(ref64, dtype)
    assert err <= 2 * base + floor, f"{what}: error {err:.3e} > 2 x torch-{dtype} error {base:.3e} + {floor:.1e}"


# (N, K, [(C, H, W), ...], sort): general, one class, one sample per class, C = 1, H = W = 1, odd H x W
SHAPES = [
    pytest.param((11, 3, [(5, 4, 6)], False), id="general"),
    pytest.param((6, 1, [(4, 3, 3)], False), id="one-class"),
    pytest.param((4, 4, [(3, 4, 4)], False), id="one-per-class"),
    pytest.param((7, 2, [(1, 6, 6)], False), id="C=1"),
    pytest.param((9, 3, [(5, 1, 1)], False), id="HW=1"),
    pytest.param((8, 2, [(3, 7, 5)], True), id="odd-HW-sorted"),
]


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("mode", fm.MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_class_moments_match_float64(cpu_backend, mode, shape):
    n, k, shapes, sort = shape
    (x,), labels = make_maps(n, k, shapes, sort=sort)
    higher = cpu_backend != "torch" or mode == "persample"
    ref = fm.class_moments_reference(x.double(), labels, k, mode=mode, higher=higher)
    base = fm.class_moments_reference(x, labels, k, mode=mode, higher=higher)
    xr = x.clone().requires_grad_(True)
    got = fm.class_moments(xr, labels, k, mode=mode, higher=higher, backend=cpu_backend)
    assert len(got) == len(ref)
    for name, o, r, b in zip(("mean", "std", "skew", "kurt"), got, ref, base):
        assert o.dtype == torch.float32
        assert_rule(o, r, b, torch.float32, f"{cpu_backend}/{mode} {name}")
    # gradient of a random linear functional of all outputs (grad_output != 1)
    ws = [torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) * 3 for t in ref]
    x64 = x.double().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    (g64,) = torch.autograd.grad(sum((t * w.double()).sum() for t, w in
                                     zip(fm.class_moments_reference(x64, labels, k, mode=mode, higher=higher), ws)), x64)
    (gb,) = torch.autograd.grad(sum((t * w).sum() for t, w in
                                    zip(fm.class_moments_reference(xb, labels, k, mode=mode, higher=higher), ws)), xb)
    (go,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, ws)), xr)
    assert go.dtype == x.dtype
    assert_rule(go, g64, gb, torch.float32, f"{cpu_backend}/{mode} grad")


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("mode", fm.MODES)
@pytest.mark.parametrize("relative", [False, True])
def test_moment_loss_multilayer_matches_float64(cpu_backend, mode, relative):
    shapes = [(6, 8, 8), (10, 4, 4), (3, 3, 5)]
    syn, sl = make_maps(9, 3, shapes, seed=1)
    real, rl = make_maps(20, 3, shapes, seed=2, offset=0.5)
    stats64 = [fm.class_moments_reference(r.double(), rl, 3, mode=mode) for r in real]
    stats32 = [tuple(t.float() for t in s) for s in stats64]
    kw = dict(mode=mode, relative=relative, weight=7.0, layer_weights=[1.0, 2.0, 0.5])

    def run(fn, maps, stats, **extra):
        ms = [m.clone().requires_grad_(True) for m in maps]
        loss = fn(ms, sl, stats, 3, **kw, **extra)
        return (loss, *torch.autograd.grad(loss * 1.7, ms))

    ref = run(fm.moment_loss_reference, [m.double() for m in syn], stats64)
    base = run(fm.moment_loss_reference, syn, stats32)
    got = run(fm.moment_loss, syn, stats32, backend=cpu_backend)
    assert got[0].dim() == 0 and got[0].dtype == torch.float32
    for i, (o, r, b) in enumerate(zip(got, ref, base)):
        assert_rule(o, r, b, torch.float32, f"{cpu_backend}/{mode}/rel={relative} output {i}")


def test_p1_definition_and_estimator_at_a_glance():
    x = torch.randn(6, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    for backend in ("torch", "cpp") if HAS_CPP else ("torch",):
        for mode in fm.MODES:
            mean, std = fm.class_moments(x, labels, 2, mode=mode, eps=1e-5, backend=backend)
            torch.testing.assert_close(std, torch.full_like(std, math.sqrt(1e-5)))
            (g,) = torch.autograd.grad(std.sum(), x)
            assert torch.count_nonzero(g) == 0
    # the published estimator at a glance: moments of the class-mean map, unbiased variance
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 0])
    mean, std = fm.class_moments_reference(x, labels, 2, mode="batchavg")
    a1 = x[labels == 1].mean(0).flatten(1)
    torch.testing.assert_close(mean[1], a1.mean(1))
    torch.testing.assert_close(std[1], torch.sqrt(a1.var(1) + 1e-5))


@needs_cpp
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 12), k=st.integers(1, 4), c=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9),
       mode=st.sampled_from(fm.MODES), seed=st.integers(0, 2**16))
def test_cpp_random_shapes(n, k, c, h, w, mode, seed):
    k = min(k, n)
    (x,), labels = make_maps(n, k, [(c, h, w)], seed=seed)
    ref = fm.class_moments_reference(x.double(), labels, k, mode=mode, higher=True)
    base = fm.class_moments_reference(x, labels, k, mode=mode, higher=True)
    got = fm.class_moments(x, labels, k, mode=mode, higher=True, backend="cpp")
    for o, r, b in zip(got, ref, base):
        assert_rule(o, r, b, torch.float32, f"cpp/{mode} random shape")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_low_precision_inputs(dtype):
    (x,), labels = make_maps(10, 3, [(4, 5, 5)], dtype=dtype)
    for mode in fm.MODES:
        ref = fm.class_moments_reference(x.double(), labels, 3, mode=mode)
        base = fm.class_moments_reference(x, labels, 3, mode=mode)
        got = fm.class_moments(x, labels, 3, mode=mode, backend="cpp")
        for o, r, b in zip(got, ref, base):
            assert_rule(o, r, b, dtype, f"cpp/{mode}/{dtype}")
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fm.class_moments(xr, labels, 3, mode=mode, backend="cpp")[1].sum(), xr)
        x64 = x.double().requires_grad_(True)
        (g64,) = torch.autograd.grad(fm.class_moments_reference(x64, labels, 3, mode=mode)[1].sum(), x64)
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), g64, atol=4 * torch.finfo(dtype).eps * g64.abs().max().item(), rtol=0)


@needs_cpp
@pytest.mark.parametrize("isa", ["scalar", "auto"])
def test_cpp_both_isas(monkeypatch, isa):
    """The C++ inner loops exist per SIMD path (FASTDD_SIMD; tests/ops/test_determinism.py checks that the
    paths agree bit for bit)."""
    monkeypatch.setenv("FASTDD_SIMD", isa)
    (x,), labels = make_maps(37, 3, [(6, 9, 7)], seed=21)  # > 32 samples per class: several flushes
    for mode in fm.MODES:
        ref = fm.class_moments_reference(x.double(), labels, 3, mode=mode, higher=True)
        base = fm.class_moments_reference(x, labels, 3, mode=mode, higher=True)
        xr = x.clone().requires_grad_(True)
        got = fm.class_moments(xr, labels, 3, mode=mode, higher=True, backend="cpp")
        for o, r, b in zip(got, ref, base):
            assert_rule(o, r, b, torch.float32, f"cpp[{isa}]/{mode}")
        (g,) = torch.autograd.grad(sum(t.sum() for t in got), xr)
        x64 = x.double().requires_grad_(True)
        (g64,) = torch.autograd.grad(sum(t.sum() for t in fm.class_moments_reference(
            x64, labels, 3, mode=mode, higher=True)), x64)
        xb = x.clone().requires_grad_(True)
        (gb,) = torch.autograd.grad(sum(t.sum() for t in fm.class_moments_reference(
            xb, labels, 3, mode=mode, higher=True)), xb)
        assert_rule(g, g64, gb, torch.float32, f"cpp[{isa}]/{mode} grad")


@needs_cpp
def test_noncontiguous_and_int32_labels():
    (x,), labels = make_maps(8, 3, [(4, 5, 6)])
    xnc = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels_last strides
    assert not xnc.is_contiguous()
    for mode in fm.MODES:
        want = fm.class_moments_reference(x, labels, 3, mode=mode)
        got = fm.class_moments(xnc, labels.int(), 3, mode=mode, backend="cpp")
        for o, r in zip(got, want):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- Gram, BN
@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
def test_gram_loss_matches_float64(cpu_backend):
    shapes = [(5, 6, 6), (40, 3, 5)]
    syn, sl = make_maps(7, 3, shapes, seed=3)
    real, rl = make_maps(12, 3, shapes, seed=4)
    g64 = [fm.class_gram_reference(r.double(), rl, 3) for r in real]
    g32 = [g.float() for g in g64]
    got_g = fm.class_gram(real[1], rl, 3, backend=cpu_backend)
    assert_rule(got_g, g64[1], fm.class_gram_reference(real[1], rl, 3), torch.float32, "class_gram")

    def run(fn, maps, grams, **extra):
        ms = [m.clone().requires_grad_(True) for m in maps]
        loss = fn(ms, sl, grams, 3, weight=3.0, **extra)
        return (loss, *torch.autograd.grad(loss, ms))

    ref = run(fm.gram_loss_reference, [m.double() for m in syn], g64)
    base = run(fm.gram_loss_reference, syn, g32)
    got = run(fm.gram_loss, syn, g32, backend=cpu_backend)
    for i, (o, r, b) in enumerate(zip(got, ref, base)):
        assert_rule(o, r, b, torch.float32, f"{cpu_backend} gram output {i}")


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(6, 5, 4, 7), (2, 3, 17, 9), (3, 1, 1, 1), (1, 3, 2, 2), (3, 1, 2, 2),
                                   (4, 6, 1, 1)])
def test_bn_stat_loss_matches_float64(cpu_backend, layout, shape):
    """Loss and gradient against float64 in both layouts: a channels_last map (how the recover teacher runs on
    a CPU) is read in place by the column kernel and its gradient comes back channels_last like the map."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.randn(shape[1], generator=g), torch.rand(shape[1], generator=g) + 0.5

    def run(fn, x, rm, rv, **extra):
        xr = x.clone().requires_grad_(True)
        loss = fn(xr, rm, rv, **extra)
        return loss, *torch.autograd.grad(loss * 0.3, xr)

    ref = run(fm.bn_stat_loss_reference, x.double(), rm.double(), rv.double())
    base = run(fm.bn_stat_loss_reference, x, rm, rv)
    got = run(fm.bn_stat_loss, x, rm, rv, backend=cpu_backend)
    for i, (o, r, b) in enumerate(zip(got, ref, base)):
        assert_rule(o, r, b, torch.float32, f"{cpu_backend} {layout} bn output {i}")
    if cpu_backend == "cpp" and channels_last_only(x):
        assert got[1].is_contiguous(memory_format=torch.channels_last)
    mean, var = fm.bn_stats(x.double(), backend=cpu_backend)
    torch.testing.assert_close(var, x.double().var((0, 2, 3), unbiased=False))
    torch.testing.assert_close(mean, x.double().mean((0, 2, 3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bn_stat_loss_channels_last_half_gradient(dtype):
    """Half channels_last maps with a large mean: the backward's c0 and c1 x cancel, so they are combined in
    float32 and cast once (half coefficients lost ~30x the precision of the NCHW path)."""
    g = torch.Generator().manual_seed(10)
    x = (20 + 0.5 * torch.randn(8, 16, 6, 6, generator=g)).to(dtype)
    rm, rv = torch.full((16,), 19.0), torch.full((16,), 0.1)

    def grad(a):
        a = a.clone().requires_grad_(True)
        return torch.autograd.grad(fm.bn_stat_loss(a, rm, rv), a)[0].double()

    ref = grad(x.double())
    errs = [float((grad(a) - ref).norm() / ref.norm()) for a in (x, x.contiguous(memory_format=torch.channels_last))]
    assert errs[1] <= 2 * errs[0] + 1e-3, errs


@needs_cpp
def test_bn_stats_channels_last_large_mean():
    """The column kernel's one-pass variance is shifted by the first row: a mean 1e4 times the spread keeps
    a relative variance error of a few float32 ulps (an unshifted sum of squares would lose it all)."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(40, 8, 6, 6, generator=g) * 0.01 + 100.0).contiguous(memory_format=torch.channels_last)
    mean, var = fm.bn_stats(x, backend="cpp")
    v64, m64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), v64, rtol=1e-5, atol=0)


@needs_cpp
def test_bn_stat_loss_zero_difference_subgradient():
    """A term whose difference is exactly 0 contributes the subgradient 0 (as torch's norm), not NaN."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    mean, var = (t.detach() for t in fm.bn_stats(x, backend="cpp"))
    loss = fm.bn_stat_loss(x, mean, var + 1.0, backend="cpp")  # mean term exactly 0
    (g,) = torch.autograd.grad(loss, x)
    v_ref = torch.var_mean(x, dim=(0, 2, 3), correction=0)[0]
    (gr,) = torch.autograd.grad(torch.linalg.vector_norm(v_ref - (var + 1.0)), x)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, gr)


# -------------------------------------------------------------------------- gradcheck / opcheck / compile
@pytest.mark.parametrize("cpu_backend", ["cpp", "triton"], indirect=True)
@pytest.mark.parametrize("mode", fm.MODES)
def test_gradcheck_float64(cpu_backend, mode):
    """Finite differences in float64 (the Triton interpreter is slow: smaller input, fast mode)."""
    fast = cpu_backend == "triton"
    (x,), labels = make_maps(3 if fast else 5, 2, [(2, 2, 2) if fast else (2, 3, 2)], dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a: fm.class_moments(a, labels, 2, mode=mode, higher=True, backend=cpu_backend), (x,),
        fast_mode=fast)
    stats = [tuple(t.detach() + 0.1 for t in fm.class_moments_reference(x.detach(), labels, 2, mode=mode))]
    assert torch.autograd.gradcheck(
        lambda a: fm.moment_loss([a], labels, stats, 2, mode=mode, relative=True, backend=cpu_backend), (x,),
        fast_mode=fast)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    for a in (x, x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)):
        assert torch.autograd.gradcheck(lambda a: fm.bn_stat_loss(a, rm, rv, backend=cpu_backend), (a,),
                                        fast_mode=fast)


@pytest.mark.parametrize("cpu_backend", ["triton"], indirect=True)
def test_gradcheck_gram_triton(cpu_backend):
    """The Triton Gram kernels accumulate in fp32 (no fp64 tl.dot), so check the fp32 gradient by
    comparing against the float64 reference instead of finite differences."""
    (x,), labels = make_maps(5, 2, [(20, 3, 3)])
    xr = x.clone().requires_grad_(True)
    w = torch.randn(2, 20, 20)
    (g,) = torch.autograd.grad((fm.class_gram(xr, labels, 2, backend="triton") * w).sum(), xr)
    x64 = x.double().requires_grad_(True)
    (g64,) = torch.autograd.grad((fm.class_gram_reference(x64, labels, 2) * w.double()).sum(), x64)
    torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-6)


def _opcheck_cases(backend):
    (x,), labels = make_maps(6, 2, [(3, 4, 5)])
    xnc = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    req = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [(req(x), labels, 2, "batchavg", True, 1e-5, True, backend),
            (req(xnc), labels, 2, "persample", True, 1e-5, False, backend),
            (req(xnc), labels, 2, "batchavg", False, 1e-5, True, backend),
            (req(x), labels.new_zeros(0), 1, "pooled", False, 0.0, False, backend),
            (req(xnc), labels.new_zeros(0), 1, "pooled", False, 0.0, False, backend)]  # channels_last


@needs_cpp
def test_opcheck_native():
    for args in _opcheck_cases("cpp"):
        torch.library.opcheck(torch.ops.fastdd.feature_moments.default, args)
    (x,), labels = make_maps(6, 2, [(3, 4, 5)])
    out = torch.ops.fastdd.feature_moments(x, labels, 2, "persample", False, 1e-5, False, "cpp")
    g = torch.randn(2, 3)
    torch.library.opcheck(torch.ops.fastdd.feature_moments_backward.default,
                          (g, g, None, None, x, labels, out[0], out[4], out[5], 2, "persample", False, 1e-5, "cpp"))
    for xp in (x, x.contiguous(memory_format=torch.channels_last)):  # pooled backward keeps the layout
        none = labels.new_zeros(0)
        out = torch.ops.fastdd.feature_moments(xp, none, 1, "pooled", False, 0.0, False, "cpp")
        g = torch.randn(1, 3)
        torch.library.opcheck(torch.ops.fastdd.feature_moments_backward.default,
                              (g, g, None, None, xp, none, out[0], out[4], out[5], 1, "pooled", False, 0.0, "cpp"))


@pytest.mark.parametrize("cpu_backend", ["triton"], indirect=True)
def test_opcheck_triton(cpu_backend):
    """Schema and autograd registration (the interpreter cannot run on fake tensors; the GPU test below
    runs the full opcheck)."""
    for args in _opcheck_cases("triton")[:2]:
        torch.library.opcheck(torch.ops.fastdd.feature_moments.default, args,
                              test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_opcheck_gpu():
    for backend in ("triton", "cuda"):
        if not _backend.backend_available(backend, "cuda", "feature_moments"):
            continue
        for args in _opcheck_cases(backend):
            args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                         for a in args)
            torch.library.opcheck(torch.ops.fastdd.feature_moments.default, args)


@needs_cpp
def test_compile_fullgraph_matches_eager():
    shapes = [(4, 6, 6), (6, 3, 3)]
    syn, sl = make_maps(6, 3, shapes, seed=6)
    real, rl = make_maps(12, 3, shapes, seed=7)
    matcher = MomentMatcher(mode="batchavg", relative=True, moment_weight=2.0, gram_weight=0.5, backend="cpp")
    ms = [m.clone().requires_grad_(True) for m in syn]
    eager = matcher(ms, sl, real, rl, 3)
    ge = torch.autograd.grad(eager, ms)
    torch._dynamo.reset()
    compiled = torch.compile(matcher, fullgraph=True, backend="aot_eager")
    mc = [m.clone().requires_grad_(True) for m in syn]
    out = compiled(mc, sl, real, rl, 3)
    gc = torch.autograd.grad(out, mc)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-7)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@needs_cpp
def test_compile_inductor_bn_stat_loss_channels_last():
    """Inductor keeps the channels_last map (the op is tagged flexible_layout) and matches eager."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 6, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    rm, rv = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5

    def f(a):
        return fm.bn_stat_loss(torch.relu(a) * 2.0, rm, rv, var_weight=0.5, backend="cpp")

    assert_compiled_matches_eager(f, x)


@needs_cpp
def test_compile_inductor_persample():
    (x,), labels = make_maps(6, 2, [(4, 5, 5)], seed=8)
    stats = [tuple(t + 0.1 for t in fm.class_moments_reference(x, labels, 2, mode="persample"))]

    def f(a):
        return fm.moment_loss([a], labels, stats, 2, mode="persample", backend="cpp", validate=False)

    assert_compiled_matches_eager(f, x)


def test_matcher_torch_backend_and_weights():
    shapes = [(4, 5, 5)]
    syn, sl = make_maps(6, 2, shapes, seed=9)
    real, rl = make_maps(10, 2, shapes, seed=10)
    m = MomentMatcher(mode="persample", moment_weight=3.0, gram_weight=2.0, backend="torch")
    got = m(syn, sl, real, rl, 2)
    stats = [fm.class_moments_reference(real[0], rl, 2, mode="persample")]
    grams = [fm.class_gram_reference(real[0], rl, 2)]
    want = 3.0 * fm.moment_loss_reference(syn, sl, stats, 2, mode="persample") + \
        2.0 * fm.gram_loss_reference(syn, sl, grams, 2)
    torch.testing.assert_close(got, want)
    assert MomentMatcher(moment_weight=0.0)(syn, sl, real, rl, 2).item() == 0.0


# ------------------------------------------------------------------------------------------- backends
def test_backend_forcing(monkeypatch):
    (x,), labels = make_maps(4, 2, [(2, 3, 3)])
    with pytest.raises(BackendUnavailableError):
        fm.class_moments(x, labels, 2, backend="cuda")
    monkeypatch.setenv("FASTDD_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError):
        _backend.resolve_backend("feature_moments", "cpu")
    monkeypatch.setenv("FASTDD_BACKEND", "torch")
    assert _backend.resolve_backend("feature_moments", "cpu") == "torch"
    monkeypatch.delenv("FASTDD_BACKEND")
    assert _backend.resolve_backend("feature_moments", "cpu") == ("cpp" if HAS_CPP else "torch")
    with pytest.raises(BackendUnavailableError, match="closed_form"):  # this op has no closed_form backend
        fm.class_moments(x, labels, 2, backend="closed_form")


def test_triton_interpreter_subprocess():
    """Run every ``triton`` case of this file in a child pytest with TRITON_INTERPRET=1 set at start."""
    run_triton_cases_in_child(__file__)


def test_triton_kernels_compile_for_gpu(monkeypatch, tmp_path):
    """Ahead-of-time compile of every Triton kernel to PTX/cubin for sm_90 (no GPU needed): catches what
    the interpreter does not check (types, layouts, constexpr branches)."""
    def specs():
        k = _backend.triton_kernels("feature_moments")
        c = "constexpr"
        out = []
        for dt in ("fp32", "bf16"):
            acc = "fp32"
            out += [
                (k._rows_kernel, {"x_ptr": f"*{dt}", "out_ptr": f"*{acc}", "R": "i32", "P": "i32", "ORDER": c,
                                  "ACC_F64": c, "BLOCK_R": c, "BLOCK_P": c},
                 {"ORDER": 4, "ACC_F64": False, "BLOCK_R": 4, "BLOCK_P": 1024}),
                (k._class_map_kernel, {"x_ptr": f"*{dt}", "idx_ptr": "*i64", "off_ptr": "*i64", "a_ptr": f"*{acc}",
                                       "C": "i32", "P": "i32", "ACC_F64": c, "BLOCK_P": c},
                 {"ACC_F64": False, "BLOCK_P": 256}),
                (k._poly_kernel, {"src_ptr": f"*{dt}", "idx_ptr": "*i64", "center_ptr": "*fp32", "coef_ptr": "*fp32",
                                  "out_ptr": f"*{dt}", "R": "i32", "P": "i32", "HAS_IDX": c, "DEGREE": c,
                                  "BLOCK_R": c, "BLOCK_P": c},
                 {"HAS_IDX": True, "DEGREE": 3, "BLOCK_R": 4, "BLOCK_P": 1024}),
                (k._class_gram_kernel, {"x_ptr": f"*{dt}", "idx_ptr": "*i64", "off_ptr": "*i64", "scale_ptr": "*fp32",
                                        "g_ptr": "*fp32", "C": "i32", "P": "i32", "IEEE": c, "BLOCK_C": c,
                                        "BLOCK_P": c},
                 {"IEEE": dt == "fp32", "BLOCK_C": 64, "BLOCK_P": 32}),
                (k._gram_bwd_kernel, {"s_ptr": "*fp32", "x_ptr": f"*{dt}", "lab_ptr": "*i64", "dx_ptr": f"*{dt}",
                                      "C": "i32", "P": "i32", "IEEE": c, "BLOCK_M": c, "BLOCK_K": c, "BLOCK_P": c},
                 {"IEEE": dt == "fp32", "BLOCK_M": 64, "BLOCK_K": 32, "BLOCK_P": 64}),
            ]
        return out

    compile_for_gpu(specs, monkeypatch, tmp_path)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    shapes = [(3, 4, 4), (2, 2, 2)]
    syn, sl = make_maps(6, 2, shapes)
    real, rl = make_maps(8, 2, shapes)
    stats = [fm.class_moments_reference(r, rl, 2) for r in real]
    m = MomentMatcher()

    def raises(match, fn, exc=(ValueError, TypeError)):
        with pytest.raises(exc, match=match):
            fn()

    raises(r"^x: expected a 4-d", lambda: fm.class_moments(syn[0][0], sl, 2))
    raises(r"^mode:", lambda: fm.class_moments(syn[0], sl, 2, mode="bogus"))
    raises(r"^labels: labels must lie in", lambda: fm.class_moments(syn[0], sl + 1, 2))
    raises(r"^labels: expected 6 labels", lambda: fm.class_moments(syn[0], sl[:5], 2))
    raises(r"^labels: class\(es\) \[2\] have no samples", lambda: fm.class_moments(syn[0], sl, 3))
    raises(r"^labels: dtype", lambda: fm.class_moments(syn[0], sl.float(), 2))
    raises(r"^syn_maps\[1\]: dtype", lambda: fm.moment_loss([syn[0], syn[1].double()], sl, stats, 2))
    raises(r"^syn_maps\[1\]: has 5 samples", lambda: fm.moment_loss([syn[0], syn[1][:5]], sl, stats, 2))
    raises(r"^real_stats: expected 2 entries", lambda: fm.moment_loss(syn, sl, stats[:1], 2))
    raises(r"^real_stats\[1\]\[0\]: expected shape", lambda: fm.moment_loss(syn, sl, [stats[0], stats[0]], 2))
    raises(r"^layer_weights:", lambda: fm.moment_loss(syn, sl, stats, 2, layer_weights=[1.0]))
    raises(r"^real_grams: expected 2 entries", lambda: fm.gram_loss(syn, sl, [torch.zeros(2, 3, 3)], 2))
    raises(r"^running_var: expected shape", lambda: fm.bn_stat_loss(syn[0], torch.zeros(3), torch.zeros(4)))
    raises(r"^real_maps: expected 2 layers", lambda: m(syn, sl, real[:1], rl, 2))
    raises(r"^real_maps\[0\]: dtype", lambda: m(syn, sl, [r.double() for r in real], rl, 2))
    raises(r"^real_maps\[1\]: per-sample shape", lambda: m(syn, sl, [real[0], real[0]], rl, 2))
    raises(r"^num_classes:", lambda: m(syn, sl, real, rl, 0))
    sl_one = torch.zeros_like(sl)
    raises(r"^syn_labels: class\(es\) \[1\] present in real_labels but not in syn_labels",
           lambda: m(syn, sl_one, real, rl, 2))
    raises(r"^real_labels: class\(es\) \[1\] present in syn_labels",
           lambda: m(syn, sl, real, torch.zeros_like(rl), 2))
    raises(r"^real_labels: labels must lie in", lambda: m(syn, sl, real, rl - 1, 2))
    raises(r"^syn_maps: expected a tensor", lambda: m([], sl, real, rl, 2))
    if torch.cuda.is_available():
        raises(r"^real_maps\[0\]: on device", lambda: m(syn, sl, [r.cuda() for r in real], rl, 2))
    raises(r"^real_maps\[0\]: on device", lambda: m(syn, sl, [r.to("meta") for r in real], rl, 2))


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", fm.MODES)
def test_gpu_backends_match_float64(backend, dtype, mode):
    if not _backend.backend_available(backend, "cuda", "feature_moments"):
        pytest.skip(f"{backend} not available on this GPU build")
    shapes = [(64, 16, 16), (128, 8, 8), (5, 7, 9)]
    syn, sl = make_maps(40, 10, shapes, dtype=dtype, device="cuda", seed=11)
    real, rl = make_maps(120, 10, shapes, dtype=dtype, device="cuda", seed=12)
    for r in real:
        ref = fm.class_moments_reference(r.double(), rl, 10, mode=mode, higher=True)
        base = fm.class_moments_reference(r.float() if dtype != torch.float32 else r, rl, 10, mode=mode,
                                          higher=True)
        got = fm.class_moments(r, rl, 10, mode=mode, higher=True, backend=backend)
        for o, rr, b in zip(got, ref, base):
            assert_rule(o, rr, b, torch.float32, f"{backend}/{dtype}/{mode} stats")
    stats = [tuple(t.float() for t in fm.class_moments_reference(r.double(), rl, 10, mode=mode)) for r in real]
    ms = [s.clone().requires_grad_(True) for s in syn]
    loss = fm.moment_loss(ms, sl, stats, 10, mode=mode, backend=backend)
    grads = torch.autograd.grad(loss, ms)
    m64 = [s.double().requires_grad_(True) for s in syn]
    l64 = fm.moment_loss_reference(m64, sl, [tuple(t.double() for t in s) for s in stats], 10, mode=mode)
    g64 = torch.autograd.grad(l64, m64)
    mb = [s.clone().requires_grad_(True) for s in syn]
    lb = fm.moment_loss_reference(mb, sl, stats, 10, mode=mode)
    gb = torch.autograd.grad(lb, mb)
    assert_rule(loss, l64, lb, dtype, f"{backend}/{dtype}/{mode} loss")
    for g, r, b in zip(grads, g64, gb):
        assert g.dtype == dtype
        assert_rule(g, r, b, dtype, f"{backend}/{dtype}/{mode} grad")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_gram_and_bn(backend):
    if not _backend.backend_available(backend, "cuda", "feature_moments"):
        pytest.skip(f"{backend} not available on this GPU build")
    syn, sl = make_maps(30, 10, [(96, 12, 12)], device="cuda", seed=13)
    real, rl = make_maps(60, 10, [(96, 12, 12)], device="cuda", seed=14)
    grams = [fm.class_gram_reference(real[0].double(), rl, 10).float()]
    ms = [syn[0].clone().requires_grad_(True)]
    loss = fm.gram_loss(ms, sl, grams, 10, backend=backend)
    (g,) = torch.autograd.grad(loss, ms)
    m64 = [syn[0].double().requires_grad_(True)]
    l64 = fm.gram_loss_reference(m64, sl, [grams[0].double()], 10)
    (g64,) = torch.autograd.grad(l64, m64)
    torch.testing.assert_close(loss.double(), l64, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-4 * g64.abs().max().item())
    rm, rv = torch.randn(96, device="cuda"), torch.rand(96, device="cuda")
    xb = syn[0].clone().requires_grad_(True)
    lb = fm.bn_stat_loss(xb, rm, rv, backend=backend)
    x64 = syn[0].double().requires_grad_(True)
    l64 = fm.bn_stat_loss_reference(x64, rm.double(), rv.double())
    torch.testing.assert_close(lb.double(), l64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(lb, xb)[0].double(), torch.autograd.grad(l64, x64)[0],
                               rtol=1e-4, atol=1e-7)
