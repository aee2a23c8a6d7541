"""Update rules (how a step's gradient is formed: plain, SAM, GBG) and the optimizers' helpers."""

from __future__ import annotations

from typing import Any

from gradtail.contracts import UpdateRule
from gradtail.registry import Registry

UPDATE_RULES: Registry[UpdateRule] = Registry("update rule", package=(__name__, __path__))
register_update_rule = UPDATE_RULES.register
register_update_rule("plain")(UpdateRule)


def create_update_rule(name: str, **kwargs: Any) -> UpdateRule:
    return UPDATE_RULES.get(name)(**kwargs)


def update_rule_names() -> list[str]:
    return UPDATE_RULES.names()


__all__ = ["UPDATE_RULES", "create_update_rule", "register_update_rule", "update_rule_names"]
