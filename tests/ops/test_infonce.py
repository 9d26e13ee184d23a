"""InfoNCE op (fastdd/ops/infonce.py): every backend against a float64 dense reference, gradcheck, opcheck,
torch.compile(fullgraph=True) of InfoNCEMatcher, backend forcing, bad-input errors and linear memory.

CPU backends: cpp (the compiled extension), torch (chunked plain torch) and triton under the interpreter
(run in one child pytest with TRITON_INTERPRET=1, see tests/ops/triton_interpreter.py). GPU cases are
marked ``gpu``.

Tolerance rule: a backend's max error against the float64 reference (from the same, already rounded
inputs) is at most 2x that of the plain-torch reference run in the input dtype, plus a floor of a few
units in the last place of the output dtype.
"""
from __future__ import annotations

import gc
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triton_interpreter import (
    CPU_BACKENDS,
    INTERPRETING_FROM_START,
    compile_for_gpu,
    feature_pair_bad_cases,
    native_kernels,
    require_gpu_backend,
    run_triton_cases_in_child,
    select_cpu_backend,
    spy_resolved_backends,
)

from fastdd.matchers import InfoNCEMatcher
from fastdd.ops import _backend
from fastdd.ops import infonce as ops
from fastdd.ops._backend import BackendUnavailableError

HAS_CPP, needs_cpp = native_kernels("infonce_fwd")

# loss variants: (form, extra keyword arguments)
VARIANTS = [
    pytest.param(("supcon", {}), id="supcon"),
    pytest.param(("nce", {}), id="nce"),
    pytest.param(("nce", {"nce_constant": 0.05}), id="nce-const"),
    pytest.param(("nce", {"nce_negatives": "mean"}), id="nce-mean"),
]


@pytest.fixture
def cpu_backend(request):
    return select_cpu_backend(request.param, HAS_CPP, "infonce")


def make_case(ns, nr, d, k, *, dtype=torch.float32, seed=0, device="cpu", scale=1.0):
    """Random features, every class on both sides, unsorted labels: (syn, syn_labels, real, real_labels)."""
    g = torch.Generator().manual_seed(seed)
    sl = torch.cat([torch.arange(k), torch.randint(0, k, (ns - k,), generator=g)])[torch.randperm(ns, generator=g)]
    rl = torch.cat([torch.arange(k), torch.randint(0, k, (nr - k,), generator=g)])[torch.randperm(nr, generator=g)]
    syn = (torch.randn(ns, d, generator=g) * scale).to(dtype)
    real = (torch.randn(nr, d, generator=g) * scale + 0.2).to(dtype)
    return syn.to(device), sl.to(device), real.to(device), rl.to(device)


def assert_rule(out, ref64, baseline, dtype, what):
    out, baseline, ref64 = (t.detach().double().cpu() for t in (out, baseline, ref64))
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out - ref64).abs().max().item()
    base = (baseline - ref64).abs().max().item()
    floor = 8 * torch.finfo(dtype).eps * (1.0 + ref64.abs().max().item())
    assert err <= 2 * base + floor, f"{what}: error {err:.3e} > 2 x torch-{dtype} error {base:.3e} + {floor:.1e}"


def run(fn, syn, real, grad_scale=1.0):
    s = syn.detach().clone().requires_grad_(True)
    r = real.detach().clone().requires_grad_(True)
    loss = fn(s, r)
    gs, gr = torch.autograd.grad(loss * grad_scale, (s, r))
    return loss.detach(), gs, gr


def check(backend, case, dtype, form, kw, grad_scale=1.0, **extra):
    syn, sl, real, rl = case
    opts = dict(form=form, **kw, **extra)
    ref64 = run(lambda s, r: ops.infonce_loss_reference(s, sl, r, rl, **opts), syn.double(), real.double(),
                grad_scale)
    base = run(lambda s, r: ops.infonce_loss_reference(s, sl, r, rl, **opts), syn, real, grad_scale)
    got = run(lambda s, r: ops.infonce_loss(s, sl, r, rl, backend=backend, **opts), syn, real, grad_scale)
    for name, o, r64, b in zip(("loss", "grad syn", "grad real"), got, ref64, base):
        assert o.dtype == syn.dtype, f"{name}: dtype {o.dtype}"
        assert_rule(o, r64, b, dtype, f"{form}{kw}/{backend}/{dtype} {name}")


# (Ns, Nr, D, K): general, one class, one sample per class, D = 1, D not a block multiple, Ns > Nr
SHAPES = [
    pytest.param((12, 40, 37, 4), id="general"),
    pytest.param((3, 9, 5, 1), id="one-class"),
    pytest.param((5, 5, 6, 5), id="one-per-class"),
    pytest.param((6, 14, 1, 3), id="D=1"),
    pytest.param((7, 21, 130, 3), id="D=130"),
    pytest.param((33, 10, 20, 2), id="Ns>Nr"),
]


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(cpu_backend, variant, shape):
    form, kw = variant
    ns, nr, d, k = shape
    check(cpu_backend, make_case(ns, nr, d, k), torch.float32, form, kw, grad_scale=1.0 if d != 37 else 3.0)


@pytest.mark.parametrize("cpu_backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("form", ["supcon", "nce"])
def test_unnormalized_and_temperature(cpu_backend, form):
    case = make_case(10, 17, 9, 3, scale=0.3)
    check(cpu_backend, case, torch.float32, form, {}, normalize=False, temperature=0.5)


@pytest.mark.parametrize("cpu_backend", ["cpp", "triton"], indirect=True)
@pytest.mark.parametrize("form", ["supcon", "nce"])
def test_multiple_tiles(cpu_backend, form):
    """More anchors and real rows than one tile (cpp: 256 x 1024; triton: 32 x 64) in both directions."""
    ns, nr = (300, 1100) if cpu_backend == "cpp" else (70, 140)
    check(cpu_backend, make_case(ns, nr, 24, 5), torch.float32, form, {})


@pytest.mark.parametrize("cpu_backend", ["cpp", "closed_form", "torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["supcon", "nce"])
def test_low_precision_inputs_cpu(cpu_backend, dtype, form):
    check(cpu_backend, make_case(11, 33, 19, 3, dtype=dtype), dtype, form, {})


@pytest.mark.parametrize("cpu_backend", ["triton"], indirect=True)
@pytest.mark.parametrize("form", ["supcon", "nce"])
def test_triton_interpreter_fp16(cpu_backend, form):
    check(cpu_backend, make_case(9, 20, 21, 3, dtype=torch.float16), torch.float16, form, {})


@needs_cpp
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ns=st.integers(1, 30), nr=st.integers(1, 40), d=st.integers(1, 70), k=st.integers(1, 6),
       form=st.sampled_from(["supcon", "nce"]), seed=st.integers(0, 2**16))
def test_cpp_random_shapes(ns, nr, d, k, form, seed):
    k = min(k, ns, nr)
    check("cpp", make_case(ns, nr, d, k, seed=seed), torch.float32, form, {})


@pytest.mark.skipif(INTERPRETING_FROM_START, reason="already inside the interpreter run")
def test_triton_interpreter_subprocess():
    run_triton_cases_in_child(__file__)


# -------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("cpu_backend", ["cpp", "closed_form", "torch"], indirect=True)
@pytest.mark.parametrize("form", ["supcon", "nce"])
def test_anchors_without_positive_excluded(cpu_backend, form):
    """validate=False: anchors whose class has no real row get no gradient and leave the mean over the
    other anchors unchanged (for both forms)."""
    syn, sl, real, rl = make_case(14, 20, 8, 3)
    sl = sl.clone()
    sl[:4] = 7  # no real row of class 7
    s = syn.clone().requires_grad_(True)
    loss = ops.infonce_loss(s, sl, real, rl, form=form, backend=cpu_backend, validate=False)
    (gs,) = torch.autograd.grad(loss, s)
    assert torch.all(gs[:4] == 0)
    nce_constant = None
    want = ops.infonce_loss_reference(syn[4:], sl[4:], real, rl, form=form, nce_constant=nce_constant)
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match=r"syn_labels: anchor \d+ has class 7, which has no real sample"):
        ops.infonce_loss(syn, sl, real, rl, form=form)
    none = ops.infonce_loss(s, torch.full_like(sl, 9), real, rl, form=form, backend=cpu_backend, validate=False)
    assert none.item() == 0.0


def test_nce_single_class_default_constant_is_zero():
    """All real rows positive: c = N/M = 0, h = 1, so the CRD loss is 0 (limit); an explicit c is not."""
    syn, sl, real, rl = make_case(4, 6, 5, 1)
    for backend in ["torch"] + (["cpp"] if HAS_CPP else []):
        assert ops.infonce_loss(syn, sl, real, rl, form="nce", backend=backend).item() == 0.0
        assert ops.infonce_loss(syn, sl, real, rl, form="nce", nce_constant=0.5, backend=backend).item() > 0


def test_supcon_lower_for_aligned_features():
    """Real rows that are copies of their class's synthetic prototype give a lower loss than random."""
    g = torch.Generator().manual_seed(3)
    protos = torch.randn(4, 16, generator=g)
    rl = torch.arange(40) % 4
    real = protos[rl] + 0.05 * torch.randn(40, 16, generator=g)
    sl = torch.arange(8) % 4
    aligned = ops.infonce_loss(protos[sl], sl, real, rl)
    shuffled = ops.infonce_loss(protos[(sl + 1) % 4], sl, real, rl)
    assert aligned < shuffled


@needs_cpp
def test_cpp_independent_of_thread_count():
    syn, sl, real, rl = make_case(600, 1300, 40, 6)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(run(lambda s, r: ops.infonce_loss(s, sl, r, rl, backend="cpp"), syn, real))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_int32_labels_and_noncontiguous_inputs():
    syn, sl, real, rl = make_case(10, 30, 24, 3)
    real_t = real.t().contiguous().t()
    syn_nc = torch.cat([syn, syn], 1)[:, ::2]
    want = ops.infonce_loss_reference(syn_nc.contiguous(), sl, real, rl)
    for backend in ["torch"] + (["cpp"] if HAS_CPP else []):
        got = ops.infonce_loss(syn_nc, sl.int(), real_t, rl.int(), backend=backend)
        torch.testing.assert_close(got, want)


def _vmhwm_kib():
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmHWM:\s+(\d+)", fh.read()).group(1))


def _vmrss_kib():
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1))


@needs_cpp
def test_cpp_memory_linear_in_rows():
    """Ns = Nr = 20000, D = 64 forward + backward: the dense [Ns, Nr] fp32 matrix would be 1.6 GB per copy;
    the resident-set high-water mark must rise by far less (measured after resetting it; about 60 MiB
    here, i.e. inputs-sized copies and per-thread tiles)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pytest.skip("cannot reset VmHWM (/proc/self/clear_refs)")
    n, d = 20000, 64
    g = torch.Generator().manual_seed(0)
    syn = torch.randn(n, d, generator=g).requires_grad_(True)
    real = torch.randn(n, d, generator=g).requires_grad_(True)
    sl, rl = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (n,), generator=g)
    # warm-up on a small problem: the first call maps ~190 MiB of one-time state (BLAS, thread pools)
    torch.autograd.grad(ops.infonce_loss(syn[:600], sl[:600], real[:1500], rl[:1500], backend="cpp"), (syn,))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _vmrss_kib()
    loss = ops.infonce_loss(syn, sl, real, rl, backend="cpp")
    gs, gr = torch.autograd.grad(loss, (syn, real))
    rise = (_vmhwm_kib() - before) * 1024
    dense = n * n * 4
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gr).all()
    assert gs.abs().sum() > 0 and gr.abs().sum() > 0
    assert rise < dense / 8, f"peak RSS rose by {rise / 2**20:.0f} MiB (dense matrix: {dense / 2**20:.0f} MiB)"


# ---------------------------------------------------------------------------------- gradcheck / opcheck
@pytest.mark.parametrize("cpu_backend", ["cpp", "closed_form", "torch"], indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(cpu_backend, variant, normalize):
    form, kw = variant
    syn, sl, real, rl = make_case(6, 9, 4, 3, dtype=torch.float64)
    s, r = syn.requires_grad_(True), real.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: ops.infonce_loss(a, sl, b, rl, form=form, normalize=normalize, backend=cpu_backend, **kw),
        (s, r))


@pytest.mark.parametrize("cpu_backend", ["cpp", "closed_form"], indirect=True)
@pytest.mark.parametrize("form", ["supcon", "nce"])
def test_opcheck(cpu_backend, form):
    syn, sl, real, rl = make_case(7, 11, 5, 3)
    s, r = syn.clone().requires_grad_(True), real.clone().requires_grad_(True)
    out = torch.ops.fastdd.infonce(syn, sl, real, rl, 0.1, form, True, None, "sum", cpu_backend)
    _, lse, w, logc, ss, rs = out
    g = torch.tensor(1.5)
    cases = [
        (torch.ops.fastdd.infonce.default, (s, sl, r, rl, 0.1, form, True, None, "sum", cpu_backend)),
        (torch.ops.fastdd.infonce.default, (s, sl, r, rl, 0.3, form, False, None, "mean", cpu_backend)),
        (torch.ops.fastdd.infonce_backward.default,
         (g, syn, sl, real, rl, ss, rs, lse, w, logc, 0.1, form, True, True, True, cpu_backend)),
        (torch.ops.fastdd.infonce_backward.default,
         (g, syn, sl, real, rl, ss, rs, lse, w, logc, 0.1, form, True, False, True, cpu_backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("form", ["supcon", "nce"])
def test_compile_fullgraph_matches_eager(form):
    torch._dynamo.reset()
    syn, sl, real, rl = make_case(12, 24, 16, 4)
    eager = InfoNCEMatcher(form=form, symmetric=True)
    compiled = torch.compile(InfoNCEMatcher(form=form, symmetric=True), fullgraph=True)
    l1, g1s, g1r = run(lambda s, r: eager(s, sl, r, rl), syn, real, 2.0)
    l2, g2s, g2r = run(lambda s, r: compiled(s, sl, r, rl), syn, real, 2.0)
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(g2s, g1s)
    torch.testing.assert_close(g2r, g1r)


def test_matcher_symmetric_is_mean_of_directions():
    syn, sl, real, rl = make_case(10, 20, 8, 3)
    fwd = ops.infonce_loss_reference(syn, sl, real, rl, temperature=0.2)
    bwd = ops.infonce_loss_reference(real, rl, syn, sl, temperature=0.2)
    got = InfoNCEMatcher(temperature=0.2, symmetric=True)(syn, sl, real, rl)
    torch.testing.assert_close(got, 0.5 * (fwd + bwd))
    torch.testing.assert_close(InfoNCEMatcher(temperature=0.2)(syn, sl, real, rl), fwd)
    assert "symmetric=True" in repr(InfoNCEMatcher(symmetric=True))


# ------------------------------------------------------------------------------------ backend choice
def test_env_forces_backend(monkeypatch):
    syn, sl, real, rl = make_case(6, 10, 4, 2)
    seen = spy_resolved_backends(monkeypatch, "infonce_fwd")
    monkeypatch.setenv("FASTDD_BACKEND", "torch")
    ops.infonce_loss(syn, sl, real, rl)
    assert seen == ["torch"]
    monkeypatch.delenv("FASTDD_BACKEND")
    if HAS_CPP:
        ops.infonce_loss(syn, sl, real, rl)
        assert seen[-1] == "cpp"
        monkeypatch.setenv("FASTDD_BACKEND", "cpp")
        ops.infonce_loss(syn, sl, real, rl)
        assert seen[-1] == "cpp"


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_unavailable_backend_raises(monkeypatch, name):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    syn, sl, real, rl = make_case(6, 10, 4, 2)
    with pytest.raises(BackendUnavailableError, match=name):
        ops.infonce_loss(syn, sl, real, rl, backend=name)
    monkeypatch.setenv("FASTDD_BACKEND", name)
    with pytest.raises(BackendUnavailableError, match=name):
        InfoNCEMatcher()(syn, sl, real, rl)


# ----------------------------------------------------------------------------------------- bad input
def _args(**changes):
    syn, sl, real, rl = make_case(6, 12, 5, 3)
    args = dict(syn=syn, syn_labels=sl, real=real, real_labels=rl)
    args.update(changes)
    return args


BAD = feature_pair_bad_cases("syn", "real", 6, 12, 5) + [
    (dict(syn=torch.randn(0, 5)), ValueError, r"syn: expected at least one row"),
    (dict(real_labels=torch.tensor([0, 1, 2] * 3 + [0, 1, -1])), ValueError,
     r"real_labels: labels must lie in \[0, inf\)"),
    (dict(syn_labels=torch.tensor([0, 1, 2, 0, 1, 5])), ValueError, r"syn_labels: anchor 5 has class 5"),
]


@pytest.mark.parametrize("changes,exc,msg", BAD)
@pytest.mark.parametrize("form", ["supcon", "nce"])
def test_bad_input(changes, exc, msg, form):
    args = _args(**changes)
    with pytest.raises(exc, match=msg):
        InfoNCEMatcher(form=form)(*args.values())


def test_bad_options_and_values():
    syn, sl, real, rl = make_case(6, 12, 5, 3)
    for t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            ops.infonce_loss(syn, sl, real, rl, temperature=t)
    with pytest.raises(TypeError, match="temperature"):
        ops.infonce_loss(syn, sl, real, rl, temperature="0.1")
    with pytest.raises(ValueError, match="temperature"):
        InfoNCEMatcher(temperature=0)
    with pytest.raises(ValueError, match="form"):
        InfoNCEMatcher(form="triplet")
    with pytest.raises(ValueError, match="nce_constant"):
        ops.infonce_loss(syn, sl, real, rl, form="nce", nce_constant=0.0)
    with pytest.raises(ValueError, match="nce_constant: only used with form='nce'"):
        ops.infonce_loss(syn, sl, real, rl, nce_constant=0.5)
    with pytest.raises(ValueError, match="nce_negatives"):
        ops.infonce_loss(syn, sl, real, rl, form="nce", nce_negatives="max")
    with pytest.raises(ValueError, match="backend"):
        ops.infonce_loss(syn, sl, real, rl, backend="numpy")
    with pytest.raises(ValueError, match=r"syn_labels: labels must lie in \[0, 2\)"):
        ops.infonce_loss(syn, sl, real, rl, num_classes=2)
    nan_real = real.clone()
    nan_real[3, 1] = float("nan")
    with pytest.raises(ValueError, match="real: contains NaN"):
        ops.infonce_loss(syn, sl, nan_real, rl, check_finite=True)


@needs_cpp
def test_native_kernel_checks_shapes():
    syn, sl, real, rl = make_case(6, 12, 5, 3)
    ones = torch.ones(6)
    with pytest.raises(RuntimeError, match="weights: expected"):
        torch.ops.fastdd_C.infonce_fwd(syn, sl, real, rl, ones, torch.ones(12), torch.ones(3, 6), ones, 0.1, 0)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.fastdd_C.infonce_fwd(syn, sl, real, rl, ones, torch.ones(12), torch.ones(2, 6), ones, -1.0, 0)


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["supcon", "nce"])
@pytest.mark.parametrize("shape", [(256, 300, 128, 10), (1000, 700, 64, 100), (7, 3, 1, 3), (130, 520, 300, 5)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_backends(backend, dtype, form, shape):
    require_gpu_backend(backend, "infonce_fwd")
    ns, nr, d, k = shape
    check(backend, make_case(ns, nr, d, k, dtype=dtype, device="cuda"), dtype, form, {}, grad_scale=2.0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compile_and_memory(backend):
    require_gpu_backend(backend, "infonce_fwd")
    syn, sl, real, rl = make_case(64, 96, 32, 4, device="cuda")
    matcher = torch.compile(InfoNCEMatcher(backend=backend, symmetric=True), fullgraph=True)
    l1, *_ = run(lambda s, r: matcher(s, sl, r, rl), syn, real)
    want = InfoNCEMatcher(backend="torch", symmetric=True)(syn, sl, real, rl)
    torch.testing.assert_close(l1, want, rtol=1e-4, atol=1e-5)
    n = 32768
    syn, sl, real, rl = make_case(n, n, 128, 100, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run(lambda s, r: ops.infonce_loss(s, sl, r, rl, backend=backend, validate=False), syn, real)
    assert torch.cuda.max_memory_allocated() - before < n * n * 4 / 10


def test_triton_kernels_compile_for_gpu(monkeypatch, tmp_path):
    """The InfoNCE forward and backward kernels (and the shared dot_tile) lower to PTX for sm_90."""
    import triton.language as tl

    def specs():
        k = _backend.triton_kernels("infonce")
        out = []
        for dt in ("fp32", "bf16"):
            rows = {"s_ptr": f"*{dt}", "sl_ptr": "*i64", "ss_ptr": "*fp32", "r_ptr": f"*{dt}", "rl_ptr": "*i64",
                    "rs_ptr": "*fp32", "w_ptr": "*fp32", "logc_ptr": "*fp32"}
            fwd = {**rows, "row_ptr": "*fp32", "lse_ptr": "*fp32", "Ns": "i32", "Nr": "i32", "D": "i32",
                   "stride_s": "i32", "stride_r": "i32", "inv_tau": "fp32", "FORM": "constexpr",
                   "ACC": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
            bwd = {"a_ptr": f"*{dt}", "al_ptr": "*i64", "as_ptr": "*fp32", "b_ptr": f"*{dt}", "bl_ptr": "*i64",
                   "bs_ptr": "*fp32", "w_ptr": "*fp32", "logc_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*fp32",
                   "Na": "i32", "Nb": "i32", "D": "i32", "Ns": "i32", "stride_a": "i32", "stride_b": "i32",
                   "inv_tau": "fp32", "SYN_ROWS": "constexpr", "FORM": "constexpr", "ACC": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
            blocks = {"ACC": tl.float32, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32}
            for form in (0, 1):
                out.append((k._fwd_kernel, fwd, {"FORM": form, **blocks}))
                out += [(k._bwd_kernel, bwd, {"SYN_ROWS": syn_rows, "FORM": form, **blocks})
                        for syn_rows in (True, False)]
        return out

    compile_for_gpu(specs, monkeypatch, tmp_path)
