"""The ``fastdd`` command line: ``distill``, ``evaluate``, ``pretrain`` (DANCE experts), ``squeeze`` (SRe2L/DWA
teachers), ``continual``, ``show``.

Every subcommand's flags are generated from its config dataclasses (:mod:`fastdd.cliflags`): distill =
the method's config + :class:`DistillRun`; evaluate = :class:`~fastdd.evaluate.EvalConfig` +
:class:`EvaluateRun`; pretrain = :class:`~fastdd.experts.PretrainConfig` + :class:`PretrainRun`;
continual = the method's config + :class:`~fastdd.continual.ContinualConfig` + ``EvalConfig`` (as
``--eval-*``) + :class:`ContinualRun`. A registered method gets its flags without touching this file.

User errors (bad flag values, missing data, unavailable device, damaged or foreign files) are
:class:`~fastdd.errors.UsageError`: one line on stderr, exit code 2. Other exceptions keep their traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from .cliflags import add_config_flags, values_from_args
from .devices import check_device, default_device
from .errors import UsageError


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are :class:`UsageError` (one line, exit 2) instead of usage + exit."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


@dataclasses.dataclass
class _RunBase:
    dataset: str = dataclasses.field(metadata={"help": "dataset name (see `fastdd show datasets`)"})
    out: str = dataclasses.field(metadata={"help": "output directory of the run"})
    data_path: Optional[str] = None  # directory holding the dataset (else FASTDD_DATA, ~/.cache/fastdd, /usr/share/datasets)
    device: str = default_device()  # cpu, cuda or cuda:N (default: cuda where available)
    resume: bool = False  # continue the interrupted run in --out (refused if it belongs to another run)
    force: bool = False  # replace the run in --out (every file of the old run is removed first)


@dataclasses.dataclass(kw_only=True)
class _LazyOption:
    """The ``--lazy`` option of the commands that read a training split (:func:`_load_data`)."""

    lazy: str = dataclasses.field(default="auto", metadata={"help": "image folders: decode on demand (on), in "
                                                                     "memory (off), or on above 2 GiB of pixels (auto)"})


@dataclasses.dataclass(kw_only=True)
class _ImageSizeOption:
    """The ``--image-size`` option of the commands that read a dataset (:func:`_load_data`)."""

    image_size: str = dataclasses.field(default="", metadata={
        "help": "resize every image to S x S or H x W (S or HxW; default: image folders take the first training "
                "image's size, evaluate the set's size; the other splits follow the training split)"})


def parse_image_size(text: str) -> Optional[Tuple[int, int]]:
    """``--image-size``: "" -> None, "S" -> (S, S), "HxW" -> (H, W); anything else is a UsageError."""
    if not text:
        return None
    parts = text.lower().replace("*", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size, default=0) < 1:
        raise UsageError(f"--image-size: expected S or HxW with positive integers (e.g. 224 or 32x48), got {text!r}")
    return (size[0], size[-1])


@dataclasses.dataclass
class DistillRun(_RunBase, _LazyOption, _ImageSizeOption):
    """Run options of ``fastdd distill`` (``--lazy``: only the SRe2L family reads a lazy training split; for
    the other methods ``auto`` means in memory)."""

    method: str = "dm"  # the distillation method (see `fastdd show methods`)
    checkpoint_every: int = 100  # checkpoint every K iterations (0: only at the end)
    progress: bool = True  # progress bar (else log lines)
    jpeg: Optional[bool] = None  # also write DIR/train/<class>/<i>.jpg (default: on for sre2l/dwa)
    jpeg_quality: int = 95  # JPEG quality of that folder (1-95)


@dataclasses.dataclass
class PretrainRun(_RunBase, _ImageSizeOption):
    """Run options of ``fastdd pretrain``."""

    progress: bool = True  # per-expert progress bar


@dataclasses.dataclass
class SqueezeRun(_RunBase, _LazyOption, _ImageSizeOption):
    """Run options of ``fastdd squeeze`` (``--lazy``: image folders decoded batch by batch, the same weights)."""

    progress: bool = True  # one log line per epoch
    test_accuracy: bool = True  # measure the teacher's accuracy on the test split at the end
    workers: int = 0  # DataLoader processes decoding a lazy image folder


@dataclasses.dataclass
class ContinualRun(_RunBase, _ImageSizeOption):
    """Run options of ``fastdd continual``."""

    method: str = "dm"  # the distillation method of every step
    train_per_class: int = 0  # subsample N training images per class (0: all)
    test_per_class: int = 0  # subsample N test images per class (0: all)
    progress: bool = True  # progress bars


@dataclasses.dataclass
class EvaluateRun(_LazyOption, _ImageSizeOption):
    """Run options of ``fastdd evaluate``."""

    dir: str = dataclasses.field(metadata={"help": "directory written by `fastdd distill`", "positional": True})
    baseline: bool = True  # also train on the same-size real subset
    data_path: Optional[str] = None  # directory holding the dataset
    device: str = default_device()  # cpu, cuda or cuda:N


LAZY_CHOICES = {"auto": "auto", "on": True, "off": False}


def user_errors(what: str, fn: Callable, *args, **kwargs):
    """Call ``fn`` at the CLI boundary (validation, lookups, file checks): its ValueError / OSError become a
    :class:`UsageError` prefixed with ``what``."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError) as exc:
        msg = str(exc)
        raise UsageError(msg if msg.startswith(what) or not what else f"{what}: {msg}") from exc


def make_config(cls, values: dict):
    """``cls(**values)`` with its validation errors as UsageError (``validate()`` is called if present)."""
    config = user_errors("", cls, **values)
    if hasattr(config, "validate"):
        user_errors("", config.validate)
    return config


# --------------------------------------------------------------------------------------------- run directories
RUN_FILES = ("synthetic.pt", "synthetic.safetensors", "synthetic.png", "config.json", "eval.json", "checkpoint.pt",
             "continual.json", "continual.md", "continual_checkpoint.pt")


def check_out(path: str, resume: bool, force: bool, markers=RUN_FILES) -> Path:
    """Check ``--out`` before any work: a directory (or creatable one) we may write, holding no run unless
    ``--resume``/``--force``; creates nothing."""
    if resume and force:
        raise UsageError("--resume and --force: choose one")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out: cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out: {parent} is not writable")
    existing = [n for n in markers if (out / n).exists()] if out.is_dir() else []
    if existing and not (resume or force):
        raise UsageError(f"--out: {out} already holds a run ({', '.join(existing)}); pass --force to replace it "
                         f"or --resume to continue it")
    return out


def prepare_out(out: Path, force: bool, patterns=RUN_FILES) -> Path:
    """Create ``out``, remove stale ``*.tmp`` files and, with ``force``, every file of the old run."""
    from .checkpoint import clean_stale_tmp

    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    if force:
        for pattern in patterns:
            for p in out.glob(pattern):
                if p.is_file():
                    p.unlink()
    return out


def load_run_state(path: Path, identity: dict, method_cls):
    """The state saved for this run of ``method_cls`` in ``path`` (None if absent); a damaged or foreign file is
    a UsageError. Options that only choose how the run executes may differ (``method_cls.execution_fields``)."""
    from .checkpoint import load, unwrap_state
    from .methods.base import LEGACY_DEFAULTS

    if not path.exists():
        return None
    return unwrap_state(load(path), identity, path, ignore=method_cls.execution_fields, defaults=LEGACY_DEFAULTS)


def _load_data(name: str, root, *splits, lazy: str = "off", image_size: str = ""):
    """The ``splits`` of dataset ``name``; image folders per ``--lazy`` (``auto`` | ``on`` | ``off``:
    :data:`LAZY_CHOICES`), array formats always in memory. ``image_size`` (``--image-size``: S or HxW)
    resizes; without it the splits of an image folder after the first take the first split's size (each
    would otherwise take its own first file's)."""
    from .data import load_dataset
    from .data.registry import FILE_TREES, canonical_name

    if lazy not in LAZY_CHOICES:
        raise UsageError(f"--lazy: expected one of {', '.join(LAZY_CHOICES)}, got {lazy!r}")
    mode = LAZY_CHOICES[lazy]
    tree = user_errors("--dataset", canonical_name, name) in FILE_TREES
    if mode is not False and not tree:
        mode = False  # array formats are small and always in memory
    size = parse_image_size(image_size)
    out = []
    for split in splits:
        out.append(user_errors("--dataset", load_dataset, name, split, root=root, lazy=mode, image_size=size))
        if tree and size is None:
            size = tuple(out[0].image_size)
    return out


# --------------------------------------------------------------------------------------------- parser
#: EvalConfig fields continual does not expose (its seed is the method's; stored soft labels are per set)
CONTINUAL_EVAL_SKIP = ("seed", "dsa_strategy", "soft_labels", "workers")


def build_parser(method_name: str = "dm") -> argparse.ArgumentParser:
    """The full ``fastdd`` parser; distill/continual carry the flags of ``method_name``'s config."""
    from . import methods
    from .continual import ContinualConfig
    from .evaluate import EvalConfig
    from .experts import PretrainConfig
    from .squeeze import SqueezeConfig

    cls = user_errors("--method", methods.get, method_name)
    top = _Parser(prog="fastdd", description="Dataset distillation (see README, 'Command line').")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("distill", help="distil a dataset", description=f"Distil a dataset with {method_name}.")
    add_config_flags(p, DistillRun)
    add_config_flags(p, cls.config_cls)
    p = sub.add_parser("evaluate", help="evaluate a distilled set", description="Evaluate a distilled set against "
                       "a same-size real subset; writes DIR/eval.json.")
    add_config_flags(p, EvaluateRun)
    add_config_flags(p, EvalConfig, aliases={"num_models": "--models"})
    from .relabel import RelabelConfig

    p = sub.add_parser("relabel", help="store FKD-style soft labels of a set (SRe2L relabel)", description="Store "
                       "per epoch and batch the crops, flips, mixes and the teacher's logits (fastdd.relabel).")
    add_config_flags(p, RelabelRun)
    add_config_flags(p, RelabelConfig)
    p = sub.add_parser("pretrain", help="pre-train DANCE experts", description="Pre-train DANCE experts "
                       "(init + trained weights of K networks) on a real training set.")
    add_config_flags(p, PretrainRun)
    add_config_flags(p, PretrainConfig)
    p = sub.add_parser("squeeze", help="train a BatchNorm teacher (SRe2L/DWA)", description="Train a BatchNorm "
                       "teacher on a real training set (SRe2L squeeze); writes DIR/teacher.pt and teacher.json.")
    add_config_flags(p, SqueezeRun)
    add_config_flags(p, SqueezeConfig)
    p = sub.add_parser("continual", help="class-incremental protocol", description="Class-incremental learning "
                       f"with per-step sets distilled by {method_name} vs a random buffer (see fastdd.continual).")
    add_config_flags(p, ContinualRun)
    add_config_flags(p, cls.config_cls)
    add_config_flags(p, ContinualConfig, skip=("seed",))
    add_config_flags(p, EvalConfig, prefix="eval_", skip=CONTINUAL_EVAL_SKIP,
                     aliases={"epochs": "--epochs", "num_models": "--models"})
    p = sub.add_parser("show", help="list methods/datasets/models/backends, or describe a run")
    p.add_argument("what", help="methods | datasets | models | backends | DIR")
    return top


# --------------------------------------------------------------------------------------------- distill
def cmd_distill(args, method_cls) -> int:
    """``fastdd distill``; under ``torchrun`` (WORLD_SIZE > 1) each process runs its shard of a method that
    supports it (:mod:`fastdd.methods.recover`), checkpoints it to ``DIR/checkpoint.rank<R>.pt``, and rank 0
    merges the finished shards into the ordinary saved set (:mod:`fastdd.distributed`)."""
    from . import distributed
    from .synset import JPEG_DIR, is_fastdd_jpeg_folder

    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every: must be >= 0, got {args.checkpoint_every}")
    if not 1 <= args.jpeg_quality <= 95:
        raise UsageError(f"--jpeg-quality: must lie in 1..95, got {args.jpeg_quality}")
    ctx = user_errors("torchrun", distributed.from_env)
    if ctx is not None and not getattr(method_cls, "supports_sharding", False):
        raise UsageError(f"--method {method_cls.name}: cannot run sharded across {ctx.world} processes (only the "
                         f"SRe2L family supports torchrun: sre2l, dwa); run it as a single process")
    config = make_config(method_cls.config_cls, values_from_args(method_cls.config_cls, args))
    device = check_device(args.device)
    if ctx is not None:
        device = check_device(str(ctx.device(device)))
    out = Path(args.out)
    shard_files = tuple(sorted(p.name for p in out.glob("checkpoint.rank*.pt"))) if out.is_dir() else ()
    out = check_out(args.out, args.resume, args.force, markers=RUN_FILES + shard_files)
    args.jpeg = args.jpeg if args.jpeg is not None else getattr(method_cls, "writes_jpeg", False)
    if args.jpeg and (out / JPEG_DIR).exists() and not is_fastdd_jpeg_folder(out / JPEG_DIR):
        raise UsageError(f"--out: {out / JPEG_DIR} exists and was not written by fastdd (the JPEG folder of the "
                         f"set goes there); choose another --out or pass --no-jpeg")
    if ctx is None:
        return _distill(args, method_cls, config, device, out, None)
    distributed.init(ctx, device)
    try:
        return _distill(args, method_cls, config, device, out, ctx)
    finally:
        distributed.shutdown()


def _distill_lazy(lazy: str, method_cls) -> str:
    """``distill --lazy``: as given, except that ``auto`` reads in memory for a method that samples the real
    set at every iteration (``needs_real_set``); ``on`` for such a method is the method's own clear error."""
    return "off" if lazy == "auto" and getattr(method_cls, "needs_real_set", True) else lazy


def _distill(args, method_cls, config, device, out: Path, ctx) -> int:
    from . import __version__, distributed
    from .checkpoint import load, run_identity, save_atomic, unwrap_state, wrap_state
    from .synset import remove_jpeg_folder, save_jpeg_folder, save_synset, synset_images

    (train,) = _load_data(args.dataset, args.data_path, "train", lazy=_distill_lazy(args.lazy, method_cls),
                          image_size=args.image_size)
    shard = {} if ctx is None else {"shard": (ctx.rank, ctx.world)}  # a shard reads only its initial images
    method = user_errors("", method_cls, config, train, device=device, **shard)
    identity = run_identity("distill", method_cls.name, config.to_dict(), train)
    ckpt_path = out / ("checkpoint.pt" if ctx is None else f"checkpoint.rank{ctx.rank}.pt")
    who = "" if ctx is None else f"rank {ctx.rank}/{ctx.world}: "
    if args.resume:
        state = load_run_state(ckpt_path, identity, method_cls)
        if state is None:
            print(f"{who}--resume: no checkpoint {ckpt_path.name} in {out}, starting from scratch", file=sys.stderr)
        else:
            user_errors(str(ckpt_path), method.load_state_dict, state)
            print(f"{who}resumed {ckpt_path} at iteration {method.iteration}", file=sys.stderr)
    if ctx is None or ctx.rank == 0:
        prepare_out(out, args.force, RUN_FILES + ("checkpoint.rank*.pt",))
        if args.force:
            remove_jpeg_folder(out)
    distributed.barrier()  # no rank writes before rank 0 has cleaned --out
    distributed.install_kill_hook(method, 0 if ctx is None else ctx.rank)
    start = time.perf_counter()
    method.fit(checkpoint=lambda m: save_atomic(wrap_state(m.state_dict(), identity), ckpt_path),
               checkpoint_every=args.checkpoint_every, progress=args.progress and (ctx is None or ctx.rank == 0),
               log_every=max(1, config.iterations // 20))
    if ctx is not None:
        distributed.barrier()  # every shard is checkpointed complete
        if ctx.rank != 0:
            return 0
        paths = [out / f"checkpoint.rank{r}.pt" for r in range(ctx.world)]
        states = [unwrap_state(load(p), identity, p) for p in paths]
        user_errors("merge", method.merge_shards, states)
    metadata = {
        "fastdd_version": __version__, "torch_version": str(torch.__version__), "method": method_cls.name,
        "dataset": train.name, "num_classes": train.num_classes, "class_names": list(train.class_names),
        "channels": train.channels, "image_size": list(train.image_size), "mean": list(train.mean),
        "std": list(train.std), "iterations_done": method.iteration, "device": str(method.device),
        "seconds_this_session": time.perf_counter() - start, "final_loss": method.last_loss,
        "fingerprint": identity["fingerprint"], "processes": 1 if ctx is None else ctx.world,
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    tensors = method.synthetic_set()
    path = save_synset(out, tensors, config.to_dict(), metadata)
    if args.jpeg:
        folder = user_errors("--jpeg", save_jpeg_folder, out, synset_images(tensors), tensors["labels"], train.mean,
                             train.std, train.class_names, train.num_classes, args.jpeg_quality)
        print(f"wrote {folder}/<class>/<i>.jpg")
    print(f"wrote {path} ({tensors['labels'].numel()} training images, {method.iteration} iterations, "
          f"final loss/class {method.last_loss / train.num_classes:.5f})")
    return 0


# --------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args, _method_cls=None) -> int:
    """``fastdd evaluate``; under ``torchrun`` (WORLD_SIZE > 1, kd protocol only) every process joins the process
    group (gloo on the CPU, nccl on CUDA), the students train with DistributedDataParallel on each rank's share of
    every global batch (:func:`fastdd.evaluate.fit_stacked_kd`) and rank 0 alone prints and writes ``eval.json``."""
    from . import distributed
    from .evaluate import EvalConfig, protocol_config

    given = values_from_args(EvalConfig, args)
    cfg = make_config(protocol_config, dict(given, name=given.pop("protocol", "dm")))
    ctx = user_errors("torchrun", distributed.from_env)
    if ctx is not None and cfg.protocol != "kd":
        raise UsageError(f"--protocol {cfg.protocol}: only --protocol kd trains with DistributedDataParallel under "
                         f"torchrun ({ctx.world} processes); run it as a single process")
    device = check_device(args.device)
    if ctx is None:
        return _evaluate(args, given, cfg, device, None)
    device = check_device(str(ctx.device(device)))
    distributed.init(ctx, device)
    try:
        code = _evaluate(args, given, cfg, device, ctx)
        distributed.barrier()  # every rank done with its collectives before any leaves the group
        return code
    finally:
        distributed.shutdown()


def _evaluate(args, given: dict, cfg, device, ctx) -> int:
    from .checkpoint import atomic_write
    from .evaluate import evaluate_synset
    from .synset import load_synset

    syn = user_errors("synthetic set", load_synset, args.dir)
    meta, config = syn["metadata"], syn["config"]
    defaults = {"model": config.get("model", "ConvNet")}  # the distillation network and augmentation
    if cfg.protocol == "dm":
        defaults["dsa_strategy"] = config.get("dsa_strategy", "")
    if cfg.protocol == "kd":  # the set's own teacher (sre2l / dwa) unless --teacher is given
        defaults["teacher"] = config.get("teacher", "")
    store = None
    if cfg.soft_labels:  # stored relabel: its teacher, epochs, batch, temperature and preset unless given
        from .relabel import RelabelStore

        store = flag_errors(RelabelStore, cfg.soft_labels)
        defaults.update(teacher=store.meta.get("teacher") or defaults.get("teacher", ""), epochs=store.epochs,
                        batch_size=store.config.batch_size, temperature=store.config.fold_temperature)
        if cfg.kd_preset == "auto":  # the recipe the labels were stored for
            defaults["kd_preset"] = store.config.preset
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if k not in given})
    # the kd preset (auto: by the set's dataset and image size) fills the kd fields no flag or store set
    cfg = flag_errors(cfg.resolved, str(meta.get("dataset", "")), tuple(syn["images"].shape[2:]))
    train, test = _load_eval_data(meta["dataset"], args.data_path, args.lazy,
                                  args.image_size or _tree_size(meta["dataset"], syn["images"]))
    if store is not None:
        _check_store(store, syn, cfg, train, needs_teacher=args.baseline)
    elif cfg.protocol == "kd":
        if not cfg.teacher:
            raise UsageError("--teacher: the kd protocol needs a teacher (a `fastdd squeeze` directory or "
                             "resnet18:PATH); this set records none")
        from .teacher import load_teacher

        user_errors("--teacher", load_teacher, cfg.teacher, train.channels, train.num_classes, train.image_size)
    lead = ctx is None or ctx.rank == 0
    kwargs = dict(device=device, baseline_indices=syn.get("init_indices"), with_baseline=args.baseline,
                  progress=lead, ddp=ctx is not None)
    if not hasattr(cfg, "allow_missing_classes"):  # evaluate.py without the set check: no conversion
        result = evaluate_synset(syn["images"], syn["labels"], train, test, cfg, **kwargs)
    else:  # its only ValueErrors before training are the checks of the given set ("labels: ...")
        result = user_errors("synthetic set", evaluate_synset, syn["images"], syn["labels"], train, test, cfg,
                             **kwargs)
    if not lead:
        return 0
    report = result.to_dict()
    report["baseline"] = "initial real subset" if syn.get("init_indices") is not None else "random real subset"
    report["dataset"], report["ipc"] = meta["dataset"], config.get("ipc")
    report["processes"] = 1 if ctx is None else ctx.world
    atomic_write(Path(args.dir, "eval.json"), lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    preset = f", kd preset {cfg.kd_preset}" if cfg.protocol == "kd" else ""
    procs = f", {ctx.world} processes (DDP)" if ctx is not None else ""
    print(f"{meta['dataset']} IPC {config.get('ipc')} ({meta['method']}{preset}{procs}): {result.summary()}")
    return 0


def _load_eval_data(name: str, root, lazy: str, image_size: str = ""):
    """The train and test splits for ``evaluate``; image folders per ``--lazy`` (a lazy test split is
    streamed with ``--workers`` DataLoader workers, a lazy train split only feeds the baseline)."""
    return _load_data(name, root, "train", "test", lazy=lazy, image_size=image_size)


def _tree_size(name: str, images: torch.Tensor) -> str:
    """``evaluate``'s default ``--image-size``: the set's H x W for an image-folder dataset (read at that
    size), "" for the array formats (read as stored)."""
    from .data.registry import FILE_TREES, canonical_name

    try:
        tree = canonical_name(name) in FILE_TREES
    except (KeyError, TypeError, ValueError):
        return ""
    return f"{images.shape[-2]}x{images.shape[-1]}" if tree else ""


def _check_store(store, syn, cfg, train, needs_teacher: bool) -> None:
    """``evaluate --soft-labels``: the store fits the set, the student's epochs / batch and the teacher;
    the errors name the flag (``--epochs``, ``--batch-size``, ``--teacher``, ``--soft-labels``)."""
    from .teacher import load_teacher

    teacher = None
    if cfg.teacher:
        teacher = flag_errors(load_teacher, cfg.teacher, train.channels, train.num_classes, train.image_size)[0]
    elif needs_teacher:
        raise UsageError("--teacher: the random baseline is labelled online (no soft labels are stored for it) and "
                         "no teacher is known; pass --teacher or --no-baseline")
    flag_errors(store.check_for, syn["images"], syn["labels"], epochs=cfg.epochs, batch_size=cfg.batch_size,
                teacher=teacher)


def flag_errors(fn: Callable, *args, **kwargs):
    """Call ``fn``; its ValueError / OSError "field: message" becomes the UsageError "--field: message"."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError) as exc:
        head, sep, rest = str(exc).partition(": ")
        raise UsageError(f"--{head.replace('_', '-')}: {rest}" if sep and head.isidentifier() else str(exc)) from exc


# --------------------------------------------------------------------------------------------- relabel
@dataclasses.dataclass
class RelabelRun:
    """Run options of ``fastdd relabel``."""

    dir: str = dataclasses.field(metadata={"help": "directory written by `fastdd distill`", "positional": True})
    teacher: str = ""  # teacher spec (squeeze DIR or resnet18:PATH; default: the set's own teacher)
    out: str = ""  # output directory (default: DIR/relabel)
    device: str = default_device()  # cpu, cuda or cuda:N
    resume: bool = False  # continue a killed relabel in --out (the epochs on disk are kept)
    force: bool = False  # replace the relabel in --out
    progress: bool = True  # one line per epoch


def _absolute_spec(spec: str) -> str:
    from .teacher import FILE_SPECS

    head, sep, tail = spec.partition(":")
    if sep and head.lower() in FILE_SPECS:
        return f"{head}:{Path(tail).expanduser().resolve()}"
    return str(Path(spec).expanduser().resolve())


def cmd_relabel(args, _method_cls=None) -> int:
    from .relabel import META_FILE, RelabelConfig, format_storage, relabel_set
    from .synset import load_synset
    from .teacher import load_teacher

    cfg = make_config(RelabelConfig, values_from_args(RelabelConfig, args))
    device = check_device(args.device)
    syn = user_errors("synthetic set", load_synset, args.dir)
    images, labels, meta = syn["images"], syn["labels"], syn["metadata"]
    out = check_out(args.out or str(Path(args.dir) / "relabel"), args.resume, args.force,
                    markers=(META_FILE, "epoch_0000.safetensors"))
    spec = args.teacher or syn["config"].get("teacher", "")
    if not spec:
        raise UsageError("--teacher: relabel needs a teacher (a `fastdd squeeze` directory or resnet18:PATH); this "
                         "set records none")
    k = int(meta.get("num_classes") or int(labels.max()) + 1)
    teacher, _ = flag_errors(load_teacher, spec, images.shape[1], k, tuple(images.shape[2:]), device)
    cfg = flag_errors(cfg.resolved, str(meta.get("dataset", "")), tuple(images.shape[2:]))
    prepare_out(out, args.force, patterns=(META_FILE, "epoch_*.safetensors"))
    start = time.perf_counter()
    result = user_errors("", relabel_set, images.to(device), labels, teacher, cfg, out,
                         teacher_spec=_absolute_spec(spec), dataset=str(meta.get("dataset", "")), resume=args.resume,
                         progress=(lambda s: print(s, flush=True)) if args.progress else None)
    print(f"wrote {cfg.epochs} epochs of soft labels for {images.shape[0]} images to {out} ({cfg.preset} preset: "
          f"batch {cfg.batch_size}, {cfg.crop} crop, {cfg.mix} {cfg.mix_alpha}, "
          f"{f'top-{cfg.topk}' if cfg.topk else 'all'} logits, {time.perf_counter() - start:.0f} s)")
    print(format_storage(result["storage"], cfg.epochs))
    return 0


# --------------------------------------------------------------------------------------------- pretrain
def run_setup(config_cls, args, markers=()):
    """The start of a command that trains into a fresh or resumed ``--out``: (the config built from the
    flags, the checked ``--device``, the checked ``--out`` folder), each a clear user error if bad."""
    cfg = make_config(config_cls, values_from_args(config_cls, args))
    return cfg, check_device(args.device), check_out(args.out, args.resume, args.force, markers=markers)


PRETRAIN_FILES = ("pretrain_state.pt", "premodel*_init.pt", "premodel*_trained.pt")


def cmd_pretrain(args, _method_cls=None) -> int:
    from .experts import META_FILE, PretrainConfig, check_resume, pretrain_experts

    cfg, device, out = run_setup(PretrainConfig, args, markers=(META_FILE,))
    (train,) = _load_data(args.dataset, args.data_path, "train", image_size=args.image_size)
    prepare_out(out, args.force, patterns=PRETRAIN_FILES + (META_FILE,))
    start = time.perf_counter()
    if args.resume:
        check_resume(out, train, cfg)
    pretrain_experts(train, cfg, out, device=device, resume=args.resume, progress=args.progress)
    print(f"wrote {cfg.models} experts to {out} ({time.perf_counter() - start:.0f} s)")
    return 0


# --------------------------------------------------------------------------------------------- squeeze
SQUEEZE_FILES = ("teacher.pt", "teacher.json", "squeeze_state.pt")


def cmd_squeeze(args, _method_cls=None) -> int:
    from .squeeze import SqueezeConfig, check_resume, squeeze

    cfg, device, out = run_setup(SqueezeConfig, args, markers=("teacher.json",))
    splits = ("train", "test") if args.test_accuracy else ("train",)
    train, test = (*_load_data(args.dataset, args.data_path, *splits, lazy=args.lazy, image_size=args.image_size),
                   None)[:2]
    user_errors("", get_model_check, cfg.model, train)
    if args.resume:
        user_errors("", check_resume, out, train, cfg)
    prepare_out(out, args.force, patterns=SQUEEZE_FILES)
    start = time.perf_counter()
    squeeze(train, cfg, out, test=test, device=device, resume=args.resume, progress=args.progress,
            workers=args.workers)
    meta = json.loads((out / "teacher.json").read_text())
    acc = meta.get("test_accuracy")
    print(f"wrote {out / 'teacher.pt'} ({cfg.model}, {meta['epochs_done']} epochs, test accuracy "
          f"{'n/a' if acc is None else f'{100 * acc:.2f} %'}, {time.perf_counter() - start:.0f} s)")
    return 0


def get_model_check(name: str, train) -> None:
    """Build ``name`` for ``train``'s shape once on the meta device: an unknown name, an impossible shape or a
    network without BatchNorm fails (ValueError) before any work."""
    from .models import get_model

    with torch.device("meta"):
        net = get_model(name, train.channels, train.num_classes, train.image_size)
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise ValueError(f"--model: {name} has no BatchNorm layer; a squeeze teacher needs one (ConvNetBN, "
                         "ResNet18BN, TVResNet18S, ...)")


# --------------------------------------------------------------------------------------------- continual
def cmd_continual(args, method_cls) -> int:
    from . import __version__
    from .checkpoint import atomic_write
    from .continual import ContinualConfig, check_inputs, format_table, run_continual
    from .data import stratified_subset
    from .evaluate import EvalConfig, protocol_config

    config = make_config(method_cls.config_cls, values_from_args(method_cls.config_cls, args))
    cl = make_config(ContinualConfig, dict(values_from_args(ContinualConfig, args, skip=("seed",)), seed=config.seed))
    ev_values = values_from_args(EvalConfig, args, prefix="eval_", skip=CONTINUAL_EVAL_SKIP)
    ev_values.setdefault("model", config.model)
    protocol = ev_values.pop("protocol", "dm") or "dm"
    if protocol == "kd":
        raise UsageError("--eval-protocol kd: continual has no teacher to distil soft labels from; use dm or idc")
    # the protocol's own defaults (idc: its epochs, lr schedule, CutMix, augmentation), then the flags given; the
    # method's DSA strategy is the DM protocol's augmentation, IDC keeps its own
    if protocol == "dm":
        ev_values["dsa_strategy"] = config.dsa_strategy
    ev = make_config(protocol_config, dict(ev_values, name=protocol))
    device = check_device(args.device)
    out = check_out(args.out, args.resume, args.force)
    train, test = _load_data(args.dataset, args.data_path, "train", "test", image_size=args.image_size)
    if args.train_per_class:
        train = user_errors("--train-per-class", stratified_subset, train, args.train_per_class,
                            torch.Generator().manual_seed(config.seed))
    if args.test_per_class:
        test = user_errors("--test-per-class", stratified_subset, test, args.test_per_class)
    user_errors("", check_inputs, train, test, cl, config.ipc)
    prepare_out(out, args.force)
    result = run_continual(method_cls.name, config, train, test, cl, ev, device=device,
                           log=lambda s: print(s, flush=True), progress=args.progress)
    result.update(fastdd_version=__version__, torch_version=str(torch.__version__),
                  train_images=len(train), test_images=len(test),
                  written=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    table = format_table(result)
    atomic_write(out / "continual.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    atomic_write(out / "continual.md", lambda tmp: Path(tmp).write_text(
        f"# Continual learning: {method_cls.name} vs random buffer on {train.name}, IPC {config.ipc}\n\n"
        f"Accuracy (%) on the test images of the seen classes, mean ± std over "
        f"{len(result['orders'])} orders x {ev.num_models} models.\n\n{table}\n"))
    print(table)
    print(f"wrote {out / 'continual.json'} ({result['timings']['total_seconds']:.0f} s)")
    return 0


# --------------------------------------------------------------------------------------------- show
def _show_backends() -> None:
    from .ops._backend import BACKENDS, backend_available

    for dev in ("cpu", "cuda"):
        print(dev + ": " + ", ".join(b for b in BACKENDS if backend_available(b, dev, "class_mmd")))


def _show_registry(names_fn: Callable[[], List[str]]) -> Callable[[], None]:
    return lambda: print("\n".join(names_fn()))


def cmd_show(args, _method_cls=None) -> int:
    from . import methods
    from .data import dataset_names
    from .models import model_names
    from .synset import load_synset

    listings = {"methods": _show_registry(methods.names), "datasets": _show_registry(dataset_names),
                "models": _show_registry(model_names), "backends": _show_backends}
    if args.what in listings:
        listings[args.what]()
        return 0
    if not Path(args.what).is_dir():
        raise UsageError(f"show: {args.what!r} is neither one of {sorted(listings)} nor a run directory")
    syn = user_errors("synthetic set", load_synset, args.what)
    print(json.dumps({"images": list(syn["images"].shape), "config": syn["config"],
                      "metadata": syn["metadata"]}, indent=2))
    ev = Path(args.what, "eval.json")
    if ev.exists():
        print(ev.read_text())
    return 0


COMMANDS = {"distill": cmd_distill, "evaluate": cmd_evaluate, "show": cmd_show, "pretrain": cmd_pretrain,
            "continual": cmd_continual, "squeeze": cmd_squeeze, "relabel": cmd_relabel}


RUN_OPTIONS = {"distill": DistillRun, "evaluate": EvaluateRun, "pretrain": PretrainRun, "continual": ContinualRun,
               "squeeze": SqueezeRun, "relabel": RelabelRun}


def _method_name(argv: List[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="dm")
    return pre.parse_known_args(argv)[0].method


def run(argv: List[str]) -> int:
    """Parse ``argv`` and run the subcommand (UsageError propagates)."""
    from . import methods

    name = _method_name(argv[1:] if argv and argv[0] in ("distill", "continual") else [])
    args = build_parser(name).parse_args(argv)
    run_cls = RUN_OPTIONS.get(args.command)
    if run_cls is not None:  # unset run options take their dataclass defaults
        vars(args).update(dataclasses.asdict(run_cls(**values_from_args(run_cls, args))))
    method_cls = methods.get(name) if args.command in ("distill", "continual") else None
    return COMMANDS[args.command](args, method_cls)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: exit code 0 on success, 2 on a user error (one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "fastdd"
    try:
        return run(argv)
    except UsageError as exc:
        message = " ".join(str(exc).split())
        print(f"fastdd {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
