"""Instance segmentation metrics through the reference implementations (docs/instance.md §4; the spec:
``instance.md`` §4): mask AP with box AP alongside.

- :func:`evaluate_masks`: mask ("segm") AP, AP50, AP75, APs / APm / APl, APr / APc / APf and per-class AP,
  through the official ``lvis`` API (``LVISEval(gt, dt, "segm")``, federated, 300 detections per image),
  or faster-coco-eval's equal LVIS mode (``evaluator``; :mod:`gradtail.metrics.detection`), for
  LVIS-format ground truth, through pycocotools (``COCOeval(gt, dt, "segm")``, crowd regions as
  ignore regions, maxDets 100; APr / APc / APf from per-class AP by frequency group) for COCO. This
  function is self-contained: it takes the annotations and the results records and calls the evaluator.
- :func:`evaluate_instances`: both, mask AP from the records' ``segmentation`` and box AP from their
  ``bbox`` (:func:`gradtail.metrics.detection.evaluate_detections`), as an :class:`InstanceMetrics`
  (a :class:`gradtail.contracts.EvalReport` whose primary metric is mask AP).
- :func:`instance_records`: the results records of one image, ``{"image_id", "category_id", "bbox":
  [x, y, w, h], "score", "segmentation": compressed RLE with counts as str}``, masks binarised at a
  threshold (0.5).

As detectron2's and mmdetection's evaluators do, mask AP is computed from records *without* their
``bbox``: both APIs otherwise take a result's area (and so APs / APm / APl) from its box instead of its mask.
AP, AP50, AP75 and APr / APc / APf do not depend on areas ("all" area range), so ``LVISEval`` called on the
records as written gives those exactly. Ground-truth areas are the file's ``area`` (LVIS and COCO give mask
areas), the mask's own area where a file has none.

Values are fractions in [0, 1]; NaN where the evaluator has nothing to average.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gradtail.data.detection.lvis import DetectionAnnotations
from gradtail.data.detection.masks import SEGMENTATION_FIELD, encode_masks, segmentation_rle
from gradtail.errors import ConfigError, InputError
from gradtail.metrics.detection import (
    MAX_DETS,
    DetectionMetrics,
    coco_metrics,
    detection_records,
    evaluate_detections,
    lvis_metrics,
)

BOX_PREFIX = "box_"


@dataclass
class InstanceMetrics:
    """Mask AP (``segm``) and box AP (``bbox``) of one split: an :class:`~gradtail.contracts.EvalReport`
    whose primary metric is mask AP. Its records name the mask metrics plainly (``AP``, ``APr``, ...) and
    the box metrics with the prefix ``box_`` (``box_AP``, ``box_APr``, ...)."""

    segm: DetectionMetrics
    bbox: DetectionMetrics
    primary_metric: ClassVar[str] = "AP"

    def __getitem__(self, key: str) -> float:
        if key.startswith(BOX_PREFIX):
            return self.bbox[key[len(BOX_PREFIX) :]]
        return self.segm[key]

    @property
    def primary(self) -> float:
        """Mask AP (0 when undefined)."""
        return self.segm.primary

    def summary(self) -> dict[str, float | None]:
        """Mask AP, AP50, AP75, APs/m/l, APr/c/f and the same of the boxes (``box_*``)."""
        return {**self.segm.summary(), **{BOX_PREFIX + k: v for k, v in self.bbox.summary().items()}}

    def val_record(self) -> dict[str, float | None]:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """The summary, per-class mask AP (``per_class_ap``) and box AP (``box_per_class_ap``), the protocol,
        the number of detections (``final.json``)."""
        out = self.segm.to_dict()
        out.update({BOX_PREFIX + k: v for k, v in self.bbox.summary().items()})
        out["box_per_class_ap"] = self.bbox.to_dict()["per_class_ap"]
        out["iou_type"] = "segm"
        return out


def instance_records(
    image_id: int,
    boxes_xyxy: Any,
    scores: Any,
    labels: Any,
    masks: Any,
    category_ids: Sequence[int],
    threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Results records of one image (module docstring): detection's box records
    (:func:`~gradtail.metrics.detection.detection_records`) with each mask, ``masks`` (n, [1,] H, W)
    probabilities (torchvision's pasted masks) or binary masks, ``labels`` contiguous class indices mapped
    through ``category_ids``.

    Example:
        >>> import numpy as np
        >>> m = np.zeros((1, 1, 4, 5)); m[0, 0, 1:3, 2:4] = 0.9
        >>> r = instance_records(7, [[2, 1, 4, 3]], [0.8], [0], m, [11])[0]
        >>> r["category_id"], r["bbox"], r["segmentation"]["size"], type(r["segmentation"]["counts"]).__name__
        (11, [2.0, 1.0, 2.0, 2.0], [4, 5], 'str')
    """
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    m = np.asarray(masks)
    if m.ndim == 4:
        m = m[:, 0]
    if m.ndim != 3 or not (len(b) == len(s) == len(lab) == len(m)):
        raise InputError(
            f"boxes ({len(b)}), scores ({len(s)}), labels ({len(lab)}), masks {tuple(np.shape(masks))} differ"
        )
    rles = encode_masks(m >= threshold if m.dtype != np.bool_ else m)
    boxes = detection_records(image_id, b, s, lab, category_ids)
    return [{**r, "segmentation": rle} for r, rle in zip(boxes, rles, strict=True)]


def detector_records(
    image_id: int, out: Any, category_ids: Sequence[int], threshold: float = 0.5
) -> list[dict[str, Any]]:
    """The results records of one image's Mask R-CNN output (``boxes``, ``scores``, ``labels`` and
    ``masks`` (n, 1, H, W) probabilities, tensors), masks binarised at ``threshold``."""
    masks = (out["masks"].detach()[:, 0] >= threshold).cpu().numpy()
    return instance_records(
        image_id,
        out["boxes"].detach().float().cpu().numpy(),
        out["scores"].detach().float().cpu().numpy(),
        out["labels"].detach().cpu().numpy(),
        masks,
        category_ids,
    )


def _check_mask_records(records: Sequence[dict[str, Any]], ann: DetectionAnnotations) -> list[dict[str, Any]]:
    """Segmentation records without their ``bbox`` (module docstring), checked against ``ann``."""
    images = {im.id: (im.height, im.width) for im in ann.images}
    cats = set(ann.category_ids)
    out = []
    for i, r in enumerate(records):
        if not {"image_id", "category_id", SEGMENTATION_FIELD, "score"} <= set(r):
            raise InputError(f"result {i}: needs image_id, category_id, segmentation, score; got {sorted(r)}")
        if r["image_id"] not in images:
            raise InputError(f"result {i}: image id {r['image_id']} is not in {ann.path}")
        if r["category_id"] not in cats:
            raise InputError(f"result {i}: category id {r['category_id']} is not in {ann.path}")
        seg = r["segmentation"]
        h, w = images[r["image_id"]]
        if not isinstance(seg, dict) or not isinstance(seg.get("counts"), (str, bytes)):
            raise InputError(f"result {i}: segmentation must be compressed RLE {{size, counts}}")
        if list(seg.get("size", [])) != [h, w]:
            where = f"image {r['image_id']}'s [{h}, {w}]"
            raise InputError(f"result {i}: RLE size {seg.get('size')} is not {where}")
        counts = seg["counts"].decode("ascii") if isinstance(seg["counts"], bytes) else seg["counts"]
        out.append({"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"],
                    "segmentation": {"size": [h, w], "counts": counts}})  # fmt: skip
    return out


def mask_ground_truth(ann: DetectionAnnotations) -> dict[str, Any]:
    """The annotation dict as both APIs read it for mask AP: every annotation with an ``area`` (its mask's
    where the file has none), crowd regions marked ``ignore`` (LVIS) and ``iscrowd`` (COCO), the images'
    federated lists defaulting to []."""
    from pycocotools import mask as mask_utils

    sizes = {im["id"]: (im["height"], im["width"]) for im in ann.raw["images"]}
    anns = []
    for a in ann.raw["annotations"]:
        a = {"iscrowd": 0, **a}
        if "area" not in a:
            h, w = sizes[a["image_id"]]
            a["area"] = float(mask_utils.area(segmentation_rle(a["segmentation"], h, w)))
        if a["iscrowd"]:
            a["ignore"] = 1
        anns.append(a)
    images = [{"neg_category_ids": [], "not_exhaustive_category_ids": [], **im} for im in ann.raw["images"]]
    return {**ann.raw, "annotations": anns, "images": images}


def evaluate_masks(
    ann: DetectionAnnotations,
    records: Sequence[dict[str, Any]],
    protocol: str = "auto",
    max_dets: int | None = None,
    frequencies: Sequence[str] | None = None,
    evaluator: str = "auto",
) -> DetectionMetrics:
    """Mask AP of ``records`` on ``ann`` (module docstring): ``protocol`` ``lvis``, ``coco`` or ``auto`` (LVIS
    when every category has a ``frequency``); ``max_dets`` by default the protocol's (300 / 100);
    ``frequencies`` (COCO): the r / c / f group of each class, by default LVIS's rule on this file's image
    counts; ``evaluator``: the LVIS protocol's program (``auto``, ``lvis``, ``faster_coco_eval``;
    :func:`gradtail.metrics.detection.lvis_evaluator`).

    Example:
        >>> import json, tempfile, pathlib
        >>> from gradtail.data.detection.instance import read_instance_json
        >>> square = [[5, 5, 25, 5, 25, 25, 5, 25]]
        >>> doc = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 40,
        ...                    "neg_category_ids": [], "not_exhaustive_category_ids": []}],
        ...        "categories": [{"id": 1, "name": "a", "frequency": "f"}],
        ...        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20],
        ...                         "area": 400, "segmentation": square}]}
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "gt.json"
        >>> _ = p.write_text(json.dumps(doc))
        >>> ann = read_instance_json(p)
        >>> from gradtail.data.detection.masks import decode_segmentation, encode_mask
        >>> rle = encode_mask(decode_segmentation(square, 40, 40))
        >>> m = evaluate_masks(ann, [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": rle}])
        >>> m.protocol, round(m["AP"], 6)
        ('lvis', 1.0)
    """
    if protocol not in ("auto", "lvis", "coco"):
        raise ConfigError(f"instance protocol must be auto, lvis or coco, got {protocol!r}")
    if protocol == "lvis" or (protocol == "auto" and ann.is_lvis):
        if not ann.is_lvis:
            raise ConfigError(f"{ann.path}: not LVIS-format (a category lacks 'frequency'); use coco")
        max_dets = MAX_DETS if max_dets is None else max_dets
        return lvis_metrics(ann, records, "segm", max_dets, evaluator, _check_mask_records, mask_ground_truth)
    max_dets = 100 if max_dets is None else max_dets
    return coco_metrics(
        ann, records, "segm", max_dets, frequencies, _check_mask_records, mask_ground_truth, "pycocotools"
    )


def evaluate_instances(
    ann: DetectionAnnotations,
    records: Sequence[dict[str, Any]],
    protocol: str = "auto",
    max_dets: int | None = None,
    frequencies: Sequence[str] | None = None,
    evaluator: str = "auto",
) -> InstanceMetrics:
    """Mask AP (:func:`evaluate_masks`) and box AP (:func:`~gradtail.metrics.detection.evaluate_detections`)
    of the same records, both through ``evaluator`` where the protocol is LVIS's."""
    boxes = [{k: r[k] for k in ("image_id", "category_id", "bbox", "score") if k in r} for r in records]
    segm = evaluate_masks(ann, records, protocol, max_dets, frequencies, evaluator)
    bbox = evaluate_detections(ann, boxes, protocol, max_dets, frequencies, evaluator)
    return InstanceMetrics(segm, bbox)


__all__ = [
    "BOX_PREFIX",
    "InstanceMetrics",
    "detector_records",
    "evaluate_instances",
    "evaluate_masks",
    "instance_records",
    "mask_ground_truth",
]
