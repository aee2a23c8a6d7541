"""The search space of a method (:mod:`gradtail.tasks.spaces`, where each task's default tuning space is
gathered), re-exported for ``gradtail tune``."""

from gradtail.tasks.spaces import (
    TunedParam,
    apply_values,
    declared_search_space,
    defaults,
    describe_values,
    method_search_space,
    suggest,
)

__all__ = [
    "TunedParam",
    "apply_values",
    "declared_search_space",
    "defaults",
    "describe_values",
    "method_search_space",
    "suggest",
]
