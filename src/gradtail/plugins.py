"""Import every module of a package so its ``@register`` decorators run (one file per family)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_submodules(package_name: str, package_path: Iterable[str], skip: tuple[str, ...] = ()) -> None:
    for info in pkgutil.iter_modules(package_path):
        if info.name not in skip and not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
