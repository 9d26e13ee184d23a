"""The ``fastdd`` command line: ``distill``, ``evaluate``, ``show``, ``pretrain`` (DANCE experts), ``continual``.

Method options are generated from the chosen method's config dataclass, so a registered method gets
its flags without touching this file (``batch_real`` -> ``--batch-real``; booleans get ``--x/--no-x``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_options(parser: argparse.ArgumentParser, config_cls, skip=()) -> None:
    group = parser.add_argument_group(f"{config_cls.__name__} options")
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        default = f.default
        kind = type(default)
        if kind is bool:
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default: {default})")
        else:
            group.add_argument(_flag(f.name), dest=f.name, type=kind, default=None, help=f"(default: {default!r})")


def _config_from_args(config_cls, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
              if getattr(args, f.name, None) is not None}
    return config_cls(**values)


def _parse_method_command(argv: List[str], make_parser):
    """(args, method class, method config) for a command whose flags depend on ``--method``: the method is
    read first, then ``make_parser(method)`` (which adds that method's config flags) parses everything."""
    from . import methods

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="dm")
    known, _ = pre.parse_known_args(argv)
    args = make_parser(known.method).parse_args(argv)
    cls = methods.get(args.method)
    return args, cls, _config_from_args(cls.config_cls, args)


# --------------------------------------------------------------------------------------------- distill
def _distill_parser(method_name: str) -> argparse.ArgumentParser:
    from . import methods

    cls = methods.get(method_name)
    p = argparse.ArgumentParser(prog="fastdd distill", description=f"Distil a dataset with {method_name}.")
    p.add_argument("--method", default="dm", help=f"one of {methods.names()}")
    p.add_argument("--dataset", required=True, help="dataset name (see `fastdd show datasets`)")
    p.add_argument("--data-path", default=None, help="directory holding the dataset (else FASTDD_DATA, "
                   "~/.cache/fastdd, /usr/share/datasets are searched)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default=_default_device(), help="cpu or cuda (default: cuda where available)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every K iterations (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    _add_config_options(p, cls.config_cls)
    return p


def cmd_distill(argv: List[str]) -> int:
    from . import __version__
    from .checkpoint import load as load_checkpoint
    from .checkpoint import save_atomic
    from .data import load_dataset
    from .synset import ensure_writable, save_synset

    args, cls, config = _parse_method_command(argv, _distill_parser)
    out = ensure_writable(args.out, force=args.force, resume=args.resume)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    if args.force and not args.resume and ckpt_path.exists():
        ckpt_path.unlink()

    train = load_dataset(args.dataset, "train", root=args.data_path)
    method = cls(config, train, device=args.device)
    if args.resume:
        if ckpt_path.exists():
            method.load_state_dict(load_checkpoint(ckpt_path))
            print(f"resumed {ckpt_path} at iteration {method.iteration}", file=sys.stderr)
        else:
            print(f"--resume: no checkpoint in {out}, starting from scratch", file=sys.stderr)
    start = time.perf_counter()
    method.fit(checkpoint=lambda m: save_atomic(m.state_dict(), ckpt_path), checkpoint_every=args.checkpoint_every,
               progress=not args.no_progress, log_every=max(1, config.iterations // 20))
    metadata = {
        "fastdd_version": __version__, "torch_version": str(torch.__version__), "method": cls.name,
        "dataset": train.name, "num_classes": train.num_classes, "class_names": list(train.class_names),
        "channels": train.channels, "image_size": list(train.image_size), "mean": list(train.mean),
        "std": list(train.std), "iterations_done": method.iteration, "device": str(method.device),
        "seconds_this_session": time.perf_counter() - start, "final_loss": method.last_loss,
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    tensors = method.synthetic_set()
    path = save_synset(out, tensors, config.to_dict(), metadata)
    print(f"wrote {path} ({tensors['labels'].numel()} training images, {method.iteration} iterations, "
          f"final loss/class {method.last_loss / train.num_classes:.5f})")
    return 0


# --------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(argv: List[str]) -> int:
    from .data import load_dataset
    from .evaluate import PROTOCOLS, evaluate_synset, protocol_config
    from .synset import load_synset

    p = argparse.ArgumentParser(prog="fastdd evaluate", description="Evaluate a distilled set (DM protocol) "
                                "against a same-size random real subset.")
    p.add_argument("dir", help="directory written by `fastdd distill`")
    p.add_argument("--models", type=int, default=5, help="models trained per side (default 5)")
    p.add_argument("--protocol", default="dm", choices=sorted(PROTOCOLS),
                   help="dm (default) or idc (IDC/DANCE: batch 64, 1500 epochs, CutMix, best-of-checkpoints)")
    p.add_argument("--epochs", type=int, default=None, help="(default: 1000 for dm, 1500 for idc)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="evaluation network (default: the distillation network)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: 256 for dm, 64 for idc)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--no-baseline", action="store_true", help="skip the random-subset baseline")
    p.add_argument("--data-path", default=None)
    p.add_argument("--device", default=_default_device())
    args = p.parse_args(argv)

    syn = load_synset(args.dir)
    meta, config = syn["metadata"], syn["config"]
    train = load_dataset(meta["dataset"], "train", root=args.data_path)
    test = load_dataset(meta["dataset"], "test", root=args.data_path)
    given = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size)) if v is not None}
    cfg = protocol_config(args.protocol, model=args.model or config.get("model", "ConvNet"), num_models=args.models,
                          seed=args.seed, lr=args.lr, dsa=args.dsa,
                          dsa_strategy=config.get("dsa_strategy", "") if args.protocol == "dm" else "", **given)
    result = evaluate_synset(syn["images"], syn["labels"], train, test, cfg, device=args.device,
                             baseline_indices=syn.get("init_indices"), with_baseline=not args.no_baseline)
    report = result.to_dict()
    report["baseline"] = "initial real subset" if syn.get("init_indices") is not None else "random real subset"
    report["dataset"], report["ipc"] = meta["dataset"], config.get("ipc")
    Path(args.dir, "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{meta['dataset']} IPC {config.get('ipc')} ({meta['method']}): {result.summary()}")
    return 0


# --------------------------------------------------------------------------------------------- continual
def _continual_parser(method_name: str) -> argparse.ArgumentParser:
    from . import methods

    cls = methods.get(method_name)
    p = argparse.ArgumentParser(prog="fastdd continual", description=(
        f"Class-incremental learning with per-step sets distilled by {method_name} vs a random buffer "
        "(see fastdd.continual)."))
    p.add_argument("--method", default="dm", help=f"one of {methods.names()}")
    p.add_argument("--dataset", required=True, help="dataset name (see `fastdd show datasets`)")
    p.add_argument("--data-path", default=None, help="directory holding the dataset")
    p.add_argument("--out", required=True, help="output directory (continual.json, continual.md)")
    p.add_argument("--device", default=_default_device(), help="cpu or cuda (default: cuda where available)")
    p.add_argument("--orders", type=int, default=5, help="class orders, seeds 0..N-1 (default 5)")
    p.add_argument("--order-seeds", type=int, nargs="+", default=None, help="explicit order seeds")
    p.add_argument("--order-source", default="numpy", choices=("numpy", "torch"),
                   help="numpy: the reference's orders (RandomState(s).permutation); torch: randperm")
    p.add_argument("--classes-per-step", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=0, help="run only the first N steps (0: all)")
    p.add_argument("--buffer-source", default="random", choices=("random", "init"),
                   help="random buffer: fresh random real images, or a real-initialised set's init images")
    p.add_argument("--no-baseline", action="store_true", help="skip the random buffer")
    p.add_argument("--epochs", type=int, default=1000, help="evaluation epochs (DM protocol)")
    p.add_argument("--models", type=int, default=3, help="evaluation models per order and step (default 3)")
    p.add_argument("--eval-model", default=None, help="evaluation network (default: the method's --model)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--eval-lr", type=float, default=0.01)
    p.add_argument("--faithful-epochs", action=argparse.BooleanOptionalAction, default=True,
                   help="reference loop (epochs + 1 passes, decay after epochs//2 + 1)")
    p.add_argument("--train-per-class", type=int, default=0, help="subsample N training images per class (0: all)")
    p.add_argument("--test-per-class", type=int, default=0, help="subsample N test images per class (0: all)")
    p.add_argument("--progress", action="store_true", help="progress bars during distillation")
    _add_config_options(p, cls.config_cls)
    return p


def cmd_continual(argv: List[str]) -> int:
    from . import __version__
    from .checkpoint import atomic_write
    from .continual import ContinualConfig, format_table, run_continual
    from .data import load_dataset, stratified_subset
    from .evaluate import EvalConfig

    args, cls, config = _parse_method_command(argv, _continual_parser)
    train = load_dataset(args.dataset, "train", root=args.data_path)
    test = load_dataset(args.dataset, "test", root=args.data_path)
    if args.train_per_class:
        train = stratified_subset(train, args.train_per_class, torch.Generator().manual_seed(config.seed))
    if args.test_per_class:
        test = stratified_subset(test, args.test_per_class)
    cl = ContinualConfig(classes_per_step=args.classes_per_step, orders=args.orders, order_seeds=args.order_seeds,
                         order_source=args.order_source, max_steps=args.max_steps, seed=config.seed,
                         baseline=not args.no_baseline, buffer_source=args.buffer_source)
    ev = EvalConfig(model=args.eval_model or config.model, num_models=args.models, epochs=args.epochs,
                    batch_size=args.eval_batch_size, lr=args.eval_lr, faithful_epochs=args.faithful_epochs,
                    dsa_strategy=config.dsa_strategy)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_continual(args.method, config, train, test, cl, ev, device=args.device,
                           log=lambda s: print(s, flush=True), progress=args.progress)
    result.update(fastdd_version=__version__, torch_version=str(torch.__version__),
                  train_images=len(train), test_images=len(test),
                  written=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    table = format_table(result)
    atomic_write(out / "continual.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    atomic_write(out / "continual.md", lambda tmp: Path(tmp).write_text(
        f"# Continual learning: {cls.name} vs random buffer on {train.name}, IPC {config.ipc}\n\n"
        f"Accuracy (%) on the test images of the seen classes, mean ± std over "
        f"{len(result['orders'])} orders x {args.models} models.\n\n{table}\n"))
    print(table)
    print(f"wrote {out / 'continual.json'} ({result['timings']['total_seconds']:.0f} s)")
    return 0


# --------------------------------------------------------------------------------------------- show
def cmd_show(argv: List[str]) -> int:
    from . import methods
    from .data import dataset_names
    from .models import model_names

    p = argparse.ArgumentParser(prog="fastdd show", description="List methods/datasets/models, or describe a run.")
    p.add_argument("what", help="methods | datasets | models | backends | DIR")
    args = p.parse_args(argv)
    if args.what == "methods":
        print("\n".join(methods.names()))
    elif args.what == "datasets":
        print("\n".join(dataset_names()))
    elif args.what == "models":
        print("\n".join(model_names()))
    elif args.what == "backends":
        from .ops._backend import BACKENDS, backend_available

        for dev in ("cpu", "cuda"):
            print(dev + ": " + ", ".join(b for b in BACKENDS if backend_available(b, dev, "class_mmd")))
    else:
        from .synset import load_synset

        syn = load_synset(args.what)
        print(json.dumps({"images": list(syn["images"].shape), "config": syn["config"],
                          "metadata": syn["metadata"]}, indent=2))
        ev = Path(args.what, "eval.json")
        if ev.exists():
            print(ev.read_text())
    return 0


def cmd_pretrain(argv: List[str]) -> int:
    from .experts import cli_main

    return cli_main(argv)


COMMANDS = {"distill": cmd_distill, "evaluate": cmd_evaluate, "show": cmd_show, "pretrain": cmd_pretrain,
            "continual": cmd_continual}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: fastdd {distill,evaluate,show,pretrain,continual} [options]   (fastdd COMMAND --help for details)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as exc:
        print(f"fastdd {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
