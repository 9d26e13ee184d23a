"""One SRe2L recover iteration: the reference's structure with its BN hook (A) vs what ``fastdd distill --method sre2l`` runs (B).

Every provider runs a whole iteration on a batch of ``--batch`` images (one per class) against a frozen
TVResNet18S teacher (1000 classes, small-image stem) at ``--side``: the jitter (random roll by up to 4
pixels and a flip, one draw for the batch: the cifar preset), the teacher forward, CE + 0.01 x the BN
term (first-layer multiplier 10), backward to the pixels, one Adam step (betas 0.5 / 0.9) and the
per-channel clamp:

* ``reference-hook`` (A): the reference's structure (SRe2L ``recover_cifar.py``): a forward hook per BN
  layer computing ``permute(1, 0, 2, 3).contiguous().view(C, -1).var(1, unbiased=False)`` plus the
  mean, eager, glibc's default allocator;
* ``reference-fused``: A with the hook replaced by :class:`fastdd.matchers.BNStatisticsLoss` with
  ``fused=False`` (a pre-hook keeping a reference to each BN input, the fused ``bn_stat_loss`` op):
  isolates the BN statistics op;
* ``fastdd`` (B): ``fastdd.methods.sre2l.SRe2L.step`` with the config ``fastdd distill`` uses
  (``compile="auto"``, which compiles the teacher loss at 1000 steps per unit; ``memory_format="auto"``,
  channels_last on a CPU; every BatchNorm fused with its statistics, ``fastdd.ops.bn_eval_stats``), inside
  :func:`fastdd.allocator.reuse_freed_memory` as ``Method.fit`` runs it;
* ``fastdd-eager``: B with ``compile="off"``;
* ``fastdd-contiguous``: B with ``memory_format="contiguous"`` (the NCHW teacher; ``auto`` is channels_last
  on a CPU), isolating the layout;
* ``fused-channels-last`` / ``hook-channels-last``: ``reference-fused`` / ``reference-hook`` with the teacher
  and images in channels_last memory format (does the layout alone help the reference?);
* ``fused-bf16`` (GPU variant, default on CUDA only): ``reference-fused`` under ``torch.autocast(bfloat16)``.

The teacher has random weights and default running statistics (the time does not depend on them).
Each provider lives in its own spawned process (its own allocator state; :mod:`_providers`); they are
timed interleaved after warm-up (which includes compilation): median, p20-p80, ratio A / provider, peak
memory. Results are appended to ``benchmarks/results/recover.csv`` and ``recover.md`` is regenerated.

    python benchmarks/recover.py                                        # CPU: 32 x 32, batch 100
    python benchmarks/recover.py --device cuda --side 224 --batch 100   # GPU (not run yet)
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import check_device, default_device, environment  # noqa: E402
from _providers import ProcessProvider, in_fit, interleaved  # noqa: E402
from dm_iteration import RESULTS, save_results, summarise  # noqa: E402

from fastdd.data import ImageDataset  # noqa: E402
from fastdd.matchers import BNStatisticsLoss  # noqa: E402
from fastdd.methods import get  # noqa: E402
from fastdd.models import get_model  # noqa: E402

PROVIDERS = ("reference-hook", "reference-fused", "fastdd", "fastdd-eager", "fastdd-contiguous", "fused-channels-last",
             "hook-channels-last", "fused-bf16")
CPU_PROVIDERS = PROVIDERS[:7]  # bf16 without AVX-512 BF16 / AMX is not a CPU target
MODEL, CLASSES, MEAN, STD = "TVResNet18S", 1000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
REPORT = ("One SRe2L recover iteration: reference structure with the BN hook (A) vs fastdd (B)",
          "Whole iteration (jitter, TVResNet18S teacher forward, CE + BN term, backward to the pixels, Adam step, "
          "clamp), providers interleaved in time, each in its own process. Produced by `python benchmarks/recover.py`. "
          "The `shape` column is the image side, `ipc` the batch, `batch_real` the threads. A/B > 1: faster than "
          "the reference.")


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


def frozen_teacher(side: int, device) -> nn.Module:
    net = get_model(MODEL, 3, CLASSES, (side, side), generator=torch.Generator().manual_seed(0))
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def reference_iteration(side: int, batch: int, device: str, bn: str, variant: str = ""):
    """A (``bn="hook"``) or A with the fused BN loss (``bn="fused"``): the reference's loop body; ``variant``
    ``"bf16"`` runs the teacher under bf16 autocast, ``"channels-last"`` in channels_last memory format."""
    net = frozen_teacher(side, device)
    if variant == "channels-last":
        net = net.to(memory_format=torch.channels_last)
    reg = HookBNLoss(net) if bn == "hook" else BNStatisticsLoss(net, 10.0, 1.0, fused=False)
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=variant == "bf16")
    fmt = torch.channels_last if variant == "channels-last" else torch.contiguous_format
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, side, side, generator=g, device=device).requires_grad_(True)
    y = torch.arange(batch, device=device) % CLASSES
    opt = torch.optim.Adam([x], lr=0.25, betas=(0.5, 0.9), eps=1e-8)
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (MEAN, STD))
    rng = random.Random(0)

    def run():
        off1, off2 = rng.randint(-4, 4), rng.randint(-4, 4)
        view = torch.roll(x, shifts=(off1, off2), dims=(2, 3))
        if rng.random() < 0.5:
            view = torch.flip(view, dims=(3,))
        opt.zero_grad()
        with amp:
            loss = F.cross_entropy(net(view.contiguous(memory_format=fmt)), y) + 0.01 * reg.loss()
        loss.backward()
        opt.step()
        with torch.no_grad():  # clip to the normalised image range, per channel
            x.data = torch.max(torch.min(x.data, (1 - mean) / std), -mean / std)
        return None
    return run


def fastdd_iteration(side: int, batch: int, device: str, compile_mode: str, memory_format: str = "auto"):
    """B: one ``SRe2L.step`` (1000 classes, IPC 1, ``batch`` classes per unit, 1000 steps per unit)."""
    path = os.path.join(tempfile.mkdtemp(prefix="fastdd-bench-teacher-"), "teacher.pth")
    torch.save(frozen_teacher(side, "cpu").state_dict(), path)
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset("bench", "train", torch.rand(CLASSES, 3, side, side, generator=g), torch.arange(CLASSES),
                      CLASSES, mean=MEAN, std=STD)
    cls = get("sre2l")
    m = cls(cls.config_cls(teacher=f"resnet18s:{path}", preset="cifar", ipc=1, batch_classes=batch,
                           iterations=1000, compile=compile_mode, memory_format=memory_format, seed=0), ds, device=device)

    def step():
        m.step()
        m.iteration += 1
    return in_fit(step)


def build_provider(name: str, side: int, batch: int, device: str, compile_mode: str):
    """Provider ``name`` (the :class:`ProcessProvider` factory)."""
    if name.startswith("reference-"):
        return reference_iteration(side, batch, device, name.split("-", 1)[1])
    if name.startswith(("fused-", "hook-")):
        bn, variant = name.split("-", 1)
        return reference_iteration(side, batch, device, bn, variant)
    if name == "fastdd-contiguous":
        return fastdd_iteration(side, batch, device, compile_mode, "contiguous")
    return fastdd_iteration(side, batch, device, compile_mode if name == "fastdd" else "off")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7 cpu / 30 cuda)")
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="provider fastdd's setting")
    ap.add_argument("--providers", nargs="+", default=None, choices=list(PROVIDERS),
                    help="default: all on CUDA, the first four on a CPU")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    check_device(device)
    a.providers = a.providers or list(PROVIDERS if device.type == "cuda" else CPU_PROVIDERS)
    if "reference-hook" not in a.providers:
        raise SystemExit("--providers: reference-hook (the baseline of the ratios) is required")
    repeats = a.repeats or (30 if device.type == "cuda" else 7)
    calls = {name: ProcessProvider(build_provider, (name, a.side, a.batch, str(device), a.compile), device)
             for name in a.providers}
    times = interleaved(calls, device, repeats)
    mems = {k: fn.peak_memory() for k, fn in calls.items()}
    for fn in calls.values():
        fn.close()
    rows = summarise("recover", {"shape": str(a.side), "ipc": str(a.batch), "batch_real": str(torch.get_num_threads())},
                     times, mems, environment(device), baseline="reference-hook")
    for r in rows:
        print(f"{MODEL} {a.side}x{a.side} batch {a.batch} {r['provider']:16s} median {r['median_ms']:9.1f} ms "
              f"(p20-p80 {r['p20_ms']}-{r['p80_ms']})  A/B {r['ratio_a_over_b']:.2f}x  peak {r['peak_mem_mb']} MiB",
              flush=True)
    if not a.no_save:
        save_results(a.out, "recover", rows, *REPORT, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
