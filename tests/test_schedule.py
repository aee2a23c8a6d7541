import itertools
import math

import pytest

from gradtail.config import OptimConfig
from gradtail.engine.schedule import LRSchedule


def test_ldam_recipe_step_schedule():
    s = LRSchedule.from_config(
        OptimConfig(
            lr=0.1,
            epochs=200,
            warmup_epochs=5,
            schedule="step",
            milestones=[160, 180],
            milestone_factors=[0.01, 0.0001],
        )
    )
    assert s.lr_at(0.5) == pytest.approx(0.01)  # linear warm-up
    assert s.lr_at(5.0) == pytest.approx(0.1)
    assert s.lr_at(159.99) == pytest.approx(0.1)
    assert s.lr_at(160.01) == pytest.approx(0.001)
    assert s.lr_at(180.5) == pytest.approx(0.1 * 1e-4)


def test_cosine_reaches_floor_and_is_monotone_after_warmup():
    s = LRSchedule(base_lr=0.1, epochs=10, warmup_epochs=2, kind="cosine", min_lr=0.001)
    assert s.lr_at(2.0) == pytest.approx(0.1)
    assert s.lr_at(6.0) == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(10.0) == pytest.approx(0.001)
    values = [s.lr_at(2 + 8 * i / 50) for i in range(51)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_no_warmup_constant():
    s = LRSchedule(base_lr=0.3, epochs=3, warmup_epochs=0, kind="constant")
    assert s.lr_at(0.01) == s.lr_at(2.9) == 0.3
