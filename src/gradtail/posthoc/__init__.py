"""Post-hoc adjusters: fit on validation logits (never test), transform logits before the argmax."""

from __future__ import annotations

from typing import Any

from gradtail.contracts import PosthocAdjuster
from gradtail.registry import Registry

POSTHOC: Registry[PosthocAdjuster] = Registry("post-hoc adjuster", package=(__name__, __path__))
register_posthoc = POSTHOC.register


def create_posthoc(name: str, **kwargs: Any) -> PosthocAdjuster:
    return POSTHOC.get(name)(**kwargs)


def posthoc_names() -> list[str]:
    return POSTHOC.names()


__all__ = ["POSTHOC", "create_posthoc", "posthoc_names", "register_posthoc"]
