"""Instance masks of LVIS v1 / COCO annotation files (docs/instance.md §3; the spec: ``instance.md`` §3).

An annotation's ``segmentation`` is one of

- polygons: a list of polygons, each a flat list ``[x1, y1, x2, y2, ...]`` of at least 3 points (LVIS,
  COCO objects), merged into one mask;
- uncompressed RLE: ``{"size": [h, w], "counts": [n0, n1, ...]}`` (COCO crowd regions), run lengths in
  column-major order starting with a background run, summing to h w;
- compressed RLE: ``{"size": [h, w], "counts": "<string>"}`` (results files, the Fashion-MNIST instance
  benchmark), pycocotools' LEB128-like string of the same run lengths.

:func:`check_segmentation` validates the structure when a file is read (one line naming the file and the
entry); :func:`decode_segmentation` decodes one object's mask with ``pycocotools.mask`` when its image is
loaded (masks are never held for the whole set) and checks a compressed string's run lengths first
(pycocotools decodes a malformed string into garbage without a word). :func:`encode_mask` writes a binary
mask as compressed RLE with ``counts`` as a ``str`` (the LVIS / COCO results format).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from gradtail.errors import ConfigError, DataError

#: The COCO / LVIS field of an object's mask (a named constant: the literal is also a task's name, which only
#: gradtail.tasks may compare with).
SEGMENTATION_FIELD = "segmentation"


def _mask_utils() -> Any:
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise ConfigError("instance masks need 'pycocotools': pip install 'gradtail[detection]'") from None
    return mask_utils


def rle_string_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed RLE string (pycocotools' ``rleFrString``), or None when the string
    is not one (a character outside '0'..'o', a truncated value, a negative run).

    Example:
        >>> rle_string_counts(";230004")
        [11, 2, 3, 2, 3, 2, 7]
    """
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        if x < 0:
            return None
        out.append(x)
    return out


def check_segmentation(seg: Any, height: int, width: int) -> str | None:
    """What is wrong with ``seg`` as the segmentation of an object in an image of ``height`` x ``width``
    (module docstring), or None. Structure only: a compressed string's run lengths are checked when it is
    decoded."""
    if isinstance(seg, list):
        if not seg:
            return "segmentation is an empty list of polygons"
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly
            ):
                return f"segmentation polygon {k} must be a list of numbers [x1, y1, x2, y2, ...]"
            if len(poly) < 6 or len(poly) % 2:
                return f"segmentation polygon {k} needs an even number (>= 6) of coordinates, got {len(poly)}"
            if not all(math.isfinite(v) for v in poly):
                return f"segmentation polygon {k} has a non-finite coordinate"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if size is None or counts is None:
            return "an RLE segmentation needs 'size' [h, w] and 'counts'"
        if list(size) != [height, width]:
            return f"RLE size {size} differs from the image's [{height}, {width}]"
        if isinstance(counts, str):
            return None
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                return "uncompressed RLE counts must be integers >= 0"
            if sum(counts) != height * width:
                return f"uncompressed RLE counts sum to {sum(counts)}, not h w = {height * width}"
            return None
        return f"RLE counts must be a string or a list of integers, got {type(counts).__name__}"
    return f"segmentation must be polygons (a list) or RLE (an object), got {type(seg).__name__}"


def segmentation_rle(seg: Any, height: int, width: int) -> dict[str, Any]:
    """The compressed RLE (pycocotools' form, ``counts`` as bytes) of a checked segmentation; a malformed
    compressed string is a :class:`ValueError`."""
    mask_utils = _mask_utils()
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in seg], height, width))
    counts = seg["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    runs = rle_string_counts(counts)
    if runs is None or sum(runs) != height * width:
        raise ValueError("its compressed RLE string is malformed (run lengths do not cover the image)")
    return {"size": [height, width], "counts": counts.encode("ascii")}


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """The (height, width) uint8 {0, 1} mask of a checked segmentation (polygons, uncompressed or
    compressed RLE); a malformed compressed string is a :class:`ValueError`.

    Example:
        >>> m = decode_segmentation([[1, 1, 4, 1, 4, 3, 1, 3]], 5, 6)  # a polygon (pycocotools rasterises it)
        >>> m.shape, int(m.sum())
        ((5, 6), 6)
        >>> bool((decode_segmentation(encode_mask(m), 5, 6) == m).all())  # compressed RLE round trip
        True
    """
    rle = segmentation_rle(seg, height, width)
    with warnings.catch_warnings():  # pycocotools 2.0.x on NumPy 2: a DeprecationWarning per call (copy=)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _mask_utils().decode(rle)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A binary (h, w) mask as compressed RLE with ``counts`` as ``str`` (the results format)."""
    rle = _mask_utils().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """(n, h, w) binary masks as compressed RLE, ``counts`` as ``str``, in one pycocotools call."""
    if masks.shape[0] == 0:
        return []
    rles = _mask_utils().encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def mask_failure(path: Any, where: str, problem: str) -> DataError:
    """The one-line error of a segmentation: the file, the entry, the problem."""
    return DataError(f"{path}: {where}: {problem}")


__all__ = [
    "SEGMENTATION_FIELD",
    "check_segmentation",
    "decode_segmentation",
    "encode_mask",
    "encode_masks",
    "mask_failure",
    "rle_string_counts",
    "segmentation_rle",
]
