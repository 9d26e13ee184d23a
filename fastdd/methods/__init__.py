"""Distillation methods, looked up by name through a registry (see :mod:`fastdd.methods.registry`)."""
from . import (
    dance,  # noqa: F401  (registers "dance")
    dc,  # noqa: F401  (registers "dc" and "dsa")
    ddm,  # noqa: F401  (registers "ddm")
    dm,  # noqa: F401  (registers "dm")
    dwa,  # noqa: F401  (registers "dwa")
    mim4dd,  # noqa: F401  (registers the "mim" add-on and "mim4dd")
    sre2l,  # noqa: F401  (registers "sre2l")
)
from .base import Method, MethodConfig
from .registry import get, names, register

__all__ = ["get", "names", "register", "Method", "MethodConfig"]
