"""Benchmark of the per-class MMD op (fastdd/ops/class_mmd.py) against torch eager and torch.compile.

    python benchmarks/mmd.py [--quick] [--device cpu|cuda] [--dtype float32 ...] [--threads N]
                             [--no-gaussian] [--results DIR]

Providers: ``fastdd-<backend>`` for every fastdd backend that can run on the device (cpp and closed_form on
CPU; triton, cuda and closed_form on CUDA), ``torch-eager`` (the plain-torch reference
``class_mmd_reference`` / ``gaussian_class_mmd_reference`` called directly) and ``torch-compile``
(``torch.compile`` of that reference; compile time excluded by the warm-up).
Modes: fwd, bwd, fwd+bwd, as in DM: the real features need no gradient, the synthetic ones do.
Sizes: CIFAR-10 DM, real [2560, 2048] (256 per class) with syn [500, 2048] (IPC 50) or [100, 2048]
(IPC 10), K = 10; ImageNet-1K, real [50000, 512] (50 per class) with syn [10000, 512] (IPC 10), K = 1000.

Byte counts (for GB/s and the fraction of the measured copy bandwidth), itemsize b of the features:
  linear fwd      (Nr + Ns) * D * b  read features + (Nr + Ns) * 8 labels + K * D * 4 write diff
  linear bwd      K * D * 4 read diff + Ns * D * b write grad_syn + Ns * 8 labels
  linear fwd+bwd  the sum of both
  gaussian        the same counts (minimum traffic: every feature read once, the gradient written once).
                  The Gaussian op is compute bound (O(sum_c n_c^2 D) flops), so its GB/s is low by design.
The Gaussian dense reference needs [N, N] matrices: at the ImageNet size (50000^2 floats = 10 GB each)
only the fused fastdd backends run.

With ``--threads 1`` on CPU the notes column also carries the median CPU time of the (only) thread: on
a shared machine that is the trustworthy figure for single-threaded runs (wall-clock medians include
preemption), while multi-threaded wall times there also include waiting for descheduled workers.

Results are appended to benchmarks/results/mmd.csv and benchmarks/results/mmd.md is regenerated.
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402  (also puts the repository root on sys.path)

from fastdd.ops import class_mmd as ops  # noqa: E402

BANDWIDTHS = [0.5, 1.0, 2.0]  # features are scaled to unit expected squared norm

SIZES = {
    "cifar10-ipc50": dict(nr=2560, ns=500, d=2048, k=10),
    "cifar10-ipc10": dict(nr=2560, ns=100, d=2048, k=10),
    "imagenet1k-ipc10": dict(nr=50000, ns=10000, d=512, k=1000),
}


def make_inputs(size: str, device, dtype):
    cfg = SIZES[size]
    g = torch.Generator().manual_seed(0)
    nr, ns, d, k = cfg["nr"], cfg["ns"], cfg["d"], cfg["k"]
    real = (torch.randn(nr, d, generator=g) / d ** 0.5).to(device=device, dtype=dtype)
    syn = (torch.randn(ns, d, generator=g) / d ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    rl = (torch.arange(nr) % k)[torch.randperm(nr, generator=g)].to(device)
    sl = (torch.arange(ns) % k).to(device)
    return real, rl, syn, sl, k


def byte_count(size: str, mode: str, itemsize: int) -> int:
    cfg = SIZES[size]
    nr, ns, d, k = cfg["nr"], cfg["ns"], cfg["d"], cfg["k"]
    fwd = (nr + ns) * d * itemsize + (nr + ns) * 8 + k * d * 4
    bwd = k * d * 4 + ns * d * itemsize + ns * 8
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def providers(op: str, device, size: str):
    """(name, callable(real, rl, syn, sl, k) -> loss) for every provider that fits."""
    out = []
    native_name = "class_mmd_fwd" if op == "class_mmd" else "gaussian_class_mmd_fwd"
    for backend in H.fastdd_backends(native_name, device):
        if backend == "closed_form" and (op == "gaussian_class_mmd" or device.type == "cpu" and size.startswith("imagenet")):
            continue  # same computation as torch-eager (the reference), plus the op's dispatch
        if op == "class_mmd":
            out.append((f"fastdd-{backend}", lambda r, rl, s, sl, k, b=backend: ops.class_mmd(
                r, rl, s, sl, k, backend=b, validate=False)))
        else:
            out.append((f"fastdd-{backend}", lambda r, rl, s, sl, k, b=backend: ops.gaussian_class_mmd(
                r, rl, s, sl, k, BANDWIDTHS, backend=b, validate=False)))
    if op == "gaussian_class_mmd" and size.startswith("imagenet"):
        return out  # the dense reference does not fit
    if op == "class_mmd":
        ref = ops.class_mmd_reference
    else:
        def ref(r, rl, s, sl, k):
            return ops.gaussian_class_mmd_reference(r, rl, s, sl, k, BANDWIDTHS)
    out.append(("torch-eager", ref))
    out.append(("torch-compile", torch.compile(ref, dynamic=False)))
    return out


def run(args) -> list:
    device = torch.device(args.device)
    rows = []
    sizes = ["cifar10-ipc50", "cifar10-ipc10", "imagenet1k-ipc10"]
    plan = [("class_mmd", s, m) for s in sizes for m in H.MODES]
    if not args.no_gaussian:
        gauss_modes = ["fwd+bwd"] if device.type == "cpu" else list(H.MODES)
        plan += [("gaussian_class_mmd", s, m) for s in sizes for m in gauss_modes]
    print(f"device: {H.device_name(device)}; copy bandwidth {H.copy_bandwidth(device):.1f} GB/s", flush=True)
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        cache = {}
        for op, size, mode in plan:
            if size not in cache:
                cache.clear()
                cache[size] = make_inputs(size, device, dtype)
            real, rl, syn, sl, k = cache[size]
            imagenet = size.startswith("imagenet")
            budget = (0.1 if args.quick else 0.4) if imagenet or op != "class_mmd" else (0.2 if args.quick else 1.0)
            for name, fn in providers(op, device, size):
                t0 = time.perf_counter()
                call = lambda fn=fn: fn(real, rl, syn, sl, k)  # noqa: E731
                notes = H.cpu_notes(call, [syn], mode, device,
                                    runs=3 if op != "class_mmd" else (5 if args.quick else 15))
                row = H.measure(
                    op=op, provider=name, mode=mode, size=size, dtype=dtype, device=device, fn=call,
                    inputs=[syn], nbytes=byte_count(size, mode, real.element_size()), quick=args.quick,
                    min_run_time=budget, notes=notes,
                )
                rows.append(row)
                print(f"{op:19s} {size:17s} {mode:8s} {name:14s} {H.timing_text(row)} "
                      f"peak {row['peak_mem_mb']} MiB {notes} [{time.perf_counter() - t0:.1f}s]", flush=True)
    return rows


def main(argv=None) -> None:
    parser = H.op_parser(__doc__.split("\n")[0], "mmd", quick_help="shorter timing budgets")
    parser.add_argument("--no-gaussian", action="store_true", help="only the linear (DM) MMD")
    args = H.parse_op_args(parser, argv)
    H.write_op_results(args, run(args), "mmd", "Per-class MMD (fastdd/ops/class_mmd.py)")


if __name__ == "__main__":
    main()
