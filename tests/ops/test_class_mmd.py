"""Per-class MMD op (fastdd/ops/class_mmd.py): every backend against a float64 reference, gradcheck,
opcheck, torch.compile(fullgraph=True), backend forcing and bad-input errors.

CPU backends: cpp (the compiled extension), torch (reference), and triton under the interpreter on
small fp32/fp16 shapes. Triton 3.x decides at *import of triton itself* whether ``@triton.jit`` functions
(its own ``tl.zeros`` etc. included) are interpreted, so monkeypatching TRITON_INTERPRET mid-process is
not enough: the ``[triton]`` cases are skipped in a normal run and executed by
``test_triton_interpreter_subprocess`` in one child pytest started with TRITON_INTERPRET=1 (they also run
directly under ``TRITON_INTERPRET=1 pytest ...``). GPU cases are marked ``gpu``.

Tolerance rule: a backend's max error against the float64 reference (computed from the same, already
rounded inputs) is at most 2x that of the plain-torch reference run in the same dtype, plus a floor of a
few units in the last place of the output dtype.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import triton_interpreter as shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdd.matchers import MMDMatcher
from fastdd.ops import _backend
from fastdd.ops import class_mmd as ops
from fastdd.ops._backend import BackendUnavailableError

BANDWIDTHS = [1.5, 4.0]

HAS_CPP, needs_cpp = shared.native_kernels("class_mmd_fwd")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def cpu_backend(request):
    """Parametrised backend name; 'triton' only runs when the interpreter was on from the start."""
    return shared.select_cpu_backend(request.param, HAS_CPP, "class_mmd")




def make_case(nr, ns, d, k, *, dtype=torch.float32, seed=0, device="cpu", sort=False, scale=1.0):
    """Random features with every class present on both sides (labels unsorted unless ``sort``)."""
    g = torch.Generator().manual_seed(seed)
    rl = torch.cat([torch.arange(k), torch.randint(0, k, (nr - k,), generator=g)])
    sl = torch.cat([torch.arange(k), torch.randint(0, k, (ns - k,), generator=g)])
    if sort:
        rl, sl = rl.sort().values, sl.sort().values
    else:
        rl, sl = rl[torch.randperm(nr, generator=g)], sl[torch.randperm(ns, generator=g)]
    real = (torch.randn(nr, d, generator=g) * scale + 0.3).to(dtype)
    syn = (torch.randn(ns, d, generator=g) * scale).to(dtype)
    return real.to(device), rl.to(device), syn.to(device), sl.to(device), k


def _ulp(dtype):
    return torch.finfo(dtype).eps


def assert_rule(out, ref64, baseline, dtype, what):
    """|out - ref64| <= 2 |baseline - ref64| + floor (max norms)."""
    out, baseline = out.detach().double().cpu(), baseline.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = (out - ref64).abs().max().item() if out.numel() else 0.0
    base = (baseline - ref64).abs().max().item() if out.numel() else 0.0
    floor = 4 * _ulp(dtype) * (1.0 + ref64.abs().max().item() if ref64.numel() else 1.0)
    assert err <= 2 * base + floor, f"{what}: error {err:.3e} > 2 x torch-{dtype} error {base:.3e} + {floor:.1e}"


def run_op(kind, backend, real, rl, syn, sl, k, grad_scale=1.0):
    """(loss, d real, d syn) for one backend; grad_scale != 1 exercises the backward's use of g."""
    r = real.detach().clone().requires_grad_(True)
    s = syn.detach().clone().requires_grad_(True)
    if kind == "linear":
        loss = ops.class_mmd(r, rl, s, sl, k, backend=backend)
    else:
        loss = ops.gaussian_class_mmd(r, rl, s, sl, k, BANDWIDTHS, backend=backend)
    gr, gs = torch.autograd.grad(loss * grad_scale, (r, s))
    return loss.detach(), gr, gs


def run_reference(kind, real, rl, syn, sl, k, grad_scale=1.0):
    r = real.detach().clone().requires_grad_(True)
    s = syn.detach().clone().requires_grad_(True)
    if kind == "linear":
        loss = ops.class_mmd_reference(r, rl, s, sl, k)
    else:
        loss = ops.gaussian_class_mmd_reference(r, rl, s, sl, k, BANDWIDTHS)
    gr, gs = torch.autograd.grad(loss * grad_scale, (r, s))
    return loss.detach(), gr, gs


def check_against_reference(kind, backend, case, dtype, grad_scale=1.0):
    real, rl, syn, sl, k = case
    ref64 = run_reference(kind, real.double(), rl, syn.double(), sl, k, grad_scale)
    base = run_reference(kind, real, rl, syn, sl, k, grad_scale)
    got = run_op(kind, backend, real, rl, syn, sl, k, grad_scale)
    for name, o, r64, b in zip(("loss", "grad real", "grad syn"), got, ref64, base):
        assert o.dtype == real.dtype, f"{name}: dtype {o.dtype}"
        assert_rule(o, r64, b, dtype, f"{kind}/{backend}/{dtype} {name}")


# (Nr, Ns, D, K, sort): general, one class, one sample per class, D = 1, D not a block multiple, sorted
SHAPES = [
    pytest.param((40, 12, 37, 4, False), id="general"),
    pytest.param((9, 3, 5, 1, False), id="one-class"),
    pytest.param((5, 5, 6, 5, False), id="one-per-class"),
    pytest.param((14, 6, 1, 3, False), id="D=1"),
    pytest.param((21, 7, 130, 3, True), id="D=130-sorted"),
]


@pytest.mark.parametrize("cpu_backend", shared.CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("kind", ["linear", "gaussian"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(cpu_backend, kind, shape):
    nr, ns, d, k, sort = shape
    case = make_case(nr, ns, d, k, sort=sort, scale=0.5 if kind == "gaussian" else 1.0)
    check_against_reference(kind, cpu_backend, case, torch.float32, grad_scale=1.0 if d != 37 else 3.0)


@pytest.mark.parametrize("cpu_backend", ["cpp", "closed_form", "torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "gaussian"])
def test_low_precision_inputs_cpu(cpu_backend, dtype, kind):
    case = make_case(33, 11, 19, 3, dtype=dtype, scale=0.5)
    check_against_reference(kind, cpu_backend, case, dtype)


@pytest.mark.parametrize("cpu_backend", ["triton"], indirect=True)
def test_triton_interpreter_fp16_linear(cpu_backend):
    case = make_case(20, 8, 21, 3, dtype=torch.float16)
    check_against_reference("linear", cpu_backend, case, torch.float16)


@pytest.mark.parametrize("cpu_backend", ["cpp", "triton"], indirect=True)
def test_gaussian_multiple_tiles(cpu_backend):
    """Classes larger than one row tile (cpp: 256, triton: 64) and a feature dim over several chunks."""
    n = 530 if cpu_backend == "cpp" else 140
    case = make_case(n, n // 5, 40, 2, scale=0.3)
    check_against_reference("gaussian", cpu_backend, case, torch.float32)


@pytest.mark.parametrize("cpu_backend", shared.CPU_BACKENDS, indirect=True)
def test_class_means(cpu_backend):
    x = torch.randn(23, 70)
    labels = torch.randint(0, 5, (23,))
    labels[0] = 4
    xr = x.clone().requires_grad_(True)
    got = ops.class_means(xr, labels, 6, backend=cpu_backend)  # class 5 (and maybe others) empty
    ref = ops.class_means_reference(x.double(), labels, 6)
    base = ops.class_means_reference(x, labels, 6)
    assert_rule(got, ref, base, torch.float32, "class_means")
    w = torch.randn(6, 70)
    (gx,) = torch.autograd.grad((got * w).sum(), xr)
    counts = torch.bincount(labels, minlength=6).clamp_min(1).to(torch.float32)
    torch.testing.assert_close(gx, (w / counts[:, None])[labels])


@needs_cpp
def test_int32_labels_and_noncontiguous_inputs():
    real, rl, syn, sl, k = make_case(30, 10, 24, 3)
    real_t = real.t().contiguous().t()  # same values, column-major strides
    syn_nc = torch.cat([syn, syn], 1)[:, ::2]
    for backend in ("cpp", "torch"):
        got = ops.class_mmd(real_t, rl.int(), syn_nc, sl.int(), k, backend=backend)
        torch.testing.assert_close(got, ops.class_mmd_reference(real, rl, syn_nc.contiguous(), sl, k))
        got = ops.gaussian_class_mmd(real_t, rl.int(), syn_nc, sl.int(), k, BANDWIDTHS, backend=backend)
        want = ops.gaussian_class_mmd_reference(real, rl, syn_nc.contiguous(), sl, k, BANDWIDTHS)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_cpp
def test_cpp_loss_independent_of_thread_count():
    real, rl, syn, sl, k = make_case(300, 60, 1000, 7)
    threads = torch.get_num_threads()
    try:
        values = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            values.append(ops.class_mmd(real, rl, syn, sl, k, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    assert values[0].item() == values[1].item() == values[2].item()


@needs_cpp
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nr=st.integers(1, 40), ns=st.integers(1, 20), d=st.integers(1, 80), k=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_cpp_random_shapes(nr, ns, d, k, seed):
    k = min(k, nr, ns)
    case = make_case(nr, ns, d, k, seed=seed, scale=0.5)
    check_against_reference("linear", "cpp", case, torch.float32)
    check_against_reference("gaussian", "cpp", case, torch.float32)


def test_real_without_grad_and_single_bandwidth():
    real, rl, syn, sl, k = make_case(16, 8, 9, 4)
    s = syn.clone().requires_grad_(True)
    for matcher in (MMDMatcher(), MMDMatcher("gaussian", bandwidths=2.0)):
        loss = matcher(real, rl, s, sl, k)
        (gs,) = torch.autograd.grad(loss, s)
        s64 = syn.double().requires_grad_(True)
        if matcher.kernel == "linear":
            ref = ops.class_mmd_reference(real.double(), rl, s64, sl, k)
        else:
            ref = ops.gaussian_class_mmd_reference(real.double(), rl, s64, sl, k, [2.0])
        (gref,) = torch.autograd.grad(ref, s64)
        torch.testing.assert_close(gs.double(), gref, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(shared.INTERPRETING_FROM_START, reason="already inside the interpreter run")
def test_triton_interpreter_subprocess():
    """Run every ``triton`` case of this file in a child pytest with TRITON_INTERPRET=1 set at start."""
    shared.run_triton_cases_in_child(__file__)


# ---------------------------------------------------------------------------------- gradcheck / opcheck
@pytest.mark.parametrize("cpu_backend", ["cpp", "closed_form", "torch"], indirect=True)
def test_gradcheck_float64(cpu_backend):
    real, rl, syn, sl, k = make_case(7, 5, 3, 3, dtype=torch.float64)
    r, s = real.requires_grad_(True), syn.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ops.class_mmd(a, rl, b, sl, k, backend=cpu_backend), (r, s))
    assert torch.autograd.gradcheck(
        lambda a, b: ops.gaussian_class_mmd(a, rl, b, sl, k, BANDWIDTHS, backend=cpu_backend), (r, s))
    assert torch.autograd.gradcheck(lambda a: ops.class_means(a, rl, k, backend=cpu_backend), (r,))


@pytest.mark.parametrize("cpu_backend", ["cpp", "closed_form"], indirect=True)
def test_opcheck(cpu_backend):
    real, rl, syn, sl, k = make_case(9, 6, 5, 3)
    r, s = real.clone().requires_grad_(True), syn.clone().requires_grad_(True)
    out = torch.ops.fastdd.class_mmd(real, rl, syn, sl, k, cpu_backend)
    g = torch.tensor(1.5)
    cases = [
        (torch.ops.fastdd.class_mmd.default, (r, rl, s, sl, k, cpu_backend)),
        (torch.ops.fastdd.class_mmd_backward.default,
         (g, out[1], out[2], out[3], rl, sl, True, True, torch.float32, cpu_backend)),
        (torch.ops.fastdd.class_mmd_backward.default,
         (g, out[1], out[2], out[3], rl, sl, False, True, torch.float32, cpu_backend)),
        (torch.ops.fastdd.class_means.default, (r, rl, k, cpu_backend)),
        (torch.ops.fastdd.gaussian_class_mmd.default, (r, rl, s, sl, k, BANDWIDTHS, cpu_backend)),
        (torch.ops.fastdd.gaussian_class_mmd_backward.default,
         (g, real, rl, syn, sl, k, BANDWIDTHS, True, False, cpu_backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("kernel", ["linear", "gaussian"])
def test_compile_fullgraph_matches_eager(kernel):
    torch._dynamo.reset()
    real, rl, syn, sl, k = make_case(24, 8, 16, 4)
    kw = {"bandwidths": BANDWIDTHS} if kernel == "gaussian" else {}
    eager, compiled = MMDMatcher(kernel, **kw), torch.compile(MMDMatcher(kernel, **kw), fullgraph=True)
    s1, s2 = syn.clone().requires_grad_(True), syn.clone().requires_grad_(True)
    r2 = real.clone().requires_grad_(True)
    l1 = eager(real, rl, s1, sl, k)
    l2 = compiled(r2, rl, s2, sl, k)
    (g1,) = torch.autograd.grad(l1 * 2.0, s1)
    g2r, g2 = torch.autograd.grad(l2 * 2.0, (r2, s2))
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(g2, g1)
    assert g2r.shape == real.shape


# ------------------------------------------------------------------------------------ backend choice
def test_env_forces_backend(monkeypatch):
    real, rl, syn, sl, k = make_case(10, 5, 4, 2)
    seen = shared.spy_resolved_backends(monkeypatch, "class_mmd_fwd")
    monkeypatch.setenv("FASTDD_BACKEND", "torch")
    ops.class_mmd(real, rl, syn, sl, k)
    assert seen == ["torch"]
    monkeypatch.delenv("FASTDD_BACKEND")
    ops.class_mmd(real, rl, syn, sl, k, backend="torch")
    assert seen[-1] == "torch"
    if _backend.native_has_op("class_mmd_fwd"):
        ops.class_mmd(real, rl, syn, sl, k)
        assert seen[-1] == "cpp"  # automatic choice on CPU
        monkeypatch.setenv("FASTDD_BACKEND", "cpp")
        ops.class_mmd(real, rl, syn, sl, k)
        assert seen[-1] == "cpp"


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_unavailable_backend_raises(monkeypatch, name):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    real, rl, syn, sl, k = make_case(10, 5, 4, 2)
    with pytest.raises(BackendUnavailableError, match=name):
        ops.class_mmd(real, rl, syn, sl, k, backend=name)
    monkeypatch.setenv("FASTDD_BACKEND", name)
    with pytest.raises(BackendUnavailableError, match=name):
        ops.gaussian_class_mmd(real, rl, syn, sl, k, BANDWIDTHS)
    with pytest.raises(BackendUnavailableError):
        ops.class_means(real, rl, k)


def test_automatic_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(_backend, "native_has_op", lambda op: False)
    monkeypatch.setattr(_backend, "_warned", set())
    real, rl, syn, sl, k = make_case(10, 5, 4, 2)
    seen = shared.spy_resolved_backends(monkeypatch, "class_mmd_fwd")
    with pytest.warns(RuntimeWarning, match="using 'closed_form'"):
        ops.class_mmd(real, rl, syn, sl, k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.class_mmd(real, rl, syn, sl, k)
    assert seen == ["closed_form", "closed_form"]


# ----------------------------------------------------------------------------------------- bad input
def _bad(**changes):
    real, rl, syn, sl, k = make_case(12, 6, 5, 3)
    args = dict(real=real, real_labels=rl, syn=syn, syn_labels=sl, num_classes=k)
    args.update(changes)
    return args


BAD = shared.feature_pair_bad_cases("real", "syn", 12, 6, 5) + [
    (dict(real_labels=torch.full((12,), 3)), ValueError, r"real_labels: labels must lie in \[0, 3\)"),
    (dict(syn_labels=torch.tensor([0, 1, 2, 0, 1, -1])), ValueError, r"syn_labels: labels must lie"),
    (dict(num_classes=0), ValueError, r"num_classes: must be >= 1"),
    (dict(num_classes=2.5), TypeError, r"num_classes: expected an int"),
    (dict(num_classes=5), ValueError, r"class 3 has real samples but no synthetic samples"),
]


@pytest.mark.parametrize("changes,exc,msg", BAD)
@pytest.mark.parametrize("kind", ["linear", "gaussian"])
def test_bad_input(changes, exc, msg, kind):
    args = _bad(**changes)
    if changes.get("num_classes") == 5:  # class 3 (and 4) on the real side only
        args["real_labels"] = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2])
    with pytest.raises(exc, match=msg):
        if kind == "linear":
            MMDMatcher()(*args.values())
        else:
            MMDMatcher("gaussian", bandwidths=BANDWIDTHS)(*args.values())


def test_bad_input_other():
    real, rl, syn, sl, k = make_case(12, 6, 5, 3)
    syn_only = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="class 2 has synthetic samples but no real samples"):
        ops.class_mmd(real, syn_only.clamp_max(1), syn, sl, k)
    nan_syn = syn.clone()
    nan_syn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="syn: contains NaN"):
        ops.class_mmd(real, rl, nan_syn, sl, k, check_finite=True)
    for bad in ([], [0.0], [-1.0], [float("inf")]):
        with pytest.raises(ValueError, match="bandwidths"):
            ops.gaussian_class_mmd(real, rl, syn, sl, k, bad)
    with pytest.raises(ValueError, match="backend"):
        ops.class_mmd(real, rl, syn, sl, k, backend="numpy")
    with pytest.raises(ValueError, match="kernel"):
        MMDMatcher("laplace")
    with pytest.raises(ValueError, match="bandwidths"):
        MMDMatcher("gaussian")
    with pytest.raises(ValueError, match="x: expected a 2-d"):
        ops.class_means(real[0], rl, k)
    # validation off: the one-sided class counts with an empty mean of 0 on every backend
    backends = ["torch"] + (["cpp"] if _backend.native_has_op("class_mmd_fwd") else [])
    lone = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])
    want = ops.class_mmd_reference(real, lone, syn, sl, 4)
    for b in backends:
        torch.testing.assert_close(ops.class_mmd(real, lone, syn, sl, 4, backend=b, validate=False), want)


@needs_cpp
def test_native_kernel_rejects_out_of_range_labels():
    real, rl, syn, sl, k = make_case(12, 6, 5, 3)
    with pytest.raises(RuntimeError, match="real_labels: label 7"):
        torch.ops.fastdd_C.class_mmd_fwd(real, torch.full((12,), 7), syn, sl, k)


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["linear", "gaussian"])
@pytest.mark.parametrize("shape", [(256, 50, 300, 5), (1000, 100, 64, 100), (7, 3, 1, 3)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_backends(backend, dtype, kind, shape):
    shared.require_gpu_backend(backend, "class_mmd_fwd")
    nr, ns, d, k = shape
    case = make_case(nr, ns, d, k, dtype=dtype, device="cuda", scale=0.05 if kind == "gaussian" else 1.0)
    check_against_reference(kind, backend, case, dtype, grad_scale=2.0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_class_means_and_compile(backend):
    shared.require_gpu_backend(backend, "class_mmd_fwd")
    x = torch.randn(300, 129, device="cuda")
    labels = torch.randint(0, 7, (300,), device="cuda")
    got = ops.class_means(x, labels, 8, backend=backend)
    assert_rule(got, ops.class_means_reference(x.double(), labels, 8), ops.class_means_reference(x, labels, 8),
                torch.float32, "class_means")
    real, rl, syn, sl, k = make_case(64, 16, 32, 4, device="cuda")
    s = syn.clone().requires_grad_(True)
    matcher = torch.compile(MMDMatcher(backend=backend), fullgraph=True)
    loss = matcher(real, rl, s, sl, k)
    loss.backward()
    torch.testing.assert_close(loss, ops.class_mmd_reference(real, rl, syn, sl, k))


def test_triton_gaussian_kernels_compile_for_gpu(monkeypatch, tmp_path):
    """The Gaussian pair kernels (and the shared dot_tile) lower to PTX for sm_90, fp32 and bf16 inputs."""
    import triton.language as tl

    def specs():
        k = _backend.triton_kernels("class_mmd")
        ptrs = ["x_ptr", "x_perm_ptr", "x_lab_ptr", "y_ptr", "y_perm_ptr", "y_lab_ptr", "y_off_ptr"]
        out = []
        for dt in ("fp32", "bf16"):
            types = [f"*{dt}", "*i64", "*i32", f"*{dt}", "*i64", "*i32", "*i32"]
            sig = dict(zip(ptrs, types))
            sig.update({"w_ptr": "*fp32", "gam_ptr": "*fp32", "out_ptr": "*fp32", "Nx": "i32", "D": "i32",
                        "stride_x": "i32", "stride_y": "i32", "NB": "constexpr", "ACC": "constexpr",
                        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"})
            consts = {"NB": 2, "ACC": tl.float32, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32}
            grad_sig = {("coef_ptr" if name == "w_ptr" else name): t for name, t in sig.items()}
            out += [(k._pair_sum_kernel, sig, consts), (k._pair_grad_kernel, grad_sig, consts)]
        return out

    shared.compile_for_gpu(specs, monkeypatch, tmp_path)
