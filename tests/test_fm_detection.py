"""The Fashion-MNIST detection benchmark: LVIS-format, long-tailed r / c / f, deterministic from the seed,
hashed, train / val from training images (disjoint), test from test images."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gradtail.data.detection.fm_benchmark import FMDetectionSpec, build_fm_detection
from gradtail.data.detection.lvis import read_detection_json
from gradtail.data.fashion_mnist import resolve_fashion_mnist_dir
from gradtail.errors import ConfigError, DataError

try:
    resolve_fashion_mnist_dir(download=False)
except DataError:
    pytest.skip("Fashion-MNIST files not available", allow_module_level=True)

SMALL = FMDetectionSpec(
    train_counts=(120, 60, 40, 30, 20, 15, 12, 9, 4, 2), val_per_class=3, test_per_class=6
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return build_fm_detection(tmp_path_factory.mktemp("fm") / "bench", SMALL)


def test_groups_counts_and_lvis_fields(bench) -> None:  # type: ignore[no-untyped-def]
    train = read_detection_json(bench.annotation_file("train"))
    assert train.is_lvis and train.num_classes == 10
    assert train.instance_counts().tolist() == list(SMALL.train_counts)
    assert train.image_counts().tolist() == list(SMALL.train_counts)  # one instance of a class per scene
    assert train.frequencies() == ["f", "c", "c", "c", "c", "c", "c", "r", "r", "r"]
    test = read_detection_json(bench.annotation_file("test"))
    assert test.instance_counts().tolist() == [6] * 10
    assert [c.frequency for c in test.categories] == train.frequencies()  # the training split's groups
    for img in test.images:  # exhaustive annotation: negatives = every absent category
        present = {int(v) + 1 for v in img.labels}
        assert set(img.neg_category_ids) == set(range(1, 11)) - present
        assert img.not_exhaustive_category_ids == ()
        assert 1 <= len(img.labels) <= SMALL.max_objects
        assert (img.boxes >= 0).all() and (img.boxes <= SMALL.canvas).all()


def test_sources_are_disjoint_and_from_the_right_split(bench) -> None:  # type: ignore[no-untyped-def]
    src = {}
    for split in ("train", "val", "test"):
        doc = json.loads(bench.annotation_file(split).read_text())
        src[split] = {a["fashion_mnist_index"] for a in doc["annotations"]}
    assert not src["train"] & src["val"]
    assert max(src["test"]) < 10_000  # indices into the 10,000 test images


def test_deterministic_from_the_seed_and_hashed(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    again = build_fm_detection(tmp_path / "again", SMALL)
    assert again.sha256 == bench.sha256
    other = build_fm_detection(tmp_path / "other", replace(SMALL, seed=1))
    assert other.sha256 != bench.sha256
    # reuse when intact; a modified file is detected and the benchmark rebuilt identically
    png = sorted((tmp_path / "again" / "images" / "train").glob("*.png"))[0]
    png.write_bytes(b"tampered")
    rebuilt = build_fm_detection(tmp_path / "again", SMALL)
    assert rebuilt.sha256 == bench.sha256 and png.read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["sha256"] == bench.sha256 and manifest["spec"]["seed"] == 0


def test_boxes_are_tight_on_the_pixels(bench) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    ann = read_detection_json(bench.annotation_file("val"))
    img = ann.images[0]
    pixels = np.asarray(Image.open(bench.image_root / img.file_name))
    for x1, y1, x2, y2 in img.boxes.astype(int):
        inside = pixels[y1:y2, x1:x2]
        assert inside.max() > SMALL.box_threshold
        assert (inside[0] > SMALL.box_threshold).any() or (inside[:, 0] > SMALL.box_threshold).any()


def test_bad_spec() -> None:
    with pytest.raises(ConfigError, match="train_counts"):
        build_fm_detection("/nonexistent", replace(SMALL, train_counts=(1, 2)))
