"""Low-rank reconstruction op (fastdd/ops/lowrank.py) and LowRankImages (fastdd/matchers/lowrank.py).

Every CPU backend (cpp, torch, and triton in the TRITON_INTERPRET=1 child run, see
tests/ops/triton_interpreter.py) against a float64 reference on random and odd shapes, float64
gradcheck, opcheck, torch.compile(fullgraph=True) of LowRankImages.forward, bad inputs, the truncated-SVD
projection (Eckart-Young), and the storage budget of spec 1.3. GPU cases are marked ``gpu``.

Tolerance rule (as for the other ops): a backend's max error against the float64 reference (from the
same, already rounded inputs) is at most 2x that of the plain-torch op in the same dtype plus a floor of
a few units in the last place of the output dtype.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triton_interpreter import (
    CPU_BACKENDS,
    INTERPRETING_FROM_START,
    OP_BACKENDS,
    native_kernels,
    run_triton_cases_in_child,
    select_cpu_backend,
    spy_resolved_backends,
)

from fastdd.matchers import LowRankImages
from fastdd.ops import _backend
from fastdd.ops import lowrank as ops
from fastdd.ops._backend import BackendUnavailableError

HAS_CPP, needs_cpp = native_kernels("lowrank_fwd")


@pytest.fixture
def cpu_backend(request):
    return select_cpu_backend(request.param, HAS_CPP, "lowrank")


def make_factors(n, c, h, w, r, *, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, c, h, r, generator=g).to(dtype)
    b = torch.randn(n, c, r, w, generator=g).to(dtype)
    grad = torch.randn(n, c, h, w, generator=g).to(dtype)
    return a.to(device), b.to(device), grad.to(device)


def assert_rule(out, ref64, baseline, dtype, what):
    """|out - ref64| <= 2 |baseline - ref64| + floor (max norms)."""
    out, baseline, ref64 = (t.detach().double().cpu() for t in (out, baseline, ref64))
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if not out.numel():
        return
    err = (out - ref64).abs().max().item()
    base = (baseline - ref64).abs().max().item()
    floor = 4 * torch.finfo(dtype).eps * (1.0 + ref64.abs().max().item())
    assert err <= 2 * base + floor, f"{what}: error {err:.3e} > 2 x torch-{dtype} error {base:.3e} + {floor:.1e}"


def run(backend, a, b, grad, need=(True, True)):
    """(X, dA, dB) of one backend (dA/dB None when not needed)."""
    aa = a.detach().clone().requires_grad_(need[0])
    bb = b.detach().clone().requires_grad_(need[1])
    if backend == "reference":
        x = ops.lowrank_reconstruct_reference(aa, bb)
    else:
        x = ops.lowrank_reconstruct(aa, bb, backend=backend)
    wrt = [t for t, n in zip((aa, bb), need) if n]
    grads = list(torch.autograd.grad(x, wrt, grad))
    return x.detach(), (grads.pop(0) if need[0] else None), (grads.pop(0) if need[1] else None)


def check_against_reference(backend, a, b, grad, dtype, need=(True, True)):
    ref = run("reference", a.double(), b.double(), grad.double(), need)
    base = run("reference", a, b, grad, need)
    got = run(backend, a, b, grad, need)
    for name, o, r64, bl in zip(("X", "dA", "dB"), got, ref, base):
        if r64 is None:
            assert o is None
            continue
        assert o.dtype == dtype, f"{name}: dtype {o.dtype}"
        assert_rule(o, r64, bl, dtype, f"{backend}/{dtype} {name}")


# (N, C, H, W, r): general, N = C = 1, H = 1, W = 1, r = 1, odd rank with H != W, W over one Triton
# column strip (300 > 256, so the dA partials are summed), rank over one Triton rank chunk (40 > 32)
SHAPES = [
    pytest.param((2, 3, 5, 7, 2), id="general"),
    pytest.param((1, 1, 6, 9, 3), id="N=C=1"),
    pytest.param((2, 1, 1, 9, 1), id="H=1-r=1"),
    pytest.param((1, 2, 7, 1, 1), id="W=1"),
    pytest.param((2, 2, 9, 13, 5), id="r=5-H!=W"),
    pytest.param((1, 1, 10, 300, 3), id="W=300"),
    pytest.param((1, 1, 18, 20, 40), id="r=40"),
]


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(cpu_backend, shape):
    a, b, grad = make_factors(*shape)
    check_against_reference(cpu_backend, a, b, grad, torch.float32)


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["dA-only", "dB-only"])
def test_one_factor_frozen(cpu_backend, need):
    a, b, grad = make_factors(2, 2, 6, 11, 3, seed=1)
    check_against_reference(cpu_backend, a, b, grad, torch.float32, need=need)


@pytest.mark.parametrize("cpu_backend", ["cpp", "closed_form", "torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_cpu(cpu_backend, dtype):
    a, b, grad = make_factors(3, 2, 13, 17, 4, dtype=dtype, seed=2)  # H = 13: 4-row blocks and a tail
    check_against_reference(cpu_backend, a, b, grad, dtype)


@pytest.mark.parametrize("cpu_backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_triton_interpreter_other_dtypes(cpu_backend, dtype):
    a, b, grad = make_factors(2, 1, 9, 21, 3, dtype=dtype, seed=3)
    check_against_reference(cpu_backend, a, b, grad, dtype)


@needs_cpp
def test_cpp_independent_of_thread_count():
    a, b, grad = make_factors(40, 3, 16, 16, 4, seed=4)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(run("cpp", a, b, grad))
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        for x, y in zip(o, outs[0]):
            assert torch.equal(x, y)


@needs_cpp
@pytest.mark.parametrize("rank", [1, 3, 8, 9])  # compile-time ranks 1..8, the general kernel above
def test_cpp_scalar_path_matches_reference(monkeypatch, rank):
    """FASTDD_SIMD=scalar forces the scalar inner loops (test_determinism.py: every path agrees bit for bit)."""
    monkeypatch.setenv("FASTDD_SIMD", "scalar")
    a, b, grad = make_factors(3, 2, 11, 19, rank, seed=rank)
    check_against_reference("cpp", a, b, grad, torch.float32)
    check_against_reference("cpp", a.double(), b.double(), grad.double(), torch.float64)


@needs_cpp
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), c=st.integers(1, 3), h=st.integers(1, 20), w=st.integers(1, 40),
       r=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_cpp_random_shapes(n, c, h, w, r, seed):
    a, b, grad = make_factors(n, c, h, w, r, seed=seed)
    check_against_reference("cpp", a, b, grad, torch.float32)


def test_noncontiguous_inputs():
    a, b, grad = make_factors(2, 3, 8, 10, 3, seed=5)
    a_nc = a.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    b_nc = torch.stack([b, b], -1).flatten(-2)[..., ::2]  # stride 2 in the last dim
    assert not b_nc.is_contiguous() and torch.equal(b_nc, b)
    for backend in ["torch"] + (["cpp"] if HAS_CPP else []):
        aa, bb = a_nc.clone().requires_grad_(True), b_nc.clone().requires_grad_(True)
        x = ops.lowrank_reconstruct(aa, bb, backend=backend)
        torch.testing.assert_close(x, a @ b)
        ga, gb = torch.autograd.grad(x, (aa, bb), grad.transpose(2, 3).contiguous().transpose(2, 3))
        torch.testing.assert_close(ga, grad @ b.transpose(2, 3), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gb, a.transpose(2, 3) @ grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(INTERPRETING_FROM_START, reason="already inside the interpreter run")
def test_triton_interpreter_subprocess():
    """Run every ``triton`` case of this file in a child pytest with TRITON_INTERPRET=1 set at start."""
    run_triton_cases_in_child(__file__)


# ---------------------------------------------------------------------------------- gradcheck / opcheck
@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
def test_gradcheck_float64(cpu_backend):
    a, b, _ = make_factors(2, 2, 4, 5, 2, dtype=torch.float64, seed=6)
    a.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: ops.lowrank_reconstruct(x, y, backend=cpu_backend), (a, b))


@pytest.mark.parametrize("cpu_backend", OP_BACKENDS, indirect=True)
def test_opcheck(cpu_backend):
    a, b, grad = make_factors(2, 3, 5, 6, 2, seed=7)
    ar, br = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    cases = [
        (torch.ops.fastdd.lowrank_reconstruct.default, (ar, br, cpu_backend)),
        (torch.ops.fastdd.lowrank_reconstruct.default, (a, br, cpu_backend)),
        (torch.ops.fastdd.lowrank_reconstruct_backward.default, (grad, a, b, True, True, cpu_backend)),
        (torch.ops.fastdd.lowrank_reconstruct_backward.default, (grad, a, b, False, True, cpu_backend)),
        (torch.ops.fastdd.lowrank_reconstruct_backward.default, (grad, a, b, True, False, cpu_backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(8)
    eager = LowRankImages.from_noise(4, 3, 8, 6, 2, gen)
    compiled_mod = LowRankImages.from_factors(**eager.factors())
    compiled = torch.compile(compiled_mod.forward, fullgraph=True)
    w = torch.randn(4, 3, 8, 6, generator=gen)
    x1, x2 = eager(), compiled()
    torch.testing.assert_close(x2, x1)
    g1 = torch.autograd.grad((x1 * w).sum(), (eager.factor_a, eager.factor_b))
    g2 = torch.autograd.grad((x2 * w).sum(), (compiled_mod.factor_a, compiled_mod.factor_b))
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v)


def test_reconstruct_then_loss_equals_loss_on_product():
    """Spec 1.8 parity 1: a loss on the reconstruction and its factor gradients equal those of the same
    loss evaluated on plain ``A @ B`` (autograd through torch.matmul)."""
    a, b, _ = make_factors(3, 2, 7, 9, 2, seed=9)
    target = torch.randn(3, 2, 7, 9, generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (True, False):
        aa, bb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        x = ops.lowrank_reconstruct(aa, bb) if fused else aa @ bb
        loss = ((x - target) ** 2).mean()
        results.append((loss.detach(), *torch.autograd.grad(loss, (aa, bb))))
    for u, v in zip(*results):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ backend choice
def test_env_forces_backend(monkeypatch):
    a, b, _ = make_factors(1, 1, 3, 3, 1)
    seen = spy_resolved_backends(monkeypatch, "lowrank_fwd")
    monkeypatch.setenv("FASTDD_BACKEND", "torch")
    ops.lowrank_reconstruct(a, b)
    assert seen == ["torch"]
    monkeypatch.delenv("FASTDD_BACKEND")
    if HAS_CPP:
        ops.lowrank_reconstruct(a, b)
        assert seen[-1] == "cpp"  # automatic choice on CPU
        monkeypatch.setenv("FASTDD_BACKEND", "cpp")
        LowRankImages(a, b)()
        assert seen[-1] == "cpp"


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_unavailable_backend_raises(monkeypatch, name):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a, b, _ = make_factors(1, 1, 3, 3, 1)
    with pytest.raises(BackendUnavailableError, match=name):
        ops.lowrank_reconstruct(a, b, backend=name)
    monkeypatch.setenv("FASTDD_BACKEND", name)
    with pytest.raises(BackendUnavailableError, match=name):
        ops.lowrank_reconstruct(a, b)


def test_automatic_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(_backend, "native_has_op", lambda op: False)
    monkeypatch.setattr(_backend, "_warned", set())
    a, b, _ = make_factors(1, 1, 3, 3, 1)
    seen = spy_resolved_backends(monkeypatch, "lowrank_fwd")
    with pytest.warns(RuntimeWarning, match="using 'closed_form'"):
        ops.lowrank_reconstruct(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.lowrank_reconstruct(a, b)
    assert seen == ["closed_form", "closed_form"]


# ----------------------------------------------------------------------------------------- bad input
A, B = torch.randn(2, 3, 5, 2), torch.randn(2, 3, 2, 7)
BAD = [
    (dict(factor_a=torch.randn(3, 5, 2)), ValueError, r"factor_a: expected a 4-d tensor"),
    (dict(factor_b=torch.randn(2, 3, 2, 7, 1)), ValueError, r"factor_b: expected a 4-d tensor"),
    (dict(factor_b=torch.randn(3, 3, 2, 7)), ValueError, r"factor_b: 3 images \(dim 0\) do not match factor_a's 2"),
    (dict(factor_b=torch.randn(2, 1, 2, 7)), ValueError, r"factor_b: 1 channels"),
    (dict(factor_b=torch.randn(2, 3, 3, 7)), ValueError, r"factor_b: rank 3 \(dim 2\) does not match factor_a's rank 2"),
    (dict(factor_b=B.double()), TypeError, r"factor_b: dtype torch.float64 does not match"),
    (dict(factor_a=torch.ones(2, 3, 5, 2, dtype=torch.int64)), TypeError, r"factor_a: dtype torch.int64"),
    (dict(factor_b=torch.randn(2, 3, 2, 7, device="meta")), ValueError, r"factor_b: on device meta"),
    (dict(factor_a=torch.randn(2, 3, 5, 0), factor_b=torch.randn(2, 3, 0, 7)), ValueError, r"rank \(dim 3\) must be >= 1"),
    (dict(factor_a=[[1.0]]), TypeError, r"factor_a: expected a torch.Tensor"),
]


@pytest.mark.parametrize("changes,exc,msg", BAD)
def test_bad_input(changes, exc, msg):
    args = dict(factor_a=A, factor_b=B)
    args.update(changes)
    with pytest.raises(exc, match=msg):
        ops.lowrank_reconstruct(**args)
    with pytest.raises(exc, match=msg):
        LowRankImages(**args)


def test_bad_input_other():
    bad = A.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="factor_a: contains NaN or Inf"):
        LowRankImages(bad, B)
    with pytest.raises(ValueError, match="factor_a: contains NaN or Inf"):
        ops.lowrank_reconstruct(bad, B, check_finite=True)
    with pytest.raises(ValueError, match="backend"):
        ops.lowrank_reconstruct(A, B, backend="numpy")
    with pytest.raises(ValueError, match="backend"):
        LowRankImages(A, B, backend="numpy")
    imgs = torch.randn(2, 1, 6, 4, generator=torch.Generator(device='cpu').manual_seed(1000))
    with pytest.raises(ValueError, match=r"rank: 5 exceeds min\(H, W\) = 4"):
        ops.lowrank_project(imgs, 5)
    with pytest.raises(ValueError, match=r"rank: must be >= 1"):
        LowRankImages.from_real(imgs, 0)
    with pytest.raises(TypeError, match=r"rank: expected an int"):
        ops.lowrank_project(imgs, 2.0)
    with pytest.raises(ValueError, match=r"images: expected a 4-d tensor"):
        ops.lowrank_project(imgs[0], 1)
    nan_imgs = imgs.clone()
    nan_imgs[1, 0, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="images: contains NaN or Inf"):
        ops.lowrank_project(nan_imgs, 1)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"rank: 9 exceeds min\(H, W\) = 8"):
        LowRankImages.from_noise(2, 1, 8, 10, 9, gen)
    with pytest.raises(ValueError, match="num_images: expected a positive int"):
        LowRankImages.from_noise(0, 1, 8, 10, 2, gen)
    with pytest.raises(TypeError, match="generator"):
        LowRankImages.from_noise(1, 1, 8, 10, 2, 0)


@needs_cpp
def test_native_kernel_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match=r"factor_b: rank 3 \(dim 2\) does not match"):
        torch.ops.fastdd_C.lowrank_fwd(A, torch.randn(2, 3, 3, 7))
    with pytest.raises(RuntimeError, match=r"grad: expected shape \[2, 3, 5, 7\]"):
        torch.ops.fastdd_C.lowrank_bwd(torch.randn(2, 3, 5, 6), A, B, True, True)


# ---------------------------------------------------------------------------------------- projection
def _planes(n, c, h, w, seed):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(3, 2, 8, 8), (2, 1, 5, 9), (1, 3, 12, 4)])
def test_from_real_full_rank_reproduces_images(shape):
    images = _planes(*shape, seed=10)
    full = min(shape[2], shape[3])
    module = LowRankImages.from_real(images, full)
    assert module.rank == full and module.image_shape == shape[1:] and module.num_images == shape[0]
    torch.testing.assert_close(module(), images, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_from_real_is_best_rank_r_approximation(rank):
    images = _planes(4, 3, 9, 7, seed=11).double()
    module = LowRankImages.from_real(images, rank)
    approx = module().detach()
    # explicit truncation of the SVD, and the Eckart-Young error sqrt(sum of discarded sigma^2)
    u, s, vh = torch.linalg.svd(images, full_matrices=False)
    truncated = u[..., :rank] @ torch.diag_embed(s[..., :rank]) @ vh[..., :rank, :]
    torch.testing.assert_close(approx, truncated, rtol=1e-10, atol=1e-10)
    err = torch.linalg.matrix_norm(images - approx)  # Frobenius per plane
    torch.testing.assert_close(err, s[..., rank:].square().sum(-1).sqrt(), rtol=1e-10, atol=1e-10)
    assert torch.linalg.matrix_rank(approx).max().item() == rank
    # no other rank-r factorisation of a plane does better: e.g. the noise init or a perturbed optimum
    other = LowRankImages.from_noise(4, 3, 9, 7, rank, torch.Generator().manual_seed(1), dtype=torch.float64)()
    assert (torch.linalg.matrix_norm(images - other.detach()) >= err).all()
    # the symmetric split: A = U sqrt(S), B = sqrt(S) V^T, so A^T A = B B^T = diag(S_r)
    a, b = module.factor_a.detach(), module.factor_b.detach()
    torch.testing.assert_close(a.transpose(-1, -2) @ a, torch.diag_embed(s[..., :rank]), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b @ b.transpose(-1, -2), torch.diag_embed(s[..., :rank]), rtol=1e-9, atol=1e-9)


def test_project_low_precision_and_dtype():
    images = _planes(2, 1, 6, 6, seed=12).to(torch.bfloat16)
    a, b = ops.lowrank_project(images, 6)
    assert a.dtype == b.dtype == torch.bfloat16 and a.shape == (2, 1, 6, 6) and b.shape == (2, 1, 6, 6)
    torch.testing.assert_close((a.float() @ b.float()), images.float(), rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------------ LowRankImages
def test_from_noise_uses_the_generator_and_reference_statistics():
    m1 = LowRankImages.from_noise(50, 3, 16, 16, 4, torch.Generator().manual_seed(3))
    m2 = LowRankImages.from_noise(50, 3, 16, 16, 4, torch.Generator().manual_seed(3))
    m3 = LowRankImages.from_noise(50, 3, 16, 16, 4, torch.Generator().manual_seed(4))
    assert torch.equal(m1.factor_a, m2.factor_a) and torch.equal(m1.factor_b, m2.factor_b)
    assert not torch.equal(m1.factor_a, m3.factor_a)
    # A then B, both N(0, 1), from the one generator
    g = torch.Generator().manual_seed(3)
    assert torch.equal(m1.factor_a, torch.randn(50, 3, 16, 4, generator=g))
    assert torch.equal(m1.factor_b, torch.randn(50, 3, 4, 16, generator=g))
    x = m1().detach()
    assert abs(x.mean().item()) < 0.05 and abs(x.var().item() / 4 - 1) < 0.1  # pixel variance r (spec 1.1)


def test_factors_round_trip_and_plain_torch_reload():
    module = LowRankImages.from_noise(5, 2, 7, 9, 2, torch.Generator().manual_seed(13))
    saved = module.factors()
    assert set(saved) == {"factor_a", "factor_b"}
    assert all(not t.requires_grad and t.device.type == "cpu" for t in saved.values())
    saved["factor_a"].add_(0.0)  # a copy: editing it must not touch the module
    reloaded = LowRankImages.from_factors(**saved)
    assert torch.equal(reloaded(), module())
    torch.testing.assert_close(saved["factor_a"] @ saved["factor_b"], module().detach(), rtol=1e-6, atol=1e-6)
    assert [n for n, _ in module.named_parameters()] == ["factor_a", "factor_b"]
    assert module.stored_floats() == 5 * ops.lowrank_floats_per_image(2, 7, 9, 2) == 5 * 2 * 2 * (7 + 9)


def test_training_step_reduces_a_loss():
    """SGD with momentum over the module's parameters (as the reference) fits a target image set."""
    target = LowRankImages.from_noise(4, 1, 10, 10, 2, torch.Generator().manual_seed(14))().detach()
    module = LowRankImages.from_noise(4, 1, 10, 10, 2, torch.Generator().manual_seed(15))
    opt = torch.optim.SGD(module.parameters(), lr=1.0, momentum=0.5)
    losses = []
    for _ in range(30):
        loss = ((module() - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


# ------------------------------------------------------------------------------------------- budget
@pytest.mark.parametrize("size,expected", [
    (28, (14, 7, 3, 1)),
    (32, (16, 8, 4, 2)),
    (64, (32, 16, 8, 4)),
])
def test_budget_table_code_rounding(size, expected):
    """Spec 1.3 multipliers (code rounding: ratio floored, then times IPC)."""
    for rank, mult in zip((1, 2, 4, 8), expected):
        assert ops.lowrank_ipc(1, size, size, rank) == mult
        assert ops.lowrank_ipc(10, size, size, rank, rounding="code") == 10 * mult


def test_budget_roundings_differ_where_the_ratio_is_fractional():
    # 28x28, r=8: ratio 784 / 448 = 1.75
    assert [ops.lowrank_ipc(i, 28, 28, 8, rounding="code") for i in (1, 10, 50)] == [1, 10, 50]
    assert [ops.lowrank_ipc(i, 28, 28, 8, rounding="readme") for i in (1, 10, 50)] == [1, 17, 87]
    # integral ratios agree; the configs' CIFAR settings (spec 1.3)
    for rounding in ops.ROUNDINGS:
        assert ops.lowrank_ipc(1, 32, 32, 2, rounding=rounding) == 8
        assert ops.lowrank_ipc(10, 32, 32, 2, rounding=rounding) == 80
        assert ops.lowrank_ipc(50, 32, 32, 4, rounding=rounding) == 200
        assert ops.lowrank_ipc(10, 64, 64, 4, rounding=rounding) == 80
    # the two formulas: code <= readme always
    for ipc in (1, 3, 10):
        for r in (1, 2, 3, 5):
            for h, w in ((28, 28), (32, 32), (17, 40)):
                code = ops.lowrank_ipc(ipc, h, w, r) if (h * w) // (r * (h + w)) else 0
                assert code == ipc * ((h * w) // (r * (h + w)))
                assert code <= ops.lowrank_ipc(ipc, h, w, r, rounding="readme") == (ipc * h * w) // (r * (h + w))


def test_budget_errors():
    with pytest.raises(ValueError, match=r"rank: 16 is too large for 28x28"):
        ops.lowrank_ipc(1, 28, 28, 16)
    # r=15: one low-rank image costs 840 floats per channel > 784; two IPC pay for one image only when
    # the budget is pooled before flooring (readme), not per IPC (code)
    with pytest.raises(ValueError, match=r"rank: 15 is too large"):
        ops.lowrank_ipc(2, 28, 28, 15, rounding="code")
    assert ops.lowrank_ipc(2, 28, 28, 15, rounding="readme") == 1
    with pytest.raises(ValueError, match=r"rank: 15 is too large"):
        ops.lowrank_ipc(1, 28, 28, 15, rounding="readme")
    with pytest.raises(ValueError, match="rounding"):
        ops.lowrank_ipc(1, 28, 28, 2, rounding="nearest")
    with pytest.raises(ValueError, match="ipc"):
        ops.lowrank_ipc(0, 28, 28, 2)


def test_stored_floats_within_plain_budget():
    """At rank 2 on 1x28x28 the low-rank set (7 per class per IPC) stores no more than the plain set."""
    for rounding in ops.ROUNDINGS:
        for ipc in (1, 10, 50):
            n = ops.lowrank_ipc(ipc, 28, 28, 2, rounding=rounding)
            module = LowRankImages.from_noise(n, 1, 28, 28, 2, torch.Generator().manual_seed(0))
            assert module.stored_floats() == n * ops.lowrank_floats_per_image(1, 28, 28, 2)
            assert module.stored_floats() <= ipc * 1 * 28 * 28
    assert math.floor(784 / (2 * 56)) == ops.lowrank_ipc(1, 28, 28, 2) == 7


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 3, 32, 32, 2), (4, 3, 224, 224, 8), (3, 2, 7, 300, 20), (1, 1, 1, 1, 1)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_backends(backend, dtype, shape):
    if not _backend.backend_available(backend, "cuda", "lowrank_fwd"):
        pytest.skip(f"backend {backend} not available")
    a, b, grad = make_factors(*shape, dtype=dtype, device="cuda")
    check_against_reference(backend, a, b, grad, dtype)
    check_against_reference(backend, a, b, grad, dtype, need=(False, True))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compile_and_gradcheck(backend):
    if not _backend.backend_available(backend, "cuda", "lowrank_fwd"):
        pytest.skip(f"backend {backend} not available")
    module = LowRankImages.from_noise(8, 3, 16, 16, 2, torch.Generator().manual_seed(0), device="cuda",
                                      backend=backend)
    x = torch.compile(module.forward, fullgraph=True)()
    x.sum().backward()
    torch.testing.assert_close(x, module.factor_a @ module.factor_b)
    a, b, _ = make_factors(2, 2, 4, 5, 2, dtype=torch.float64, device="cuda")
    if backend == "cuda":
        assert torch.autograd.gradcheck(lambda u, v: ops.lowrank_reconstruct(u, v, backend=backend),
                                        (a.requires_grad_(True), b.requires_grad_(True)))
