"""Long-tailed counts and subsets (protocol.md §1)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradtail.data.longtail import build_longtail_split, longtail_counts, split_hash
from gradtail.errors import ConfigError, DataError

REAL_FMNIST_LABELS = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")


# --- reference: the LDAM rule written out with plain loops ------------------------------------------


def ldam_reference(labels: list[int], counts: list[int], seed: int) -> list[int]:
    """The LDAM code's subset: seed the legacy generator once, per class shuffle and keep a prefix."""
    np.random.seed(seed)
    kept: list[int] = []
    for c in range(len(counts)):
        idx = []
        for i, y in enumerate(labels):
            if y == c:
                idx.append(i)
        arr = np.array(idx, dtype=np.int64)
        np.random.shuffle(arr)
        for i in arr[: counts[c]]:
            kept.append(int(i))
    return sorted(kept)


def balanced_labels(per_class: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """A balanced label vector in a shuffled (dataset-like) order."""
    y = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(y)


# --- counts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_max", "num_classes", "imb", "total"),
    [
        (5000, 10, 100, 12406),
        (5000, 10, 50, 13996),
        (5000, 10, 10, 20431),
        (500, 100, 100, 10847),
        (500, 100, 50, 12608),
        (500, 100, 10, 19573),
        (500, 100, 200, 9502),
        (6000, 10, 100, 14886),
    ],
)
def test_reference_totals(n_max: int, num_classes: int, imb: int, total: int) -> None:
    counts = longtail_counts(n_max, num_classes, imb)
    assert sum(counts) == total
    assert counts[0] == n_max
    assert counts == sorted(counts, reverse=True)


def test_reference_count_vectors() -> None:
    assert longtail_counts(6000, 10, 100) == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    c10 = longtail_counts(5000, 10, 100)
    assert (c10[0], c10[-1]) == (5000, 50)
    c100 = longtail_counts(500, 100, 100)
    assert (c100[0], c100[-1]) == (500, 5)
    # protocol.md §4: CIFAR-100-LT IF100 has 35 / 35 / 30 Many / Medium / Few classes.
    many = sum(n > 100 for n in c100)
    few = sum(n < 20 for n in c100)
    assert (many, 100 - many - few, few) == (35, 35, 30)
    assert not any(n < 20 for n in c10)  # CIFAR-10-LT has no Few group


def test_truncation_matches_formula() -> None:
    for i, n in enumerate(longtail_counts(500, 100, 200)):
        assert n == int(500 * 200 ** (-i / 99))


def test_balanced_and_step() -> None:
    assert longtail_counts(500, 7, 1) == [500] * 7
    assert longtail_counts(5000, 10, 100, profile="step") == [5000] * 5 + [50] * 5
    assert longtail_counts(500, 5, 10, profile="step") == [500, 500, 50, 50, 50]
    assert longtail_counts(100, 1, 1) == [100]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_max": 0, "num_classes": 10, "imbalance_factor": 10},
        {"n_max": 10.5, "num_classes": 10, "imbalance_factor": 10},
        {"n_max": 100, "num_classes": 0, "imbalance_factor": 10},
        {"n_max": 100, "num_classes": 10, "imbalance_factor": 0.5},
        {"n_max": 100, "num_classes": 10, "imbalance_factor": float("nan")},
        {"n_max": 100, "num_classes": 10, "imbalance_factor": "100"},
        {"n_max": 100, "num_classes": 10, "imbalance_factor": 10, "profile": "linear"},
        {"n_max": 100, "num_classes": 1, "imbalance_factor": 10},
        {"n_max": 50, "num_classes": 10, "imbalance_factor": 100},  # tail would get 0 images
    ],
)
def test_count_arguments_rejected(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        longtail_counts(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    n_max=st.integers(1, 10_000),
    num_classes=st.integers(2, 200),
    imb=st.floats(1.0, 50.0),
)
def test_counts_properties(n_max: int, num_classes: int, imb: float) -> None:
    if int(n_max / imb) < 2:  # the tail may truncate to 0 either way of float rounding
        return
    counts = longtail_counts(n_max, num_classes, imb)
    assert len(counts) == num_classes
    assert counts[0] == n_max
    assert counts == sorted(counts, reverse=True)
    # n_max * IF**-1 and n_max / IF may round to opposite sides of an integer
    assert abs(counts[-1] - int(n_max / imb)) <= 1


# --- the LDAM rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_ldam_rule_matches_reference(seed: int) -> None:
    labels = balanced_labels(300, 10, seed=7)
    split = build_longtail_split(labels, 10, imbalance_factor=20, seed=seed)
    expected_counts = longtail_counts(300, 10, 20)
    assert split.counts == expected_counts
    assert split.train_indices.dtype == np.int64
    assert split.train_indices.tolist() == ldam_reference(labels.tolist(), expected_counts, seed)
    assert np.bincount(labels[split.train_indices], minlength=10).tolist() == expected_counts
    assert split.val_indices.size == 0 and split.val_counts == [0] * 10


def test_step_profile_and_torch_labels() -> None:
    labels = balanced_labels(40, 6, seed=3)
    split = build_longtail_split(torch.from_numpy(labels), 6, imbalance_factor=4, profile="step", seed=2)
    assert split.counts == [40, 40, 40, 10, 10, 10]
    assert split.train_indices.tolist() == ldam_reference(labels.tolist(), split.counts, 2)


def test_global_numpy_state_untouched() -> None:
    np.random.seed(2024)
    before = np.random.get_state()
    expected_next = np.random.random()
    np.random.set_state(before)
    build_longtail_split(balanced_labels(50, 5), 5, imbalance_factor=10, seed=9, val_per_class=3)
    assert np.random.random() == expected_next


def test_hash_definition_stability_and_seed_dependence() -> None:
    labels = balanced_labels(200, 10)
    a = build_longtail_split(labels, 10, imbalance_factor=10, seed=0)
    b = build_longtail_split(labels, 10, imbalance_factor=10, seed=0)
    c = build_longtail_split(labels, 10, imbalance_factor=10, seed=1)
    raw = np.sort(a.train_indices).astype("<i8").tobytes()
    assert a.sha256 == hashlib.sha256(raw).hexdigest() == split_hash(a.train_indices[::-1])
    assert a.sha256 == b.sha256
    assert a.counts == c.counts and a.sha256 != c.sha256


def test_validation_carve_is_balanced_disjoint_and_before_subsampling() -> None:
    labels = balanced_labels(120, 8, seed=4)
    split = build_longtail_split(labels, 8, imbalance_factor=10, seed=3, val_per_class=15)
    assert split.val_counts == [15] * 8
    assert np.bincount(labels[split.val_indices], minlength=8).tolist() == [15] * 8
    assert np.intersect1d(split.train_indices, split.val_indices).size == 0
    # n_max defaults to the largest class before the carve; a class whose count exceeds its remaining
    # pool (the head: 120 > 105) keeps the whole pool, every other class keeps its reference count.
    reference = longtail_counts(120, 8, 10)
    assert split.n_max == 120 and split.counts == [105, *reference[1:]]
    head = int(np.argmax(split.counts))
    pool = np.setdiff1d(np.flatnonzero(labels == head), split.val_indices)
    assert np.array_equal(np.sort(split.train_indices[labels[split.train_indices] == head]), pool)
    # deterministic, seed-dependent, and the LDAM subset of the remaining pool
    again = build_longtail_split(labels, 8, imbalance_factor=10, seed=3, val_per_class=15)
    assert np.array_equal(again.val_indices, split.val_indices)
    other = build_longtail_split(labels, 8, imbalance_factor=10, seed=4, val_per_class=15)
    assert not np.array_equal(other.val_indices, split.val_indices)
    # the LDAM rule on the pool (kept in dataset order) = the reference on a relabelled copy
    masked = labels.copy()
    masked[split.val_indices] = -1
    assert split.train_indices.tolist() == ldam_reference(masked.tolist(), split.counts, 3)


def test_validation_zero_gives_exact_ldam_subset() -> None:
    labels = balanced_labels(100, 5)
    plain = build_longtail_split(labels, 5, imbalance_factor=10, seed=5)
    explicit = build_longtail_split(labels, 5, imbalance_factor=10, seed=5, val_per_class=0, n_max=100)
    assert np.array_equal(plain.train_indices, explicit.train_indices)


def test_class_order_permutes_counts() -> None:
    labels = balanced_labels(100, 4)
    order = [2, 0, 3, 1]
    split = build_longtail_split(labels, 4, imbalance_factor=10, seed=0, class_order=order)
    ranked = longtail_counts(100, 4, 10)
    for rank, label in enumerate(order):
        assert split.counts[label] == ranked[rank]
    assert np.bincount(labels[split.train_indices], minlength=4).tolist() == split.counts
    assert split.train_indices.tolist() == ldam_reference(labels.tolist(), split.counts, 0)
    with pytest.raises(ConfigError, match="permutation"):
        build_longtail_split(labels, 4, imbalance_factor=10, class_order=[0, 0, 1, 2])


def test_errors() -> None:
    labels = np.array([0] * 50 + [1] * 5)
    with pytest.raises(DataError, match="class 1 has 5 images"):
        build_longtail_split(labels, 2, imbalance_factor=2)  # needs 25 of class 1
    with pytest.raises(DataError, match="after carving"):
        build_longtail_split(np.array([0] * 50 + [1] * 25), 2, imbalance_factor=2, val_per_class=10)
    with pytest.raises(DataError, match="fewer than val_per_class"):
        build_longtail_split(labels, 2, imbalance_factor=1, val_per_class=6)
    with pytest.raises(DataError, match="outside"):
        build_longtail_split(np.array([0, 1, 2]), 2, imbalance_factor=1)
    with pytest.raises(DataError, match="integers"):
        build_longtail_split(np.array([0.0, 1.0]), 2, imbalance_factor=1)
    with pytest.raises(ConfigError):
        build_longtail_split(labels, 2, imbalance_factor=1, seed=-1)
    with pytest.raises(ConfigError):
        build_longtail_split(labels, 2, imbalance_factor=1, seed=2**32)
    with pytest.raises(ConfigError):
        build_longtail_split(labels, 2, imbalance_factor=1, val_per_class=-1)
    with pytest.raises(ConfigError):
        build_longtail_split(labels, 2, imbalance_factor=0.5)


def test_to_dict_is_json_ready() -> None:
    split = build_longtail_split(balanced_labels(30, 3), 3, imbalance_factor=3, val_per_class=2)
    record = json.loads(json.dumps(split.to_dict()))
    assert record["counts"] == split.counts and record["num_train"] == sum(split.counts)
    assert record["num_val"] == 6 and record["sha256"] == split.sha256


@pytest.mark.skipif(not REAL_FMNIST_LABELS.exists(), reason="Debian's dataset-fashion-mnist not installed")
def test_real_fashion_mnist_lt() -> None:
    from gradtail.data.fashion_mnist import LABELS_MAGIC, read_idx

    labels = read_idx(REAL_FMNIST_LABELS, LABELS_MAGIC).astype(np.int64)
    split = build_longtail_split(labels, 10, imbalance_factor=100, seed=0)
    assert split.counts == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    assert split.train_indices.size == 14886
    assert split.train_indices.tolist() == ldam_reference(labels.tolist(), split.counts, 0)
    with_val = build_longtail_split(labels, 10, imbalance_factor=100, seed=0, val_per_class=20)
    assert with_val.val_counts == [20] * 10
    assert with_val.counts == [5980, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    assert np.intersect1d(with_val.train_indices, with_val.val_indices).size == 0
