"""Provider A of the end-to-end benchmarks: the *structure* of the research code fastdd replaces.

Written from the description of the reference loop (not copied from it), so that its cost structure is
the reference's:

* :class:`RefConvNet`: ConvNet-3 as the reference builds it (``Conv2d -> GroupNorm(C, C) ->
  ReLU(inplace=True) -> AvgPool2d(2)`` per block, padding 3 on the first conv for 1x28x28), built afresh
  every iteration (here without a random draw at construction, then initialised from a generator);
* :func:`ref_diff_augment`: DSA in mode 'S' (one op family per call, chosen after a reseed), a reseed
  before every elementary op, per-sample parameters, one ``affine_grid`` / ``grid_sample`` per geometric
  op (scale, rotate), crop by an index gather on a padded copy, cutout by a mask;
* :func:`ref_dm_iteration`: per class one real draw (a permutation of the class's indices), one
  augmentation and one forward per side, the squared mean-embedding distance summed over classes, one
  backward and one SGD step on the synthetic pixels.

Every random number comes from an explicit ``torch.Generator`` reseeded the way the reference reseeds
its global RNG (``seed + k`` for the k-th elementary op of a call), so real and synthetic images of one
class share the transform.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from fastdd.models import init_parameters

STRATEGY = ("color", "crop", "cutout", "flip", "scale", "rotate")


class RefConvNet(nn.Module):
    """ConvNet-3, width 128, instance norm, in-place ReLU, average pooling; ``embed`` -> [N, 2048]."""

    def __init__(self, channel: int, num_classes: int, im_size, width: int = 128, depth: int = 3):
        super().__init__()
        layers: List[nn.Module] = []
        c, (h, w) = channel, im_size
        for d in range(depth):
            pad = 3 if (d == 0 and channel == 1 and h == 28) else 1
            layers += [nn.Conv2d(c, width, 3, padding=pad, device="meta"),
                       nn.GroupNorm(width, width, affine=True, device="meta"),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            c, h, w = width, (h + 2 * pad - 2) // 2, (w + 2 * pad - 2) // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * h * w, num_classes, device="meta")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


def fresh_net(channel, num_classes, im_size, generator: torch.Generator, device) -> RefConvNet:
    """A new :class:`RefConvNet` on ``device`` (parameters allocated now, drawn from ``generator``)."""
    net = RefConvNet(channel, num_classes, im_size).to_empty(device=device)
    init_parameters(net, generator)
    net.train()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class _Seeded:
    """The reference's reseeding: every elementary op draws from a generator reset to ``seed + k``."""

    def __init__(self, seed, device, generator=None):
        self.seed, self.k = seed, 0
        self.g = generator if seed is None else torch.Generator(device=device)

    def next(self) -> torch.Generator:
        if self.seed is None:  # evaluation: no reseed, one stream
            return self.g
        self.k += 1
        return self.g.manual_seed(self.seed + self.k)


def _affine(x, theta):
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def ref_diff_augment(x: torch.Tensor, seed, generator=None) -> torch.Tensor:
    """One DSA call in mode 'S' on x [N, C, H, W] with the reference's cost structure (module docstring);
    ``seed=None``: no reseeding, draws from ``generator`` (the reference's evaluation, seed -1)."""
    n, c, h, w = x.shape
    dev = x.device
    rng = _Seeded(seed, dev, generator)
    op = STRATEGY[int(torch.randint(0, len(STRATEGY), (1,), generator=rng.next(), device=dev))]
    if op == "color":
        x = x + (torch.rand(n, 1, 1, 1, generator=rng.next(), device=dev) - 0.5)
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (torch.rand(n, 1, 1, 1, generator=rng.next(), device=dev) * 2.0) + m
        m = x.mean(dim=[1, 2, 3], keepdim=True)
        x = (x - m) * (torch.rand(n, 1, 1, 1, generator=rng.next(), device=dev) + 0.5) + m
    elif op == "crop":
        sy, sx = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
        tx = torch.randint(-sx, sx + 1, (n, 1, 1), generator=rng.next(), device=dev)
        ty = torch.randint(-sy, sy + 1, (n, 1, 1), generator=rng.next(), device=dev)
        gb, gy, gx = torch.meshgrid(torch.arange(n, device=dev), torch.arange(h, device=dev),
                                    torch.arange(w, device=dev), indexing="ij")
        gy = torch.clamp(gy + ty + 1, 0, h + 1)
        gx = torch.clamp(gx + tx + 1, 0, w + 1)
        padded = F.pad(x, [1, 1, 1, 1])
        x = padded.permute(0, 2, 3, 1).contiguous()[gb, gy, gx].permute(0, 3, 1, 2)
    elif op == "cutout":
        cy, cx = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
        ox = torch.randint(0, w + (1 - cx % 2), (n, 1, 1), generator=rng.next(), device=dev)
        oy = torch.randint(0, h + (1 - cy % 2), (n, 1, 1), generator=rng.next(), device=dev)
        gb, gy, gx = torch.meshgrid(torch.arange(n, device=dev), torch.arange(cy, device=dev),
                                    torch.arange(cx, device=dev), indexing="ij")
        gy = torch.clamp(gy + oy - cy // 2, 0, h - 1)
        gx = torch.clamp(gx + ox - cx // 2, 0, w - 1)
        mask = torch.ones(n, h, w, dtype=x.dtype, device=dev)
        mask[gb, gy, gx] = 0
        x = x * mask.unsqueeze(1)
    elif op == "flip":
        r = torch.rand(n, 1, 1, 1, generator=rng.next(), device=dev)
        x = torch.where(r < 0.5, x.flip(3), x)
    elif op == "scale":
        sx = torch.rand(n, generator=rng.next(), device=dev) * (1.2 - 1 / 1.2) + 1 / 1.2
        sy = torch.rand(n, generator=rng.next(), device=dev) * (1.2 - 1 / 1.2) + 1 / 1.2
        z = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, z, z], 1), torch.stack([z, sy, z], 1)], 1)
        x = _affine(x, theta)
    else:  # rotate
        a = (torch.rand(n, generator=rng.next(), device=dev) - 0.5) * 2 * 15 / 180 * math.pi
        z = torch.zeros_like(a)
        theta = torch.stack([torch.stack([a.cos(), a.sin(), z], 1), torch.stack([-a.sin(), a.cos(), z], 1)], 1)
        x = _affine(x, theta)
    return x


def make_ref_dm_iteration(real_pool, pool_labels, num_classes, ipc, batch_real, generator, *, dsa=True):
    """Zero-argument callable: one reference-structure DM iteration (module docstring); returns the loss."""
    device = real_pool.device
    channel, h, w = real_pool.shape[1:]
    class_index = [torch.nonzero(pool_labels == c).flatten() for c in range(num_classes)]
    syn = real_pool[torch.cat([ix[:ipc] for ix in class_index])].clone().requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=1.0, momentum=0.5)

    def iteration():
        net = fresh_net(channel, num_classes, (h, w), generator, device)
        loss = torch.zeros((), device=device)
        for c in range(num_classes):
            ix = class_index[c]
            real = real_pool[ix[torch.randperm(ix.numel(), generator=generator, device=device)[:batch_real]]]
            s = syn[c * ipc:(c + 1) * ipc]
            if dsa:
                seed = int(torch.randint(0, 100000, (1,), generator=generator, device=device))
                real = ref_diff_augment(real, seed)
                s = ref_diff_augment(s, seed)
            out_real = net.embed(real).detach()
            out_syn = net.embed(s)
            loss = loss + ((out_real.mean(0) - out_syn.mean(0)) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    return iteration


def ref_evaluate(images, labels, test_images, test_labels, num_classes, epochs, generator, *, lr=0.01,
                 batch_size=256, test_batch=256) -> float:
    """The reference's evaluation of one model, sequential: a fresh RefConvNet-style network (trainable),
    SGD (momentum 0.9, wd 5e-4), ``epochs + 1`` passes, lr x0.1 (new optimizer) after pass epochs // 2 + 1,
    per-sample DSA per mini-batch, then the test set in batches of ``test_batch``; returns accuracy in %."""
    device = images.device
    net = fresh_net(images.shape[1], num_classes, tuple(images.shape[2:]), generator, device)
    for p in net.parameters():
        p.requires_grad_(True)

    def forward(x):
        return net.classifier(net.embed(x))

    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    n = images.shape[0]
    for ep in range(epochs + 1):
        if ep == epochs // 2 + 1:
            opt = torch.optim.SGD(net.parameters(), lr=lr * 0.1, momentum=0.9, weight_decay=5e-4)
        net.train()
        order = torch.randperm(n, generator=generator, device=device)
        for start in range(0, n, batch_size):
            ix = order[start:start + batch_size]
            x = ref_diff_augment(images[ix], None, generator)
            loss = F.cross_entropy(forward(x), labels[ix])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, test_images.shape[0], test_batch):
            out = forward(test_images[start:start + test_batch])
            correct += int((out.argmax(1) == test_labels[start:start + test_batch]).sum())
    return 100.0 * correct / test_images.shape[0]
