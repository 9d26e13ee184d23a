"""Distillation methods, looked up by name through a registry (see :mod:`fastdd.methods.registry`)."""
from . import (
    dance,  # noqa: F401  (registers "dance")
    dc,  # noqa: F401  (registers "dc" and "dsa")
    ddm,  # noqa: F401  (registers "ddm")
    dm,  # noqa: F401  (registers "dm")
    mim4dd,  # noqa: F401  (registers the "mim" add-on and "mim4dd")
)
from .base import Method, MethodConfig
from .registry import get, names, register

__all__ = ["get", "names", "register", "Method", "MethodConfig"]
