"""A synthetic LVIS-format evaluation case with LVIS's shape, for timing and comparing evaluators.

LVIS v1 val's structure, at a chosen size: 1,203 categories (337 rare, 461 common, 405 frequent, the
``frequency`` field LVIS files carry), long-tailed image counts per category (rare 1-5 images, common
5-40, frequent 40-250 at 5,000 images), 1-3 instances per positive (image, category), per image verified
negatives (``neg_category_ids``) and, for some images, a not-exhaustively annotated positive category
(``not_exhaustive_category_ids``). Detections, ``dets_per_image`` per image: a jittered copy of each
instance with its own class and with a confused class, then boxes anywhere, labelled with the image's
positive, negative or unverified categories (the last are dropped by the federated protocol); 30% of the
images get 20 more than ``dets_per_image`` (the evaluator keeps the top ones). Scores are continuous (no
ties). With ``masks``, instances carry polygon segmentations (an octagon in the box) and
detections carry compressed RLE masks (pycocotools' format) of the same polygon shape in their box.

Every random draw comes from one NumPy generator seeded by ``seed``: the case is reproducible.
"""

from __future__ import annotations

from typing import Any

import numpy as np

LVIS_GROUPS = (("r", 337, (1, 5)), ("c", 461, (5, 40)), ("f", 405, (40, 250)))


def _scaled_groups(num_classes: int) -> list[tuple[str, int, tuple[int, int]]]:
    total = sum(n for _, n, _ in LVIS_GROUPS)
    counts = [max(1, round(n * num_classes / total)) for _, n, _ in LVIS_GROUPS]
    counts[-1] = num_classes - sum(counts[:-1])
    return [(g, k, span) for (g, _, span), k in zip(LVIS_GROUPS, counts, strict=True)]


def _octagon(x: float, y: float, w: float, h: float) -> list[float]:
    """An octagon inscribed in the box (x, y, w, h): a polygon segmentation, COCO's flat [x0, y0, ...]."""
    a, b = 0.3 * w, 0.3 * h
    pts = [(x + a, y), (x + w - a, y), (x + w, y + b), (x + w, y + h - b),
           (x + w - a, y + h), (x + a, y + h), (x, y + h - b), (x, y + b)]  # fmt: skip
    return [float(v) for p in pts for v in p]


def _box(rng: np.random.Generator, width: int, height: int) -> list[float]:
    w = float(rng.uniform(8, width / 2))
    h = float(rng.uniform(8, height / 2))
    return [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h]


def _jitter(rng: np.random.Generator, box: list[float], width: int, height: int, scale: float) -> list[float]:
    x, y, w, h = box
    w2 = float(np.clip(w * np.exp(rng.normal(0, scale)), 2, width))
    h2 = float(np.clip(h * np.exp(rng.normal(0, scale)), 2, height))
    x2 = float(np.clip(x + rng.normal(0, scale) * w, 0, width - w2))
    y2 = float(np.clip(y + rng.normal(0, scale) * h, 0, height - h2))
    return [x2, y2, w2, h2]


def lvis_case(
    num_images: int = 5000,
    num_classes: int = 1203,
    dets_per_image: int = 300,
    masks: bool = False,
    seed: int = 0,
    width: int = 640,
    height: int = 480,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(ground_truth, detections)``: an LVIS-format annotation dict and a result list (module docstring)."""
    rng = np.random.default_rng(seed)
    categories, positives = [], [set() for _ in range(num_images)]
    cid = 0
    for group, count, (lo, hi) in _scaled_groups(num_classes):
        for _ in range(count):
            cid += 1
            categories.append({"id": cid, "name": f"category_{cid}", "frequency": group})
            n = min(num_images, int(rng.integers(lo, hi + 1)) * num_images // 5000 or 1)
            for i in rng.choice(num_images, size=n, replace=False):
                positives[int(i)].add(cid)
    all_ids = np.arange(1, num_classes + 1)
    images, annotations, by_image = [], [], []
    for i in range(num_images):
        pos = sorted(positives[i])
        free = np.setdiff1d(all_ids, pos)
        neg = rng.choice(free, size=min(len(free), 8), replace=False).tolist()
        not_exhaustive = [int(rng.choice(pos))] if pos and rng.random() < 0.2 else []
        images.append({
            "id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": width, "height": height,
            "neg_category_ids": sorted(int(c) for c in neg), "not_exhaustive_category_ids": not_exhaustive,
        })  # fmt: skip
        instances = []
        for c in pos:
            for _ in range(int(rng.integers(1, 4))):
                box = _box(rng, width, height)
                ann = {"id": len(annotations) + 1, "image_id": i + 1, "category_id": c, "bbox": box,
                       "area": box[2] * box[3]}  # fmt: skip
                if masks:
                    ann["segmentation"] = [_octagon(*box)]
                    ann["area"] = 0.82 * box[2] * box[3]  # the octagon's share of its box
                annotations.append(ann)
                instances.append((c, box))
        by_image.append((pos, [int(c) for c in neg], instances))

    detections = []
    for i, (pos, neg, instances) in enumerate(by_image):
        unverified = rng.choice(np.setdiff1d(all_ids, pos + neg), size=4, replace=False).tolist()
        labels = pos + neg + [int(c) for c in unverified]
        dets = []
        for c, box in instances:
            dets.append((c, _jitter(rng, box, width, height, 0.08)))
            dets.append((int(rng.choice(labels)), _jitter(rng, box, width, height, 0.15)))
        target = dets_per_image + (20 if rng.random() < 0.3 else 0)  # some images beyond the cap
        while len(dets) < target:
            dets.append((int(rng.choice(labels)), _box(rng, width, height)))
        scores = rng.random(len(dets))
        for (c, box), s in zip(dets, scores, strict=True):
            detections.append({"image_id": i + 1, "category_id": c, "bbox": box, "score": float(s)})
    if masks:
        _add_masks(detections, width, height)
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def _add_masks(detections: list[dict[str, Any]], width: int, height: int) -> None:
    """Each detection's compressed RLE mask: the octagon of its box (pycocotools' ``frPyObjects``)."""
    from pycocotools import mask as mask_utils

    for d in detections:
        rle = mask_utils.frPyObjects([_octagon(*d["bbox"])], height, width)[0]
        rle["counts"] = rle["counts"].decode("ascii")
        d["segmentation"] = rle
