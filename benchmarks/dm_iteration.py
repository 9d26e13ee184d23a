"""One DM iteration: the reference loop's structure (provider A) vs what ``fastdd distill --method dm`` runs (B).

Both providers run a complete iteration (draw ``batch_real`` real images per class, a fresh ConvNet-3,
DSA with one transform per class shared by both sides, the real (no-grad) and synthetic embeddings, the
sum over classes of squared mean-embedding distances, backward, one SGD step on the synthetic pixels):

* ``reference-loop`` (A): :mod:`_reference_loop`, a re-implementation of the reference's structure:
  per class one forward per side, in-place ReLU, the reference's DSA cost (reseed per op, one
  affine_grid / grid_sample per geometric op), a new network module every iteration;
* ``fastdd`` (B): ``fastdd.methods.dm.DM.step`` with the config ``fastdd distill`` uses (``compile="auto"``
  at the default 20k iterations, automatic real chunk, channels_last on CPUs), inside
  :func:`fastdd.allocator.reuse_freed_memory` as ``Method.fit`` runs it;
* ``fastdd-eager`` (B with ``compile="off"``), to separate the compile gain from the rest.

Inputs are random tensors of the dataset's shape (10 classes x 300 pool images; 1x28x28 is built as
Fashion-MNIST, 3x32x32 as CIFAR-10). Each provider lives in its own spawned process, so that each has
the allocator state its own program would have (fastdd's kept heap would otherwise speed up the
reference's allocations too: on the 2-core AMD EPYC, 2026-12-05, the reference's 3x32x32 IPC-1 iteration
took 2.8 s in a process shared with fastdd and 4.9 s in its own). They are timed interleaved (one run of each in turn after warm-up, which
includes compilation; the time of a run includes a pipe round trip of well under a millisecond): median, p20-p80 spread, the ratio A/B of medians, and
peak memory. Results are appended to ``benchmarks/results/dm_iteration.csv`` and the Markdown table is
regenerated with the machine description (CPU model, cores, SIMD, torch).

    python benchmarks/dm_iteration.py [--quick] [--device cpu|cuda] [--shape 1x28x28 3x32x32] [--ipc 1 10 50]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import append_rows, check_device, default_device, environment, read_rows  # noqa: E402
from _machine import machine_lines  # noqa: E402
from _providers import ProcessProvider, in_fit, interleaved  # noqa: E402
from _reference_loop import make_ref_dm_iteration  # noqa: E402

from fastdd.data import ImageDataset  # noqa: E402
from fastdd.methods.dm import DM, DMConfig  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = ("bench", "shape", "ipc", "batch_real", "provider", "median_ms", "p20_ms", "p80_ms", "runs",
           "ratio_a_over_b", "peak_mem_mb", "mem_kind", "device", "date", "torch", "triton", "commit", "notes")
SHAPES = {"1x28x28": (1, 28, 28, "fashion-mnist"), "3x32x32": (3, 32, 32, "cifar10")}
REPORT = ("One DM iteration: reference-loop structure (A) vs fastdd (B)",  # title and intro of the Markdown table
          "Full iteration (real draw, fresh ConvNet-3, DSA, both embeddings, loss, backward, SGD step), providers "
          "interleaved in time, each in its own process (its own allocator state). Produced by `python benchmarks/dm_iteration.py` (`make bench`). A/B > 1: "
          "fastdd is faster.")


def random_dataset(shape: str, classes: int, per_class: int, device, seed: int = 0) -> ImageDataset:
    """Random normalised images of ``shape`` (``"CxHxW"``), ``per_class`` per class, class-major."""
    c, h, w, name = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(classes * per_class, c, h, w, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return ImageDataset(name=name, split="train", images=images.to(device), labels=labels.to(device),
                        num_classes=classes, mean=(0.0,) * c, std=(1.0,) * c)


PROVIDERS = ("reference-loop", "fastdd", "fastdd-eager")


def make_provider(name: str, ds: ImageDataset, ipc: int, batch_real: int, device, compile_mode: str):
    """Zero-argument callable running one iteration of provider ``name`` (module docstring)."""
    if name == "reference-loop":
        g = torch.Generator(device=device).manual_seed(1)
        return make_ref_dm_iteration(ds.images, ds.labels, ds.num_classes, ipc, batch_real, g)
    mode = compile_mode if name == "fastdd" else "off"
    method = DM(DMConfig(ipc=ipc, batch_real=batch_real, compile=mode), ds, device=device)
    return in_fit(method.step)


def build_provider(name: str, shape: str, ipc: int, batch_real: int, device: str, compile_mode: str):
    """Provider ``name`` on random data of ``shape`` (the :class:`ProcessProvider` factory)."""
    ds = random_dataset(shape, 10, max(300, batch_real), device)
    return make_provider(name, ds, ipc, batch_real, device, compile_mode)


def providers(shape: str, ipc: int, batch_real: int, device, compile_mode: str) -> dict:
    """name -> :class:`ProcessProvider` for every provider."""
    return {name: ProcessProvider(build_provider, (name, shape, ipc, batch_real, str(device), compile_mode), device)
            for name in PROVIDERS}


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarise(bench: str, key: dict, times: dict, mems: dict, env: dict, baseline: str = "reference-loop",
              notes="", runs_per_time: int = 1) -> list:
    """Result rows (one per provider) with median / spread / ratio of the baseline's median to each.
    ``notes``: one string, or {provider: string}; ``runs_per_time``: runs a time stands for (``runs``)."""
    base = statistics.median(times[baseline])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        mem, kind = mems.get(name, (float("nan"), ""))
        rows.append({"bench": bench, **key, "provider": name, "median_ms": round(med, 1),
                     "p20_ms": round(quantile(ts, 0.2), 1), "p80_ms": round(quantile(ts, 0.8), 1),
                     "runs": len(ts) * runs_per_time, "ratio_a_over_b": round(base / med, 2),
                     "peak_mem_mb": round(mem / 2**20, 1) if mem == mem else "", "mem_kind": kind,
                     **env, "notes": notes[name] if isinstance(notes, dict) else notes})
    return rows


def write_csv(path: str, rows: list) -> None:
    if os.path.exists(path) and os.path.getsize(path) > 0:  # an older file with other columns: start afresh
        with open(path) as fh:
            if fh.readline().strip().split(",") != list(COLUMNS):
                os.replace(path, path + ".old")
    append_rows(path, rows, COLUMNS)


def write_markdown(csv_path: str, md_path: str, title: str, intro: str, key_cols: tuple, device) -> None:
    """Regenerate the table from the CSV's latest run per (device, key, provider), with the machine."""
    rows = read_rows(csv_path)
    latest = {}
    for r in rows:
        latest[(r["device"],) + tuple(r[k] for k in key_cols) + (r["provider"],)] = r
    lines = [f"# {title}", "", intro, "", "Machine of the latest run:", ""] + machine_lines(device) + [""]
    head = " | ".join(key_cols)
    lines += [f"| device | {head} | provider | median ms | p20-p80 ms | runs | A/B (ref / this) | peak MiB "
              "| date | commit | notes |",
              "|---|" + "---|" * len(key_cols) + "---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in latest.values():
        keys = " | ".join(r[k] for k in key_cols)
        lines.append(f"| {r['device']} | {keys} | {r['provider']} | {r['median_ms']} | {r['p20_ms']}-{r['p80_ms']} "
                     f"| {r['runs']} | {r['ratio_a_over_b']}x | {r['peak_mem_mb']} | {r['date']} | {r['commit']} "
                     f"| {r.get('notes') or ''} |")
    with open(md_path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def save_results(out: str, name: str, rows: list, title: str, intro: str, device) -> None:
    """Append ``rows`` to ``<out>/<name>.csv`` and regenerate ``<name>.md`` (keys shape, ipc, batch_real)."""
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, f"{name}.csv")
    write_csv(csv_path, rows)
    write_markdown(csv_path, os.path.join(out, f"{name}.md"), title, intro, ("shape", "ipc", "batch_real"), device)
    print(f"appended to {csv_path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=default_device())
    p.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--ipc", type=int, nargs="+", default=None, help="default 1 10 50 (quick: 10)")
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7 cpu / 30 cuda; quick 3)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="provider fastdd's setting")
    p.add_argument("--quick", action="store_true", help="IPC 10 only, 3 rounds")
    p.add_argument("--out", default=RESULTS, help="results folder")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    check_device(device)
    ipcs = args.ipc or ([10] if args.quick else [1, 10, 50])
    repeats = args.repeats or (3 if args.quick else (30 if device.type == "cuda" else 7))
    env = environment(device)
    rows = []
    for shape in args.shape:
        for ipc in ipcs:
            calls = providers(shape, ipc, args.batch_real, device, args.compile)
            times = interleaved(calls, device, repeats)
            mems = {k: fn.peak_memory() for k, fn in calls.items()}
            for fn in calls.values():
                fn.close()
            new = summarise("dm_iteration", {"shape": shape, "ipc": str(ipc), "batch_real": str(args.batch_real)},
                            times, mems, env, notes="quick" if args.quick else "")
            for r in new:
                print(f"{shape} IPC {ipc:3d} {r['provider']:15s} median {r['median_ms']:9.1f} ms "
                      f"(p20-p80 {r['p20_ms']}-{r['p80_ms']})  A/B {r['ratio_a_over_b']:.2f}x  "
                      f"peak {r['peak_mem_mb']} MiB", flush=True)
            rows += new
    if not args.no_save:
        save_results(args.out, "dm_iteration", rows, *REPORT, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
