"""A small name -> factory registry, in the spirit of timm's ``register_model``, and the check of a
config's parameter mapping against a factory's signature (:func:`check_call_params`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, Generic, TypeVar

from gradtail.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories of one kind of component (loss, model, regularizer, ...)."""

    def __init__(self, kind: str, package: tuple[str, list[str]] | None = None) -> None:
        """``package``: (name, path) of a package whose modules register into this registry; they are
        imported on the first lookup (one file per family, no import list to maintain)."""
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._package = package
        # prefix -> (resolver, reserved parameters, description): names ``prefix:<rest>`` (``timm:resnet18``)
        self._prefixes: dict[str, tuple[Callable[[str], Callable[..., T]], dict[str, str], str]] = {}

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

    def register_prefix(
        self,
        prefix: str,
        resolver: Callable[[str], Callable[..., T]],
        reserved: Mapping[str, str] | None = None,
        description: str = "",
    ) -> None:
        """Accept every name ``prefix:<rest>`` without registering each: :meth:`get` returns
        ``resolver(rest)`` (which raises :class:`ConfigError` for a ``rest`` it does not know).
        ``reserved``: parameters those factories take through ``**kwargs`` that a config may not set,
        mapped to where their value comes from (added to :meth:`check_params`' ``reserved``);
        ``description``: one line for listings (:meth:`prefix_descriptions`)."""
        if prefix in self._prefixes or ":" in prefix:
            raise ValueError(f"{self.kind} prefix {prefix!r} is registered twice or contains ':'")
        self._prefixes[prefix] = (resolver, dict(reserved or {}), description or f"{prefix}:<name>")

    def _prefix_of(self, name: str) -> str | None:
        """The registered prefix of ``name`` (``"timm"`` for ``"timm:resnet18"``), else None."""
        prefix, sep, _ = name.partition(":")
        return prefix if sep and prefix in self._prefixes else None

    def get(self, name: str) -> Callable[..., T]:
        self._load()
        if name in self._factories:
            return self._factories[name]
        prefix = self._prefix_of(name) if isinstance(name, str) else None
        if prefix is not None:
            return self._prefixes[prefix][0](name[len(prefix) + 1 :])
        patterns = "".join(f", {p}:<name>" for p in sorted(self._prefixes))
        raise ConfigError(
            f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._factories))}{patterns}"
            f"{did_you_mean(name, self._factories)}"
        )

    def names(self) -> list[str]:
        """The registered names (names accepted through a prefix are not listed: see
        :meth:`prefix_descriptions`)."""
        self._load()
        return sorted(self._factories)

    def prefix_descriptions(self) -> list[str]:
        """One line per registered prefix (``timm:<name>``: what it accepts)."""
        self._load()
        return [self._prefixes[p][2] for p in sorted(self._prefixes)]

    def parameter_names(self, name: str) -> list[str]:
        """The keyword parameters of the factory registered as ``name``, in signature order (``[]`` when
        its signature cannot be read)."""
        return _keyword_parameters(self.get(name))[0]

    def check_params(
        self,
        name: str,
        params: Mapping[str, Any],
        key: str,
        reserved: Mapping[str, str] | None = None,
        extra: Collection[str] = (),
    ) -> dict[str, Any]:
        """Check the config mapping ``params`` (at config key ``key``) that goes to the factory registered
        as ``name``; an unknown name is the :meth:`get` error. See :func:`check_call_params` for
        ``reserved`` and ``extra`` and for what is returned (the entries the factory's ``**kwargs`` takes).
        A name accepted through a prefix also reserves that prefix's parameters (:meth:`register_prefix`)."""
        factory = self.get(name)
        prefix = self._prefix_of(name)
        if prefix is not None:
            reserved = {**self._prefixes[prefix][1], **(reserved or {})}
        return check_call_params(
            factory, params, key, f"{self.kind} {name!r}", reserved=reserved, extra=extra
        )

    def __contains__(self, name: object) -> bool:
        self._load()
        if name in self._factories:
            return True
        if not isinstance(name, str) or self._prefix_of(name) is None:
            return False
        try:
            self.get(name)
        except ConfigError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _keyword_parameters(factory: Callable[..., Any]) -> tuple[list[str], list[str], bool]:
    """(keyword parameters, those without a default, whether it takes ``**kwargs``) of ``factory``; for a
    class, of its ``__init__``. A signature that cannot be read gives ``([], [], True)``: anything goes."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return [], [], True
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in signature.parameters.values() if p.kind in keyword]
    required = [
        p.name
        for p in signature.parameters.values()
        if p.kind in keyword and p.default is inspect.Parameter.empty
    ]
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    return names, required, takes_kwargs


def check_call_params(
    factory: Callable[..., Any],
    params: Mapping[str, Any],
    key: str,
    what: str,
    reserved: Mapping[str, str] | None = None,
    extra: Collection[str] = (),
) -> dict[str, Any]:
    """Check the config mapping ``params`` (config key ``key``, e.g. ``"loss.params"``) that will be passed
    as keyword arguments to ``factory`` (``what`` names it in messages, e.g. ``"loss 'ldam'"``).

    ``reserved`` maps the arguments the caller passes itself to where their value comes from (``{"head":
    "model.head"}``); ``extra`` names keys that the caller takes out before calling the factory (listed
    as valid). :class:`ConfigError`, one line, for: a key that is not a parameter of ``factory`` (unless
    it takes ``**kwargs``), naming the full key and listing the valid ones; a reserved key; a parameter
    without a default that neither ``params`` nor the caller gives.

    Returns the entries of ``params`` that only the factory's ``**kwargs`` takes (it forwards them where
    this check cannot see; a caller that knows where may check them), ``{}`` for a factory without it.
    """
    if not isinstance(params, Mapping):
        raise ConfigError(f"config key {key!r}: expected a mapping of parameters, got {params!r}")
    reserved = reserved or {}
    names, required, takes_kwargs = _keyword_parameters(factory)
    valid = [n for n in names if n not in reserved] + [n for n in extra if n not in names]
    forwarded: dict[str, Any] = {}
    for name, value in params.items():
        full = f"{key}.{name}"
        if name in reserved:
            raise ConfigError(
                f"config key {full!r} cannot be set: {what} gets {name!r} from {reserved[name]}"
            )
        if name in valid:
            continue
        if not takes_kwargs:
            listing = f"valid keys in {key}: {', '.join(valid)}" if valid else f"{what} takes no parameters"
            raise ConfigError(f"unknown config key {full!r} ({what}{did_you_mean(name, valid)}); {listing}")
        forwarded[name] = value
    missing = [n for n in required if n not in params and n not in reserved]
    if missing:
        raise ConfigError(f"config key {key!r} lacks {', '.join(map(repr, missing))}, required by {what}")
    return forwarded
