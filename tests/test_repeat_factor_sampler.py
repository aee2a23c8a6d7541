"""Repeat-factor sampling (LVIS; docs/methods/eql.md §9): known factors, stochastic rounding, determinism
from (seed, epoch), rank split."""

from __future__ import annotations

import math

import pytest
import torch

from gradtail.data.samplers import RepeatFactorSampler
from gradtail.errors import ConfigError, DataError

# 10 images: category 0 in 8 of them, 1 in 2, 2 in 1; image 9 is empty (counts in f's denominator)
IMAGES = [[0], [0], [0, 0], [0], [0], [0], [0, 1], [0, 2], [1], []]


def test_category_and_image_factors_by_hand() -> None:
    rfs = RepeatFactorSampler(IMAGES, threshold=0.5, seed=0)
    # f(0) = 8/10, f(1) = 2/10, f(2) = 1/10; r(c) = max(1, sqrt(0.5 / f(c)))
    assert rfs.category_factors() == pytest.approx({0: 1.0, 1: math.sqrt(2.5), 2: math.sqrt(5.0)})
    expected = [1.0] * 6 + [math.sqrt(2.5), math.sqrt(5.0), math.sqrt(2.5), 1.0]  # max over the image
    torch.testing.assert_close(rfs.repeat_factors(), torch.tensor(expected, dtype=torch.float64))
    # t small: every factor is 1, the sampler is a permutation
    flat = RepeatFactorSampler(IMAGES, threshold=1e-3, seed=3)
    assert sorted(flat.global_order(0).tolist()) == list(range(10))


def test_integer_factors_repeat_exactly_and_fractions_round_stochastically() -> None:
    # f(1) = 1/4 with t = 1: r = 2 exactly, every epoch
    exact = RepeatFactorSampler([[0], [0], [0], [0, 1]], threshold=1.0, seed=5)
    for epoch in range(3):
        assert sorted(exact.global_order(epoch).tolist()) == [0, 1, 2, 3, 3]
    rfs = RepeatFactorSampler(IMAGES, threshold=0.5, seed=1)
    r = rfs.repeat_factors()
    counts = torch.zeros(10)
    epochs = 2000
    for epoch in range(epochs):
        order = rfs.global_order(epoch)
        per_image = torch.bincount(order, minlength=10)
        assert torch.all(per_image >= torch.floor(r)) and torch.all(per_image <= torch.ceil(r))
        counts += per_image
    # mean repeats -> r(I): sqrt(5) = 2.236 for image 7, sqrt(2.5) = 1.581 for images 6 and 8
    torch.testing.assert_close(counts / epochs, r.to(torch.float32), atol=0.04, rtol=0)


def test_order_is_a_pure_function_of_seed_and_epoch_and_ranks_split_it() -> None:
    a, b = RepeatFactorSampler(IMAGES, 0.5, seed=7), RepeatFactorSampler(IMAGES, 0.5, seed=7)
    assert torch.equal(a.global_order(4), b.global_order(4))
    assert not torch.equal(a.global_order(4), a.global_order(5))
    assert not torch.equal(a.global_order(4), RepeatFactorSampler(IMAGES, 0.5, seed=8).global_order(4))
    order = a.global_order(2)
    parts = [a.indices(2, rank, 3) for rank in range(3)]
    assert len({p.numel() for p in parts}) == 1
    kept = order.numel() // 3 * 3
    assert sorted(torch.cat(parts).tolist()) == sorted(order[:kept].tolist())
    assert torch.equal(parts[1], order[:kept][1::3])
    assert torch.equal(a.indices(2), order)


def test_flat_labels_and_bad_input() -> None:
    flat = RepeatFactorSampler([0, 0, 0, 1], threshold=1.0)  # f(0) = 3/4, f(1) = 1/4
    assert flat.repeat_factors().tolist() == pytest.approx([math.sqrt(4 / 3)] * 3 + [2.0])
    with pytest.raises(ConfigError, match="threshold"):
        RepeatFactorSampler(IMAGES, threshold=0.0)
    with pytest.raises(DataError, match="image 1"):
        RepeatFactorSampler([[0], [0.5]])
    with pytest.raises(DataError, match="no images"):
        RepeatFactorSampler([])
    with pytest.raises(ConfigError, match="rank"):
        RepeatFactorSampler(IMAGES).indices(0, rank=2, world_size=2)
