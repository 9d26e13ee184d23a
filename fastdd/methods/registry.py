"""Method registry: distillation methods register themselves by name.

``fastdd.methods.get("dm")`` returns the class; ``names()`` lists what is registered. New methods
(DANCE, DDM, ...) add a module with ``@register("name")`` and an import in ``fastdd/methods/__init__``;
nothing else (CLI included) needs to change.
"""
from __future__ import annotations

from typing import Dict, Type

_METHODS: Dict[str, type] = {}


def register(name: str):
    """Class decorator registering a :class:`~fastdd.methods.base.Method` subclass under ``name``."""

    def decorator(cls):
        key = name.lower()
        if key in _METHODS and _METHODS[key] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[key].__qualname__}")
        _METHODS[key] = cls
        cls.name = key
        return cls

    return decorator


def get(name: str) -> Type:
    """The method class registered under ``name`` (case-insensitive)."""
    try:
        return _METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(_METHODS)}") from None


def names() -> list:
    """Sorted names of the registered methods."""
    return sorted(_METHODS)
