"""SRe2L and DWA vs a same-size random real subset on the real Fashion-MNIST under the KD protocol (CPU).

Pipeline: a ConvNetW32BN teacher from squeeze (5 epochs on a stratified 3000-image subset, SGD 0.05,
batch 64), IPC-10 sets from ``sre2l`` and ``dwa`` (cifar preset, ``--iterations`` per unit), then each set
and its paired real subset evaluated with ``--protocol kd`` (students ConvNetW32, teacher online, T 30,
MixUp 0.8, crop + flip) on 100 test images per class. Prints one Markdown row per method.

    python benchmarks/sre2l_fmnist.py --iterations 100 --epochs 200 --batch-size 50
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from fastdd.data import load_dataset, stratified_subset
from fastdd.evaluate import evaluate_synset, protocol_config
from fastdd.methods import get
from fastdd.squeeze import SqueezeConfig, squeeze


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=100, help="recover steps per unit")
    ap.add_argument("--epochs", type=int, default=200, help="KD student epochs")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["sre2l", "dwa"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    test = stratified_subset(test, 100)
    teacher = tempfile.mkdtemp(prefix="fastdd-teacher-")
    start = time.perf_counter()
    squeeze(train, SqueezeConfig(model="ConvNetW32BN", epochs=5, train_subset=3000, lr=0.05, batch_size=64), teacher,
            test=test, progress=False)
    acc = json.loads(open(f"{teacher}/teacher.json").read())["test_accuracy"]
    print(f"teacher ConvNetW32BN: {100 * acc:.1f} % ({time.perf_counter() - start:.0f} s)")
    cfg = protocol_config("kd", teacher=teacher, epochs=args.epochs, batch_size=args.batch_size,
                          num_models=args.models, model="ConvNetW32", compile="off")
    print("| method | iterations/unit | set % | paired real subset % | distil s | eval s |\n|---|---|---|---|---|---|")
    for name in args.methods:
        cls = get(name)
        t0 = time.perf_counter()
        m = cls(cls.config_cls(teacher=teacher, ipc=10, iterations=args.iterations, seed=0), train).fit(progress=False)
        syn = m.synthetic_set()
        t1 = time.perf_counter()
        d = evaluate_synset(syn["images"], syn["labels"], train, test, cfg, baseline_indices=syn.get("init_indices"),
                            progress=False).to_dict()
        print(f"| {name} | {args.iterations} | {d['accuracy_mean']:.2f} ± {d['accuracy_std']:.2f} | "
              f"{d['random_baseline_mean']:.2f} ± {d['random_baseline_std']:.2f} | {t1 - t0:.0f} | "
              f"{time.perf_counter() - t1:.0f} |", flush=True)


if __name__ == "__main__":
    main()
