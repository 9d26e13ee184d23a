"""Shared pieces of the ``reproduce_<method>.py`` scripts: the common command-line options, one timed
distillation, the row of a results table, and appending rows to ``benchmarks/results/<name>.md``.

Each script keeps what is its own (protocol, published numbers, extra columns); everything they had in
common lives here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


#: DM's published ConvNet-3 accuracies on CIFAR (DM paper; [secondary] in the specs): the baseline that the
#: DDM and MIM4DD scripts print beside their own context (:func:`beside_dm`).
DM_CIFAR = {"cifar10": {1: "26.0", 10: "48.9", 50: "63.0"}, "cifar100": {1: "11.4", 10: "29.7", 50: "43.6"}}


def beside_dm(notes: dict) -> dict:
    """The ``published`` column of a method over DM on CIFAR: {dataset: {ipc: "DM <acc>; <note>"}} from
    ``notes`` {dataset: {ipc: note}} and :data:`DM_CIFAR`."""
    return {ds: {ipc: f"DM {acc}; {notes[ds][ipc]}" for ipc, acc in accs.items()} for ds, accs in DM_CIFAR.items()}


def common_parser(doc: str, *, out: str | None, ipc=(1, 10, 50), iterations: int = 20000, batch_real: int = 256,
                  epochs: int = 1000, models: int = 5) -> argparse.ArgumentParser:
    """A parser described by the first line of the script's ``doc`` with the options every reproduction
    script takes, that script's protocol as the defaults (``ipc=None``: the script picks its IPCs itself
    and gets no ``--ipc``; ``out=None``: no ``--out``)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    if ipc is not None:
        p.add_argument("--ipc", type=int, nargs="+", default=list(ipc))
    p.add_argument("--iterations", type=int, default=iterations)
    p.add_argument("--batch-real", type=int, default=batch_real)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--models", type=int, default=models, help="evaluation models per set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-path", default=None)
    if out is not None:
        p.add_argument("--out", default=out)
    p.add_argument("--device", default=default_device())
    return p


def parse_config_sets(cls, items) -> dict:
    """``["field=value", ...]`` -> {field: value} typed by ``cls.config_cls``'s defaults."""
    types = {f.name: type(f.default) for f in dataclasses.fields(cls.config_cls)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--set: unknown field {key!r} of {cls.config_cls.__name__}")
        kind = types[key]
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def fit_timed(cls, cfg, train, device, iterations: int):
    """Build ``cls(cfg, train)`` on ``device`` and run it; returns (method, seconds)."""
    start = time.perf_counter()
    method = cls(cfg, train, device=device).fit(progress=sys.stderr.isatty(), log_every=max(1, iterations // 10))
    return method, time.perf_counter() - start


def table_row(env: dict, *cells) -> str:
    """One Markdown table row: device, date, commit, then ``cells``."""
    return "| " + " | ".join([str(env["device"]), str(env["date"]), str(env["commit"]), *map(str, cells)]) + " |"


def append_rows(name: str, header: str, columns, rows) -> str:
    """Append ``rows`` to ``benchmarks/results/<name>``, writing ``header`` and the column line first when
    the file is new. ``columns``: the names after device, date, commit. Returns the path."""
    path = os.path.join(RESULTS_DIR, name)
    new = not os.path.exists(path)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    cols = ["device", "date", "commit", *columns]
    with open(path, "a") as fh:
        if new:
            fh.write(header.rstrip() + "\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        fh.write("\n".join(rows) + "\n")
    return path


def method_main(method_name: str, dataset: str, published: dict, title: str, doc: str, argv=None) -> int:
    """``main`` of a script that runs one registered method with DM's protocol (:func:`run_method`):
    ``--dataset`` (default ``dataset``), sets saved under ``runs/reproduce_<method>``, rows appended to
    ``benchmarks/results/reproduce_<method>.md``."""
    args = method_parser(doc, f"runs/reproduce_{method_name}", dataset).parse_args(argv)
    return run_method(method_name, published, f"reproduce_{method_name}.md", title, args)


def method_parser(doc: str, out: str, dataset: str) -> argparse.ArgumentParser:
    """Parser of a script that runs one registered method with DM's protocol on ``--dataset``."""
    p = common_parser(doc, out=out)
    p.add_argument("--dataset", default=dataset)
    p.add_argument("--smoke", action="store_true", help="trivial CPU run on digits; nothing is appended")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="extra method config fields, e.g. gram_weight=1e4 style_accumulator=reset")
    return p


def run_method(method_name: str, published: dict, results_name: str, title: str, args, extra=None) -> int:
    """Distil ``args.dataset`` with ``method_name`` at every ``args.ipc``, evaluate each set with DM's protocol
    against its initial real subset (paired), print a row per IPC and append them to ``results_name``.
    ``published``: {dataset: {ipc: text}} shown beside ours."""
    from _harness import environment

    from fastdd.data import load_dataset
    from fastdd.evaluate import EvalConfig, evaluate_synset
    from fastdd.methods import get
    from fastdd.synset import save_synset

    if args.smoke:
        args.dataset, args.ipc, args.iterations, args.batch_real = "digits", [2], 2, 8
        args.epochs, args.models, args.device = 2, 1, "cpu"
    train = load_dataset(args.dataset, "train", root=args.data_path)
    test = load_dataset(args.dataset, "test", root=args.data_path)
    env = environment(args.device)
    full = args.iterations == 20000 and args.epochs == 1000 and args.batch_real == 256 and args.models >= 5
    cls = get(method_name)
    fields = dict(extra or {})
    fields.update(parse_config_sets(cls, args.set))
    if args.smoke:
        fields.setdefault("model", "ConvNetD2")
    rows = []
    for ipc in args.ipc:
        cfg = cls.config_cls(ipc=ipc, iterations=args.iterations, batch_real=args.batch_real, seed=args.seed, **fields)
        method, distill_s = fit_timed(cls, cfg, train, args.device, args.iterations)
        syn = method.synthetic_set()
        save_synset(os.path.join(args.out, f"{args.dataset}_ipc{ipc}"), syn, cfg.to_dict(),
                    {"dataset": train.name, "mean": list(train.mean), "std": list(train.std), "method": method_name})
        ev = EvalConfig(num_models=args.models, epochs=args.epochs, seed=args.seed,
                        **({"model": "ConvNetD2"} if args.smoke else {}))
        result = evaluate_synset(syn["images"], syn["labels"], train, test, ev, device=args.device,
                                 baseline_indices=syn.get("init_indices")).to_dict()
        rows.append(table_row(
            env, args.dataset, ipc, args.iterations, args.epochs, args.models,
            f"{result['accuracy_mean']:.1f} ± {result['accuracy_std']:.1f}",
            f"{result['random_baseline_mean']:.1f} ± {result['random_baseline_std']:.1f}",
            published.get(args.dataset, {}).get(ipc, "-"), f"{distill_s:.0f}", f"{result['seconds']:.0f}",
            "full" if full else "REDUCED"))
        print(rows[-1], flush=True)
    if args.smoke:
        print("smoke run: nothing appended", flush=True)
        return 0
    append_rows(results_name, f"# {title}\n\nAccuracies in %, mean ± std over models.",
                ["dataset", "IPC", "iterations", "eval epochs", "models", f"fastdd {method_name}",
                 "initial real subset", "published", "distill s", "eval s", "protocol"], rows)
    return 0


def recover_parser(doc: str, method_name: str) -> argparse.ArgumentParser:
    """Parser of the SRe2L-family scripts (:func:`recover_main`)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--dataset", default="cifar100",
                   help="cifar100 | tiny-imagenet | imagefolder (ImageNet-1K: --data-path DIR with train/ and val/)")
    p.add_argument("--data-path", default=None)
    p.add_argument("--test-split", default=None, help="image folders: the evaluation sub-folder (default val)")
    p.add_argument("--image-size", type=int, default=None, help="image folders: resize to this side (ImageNet: 224)")
    p.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    p.add_argument("--teacher", default=None, help="squeeze DIR or resnet18:PATH (required unless --smoke)")
    p.add_argument("--iterations", type=int, default=None, help="steps per unit (default: the dataset preset's)")
    p.add_argument("--student", default="TVResNet18S", help="KD student (ImageNet: TVResNet18)")
    p.add_argument("--epochs", type=int, default=None, help="KD epochs (default: the KD preset's)")
    p.add_argument("--models", type=int, default=3, help="students per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=f"runs/reproduce_{method_name}")
    p.add_argument("--device", default=default_device())
    p.add_argument("--smoke", action="store_true", help="trivial CPU run on digits with a 1-epoch teacher; "
                                                        "nothing is appended")
    return p


def recover_main(method_name: str, published: dict, title: str, doc: str, argv=None) -> int:
    """``main`` of ``reproduce_sre2l.py`` / ``reproduce_dwa.py``: recover a set per ``--ipc`` against the
    teacher (the dataset preset's hyper-parameters), evaluate it with the KD protocol (the dataset's KD
    preset, the teacher online) against its paired real subset (DWA: its initial real images; SRe2L: a
    random class-balanced subset), print a row per IPC and append them to
    ``benchmarks/results/reproduce_<method>.md`` beside ``published`` ({dataset: {ipc: text}})."""
    import tempfile

    from _harness import environment

    from fastdd.data import load_dataset
    from fastdd.evaluate import evaluate_synset, protocol_config
    from fastdd.methods import get
    from fastdd.squeeze import SqueezeConfig, squeeze
    from fastdd.synset import save_synset

    args = recover_parser(doc, method_name).parse_args(argv)
    student, epochs = args.student, args.epochs
    if args.smoke:
        args.dataset, args.ipc, args.iterations, args.models, args.device = "digits", [2], 2, 1, "cpu"
        student, epochs = "ConvNetD2", 1
    size = (args.image_size, args.image_size) if args.image_size else None
    test_split = args.test_split or ("val" if args.dataset == "imagefolder" else "test")
    lazy = "auto" if args.dataset in ("imagefolder", "tiny-imagenet") else False
    train = load_dataset(args.dataset, "train", root=args.data_path, image_size=size, lazy=lazy)
    test = load_dataset(args.dataset, test_split, root=args.data_path, image_size=size, lazy=lazy)
    teacher = args.teacher
    if args.smoke:
        teacher = tempfile.mkdtemp(prefix="fastdd-smoke-teacher-")
        squeeze(train, SqueezeConfig(model="ConvNetBN", epochs=1, batch_size=64), teacher, progress=False)
    if not teacher:
        raise SystemExit("--teacher: required (a `fastdd squeeze` directory or resnet18:PATH); nothing is downloaded")
    cls = get(method_name)
    env = environment(args.device)
    rows = []
    for ipc in args.ipc:
        cfg = cls.config_cls(teacher=teacher, ipc=ipc, iterations=args.iterations, seed=args.seed)
        method, distill_s = fit_timed(cls, cfg, train, args.device, 100)
        syn = method.synthetic_set()
        save_synset(os.path.join(args.out, f"{args.dataset}_ipc{ipc}"), syn, method.config.to_dict(),
                    {"dataset": train.name, "mean": list(train.mean), "std": list(train.std), "method": method_name})
        ev = protocol_config("kd", teacher=teacher, num_models=args.models, model=student, epochs=epochs,
                             seed=args.seed)
        result = evaluate_synset(syn["images"], syn["labels"], train, test, ev, device=args.device,
                                 baseline_indices=syn.get("init_indices")).to_dict()
        rows.append(table_row(
            env, args.dataset, ipc, method.config.iterations, ev.resolved(train.name, train.image_size).epochs, args.models,
            student, f"{result['accuracy_mean']:.1f} ± {result['accuracy_std']:.1f}",
            f"{result['random_baseline_mean']:.1f} ± {result['random_baseline_std']:.1f}",
            published.get(args.dataset, {}).get(ipc, "-"), f"{distill_s:.0f}", f"{result['seconds']:.0f}"))
        print(rows[-1], flush=True)
    if args.smoke:
        print("smoke run: nothing appended", flush=True)
        return 0
    append_rows(f"reproduce_{method_name}.md", f"# {title}\n\nTop-1 % under the KD protocol, mean ± std over "
                "students; the paired real subset is trained the same way.",
                ["dataset", "IPC", "steps/unit", "KD epochs", "students", "student", f"fastdd {method_name}",
                 "paired real subset", "published (R18)", "distill s", "eval s"], rows)
    return 0
