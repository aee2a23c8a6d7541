"""LVIS / COCO-format reader (one-line errors naming file and entry), v2 box transforms, and the detection
evaluator against hand-computed answers and the official ``lvis`` / pycocotools APIs called directly."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gradtail.data.detection.lvis import DetectionDataset, detection_transforms, read_detection_json
from gradtail.errors import DataError
from gradtail.metrics.detection import (
    evaluate_coco,
    evaluate_detections,
    evaluate_lvis,
    lvis_ground_truth,
    numpy_float_alias,
)

lvis = pytest.importorskip("lvis")
pytest.importorskip("pycocotools")

# categories: 1 frequent, 2 common, 3 rare; 4 images of 64 x 64, exhaustively annotated (neg = absent)
CATS = [
    {"id": 1, "name": "f", "frequency": "f"},
    {"id": 2, "name": "c", "frequency": "c"},
    {"id": 3, "name": "r", "frequency": "r"},
]
BOXES = {  # image id -> [(category, [x, y, w, h])]
    1: [(1, [2, 2, 20, 20]), (2, [30, 30, 20, 20])],
    2: [(1, [10, 10, 40, 40])],
    3: [(3, [5, 30, 20, 30])],
    4: [],
}


def gt_doc() -> dict[str, Any]:
    images, anns = [], []
    for iid, boxes in BOXES.items():
        present = {c for c, _ in boxes}
        images.append(
            {
                "id": iid,
                "file_name": f"{iid}.png",
                "width": 64,
                "height": 64,
                "neg_category_ids": [c["id"] for c in CATS if c["id"] not in present],
                "not_exhaustive_category_ids": [],
            }
        )
        for c, b in boxes:
            anns.append(
                {"id": len(anns) + 1, "image_id": iid, "category_id": c, "bbox": b, "area": b[2] * b[3]}
            )
    return {"images": images, "annotations": anns, "categories": copy.deepcopy(CATS)}


def write(tmp: Path, doc: dict[str, Any], name: str = "gt.json") -> Path:
    p = tmp / name
    p.write_text(json.dumps(doc))
    return p


def perfect() -> list[dict[str, Any]]:
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": 0.9} for i, bs in BOXES.items() for c, b in bs
    ]


def official_lvis(path: Path, dets: list[dict[str, Any]], max_dets: int = 300) -> dict[str, float]:
    with numpy_float_alias(), contextlib.redirect_stdout(io.StringIO()):
        gt = lvis.LVIS(str(path))
        ev = lvis.LVISEval(gt, lvis.LVISResults(gt, copy.deepcopy(dets), max_dets=max_dets), iou_type="bbox")
        ev.run()
        return dict(ev.results)


# ------------------------------------------------------------------ known answers
def test_perfect_detections_give_ap_one(tmp_path: Path) -> None:
    m = evaluate_detections(read_detection_json(write(tmp_path, gt_doc())), perfect())
    assert m.protocol == "lvis"
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert m[key] == pytest.approx(1.0, abs=1e-9), key
    np.testing.assert_allclose(m.per_class_ap, 1.0, atol=1e-9)


def test_a_missed_rare_class_gives_apr_zero(tmp_path: Path) -> None:
    dets = [d for d in perfect() if d["category_id"] != 3]
    m = evaluate_detections(read_detection_json(write(tmp_path, gt_doc())), dets)
    assert m["APr"] == 0.0
    assert m["APf"] == pytest.approx(1.0) and m["APc"] == pytest.approx(1.0)
    assert m["AP"] == pytest.approx(2 / 3)  # mean over the three categories
    assert m.per_class_ap[2] == 0.0


def test_hand_computed_precision_recall_curve(tmp_path: Path) -> None:
    # category 1 has 2 boxes: ranked TP (0.9), FP (0.8, an empty spot), TP (0.7). 101-point interpolated
    # precision: 1 up to recall 0.5 (51 points), 2/3 from 0.51 to 1 (50 points)
    dets = [d for d in perfect() if d["category_id"] != 1]
    dets += [
        {"image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "score": 0.9},
        {"image_id": 4, "category_id": 1, "bbox": [40, 0, 10, 10], "score": 0.8},
        {"image_id": 2, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.7},
    ]
    m = evaluate_detections(read_detection_json(write(tmp_path, gt_doc())), dets)
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    assert m.per_class_ap[0] == pytest.approx(expected, abs=1e-9)
    assert m["APf"] == pytest.approx(expected, abs=1e-9)


def test_federated_rules(tmp_path: Path) -> None:
    doc = gt_doc()
    # a detection of category 2 on image 3: 2 is in image 3's negative list -> a false positive;
    # unless image 3 lists 2 as not exhaustive (then it is not penalised); unless 2 is neither positive
    # nor negative there (then it is not evaluated at all)
    fp = {"image_id": 3, "category_id": 2, "bbox": [40, 0, 10, 10], "score": 0.95}
    base = evaluate_detections(read_detection_json(write(tmp_path, doc)), [*perfect(), fp])
    assert base.per_class_ap[1] < 0.6  # ranked FP then TP: precision 1/2 at full recall
    doc["images"][2]["not_exhaustive_category_ids"] = [2]
    ne = evaluate_detections(read_detection_json(write(tmp_path, doc, "ne.json")), [*perfect(), fp])
    assert ne.per_class_ap[1] == pytest.approx(1.0)
    doc = gt_doc()
    doc["images"][2]["neg_category_ids"] = [1]
    unk = evaluate_detections(read_detection_json(write(tmp_path, doc, "unk.json")), [*perfect(), fp])
    assert unk.per_class_ap[1] == pytest.approx(1.0)


def test_at_most_300_detections_per_image(tmp_path: Path) -> None:
    # 300 confident false positives of category 1 on image 1 push its true positive (lowest score) out
    fps = [
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 5 + (k % 7), 5], "score": 0.99} for k in range(300)
    ]
    dets = [*fps, *perfect()]
    path = write(tmp_path, gt_doc())
    m = evaluate_detections(read_detection_json(path), dets)
    m301 = evaluate_detections(read_detection_json(path), dets, max_dets=301)
    assert m.per_class_ap[0] < m301.per_class_ap[0]
    assert m["AP"] == pytest.approx(official_lvis(path, dets)["AP"], abs=1e-12)


def test_no_detections(tmp_path: Path) -> None:
    m = evaluate_detections(read_detection_json(write(tmp_path, gt_doc())), [])
    assert m["AP"] == 0.0 and m["APr"] == 0.0 and m.num_detections == 0


# ------------------------------------------------------------------ equal to the official APIs
def _noisy(seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for d in perfect():
        for _ in range(3):
            b = (np.asarray(d["bbox"], float) + rng.normal(0, 3, 4)).clip(0, 60)
            b[2:] = np.maximum(b[2:], 1)
            out.append({**d, "bbox": b.tolist(), "score": float(rng.random())})
    for _ in range(10):
        out.append(
            {
                "image_id": int(rng.integers(1, 5)),
                "category_id": int(rng.integers(1, 4)),
                "bbox": rng.uniform(0, 40, 4).tolist(),
                "score": float(rng.random()),
            }
        )
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_lvis_summary_equals_the_official_api(tmp_path: Path, seed: int) -> None:
    path = write(tmp_path, gt_doc())
    dets = _noisy(seed)
    ours = evaluate_lvis(read_detection_json(path), dets)
    ref = official_lvis(path, dets)
    for key, value in ours.values.items():
        expected = math.nan if ref[key] == -1 else ref[key]
        assert value == pytest.approx(expected, abs=1e-12, nan_ok=True), key
    assert ours["APs"] == ours["APs"]  # small boxes exist


def test_coco_summary_equals_pycocotools(tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    doc = gt_doc()
    for c in doc["categories"]:
        del c["frequency"]
    for a in doc["annotations"]:
        a["iscrowd"] = 0  # pycocotools' own reader needs the field
    doc["annotations"].append(
        {"id": 99, "image_id": 2, "category_id": 2, "bbox": [0, 50, 10, 10], "area": 100, "iscrowd": 1}
    )
    path = write(tmp_path, doc)
    ann = read_detection_json(path)
    assert not ann.is_lvis and ann.images[1].crowd_boxes.shape == (1, 4)
    dets = _noisy(3)
    ours = evaluate_detections(ann, dets, frequencies=["f", "c", "r"])
    assert ours.protocol == "coco"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), iouType="bbox")  # COCO's maxDets 1, 10, 100
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for i, key in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        expected = math.nan if ev.stats[i] == -1 else ev.stats[i]
        assert ours[key] == pytest.approx(expected, abs=1e-12, nan_ok=True), key
    with contextlib.redirect_stdout(io.StringIO()):  # 300 per image: the API's own mean at maxDets 300
        ev.params.maxDets = [1, 10, 300]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()  # its AP50 (stats[1]) is the one summary read at maxDets[2]
    ap50 = evaluate_coco(ann, dets, max_dets=300, frequencies=["f", "c", "r"])["AP50"]
    assert ap50 == pytest.approx(ev.stats[1], abs=1e-12)
    assert ours["APr"] == pytest.approx(ours.per_class_ap[2])
    assert evaluate_coco(ann, perfect())["AP"] == pytest.approx(1.0)


# ------------------------------------------------------------------ reader errors, dataset, transforms
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["annotations"][1].pop("bbox"), r"annotations\[1\] \(id 2\): missing field 'bbox'"),
        (
            lambda d: d["annotations"][0].update(bbox=[50, 2, 20, 20]),
            r"annotations\[0\] \(id 1\): box .* outside image 1",
        ),
        (
            lambda d: d["annotations"][2].update(category_id=77),
            r"annotations\[2\] \(id 3\): unknown category id 77",
        ),
        (lambda d: d["annotations"][2].update(image_id=9), r"annotations\[2\] \(id 3\): unknown image id 9"),
        (lambda d: d["images"][0].pop("width"), r"images\[0\] \(id 1\): missing field 'width'"),
        (lambda d: d["categories"][1].update(frequency="x"), r"categories\[1\] \(id 2\): frequency must be"),
        (
            lambda d: d["images"][1].update(neg_category_ids=[5]),
            r"images\[1\] \(id 2\): 'neg_category_ids' names unknown",
        ),
        (lambda d: d.pop("categories"), "missing or non-list top-level field 'categories'"),
    ],
)
def test_malformed_files_give_one_line_errors(tmp_path: Path, edit: Any, match: str) -> None:
    doc = gt_doc()
    edit(doc)
    path = write(tmp_path, doc)
    with pytest.raises(DataError, match=match) as info:
        read_detection_json(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_invalid_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        read_detection_json(bad)
    with pytest.raises(DataError, match="not found"):
        read_detection_json(tmp_path / "nope.json")


def test_lvis_v1_coco_url_and_counts(tmp_path: Path) -> None:
    doc = gt_doc()
    for im in doc["images"]:
        im["coco_url"] = f"http://images.cocodataset.org/val2017/{im.pop('file_name')}"
    ann = read_detection_json(write(tmp_path, doc))
    assert ann.images[0].file_name == "1.png" and ann.is_lvis
    assert ann.image_counts().tolist() == [2, 1, 1] and ann.instance_counts().tolist() == [2, 1, 1]
    assert ann.image_categories() == [[0, 1], [0], [2], []]
    assert ann.frequencies() == ["f", "c", "r"]
    assert lvis_ground_truth(ann)["images"][0]["neg_category_ids"] == [3]


def test_dataset_and_v2_transforms_move_the_boxes(tmp_path: Path) -> None:
    from PIL import Image

    doc = gt_doc()
    root = tmp_path / "images"
    root.mkdir()
    for im in doc["images"]:
        Image.fromarray(np.full((64, 64, 3), 40 * im["id"], np.uint8)).save(root / im["file_name"])
    ann = read_detection_json(write(tmp_path, doc))
    flip = DetectionDataset(ann, root, detection_transforms(train=True, min_size=128, flip_prob=1.0))
    image, target = flip[0]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32 and float(image.max()) <= 1.0
    # [2, 2, 20, 20] -> xyxy [2, 2, 22, 22] -> x2 = 128 - 2 * 2 after a 2x resize and a flip
    torch.testing.assert_close(target["boxes"][0], torch.tensor([84.0, 4.0, 124.0, 44.0]))
    assert target["labels"].tolist() == [0, 1] and target["image_id"] == 1
    plain = DetectionDataset(ann, root, detection_transforms(train=False))
    image, target = plain[3]  # the empty image
    assert image.shape == (3, 64, 64) and target["boxes"].shape == (0, 4)
    (root / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"2\.png: cannot read image 2"):
        plain[1]
