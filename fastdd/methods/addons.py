"""Add-on loss terms that can be switched on over any method (e.g. MIM4DD's mutual-information term).

An add-on is built by :func:`build_addons` for every registered factory whose ``enabled(config)`` is
true. Each method computes its real and synthetic features once per iteration and calls
:meth:`fastdd.methods.base.Method.addon_loss` with them; the add-ons' own parameters (e.g. projection
heads) are stepped by :meth:`fastdd.methods.base.Method.addons_step` after the image step.

Contract of an add-on object:

* ``needs_taps`` (bool): whether it needs the per-block feature maps, not only the embedding;
* ``loss(real_emb [Nr, F], real_taps [list of [Nr, C_l, H_l, W_l]], real_labels [Nr], syn_emb [Ns, F],
  syn_taps, syn_labels [Ns]) -> 0-d tensor`` (already weighted; real inputs carry no autograd graph);
* ``zero_grad()``, ``step()``: its own optimiser, if it has parameters;
* ``state_dict()`` / ``load_state_dict(state)``: everything needed to resume exactly.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

_FACTORIES: Dict[str, Tuple[Callable, Callable]] = {}


def register_addon(name: str, enabled: Callable, factory: Callable) -> None:
    """Register ``factory(method) -> addon`` under ``name``, built when ``enabled(config)`` is true."""
    if name in _FACTORIES:
        raise ValueError(f"add-on {name!r} is already registered")
    _FACTORIES[name] = (enabled, factory)


def build_addons(method) -> dict:
    """The add-ons switched on by ``method.config``, by name."""
    return {name: factory(method) for name, (enabled, factory) in _FACTORIES.items() if enabled(method.config)}

