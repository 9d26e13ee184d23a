"""Eval BatchNorm fused with its input statistics (fastdd/ops/bn_eval_stats.py): every CPU backend against a
float64 reference on random and odd shapes in both layouts, float64 gradcheck, opcheck of both custom ops,
torch.compile(fullgraph=True) with inductor, eval_affine against nn.BatchNorm2d, bad inputs naming the
argument. Determinism across threads / SIMD paths is in test_determinism.py."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_compiled_matches_eager
from torch import nn
from triton_interpreter import compile_for_gpu, run_triton_cases_in_child, select_cpu_backend

from fastdd.ops import _backend
from fastdd.ops import bn_eval_stats as bes
from fastdd.ops._backend import BackendUnavailableError
from fastdd.ops._common import channels_last_only

HAS_CPP = _backend.native_has_op("bn_eval_stats")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="fastdd._C not built with the bn_eval_stats kernels")
BACKENDS = ["cpp", "closed_form", "torch", "triton"]  # triton: in the TRITON_INTERPRET=1 child pytest


@pytest.fixture
def backend(request):
    """Parametrised backend name; skips cpp without the extension and triton outside the interpreter."""
    return select_cpu_backend(request.param, HAS_CPP, "bn_eval_stats")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# general, odd H x W, C = 1, H = W = 1, one sample, more rows than one channels_last block (128)
SHAPES = [(5, 6, 7, 3), (3, 4, 9, 11), (4, 1, 5, 5), (7, 5, 1, 1), (1, 3, 2, 3), (3, 5, 13, 9)]


def inputs(shape, dtype=torch.float32, seed=0, layout="nchw"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    scale = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype)
    shift = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=LAYOUTS[layout]), scale, shift


def forward_backward(x, scale, shift, seed=1, **kw):
    """(y, mean, var, dx, dscale, dshift) of a random linear function of all three outputs."""
    g = torch.Generator().manual_seed(seed)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, scale, shift)]
    fn = kw.pop("fn", bes.bn_eval_stats)
    y, mean, var = fn(*leaves, **kw)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    wm, wv = (torch.randn(mean.shape, generator=g, dtype=torch.float64).to(mean.dtype) for _ in range(2))
    loss = (y * wy).sum() + (mean * wm).sum() + (var * wv).sum()
    return (y, mean, var, *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(backend, layout, shape):
    """|out - ref64| <= 2 |torch-fp32 - ref64| + a few ulps, outputs and the three gradients; y and dx keep
    x's layout."""
    x, scale, shift = inputs(shape, layout=layout)
    ref = forward_backward(x.double(), scale.double(), shift.double(), fn=bes.bn_eval_stats_reference)
    base = forward_backward(x, scale, shift, fn=bes.bn_eval_stats_reference)
    got = forward_backward(x, scale, shift, backend=backend)
    names = ("y", "mean", "var", "dx", "dscale", "dshift")
    for name, o, r, b in zip(names, got, ref, base):
        assert o.shape == r.shape, name
        err = (o.double() - r).abs().max().item()
        floor = 8 * torch.finfo(torch.float32).eps * max(1.0, r.abs().max().item())
        assert err <= 2 * (b.double() - r).abs().max().item() + floor, f"{backend} {name}: error {err:.3e}"
    if channels_last_only(x):
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[3].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,dtype", [(b, d) for b in BACKENDS for d in (torch.float16, torch.bfloat16)
                                           if not (b == "triton" and d == torch.bfloat16)], indirect=["backend"])
def test_low_precision_inputs(backend, dtype):
    """Half inputs (the C++ kernel takes float32 / float64; cpp runs them through closed_form; the Triton
    interpreter runs fp32 / fp16 only): y in the input dtype, statistics in float32, close to float64."""
    x, scale, shift = inputs((4, 3, 5, 6), dtype=dtype)
    y, mean, var = bes.bn_eval_stats(x, scale, shift, backend=backend)
    y64, m64, v64 = bes.bn_eval_stats_reference(x.double(), scale.double(), shift.double())
    assert y.dtype == dtype and mean.dtype == var.dtype == torch.float32
    tol = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol * 8)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), v64, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_size_one_dimension_with_an_odd_stride(backend):
    """x [2, 3, 5, 1] transposed from [2, 3, 1, 5] is NCHW-contiguous with a stride of 5 on its size-1 last
    dimension: the kernels address it by its layout, not by that stride."""
    x = (torch.randn(2, 3, 1, 5, generator=torch.Generator().manual_seed(8)) + 3).transpose(2, 3)
    assert x.is_contiguous() and x.stride(3) == 5
    scale, shift = torch.randn(3, dtype=torch.float64).float(), torch.randn(3, dtype=torch.float64).float()
    got = forward_backward(x, scale, shift, backend=backend)
    ref = forward_backward(x.double(), scale.double(), shift.double(), fn=bes.bn_eval_stats_reference)
    for o, r in zip(got, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_half_gradient_keeps_its_precision(backend, layout):
    """A large mean against the spread: c0 and c1 x cancel in dx, so the coefficients stay float32 for half
    inputs (rounded to fp16 they lost about 30x the precision of the reference)."""
    g = torch.Generator().manual_seed(9)
    x = (20 + 0.5 * torch.randn(8, 16, 6, 6, generator=g)).half().contiguous(memory_format=LAYOUTS[layout])
    scale, shift = torch.ones(16), torch.zeros(16)

    def grad(x, fn, **kw):
        xr = x.clone().requires_grad_(True)
        _, mean, var = fn(xr, scale.to(x.dtype), shift.to(x.dtype), **kw)
        (g,) = torch.autograd.grad((mean - 19.0).norm() + (var - 0.1).norm(), xr)
        return g.double()

    ref = grad(x.double(), bes.bn_eval_stats_reference)
    err = (grad(x, bes.bn_eval_stats, backend=backend) - ref).norm() / ref.norm()
    assert err < 2e-3, float(err)


@needs_cpp
def test_large_mean_keeps_the_variance():
    """The channels_last pass shifts by the first row: a mean 1e4 times the spread still gives the variance
    to float32 precision (the NCHW pass is two-pass per row)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 8, 6, 6, generator=g) * 0.01 + 100.0
    for layout in LAYOUTS.values():
        _, mean, var = bes.bn_eval_stats(x.contiguous(memory_format=layout), torch.ones(8), torch.zeros(8),
                                         backend="cpp")
        v64, m64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(mean.double(), m64, rtol=1e-7, atol=0)
        torch.testing.assert_close(var.double(), v64, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "closed_form", "torch"], indirect=True)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gradcheck_float64(backend, layout):
    """(triton takes float64 through closed_form; its fp32 gradients are checked against float64 above)"""
    x, scale, shift = inputs((3, 4, 5, 3), dtype=torch.float64, layout=layout)
    leaves = [t.clone().requires_grad_(True) for t in (x, scale, shift)]
    assert torch.autograd.gradcheck(lambda a, s, t: bes.bn_eval_stats(a, s, t, backend=backend), leaves)


def test_unused_outputs_give_zero_gradients():
    """Only the statistics used (the BN output dropped) or only y used: the missing upstream gradients are
    zero, not an error."""
    x, scale, shift = inputs((3, 4, 5, 3), dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    _, mean, var = bes.bn_eval_stats(xr, scale, shift, backend="closed_form")
    (g,) = torch.autograd.grad(var.sum(), xr)
    (gr,) = torch.autograd.grad(torch.var_mean(xr, dim=(0, 2, 3), correction=0)[0].sum(), xr)
    torch.testing.assert_close(g, gr)
    y, _, _ = bes.bn_eval_stats(xr, scale, shift, backend="closed_form")
    (g,) = torch.autograd.grad(y.sum(), xr)
    torch.testing.assert_close(g, scale.view(1, -1, 1, 1).expand_as(x))


def test_eval_affine_matches_batchnorm():
    g = torch.Generator().manual_seed(4)
    for affine in (True, False):
        bn = nn.BatchNorm2d(5, affine=affine).eval()
        bn.running_mean.normal_(0, 1, generator=g)
        bn.running_var.uniform_(0.5, 2, generator=g)
        if affine:
            bn.weight.data.normal_(0, 1, generator=g)
            bn.bias.data.normal_(0, 1, generator=g)
        x = torch.randn(3, 5, 4, 4, generator=g)
        y, _, _ = bes.bn_eval_stats(x, *bes.eval_affine(bn), backend="closed_form")
        torch.testing.assert_close(y, bn(x))


@needs_cpp
def test_opcheck():
    for layout in LAYOUTS:
        x, scale, shift = inputs((3, 4, 5, 3), layout=layout)
        args = (x.requires_grad_(True), scale.requires_grad_(True), shift.requires_grad_(True))
        for backend in ("cpp", "closed_form"):
            torch.library.opcheck(torch.ops.fastdd.bn_eval_stats.default, (*args, backend))
            c0, c1 = torch.randn(4), torch.randn(4)
            torch.library.opcheck(torch.ops.fastdd.bn_eval_stats_backward.default,
                                  (torch.randn_like(x), x.detach(), scale.detach(), c0, c1, backend))


@needs_cpp
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_compile_fullgraph_inductor_matches_eager(layout):
    """Under inductor (fullgraph) between a convolution and a ReLU, as in a teacher: equal to eager."""
    g = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=False).to(memory_format=LAYOUTS[layout])
    x = torch.randn(4, 3, 7, 7, generator=g).contiguous(memory_format=LAYOUTS[layout])
    scale, shift = torch.randn(6, generator=g), torch.randn(6, generator=g)

    def f(a):
        y, mean, var = bes.bn_eval_stats(conv(a), scale, shift, backend="cpp")
        return torch.relu(y).sum() + mean.norm() + var.norm()

    assert_compiled_matches_eager(f, x)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_opcheck_triton(backend):
    """Schema and autograd registration (the interpreter cannot run on fake tensors)."""
    for layout in LAYOUTS:
        x, scale, shift = inputs((3, 4, 5, 3), layout=layout)
        torch.library.opcheck(torch.ops.fastdd.bn_eval_stats.default,
                              (x.requires_grad_(True), scale, shift, "triton"),
                              test_utils=("test_schema", "test_autograd_registration"))


def test_triton_interpreter_subprocess():
    run_triton_cases_in_child(__file__)


def test_triton_kernels_compile_for_gpu(monkeypatch, tmp_path):
    """Ahead-of-time compile of both Triton kernels to PTX for sm_90 (no GPU needed), fp32 and bf16."""
    def specs():
        k = _backend.triton_kernels("bn_eval_stats")
        c = "constexpr"
        geometry = {"M": "i32", "C": "i32", "P": "i32", "sN": "i32", "sC": "i32", "sP": "i32"}
        consts = {"BLOCK_M": k.BLOCK_M, "BLOCK_C": k.BLOCK_C}
        out = []
        for dt in ("fp32", "bf16"):
            out += [
                (k._forward_kernel, {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "scale_ptr": "*fp32", "shift_ptr": "*fp32",
                                     "part_ptr": "*fp32", **geometry, "BLOCK_M": c, "BLOCK_C": c}, consts),
                (k._backward_kernel, {"gy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "scale_ptr": "*fp32",
                                      "c0_ptr": "*fp32", "c1_ptr": "*fp32", **geometry, "BLOCK_M": c, "BLOCK_C": c},
                 consts),
            ]
        return out

    compile_for_gpu(specs, monkeypatch, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gpu_backend", ["triton", "closed_form"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gpu_matches_float64_and_opcheck(gpu_backend, layout):
    x, scale, shift = (t.cuda() for t in inputs((6, 40, 9, 7), layout=layout))
    ref = forward_backward(x.double(), scale.double(), shift.double(), fn=bes.bn_eval_stats_reference)
    got = forward_backward(x, scale, shift, backend=gpu_backend)
    for name, o, r in zip(("y", "mean", "var", "dx", "dscale", "dshift"), got, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()),
                                   msg=lambda m, name=name: f"{gpu_backend} {name}: {m}")
    torch.library.opcheck(torch.ops.fastdd.bn_eval_stats.default,
                          (x.requires_grad_(True), scale, shift, gpu_backend))


def test_bad_inputs_name_the_argument():
    x, scale, shift = inputs((3, 4, 5, 3))
    with pytest.raises(ValueError, match=r"^x: "):
        bes.bn_eval_stats(x[0], scale, shift)
    with pytest.raises(ValueError, match=r"^x: "):
        bes.bn_eval_stats(x[:0], scale, shift)
    with pytest.raises(TypeError, match=r"^x: "):
        bes.bn_eval_stats(x.long(), scale, shift)
    with pytest.raises(ValueError, match=r"^scale: "):
        bes.bn_eval_stats(x, scale[:3], shift)
    with pytest.raises(ValueError, match=r"^shift: "):
        bes.bn_eval_stats(x, scale, shift.view(2, 2))
    with pytest.raises(BackendUnavailableError, match="backend"):
        bes.bn_eval_stats(x, scale, shift, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        bes.bn_eval_stats(x, scale, shift, backend="fast")
