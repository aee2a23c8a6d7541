"""Regularizers: terms from the same forward pass added to the loss before the single backward (BGP)."""

from __future__ import annotations

from typing import Any

from gradtail.engine.interfaces import Regularizer
from gradtail.plugins import import_submodules
from gradtail.registry import Registry

REGULARIZERS: Registry[Regularizer] = Registry("regularizer")
register_regularizer = REGULARIZERS.register


def create_regularizer(name: str, **kwargs: Any) -> Regularizer:
    import_submodules(__name__, __path__)
    return REGULARIZERS.get(name)(**kwargs)


def regularizer_names() -> list[str]:
    import_submodules(__name__, __path__)
    return REGULARIZERS.names()


__all__ = ["REGULARIZERS", "create_regularizer", "register_regularizer", "regularizer_names"]
