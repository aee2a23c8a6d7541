"""Metrics against plain-loop references (protocol.md §4)."""

import math

import numpy as np
import pytest
import torch

from gradtail.errors import InputError
from gradtail.metrics import calibration_errors, confusion_matrix, evaluate_logits, shot_groups
from gradtail.metrics.classification import CONFUSION_MAX_CLASSES
from gradtail.metrics.segmentation import segmentation_metrics


def _loop_ece(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> tuple[float, float]:
    conf = probs.max(1)
    pred = probs.argmax(1)
    n = len(targets)
    ece, mce = 0.0, 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(n) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if not members:
            continue
        acc = np.mean([pred[i] == targets[i] for i in members])
        avg = np.mean([conf[i] for i in members])
        ece += len(members) / n * abs(acc - avg)
        mce = max(mce, abs(acc - avg))
    return ece, mce


def test_ece_mce_match_loop_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, 7, (500,), generator=gen)
    res = calibration_errors(logits, targets, num_bins=15)
    probs = torch.softmax(logits, 1).numpy()
    ece, mce = _loop_ece(probs, targets.numpy())
    assert res["ece"] == pytest.approx(ece, abs=1e-12)
    assert res["mce"] == pytest.approx(mce, abs=1e-12)


def test_perfectly_calibrated_confident_model_has_zero_ece():
    logits = torch.full((4, 3), -1e4)
    targets = torch.tensor([0, 1, 2, 1])
    logits[torch.arange(4), targets] = 1e4
    res = calibration_errors(logits, targets)
    assert res["ece"] == pytest.approx(0.0, abs=1e-9)


def test_per_class_and_groups_by_loops():
    gen = torch.Generator().manual_seed(1)
    c = 6
    logits = torch.randn(300, c, generator=gen)
    targets = torch.randint(0, c, (300,), generator=gen)
    counts = [500, 150, 100, 50, 20, 3]  # many: >100; medium: 20..100; few: <20
    res = evaluate_logits(logits, targets, counts)
    pred = logits.argmax(1)
    for j in range(c):
        mask = targets == j
        assert res.per_class[j] == pytest.approx(float((pred[mask] == j).float().mean()))
    assert res.many == pytest.approx(np.mean(res.per_class[0:2]))
    assert res.medium == pytest.approx(np.mean(res.per_class[2:5]))
    assert res.few == pytest.approx(res.per_class[5])
    assert res.top1 == pytest.approx(float((pred == targets).float().mean()))
    cm = np.zeros((c, c), dtype=int)
    for t, p in zip(targets.tolist(), pred.tolist(), strict=True):
        cm[t, p] += 1
    assert res.confusion == cm.tolist()


def test_empty_group_is_none_not_zero():
    logits = torch.eye(3)
    targets = torch.arange(3)
    res = evaluate_logits(logits, targets, [5000, 4000, 3000])
    assert res.many == 1.0 and res.medium is None and res.few is None


def test_shot_group_thresholds_are_settings():
    assert shot_groups([150, 100, 20, 19], 100, 20) == {"many": [0], "medium": [1, 2], "few": [3]}
    assert shot_groups([150, 100, 20, 19], 50, 10) == {"many": [0, 1], "medium": [2, 3], "few": []}
    # CIFAR-100-LT IF100 counts give 35 / 35 / 30 classes (protocol.md §4).
    counts = [int(500 * 100 ** (-i / 99)) for i in range(100)]
    g = shot_groups(counts)
    assert (len(g["many"]), len(g["medium"]), len(g["few"])) == (35, 35, 30)


def test_confusion_matrix_rows_are_truth():
    cm = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 0]), 2)
    assert cm.tolist() == [[1, 1], [0, 1]]


@pytest.mark.parametrize("classes", [CONFUSION_MAX_CLASSES, CONFUSION_MAX_CLASSES + 1])
def test_the_confusion_matrix_is_left_out_of_the_results_above_the_limit(classes: int) -> None:
    """At iNaturalist's 8,142 classes the matrix would be ~700 MB of final.json: kept up to
    CONFUSION_MAX_CLASSES classes, left out above (every other metric unchanged)."""
    targets = torch.arange(6) % classes
    logits = torch.zeros(6, classes).scatter_(1, targets.view(-1, 1), 1.0)
    result = evaluate_logits(logits, targets, [5] * classes)
    d = result.to_dict()
    assert result.top1 == 1.0 and d["top1"] == 1.0
    if classes <= CONFUSION_MAX_CLASSES:
        assert result.confusion is not None and sum(map(sum, d["confusion"])) == 6
    else:
        assert result.confusion is None and "confusion" not in d
    seg = segmentation_metrics(torch.eye(classes, dtype=torch.long), [1] * classes)
    assert seg.miou == 1.0 and ("confusion" in seg.to_dict()) == (classes <= CONFUSION_MAX_CLASSES)


@pytest.mark.parametrize(
    "logits,targets",
    [
        (torch.randn(4, 3), torch.tensor([0, 1, 2, 3])),
        (torch.randn(4, 3), torch.tensor([0, 1, 2])),
        (torch.randn(4), torch.tensor([0, 1, 2, 1])),
        (torch.tensor([[0.0, math.nan], [1.0, 0.0]]), torch.tensor([0, 1])),
    ],
)
def test_bad_inputs_are_named(logits, targets):
    with pytest.raises(InputError):
        evaluate_logits(logits, targets, [10] * max(logits.shape[-1], 1))
