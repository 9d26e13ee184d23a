"""SRe2L recover (Yin, Xing, Shen; NeurIPS 2023): images from N(0, 1) optimised against a frozen BN teacher.

The loop is :class:`fastdd.methods.recover.RecoverMethod`. Presets (spec ``lowrank_dwa_theory.md`` §2.1,
the release scripts): ``cifar`` (recover_cifar.sh: roll J=4 only, batch 100, lr 0.25, 1000 iterations,
r_bn 0.01), ``tiny`` (recover_tiny.sh: batch 100, lr 0.1, r_bn 1, 4000 iterations; the crop + flip + roll
J=4 of the Tiny scripts), ``imagenet`` (recover.sh: RRC(0.08-1) + flip + roll J=32, batch 100, lr 0.25,
4000 iterations, r_bn 0.01). First-BN multiplier 10 and r_var 1 everywhere. Roll offsets in {-J..J} by
default (``roll_offsets``; recover_tiny.py's range, while recover.sh / recover_cifar.sh draw {0..J}: see
:mod:`fastdd.methods.recover`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict

from .recover import RecoverConfig, RecoverMethod
from .registry import register

SRE2L_PRESETS = {
    "cifar": dict(iterations=1000, lr_img=0.25, batch_classes=100, r_bn=0.01, r_var=1.0, first_bn_multiplier=10.0,
                  crop=False, jitter=4),
    "tiny": dict(iterations=4000, lr_img=0.1, batch_classes=100, r_bn=1.0, r_var=1.0, first_bn_multiplier=10.0,
                 crop=True, jitter=4),
    "imagenet": dict(iterations=4000, lr_img=0.25, batch_classes=100, r_bn=0.01, r_var=1.0,
                     first_bn_multiplier=10.0, crop=True, jitter=32),
}


@dataclass
class SRe2LConfig(RecoverConfig):
    """SRe2L recover options (``None`` fields: the dataset preset, see the module docstring)."""

    presets: ClassVar[Dict[str, dict]] = SRE2L_PRESETS


@register("sre2l")
class SRe2L(RecoverMethod):
    """SRe2L recover (module docstring)."""

    config_cls = SRe2LConfig
