"""Mask AP against the reference implementations (instance.md §4, §5): ``evaluate_masks`` equals
``LVISEval(gt, dt, "segm")`` / ``COCOeval(gt, dt, "segm")`` called directly, on constructed cases with
polygons, compressed and uncompressed RLE, crowd regions, images without objects and more than 300 (LVIS)
/ 100 (COCO) detections on an image; masks are evaluated as masks (a perfect box with a wrong mask is a
perfect box AP and an imperfect mask AP); the results records (RLE, counts as str) and their checks."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from gradtail.data.detection.instance import read_instance_json
from gradtail.data.detection.masks import decode_segmentation, encode_mask
from gradtail.errors import InputError
from gradtail.metrics.detection import evaluate_detections, numpy_float_alias
from gradtail.metrics.instance import evaluate_instances, evaluate_masks, instance_records, mask_ground_truth

lvis = pytest.importorskip("lvis")
pytest.importorskip("pycocotools")

H, W = 48, 64
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def _blob(rng: np.random.Generator) -> np.ndarray:
    """A random ellipse-and-rectangle mask."""
    m = np.zeros((H, W), np.uint8)
    cy, cx = rng.integers(8, H - 8), rng.integers(8, W - 8)
    ry, rx = rng.integers(3, 9), rng.integers(3, 12)
    yy, xx = np.mgrid[:H, :W]
    m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    if rng.random() < 0.5:
        m[cy : cy + ry, max(cx - 2, 0) : cx + 2] = 1
    return m


def _bbox(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _uncompressed(m: np.ndarray) -> dict:
    flat = m.T.reshape(-1)  # column-major
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [H, W], "counts": [int(c) for c in counts]}


def _polygon(m: np.ndarray) -> list[list[float]]:
    x, y, w, h = _bbox(m)
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]  # the mask's box as a polygon (a different mask)


def _det(image_id: int, category_id: int, score: float, mask: np.ndarray) -> dict:
    return {"image_id": image_id, "category_id": category_id, "score": score,
            "segmentation": encode_mask(mask), "bbox": _bbox(mask)}  # fmt: skip


def dataset(seed: int, lvis_format: bool, crowd: bool = False) -> tuple[dict, list[dict]]:
    """(ground-truth dict, detection records): 12 images (2 without objects), 4 categories, objects written
    as compressed RLE, uncompressed RLE or polygons; detections: shifted / perturbed copies of the objects
    with random scores, false positives, and more than 300 detections on image 1."""
    rng = np.random.default_rng(seed)
    cats = [{"id": k + 1, "name": f"c{k}"} for k in range(4)]
    if lvis_format:
        for c, f in zip(cats, "ffcr", strict=True):
            c["frequency"] = f
    images, anns, dets = [], [], []
    for i in range(1, 13):
        image = {"id": i, "file_name": f"{i}.png", "width": W, "height": H}
        present: set[int] = set()
        objects = 0 if i in (5, 9) else int(rng.integers(1, 4))
        for _ in range(objects):
            m = _blob(rng)
            cid = int(rng.integers(1, 5))
            present.add(cid)
            kind = len(anns) % 3
            seg = encode_mask(m) if kind == 0 else _uncompressed(m) if kind == 1 else _polygon(m)
            gt_mask = decode_segmentation(seg, H, W)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cid, "bbox": _bbox(gt_mask),
                         "area": float(gt_mask.sum()), "segmentation": seg, "iscrowd": 0})  # fmt: skip
            for _copy in range(int(rng.integers(0, 3))):
                d = np.roll(gt_mask, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
                if d.any():
                    label = cid if rng.random() < 0.8 else int(rng.integers(1, 5))
                    dets.append(_det(i, label, float(rng.random()), d))
        if crowd and i == 3:
            m = np.zeros((H, W), np.uint8)
            m[30:46, 40:62] = 1
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 2, "bbox": _bbox(m),
                         "area": float(m.sum()), "segmentation": _uncompressed(m), "iscrowd": 1})  # fmt: skip
            inside = np.zeros_like(m)
            inside[32:44, 42:60] = 1
            dets.append(_det(i, 2, 0.99, inside))
        for _fp in range(int(rng.integers(0, 3))):
            d = _blob(rng)
            dets.append(_det(i, int(rng.integers(1, 5)), float(rng.random()) * 0.5, d))
        if lvis_format:
            image["neg_category_ids"] = [c["id"] for c in cats if c["id"] not in present][:2]
            image["not_exhaustive_category_ids"] = [4] if i == 7 and 4 in present else []
        images.append(image)
    many = 320 if lvis_format else 130
    for k in range(many):  # image 1: more detections than the evaluator keeps (the lowest scores dropped)
        d = _blob(rng)
        dets.append(_det(1, 1 + k % 4, 0.001 + 0.3 * float(rng.random()), d))
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _write(tmp_path: Path, gt: dict, name: str = "gt.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(gt))
    return path


def _without_bbox(dets: list[dict]) -> list[dict]:
    return [{k: v for k, v in d.items() if k != "bbox"} for d in copy.deepcopy(dets)]


def _same(ours: float, theirs: float) -> bool:
    """Equal, up to float summation order (the default LVIS evaluator is faster-coco-eval, equal to the
    official API to ~1e-16: tests/test_lvis_evaluators.py)."""
    return (math.isnan(ours) and theirs == -1) or abs(ours - theirs) <= 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lvis_mask_ap_equals_lvis_eval_called_directly(tmp_path: Path, seed: int) -> None:
    gt, dets = dataset(seed, lvis_format=True)
    ann = read_instance_json(_write(tmp_path, gt))
    ours = evaluate_masks(ann, dets)
    assert ours.protocol == "lvis" and ours.num_detections == len(dets)
    gt_file = _write(tmp_path, mask_ground_truth(ann), "gt_lvis.json")
    with numpy_float_alias(), contextlib.redirect_stdout(io.StringIO()):
        ref_gt = lvis.LVIS(str(gt_file))
        ev = lvis.LVISEval(ref_gt, lvis.LVISResults(ref_gt, _without_bbox(dets), max_dets=300), "segm")
        ev.run()
    for key in KEYS:
        assert _same(ours[key], ev.results[key]), (key, ours[key], ev.results[key])
    # per-class AP: the mean of the precision entries > -1 over IoU and recall, area "all"
    precision = ev.eval["precision"][:, :, :, 0]
    for k in range(4):
        p = precision[:, :, k]
        want = float(p[p > -1].mean()) if (p > -1).any() else math.nan
        assert _same(ours.per_class_ap[k], -1 if math.isnan(want) else want)
    # called on the records as written (with their boxes): the same AP, AP50, AP75, APr/c/f
    with numpy_float_alias(), contextlib.redirect_stdout(io.StringIO()):
        ev2 = lvis.LVISEval(ref_gt, lvis.LVISResults(ref_gt, copy.deepcopy(dets), max_dets=300), "segm")
        ev2.run()
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert _same(ours[key], ev2.results[key]), key


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_mask_ap_equals_cocoeval_called_directly_with_crowd_regions(tmp_path: Path, seed: int) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = dataset(seed, lvis_format=False, crowd=True)
    ann = read_instance_json(_write(tmp_path, gt))
    assert not ann.is_lvis and any(len(im.crowd_boxes) for im in ann.images)
    ours = evaluate_masks(ann, dets)
    assert ours.protocol == "coco"
    with contextlib.redirect_stdout(io.StringIO()):
        ref = COCO(str(_write(tmp_path, gt, "gt_coco.json")))
        ev = COCOeval(ref, ref.loadRes(_without_bbox(dets)), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for k, key in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        assert _same(ours[key], ev.stats[k]), (key, ours[key], ev.stats[k])


def test_the_crowd_region_swallows_the_detection_inside_it(tmp_path: Path) -> None:
    """A detection inside a crowd region is matched to it and ignored (not a false positive)."""
    gt, dets = dataset(0, lvis_format=False, crowd=True)
    ann = read_instance_json(_write(tmp_path, gt))
    crowd_det = [d for d in dets if d["score"] == 0.99]
    without = [d for d in dets if d["score"] != 0.99]
    assert len(crowd_det) == 1
    assert evaluate_masks(ann, without)["AP"] == evaluate_masks(ann, dets)["AP"]


def test_perfect_masks_give_ap_one_and_masks_are_not_boxes(tmp_path: Path) -> None:
    gt, _ = dataset(3, lvis_format=True)
    ann = read_instance_json(_write(tmp_path, gt))
    perfect, box_right_mask_wrong = [], []
    for a in gt["annotations"]:
        m = decode_segmentation(a["segmentation"], H, W)
        perfect.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
                        "bbox": a["bbox"], "segmentation": encode_mask(m)})  # fmt: skip
        wrong = np.zeros_like(m)
        x, y, w, h = (int(v) for v in a["bbox"])
        wrong[y : y + h // 2, x : x + w] = 1  # the top half of the box: same box rows / columns, a bad mask
        box_right_mask_wrong.append({**perfect[-1], "segmentation": encode_mask(wrong)})
    m = evaluate_instances(ann, perfect)
    assert m["AP"] == pytest.approx(1.0) and m["box_AP"] == pytest.approx(1.0)
    m = evaluate_instances(ann, box_right_mask_wrong)
    assert m["box_AP"] == pytest.approx(1.0) and m["AP"] < 0.5
    assert m.primary == m["AP"] and set(m.summary()) == {*KEYS, *(f"box_{k}" for k in KEYS)}


def test_box_ap_alongside_is_the_detection_evaluators(tmp_path: Path) -> None:
    gt, dets = dataset(1, lvis_format=True)
    ann = read_instance_json(_write(tmp_path, gt))
    both = evaluate_instances(ann, dets)
    boxes = [{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dets]
    alone = evaluate_detections(ann, boxes)
    assert both.bbox.values == alone.values or all(
        (math.isnan(a) and math.isnan(b)) or a == b
        for a, b in zip(both.bbox.values.values(), alone.values.values(), strict=True)
    )
    record = both.to_dict()
    assert record["iou_type"] == "segm" and len(record["box_per_class_ap"]) == 4 and "box_APr" in record


def test_empty_results_and_empty_images(tmp_path: Path) -> None:
    gt, _ = dataset(2, lvis_format=True)
    ann = read_instance_json(_write(tmp_path, gt))
    m = evaluate_masks(ann, [])
    assert m["AP"] == 0.0 and m.num_detections == 0
    gt["annotations"] = []
    empty = read_instance_json(_write(tmp_path, gt, "empty.json"))
    assert math.isnan(evaluate_masks(empty, [])["AP"])


def test_records_are_rle_with_string_counts_and_bad_records_are_one_line(tmp_path: Path) -> None:
    probs = np.zeros((2, 1, H, W), np.float32)
    probs[0, 0, 10:20, 5:25] = 0.7
    probs[1, 0, 30:40, 30:50] = 0.4  # below 0.5: an empty mask
    recs = instance_records(3, [[5, 10, 25, 20], [30, 30, 50, 40]], [0.9, 0.2], [1, 0], probs, [10, 20])
    assert [r["category_id"] for r in recs] == [20, 10]
    assert all(isinstance(r["segmentation"]["counts"], str) for r in recs)
    assert decode_segmentation(recs[0]["segmentation"], H, W).sum() == 200
    assert decode_segmentation(recs[1]["segmentation"], H, W).sum() == 0
    json.dumps(recs)  # JSON-serialisable as written
    gt, _ = dataset(0, lvis_format=True)
    ann = read_instance_json(_write(tmp_path, gt))
    good = {"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": encode_mask(np.ones((H, W)))}
    for bad, fragment in [
        ({**good, "image_id": 99}, "image id 99"),
        ({**good, "category_id": 9}, "category id 9"),
        ({**good, "segmentation": encode_mask(np.ones((4, 4)))}, "RLE size [4, 4]"),
        ({**good, "segmentation": [[1, 1, 5, 1, 5, 5]]}, "compressed RLE"),
        ({k: v for k, v in good.items() if k != "score"}, "needs image_id"),
    ]:
        with pytest.raises(InputError) as info:
            evaluate_masks(ann, [bad])
        assert fragment in str(info.value) and "\n" not in str(info.value)
