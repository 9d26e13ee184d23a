"""Registry of plugin config dataclasses and validators (see :mod:`fastdd.plugins`)."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

_CONFIGS: Dict[str, Tuple[type, Callable]] = {}


def register_config(name: str, config_cls: type, validator: Callable) -> None:
    """Register plugin ``name``'s config dataclass and ``validator(config)`` (raises ``ValueError``)."""
    if name in _CONFIGS:
        raise ValueError(f"plugin {name!r} is already registered")
    _CONFIGS[name] = (config_cls, validator)


def config_classes() -> List[type]:
    """The registered plugin config dataclasses, in registration order."""
    return [cls for cls, _ in _CONFIGS.values()]


def validate_plugins(config) -> None:
    """Run every registered plugin validator on ``config``."""
    for _, validator in _CONFIGS.values():
        validator(config)


def plugin_names() -> List[str]:
    return list(_CONFIGS)
