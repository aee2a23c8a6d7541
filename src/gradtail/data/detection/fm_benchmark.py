"""Fashion-MNIST detection benchmark: long-tailed scenes of real Fashion-MNIST images, written in LVIS format
(docs/detection.md §Benchmark).

Every scene is a ``canvas`` x ``canvas`` grayscale canvas holding 1 to ``max_objects`` real Fashion-MNIST
images, each resized (bilinear) to a random side in ``[min_size, max_size]`` and pasted at a random
position (maximum blend on a black background; placements overlapping an earlier object by more than
``max_iou`` are redrawn). The box of an object is the tight box of its pixels above ``box_threshold``.

Splits:

- ``train``: scenes from the Fashion-MNIST *training* images, the per-class instance counts long-tailed
  (``train_counts``, head class first, by default 240 ... 3 over the ten classes, the class order of the
  dataset). Instances are spread over scenes so that a class appears at most once per scene where
  possible, so a class's number of training images equals its instance count and its LVIS group follows:
  r (1-10 images), c (11-100), f (> 100). With the defaults: f = {T-shirt/top, Trouser},
  c = {Pullover, Dress, Coat, Sandal, Shirt}, r = {Sneaker, Bag, Ankle boot}.
- ``val``: balanced scenes (``val_per_class`` instances per class) from training images held out from the
  train scenes (carved first, so train and val never share a Fashion-MNIST image).
- ``test``: balanced scenes (``test_per_class`` per class) from the Fashion-MNIST *test* images.

Annotation files are LVIS v1 style: categories carry ``frequency`` (the training split's group, in all
three files) and ``image_count``; scenes are exhaustively annotated, so each image's
``neg_category_ids`` lists every category it does not contain and ``not_exhaustive_category_ids`` is
empty (LVIS evaluation is then exhaustive evaluation). Layout under ``root``: ``{split}.json`` and
``images/{split}/{id:06d}.png`` (file names relative to ``root/images``), plus ``manifest.json`` with the
spec and the SHA-256 of every written file (the dataset hash recorded in run records). Everything is a
pure function of the spec and the seed: :func:`build_fm_detection` regenerates nothing when the manifest
matches and the files hash to it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradtail.data.detection.lvis import frequency_from_image_count
from gradtail.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from gradtail.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FMDetectionSpec:
    """What the benchmark is made of (module docstring); every field enters the manifest and the hash."""

    seed: int = 0
    canvas: int = 64
    min_size: int = 20
    max_size: int = 34
    max_objects: int = 3
    max_iou: float = 0.1
    box_threshold: int = 16
    train_counts: tuple[int, ...] = (240, 148, 91, 56, 34, 21, 13, 8, 5, 3)
    val_per_class: int = 8
    test_per_class: int = 40
    version: int = field(default=FORMAT_VERSION)

    def check(self) -> None:
        if len(self.train_counts) != len(CLASS_NAMES) or min(self.train_counts) < 1:
            raise ConfigError(f"train_counts must be {len(CLASS_NAMES)} counts >= 1, got {self.train_counts}")
        if not 8 <= self.min_size <= self.max_size <= self.canvas:
            sizes = f"{self.min_size}, {self.max_size}, {self.canvas}"
            raise ConfigError(f"need 8 <= min_size <= max_size <= canvas, got {sizes}")
        if self.max_objects < 1 or self.val_per_class < 1 or self.test_per_class < 1:
            raise ConfigError("max_objects, val_per_class and test_per_class must be >= 1")


@dataclass
class FMDetection:
    """A built benchmark: where its files are and their hash."""

    root: Path
    spec: FMDetectionSpec
    sha256: str

    def annotation_file(self, split: str) -> Path:
        return self.root / f"{split}.json"

    @property
    def image_root(self) -> Path:
        return self.root / "images"


def _crop_box(patch: np.ndarray, threshold: int) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(patch > threshold)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _pack(classes: np.ndarray, max_objects: int, rng: np.random.Generator) -> list[list[int]]:
    """Spread instance indices over scenes of 1..max_objects objects, one instance of a class per scene
    where possible (most frequent classes placed first)."""
    n = len(classes)
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(1, max_objects + 1)))
    sizes[-1] -= sum(sizes) - n
    sizes = [s for s in sizes if s > 0]
    scenes: list[list[int]] = [[] for _ in sizes]
    has: list[set[int]] = [set() for _ in sizes]
    order = sorted(range(n), key=lambda i: (-int(np.sum(classes == classes[i])), int(classes[i]), i))
    for i in order:
        c = int(classes[i])
        open_ = [s for s in range(len(sizes)) if len(scenes[s]) < sizes[s]]
        fits = [s for s in open_ if c not in has[s]] or open_
        s = fits[int(rng.integers(len(fits)))]
        scenes[s].append(i)
        has[s].add(c)
    rng.shuffle(scenes)  # type: ignore[arg-type]
    return scenes


#: What an annotation records of its object besides ids, box and source: ``fields(spec, patch, (x0, y0),
#: box)`` of the resized glyph ``patch`` pasted at ``(x0, y0)`` with tight box ``box`` (x1, y1, x2, y2).
ObjectFields = Callable[
    [FMDetectionSpec, np.ndarray, tuple[int, int], tuple[int, int, int, int]], dict[str, Any]
]


def box_fields(
    spec: FMDetectionSpec, patch: np.ndarray, origin: tuple[int, int], box: tuple[int, int, int, int]
) -> dict[str, Any]:
    """The detection benchmark's: ``area``, the box's."""
    return {"area": float((box[2] - box[0]) * (box[3] - box[1]))}


def _render_split(
    spec: FMDetectionSpec,
    images: np.ndarray,
    labels: np.ndarray,
    pool: np.ndarray,
    per_class: list[int],
    rng: np.random.Generator,
    split: str,
    out_dir: Path,
    object_fields: ObjectFields = box_fields,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The scenes of one split (module docstring): the PNGs written to ``out_dir``, their image entries and
    annotations, each annotation with its ``object_fields``."""
    from PIL import Image

    chosen: list[int] = []
    for c, k in enumerate(per_class):
        cand = pool[labels[pool] == c]
        if len(cand) < k:
            raise DataError(f"Fashion-MNIST has {len(cand)} images of class {c} for {split}, {k} needed")
        chosen += rng.choice(cand, size=k, replace=False).tolist()
    src = np.asarray(chosen, dtype=np.int64)
    scenes = _pack(labels[src], spec.max_objects, rng)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_entries, anns = [], []
    for sid, members in enumerate(scenes, start=1):
        canvas = np.zeros((spec.canvas, spec.canvas), dtype=np.uint8)
        placed: list[tuple[float, ...]] = []
        for m in members:
            fm_index = int(src[m])
            for _attempt in range(50):
                side = int(rng.integers(spec.min_size, spec.max_size + 1))
                x0 = int(rng.integers(0, spec.canvas - side + 1))
                y0 = int(rng.integers(0, spec.canvas - side + 1))
                patch = np.asarray(
                    Image.fromarray(images[fm_index]).resize((side, side), Image.Resampling.BILINEAR)
                )
                tight = _crop_box(patch, spec.box_threshold)
                if tight is None:
                    break
                box = (x0 + tight[0], y0 + tight[1], x0 + tight[2], y0 + tight[3])
                if all(_iou(box, p) <= spec.max_iou for p in placed):
                    break
            if tight is None:
                continue
            region = canvas[y0 : y0 + side, x0 : x0 + side]
            np.maximum(region, patch, out=region)
            placed.append(box)
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": sid,
                    "category_id": int(labels[fm_index]) + 1,
                    "bbox": [float(box[0]), float(box[1]), float(w), float(h)],
                    **object_fields(spec, patch, (x0, y0), box),
                    "iscrowd": 0,
                    "fashion_mnist_index": fm_index,
                }
            )
        name = f"{split}/{sid:06d}.png"
        buf = io.BytesIO()
        Image.fromarray(canvas, mode="L").save(buf, format="PNG", optimize=False)
        (out_dir / f"{sid:06d}.png").write_bytes(buf.getvalue())
        image_entries.append({"id": sid, "file_name": name, "width": spec.canvas, "height": spec.canvas})
    return image_entries, anns


def _hash_files(root: Path) -> str:
    h = hashlib.sha256()
    files = [root / f"{s}.json" for s in SPLITS]
    for s in SPLITS:
        files += sorted((root / "images" / s).glob("*.png"))
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _intact(root: Path, want: dict[str, Any], kind: str | None) -> str | None:
    """The hash of the benchmark under ``root`` when its manifest names ``want`` (and ``kind``) and the
    files hash to it; None when it must be (re)built."""
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        manifest = {}
    if manifest.get("spec") == want and manifest.get("kind") == kind:
        try:
            if _hash_files(root) == manifest.get("sha256"):
                return str(manifest["sha256"])
        except OSError:
            pass
    return None


def _render(
    root: Path, spec: FMDetectionSpec, data_dir: str | None, object_fields: ObjectFields
) -> dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Every split's scenes (images written under ``root/images``), from the spec's seed: val carved first
    from the training images, then the train, val and test scenes."""
    train = load_fashion_mnist(True, data_dir, download=False)
    test = load_fashion_mnist(False, data_dir, download=False)
    tr_img, tr_lab = train.images[:, 0].numpy(), train.labels.numpy()
    te_img, te_lab = test.images[:, 0].numpy(), test.labels.numpy()
    rng = np.random.default_rng(spec.seed)
    num = len(CLASS_NAMES)
    # val carved first from the training images (disjoint from the train scenes' images)
    val_idx = np.concatenate(
        [rng.choice(np.flatnonzero(tr_lab == c), size=spec.val_per_class, replace=False) for c in range(num)]
    )
    train_pool = np.setdiff1d(np.arange(len(tr_lab)), val_idx)
    (root / "images").mkdir(parents=True, exist_ok=True)
    parts = {
        "train": (tr_img, tr_lab, train_pool, list(spec.train_counts)),
        "val": (tr_img, tr_lab, np.sort(val_idx), [spec.val_per_class] * num),
        "test": (te_img, te_lab, np.arange(len(te_lab)), [spec.test_per_class] * num),
    }
    rendered = {}
    for split, (imgs, labs, pool, counts) in parts.items():
        out = root / "images" / split
        for old in out.glob("*.png") if out.is_dir() else []:
            old.unlink()
        rendered[split] = _render_split(spec, imgs, labs, pool, counts, rng, split, out, object_fields)
    return rendered


def _categories(train_anns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The LVIS categories: each class's training images (``image_count``) and frequency group."""
    num = len(CLASS_NAMES)
    train_images = np.zeros(num, dtype=np.int64)
    per_image: dict[int, set[int]] = {}
    for a in train_anns:
        per_image.setdefault(a["image_id"], set()).add(a["category_id"])
    for cats in per_image.values():
        for c in cats:
            train_images[c - 1] += 1
    return [
        {
            "id": c + 1,
            "name": CLASS_NAMES[c],
            "frequency": frequency_from_image_count(int(train_images[c])),
            "image_count": int(train_images[c]),
        }
        for c in range(num)
    ]


def _write_annotations(
    root: Path,
    rendered: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]],
    want: dict[str, Any],
    title: str,
) -> None:
    """``{split}.json`` of every split: exhaustive LVIS files (every absent category negative)."""
    categories = _categories(rendered["train"][1])
    for split, (image_entries, anns) in rendered.items():
        present: dict[int, set[int]] = {}
        for a in anns:
            present.setdefault(a["image_id"], set()).add(a["category_id"])
        for im in image_entries:
            here = present.get(im["id"], set())
            im["neg_category_ids"] = [c["id"] for c in categories if c["id"] not in here]
            im["not_exhaustive_category_ids"] = []
        doc = {
            "info": {"description": f"Fashion-MNIST {title} benchmark ({split})", "spec": want},
            "images": image_entries,
            "annotations": anns,
            "categories": categories,
        }
        (root / f"{split}.json").write_text(json.dumps(doc))


def build_benchmark(
    root: Path,
    spec: FMDetectionSpec,
    data_dir: str | None,
    title: str,
    kind: str | None = None,
    object_fields: ObjectFields = box_fields,
) -> str:
    """Build the benchmark of ``spec`` under ``root`` (or reuse it, when ``root/manifest.json`` names the
    spec and ``kind`` and the files hash to it) and return its hash: the files' descriptions say
    "Fashion-MNIST ``title`` benchmark", the manifest names ``kind`` (when given), each annotation holds
    its ``object_fields``. :func:`build_fm_detection` and the instance benchmark's builder call it."""
    spec.check()
    want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}
    digest = _intact(root, want, kind)
    if digest is not None:
        return digest
    rendered = _render(root, spec, data_dir, object_fields)
    _write_annotations(root, rendered, want, title)
    digest = _hash_files(root)
    manifest = {"kind": kind} if kind is not None else {}
    (root / "manifest.json").write_text(json.dumps({**manifest, "spec": want, "sha256": digest}, indent=1))
    return digest


def build_fm_detection(
    root: str | os.PathLike[str], spec: FMDetectionSpec | None = None, data_dir: str | None = None
) -> FMDetection:
    """Build (or reuse, when ``root/manifest.json`` matches the spec and the files hash to it) the benchmark.

    ``data_dir``: the Fashion-MNIST folder, as for :func:`~gradtail.data.fashion_mnist.load_fashion_mnist`.
    """
    spec = spec or FMDetectionSpec()
    root = Path(root)
    return FMDetection(root, spec, build_benchmark(root, spec, data_dir, "detection"))
