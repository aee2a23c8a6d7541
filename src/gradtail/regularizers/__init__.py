"""Regularizers: terms from the same forward pass added to the loss before the single backward (BGP)."""

from __future__ import annotations

from typing import Any

from gradtail.contracts import Regularizer
from gradtail.registry import Registry

REGULARIZERS: Registry[Regularizer] = Registry("regularizer", package=(__name__, __path__))
register_regularizer = REGULARIZERS.register


def create_regularizer(name: str, **kwargs: Any) -> Regularizer:
    return REGULARIZERS.get(name)(**kwargs)


def regularizer_names() -> list[str]:
    return REGULARIZERS.names()


__all__ = ["REGULARIZERS", "create_regularizer", "register_regularizer", "regularizer_names"]
