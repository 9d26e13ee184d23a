"""Distillation methods, looked up by name through a registry (see :mod:`fastdd.methods.registry`)."""
from .registry import get, names, register
from .base import Method, MethodConfig
from . import dm  # noqa: F401  (registers "dm")
from . import ddm  # noqa: F401  (registers "ddm")
from . import mim4dd  # noqa: F401  (registers the "mim" add-on and "mim4dd")

__all__ = ["get", "names", "register", "Method", "MethodConfig"]
