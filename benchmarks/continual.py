"""Class-incremental learning on Fashion-MNIST: distilled memories vs a random buffer (small CPU budget).

Protocol: :mod:`fastdd.continual` (spec ``lowrank_dwa_theory.md`` 1.6): class orders from seeds
0..``--orders``-1, 5 steps of 2 classes, each step's set distilled from that step's classes only, the
memory the union of the steps so far, fresh ConvNets trained on it with the DM evaluation protocol
(reduced epochs) and tested on the seen classes' test images; the random buffer keeps ``--ipc`` random
real images per class. Methods: ``dm``, ``ddm``, ``mim4dd`` and ``dm --rank 2`` (LoDM: the low-rank
plugin's own CL comparison, 7 rank-2 images per class in the storage of 1 plain image); a method not
registered in this checkout is listed as skipped. Every method uses the same iterations, batch_real,
seed, orders and evaluation.

Outputs: ``benchmarks/results/continual.json`` (every run's full result: per step, per order, per model,
with timings and the environment) and ``continual.md`` (one table per run, appended).

    python benchmarks/continual.py [--quick] [--methods dm ddm] [--orders 2] [--ipc 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import add_budget_options, append_text, environment, report_head, resolve_variant  # noqa: E402

from fastdd import methods  # noqa: E402
from fastdd.checkpoint import atomic_write  # noqa: E402
from fastdd.continual import ContinualConfig, run_continual  # noqa: E402
from fastdd.data import (
    load_dataset,  # noqa: E402
    stratified_subset,  # noqa: E402
)
from fastdd.evaluate import EvalConfig  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = {  # label -> (method, config overrides, fallback)
    "dm": ("dm", {}, None),
    "ddm": ("ddm", {}, None),
    "mim4dd": ("mim4dd", {}, ("dm", {"mim_weight": 1.0})),
    "dm-rank2": ("dm", {"rank": 2}, None),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), help=f"labels among {list(VARIANTS)}")
    p.add_argument("--orders", type=int, default=2)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--model", default="ConvNet", help="distillation and evaluation network")
    p.add_argument("--max-steps", type=int, default=0)
    add_budget_options(p, iterations=40)
    args = p.parse_args(argv)
    if args.quick:
        args.orders, args.iterations, args.epochs, args.test_per_class, args.max_steps = 1, 3, 3, 20, 2
        args.model = "ConvNetW32"

    train = load_dataset("fashion-mnist", "train", root=args.data_path)
    test = stratified_subset(load_dataset("fashion-mnist", "test", root=args.data_path), args.test_per_class)
    env = environment(args.device)
    ev = EvalConfig(model=args.model, num_models=args.models, epochs=args.epochs, faithful_epochs=False)
    cl = ContinualConfig(orders=args.orders, classes_per_step=2, max_steps=args.max_steps, seed=args.seed)
    results, skipped = {}, {}
    for label in args.methods:
        if label not in VARIANTS:
            raise SystemExit(f"--methods: unknown label {label!r}; choose from {list(VARIANTS)}")
        name, ov = resolve_variant(*VARIANTS[label])
        if name is None:
            skipped[label] = f"method {VARIANTS[label][0]!r} not registered in this checkout"
            print(f"{label}: skipped ({skipped[label]})", flush=True)
            continue
        cls = methods.get(name)
        cfg = cls.config_cls(ipc=args.ipc, iterations=args.iterations, batch_real=args.batch_real,
                             seed=args.seed, model=args.model, **ov)
        print(f"== {label} ({name} {ov})", flush=True)
        results[label] = run_continual(name, cfg, train, test, cl, ev, device=args.device,
                                       log=lambda s: print("  " + s, flush=True))
    md = markdown(results, skipped, args, env)
    print(md)
    if not args.no_write:
        os.makedirs(RESULTS, exist_ok=True)
        path = os.path.join(RESULTS, "continual.json")
        runs = []
        if os.path.exists(path):
            with open(path) as fh:
                runs = json.load(fh)
        runs.append({"environment": env, "quick": args.quick, "args": vars(args), "skipped": skipped,
                     "results": results})
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(runs, indent=1)))
        append_text(os.path.join(RESULTS, "continual.md"), md)
    return 0


def markdown(results, skipped, args, env) -> str:
    labels = list(results)
    intro = (f"Class-incremental, 2 classes per step, {args.orders} orders x {args.models} models, IPC {args.ipc} "
             f"(storage budget per class), {args.iterations} iterations x batch_real {args.batch_real} per step, "
             f"{args.model}, DM-protocol evaluation {args.epochs} epochs, {args.test_per_class} test images per "
             f"class. Accuracy % on the seen classes, mean ± std over orders x models.")
    lines = report_head("Continual learning on Fashion-MNIST", "small CPU budget", env, intro, "continual.py",
                        quick=args.quick, triton=False)
    if not labels:
        return "\n".join(lines + ["no method ran"]) + "\n"
    first = results[labels[0]]
    lines.append("| step | classes | " + " | ".join(labels) + " | random buffer |")
    lines.append("|---|---|" + "---|" * (len(labels) + 1))
    for t, row in enumerate(first["summary"]):
        cells = [f"{results[l]['summary'][t]['method_mean']:.1f} ± {results[l]['summary'][t]['method_std']:.1f}"
                 for l in labels]
        lines.append(f"| {t + 1} | {row['classes_seen']} | " + " | ".join(cells) +
                     f" | {row['buffer_mean']:.1f} ± {row['buffer_std']:.1f} |")
    lines.append("")
    lines.append("Images per class in memory: " + ", ".join(f"{l} {results[l]['images_per_class']}" for l in labels)
                 + f", random buffer {args.ipc}. Wall time (distil / eval, s): "
                 + ", ".join(f"{l} {results[l]['timings']['distill_seconds']:.0f} / "
                             f"{results[l]['timings']['eval_seconds']:.0f}" for l in labels) + ".")
    if skipped:
        lines.append("Skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
