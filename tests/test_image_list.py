"""Image-list datasets on a generated image tree: parsing, transforms, loader determinism, errors."""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradtail.data.image_list import (
    ImageListDataset,
    ImageListLoader,
    imagenet_transform,
    known_splits,
    load_image_list_split,
    parse_image_list,
)
from gradtail.data.samplers import create_sampler
from gradtail.errors import ConfigError, DataError

SIZE = 32
# (relative path, label): PNG and JPEG, RGB and grayscale, names with spaces.
ENTRIES = [
    ("n01/a_0.png", 0),
    ("n01/a_1.jpg", 0),
    ("n01/a_2.png", 0),
    ("n01/a 3.jpg", 0),
    ("n01/a_4.png", 0),
    ("class two/b 0.png", 1),
    ("class two/b 1.jpg", 1),
    ("class two/b_2.png", 1),
    ("c/c_0.jpg", 2),
    ("c/c gray.png", 2),
]


def _write_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for i, (rel, _) in enumerate(ENTRIES):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = 36 + 3 * i, 44 - 2 * i
        if "gray" in rel:
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L").save(path)
        else:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB").save(path)


def _write_list(path: Path, entries, blank_lines: bool = False) -> Path:
    lines = []
    for k, (rel, label) in enumerate(entries):
        lines.append(f"{rel} {label}")
        if blank_lines and k % 4 == 1:
            lines.append("   ")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "images"
    _write_tree(root)
    return root, _write_list(tmp_path / "train.txt", ENTRIES, blank_lines=True)


def _line_of(list_file: Path, rel: str) -> int:
    for n, line in enumerate(list_file.read_text().splitlines(), start=1):
        if line.startswith(rel + " "):
            return n
    raise AssertionError(rel)


# ---------------------------------------------------------------------------------------------- parsing
def test_parse_paths_labels_and_spaces(tree):
    root, lst = tree
    paths, labels = parse_image_list(lst, root)
    assert paths == [root / rel for rel, _ in ENTRIES]
    assert labels.dtype == np.int64
    assert labels.tolist() == [y for _, y in ENTRIES]
    ds = ImageListDataset(lst, root)
    assert ds.num_classes == 3  # inferred: max + 1
    assert ds.class_counts() == [5, 3, 2]
    assert ds.paths == paths
    assert ds.lines.tolist() == [_line_of(lst, rel) for rel, _ in ENTRIES]
    assert ImageListDataset(lst, root, num_classes=5).class_counts() == [5, 3, 2, 0, 0]


def test_dataset_items_and_transforms(tree):
    root, lst = tree
    train = ImageListDataset(lst, root, transform=imagenet_transform(True, size=SIZE))
    test = ImageListDataset(lst, root, transform=imagenet_transform(False, size=SIZE))
    for i in range(len(train)):
        x, y = train[i]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert y == ENTRIES[i][1]
    gray = [rel for rel, _ in ENTRIES].index("c/c gray.png")
    assert ImageListDataset(lst, root)[gray][0].mode == "RGB"
    a, b = test[3][0], test[3][0]
    assert a.shape == (3, SIZE, SIZE)
    assert torch.equal(a, b)  # the test transform is deterministic
    with pytest.raises(IndexError):
        test[len(test)]


def test_default_transform_sizes():
    img = Image.new("RGB", (300, 260))
    assert imagenet_transform(True)(img).shape == (3, 224, 224)
    assert imagenet_transform(False)(img).shape == (3, 224, 224)
    with pytest.raises(ConfigError):
        imagenet_transform(False, size=224, resize=200)


# ---------------------------------------------------------------------------------------------- loading
def _batches(loader, epoch):
    loader.set_epoch(epoch)
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _train_loader(root, lst, **kw):
    ds = ImageListDataset(lst, root, transform=imagenet_transform(True, size=SIZE))
    sampler = create_sampler("class_balanced", ds.labels, ds.num_classes, seed=3, num_samples=12)
    return ImageListLoader(ds, batch_size=4, sampler=sampler, train=True, seed=7, **kw)


def test_loader_is_reproducible_by_seed_and_epoch(tree):
    root, lst = tree
    loader = _train_loader(root, lst)
    assert loader.images is None
    assert loader.labels.tolist() == [y for _, y in ENTRIES]
    assert len(loader) == 3
    rng_before = torch.get_rng_state()
    x1, y1 = _batches(loader, 1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    assert x1.shape == (12, 3, SIZE, SIZE) and y1.dtype == torch.int64
    x1b, y1b = _batches(loader, 1)
    assert torch.equal(x1, x1b) and torch.equal(y1, y1b)
    x2, _ = _batches(loader, 2)
    assert not torch.equal(x1, x2)
    # Worker processes (persistent, two of them) give the very same batches.
    workers = _train_loader(root, lst, num_workers=2)
    for epoch in (2, 1):
        xw, yw = _batches(workers, epoch)
        ref = (x1, y1) if epoch == 1 else (x2, None)
        assert torch.equal(xw, ref[0])
    assert torch.equal(yw, y1)
    workers.close()  # stop the workers early; iterating again starts new ones
    assert torch.equal(_batches(workers, 1)[0], x1)
    workers.close()


def test_rank_slices_are_disjoint_and_augment_like_one_process(tree):
    root, lst = tree
    one = _train_loader(root, lst)
    ranks = [_train_loader(root, lst, rank=r, world_size=2) for r in range(2)]
    for ld in [one, *ranks]:
        ld.set_epoch(4)
    full = one.order()
    parts = [ld.order() for ld in ranks]
    assert torch.equal(parts[0], full[0::2]) and torch.equal(parts[1], full[1::2])
    assert [len(ld) for ld in ranks] == [2, 2]  # 6 samples each, batches of 4
    x_one, _ = _batches(one, 4)
    for r, ld in enumerate(ranks):
        x_r, y_r = _batches(ld, 4)
        assert torch.equal(x_r, x_one[r::2])  # a sample's augmentation does not depend on the world size
        assert y_r.tolist() == ld.labels[parts[r]].tolist()
    # Evaluation: sequential, strided by rank, together exactly the dataset.
    test = ImageListDataset(lst, root, transform=imagenet_transform(False, size=SIZE))
    evals = [ImageListLoader(test, 3, train=False, rank=r, world_size=2) for r in range(2)]
    seen = [ld.order().tolist() for ld in evals]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(test)))
    y0 = torch.cat([y for _, y in evals[0]])
    assert y0.tolist() == [ENTRIES[i][1] for i in seen[0]]


def test_drop_last_and_bad_settings(tree):
    root, lst = tree
    ds = ImageListDataset(lst, root, transform=imagenet_transform(False, size=SIZE))
    loader = ImageListLoader(ds, 4, train=False, drop_last=True)
    assert len(loader) == 2 and sum(x.shape[0] for x, _ in loader) == 8
    assert len(ImageListLoader(ds, 4, train=False)) == 3
    for kw in ({"batch_size": 0}, {"batch_size": 2, "num_workers": -1}, {"batch_size": 2, "rank": 2}):
        with pytest.raises(ConfigError):
            ImageListLoader(ds, **kw)


# ---------------------------------------------------------------------------------------------- errors
def _names_line(err: pytest.ExceptionInfo, list_file: Path, line: int) -> None:
    msg = str(err.value)
    assert str(list_file) in msg, msg
    assert re.search(rf"(:{line}\b|line {line}\b)", msg), msg


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("lonely_token.png", "relative/path label"),
        ("n01/a_0.png zero", "not an integer"),
        ("n01/a_0.png 1.5", "not an integer"),
        ("n01/a_0.png -1", "outside"),
        ("n01/a_0.png 9", "outside"),
    ],
)
def test_bad_lines_name_file_and_line(tree, tmp_path, bad, match):
    root, _ = tree
    lst = tmp_path / "bad.txt"
    lst.write_text("n01/a_0.png 0\n\nn01/a_1.jpg 1\n" + bad + "\nc/c_0.jpg 2\n")
    with pytest.raises(DataError, match=match) as err:
        parse_image_list(lst, root, num_classes=3)
    _names_line(err, lst, 4)


def test_missing_images_name_lines(tree, tmp_path):
    root, _ = tree
    lst = tmp_path / "missing.txt"
    rows = [*ENTRIES[:2], ("n01/nope.png", 0), ENTRIES[2]] + [(f"gone/{k}.png", 1) for k in range(8)]
    _write_list(lst, rows)
    with pytest.raises(DataError, match="9 listed image") as err:
        parse_image_list(lst, root)
    _names_line(err, lst, 3)
    assert "nope.png" in str(err.value) and "and 4 more" in str(err.value)
    paths, _ = parse_image_list(lst, root, check_files=False)
    assert len(paths) == len(rows)


def test_missing_or_empty_list_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        parse_image_list(tmp_path / "none.txt", tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="no entries"):
        parse_image_list(tmp_path / "empty.txt", tmp_path)
    with pytest.raises(ConfigError):
        parse_image_list(tmp_path / "empty.txt", tmp_path, num_classes=0)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_names_file_and_line(tree, kind):
    root, lst = tree
    victim = root / "class two" / "b 1.jpg"
    if kind == "garbage":
        victim.write_bytes(b"this is not an image at all")
    else:
        victim.write_bytes(victim.read_bytes()[:200])
    line = _line_of(lst, "class two/b 1.jpg")
    ds = ImageListDataset(lst, root, transform=imagenet_transform(False, size=SIZE))
    with pytest.raises(DataError, match="cannot decode") as err:
        ds[[rel for rel, _ in ENTRIES].index("class two/b 1.jpg")]
    _names_line(err, lst, line)
    assert str(victim) in str(err.value)
    loader = ImageListLoader(ds, 4, train=False, num_workers=1)
    with pytest.raises(DataError) as err:  # also through a worker process
        list(loader)
    _names_line(err, lst, line)
    assert loader._loader._iterator is None  # the failed workers were shut down


# ---------------------------------------------------------------------------------------------- known splits
def test_known_splits_table():
    specs = known_splits()
    assert {n: s.num_classes for n, s in specs.items()} == {
        "imagenet_lt": 1000,
        "places_lt": 365,
        "inat2018": 8142,
    }
    assert specs["imagenet_lt"].files["train"] == ("ImageNet_LT_train.txt", 115_846)
    assert specs["imagenet_lt"].files["test"][1] == 50_000
    assert specs["places_lt"].files["val"] == ("Places_LT_val.txt", 7_300)
    assert specs["inat2018"].files["train"] == ("iNaturalist18_train.txt", 437_513)
    assert specs["inat2018"].files["val"][1] == 24_426


def test_load_split_finds_list_and_warns_on_size(tree, tmp_path):
    root, _ = tree
    lists = tmp_path / "lists"
    (lists / "ImageNet_LT").mkdir(parents=True)
    _write_list(lists / "ImageNet_LT" / "ImageNet_LT_train.txt", ENTRIES)
    with pytest.warns(UserWarning, match="115846"):
        ds = load_image_list_split("imagenet_lt", "train", root, list_dir=lists)
    assert ds.num_classes == 1000 and len(ds.class_counts()) == 1000
    assert ds.class_counts()[:3] == [5, 3, 2]
    _write_list(root / "Places_LT_val.txt", [(rel, 364) for rel, _ in ENTRIES])  # list_dir defaults to root
    with warnings.catch_warnings(record=True):
        assert load_image_list_split("places_lt", "val", root).labels.max() == 364
    with pytest.raises(DataError, match=r"Places_LT_test\.txt"):
        load_image_list_split("places_lt", "test", root)
    with pytest.raises(ConfigError, match="inat2018"):
        load_image_list_split("inaturalist", "train", root)
    with pytest.raises(ConfigError, match="valid: train, val"):
        load_image_list_split("inat2018", "test", root)
