"""One DM iteration at CIFAR-10 shape: batched classes vs the reference's per-class loop.

Both providers run the complete iteration — draw 256 real images per class, re-initialise a fresh
ConvNet-3, draw one DSA transform per class, embed real (no grad) and synthetic images, the sum over
classes of squared mean-embedding distances, backward to the synthetic pixels, one SGD step — and differ
only in how the loss is formed:

* ``batched``    all classes in one forward per side (on a CPU the no-grad real side in class-agnostic
                 chunks of 512 rows), per-class means by a segmented reduction
                 (``fastdd.methods.dm``: what ``fastdd distill --method dm`` runs);
* ``per-class``  the reference formulation: a Python loop over classes, one forward per class and side.

Inputs are random tensors of CIFAR-10 shape (10 classes × 256 real, IPC 10 and 50, 3×32×32).
Results are appended to ``benchmarks/results/dm_iteration.csv`` and summarised in
``benchmarks/results/dm_iteration.md`` with device, date, versions and commit.

    python benchmarks/dm_iteration.py [--device cpu|cuda] [--ipc 10 50] [--repeats N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import environment, read_rows, sync  # noqa: E402

from fastdd.augment import DSA  # noqa: E402
from fastdd.data import ClassSampler  # noqa: E402
from fastdd.methods.dm import default_real_chunk, dm_loss_batched, dm_loss_per_class  # noqa: E402
from fastdd.models import get_model, init_parameters  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = ("provider", "ipc", "classes", "batch_real", "median_ms", "min_ms", "runs", "speedup_vs_per_class",
           "device", "date", "torch", "triton", "commit")


def make_iteration(formulation: str, ipc: int, classes: int, batch_real: int, device: torch.device, seed: int = 0):
    """A zero-argument callable running one full DM iteration with the chosen loss formulation."""
    g = torch.Generator(device=device).manual_seed(seed)
    real_pool = torch.randn(classes * 300, 3, 32, 32, generator=g, device=device)
    pool_labels = torch.arange(classes, device=device).repeat_interleave(300)
    sampler = ClassSampler(real_pool, pool_labels, classes)
    syn = torch.randn(classes * ipc, 3, 32, 32, generator=g, device=device, requires_grad=True)
    syn_labels = torch.arange(classes, device=device).repeat_interleave(ipc)
    net = get_model("ConvNet", 3, classes, (32, 32), generator=g).to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    dsa = DSA()
    opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
    chunk = default_real_chunk(device)

    def iteration():
        real, real_labels = sampler.sample(batch_real, g)
        init_parameters(net, g)
        draw = dsa.draw(classes, g, (32, 32))
        if formulation == "batched":  # what DM runs, with its default real-side chunking
            loss = dm_loss_batched(net, dsa, draw, real, real_labels, syn, syn_labels, classes, real_chunk=chunk)
        else:
            loss = dm_loss_per_class(net, dsa, draw, real, real_labels, syn, syn_labels, classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return iteration


def time_iteration(fn, device, repeats: int):
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def write_markdown(csv_path: str, md_path: str) -> None:
    rows = read_rows(csv_path)
    lines = ["# One DM iteration at CIFAR-10 shape: batched vs per-class loop", "",
             "Full iteration (sampling, fresh ConvNet-3 init, DSA, forward, backward, SGD step). "
             "Produced by `python benchmarks/dm_iteration.py`.", "",
             "| device | date | commit | IPC | per-class loop (ms) | batched (ms) | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["provider"] != "batched":
            continue
        ref = next((r for r in rows if r["provider"] == "per-class" and r["ipc"] == row["ipc"]
                    and r["date"] == row["date"] and r["device"] == row["device"]), None)
        ref_ms = ref["median_ms"] if ref else "n/a"
        lines.append(f"| {row['device']} | {row['date']} | {row['commit']} | {row['ipc']} | {ref_ms} | "
                     f"{row['median_ms']} | {row['speedup_vs_per_class']}× |")
    with open(md_path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per provider (default 5 cpu / 50 cuda)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    repeats = args.repeats or (50 if device.type == "cuda" else 5)
    env = environment(device)
    rows = []
    for ipc in args.ipc:
        timings = {}
        for formulation in ("per-class", "batched"):
            fn = make_iteration(formulation, ipc, args.classes, args.batch_real, device)
            timings[formulation] = time_iteration(fn, device, repeats)
        for formulation, (med, best) in timings.items():
            speedup = timings["per-class"][0] / med
            rows.append({"provider": formulation, "ipc": ipc, "classes": args.classes, "batch_real": args.batch_real,
                         "median_ms": f"{med:.1f}", "min_ms": f"{best:.1f}", "runs": repeats,
                         "speedup_vs_per_class": f"{speedup:.2f}", "device": env["device"], "date": env["date"],
                         "torch": env["torch"], "triton": env["triton"], "commit": env["commit"]})
            print(f"IPC {ipc:3d} {formulation:10s} median {med:9.1f} ms  (min {best:.1f})  "
                  f"speed-up vs per-class {speedup:.2f}x")
    if not args.no_save:
        os.makedirs(RESULTS, exist_ok=True)
        csv_path = os.path.join(RESULTS, "dm_iteration.csv")
        import csv

        new = not os.path.exists(csv_path)
        with open(csv_path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        write_markdown(csv_path, os.path.join(RESULTS, "dm_iteration.md"))
        print(f"appended to {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
