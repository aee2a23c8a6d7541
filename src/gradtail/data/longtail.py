"""Long-tailed subsets of a balanced training set (docs/methods/protocol.md §1).

:func:`longtail_counts` gives the per-class counts; :func:`build_longtail_split` chooses which images
by the "LDAM rule", optionally after carving a balanced held-out validation split, and records a
SHA-256 of the kept indices so every run's subset is auditable (docs/methods/protocol.md §5).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from gradtail.errors import ConfigError, DataError

PROFILES = ("exp", "step")

# The validation carve uses its own generator, seeded from (seed, this tag), so it never touches the
# legacy global stream the LDAM rule draws from (the tag is b"val" as an int).
_VAL_STREAM_TAG = 0x76616C


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float, profile: str = "exp") -> list[int]:
    """Per-class counts, head (index 0) to tail (docs/methods/protocol.md §1).

    ``exp``: ``int(n_max * IF ** (-i / (C - 1)))`` (truncation); ``step``: the first ``C // 2`` classes
    keep ``n_max``, the rest get ``int(n_max / IF)``. ``IF = 1`` gives ``[n_max] * C``.

    Example:
        >>> from gradtail.data.longtail import longtail_counts
        >>> longtail_counts(6000, 10, 100)  # Fashion-MNIST-LT IF100
        [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
        >>> longtail_counts(500, 4, 10, profile="step")
        [500, 500, 50, 50]
    """
    n_max = _check_int("n_max", n_max, 1)
    num_classes = _check_int("num_classes", num_classes, 1)
    if isinstance(imbalance_factor, bool) or not isinstance(imbalance_factor, (int, float, np.number)):
        raise ConfigError(f"imbalance_factor must be a number >= 1, got {imbalance_factor!r}")
    imb = float(imbalance_factor)
    if not math.isfinite(imb) or imb < 1.0:
        raise ConfigError(f"imbalance_factor must be a finite number >= 1, got {imbalance_factor!r}")
    if profile not in PROFILES:
        raise ConfigError(f"unknown long-tail profile {profile!r}; valid: {', '.join(PROFILES)}")
    if num_classes == 1:
        if imb != 1.0:
            raise ConfigError("a single class cannot be imbalanced: use imbalance_factor=1")
        return [n_max]
    if profile == "exp":
        counts = [int(n_max * imb ** (-i / (num_classes - 1))) for i in range(num_classes)]
    else:
        head = num_classes // 2
        counts = [n_max] * head + [int(n_max / imb)] * (num_classes - head)
    if counts[-1] < 1:
        raise ConfigError(
            f"n_max={n_max} with imbalance_factor={imbalance_factor} leaves the tail class with 0 images"
        )
    return counts


def split_hash(indices: np.ndarray | Sequence[int]) -> str:
    """SHA-256 (hex) of the sorted indices as little-endian int64 bytes (docs/methods/protocol.md §1)."""
    arr = np.sort(np.asarray(indices, dtype=np.int64))
    return hashlib.sha256(arr.astype("<i8").tobytes()).hexdigest()


@dataclass
class LongTailSplit:
    """Which training images a long-tailed run uses (docs/methods/protocol.md §1).

    ``train_indices`` and ``val_indices`` are sorted ascending (np.int64), indices into the full
    training set. ``counts`` / ``val_counts`` are indexed by *label* (``counts[j]`` images of class
    ``j``; with a ``class_order`` the head is not necessarily label 0). ``sha256`` is
    :func:`split_hash` of ``train_indices``.
    """

    train_indices: np.ndarray
    val_indices: np.ndarray
    counts: list[int]
    val_counts: list[int]
    sha256: str
    imbalance_factor: float
    profile: str
    seed: int
    n_max: int = 0
    class_order: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record for a run's output: counts, hash and the settings, no index arrays."""
        skip = ("train_indices", "val_indices")
        d = {f.name: copy.copy(getattr(self, f.name)) for f in fields(self) if f.name not in skip}
        d["num_train"] = int(self.train_indices.size)
        d["num_val"] = int(self.val_indices.size)
        return d


def _as_label_array(labels: Any, num_classes: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise DataError(f"label {bad} is outside [0, {num_classes})")
    return arr


def _check_class_order(class_order: Sequence[int] | None, num_classes: int) -> list[int] | None:
    if class_order is None:
        return None
    order = [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise ConfigError(
            f"class_order must be a permutation of 0..{num_classes - 1}, got {list(class_order)}"
        )
    return order


def _carve_validation(
    pools: list[np.ndarray], val_per_class: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split each class pool into (training pool, validation) (docs/methods/protocol.md §1, held-out
    validation).

    A private generator seeded with ``(seed, "val")`` permutes each class's indices; the *last*
    ``val_per_class`` of the permutation are validation, the rest stay in dataset order as the pool.
    """
    rng = np.random.default_rng([seed, _VAL_STREAM_TAG])
    train_pools: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for j, pool in enumerate(pools):
        if pool.size < val_per_class:
            raise DataError(f"class {j} has {pool.size} images, fewer than val_per_class={val_per_class}")
        perm = rng.permutation(pool.size)
        val_pos = perm[pool.size - val_per_class :]
        keep = np.ones(pool.size, dtype=bool)
        keep[val_pos] = False
        train_pools.append(pool[keep])
        vals.append(np.sort(pool[val_pos]))
    return train_pools, vals


def _ldam_select(pools: list[np.ndarray], counts: list[int], seed: int) -> list[np.ndarray]:
    """The LDAM rule (docs/methods/protocol.md §1) on the legacy global generator, whose state is restored
    after."""
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        kept = []
        for pool, n in zip(pools, counts, strict=True):
            idx = pool.copy()
            np.random.shuffle(idx)
            kept.append(idx[:n])
        return kept
    finally:
        np.random.set_state(saved)


def build_longtail_split(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    num_classes: int,
    imbalance_factor: float,
    profile: str = "exp",
    seed: int = 0,
    val_per_class: int = 0,
    n_max: int | None = None,
    class_order: Sequence[int] | None = None,
) -> LongTailSplit:
    """Choose a long-tailed training subset and an optional balanced validation split
    (docs/methods/protocol.md §1).

    1. Each class's pool is its indices in dataset order. If ``val_per_class > 0``, a separate seeded
       generator first carves ``val_per_class`` per class out of the pool (see :func:`_carve_validation`);
       the pools shrink accordingly. With ``val_per_class = 0`` nothing is drawn from that generator.
    2. ``n_max`` defaults to the largest class in the dataset (before the carve); counts come from
       :func:`longtail_counts`; ``class_order[i]`` is the label that gets the i-th count (head first).
       When validation was carved and ``n_max`` was not given, a head class (count ``n_max``) keeps
       its whole remaining pool (choice recorded here because docs/methods/protocol.md §1 is ambiguous: its
       reference counts and its carve-before-subsampling rule cannot both hold for the head class).
       For Fashion-MNIST-LT IF100
       with 20 validation images per class this gives ``5980 3596 2156 1292 774 464 278 166 100 60``:
       every class but the head matches the reference table; only the head loses the 20 it gave to
       validation. Without validation the reference counts are reproduced exactly, and an explicit
       ``n_max`` larger than a pool is an error.
    3. LDAM rule: ``np.random.seed(seed)`` once, then for each label 0..C-1 shuffle its pool with
       ``np.random.shuffle`` and keep the first ``counts[label]``. The global NumPy RNG state is saved
       and restored, so callers are unaffected. With no validation and no class order this is exactly
       the subset of the LDAM code (and of the papers that reuse it).

    Example:
        >>> import numpy as np
        >>> from gradtail.data.longtail import build_longtail_split
        >>> labels = np.repeat(np.arange(3), 100)  # a balanced training set, 100 images per class
        >>> split = build_longtail_split(labels, num_classes=3, imbalance_factor=10, seed=0)
        >>> split.counts, int(split.train_indices.size), len(split.sha256)
        ([100, 31, 10], 141, 64)
        >>> carved = build_longtail_split(labels, 3, 10, val_per_class=5)  # validation carved first
        >>> carved.counts, carved.val_counts
        ([95, 31, 10], [5, 5, 5])
    """
    num_classes = _check_int("num_classes", num_classes, 1)
    seed = _check_int("seed", seed, 0)
    if seed >= 2**32:
        raise ConfigError(f"seed must be < 2**32 (NumPy's legacy generator), got {seed}")
    val_per_class = _check_int("val_per_class", val_per_class, 0)
    order = _check_class_order(class_order, num_classes)
    y = _as_label_array(labels, num_classes)

    pools = [np.flatnonzero(y == j).astype(np.int64) for j in range(num_classes)]
    vals: list[np.ndarray] = [np.empty(0, dtype=np.int64) for _ in range(num_classes)]
    clip_to_pool = n_max is None and val_per_class > 0
    if n_max is None:
        n_max = max(p.size for p in pools)
        if n_max == 0:
            raise DataError("no training images to subsample (empty labels)")
    if val_per_class > 0:
        pools, vals = _carve_validation(pools, val_per_class, seed)
    n_max = _check_int("n_max", n_max, 1)
    ranked = longtail_counts(n_max, num_classes, imbalance_factor, profile)
    counts = list(ranked)
    if order is not None:
        for rank, label in enumerate(order):
            counts[label] = ranked[rank]
    if clip_to_pool:  # only head classes (asked for the full n_max) give their carve back
        counts = [min(n, pool.size) if n == n_max else n for n, pool in zip(counts, pools, strict=True)]
    for j, (pool, n) in enumerate(zip(pools, counts, strict=True)):
        if n == 0 and pool.size == 0:
            raise DataError(
                f"class {j} has no training images left after carving {val_per_class} for validation"
            )
        if pool.size < n:
            carved = f" after carving {val_per_class} for validation" if val_per_class else ""
            raise DataError(f"class {j} has {pool.size} images{carved}, fewer than the {n} it needs")

    kept = _ldam_select(pools, counts, seed)
    train = np.sort(np.concatenate(kept)) if kept else np.empty(0, dtype=np.int64)
    val = np.sort(np.concatenate(vals)) if vals else np.empty(0, dtype=np.int64)
    return LongTailSplit(
        train_indices=train.astype(np.int64),
        val_indices=val.astype(np.int64),
        counts=counts,
        val_counts=[int(v.size) for v in vals],
        sha256=split_hash(train),
        imbalance_factor=float(imbalance_factor),
        profile=profile,
        seed=seed,
        n_max=n_max,
        class_order=order,
    )
