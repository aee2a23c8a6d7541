"""The Fashion-MNIST instance segmentation benchmark: the scenes of the detection benchmark
(:mod:`gradtail.data.detection.fm_benchmark`), each object with its own mask (docs/instance.md §3; the
spec: ``instance.md`` §3).

Scenes are rendered exactly as the detection benchmark renders them, with the same draws from the same
seed (a ``canvas`` x ``canvas`` canvas, 1 to ``max_objects`` real Fashion-MNIST images resized to a random
side and pasted with a maximum blend; long-tailed train counts, balanced val and test): with equal
fields the images are the detection benchmark's, pixel for pixel. What this module adds is the **mask**
of every object: the pixels of its own resized glyph above ``box_threshold`` (its silhouette, not its
box; the box stays the tight box of those pixels, so it is the mask's box), written as compressed RLE
(``counts`` a string) in the LVIS-format files, with ``area`` the number of mask pixels (LVIS's and
COCO's convention). Objects may overlap (boxes up to ``max_iou``); each mask is its own glyph's pixels,
so two masks may share pixels where the glyphs do.

Layout under ``root``: ``{train,val,test}.json``, ``images/{split}/{id:06d}.png`` and ``manifest.json`` with
the spec and the SHA-256 over every file: :func:`build_fm_instance` reuses intact files whose manifest
matches the spec and rebuilds otherwise (a changed spec or a tampered file), the same files each time.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradtail.data.detection.fm_benchmark import SPLITS, FMDetectionSpec, _crop_box, _hash_files, _iou, _pack
from gradtail.data.detection.lvis import frequency_from_image_count
from gradtail.data.detection.masks import encode_mask
from gradtail.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from gradtail.errors import ConfigError, DataError

FORMAT_VERSION = 1
MASK_FORMATS = ("rle",)


@dataclass(frozen=True)
class FMInstanceSpec(FMDetectionSpec):
    """The detection benchmark's fields (:class:`~gradtail.data.detection.fm_benchmark.FMDetectionSpec`)
    plus how the masks are written; every field enters the manifest and the hash."""

    mask_format: str = "rle"  # compressed RLE, counts as a string
    instance_version: int = field(default=FORMAT_VERSION)

    def check(self) -> None:
        super().check()
        if self.mask_format not in MASK_FORMATS:
            formats = ", ".join(MASK_FORMATS)
            raise ConfigError(f"mask_format must be one of {formats}, got {self.mask_format!r}")


@dataclass
class FMInstance:
    """A built benchmark: where its files are and their hash."""

    root: Path
    spec: FMInstanceSpec
    sha256: str

    def annotation_file(self, split: str) -> Path:
        return self.root / f"{split}.json"

    @property
    def image_root(self) -> Path:
        return self.root / "images"


def _render_split(
    spec: FMInstanceSpec,
    images: np.ndarray,
    labels: np.ndarray,
    pool: np.ndarray,
    per_class: list[int],
    rng: np.random.Generator,
    split: str,
    out_dir: Path,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The detection benchmark's rendering (same draws in the same order), with each object's mask."""
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
            mask = np.zeros((spec.canvas, spec.canvas), dtype=np.uint8)
            mask[y0 : y0 + side, x0 : x0 + side] = patch > spec.box_threshold
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": sid,
                    "category_id": int(labels[fm_index]) + 1,
                    "bbox": [float(box[0]), float(box[1]), float(w), float(h)],
                    "area": float(mask.sum()),
                    "segmentation": encode_mask(mask),
                    "iscrowd": 0,
                    "fashion_mnist_index": fm_index,
                }
            )
        buf = io.BytesIO()
        Image.fromarray(canvas, mode="L").save(buf, format="PNG", optimize=False)
        (out_dir / f"{sid:06d}.png").write_bytes(buf.getvalue())
        image_entries.append(
            {"id": sid, "file_name": f"{split}/{sid:06d}.png", "width": spec.canvas, "height": spec.canvas}
        )
    return image_entries, anns


def build_fm_instance(
    root: str | os.PathLike[str], spec: FMInstanceSpec | None = None, data_dir: str | None = None
) -> FMInstance:
    """Build (or reuse, when ``root/manifest.json`` matches the spec and the files hash to it) the
    benchmark. ``data_dir``: the Fashion-MNIST folder, as for
    :func:`~gradtail.data.fashion_mnist.load_fashion_mnist`."""
    spec = spec or FMInstanceSpec()
    spec.check()
    root = Path(root)
    manifest_path = root / "manifest.json"
    want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            manifest = {}
        if manifest.get("spec") == want and manifest.get("kind") == "fm_instance":
            try:
                if _hash_files(root) == manifest.get("sha256"):
                    return FMInstance(root, spec, manifest["sha256"])
            except OSError:
                pass
    train = load_fashion_mnist(True, data_dir, download=False)
    test = load_fashion_mnist(False, data_dir, download=False)
    tr_img, tr_lab = train.images[:, 0].numpy(), train.labels.numpy()
    te_img, te_lab = test.images[:, 0].numpy(), test.labels.numpy()
    rng = np.random.default_rng(spec.seed)
    num = len(CLASS_NAMES)
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
        rendered[split] = _render_split(spec, imgs, labs, pool, counts, rng, split, out)
    train_images = np.zeros(num, dtype=np.int64)
    per_image: dict[int, set[int]] = {}
    for a in rendered["train"][1]:
        per_image.setdefault(a["image_id"], set()).add(a["category_id"])
    for cats in per_image.values():
        for c in cats:
            train_images[c - 1] += 1
    categories = [
        {
            "id": c + 1,
            "name": CLASS_NAMES[c],
            "frequency": frequency_from_image_count(int(train_images[c])),
            "image_count": int(train_images[c]),
        }
        for c in range(num)
    ]
    for split, (image_entries, anns) in rendered.items():
        present: dict[int, set[int]] = {}
        for a in anns:
            present.setdefault(a["image_id"], set()).add(a["category_id"])
        for im in image_entries:
            here = present.get(im["id"], set())
            im["neg_category_ids"] = [c["id"] for c in categories if c["id"] not in here]
            im["not_exhaustive_category_ids"] = []
        doc = {
            "info": {"description": f"Fashion-MNIST instance segmentation benchmark ({split})", "spec": want},
            "images": image_entries,
            "annotations": anns,
            "categories": categories,
        }
        (root / f"{split}.json").write_text(json.dumps(doc))
    digest = _hash_files(root)
    manifest_path.write_text(json.dumps({"kind": "fm_instance", "spec": want, "sha256": digest}, indent=1))
    return FMInstance(root, spec, digest)


__all__ = ["SPLITS", "FMInstance", "FMInstanceSpec", "build_fm_instance"]
