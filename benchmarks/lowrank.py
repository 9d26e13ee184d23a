"""Benchmark of the low-rank reconstruction op (fastdd/ops/lowrank.py) against torch eager and torch.compile.

    python benchmarks/lowrank.py [--quick] [--device cpu|cuda] [--dtype float32 ...] [--threads N]
                                 [--sizes cifar-500 ...] [--ranks 2 4 8] [--results DIR]

Providers: ``fastdd-<backend>`` for every fastdd backend that can run on the device (cpp and closed_form on
CPU; triton, cuda and closed_form on CUDA), ``torch-eager`` (plain ``A @ B`` and its autograd backward, two
batched GEMMs) and ``torch-compile`` (``torch.compile`` of ``A @ B``; compile time excluded by the
warm-up). Modes: fwd, bwd, fwd+bwd, with both factors requiring gradients (the training step of spec
1.2). Sizes: CIFAR (N = 500 or 5000 images x 3 x 32 x 32; CIFAR-10 at IPC 50 with r = 2 is 10 x 400 =
4000 images) and ImageNet (N = 100 x 3 x 224 x 224); ranks r = 2, 4, 8.

Byte count (minimum traffic; for GB/s and the fraction of the measured copy bandwidth), itemsize b,
P = N * C planes, F = P * r * (H + W) factor elements, X = P * H * W image elements:
  fwd      (F + X) * b        read A and B once, write X
  bwd      (X + 2 F) * b      read dX once (the fused kernel's point), read A and B, write dA and dB
  fwd+bwd  the sum of both
torch eager's backward is two GEMMs, each reading dX, so its actual traffic is ~2 X b in bwd.

With ``--threads 1`` on CPU the notes column also carries the median CPU time of the (only) thread: on
a shared machine that is the trustworthy figure (wall-clock medians include preemption).

Results are appended to benchmarks/results/lowrank.csv and benchmarks/results/lowrank.md is regenerated.
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402  (also puts the repository root on sys.path)

from fastdd.ops import lowrank as ops  # noqa: E402

SIZES = {
    "cifar-500": dict(n=500, c=3, h=32, w=32),
    "cifar-5000": dict(n=5000, c=3, h=32, w=32),
    "imagenet-100": dict(n=100, c=3, h=224, w=224),
}
QUICK_SIZES = ["cifar-500", "imagenet-100"]


def make_inputs(size: str, rank: int, device, dtype):
    cfg = SIZES[size]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(cfg["n"], cfg["c"], cfg["h"], rank, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(cfg["n"], cfg["c"], rank, cfg["w"], generator=g).to(device=device, dtype=dtype)
    return a.requires_grad_(True), b.requires_grad_(True)


def byte_count(size: str, rank: int, mode: str, itemsize: int) -> int:
    cfg = SIZES[size]
    planes = cfg["n"] * cfg["c"]
    factors = planes * rank * (cfg["h"] + cfg["w"])
    image = planes * cfg["h"] * cfg["w"]
    fwd = (factors + image) * itemsize
    bwd = (image + 2 * factors) * itemsize
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _matmul(a, b):
    return a @ b


def providers(device):
    out = []
    for backend in H.fastdd_backends("lowrank_fwd", device):
        out.append((f"fastdd-{backend}", lambda a, b, be=backend: ops.lowrank_reconstruct(a, b, backend=be)))
    out.append(("torch-eager", _matmul))
    out.append(("torch-compile", torch.compile(_matmul, dynamic=False)))
    return out


def run(args) -> list:
    device = torch.device(args.device)
    sizes = args.sizes or (QUICK_SIZES if args.quick else list(SIZES))
    rows = []
    print(f"device: {H.device_name(device)}; copy bandwidth {H.copy_bandwidth(device):.1f} GB/s", flush=True)
    provs = providers(device)
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for size in sizes:
            for rank in args.ranks:
                a, b = make_inputs(size, rank, device, dtype)
                label = f"{size}-r{rank}"
                for mode in H.MODES:
                    for name, fn in provs:
                        t0 = time.perf_counter()
                        call = lambda fn=fn, a=a, b=b: fn(a, b)
                        notes = H.cpu_notes(call, [a, b], mode, device, runs=5 if args.quick else 15)
                        row = H.measure(
                            op="lowrank_reconstruct", provider=name, mode=mode, size=label, dtype=dtype,
                            device=device, fn=call, inputs=[a, b],
                            nbytes=byte_count(size, rank, mode, a.element_size()), quick=args.quick,
                            min_run_time=0.2 if args.quick else 1.0, notes=notes,
                        )
                        rows.append(row)
                        print(f"{label:18s} {mode:8s} {name:14s} {H.timing_text(row)} ({row['bw_fraction']} of copy) "
                              f"peak {row['peak_mem_mb']} MiB [{time.perf_counter() - t0:.1f}s]", flush=True)
                del a, b
    return rows


def main(argv=None) -> None:
    parser = H.op_parser(__doc__.split("\n")[0], "lowrank",
                         quick_help="shorter timing budgets, CIFAR-500 and ImageNet only")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None)
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8])
    args = H.parse_op_args(parser, argv)
    H.write_op_results(args, run(args), "lowrank", "Low-rank reconstruction (fastdd/ops/lowrank.py)")


if __name__ == "__main__":
    main()
