"""Training-set samplers: instance, class-balanced, square-root, progressively balanced
(docs/methods/baselines.md).

A sampler is a pure function ``(seed, epoch, rank, world) -> indices`` (docs/methods/design.md): every rank
builds the same *global order* for an epoch from a private ``torch.Generator`` seeded with a hash of ``(seed,
epoch)`` (the global RNGs are never touched), then keeps its own disjoint part of it. So multi-process
training needs no communication, and a resumed run redraws exactly the same order.

Rank split: the global order is truncated to a multiple of ``world_size`` and rank ``r`` takes the
strided slice ``order[r::world_size]``; every rank gets the same number of samples and, together,
the ranks cover the truncated order exactly once (at most ``world_size - 1`` draws are dropped).

All class-aware samplers draw a class for every slot from their class distribution
(``torch.multinomial``), then an image of that class uniformly (with replacement). Classes without
images get probability 0; "balanced" means uniform over the classes that have images.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gradtail.errors import ConfigError, DataError
from gradtail.registry import Registry


def sampler_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from ``(seed, epoch)`` (SHA-256, identical on every process and run)."""
    digest = hashlib.sha256(f"gradtail.sampler:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class Sampler:
    """Base class: holds the labels, the class counts and the epoch length ``num_samples``.

    Subclasses implement :meth:`_draw` (one epoch's global order from a generator) and
    :meth:`class_probs` (the expected class frequencies of one draw).
    """

    name = "sampler"

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        num_classes: int,
        seed: int = 0,
        num_samples: int | None = None,
    ) -> None:
        self.num_classes = _check_int("num_classes", num_classes, 1)
        self.seed = _check_int("seed", seed, 0)
        y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
        if y.dim() != 1 or y.numel() == 0:
            raise DataError(f"sampler labels must be a non-empty 1-D sequence, got shape {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise DataError(f"sampler labels must be integers, got {y.dtype}")
        y = y.detach().to("cpu", torch.int64)
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= self.num_classes:
            raise DataError(f"label {lo if lo < 0 else hi} is outside [0, {self.num_classes})")
        self.labels = y
        self.class_counts = torch.bincount(y, minlength=self.num_classes)
        self.num_samples = (
            int(y.numel()) if num_samples is None else _check_int("num_samples", num_samples, 1)
        )
        # Images grouped by class (stable, so dataset order within a class) and each class's offset.
        self._by_class = torch.argsort(y, stable=True)
        self._starts = torch.cumsum(self.class_counts, 0) - self.class_counts

    def __len__(self) -> int:
        return self.num_samples

    def generator(self, epoch: int) -> torch.Generator:
        """The private generator of ``epoch`` (seeded by :func:`sampler_seed`)."""
        return torch.Generator().manual_seed(sampler_seed(self.seed, epoch))

    def class_probs(self, epoch: int) -> torch.Tensor:  # pragma: no cover - interface
        """Expected class frequencies of one draw at ``epoch`` (float64, sums to 1)."""
        raise NotImplementedError

    def _draw(self, epoch: int, gen: torch.Generator) -> torch.Tensor:
        """One epoch's draw: a class from :meth:`class_probs`, then one of its images uniformly."""
        return self._draw_by_class(self.class_probs(epoch), gen)

    def global_order(self, epoch: int) -> torch.Tensor:
        """All ``num_samples`` indices of ``epoch`` (int64, CPU), the same on every rank."""
        epoch = _check_int("epoch", epoch, 0)
        return self._draw(epoch, self.generator(epoch))

    def num_samples_per_rank(self, world_size: int = 1) -> int:
        """Length of each rank's slice: ``num_samples // world_size``."""
        world_size = _check_int("world_size", world_size, 1)
        if self.num_samples < world_size:
            raise ConfigError(f"num_samples={self.num_samples} is smaller than world_size={world_size}")
        return self.num_samples // world_size

    def indices(self, epoch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank ``rank``'s part of the epoch: ``order[:n][rank::world_size]``, ``n`` a multiple of world."""
        per_rank = self.num_samples_per_rank(world_size)
        rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        order = self.global_order(epoch)
        return order[: per_rank * world_size][rank::world_size].contiguous()

    def _draw_by_class(self, probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``num_samples`` classes from ``probs``, then an image of each drawn class uniformly."""
        cls = torch.multinomial(probs, self.num_samples, replacement=True, generator=gen)
        sizes = self.class_counts[cls]
        u = torch.rand(self.num_samples, generator=gen, dtype=torch.float64)
        offset = torch.minimum((u * sizes).long(), sizes - 1)
        return self._by_class[self._starts[cls] + offset]

    def _present(self) -> torch.Tensor:
        return (self.class_counts > 0).to(torch.float64)


SAMPLERS: Registry[Sampler] = Registry("sampler")


@SAMPLERS.register("instance")
class InstanceSampler(Sampler):
    """Instance-balanced: a uniform random permutation (fresh permutations if ``num_samples > N``)."""

    name = "instance"

    def class_probs(self, epoch: int) -> torch.Tensor:
        return self.class_counts.to(torch.float64) / self.labels.numel()

    def _draw(self, epoch: int, gen: torch.Generator) -> torch.Tensor:
        n = self.labels.numel()
        reps = -(-self.num_samples // n)
        perms = [torch.randperm(n, generator=gen) for _ in range(reps)]
        return torch.cat(perms)[: self.num_samples]


@SAMPLERS.register("class_balanced")
class ClassBalancedSampler(Sampler):
    """Class-balanced: a class uniformly, then one of its images uniformly."""

    name = "class_balanced"

    def class_probs(self, epoch: int) -> torch.Tensor:
        present = self._present()
        return present / present.sum()


@SAMPLERS.register("power")
class PowerSampler(Sampler):
    """Class probability proportional to ``n_j ** power`` (0: balanced, 1: instance, 0.5: square-root)."""

    name = "power"

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        num_classes: int,
        seed: int = 0,
        num_samples: int | None = None,
        power: float = 0.5,
    ) -> None:
        super().__init__(labels, num_classes, seed=seed, num_samples=num_samples)
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0.0 <= power <= 1.0:
            raise ConfigError(f"power must be a number in [0, 1], got {power!r}")
        self.power = float(power)

    def class_probs(self, epoch: int) -> torch.Tensor:
        w = self.class_counts.to(torch.float64).pow(self.power) * self._present()
        return w / w.sum()


@SAMPLERS.register("sqrt")
class SqrtSampler(PowerSampler):
    """Square-root sampling: class probability proportional to ``sqrt(n_j)``."""

    name = "sqrt"

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        num_classes: int,
        seed: int = 0,
        num_samples: int | None = None,
    ) -> None:
        super().__init__(labels, num_classes, seed=seed, num_samples=num_samples, power=0.5)


@SAMPLERS.register("progressive")
class ProgressiveSampler(Sampler):
    """Progressively balanced (Kang et al. 2020): ``p_j(t) = (1 - t/T) n_j/N + (t/T) / C``.

    ``t`` is the epoch, ``T`` = ``total_epochs``; ``t/T`` is clamped to [0, 1], so epochs past ``T``
    stay balanced. ``C`` counts the classes that have images.
    """

    name = "progressive"

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        num_classes: int,
        seed: int = 0,
        num_samples: int | None = None,
        total_epochs: int | None = None,
    ) -> None:
        super().__init__(labels, num_classes, seed=seed, num_samples=num_samples)
        if total_epochs is None:
            raise ConfigError("the progressive sampler needs total_epochs (T in p_j(t))")
        self.total_epochs = _check_int("total_epochs", total_epochs, 1)

    def class_probs(self, epoch: int) -> torch.Tensor:
        epoch = _check_int("epoch", epoch, 0)
        a = min(epoch / self.total_epochs, 1.0)
        instance = self.class_counts.to(torch.float64) / self.labels.numel()
        present = self._present()
        balanced = present / present.sum()
        return (1.0 - a) * instance + a * balanced


def create_sampler(
    name: str,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    num_classes: int,
    seed: int = 0,
    **kwargs: Any,
) -> Sampler:
    """Build a registered sampler: ``instance``, ``class_balanced``, ``sqrt``, ``power``, ``progressive``.

    ``kwargs``: ``num_samples`` (all), ``power`` (power), ``total_epochs`` (progressive, required).
    Unknown names or arguments raise :class:`ConfigError`.

    Example:
        >>> from gradtail.data.samplers import create_sampler
        >>> labels = [0] * 90 + [1] * 9 + [2] * 1
        >>> sampler = create_sampler("class_balanced", labels, num_classes=3, seed=0)
        >>> len(sampler), [round(p, 3) for p in sampler.class_probs(epoch=0).tolist()]
        (100, [0.333, 0.333, 0.333])
        >>> rank0 = sampler.indices(epoch=0, rank=0, world_size=2)  # disjoint halves of one global order
        >>> rank1 = sampler.indices(epoch=0, rank=1, world_size=2)
        >>> len(rank0), len(rank1), rank0.tolist() == sampler.indices(0, 0, 2).tolist()
        (50, 50, True)
        >>> sqrt = create_sampler("sqrt", labels, num_classes=3)
        >>> [round(p, 3) for p in sqrt.class_probs(epoch=0).tolist()]
        [0.703, 0.222, 0.074]
    """
    factory = SAMPLERS.get(name)
    try:
        inspect.signature(factory).bind(labels, num_classes, seed=seed, **kwargs)
    except TypeError as e:
        raise ConfigError(f"sampler {name!r}: {e}") from None
    return factory(labels, num_classes, seed=seed, **kwargs)


class RepeatFactorSampler:
    """Repeat-factor sampling for detection (LVIS; docs/methods/eql.md §9, "Repeat-factor sampling").

    With f(c) the fraction of training images that contain category c (empty images count in the
    denominator), r(c) = max(1, sqrt(t / f(c))) and an image's factor r(I) = max over its categories
    (1 for an image without categories). Each epoch image I appears floor(r(I)) times, plus once more with
    probability r(I) - floor(r(I)) (stochastic rounding, redrawn every epoch); the repeated list is then
    shuffled. Both draws use a private generator seeded by :func:`sampler_seed` ``(seed, epoch)``, so the
    order is a pure function of ``(seed, epoch)``: every rank builds the same global order without
    communication and takes ``order[:k * world][rank::world]`` (as :class:`Sampler`; at most
    ``world - 1`` draws dropped). The epoch length therefore changes from epoch to epoch.

    Args:
        image_categories: per image, the categories it contains (any iterable of ints; duplicates, e.g.
            several boxes of one class, count once), or a flat sequence of one int per image.
        threshold: t (0.001 in the LVIS recipes); must be > 0.
        seed: the run's sampler seed.

    Example:
        >>> from gradtail.data.samplers import RepeatFactorSampler
        >>> rfs = RepeatFactorSampler([[0], [0], [0], [0, 1]], threshold=1.0, seed=0)
        >>> [round(r, 3) for r in rfs.repeat_factors().tolist()]  # f(0) = 1, f(1) = 1/4: r(1) = 2
        [1.0, 1.0, 1.0, 2.0]
        >>> sorted(rfs.global_order(epoch=0).tolist())  # integer factors: no randomness in the counts
        [0, 1, 2, 3, 3]
    """

    name = "repeat_factor"

    def __init__(
        self,
        image_categories: Sequence[Sequence[int]] | Sequence[int] | np.ndarray,
        threshold: float = 0.001,
        seed: int = 0,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ConfigError(f"repeat-factor threshold t must be a number > 0, got {threshold!r}")
        self.threshold = float(threshold)
        self.seed = _check_int("seed", seed, 0)
        cats: list[set[int]] = []
        for i, entry in enumerate(image_categories):
            items = [entry] if isinstance(entry, (int, np.integer)) else list(entry)
            if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in items):
                raise DataError(f"repeat-factor sampler: image {i} has non-integer categories {items!r}")
            cats.append({int(c) for c in items})
        if not cats:
            raise DataError("repeat-factor sampler: no images")
        self.image_categories = cats
        self.num_images = len(cats)
        counts: dict[int, int] = {}
        for entry in cats:
            for c in entry:
                counts[c] = counts.get(c, 0) + 1
        self.image_counts = counts  # category -> number of images that contain it

    def category_factors(self) -> dict[int, float]:
        """r(c) = max(1, sqrt(t / f(c))), f(c) = images containing c / all images."""
        n = self.num_images
        return {c: max(1.0, (self.threshold / (k / n)) ** 0.5) for c, k in sorted(self.image_counts.items())}

    def repeat_factors(self) -> torch.Tensor:
        """r(I) = max over the image's categories of r(c) (1 for an image without any), float64 (N,)."""
        rc = self.category_factors()
        return torch.tensor(
            [max((rc[c] for c in entry), default=1.0) for entry in self.image_categories], dtype=torch.float64
        )

    def generator(self, epoch: int) -> torch.Generator:
        """The private generator of ``epoch`` (seeded by :func:`sampler_seed`)."""
        return torch.Generator().manual_seed(sampler_seed(self.seed, epoch))

    def global_order(self, epoch: int) -> torch.Tensor:
        """The epoch's repeated and shuffled image indices (int64, CPU), identical on every rank."""
        epoch = _check_int("epoch", epoch, 0)
        gen = self.generator(epoch)
        r = self.repeat_factors()
        base = torch.floor(r)
        u = torch.rand(r.shape[0], generator=gen, dtype=torch.float64)
        reps = (base + (u < r - base).to(torch.float64)).long()  # stochastic rounding
        repeated = torch.repeat_interleave(torch.arange(r.shape[0]), reps)
        return repeated[torch.randperm(repeated.numel(), generator=gen)]

    def indices(self, epoch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank ``rank``'s part of the epoch: ``order[:n][rank::world_size]``, ``n`` a multiple of world."""
        world_size = _check_int("world_size", world_size, 1)
        rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        order = self.global_order(epoch)
        per_rank = order.numel() // world_size
        if per_rank == 0:
            raise ConfigError(f"epoch {epoch} has {order.numel()} draws, fewer than world_size={world_size}")
        return order[: per_rank * world_size][rank::world_size].contiguous()


@SAMPLERS.register("repeat_factor")
def repeat_factor_sampler(
    labels: Sequence[Sequence[int]] | Sequence[int] | np.ndarray, num_classes: int, seed: int = 0,
    threshold: float = 0.001,
) -> RepeatFactorSampler:
    """:class:`RepeatFactorSampler` as a registered sampler: ``labels`` are each image's categories (a
    detection run's) or one label per image (classification); ``threshold`` is t."""
    return RepeatFactorSampler(labels, threshold=threshold, seed=seed)


def sampler_from_config(cfg: Any, labels: Any, num_classes: int) -> Any:
    """The sampler a run config asks for (``data.sampler``, ``data.sampler_params``, ``train.seed``;
    ``progressive`` gets ``optim.epochs`` as its ``total_epochs`` unless given)."""
    params = dict(cfg.data.sampler_params)
    if cfg.data.sampler == "progressive":
        params.setdefault("total_epochs", cfg.optim.epochs)
    return create_sampler(cfg.data.sampler, labels, num_classes, seed=cfg.train.seed, **params)

