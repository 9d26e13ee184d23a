"""Reproduce DWA (diversity-driven weight perturbation, NeurIPS 2024) with the KD protocol: fastdd vs published (GPU; not run on CPU).

Recovers IPC sets from real-image starts against a BatchNorm teacher with DWA's dataset preset
(CIFAR-100 / Tiny-ImageNet / ImageNet-1K: r_var, rho 0.015, K 12/15, spec ``lowrank_dwa_theory.md``
§2.2) and evaluates them with the KD protocol (the dataset's KD preset, DWA's recipe: the teacher online)
against their initial real images. Published ResNet-18 top-1 [IMG DWA Tables 1-2]: CIFAR-100 IPC 10
39.6, IPC 50 60.9; Tiny-ImageNet IPC 50 52.8, IPC 100 56.0; ImageNet-1K IPC 10 37.9, IPC 50 55.2,
IPC 100 59.2. Rows go to ``benchmarks/results/reproduce_dwa.md``.

    python benchmarks/reproduce_dwa.py --dataset cifar100 --teacher runs/c100_teacher --ipc 10 50
    python benchmarks/reproduce_dwa.py --dataset imagefolder --data-path /data/imagenet --image-size 224 \\
        --teacher resnet18:resnet18-f37072fd.pth --student TVResNet18 --ipc 10 50
    python benchmarks/reproduce_dwa.py --smoke        # a trivial CPU run on digits
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _reproduce import recover_main  # noqa: E402

PUBLISHED = {"cifar100": {10: "39.6", 50: "60.9"}, "tiny-imagenet": {50: "52.8", 100: "56.0"},
             "imagefolder": {10: "37.9", 50: "55.2", 100: "59.2"}}


def main(argv=None) -> int:
    return recover_main("dwa", PUBLISHED, "DWA: fastdd vs published", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
