"""Samplers (baselines.md "samplers"; design.md: sampler = (seed, epoch, rank, world) -> indices)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradtail.data.samplers import SAMPLERS, Sampler, create_sampler, sampler_seed
from gradtail.errors import ConfigError, DataError

COUNTS = [400, 120, 40, 12, 4]


def lt_labels(counts: list[int] = COUNTS, seed: int = 0) -> torch.Tensor:
    y = torch.cat([torch.full((n,), j) for j, n in enumerate(counts)])
    return y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(seed))]


def make(name: str, **kw: object) -> Sampler:
    if name == "progressive":
        kw.setdefault("total_epochs", 10)
    return create_sampler(name, lt_labels(), len(COUNTS), seed=3, **kw)


def class_freq(sampler: Sampler, epoch: int) -> torch.Tensor:
    order = sampler.global_order(epoch)
    return torch.bincount(sampler.labels[order], minlength=sampler.num_classes).double() / order.numel()


def test_registry_lists_the_baselines() -> None:
    assert {"instance", "class_balanced", "sqrt", "progressive"} <= set(SAMPLERS.names())


def test_instance_is_a_permutation() -> None:
    s = make("instance")
    order = s.global_order(0)
    assert order.dtype == torch.int64 and sorted(order.tolist()) == list(range(len(s.labels)))
    assert not torch.equal(order, s.global_order(1))
    long = make("instance", num_samples=2 * len(s.labels) + 7)
    counts = torch.bincount(long.global_order(0), minlength=len(s.labels))
    assert long.global_order(0).numel() == 2 * len(s.labels) + 7 and int(counts.min()) >= 2


N_DRAWS = 200_000
sq = np.sqrt(COUNTS)
TARGETS = {
    "class_balanced": np.full(len(COUNTS), 1 / len(COUNTS)),
    "sqrt": sq / sq.sum(),
    "instance_like": np.array(COUNTS) / sum(COUNTS),
}


@pytest.mark.parametrize(
    ("name", "kw", "epoch", "target"),
    [
        ("class_balanced", {}, 0, "class_balanced"),
        ("sqrt", {}, 0, "sqrt"),
        ("power", {"power": 0.5}, 2, "sqrt"),
        ("progressive", {}, 0, "instance_like"),
        ("progressive", {}, 10, "class_balanced"),
        ("progressive", {}, 25, "class_balanced"),  # clamped after T
    ],
)
def test_empirical_class_frequencies(name: str, kw: dict, epoch: int, target: str) -> None:
    s = make(name, num_samples=N_DRAWS, **kw)
    expected = torch.from_numpy(TARGETS[target])
    assert torch.allclose(s.class_probs(epoch), expected, atol=1e-12)
    freq = class_freq(s, epoch)
    # binomial standard error <= 0.0012 at N_DRAWS; allow ~5 sigma
    assert torch.allclose(freq, expected, atol=0.006), (freq, expected)


def test_progressive_midpoint_and_within_class_uniformity() -> None:
    s = make("progressive", num_samples=N_DRAWS)
    inst = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    mid = 0.5 * inst + 0.5 / len(COUNTS)
    assert torch.allclose(s.class_probs(5), mid)
    assert torch.allclose(class_freq(s, 5), mid, atol=0.006)
    # inside the tail class (4 images) every image is drawn about equally often
    cb = make("class_balanced", num_samples=N_DRAWS)
    order = cb.global_order(0)
    tail = order[cb.labels[order] == 4]
    per_image = torch.bincount(tail, minlength=len(cb.labels))[cb.labels == 4].double() / tail.numel()
    assert torch.allclose(per_image, torch.full((4,), 0.25, dtype=torch.float64), atol=0.01)


@pytest.mark.parametrize("name", ["instance", "class_balanced", "sqrt", "progressive"])
def test_deterministic_and_no_global_rng(name: str) -> None:
    torch.manual_seed(11)
    np.random.seed(11)
    expected_torch = torch.rand(1)
    expected_np = np.random.random()
    torch.manual_seed(11)
    np.random.seed(11)
    a = make(name).global_order(4)
    b = make(name).global_order(4)
    assert torch.rand(1) == expected_torch and np.random.random() == expected_np
    assert torch.equal(a, b) and a.numel() == sum(COUNTS)
    assert not torch.equal(a, make(name).global_order(5))
    other_seed = create_sampler(
        name, lt_labels(), len(COUNTS), seed=4, **({"total_epochs": 10} if name == "progressive" else {})
    )
    assert not torch.equal(a, other_seed.global_order(4))
    assert sampler_seed(3, 4) == sampler_seed(3, 4) != sampler_seed(4, 3)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["instance", "class_balanced", "sqrt", "progressive"]),
    world=st.integers(1, 7),
    num_samples=st.integers(7, 600),
    epoch=st.integers(0, 30),
)
def test_rank_slices_partition_the_truncated_order(
    name: str, world: int, num_samples: int, epoch: int
) -> None:
    s = make(name, num_samples=num_samples)
    order = s.global_order(epoch)
    n = (num_samples // world) * world
    parts = [s.indices(epoch, rank=r, world_size=world) for r in range(world)]
    assert all(p.numel() == s.num_samples_per_rank(world) == num_samples // world for p in parts)
    interleaved = torch.stack(parts, dim=1).reshape(-1)  # position k*world + r came from rank r
    assert torch.equal(interleaved, order[:n])
    assert torch.equal(s.indices(epoch), order)
    if name == "instance" and num_samples <= len(s.labels):
        sets = [set(p.tolist()) for p in parts]
        assert sum(len(x) for x in sets) == len(set().union(*sets))  # disjoint images


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        (("nope",), {}, ConfigError),
        (("instance",), {"bogus": 1}, ConfigError),
        (("sqrt",), {"power": 0.3}, ConfigError),
        (("progressive",), {}, ConfigError),  # total_epochs missing
        (("progressive",), {"total_epochs": 0}, ConfigError),
        (("power",), {"power": 2.0}, ConfigError),
        (("instance",), {"num_samples": 0}, ConfigError),
        (("instance",), {"seed": -1}, ConfigError),
    ],
)
def test_bad_arguments(args: tuple, kwargs: dict, error: type[Exception]) -> None:
    seed = kwargs.pop("seed", 0)
    with pytest.raises(error):
        create_sampler(*args, lt_labels(), len(COUNTS), seed=seed, **kwargs)


def test_bad_labels_and_ranks() -> None:
    with pytest.raises(DataError, match="outside"):
        create_sampler("instance", [0, 1, 5], 3)
    with pytest.raises(DataError, match="integers"):
        create_sampler("instance", torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(DataError):
        create_sampler("instance", [], 2)
    with pytest.raises(ConfigError):
        create_sampler("instance", [0, 1], 0)
    s = make("class_balanced", num_samples=10)
    with pytest.raises(ConfigError, match="rank"):
        s.indices(0, rank=2, world_size=2)
    with pytest.raises(ConfigError):
        s.indices(0, rank=0, world_size=0)
    with pytest.raises(ConfigError, match="smaller than world_size"):
        s.indices(0, rank=0, world_size=11)
    with pytest.raises(ConfigError):
        s.global_order(-1)


def test_empty_classes_are_never_drawn() -> None:
    labels = torch.tensor([0] * 30 + [2] * 3)
    for name in ("class_balanced", "sqrt", "progressive"):
        kw = {"total_epochs": 2} if name == "progressive" else {}
        s = create_sampler(name, labels, 3, num_samples=3000, **kw)
        probs = s.class_probs(2)
        assert probs[1] == 0 and torch.isclose(probs.sum(), torch.tensor(1.0, dtype=torch.float64))
        assert not bool((labels[s.global_order(2)] == 1).any())
    balanced = create_sampler("class_balanced", labels, 3).class_probs(0)
    assert balanced.tolist() == [0.5, 0.0, 0.5]
