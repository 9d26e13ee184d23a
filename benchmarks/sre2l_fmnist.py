"""SRe2L, DWA and the DM family vs their paired real subsets on the real Fashion-MNIST under the KD protocol (CPU).

Pipeline: a ConvNetW32BN teacher from squeeze (``--teacher-epochs`` on a stratified ``--teacher-subset``,
SGD 0.05, batch 64), IPC-10 sets from every method of ``--methods`` (``sre2l`` / ``dwa``: cifar preset with
``--iterations`` per unit; DM family: ``--dm-iterations`` outer iterations, batch_real 64), then each set
and its paired real subset evaluated with ``--protocol kd`` (students ConvNetW32, the teacher online, T 30,
MixUp 0.8, crop + flip) at every KD budget of ``--kd`` (EPOCHSxBATCH), on 100 test images per class.

The paired subset is the set's own initial real images when the method starts from real images (DWA
and the DM family), else a random class-balanced subset (SRe2L starts from noise). Both sides train from
the same student initialisations. Seconds are CPU seconds of this process (``time.process_time``; one torch
thread), so they do not depend on other jobs on the machine.

    python benchmarks/sre2l_fmnist.py                        # writes benchmarks/results/sre2l_fmnist.md
    python benchmarks/sre2l_fmnist.py --methods sre2l dwa --iterations 100 --kd 100x100
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_lines  # noqa: E402

from fastdd.data import load_dataset, stratified_subset  # noqa: E402
from fastdd.evaluate import evaluate_synset, protocol_config  # noqa: E402
from fastdd.methods import get  # noqa: E402
from fastdd.squeeze import SqueezeConfig, squeeze  # noqa: E402

RECOVER = ("sre2l", "dwa")


def kd_budget(text: str):
    """'EPOCHSxBATCH' -> (epochs, batch)."""
    try:
        epochs, batch = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kd: expected EPOCHSxBATCH such as 200x50, got {text!r}") from None
    return epochs, batch


def method_config(name: str, teacher: str, a):
    """The IPC-10 config of method ``name`` at this script's budget."""
    cls = get(name)
    if name in RECOVER:
        return cls, cls.config_cls(teacher=teacher, ipc=10, iterations=a.iterations, seed=0)
    return cls, cls.config_cls(ipc=10, iterations=a.dm_iterations, batch_real=64, seed=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["sre2l", "dwa", "dm", "ddm", "mim4dd"])
    ap.add_argument("--iterations", type=int, default=1000, help="recover steps per unit (the cifar preset's 1000)")
    ap.add_argument("--dm-iterations", type=int, default=200, help="outer iterations of the DM-family methods")
    ap.add_argument("--kd", type=kd_budget, nargs="+", default=[(100, 100), (200, 50)],
                    help="KD student budgets EPOCHSxBATCH")
    ap.add_argument("--models", type=int, default=3, help="students per side")
    ap.add_argument("--teacher-subset", type=int, default=3000, help="squeeze images (0: all 60000)")
    ap.add_argument("--teacher-epochs", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "sre2l_fmnist.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    test = stratified_subset(test, 100)
    teacher = tempfile.mkdtemp(prefix="fastdd-teacher-")
    c0 = time.process_time()
    squeeze(train, SqueezeConfig(model="ConvNetW32BN", epochs=a.teacher_epochs, train_subset=a.teacher_subset,
                                 lr=0.05, batch_size=64), teacher, test=test, progress=False)
    acc = json.loads(open(f"{teacher}/teacher.json").read())["test_accuracy"]
    subset = a.teacher_subset or len(train)
    lines = [f"Teacher: ConvNetW32BN, {a.teacher_epochs} epochs on {subset} training images, "
             f"{100 * acc:.1f} % on the 1000 test images ({time.process_time() - c0:.0f} CPU s).", "",
             "| method | distillation | KD budget | set % | paired real subset % | distil CPU s | eval CPU s |",
             "|---|---|---|---|---|---:|---:|"]
    print("\n".join(lines), flush=True)
    for name in a.methods:
        cls, cfg = method_config(name, teacher, a)
        c0 = time.process_time()
        syn = cls(cfg, train).fit(progress=False).synthetic_set()
        distil = time.process_time() - c0
        budget = f"{a.iterations} steps/unit" if name in RECOVER else f"{a.dm_iterations} iterations"
        for epochs, batch in a.kd:
            ecfg = protocol_config("kd", teacher=teacher, epochs=epochs, batch_size=batch, num_models=a.models,
                                   model="ConvNetW32", compile="off")
            c0 = time.process_time()
            d = evaluate_synset(syn["images"], syn["labels"], train, test, ecfg,
                                baseline_indices=syn.get("init_indices"), progress=False).to_dict()
            row = (f"| {name} | {budget} | {epochs} epochs, batch {batch} | {d['accuracy_mean']:.2f} ± "
                   f"{d['accuracy_std']:.2f} | {d['random_baseline_mean']:.2f} ± {d['random_baseline_std']:.2f} | "
                   f"{distil:.0f} | {time.process_time() - c0:.0f} |")
            lines.append(row)
            print(row, flush=True)
    head = ["# SRe2L, DWA and the DM family under KD on Fashion-MNIST (IPC 10)", "",
            f"Command: `python benchmarks/sre2l_fmnist.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); {a.models} students per side, mean ± std.", "",
            *machine_lines("cpu"), ""]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    Path(a.out).write_text("\n".join(head + lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
