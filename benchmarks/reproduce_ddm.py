"""Reproduce DDM (WACV 2025) with the full published protocol (GPU; not run on CPU).

Protocol (spec ``ddm_mim4dd.md`` §1.2, §1.7): DM's loop (ConvNet-3, 20,000 iterations, 256 real images per
class, SGD on pixels lr 1 momentum 0.5, real init, DSA 'color_crop_cutout_flip_scale_rotate') plus
style matching on every block's tap (``--style-weight 1e4``, batchavg estimator, legacy accumulator) and
the intra-class diversity term (``--icd-weight 10``, k by ``--icd-k-rule``); the refactor's "paper" preset
has ``--gram-weight 0`` (use ``--gram-weight 1e4`` for the Gram script's term). Evaluation: ConvNet-3 models
x 1000 epochs (DM protocol, lr 0.01), paired against the initial real subset.

Published numbers (printed next to ours; see the spec for tags): DM baseline (ConvNet-3) CIFAR-10 IPC
1/10/50 = 26.0 / 48.9 / 63.0, CIFAR-100 = 11.4 / 29.7 / 43.6 [secondary]. DDM's absolute accuracies are
UNVERIFIED (the abstract claims up to +4.1 on CIFAR-10 and +4.2 on CIFAR-100 over DM). The repository's
own refactor measured DM + MM + CM at IPC 10: CIFAR-10 51.13 ± 0.66, CIFAR-100 30.57 ± 0.37 (its
settings, not the paper's). Rows are appended to ``benchmarks/results/reproduce_ddm.md``.

    python benchmarks/reproduce_ddm.py [--dataset cifar10] [--ipc 1 10 50] [--device cuda] [--smoke]

``--smoke``: a trivial CPU run on digits (2 iterations, 1 model x 2 epochs) that checks the script works;
nothing is appended to the results file.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import environment  # noqa: E402

from fastdd.data import load_dataset  # noqa: E402
from fastdd.evaluate import EvalConfig, evaluate_synset  # noqa: E402
from fastdd.methods import get  # noqa: E402
from fastdd.synset import save_synset  # noqa: E402

PUBLISHED = {
    "cifar10": {1: "DM 26.0; DDM UNVERIFIED (<= +4.1)", 10: "DM 48.9; refactor DM+MM+CM 51.13±0.66; DDM UNVERIFIED",
                50: "DM 63.0; DDM UNVERIFIED"},
    "cifar100": {1: "DM 11.4; DDM UNVERIFIED (<= +4.2)", 10: "DM 29.7; refactor DM+MM+CM 30.57±0.37; DDM UNVERIFIED",
                 50: "DM 43.6; DDM UNVERIFIED"},
}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--iterations", type=int, default=20000)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-path", default=None)
    p.add_argument("--out", default=default_out)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="trivial CPU run on digits; nothing is appended")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="extra method config fields, e.g. gram_weight=1e4 style_accumulator=reset")
    return p


def _parse_sets(cls, items):
    import dataclasses

    types = {f.name: type(f.default) for f in dataclasses.fields(cls.config_cls)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--set: unknown field {key!r} of {cls.config_cls.__name__}")
        kind = types[key]
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def run(method_name: str, published: dict, results_name: str, title: str, args, extra=None) -> int:
    if args.smoke:
        args.dataset, args.ipc, args.iterations, args.batch_real = "digits", [2], 2, 8
        args.epochs, args.models, args.device = 2, 1, "cpu"
    train = load_dataset(args.dataset, "train", root=args.data_path)
    test = load_dataset(args.dataset, "test", root=args.data_path)
    env = environment(args.device)
    full = args.iterations == 20000 and args.epochs == 1000 and args.batch_real == 256 and args.models >= 5
    cls = get(method_name)
    fields = dict(extra or {})
    fields.update(_parse_sets(cls, args.set))
    if args.smoke:
        fields.setdefault("model", "ConvNetD2")
    rows = []
    for ipc in args.ipc:
        cfg = cls.config_cls(ipc=ipc, iterations=args.iterations, batch_real=args.batch_real, seed=args.seed, **fields)
        start = time.perf_counter()
        method = cls(cfg, train, device=args.device).fit(progress=sys.stderr.isatty(),
                                                          log_every=max(1, args.iterations // 10))
        distill_s = time.perf_counter() - start
        syn = method.synthetic_set()
        save_synset(os.path.join(args.out, f"{args.dataset}_ipc{ipc}"), syn, cfg.to_dict(),
                    {"dataset": train.name, "mean": list(train.mean), "std": list(train.std), "method": method_name})
        ev = EvalConfig(num_models=args.models, epochs=args.epochs, seed=args.seed,
                        **({"model": "ConvNetD2"} if args.smoke else {}))
        result = evaluate_synset(syn["images"], syn["labels"], train, test, ev, device=args.device,
                                 baseline_indices=syn.get("init_indices")).to_dict()
        pub = published.get(args.dataset, {}).get(ipc, "-")
        row = (f"| {env['device']} | {env['date']} | {env['commit']} | {args.dataset} | {ipc} | {args.iterations} | "
               f"{args.epochs} | {args.models} | {result['accuracy_mean']:.1f} ± {result['accuracy_std']:.1f} | "
               f"{result['random_baseline_mean']:.1f} ± {result['random_baseline_std']:.1f} | {pub} | "
               f"{distill_s:.0f} | {result['seconds']:.0f} | {'full' if full else 'REDUCED'} |")
        print(row, flush=True)
        rows.append(row)
    if args.smoke:
        print("smoke run: nothing appended", flush=True)
        return 0
    path = os.path.join(RESULTS_DIR, results_name)
    new = not os.path.exists(path)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(path, "a") as fh:
        if new:
            fh.write(f"# {title}\n\nAccuracies in %, mean ± std over models.\n\n"
                     f"| device | date | commit | dataset | IPC | iterations | eval epochs | models | fastdd {method_name} |"
                     " initial real subset | published | distill s | eval s | protocol |\n"
                     "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        fh.write("\n".join(rows) + "\n")
    return 0


def main(argv=None) -> int:
    args = parser(__doc__.split("\n")[0], "runs/reproduce_ddm").parse_args(argv)
    return run("ddm", PUBLISHED, "reproduce_ddm.md", "DDM: fastdd vs published (reproduce_ddm.py)", args)


if __name__ == "__main__":
    sys.exit(main())
