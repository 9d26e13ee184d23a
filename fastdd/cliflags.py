"""argparse flags generated from config dataclasses (one flag per field, help from the field's comment).

``batch_real`` -> ``--batch-real``; booleans get ``--x/--no-x``; ``List[int]`` takes several values;
``Optional[X]`` takes an ``X``. Every flag defaults to ``None`` so that only the values the user gave
override the dataclass defaults (see :func:`values_from_args`). Help text is the field's
``metadata["help"]`` or the ``# comment`` after it in the class source.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from typing import Dict, Iterable


def flag(name: str) -> str:
    """``batch_real`` -> ``--batch-real``."""
    return "--" + name.replace("_", "-")


def _comments(cls) -> Dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.M)}


def _base_type(tp):
    """(scalar type, takes a list) of an annotation: Optional[X] -> X, List[X] -> X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin is typing.Union and len(args) == 1:
        return _base_type(args[0])
    if origin in (list, tuple) and args:
        return args[0], True
    return tp, False


def add_config_flags(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: Iterable[str] = (),
                     aliases: Dict[str, str] | None = None) -> None:
    """One flag per field of dataclass ``cls`` (dest ``prefix + field``) in its own argument group."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    hints = typing.get_type_hints(cls)
    notes = _comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        dest = prefix + f.name
        names = [flag(dest)] + ([aliases[f.name]] if aliases and f.name in aliases else [])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = "required" if required else repr(f.default if f.default is not dataclasses.MISSING
                                                   else f.default_factory())
        text = f.metadata.get("help") or notes.get(f.name, "")
        help_ = f"{text} (default: {default})" if text else f"(default: {default})"
        kind, many = _base_type(hints[f.name])
        if f.metadata.get("positional"):
            group.add_argument(dest, type=kind, metavar=f.name.upper(), help=text)
        elif kind is bool:
            group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            group.add_argument(*names, dest=dest, type=kind if callable(kind) else str, default=None,
                               nargs="+" if many else None, required=required, help=help_)


def values_from_args(cls, args: argparse.Namespace, prefix: str = "", skip: Iterable[str] = ()) -> dict:
    """The field values of ``cls`` the user gave on the command line (unset flags are left out)."""
    return {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, prefix + f.name, None) is not None}
