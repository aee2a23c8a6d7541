"""Post-hoc adjusters: fit on validation logits (never test), transform logits before the argmax."""

from __future__ import annotations

from typing import Any

from gradtail.engine.interfaces import PosthocAdjuster
from gradtail.plugins import import_submodules
from gradtail.registry import Registry

POSTHOC: Registry[PosthocAdjuster] = Registry("post-hoc adjuster")
register_posthoc = POSTHOC.register


def create_posthoc(name: str, **kwargs: Any) -> PosthocAdjuster:
    import_submodules(__name__, __path__)
    return POSTHOC.get(name)(**kwargs)


def posthoc_names() -> list[str]:
    import_submodules(__name__, __path__)
    return POSTHOC.names()


__all__ = ["POSTHOC", "create_posthoc", "posthoc_names", "register_posthoc"]
