"""Plugin registry: add-ons (e.g. MIM4DD's term) and parameterisations (e.g. low-rank factors) register
their own flat config dataclass and validator here.

A plugin module imports only lower layers (ops, matchers, models, data, validation; never
``fastdd.methods``). :class:`fastdd.methods.base.MethodConfig` inherits every registered plugin config
(so ``--rank``, ``--mim-weight``, ... stay flat CLI flags and keyword arguments) and its ``validate()``
calls :func:`validate_plugins`, which runs each registered validator.
"""
from __future__ import annotations

from . import lowrank_config, mim_config  # noqa: F401  (register the built-in plugins)
from .registry import config_classes, plugin_names, register_config, validate_plugins

__all__ = ["config_classes", "plugin_names", "register_config", "validate_plugins"]
