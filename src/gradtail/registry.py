"""A small name -> factory registry, in the spirit of timm's ``register_model``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from gradtail.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories of one kind of component (loss, model, regularizer, ...)."""

    def __init__(self, kind: str, package: tuple[str, list[str]] | None = None) -> None:
        """``package``: (name, path) of a package whose modules register into this registry; they are
        imported on the first lookup (one file per family, no import list to maintain)."""
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._package = package

    def _load(self) -> None:
        if self._package is not None:
            package, self._package = self._package, None
            from gradtail.plugins import import_submodules

            import_submodules(package[0], package[1])

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@LOSSES.register("ce")`` above a class or function."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        self._load()
        try:
            return self._factories[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._factories))}"
            ) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
