"""Benchmark of the eval-BatchNorm + statistics op (fastdd/ops/bn_eval_stats.py) against torch eager and torch.compile.

    python benchmarks/bn_eval_stats.py [--quick] [--device cpu|cuda] [--threads N] [--layouts nchw channels_last]

What SRe2L / DWA recover runs at every BatchNorm layer of the teacher: y = scale * x + shift (the eval
BatchNorm) and the batch mean / biased variance of x, forward and backward (the BN output and the
statistics both receive gradients). Providers:

* ``fastdd-<backend>``: the fused op (``cpp`` on a CPU, ``closed_form`` everywhere);
* ``separate``: what recover ran before the fused op: ATen's eval ``F.batch_norm`` plus fastdd's fused
  statistics op ``fastdd.ops.feature_moments.bn_stats`` (two passes forward; BatchNorm backward,
  statistics backward and autograd's add of the two in the backward);
* ``torch-eager``: :func:`bn_eval_stats_reference` (``x * scale + shift`` and ``var_mean``) with autograd;
* ``torch-compile``: ``torch.compile`` of the same reference (default inductor).

Sizes: the BatchNorm inputs of TVResNet18S on a batch of 100 at 32 x 32 (the CPU recover benchmark):
[100, 64, 32, 32], [100, 128, 16, 16], [100, 256, 8, 8], [100, 512, 4, 4]; on CUDA the ImageNet ResNet-18
ones at 224 x 224 ([100, 64, 112, 112] ... [100, 512, 7, 7]). Each in NCHW and channels_last.

Byte model (minimum traffic of a fused implementation, itemsize b, n = N*C*H*W): fwd reads x and writes y
(2 n b); bwd reads gy and x and writes dx (3 n b); fwd+bwd 5 n b. ``bw_fraction`` divides the effective
bandwidth by the measured copy bandwidth (``benchmarks/_harness.py``).

Results are appended to ``benchmarks/results/bn_eval_stats.csv``; ``bn_eval_stats.md`` is regenerated.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402  (also puts the repository root on sys.path)

from fastdd.ops import bn_eval_stats as ops  # noqa: E402
from fastdd.ops.feature_moments import bn_stats  # noqa: E402

SIZES = {
    "cpu": [(100, 64, 32, 32), (100, 128, 16, 16), (100, 256, 8, 8), (100, 512, 4, 4)],
    "cuda": [(100, 64, 112, 112), (100, 128, 28, 28), (100, 256, 14, 14), (100, 512, 7, 7)],
}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
EPS = 1e-5


def make_inputs(shape, layout, device, dtype):
    """x [N, C, H, W] (requires grad) and an eval BatchNorm's parameters and running statistics."""
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, generator=g).relu_().to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_(True)
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.1
    rm, rv = torch.rand(c, generator=g) * 0.5, torch.rand(c, generator=g) + 0.5
    return x, *(t.to(device) for t in (weight, bias, rm, rv))


def _affine(weight, bias, rm, rv):
    scale = weight * torch.rsqrt(rv + EPS)
    return scale, bias - rm * scale


def providers(device):
    """(name, fn(x, weight, bias, rm, rv) -> (y, mean, var))."""
    out = []
    for backend in H.fastdd_backends("bn_eval_stats", device):
        if backend in ops._IMPLEMENTED:
            out.append((f"fastdd-{backend}",
                        lambda x, w, b, m, v, be=backend: ops.bn_eval_stats(x, *_affine(w, b, m, v), backend=be)))

    def separate(x, w, b, m, v):
        mean, var = bn_stats(x)
        return F.batch_norm(x, m, v, w, b, training=False, eps=EPS), mean, var

    def reference(x, w, b, m, v):
        return ops.bn_eval_stats_reference(x, *_affine(w, b, m, v))

    out += [("separate", separate), ("torch-eager", reference),
            ("torch-compile", torch.compile(reference, dynamic=False))]
    return out


def run(args) -> list:
    device = torch.device(args.device)
    shapes = SIZES[device.type][:2] if args.quick else SIZES[device.type]
    rows = []
    print(f"device: {H.device_name(device)}; copy bandwidth {H.copy_bandwidth(device):.1f} GB/s", flush=True)
    provs = providers(device)
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for shape in shapes:
            for layout in args.layouts:
                x, *params = make_inputs(shape, layout, device, dtype)
                n = x.numel() * x.element_size()
                label = "x".join(map(str, shape)) + f" {layout}"
                for mode in H.MODES:
                    for name, fn in provs:
                        t0 = time.perf_counter()
                        call = lambda fn=fn, x=x, params=params: fn(x, *params)
                        notes = H.cpu_notes(call, [x], mode, device, runs=5 if args.quick else 15)
                        row = H.measure(op="bn_eval_stats", provider=name, mode=mode, size=label, dtype=dtype,
                                        device=device, fn=call, inputs=[x],
                                        nbytes={"fwd": 2 * n, "bwd": 3 * n, "fwd+bwd": 5 * n}[mode],
                                        quick=args.quick, min_run_time=0.2 if args.quick else 0.6, notes=notes)
                        rows.append(row)
                        print(f"{label:26s} {mode:8s} {name:18s} {H.timing_text(row)} ({row['bw_fraction']} of copy) "
                              f"peak {row['peak_mem_mb']} MiB [{time.perf_counter() - t0:.1f}s]", flush=True)
    return rows


def main(argv=None) -> None:
    parser = H.op_parser(__doc__.split("\n")[0], "bn_eval_stats", quick_help="shorter budgets, the two largest maps")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    args = H.parse_op_args(parser, argv)
    H.write_op_results(args, run(args), "bn_eval_stats",
                       "Eval BatchNorm + input statistics (fastdd/ops/bn_eval_stats.py)")


if __name__ == "__main__":
    main()
