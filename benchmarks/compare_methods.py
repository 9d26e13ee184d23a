"""Compare every distillation method at one shared CPU budget on Fashion-MNIST (IPC 1 and 10).

Methods (rows): ``dm``, ``dance`` (after a small ``fastdd pretrain`` of its experts, done here and timed),
``ddm``, ``mim4dd`` (DM + the MIM4DD add-on; if no ``mim4dd`` method is registered but the configs have
``mim_weight``, ``dm --mim-weight 1``), ``dm --rank 2`` (low-rank plugin; its row also gives the floats
it stores vs the plain set at the same IPC), ``dc``, ``dsa`` and ``dsa --rank 2`` (gradient matching; one
iteration is ``outer_loop`` image updates and ``inner_loop`` network epochs from ``get_loops(ipc)``, so at
IPC 10 an iteration costs far more than DM's), and a random real subset of the same size. A method that
is not registered in this checkout is not silently dropped: its row says "skipped" and why.

Shared budget: the **same number of outer iterations and the same ``batch_real``** for every method
(defaults 60 iterations, 32 real images per class), same seed, same evaluation. Equal wall time was
rejected: on this shared 2-core machine the wall time of a run depends on the load of the other jobs, so
an equal-time budget would not be reproducible, while an iteration budget is (and is how the papers
state their budgets). The wall-time columns (distillation, evaluation, DANCE's expert pre-training)
show what each method's iteration costs, so a reader can convert to an equal-time comparison.

Evaluation (DM protocol, ``fastdd.evaluate``, spec ``dm_dance.md`` 1.8, reduced): the default ConvNet-3
trained from scratch, SGD lr 0.01 momentum 0.9 wd 5e-4, batch 256, DSA, lr x0.1 at half the epochs,
``--models`` models (default 2; same initialisations for every row), ``--epochs`` epochs (default 50,
vs 1000 in the reference), test accuracy of the last epoch on ``--test-per-class`` test images per class
(default 100, i.e. 1000 of the 10,000), mean ± std over the models. DANCE is evaluated with the DM protocol too
(its own IDC protocol is different; one protocol for every row keeps the comparison fair).

Outputs: ``benchmarks/results/compare_methods.csv`` (rows appended) and ``.md`` (one section per run),
with device, date, torch/triton versions and git commit. Expected run time with the defaults: about
20-25 minutes on an idle 2-core CPU (estimated from per-image costs; the evaluation of the rank-2 IPC 10
set, 70 images per class, is the largest single item). ``--quick`` takes a few minutes and only checks
that the script works.

    python benchmarks/compare_methods.py [--quick] [--ipc 1 10] [--iterations 60] [--epochs 50] [--only dm "dm rank 2"]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (  # noqa: E402
    add_budget_options,
    append_rows,
    append_text,
    environment,
    report_head,
    resolve_variant,
)

from fastdd import methods  # noqa: E402
from fastdd.data import ClassSampler, load_dataset, stratified_subset  # noqa: E402
from fastdd.evaluate import EvalConfig, evaluate_synset  # noqa: E402
from fastdd.synset import stored_floats, synset_images  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
COLUMNS = ("method", "variant", "ipc", "images_per_class", "iterations", "batch_real", "accuracy_mean",
           "accuracy_std", "models", "eval_epochs", "test_images", "stored_floats", "plain_floats",
           "distill_s", "eval_s", "pretrain_s", "status", "device", "date", "torch", "triton", "commit")

# (label, method name, config overrides, fallback (method, overrides) when the method is not registered)
ROWS = [
    ("dm", "dm", {}, None),
    ("dance", "dance", {"experts": "<experts>", "num_premodel": "<pretrain_models>"}, None),
    ("dance factor 2", "dance", {"experts": "<experts>", "num_premodel": "<pretrain_models>", "factor": 2}, None),
    ("ddm", "ddm", {}, None),
    ("mim4dd", "mim4dd", {}, ("dm", {"mim_weight": 1.0})),
    ("dm rank 2", "dm", {"rank": 2}, None),
    ("dc", "dc", {}, None),
    ("dsa", "dsa", {}, None),
    ("dsa rank 2", "dsa", {"rank": 2}, None),
]


def resolve(name, overrides, fallback):
    """(method class, overrides, note) for a row, or (None, None, reason) when it cannot run here."""
    cand, ov = resolve_variant(name, overrides, fallback)
    if cand is None:
        return None, None, f"skipped: method {name!r} is not registered in this checkout (registered: {methods.names()})"
    note = "" if cand == name else f"as {cand} " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in ov.items())
    return methods.get(cand), ov, note


def pretrain_experts(args, out_dir) -> float:
    """Run a small `fastdd pretrain` for DANCE; returns its wall time in seconds."""
    from fastdd import cli

    if "pretrain" not in cli.COMMANDS:
        raise RuntimeError("`fastdd pretrain` is not available in this checkout")
    argv = ["pretrain", "--dataset", "fashion-mnist", "--out", out_dir, "--models", str(args.pretrain_models),
            "--epochs", str(args.pretrain_epochs), "--train-subset", str(args.pretrain_subset),
            "--seed", str(args.seed), "--device", args.device, "--no-progress"]
    if args.data_path:
        argv += ["--data-path", args.data_path]
    start = time.perf_counter()
    rc = cli.main(argv)
    if rc != 0:
        raise RuntimeError(f"fastdd pretrain failed with exit code {rc}")
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    add_budget_options(p, iterations=60)
    p.add_argument("--pretrain-models", type=int, default=2, help="DANCE experts pre-trained here")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--pretrain-subset", type=int, default=6000, help="class-balanced training images per expert")
    p.add_argument("--only", nargs="+", default=None, help="run only these row labels")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.epochs, args.models, args.test_per_class = 3, 3, 2, 20
        args.pretrain_models, args.pretrain_epochs, args.pretrain_subset = 1, 1, 500

    train = load_dataset("fashion-mnist", "train", root=args.data_path)
    test = stratified_subset(load_dataset("fashion-mnist", "test", root=args.data_path), args.test_per_class)
    env = environment(args.device)
    ev = EvalConfig(num_models=args.models, epochs=args.epochs, seed=args.seed, faithful_epochs=False)
    plain = lambda ipc: train.num_classes * ipc * train.channels * train.image_size[0] * train.image_size[1]
    rows = []
    tmp = tempfile.TemporaryDirectory(prefix="fastdd-compare-")
    experts, pretrain_s = None, 0.0
    base = dict(method="", variant="", images_per_class="", iterations=args.iterations, batch_real=args.batch_real,
                models=args.models, eval_epochs=args.epochs, test_images=len(test), pretrain_s="", **env)
    for ipc in args.ipc:
        # random real subset of the same size: the baseline row
        g = torch.Generator().manual_seed(args.seed)
        idx = ClassSampler(train.images, train.labels, train.num_classes).sample_indices(ipc, g).reshape(-1)
        res = evaluate_synset(train.images[idx], train.labels[idx], train, test, ev, device=args.device,
                              with_baseline=False).to_dict()
        rows.append(dict(base, method="random", variant="random real subset", ipc=ipc, images_per_class=ipc,
                         iterations=0, batch_real=0, accuracy_mean=res["accuracy_mean"],
                         accuracy_std=res["accuracy_std"], stored_floats=plain(ipc), plain_floats=plain(ipc),
                         distill_s=0.0, eval_s=res["seconds"], status="ok"))
        print(f"IPC {ipc} random: {res['accuracy_mean']:.2f} ± {res['accuracy_std']:.2f}", flush=True)
        for label, name, overrides, fallback in ROWS:
            if args.only and label not in args.only:
                continue
            row = dict(base, method=label, ipc=ipc, plain_floats=plain(ipc), accuracy_mean="", accuracy_std="",
                       stored_floats="", distill_s="", eval_s="")
            cls, ov, note = resolve(name, overrides, fallback)
            if cls is None:
                rows.append(dict(row, status=note))
                print(f"IPC {ipc} {label}: {note}", flush=True)
                continue
            ov = dict(ov)
            try:
                if ov.get("experts") == "<experts>":
                    if experts is None:
                        experts = os.path.join(tmp.name, "experts")
                        pretrain_s = pretrain_experts(args, experts)
                    ov["experts"] = experts
                    row["pretrain_s"] = pretrain_s
                if ov.get("num_premodel") == "<pretrain_models>":
                    ov["num_premodel"] = args.pretrain_models
                cfg = cls.config_cls(ipc=ipc, iterations=args.iterations, batch_real=args.batch_real,
                                     seed=args.seed, **ov)
                start = time.perf_counter()
                method = cls(cfg, train, device=args.device).fit(progress=False)
                distill_s = time.perf_counter() - start
                syn = method.synthetic_set()
                # the training images of the saved set: decoded ones for DANCE (IPC*f^2 per class, normalised
                # space), the factors' reconstruction for a low-rank set, else the images themselves
                images = synset_images(syn).float()
                res = evaluate_synset(images, syn["labels"], train, test, ev, device=args.device,
                                      with_baseline=False).to_dict()
            except Exception as exc:  # a broken method must not hide the others' rows
                rows.append(dict(row, status=f"failed: {type(exc).__name__}: {exc}"))
                print(f"IPC {ipc} {label}: FAILED {exc!r}", flush=True)
                continue
            stored = stored_floats(syn)
            rows.append(dict(row, variant=note or " ".join(f"{k}={v}" for k, v in ov.items() if k != "experts"),
                             images_per_class=int(syn["labels"].numel()) // train.num_classes,
                             accuracy_mean=res["accuracy_mean"],
                             accuracy_std=res["accuracy_std"], stored_floats=stored, distill_s=distill_s,
                             eval_s=res["seconds"], status="ok"))
            print(f"IPC {ipc} {label}: {res['accuracy_mean']:.2f} ± {res['accuracy_std']:.2f}  "
                  f"(distil {distill_s:.0f} s, eval {res['seconds']:.0f} s, {stored} floats)", flush=True)
    tmp.cleanup()
    md = markdown(rows, args, env)
    print(md)
    if not args.no_write:
        append_rows(os.path.join(RESULTS, "compare_methods.csv"),
                    [{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows], COLUMNS)
        append_text(os.path.join(RESULTS, "compare_methods.md"), md)
    return 0


def _fmt(v, spec=".1f"):
    return format(v, spec) if isinstance(v, (int, float)) and v != "" else ("-" if v == "" else str(v))


def markdown(rows, args, env) -> str:
    intro = (f"Budget: {args.iterations} iterations, batch_real {args.batch_real}, seed {args.seed} for every method. "
             f"Evaluation: DM protocol, ConvNet, {args.models} models x {args.epochs} epochs, "
             f"{rows[0]['test_images'] if rows else '-'} test images; accuracy % mean ± std over the models.")
    lines = report_head("Fashion-MNIST method comparison", "shared budget", env, intro, "compare_methods.py",
                        quick=args.quick)
    lines += ["| IPC | method | images/class | accuracy % | stored floats (plain set) | distil s | eval s | "
              "pretrain s | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = (f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}" if r["status"] == "ok" else "-")
        stored = f"{r['stored_floats']} ({r['plain_floats']})" if r["stored_floats"] != "" else "-"
        note = r["variant"] if r["status"] == "ok" else r["status"]
        lines.append(f"| {r['ipc']} | {r['method']} | {_fmt(r['images_per_class'], 'd')} | {acc} | {stored} | "
                     f"{_fmt(r['distill_s'], '.0f')} | {_fmt(r['eval_s'], '.0f')} | {_fmt(r['pretrain_s'], '.0f')} | "
                     f"{note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
