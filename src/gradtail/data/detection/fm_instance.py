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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradtail.data.detection.fm_benchmark import SPLITS, FMDetection, FMDetectionSpec, build_benchmark
from gradtail.data.detection.masks import encode_mask
from gradtail.errors import ConfigError

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
class FMInstance(FMDetection):
    """A built benchmark: where its files are and their hash."""

    spec: FMInstanceSpec


def mask_fields(
    spec: FMDetectionSpec, patch: np.ndarray, origin: tuple[int, int], box: tuple[int, int, int, int]
) -> dict[str, Any]:
    """The instance benchmark's: ``area``, the number of mask pixels, and ``segmentation``, the compressed
    RLE of the mask: the pasted glyph's pixels above ``box_threshold`` (module docstring)."""
    x0, y0 = origin
    side = patch.shape[0]
    mask = np.zeros((spec.canvas, spec.canvas), dtype=np.uint8)
    mask[y0 : y0 + side, x0 : x0 + side] = patch > spec.box_threshold
    return {"area": float(mask.sum()), "segmentation": encode_mask(mask)}


def build_fm_instance(
    root: str | os.PathLike[str], spec: FMInstanceSpec | None = None, data_dir: str | None = None
) -> FMInstance:
    """Build (or reuse, when ``root/manifest.json`` matches the spec and the files hash to it) the
    benchmark: the detection benchmark's scenes, the same draws
    (:func:`~gradtail.data.detection.fm_benchmark.build_benchmark`), with each object's mask.
    ``data_dir``: the Fashion-MNIST folder, as for :func:`~gradtail.data.fashion_mnist.load_fashion_mnist`."""
    spec = spec or FMInstanceSpec()
    root = Path(root)
    digest = build_benchmark(root, spec, data_dir, "instance segmentation", "fm_instance", mask_fields)
    return FMInstance(root, spec, digest)


__all__ = ["SPLITS", "FMInstance", "FMInstanceSpec", "build_fm_instance", "mask_fields"]
