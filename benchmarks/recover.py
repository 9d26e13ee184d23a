"""One SRe2L recover iteration (teacher forward + backward to the pixels, CE + BN statistics) with the fused
BN statistics (:class:`fastdd.matchers.BNStatisticsLoss`: a pre-hook keeps a reference to each BN input,
the fused ``bn_stat_loss`` op reduces it) against a faithful re-implementation of the reference's hook
(per BN layer: ``permute(1, 0, 2, 3).contiguous().view(C, -1).var(1, unbiased=False)`` plus the mean),
interleaved, median over runs, ratio hook / fused in one run.

    python benchmarks/recover.py --side 32 --batch 100 --runs 10        # CPU: small side
    python benchmarks/recover.py --device cuda --side 224 --batch 100   # GPU (not run yet)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_lines  # noqa: E402

from fastdd.matchers import BNStatisticsLoss  # noqa: E402
from fastdd.models import get_model  # noqa: E402


class HookBNLoss:
    """The reference formulation: a forward hook per BN layer computing the statistics from a permuted copy."""

    def __init__(self, model: nn.Module, first: float = 10.0):
        self.terms = []
        self.first = first
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_hook(self._hook)

    def _hook(self, module, inputs, _out):
        x = inputs[0]
        c = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view(c, -1).var(1, unbiased=False)
        self.terms.append(torch.norm(module.running_var - var, 2) + torch.norm(module.running_mean - mean, 2))

    def loss(self):
        out = self.first * self.terms[0] + sum(self.terms[1:])
        self.terms = []
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--model", default="TVResNet18S")
    args = ap.parse_args()
    dev = torch.device(args.device)
    nets, losses = [], []
    for kind in ("fused", "hook"):
        net = get_model(args.model, 3, 1000, (args.side, args.side), generator=torch.Generator().manual_seed(0))
        net = net.to(dev).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        nets.append(net)
        losses.append(BNStatisticsLoss(net) if kind == "fused" else HookBNLoss(net))
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.batch, 3, args.side, args.side, generator=g, device=dev).requires_grad_(True)
    y = torch.arange(args.batch, device=dev) % 1000

    def iteration(i):
        x.grad = None
        loss = F.cross_entropy(nets[i](x), y) + 0.01 * losses[i].loss()
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = ([], [])
    for i in (0, 1):  # warm-up
        iteration(i)
    for _ in range(args.runs):
        for i in (0, 1):
            t = time.perf_counter()
            iteration(i)
            times[i].append(time.perf_counter() - t)
    fused, hook = (statistics.median(t) * 1e3 for t in times)
    print(f"recover iteration, {args.model}, batch {args.batch}, {args.side}x{args.side}, {dev}, "
          f"{torch.get_num_threads()} threads: fused {fused:.1f} ms, hook {hook:.1f} ms, hook / fused {hook / fused:.2f}x")
    print("\n".join(machine_lines(dev)))


if __name__ == "__main__":
    main()
