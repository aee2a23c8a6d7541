"""faster-coco-eval's LVIS mode against the official ``lvis`` API: every field gradtail reports (AP, AP50,
AP75, APs/m/l, APr/c/f, per-class AP) and the recall summary, to 1e-6, boxes and masks, on LVIS-shaped
random cases (federated negatives, not-exhaustive categories, more than ``max_dets`` detections an image,
tied scores) and on hand-made edge cases; and the choice ``auto`` makes (docs/detection.md §Evaluation)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradtail.data.detection.builder import EVALUATORS as OPTION_EVALUATORS
from gradtail.data.detection.lvis import read_detection_json
from gradtail.errors import ConfigError
from gradtail.metrics.detection import (
    EVALUATORS,
    RECALL_KEYS,
    SUMMARY_KEYS,
    _per_class,
    evaluate_detections,
    federated_detections,
    lvis_evaluator,
    run_lvis_eval,
    top_detections_per_image,
)

pytest.importorskip("lvis")
pytest.importorskip("faster_coco_eval")
pytest.importorskip("pycocotools")

REPO = Path(__file__).resolve().parents[1]


def _lvis_case_module() -> Any:
    spec = importlib.util.spec_from_file_location("lvis_case", REPO / "benchmarks" / "lvis_case.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("lvis_case", module)
    spec.loader.exec_module(module)
    return module


lvis_case = _lvis_case_module().lvis_case


def assert_same_evaluation(
    gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str, max_dets: int
) -> None:
    official, p_official, name = run_lvis_eval(gt, dets, iou_type, max_dets, "lvis")
    assert name == "lvis"
    fast, p_fast, name = run_lvis_eval(gt, dets, iou_type, max_dets, "faster_coco_eval")
    assert name == "faster_coco_eval"
    for key in (*SUMMARY_KEYS, *RECALL_KEYS):
        assert fast[key] == pytest.approx(official[key], abs=1e-6), key
    np.testing.assert_allclose(_per_class(p_fast), _per_class(p_official), atol=1e-6, equal_nan=True)
    defined = [official[k] for k in SUMMARY_KEYS if official[k] > -1]
    assert defined and max(defined) > 0  # a case where something is found: equality is not 0 == 0


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_lvis_shaped_cases(iou_type: str, seed: int) -> None:
    masks = iou_type == "segm"
    gt, dets = lvis_case(
        num_images=30, num_classes=60, dets_per_image=40, masks=masks, seed=seed, width=96, height=80
    )
    assert any(im["not_exhaustive_category_ids"] for im in gt["images"])
    assert len(dets) > 30 * 40  # some images beyond the cap
    assert_same_evaluation(gt, dets, iou_type, max_dets=40)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_tied_scores_and_the_cap(iou_type: str) -> None:
    """Scores rounded to one decimal (many ties, also at the 40th place of an image): both evaluators
    keep and rank tied detections in the same (input) order."""
    gt, dets = lvis_case(num_images=20, num_classes=30, dets_per_image=40, masks=iou_type == "segm", seed=3,
                         width=96, height=80)  # fmt: skip
    for d in dets:
        d["score"] = round(d["score"], 1)
    assert_same_evaluation(gt, dets, iou_type, max_dets=40)


def _edge_gt() -> dict[str, Any]:
    cats = [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "c"},
            {"id": 3, "name": "c", "frequency": "r"}, {"id": 4, "name": "d", "frequency": "r"}]  # fmt: skip
    images = [
        {"id": 1, "width": 64, "height": 64, "neg_category_ids": [3], "not_exhaustive_category_ids": [2]},
        {"id": 2, "width": 64, "height": 64, "neg_category_ids": [1, 2], "not_exhaustive_category_ids": []},
        {"id": 3, "width": 64, "height": 64, "neg_category_ids": [], "not_exhaustive_category_ids": []},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 30, 20, 20], "area": 400},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 40, 40], "area": 1600},
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [40, 40, 10, 10], "area": 100},
    ]  # category 4: no ground truth anywhere (its AP undefined); image 3: nothing annotated
    return {"images": images, "annotations": anns, "categories": cats}


def _as_masks(gt: dict[str, Any], dets: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The same case with masks: each box's octagon, as a polygon (ground truth) and as compressed RLE
    without the box (results, as gradtail writes mask results)."""
    case = _lvis_case_module()
    gt = copy.deepcopy(gt)
    for a in gt["annotations"]:
        a["segmentation"] = [case._octagon(*a["bbox"])]
    dets = copy.deepcopy(dets)
    case._add_masks(dets, 64, 64)
    return gt, [{k: v for k, v in d.items() if k != "bbox"} for d in dets]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_edge_cases(iou_type: str) -> None:
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [0, 40, 10, 10], "score": 0.95},  # not exhaustive: ignored
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 30], "score": 0.8},  # verified negative: FP
        {"image_id": 1, "category_id": 4, "bbox": [0, 0, 30, 30], "score": 0.99},  # unverified: dropped
        {"image_id": 2, "category_id": 3, "bbox": [6, 6, 38, 38], "score": 0.7},
        {"image_id": 2, "category_id": 3, "bbox": [6, 6, 38, 38], "score": 0.7},  # a tied duplicate: FP
        {"image_id": 2, "category_id": 1, "bbox": [40, 40, 10, 10], "score": 0.6},  # negative: FP
        {"image_id": 3, "category_id": 1, "bbox": [1, 1, 9, 9], "score": 0.5},  # nothing verified: dropped
    ]
    gt = _edge_gt()
    if iou_type == "segm":  # image 3: no annotation, its one detection dropped (unverified category)
        gt, dets = _as_masks(gt, dets)
    assert_same_evaluation(gt, dets, iou_type, max_dets=300)
    assert_same_evaluation(gt, dets, iou_type, max_dets=2)


def test_federated_detections_are_those_of_annotated_or_verified_negative_categories() -> None:
    dets = [{"image_id": i, "category_id": c} for i in (1, 2, 3) for c in (1, 2, 3, 4)]
    kept = federated_detections(_edge_gt(), dets)
    pairs = [(d["image_id"], d["category_id"]) for d in kept]
    assert pairs == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]  # image 3: nothing verified


def test_top_detections_per_image_is_a_stable_sort() -> None:
    dets = [{"image_id": 1, "score": s, "k": k} for k, s in enumerate([0.5, 0.9, 0.5, 0.7, 0.5])]
    kept = top_detections_per_image(dets, 4)
    assert [d["k"] for d in kept] == [1, 3, 0, 2]


def test_auto_takes_the_fast_one_where_it_is_equal(monkeypatch: pytest.MonkeyPatch) -> None:
    gt = _edge_gt()
    assert lvis_evaluator("auto", gt) == "faster_coco_eval"
    assert lvis_evaluator("lvis", gt) == "lvis"
    crowd = {**gt, "annotations": [{**gt["annotations"][0], "iscrowd": 1}, *gt["annotations"][1:]]}
    assert lvis_evaluator("auto", crowd) == "lvis"  # crowd boxes: the two differ, the official one runs
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # not installed
    assert lvis_evaluator("auto", gt) == "lvis"
    with pytest.raises(ConfigError, match="LVIS evaluator must be one of"):
        lvis_evaluator("fast", gt)
    assert OPTION_EVALUATORS == EVALUATORS


@pytest.mark.parametrize("evaluator", ["lvis", "faster_coco_eval"])
def test_evaluate_detections_records_the_evaluator(tmp_path: Path, evaluator: str) -> None:
    p = tmp_path / "gt.json"
    p.write_text(
        json.dumps({**_edge_gt(), "images": [{"file_name": "x.png", **im} for im in _edge_gt()["images"]]})
    )
    dets = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "score": 0.9}]
    m = evaluate_detections(read_detection_json(p), dets, evaluator=evaluator)
    assert m.to_dict()["evaluator"] == evaluator and m.protocol == "lvis"
    assert m["APf"] == pytest.approx(1.0) and m["APr"] == 0.0  # rare category 3 has boxes and no hit
