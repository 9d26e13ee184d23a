"""One DC / DSA outer iteration: fastdd's vmapped per-class gradients vs the per-class loop.

Both providers run ``fastdd.methods.dc`` end to end (fresh ConvNet-3, ``outer_loop`` image updates,
each drawing ``batch_real`` real images per class, DSA when on, gradient matching with the "ours"
distance, an SGD step on the synthetic set, then ``inner_loop`` epochs of network training) and differ
only in how the per-class gradients are formed:

* ``batched``    ``torch.func.vmap(grad(...))`` over classes, one call per side (the default);
* ``per-class``  the reference formulation: one forward / backward per class and side
                 (``batched_grads=False``).

Inputs are random tensors at Fashion-MNIST (1x28x28) and CIFAR-10 (3x32x32) shape, 10 classes. Rows are
appended to ``benchmarks/results/dc_iteration.csv`` / ``.md`` with device, date, versions and commit.

    python benchmarks/dc_iteration.py [--quick] [--device cpu|cuda] [--methods dc dsa] [--ipc 1 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import append_rows, default_device, environment, read_rows, sync  # noqa: E402

from fastdd.data import ImageDataset  # noqa: E402
from fastdd.methods import get  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
COLUMNS = ("provider", "method", "shape", "ipc", "outer_loop", "inner_loop", "batch_real", "median_ms", "min_ms",
           "runs", "speedup_vs_per_class", "device", "date", "torch", "triton", "commit")


def random_dataset(name: str, per_class: int, device) -> ImageDataset:
    """``per_class`` N(0, 1) images per class of ``name``'s shape, 10 classes."""
    c, h, w = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(10 * per_class, c, h, w, generator=g)
    labels = torch.arange(10).repeat_interleave(per_class)
    return ImageDataset(name, "train", images, labels, 10, [str(i) for i in range(10)], (0.0,) * c,
                        (1.0,) * c).to(device)


def time_step(method, device, repeats: int):
    """Median and min wall time (ms) of ``method.step()`` after one warm-up step."""
    method.step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        method.step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def write_markdown(csv_path: str, md_path: str) -> None:
    rows = read_rows(csv_path)
    lines = ["# One DC / DSA outer iteration: vmapped per-class gradients vs the per-class loop", "",
             "Produced by `python benchmarks/dc_iteration.py`. Whole `step()` of `fastdd.methods.dc`.", "",
             "| device | date | commit | method | shape | IPC | loops (outer, inner) | per-class (ms) | batched (ms) "
             "| speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["provider"] != "batched":
            continue
        ref = next((r for r in rows if r["provider"] == "per-class" and all(
            r[k] == row[k] for k in ("method", "shape", "ipc", "date", "device", "outer_loop"))), None)
        lines.append(f"| {row['device']} | {row['date']} | {row['commit']} | {row['method']} | {row['shape']} | "
                     f"{row['ipc']} | ({row['outer_loop']}, {row['inner_loop']}) | "
                     f"{ref['median_ms'] if ref else 'n/a'} | {row['median_ms']} | {row['speedup_vs_per_class']}× |")
    with open(md_path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=default_device())
    p.add_argument("--methods", nargs="+", default=["dc", "dsa"])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--outer-loop", type=int, default=0, help="0: the reference's get_loops(ipc)")
    p.add_argument("--inner-loop", type=int, default=-1, help="-1: the reference's get_loops(ipc)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="batch-real 32, loops (2, 1), IPC 1, 1 run: a smoke run")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_real, args.outer_loop, args.inner_loop, args.ipc = 32, 2, 1, [1]
    device = torch.device(args.device)
    repeats = args.repeats or (1 if args.quick else 3)
    env = environment(device)
    rows = []
    for shape in args.shapes:
        ds = random_dataset(shape, max(args.batch_real, max(args.ipc)), device)
        for name in args.methods:
            cls = get(name)
            for ipc in args.ipc:
                timings = {}
                for provider, batched in (("per-class", False), ("batched", True)):
                    cfg = cls.config_cls(ipc=ipc, batch_real=args.batch_real, seed=0, outer_loop=args.outer_loop,
                                         inner_loop=args.inner_loop, batched_grads=batched)
                    method = cls(cfg, ds, device)
                    timings[provider] = time_step(method, device, repeats)
                    loops = (method.outer_loop, method.inner_loop)
                for provider, (med, best) in timings.items():
                    speedup = timings["per-class"][0] / med
                    rows.append({"provider": provider, "method": name, "shape": "x".join(map(str, SHAPES[shape])),
                                 "ipc": ipc, "outer_loop": loops[0], "inner_loop": loops[1],
                                 "batch_real": args.batch_real, "median_ms": f"{med:.1f}", "min_ms": f"{best:.1f}",
                                 "runs": repeats, "speedup_vs_per_class": f"{speedup:.2f}", **env})
                    print(f"{name:4s} {shape:14s} IPC {ipc:3d} loops {loops} {provider:10s} median {med:9.1f} ms "
                          f"speed-up {speedup:.2f}x")
    print(f"device: {env['device']}  torch {env['torch']}  commit {env['commit']}")
    if not args.no_save:
        csv_path = os.path.join(RESULTS, "dc_iteration.csv")
        append_rows(csv_path, rows, COLUMNS)
        write_markdown(csv_path, os.path.join(RESULTS, "dc_iteration.md"))
        print(f"appended to {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
