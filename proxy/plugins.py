"""User route predicates: ``mypkg.rules:is_vip`` imported once at config time."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from proxy.message import Message

Predicate = Callable[[Message], object]


def load_plugin(spec: str) -> Predicate:
    """Import ``module:attribute``; raises ValueError (turned into a ConfigError by the caller)."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError("expected 'module.path:callable'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a config error
        raise ValueError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    target: object = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable")
    predicate: Predicate = target
    return predicate
