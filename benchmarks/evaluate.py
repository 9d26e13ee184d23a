"""Evaluation of one distilled set: the reference's sequential loop (provider A) vs ``fastdd evaluate`` (B).

* ``reference-loop`` (A): :func:`_reference_loop.ref_evaluate`, one model at a time (fresh ConvNet-3 with
  in-place ReLU, ``epochs + 1`` passes, per-sample DSA with the reference's cost structure, the test set
  in batches of 256 with a host sync per batch);
* ``fastdd`` (B): :func:`fastdd.evaluate.evaluate_synset` as ``fastdd evaluate`` runs it (models stacked,
  compiled as ``compile="auto"`` compiles ``fastdd evaluate``'s default run, cache-sized channels_last
  test chunks), without the random baseline so that both providers train the same models.

The set: the first IPC real images per class of Fashion-MNIST (``--data-path``, default the system copy,
else the subset committed under ``benchmarks/data``). Providers alternate (A, B, A, B, ...); every round
trains ``--models`` models each. Reported: seconds per model (median over rounds, p20-p80), the ratio
A/B of the medians, mean test accuracy of each provider (to show the speed is at equal accuracy), peak
memory. Results go to ``benchmarks/results/evaluate.{csv,md}`` with the machine description.

    python benchmarks/evaluate.py [--quick] [--device cpu|cuda] [--ipc 1 10] [--epochs 300] [--models 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import check_device, default_device, environment, peak_memory  # noqa: E402
from _providers import interleaved  # noqa: E402
from _reference_loop import ref_evaluate  # noqa: E402
from dm_iteration import RESULTS, quantile, save_results, summarise  # noqa: E402

from fastdd.data import ClassSampler, DatasetNotFoundError, load_dataset  # noqa: E402
from fastdd.evaluate import EvalConfig, evaluate_synset  # noqa: E402

BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
REPORT = ("Evaluation: reference sequential loop (A) vs fastdd evaluate (B)",  # title and intro of the Markdown table
          "Time per trained-and-tested ConvNet-3 model on an IPC-n Fashion-MNIST set (first n real images per class), "
          "DM protocol. Produced by `python benchmarks/evaluate.py` (`make bench`). A/B > 1: fastdd is faster. The "
          "`batch_real` column holds the epochs.")


def load(data_path):
    for root in ([data_path] if data_path else [None, BUNDLED]):
        try:
            return load_dataset("fashion-mnist", "train", root=root), load_dataset("fashion-mnist", "test", root=root)
        except DatasetNotFoundError:
            continue
    raise SystemExit("Fashion-MNIST not found: pass --data-path")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=default_device())
    p.add_argument("--ipc", type=int, nargs="+", default=None, help="default 1 10 (quick: 1)")
    p.add_argument("--epochs", type=int, default=None, help="default 300 (quick: 30)")
    p.add_argument("--models", type=int, default=None, help="models per provider and round (default 3, quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2, quick 1)")
    p.add_argument("--compile", default="on", choices=("auto", "on", "off"),
                   help="fastdd's switch (default on: `fastdd evaluate` trains 3 + 3 baseline models, which "
                        "'auto' compiles; this benchmark trains only the set's models)")
    p.add_argument("--data-path", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    check_device(device)
    ipcs = args.ipc or ([1] if args.quick else [1, 10])
    epochs = args.epochs or (30 if args.quick else 300)
    models = args.models or (1 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 2)
    train, test = load(args.data_path)
    train, test = train.to(device), test.to(device)
    env = environment(device)
    rows = []
    for ipc in ipcs:
        idx = ClassSampler(train.images, train.labels, train.num_classes).first_indices(ipc).reshape(-1)
        x, y = train.images[idx], train.labels[idx]
        g = torch.Generator(device=device).manual_seed(0)
        cfg = EvalConfig(num_models=models, epochs=epochs, compile=args.compile)

        def prov_a():
            return [ref_evaluate(x, y, test.images, test.labels, train.num_classes, epochs, g) for _ in range(models)]

        def prov_b():
            return evaluate_synset(x, y, train, test, cfg, device=device, with_baseline=False,
                                   progress=False).accuracies

        calls = {"reference-loop": prov_a, "fastdd": prov_b}
        outputs = {k: [] for k in calls}
        times = interleaved(calls, device, rounds, warmup=0, outputs=outputs)
        times = {k: [t / models for t in ts] for k, ts in times.items()}  # ms per model
        accs = {k: [a for out in outs for a in out] for k, outs in outputs.items()}
        mean_acc = {k: sum(a) / len(a) for k, a in accs.items()}
        mems = {k: peak_memory(fn, device) for k, fn in calls.items()} if not args.quick else {}
        notes = {k: f"ms per model; mean acc {mean_acc[k]:.2f} % over {len(accs[k])} models; test set "
                    f"{test.images.shape[0]}" + ("; quick (first round includes compile)" if args.quick else "")
                 for k in calls}
        base = statistics.median(times["reference-loop"])
        rows += summarise("evaluate", {"shape": "1x28x28", "ipc": str(ipc), "batch_real": f"{epochs} epochs"},
                          times, mems, env, notes=notes, runs_per_time=models)
        for k, ts in times.items():
            med = statistics.median(ts)
            print(f"IPC {ipc} {k:15s} {med / 1e3:8.2f} s/model (p20-p80 {quantile(ts, .2) / 1e3:.2f}-"
                  f"{quantile(ts, .8) / 1e3:.2f})  A/B {base / med:.2f}x  acc {mean_acc[k]:.2f} %", flush=True)
    if not args.no_save:
        save_results(args.out, "evaluate", rows, *REPORT, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
