"""Box detection metrics through the reference implementations (docs/detection.md §Evaluation).

- LVIS-format ground truth (every category has ``frequency``): the official ``lvis`` API (``LVISEval``,
  iou_type bbox): AP over IoU 0.50:0.95, AP50, AP75, APs / APm / APl, APr / APc / APf, federated
  (only categories positive in an image or in its ``neg_category_ids`` are evaluated there; unmatched
  detections of ``not_exhaustive_category_ids`` are not false positives), at most ``max_dets`` (300)
  detections per image, the highest-scoring kept (docs/methods/eql.md §9).
- COCO-format ground truth: pycocotools' ``COCOeval`` (crowd boxes are ignore regions), maxDets
  (1, 10, ``max_dets``), 100 by default as in COCO's protocol; APr / APc / APf are then the mean
  per-class AP over each frequency group,
  the groups given by the caller (the training set's r / c / f) or, by default, LVIS's rule applied to
  the evaluated file's image counts.

Per-class AP (IoU 0.50:0.95, all areas) is read from the evaluator's precision array, the same numbers
its own summaries average. Values are fractions in [0, 1]; NaN where the evaluator has nothing to average
(it reports -1 there), e.g. APr when no rare category has a ground-truth box.

``lvis`` 0.5.3 (the current release) calls ``np.float``, removed in NumPy 1.24: the evaluation runs
inside :func:`numpy_float_alias`, which defines ``np.float = float`` for its duration only.

LVIS evaluators (``evaluator``, docs/detection.md §Evaluation): ``lvis`` is the official API;
``faster_coco_eval`` is faster-coco-eval's C++ ``COCOeval_faster`` in its LVIS mode (``lvis_style``: the
same federated rules), given exactly what the official ``LVISResults`` keeps (each image's ``max_dets``
highest-scoring detections, ties in input order). ``auto`` (the default) takes ``faster_coco_eval`` when
it is installed and the ground truth marks no annotation ``iscrowd`` or ``ignore`` (the one place the two
differ: the official API treats such a box as an ignore region matched by plain IoU, faster-coco-eval
by crowd IoU), else the official API. Every field gradtail reports (the summary and per-class AP) was
found equal to the official API's to 1e-6 on the test cases and on an LVIS-sized case, boxes and masks
(``benchmarks/lvis_eval.py``, ``tests/test_lvis_evaluators.py``); the metrics record which one ran.

The packages are optional (the ``detection`` extra); importing this module does not need them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gradtail.data.detection.lvis import FREQUENCIES, DetectionAnnotations, frequency_from_image_count
from gradtail.errors import ConfigError, InputError

SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
RECALL_KEYS = ("AR", "ARs", "ARm", "ARl")  # at max_dets: read by the evaluator comparison, not reported
MAX_DETS = 300
EVALUATORS = ("auto", "lvis", "faster_coco_eval")
# faster-coco-eval's stats_as_dict names -> the official API's result keys (AR at max_dets)
_FASTER_KEYS = {
    "AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small", "APm": "AP_medium",
    "APl": "AP_large", "APr": "APr", "APc": "APc", "APf": "APf", "AR": "AR_all", "ARs": "AR_small",
    "ARm": "AR_medium", "ARl": "AR_large",
}  # fmt: skip


@contextlib.contextmanager
def numpy_float_alias() -> Iterator[None]:
    """``np.float = float`` while the block runs (``lvis`` 0.5.3 still uses the removed alias); the
    ``lvis`` loggers' routine warnings are silenced meanwhile."""
    had = "float" in np.__dict__
    logger = logging.getLogger("lvis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    if not had:
        np.float = float  # type: ignore[attr-defined]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # lvis calls logger.warn
            yield
    finally:
        logger.setLevel(level)
        if not had:
            del np.float  # type: ignore[attr-defined]


def _require(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(
            f"detection evaluation needs the {module!r} package: pip install 'gradtail[detection]'"
        ) from None


@dataclass
class DetectionMetrics:
    """Summary metrics (``values``: fractions, NaN = undefined), per-class AP (NaN: no ground truth), the
    protocol; a :class:`gradtail.contracts.EvalReport` whose primary metric is AP."""

    values: dict[str, float]
    per_class_ap: np.ndarray
    protocol: str
    num_detections: int
    frequencies: list[str] = field(default_factory=list)
    evaluator: str = ""  # the program that computed it: lvis, faster_coco_eval, pycocotools ("" = none ran)
    primary_metric: ClassVar[str] = "AP"

    def __getitem__(self, key: str) -> float:
        return self.values[key]

    @property
    def primary(self) -> float:
        """AP (0 when undefined, so an epoch without any detection never looks best)."""
        ap = self.values["AP"]
        return 0.0 if ap != ap else float(ap)

    def summary(self) -> dict[str, float | None]:
        """AP, AP50, AP75, APs/m/l, APr/c/f (None where undefined): an epoch's record."""
        return {k: (None if v != v else float(v)) for k, v in self.values.items()}

    def val_record(self) -> dict[str, float | None]:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """The summary, per-class AP, the protocol and the number of detections (``final.json``)."""
        return {
            **self.summary(),
            "per_class_ap": [None if v != v else float(v) for v in self.per_class_ap.tolist()],
            "frequencies": list(self.frequencies),
            "protocol": self.protocol,
            "evaluator": self.evaluator,
            "num_detections": int(self.num_detections),
        }


def detection_records(
    image_id: int,
    boxes_xyxy: Any,
    scores: Any,
    labels: Any,
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """COCO/LVIS result records of one image: ``{"image_id", "category_id", "bbox": [x, y, w, h],
    "score"}``; ``labels`` are contiguous class indices mapped through ``category_ids``."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not (len(b) == len(s) == len(lab)):
        raise InputError(f"boxes ({len(b)}), scores ({len(s)}) and labels ({len(lab)}) differ in length")
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_ids[int(k)]),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "score": float(sc),
        }
        for (x1, y1, x2, y2), sc, k in zip(b, s, lab, strict=True)
    ]


def _check_records(records: Sequence[dict[str, Any]], ann: DetectionAnnotations) -> list[dict[str, Any]]:
    images = {im.id for im in ann.images}
    cats = set(ann.category_ids)
    out = []
    for i, r in enumerate(records):
        if not {"image_id", "category_id", "bbox", "score"} <= set(r):
            raise InputError(f"detection {i}: needs image_id, category_id, bbox, score; got {sorted(r)}")
        if r["image_id"] not in images:
            raise InputError(f"detection {i}: image id {r['image_id']} is not in {ann.path}")
        if r["category_id"] not in cats:
            raise InputError(f"detection {i}: category id {r['category_id']} is not in {ann.path}")
        out.append({k: r[k] for k in ("image_id", "category_id", "bbox", "score")})
    return out


def _nan(v: float) -> float:
    return math.nan if v is None or v < 0 else float(v)


def _per_class(precision: np.ndarray) -> np.ndarray:
    """(T, R, K, A[, M]) precision -> (K,) mean over IoU and recall of the entries > -1, 'all' area."""
    p = precision[..., 0] if precision.ndim == 4 else precision[:, :, :, 0, -1]
    out = np.full(p.shape[2], math.nan)
    for k in range(p.shape[2]):
        v = p[:, :, k]
        if (v > -1).any():
            out[k] = float(v[v > -1].mean())
    return out


def lvis_ground_truth(ann: DetectionAnnotations) -> dict[str, Any]:
    """The annotation dict as the ``lvis`` API reads it: ``area`` = w h where missing, the images' federated
    lists default to [] where missing, crowd boxes (COCO) marked ``ignore``."""
    raw = ann.raw
    anns = []
    for a in raw["annotations"]:
        a = dict(a)
        a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
        if a.get("iscrowd", 0):
            a["ignore"] = 1
        anns.append(a)
    images = [{"neg_category_ids": [], "not_exhaustive_category_ids": [], **im} for im in raw["images"]]
    return {**raw, "annotations": anns, "images": images}


def lvis_evaluator(requested: str, ground_truth: dict[str, Any]) -> str:
    """The LVIS evaluator that runs for ``requested`` (``auto``, ``lvis``, ``faster_coco_eval``; module
    docstring): ``auto`` is ``faster_coco_eval`` where it is installed and no annotation is crowd/ignore."""
    if requested not in EVALUATORS:
        raise ConfigError(f"LVIS evaluator must be one of {', '.join(EVALUATORS)}, got {requested!r}")
    if requested != "auto":
        return requested
    marked = any(a.get("iscrowd", 0) or a.get("ignore", 0) for a in ground_truth["annotations"])
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return "lvis"
    return "lvis" if marked else "faster_coco_eval"


def top_detections_per_image(dets: Sequence[dict[str, Any]], max_dets: int) -> list[dict[str, Any]]:
    """Each image's ``max_dets`` highest-scoring detections, ties kept in input order: what the official
    ``LVISResults`` keeps (a stable sort by score, descending)."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    kept: list[dict[str, Any]] = []
    for image_dets in by_image.values():
        kept += sorted(image_dets, key=lambda d: d["score"], reverse=True)[:max_dets]
    return kept


def federated_detections(
    ground_truth: dict[str, Any], dets: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The detections LVIS's federated protocol evaluates: those of a category annotated in their image
    or listed in its ``neg_category_ids`` (both evaluators drop the others before matching). Applied
    after the per-image cap, as the official API applies it; faster-coco-eval gets only these (its mask
    mode fails on an image whose detections it would all drop and that has no annotation)."""
    images = ground_truth["images"]
    verified: dict[int, set[int]] = {im["id"]: set(im.get("neg_category_ids", [])) for im in images}
    for a in ground_truth["annotations"]:
        verified[a["image_id"]].add(a["category_id"])
    return [d for d in dets if d["category_id"] in verified.get(d["image_id"], ())]


def run_lvis_eval(
    ground_truth: dict[str, Any],
    dets: Sequence[dict[str, Any]],
    iou_type: str,
    max_dets: int = MAX_DETS,
    evaluator: str = "auto",
) -> tuple[dict[str, float], np.ndarray, str]:
    """LVIS evaluation of ``dets`` (checked result records, non-empty) on the LVIS-format ``ground_truth``
    dict, ``iou_type`` ``bbox`` or ``segm``: ``(results, precision, evaluator)``, the results keyed as the
    official API keys them (:data:`SUMMARY_KEYS`, :data:`RECALL_KEYS`; -1 = undefined), the precision
    array (T, R, K, A[, M]) and the evaluator that ran (:func:`lvis_evaluator`)."""
    name = lvis_evaluator(evaluator, ground_truth)
    if name == "lvis":
        lvis = _require("lvis")
        quiet = contextlib.redirect_stdout(io.StringIO())
        with tempfile.TemporaryDirectory() as tmp, numpy_float_alias(), quiet:
            gt_file = Path(tmp) / "gt.json"
            gt_file.write_text(json.dumps(ground_truth))
            gt = lvis.LVIS(str(gt_file))
            dt = lvis.LVISResults(gt, [dict(d) for d in dets], max_dets=max_dets)  # it adds keys: copies
            ev = lvis.LVISEval(gt, dt, iou_type=iou_type)
            ev.params.max_dets = max_dets
            ev.run()
        results = {k: float(ev.results[k]) for k in SUMMARY_KEYS}
        results.update({k: float(ev.results[f"{k}@{max_dets}"]) for k in RECALL_KEYS})
        return results, ev.eval["precision"], name
    fce = _require("faster_coco_eval")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = fce.COCO()  # the evaluator adds keys to the records it is given: it is given copies
        gt.dataset = {
            **ground_truth,
            "images": [dict(im) for im in ground_truth["images"]],
            "annotations": [dict(a) for a in ground_truth["annotations"]],
        }
        gt.createIndex()
        kept = federated_detections(ground_truth, top_detections_per_image(dets, max_dets))
        dt = gt.loadRes([dict(d) for d in kept])
        ev = fce.COCOeval_faster(gt, dt, iouType=iou_type, lvis_style=True, print_function=lambda *a: None)
        ev.params.maxDets = [max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats = ev.stats_as_dict
    return {k: float(stats[v]) for k, v in _FASTER_KEYS.items()}, ev.eval["precision"], name


#: ``check(records, ann)``: the records an evaluator is given, checked against the annotations (one-line
#: :class:`InputError` naming a bad record): :func:`_check_records` for boxes, the instance task's for masks.
RecordCheck = Callable[[Sequence[dict[str, Any]], DetectionAnnotations], list[dict[str, Any]]]


def lvis_metrics(
    ann: DetectionAnnotations,
    records: Sequence[dict[str, Any]],
    iou_type: str,
    max_dets: int,
    evaluator: str,
    check: RecordCheck,
    ground_truth: Callable[[DetectionAnnotations], dict[str, Any]],
) -> DetectionMetrics:
    """LVIS AP of ``records`` (``iou_type`` ``bbox`` or ``segm``) on the LVIS-format ``ann``: the records
    checked by ``check``, the evaluator given ``ground_truth(ann)`` (:func:`run_lvis_eval`); every defined
    AP 0 when there is no record."""
    dets = check(records, ann)
    freqs = [c.frequency or "" for c in ann.categories]
    if not dets:  # the API cannot load an empty result list: every defined AP is 0
        return _empty(ann, freqs, "lvis")
    results, precision, name = run_lvis_eval(ground_truth(ann), dets, iou_type, max_dets, evaluator)
    summary = {k: _nan(results[k]) for k in SUMMARY_KEYS}
    return DetectionMetrics(summary, _per_class(precision), "lvis", len(dets), freqs, evaluator=name)


def evaluate_lvis(
    ann: DetectionAnnotations,
    records: Sequence[dict[str, Any]],
    max_dets: int = MAX_DETS,
    evaluator: str = "auto",
) -> DetectionMetrics:
    """LVIS box AP through the official ``lvis`` API or faster-coco-eval's equal one (module docstring)."""
    if not ann.is_lvis:
        raise ConfigError(f"{ann.path}: not LVIS-format (a category lacks 'frequency'); use evaluate_coco")
    return lvis_metrics(ann, records, "bbox", max_dets, evaluator, _check_records, lvis_ground_truth)


def coco_frequencies(ann: DetectionAnnotations, frequencies: Sequence[str] | None) -> list[str]:
    """The r / c / f group of each class under COCO's protocol: ``frequencies`` (checked), by default the
    file's own (LVIS's rule on its image counts where a category has none)."""
    if frequencies is None:
        frequencies = [
            c.frequency or frequency_from_image_count(int(n))
            for c, n in zip(ann.categories, ann.image_counts(), strict=True)
        ]
    if len(frequencies) != ann.num_classes or any(f not in FREQUENCIES for f in frequencies):
        raise ConfigError(f"frequencies must be {ann.num_classes} values among r, c, f")
    return list(frequencies)


def coco_box_ground_truth(ann: DetectionAnnotations) -> dict[str, Any]:
    """The annotation dict as pycocotools reads it for box AP: ``iscrowd`` 0 and ``area`` w h where
    missing."""
    annotations = [
        {"iscrowd": 0, **a, "area": a.get("area", float(a["bbox"][2]) * float(a["bbox"][3]))}
        for a in ann.raw["annotations"]
    ]
    return {**ann.raw, "annotations": annotations}


def run_coco_eval(
    ground_truth: dict[str, Any],
    dets: Sequence[dict[str, Any]],
    iou_type: str,
    max_dets: int,
    category_ids: Sequence[int],
) -> tuple[dict[str, float], np.ndarray]:
    """pycocotools' ``COCOeval`` of ``dets`` (checked, non-empty) on ``ground_truth``, ``iou_type``
    ``bbox`` or ``segm``, maxDets (1, 10, ``max_dets``): AP, AP50, AP75, APs / APm / APl at ``max_dets``
    (NaN = nothing to average) and per-class AP."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(list(dets))
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.params.maxDets = [1, 10, max_dets]
        ev.params.catIds = sorted(category_ids)
        ev.evaluate()
        ev.accumulate()
    # COCOeval.summarize() reads AP at maxDets 100 whatever params.maxDets holds: read the same means at
    # max_dets from the precision array (T, R, K, A, M), as its _summarize does (-1 = nothing to average)
    prec = ev.eval["precision"][..., -1]
    iou = ev.params.iouThrs

    def mean(p: np.ndarray) -> float:
        return float(p[p > -1].mean()) if (p > -1).any() else math.nan

    summary = {
        "AP": mean(prec[:, :, :, 0]),
        "AP50": mean(prec[np.isclose(iou, 0.5)][:, :, :, 0]),
        "AP75": mean(prec[np.isclose(iou, 0.75)][:, :, :, 0]),
        "APs": mean(prec[:, :, :, 1]),
        "APm": mean(prec[:, :, :, 2]),
        "APl": mean(prec[:, :, :, 3]),
    }
    return summary, _per_class(ev.eval["precision"])


def coco_metrics(
    ann: DetectionAnnotations,
    records: Sequence[dict[str, Any]],
    iou_type: str,
    max_dets: int,
    frequencies: Sequence[str] | None,
    check: RecordCheck,
    ground_truth: Callable[[DetectionAnnotations], dict[str, Any]],
    evaluator: str = "",
) -> DetectionMetrics:
    """COCO AP of ``records`` (``iou_type`` ``bbox`` or ``segm``) through pycocotools
    (:func:`run_coco_eval` on ``ground_truth(ann)``), APr / APc / APf the mean per-class AP of each group
    (:func:`coco_frequencies`); ``evaluator``: the name the metrics record (box AP's records leave it
    empty)."""
    _require("pycocotools")
    freqs = coco_frequencies(ann, frequencies)
    dets = check(records, ann)
    if not dets:
        return _empty(ann, freqs, "coco")
    summary, per_class = run_coco_eval(ground_truth(ann), dets, iou_type, max_dets, ann.category_ids)
    summary.update(_group_means(per_class, freqs))
    return DetectionMetrics(summary, per_class, "coco", len(dets), freqs, evaluator=evaluator)


def evaluate_coco(
    ann: DetectionAnnotations,
    records: Sequence[dict[str, Any]],
    max_dets: int = 100,
    frequencies: Sequence[str] | None = None,
) -> DetectionMetrics:
    """COCO box AP through pycocotools, APr / APc / APf from per-class AP (module docstring)."""
    return coco_metrics(ann, records, "bbox", max_dets, frequencies, _check_records, coco_box_ground_truth)


def _group_means(per_class: np.ndarray, freqs: Sequence[str]) -> dict[str, float]:
    out = {}
    for g in FREQUENCIES:
        v = [a for a, f in zip(per_class, freqs, strict=True) if f == g and not math.isnan(a)]
        out[f"AP{g}"] = float(np.mean(v)) if v else math.nan
    return out


def _empty(ann: DetectionAnnotations, freqs: list[str], protocol: str) -> DetectionMetrics:
    """No detection at all: AP 0 for every class with ground truth (what both evaluators give for a class
    whose detections all miss), NaN elsewhere."""
    has_gt = ann.instance_counts() > 0
    per_class = np.where(has_gt, 0.0, math.nan)
    summary = {k: (0.0 if has_gt.any() else math.nan) for k in ("AP", "AP50", "AP75")}
    summary.update({k: math.nan for k in ("APs", "APm", "APl")})
    summary.update(_group_means(per_class, freqs))
    return DetectionMetrics(summary, per_class, protocol, 0, freqs)


def evaluate_detections(
    ann: DetectionAnnotations,
    records: Sequence[dict[str, Any]],
    protocol: str = "auto",
    max_dets: int | None = None,
    frequencies: Sequence[str] | None = None,
    evaluator: str = "auto",
) -> DetectionMetrics:
    """``protocol``: ``"lvis"``, ``"coco"``, or ``"auto"`` (LVIS when the file is LVIS-format);
    ``max_dets``: detections per image, by default the protocol's (LVIS 300, COCO 100); ``evaluator``:
    the LVIS protocol's program, ``auto``, ``lvis`` or ``faster_coco_eval`` (module docstring; COCO's is
    pycocotools).

    Example:
        >>> import json, tempfile, pathlib
        >>> from gradtail.data.detection.lvis import read_detection_json
        >>> from gradtail.metrics.detection import evaluate_detections
        >>> image = {"id": 1, "file_name": "a.png", "width": 50, "height": 50,
        ...          "neg_category_ids": [2], "not_exhaustive_category_ids": []}
        >>> cats = [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"}]
        >>> boxes = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400}]
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "gt.json"
        >>> _ = p.write_text(json.dumps({"images": [image], "categories": cats, "annotations": boxes}))
        >>> perfect = [{"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "score": 0.9}]
        >>> m = evaluate_detections(read_detection_json(p), perfect)
        >>> m.protocol, round(m["AP"], 6), round(m["APf"], 6), m["APr"]  # no rare box: APr undefined
        ('lvis', 1.0, 1.0, nan)
    """
    if protocol not in ("auto", "lvis", "coco"):
        raise ConfigError(f"detection protocol must be auto, lvis or coco, got {protocol!r}")
    if evaluator not in EVALUATORS:
        raise ConfigError(f"LVIS evaluator must be one of {', '.join(EVALUATORS)}, got {evaluator!r}")
    if protocol == "lvis" or (protocol == "auto" and ann.is_lvis):
        return evaluate_lvis(ann, records, MAX_DETS if max_dets is None else max_dets, evaluator)
    return evaluate_coco(
        ann, records, max_dets=100 if max_dets is None else max_dets, frequencies=frequencies
    )
