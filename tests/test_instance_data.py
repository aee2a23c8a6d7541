"""Instance segmentation data (instance.md §3): LVIS / COCO files with polygons, uncompressed and compressed
RLE read and decoded per image into ``tv_tensors.Mask`` that the v2 transforms flip and resize with the
image; one-line errors naming the file and the entry (missing / malformed segmentation, a malformed RLE
string, a missing or unreadable image, bad JSON); the Fashion-MNIST instance benchmark (each object's mask
is its own pixels, not its box; the detection benchmark's scenes; long-tailed train, balanced val / test;
a manifest that rebuilds on a changed spec or a tampered file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradtail.data.detection.fm_instance import FMInstanceSpec, build_fm_instance
from gradtail.data.detection.instance import InstanceDataset, read_instance_json
from gradtail.data.detection.lvis import detection_transforms
from gradtail.data.detection.masks import decode_segmentation, encode_mask, rle_string_counts
from gradtail.errors import DataError

TINY = {"train_counts": (30, 20, 14, 11, 8, 6, 4, 3, 2, 1), "val_per_class": 2, "test_per_class": 3}


def _files(tmp_path: Path) -> tuple[dict, Path]:
    """A 2-image file: a polygon, an uncompressed RLE, a compressed RLE object and an image without any."""
    h, w = 20, 30
    square = np.zeros((h, w), np.uint8)
    square[2:8, 3:12] = 1
    column = np.zeros((h, w), np.uint8)
    column[5:18, 20:24] = 1
    flat = column.T.reshape(-1)
    runs, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            runs.append(run)
            value, run = v, 1
    runs.append(run)
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": w, "height": h},
                   {"id": 2, "file_name": "b.png", "width": w, "height": h}],
        "categories": [{"id": 3, "name": "x"}, {"id": 5, "name": "y"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 8, 6],
             "segmentation": [[10, 10, 18, 10, 18, 16, 10, 16]]},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [20, 5, 4, 13],
             "segmentation": {"size": [h, w], "counts": [int(r) for r in runs]}},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [3, 2, 9, 6],
             "segmentation": encode_mask(square)},
        ],
    }  # fmt: skip
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / name)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    return doc, path


def test_polygons_and_rle_decode_per_image_into_masks_that_follow_the_transforms(tmp_path: Path) -> None:
    doc, path = _files(tmp_path)
    ann = read_instance_json(path)
    ds = InstanceDataset(ann, tmp_path, None)
    _, target = ds[0]
    masks = target["masks"]
    assert type(masks).__name__ == "Mask" and masks.shape == (3, 20, 30) and masks.dtype == torch.uint8
    expected = [decode_segmentation(a["segmentation"], 20, 30) for a in doc["annotations"]]
    for k in range(3):
        assert torch.equal(masks[k], torch.from_numpy(expected[k]))
    assert int(masks[1].sum()) == 13 * 4 and int(masks[2].sum()) == 6 * 9
    _, empty = ds[1]
    assert empty["masks"].shape == (0, 20, 30)  # an image without objects
    flip = detection_transforms(True, flip_prob=1.0)
    _, flipped = InstanceDataset(ann, tmp_path, flip)[0]
    assert torch.equal(flipped["masks"], masks.flip(-1))
    x1 = float(flipped["boxes"][2, 0])
    assert x1 == 30 - 12  # the box flipped with its mask
    resize = detection_transforms(False, min_size=40)
    _, resized = InstanceDataset(ann, tmp_path, resize)[0]
    assert resized["masks"].shape == (3, 40, 60) and int(resized["masks"][2].sum()) == 4 * 6 * 9


def test_crowd_regions_are_not_training_masks(tmp_path: Path) -> None:
    doc, path = _files(tmp_path)
    doc["annotations"][1]["iscrowd"] = 1
    path.write_text(json.dumps(doc))
    ann = read_instance_json(path)
    _, target = InstanceDataset(ann, tmp_path, None)[0]
    assert target["masks"].shape[0] == len(target["labels"]) == 2


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda a: a.pop("segmentation"), "annotations[0] (id 1): missing field 'segmentation'"),
        (lambda a: a.update(segmentation=[[1, 2, 3]]), "needs an even number (>= 6) of coordinates, got 3"),
        (lambda a: a.update(segmentation=[]), "empty list of polygons"),
        (lambda a: a.update(segmentation={"size": [5, 5], "counts": "abc"}), "RLE size [5, 5] differs"),
        (lambda a: a.update(segmentation={"size": [20, 30], "counts": [3, 4]}), "counts sum to 7"),
        (lambda a: a.update(segmentation=7), "must be polygons (a list) or RLE (an object)"),
    ],
)
def test_a_bad_segmentation_is_one_line_naming_the_file_and_entry(
    tmp_path: Path, change, fragment: str
) -> None:
    doc, path = _files(tmp_path)
    change(doc["annotations"][0])
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as info:
        read_instance_json(path)
    message = str(info.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message


def test_a_malformed_rle_string_is_named_when_its_image_is_decoded(tmp_path: Path) -> None:
    doc, path = _files(tmp_path)
    doc["annotations"][2]["segmentation"]["counts"] = "0"  # pycocotools would decode garbage from it
    path.write_text(json.dumps(doc))
    ann = read_instance_json(path)
    with pytest.raises(DataError) as info:
        InstanceDataset(ann, tmp_path, None)[0]
    assert "annotation id 3 (image 1)" in str(info.value) and "malformed" in str(info.value)
    assert rle_string_counts("0") == [0] and rle_string_counts("zz") is None


def test_corrupt_or_missing_files_are_one_line_errors(tmp_path: Path) -> None:
    _, path = _files(tmp_path)
    path.write_text('{"images": [')
    with pytest.raises(DataError, match=r"ann\.json: not valid JSON \(line 1"):
        read_instance_json(path)
    with pytest.raises(DataError, match="annotation file not found"):
        read_instance_json(tmp_path / "missing.json")
    _, path = _files(tmp_path)
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as info:
        InstanceDataset(read_instance_json(path), tmp_path, None)[0]
    assert str(tmp_path / "a.png") in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------- the benchmark
@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fm_instance")
    build_fm_instance(root, FMInstanceSpec(**TINY))
    return root


def test_benchmark_masks_are_the_objects_own_pixels_not_their_boxes(fm: Path) -> None:
    ann = read_instance_json(fm / "train.json")
    ds = InstanceDataset(ann, fm / "images", None)
    smaller = 0
    for index in range(len(ds)):
        image, target = ds[index]
        gray = image[0].numpy()
        for box, mask in zip(target["boxes"].tolist(), target["masks"].numpy(), strict=True):
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box  # the box is the mask's box
            assert (gray[mask.astype(bool)] > 16).all()  # its pixels are bright glyph pixels
            smaller += int(mask.sum() < (box[2] - box[0]) * (box[3] - box[1]))
        raw = {a["id"]: a for a in ann.raw["annotations"]}
        for aid, seg in ann.segmentations[ann.images[index].id]:
            assert raw[aid]["area"] == float(decode_segmentation(seg, 64, 64).sum())
            assert isinstance(seg["counts"], str)
    assert smaller == sum(len(im.labels) for im in ann.images)  # every mask is smaller than its box


def test_benchmark_splits_and_the_detection_benchmarks_scenes(fm: Path, tmp_path: Path) -> None:
    from gradtail.data.detection.fm_benchmark import FMDetectionSpec, build_fm_detection

    train = read_instance_json(fm / "train.json")
    assert train.instance_counts().tolist() == list(TINY["train_counts"])
    for split, per_class in (("val", 2), ("test", 3)):
        assert read_instance_json(fm / f"{split}.json").instance_counts().tolist() == [per_class] * 10
    assert [c.frequency for c in train.categories] == ["c"] * 4 + ["r"] * 6
    det = build_fm_detection(tmp_path / "det", FMDetectionSpec(**TINY))
    for split in ("train", "val", "test"):
        for png in sorted((det.root / "images" / split).glob("*.png")):
            assert png.read_bytes() == (fm / "images" / split / png.name).read_bytes()


def test_benchmark_manifest_reuses_and_rebuilds(tmp_path: Path) -> None:
    root = tmp_path / "fm"
    first = build_fm_instance(root, FMInstanceSpec(**TINY))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["kind"] == "fm_instance" and manifest["sha256"] == first.sha256
    assert manifest["spec"]["mask_format"] == "rle"
    stamp = (root / "train.json").stat().st_mtime_ns
    assert build_fm_instance(root, FMInstanceSpec(**TINY)).sha256 == first.sha256
    assert (root / "train.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    (root / "images" / "test" / "000001.png").write_bytes(b"tampered")
    assert build_fm_instance(root, FMInstanceSpec(**TINY)).sha256 == first.sha256  # regenerated identically
    changed = build_fm_instance(root, FMInstanceSpec(**{**TINY, "seed": 1}))
    assert changed.sha256 != first.sha256
