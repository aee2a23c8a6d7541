"""Own data (image_folder, image_csv, npz): classes, counts and images come from the data; splits,
long-tailed subsets, normalisation, both storage paths, training with every loss, and one-line errors.

Every dataset here is generated in ``tmp_path`` in the exact on-disk format a user would have.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gradtail.cli.main import main
from gradtail.config import DataConfig, config_from_dict, load_config
from gradtail.data.builder import DATASETS, build_data
from gradtail.data.bundle import ClassificationData
from gradtail.data.longtail import build_longtail_split
from gradtail.data.own_data import channel_statistics, stratified_holdout
from gradtail.data.synthetic import make_synthetic
from gradtail.engine.trainer import Trainer
from gradtail.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["cat", "dog", "owl"]


# ---------------------------------------------------------------------------------------------- writers
def _image(rng: np.random.Generator, label: int, size: tuple[int, int], mode: str) -> Image.Image:
    """A random image whose brightness depends on its class (a learnable task)."""
    h, w = size
    base = rng.integers(0, 80, (h, w, 3) if mode == "RGB" else (h, w)) + 60 * label
    return Image.fromarray(base.clip(0, 255).astype(np.uint8), mode=mode)


def write_tree(
    root: Path,
    counts: dict[str, dict[str, int]],
    size: tuple[int, int] = (8, 8),
    mode: str = "L",
    seed: int = 0,
) -> Path:
    """``root/<split>/<class>/<i>.png`` for ``counts[split][class]`` images (split ``""``: one tree)."""
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for name, n in per_class.items():
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(rng, sorted(per_class).index(name), size, mode).save(folder / f"{i:03d}.png")
    return root


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return path


def tree_rows(root: Path, split: str) -> list[tuple[str, str]]:
    """(path relative to ``root``, class folder) of every image under ``root/split``."""
    return [(p.relative_to(root).as_posix(), p.parent.name) for p in sorted((root / split).rglob("*.png"))]


def dcfg(**data) -> DataConfig:
    """A data config as a YAML file gives it (nested settings as mappings)."""
    return config_from_dict({"data": data}).data


def balanced(n: int, classes: list[str] = CLASSES) -> dict[str, int]:
    return dict.fromkeys(classes, n)


def tiny_run(data: dict, **sections) -> dict:
    cfg = {
        "name": "own_tiny",
        "data": {"augment": {"crop_padding": 1, "hflip": True}, **data},
        "model": {"name": "small_cnn", "params": {"width": 4}},
        "loss": {"name": "ce"},
        "optim": {"lr": 0.05, "batch_size": 16, "epochs": 1, "warmup_epochs": 0, "schedule": "cosine"},
        "train": {"seed": 0, "progress": False, "diagnostics": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def one_line_error(cfg: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``gradtail train`` on ``cfg``: it must return 2 and print exactly one ``gradtail: error:`` line."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", str(path), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("gradtail: error: "), err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------------------- classes
def test_image_folder_takes_classes_counts_and_size_from_the_data(tmp_path):
    root = write_tree(tmp_path / "pets", {"train": {"cat": 20, "dog": 10, "owl": 5}, "test": balanced(4)})
    data = build_data(dcfg(dataset="image_folder", data_dir=str(root)))
    assert isinstance(data, ClassificationData) and data.storage == "memory"
    assert data.class_names == CLASSES and data.num_classes == 3 and data.in_channels == 1
    # validation: a stratified 10% of each class (at least one), the rest trains
    assert data.split.val_counts == [2, 1, 1] and data.class_counts == [18, 9, 4]
    assert len(data.test) == 12 and data.test.class_counts() == [4, 4, 4]
    prep = data.preprocessing()
    assert prep["size"] == [8, 8] and prep["mode"] == "L" and prep["resize_to_size"] is False
    assert data.stored_size == (1, 8, 8) and data.pad_to is None
    subset = data.describe()
    assert subset["imbalance_factor"] is None and subset["source"]["val_from"] == "split_fractions.val=0.1"


def test_csv_labels_as_names_integers_and_class_list(tmp_path):
    root = write_tree(tmp_path / "imgs", {"train": {"cat": 6, "dog": 4, "owl": 2}, "test": balanced(2)})
    lists = tmp_path / "lists"
    lists.mkdir()
    train_rows, test_rows = tree_rows(root, "train"), tree_rows(root, "test")
    base = {"dataset": "image_csv", "data_dir": str(lists), "image_root": str(root)}
    # names: classes sorted by name
    write_csv(lists / "train.csv", train_rows[::-1])
    write_csv(lists / "test.csv", test_rows)
    data = build_data(dcfg(**base))
    assert data.class_names == CLASSES and sum(data.class_counts) + sum(data.split.val_counts) == 12
    assert data.class_counts == [5, 3, 1] and data.split.val_counts == [1, 1, 1]
    # integers: the labels themselves, names "0".."C-1"
    order = {"owl": 0, "cat": 1, "dog": 2}
    write_csv(lists / "train.csv", [(p, str(order[c])) for p, c in train_rows])
    write_csv(lists / "test.csv", [(p, str(order[c])) for p, c in test_rows])
    data = build_data(dcfg(**base))
    assert data.class_names == ["0", "1", "2"] and data.class_counts == [1, 5, 3]
    # a class list names integer labels (and orders name labels)
    (lists / "classes.txt").write_text("owl\ncat\ndog\n")
    data = build_data(dcfg(**base, class_list="classes.txt"))
    assert data.class_names == ["owl", "cat", "dog"] and data.class_counts == [1, 5, 3]


def test_csv_single_file_and_relative_paths(tmp_path):
    root = write_tree(tmp_path / "imgs", {"": {"cat": 10, "dog": 10}})
    rows = [(p.relative_to(root).as_posix(), p.parent.name) for p in sorted(root.rglob("*.png"))]
    single = write_csv(root / "all.csv", rows)  # paths relative to the CSV's folder
    data = build_data(dcfg(dataset="image_csv", data_dir=str(single), split_fractions={"test": 0.2}))
    assert data.class_names == ["cat", "dog"] and data.test.class_counts() == [2, 2]
    assert data.class_counts == [7, 7] and data.split.val_counts == [1, 1]


def test_npz_layouts_value_ranges_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    y_train, y_test = np.repeat([0, 1, 2], [12, 8, 4]), np.repeat([0, 1, 2], 2)
    nhwc = rng.integers(0, 256, (24, 6, 5, 3), dtype=np.uint8)
    test_nhwc = rng.integers(0, 256, (6, 6, 5, 3), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(
        path,
        x_train=nhwc,
        y_train=y_train,
        x_test=test_nhwc,
        y_test=y_test,
        class_names=np.array(["a", "b", "c"]),
    )
    data = build_data(dcfg(dataset="npz", data_dir=str(path), split_fractions={"val": 0}))
    assert data.class_names == ["a", "b", "c"] and data.class_counts == [12, 8, 4]
    assert data.in_channels == 3 and data.stored_size == (3, 6, 5) and data.val is None
    assert torch.equal(data.train.images, torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    # the same images channels-first, and as floats in [0, 1], read to the same uint8 images
    for x_train, x_test in [
        (nhwc.transpose(0, 3, 1, 2), test_nhwc.transpose(0, 3, 1, 2)),
        (nhwc / 255.0, test_nhwc / 255.0),
    ]:
        np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        again = build_data(dcfg(dataset="npz", data_dir=str(path), split_fractions={"val": 0}))
        assert torch.equal(again.train.images, data.train.images)
        assert again.class_names == ["0", "1", "2"]
    # N,H,W grayscale, string labels, a folder holding the one .npz
    (tmp_path / "gray").mkdir()
    gray = rng.integers(0, 256, (24, 7, 7), dtype=np.uint8)
    np.savez(
        tmp_path / "gray" / "g.npz",
        x_train=gray,
        y_train=np.array(["x", "y", "z"])[y_train],
        x_test=gray[:6],
        y_test=np.array(["z", "y", "x", "x", "y", "z"]),
    )
    data = build_data(dcfg(dataset="npz", data_dir=str(tmp_path / "gray")))
    assert data.class_names == ["x", "y", "z"] and data.in_channels == 1
    assert sum(data.class_counts) + sum(data.split.val_counts) == 24


def test_npz_ambiguous_or_out_of_range_images_are_errors(tmp_path):
    path = tmp_path / "d.npz"
    y = np.array([0, 1])
    np.savez(
        path,
        x_train=np.zeros((2, 3, 5, 3), np.uint8),
        y_train=y,
        x_test=np.zeros((2, 3, 5, 3), np.uint8),
        y_test=y,
    )
    with pytest.raises(DataError, match=r"x_train has shape \(2, 3, 5, 3\): its layout is ambiguous"):
        build_data(dcfg(dataset="npz", data_dir=str(path)))
    np.savez(
        path,
        x_train=np.linspace(0, 200, 32).reshape(2, 4, 4),
        y_train=y,
        x_test=np.zeros((2, 4, 4)),
        y_test=y,
    )
    with pytest.raises(DataError, match=r"floats in \[0, 200\]: float images must be in \[0, 1\]"):
        build_data(dcfg(dataset="npz", data_dir=str(path)))


def test_class_list_orders_folder_labels(tmp_path):
    root = write_tree(tmp_path / "pets", {"train": {"cat": 6, "dog": 4, "owl": 2}, "test": balanced(1)})
    (root / "classes.txt").write_text("owl\ndog\ncat\n")
    data = build_data(dcfg(dataset="image_folder", data_dir=str(root), class_list="classes.txt"))
    assert data.class_names == ["owl", "dog", "cat"]
    assert [c + v for c, v in zip(data.class_counts, data.split.val_counts, strict=True)] == [2, 4, 6]


# ---------------------------------------------------------------------------------------------- splits
def test_split_fractions_are_stratified_and_seeded(tmp_path):
    root = write_tree(tmp_path / "one", {"": {"cat": 40, "dog": 20, "owl": 10}})
    cfg = {"dataset": "image_folder", "data_dir": str(root), "split_fractions": {"val": 0.1, "test": 0.2}}
    a = build_data(dcfg(**cfg))
    assert a.test.class_counts() == [8, 4, 2]  # 20% of each class
    assert a.split.val_counts == [3, 2, 1]  # 10% of what is left (32, 16, 8), rounded
    assert a.class_counts == [29, 14, 7]
    b = build_data(dcfg(**cfg))
    c = build_data(dcfg(**cfg, subset_seed=1))
    assert torch.equal(a.test.images, b.test.images) and a.sha256 == b.sha256
    assert not torch.equal(a.test.images, c.test.images) and a.sha256 != c.sha256
    assert a.test.class_counts() == c.test.class_counts()
    # the three splits partition the images
    every = torch.cat([a.train.images, a.val.images, a.test.images]).flatten(1)
    assert every.shape[0] == 70 and torch.unique(every, dim=0).shape[0] == 70


def test_stratified_holdout_keeps_one_training_image_and_lists_tiny_classes():
    labels = np.array([0] * 5 + [1] * 2 + [2])
    kept, held, small = stratified_holdout(labels, 3, 0.5, seed=3, tag=7)
    assert np.bincount(labels[held], minlength=3).tolist() == [3, 1, 0]  # 2.5 rounds up; n - 1 at most
    assert small == [2] and np.bincount(labels[kept], minlength=3).tolist() == [2, 1, 1]
    assert np.intersect1d(kept, held).size == 0 and kept.size + held.size == labels.size
    kept, held, small = stratified_holdout(labels, 3, 0.01, seed=3, tag=7)
    assert np.bincount(labels[held], minlength=3).tolist() == [1, 1, 0]  # at least one where possible


def test_validation_carve_warns_for_a_class_too_small(tmp_path):
    root = write_tree(tmp_path / "pets", {"train": {"cat": 10, "dog": 3, "owl": 1}, "test": balanced(2)})
    with pytest.warns(UserWarning, match="'owl' have a single training image.*no validation images"):
        data = build_data(dcfg(dataset="image_folder", data_dir=str(root)))
    assert data.split.val_counts == [1, 1, 0] and data.class_counts == [9, 2, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class can give one: no warning
        build_data(dcfg(dataset="image_folder", data_dir=str(root), split_fractions={"val": 0}))


def test_a_class_without_test_images_warns(tmp_path):
    root = write_tree(tmp_path / "pets", {"train": balanced(4), "test": {"cat": 2, "dog": 2}})
    with pytest.warns(UserWarning, match="'owl' have no test images"):
        build_data(dcfg(dataset="image_folder", data_dir=str(root)))


def test_given_validation_split_is_used_as_is(tmp_path):
    root = write_tree(
        tmp_path / "p", {"train": balanced(5), "val": {"cat": 2, "owl": 1}, "test": balanced(2)}
    )
    data = build_data(dcfg(dataset="image_folder", data_dir=str(root)))
    assert data.class_counts == [5, 5, 5] and data.split.val_counts == [2, 0, 1]
    assert data.describe()["source"]["val_from"] == "data"
    with pytest.raises(ConfigError, match="has its own validation split"):
        build_data(dcfg(dataset="image_folder", data_dir=str(root), split_fractions={"val": 0.2}))
    with pytest.raises(ConfigError, match="has its own test split"):
        build_data(dcfg(dataset="image_folder", data_dir=str(root), split_fractions={"test": 0.2}))


# ---------------------------------------------------------------------------------------------- long tail
def test_longtail_gives_the_ldam_counts_in_every_format(tmp_path):
    root = write_tree(tmp_path / "bal", {"train": balanced(40), "test": balanced(3)})
    lists = tmp_path / "lists"
    lists.mkdir()
    write_csv(lists / "train.csv", tree_rows(root, "train"))
    write_csv(lists / "test.csv", tree_rows(root, "test"))
    folder = build_data(dcfg(dataset="image_folder", data_dir=str(root)))
    np.savez(
        tmp_path / "bal.npz",
        x_train=folder.train.images.numpy()[:, 0],
        y_train=folder.train_labels.numpy(),
        x_test=folder.test.images.numpy()[:, 0],
        y_test=folder.test.labels.numpy(),
    )  # 36 per class: the folder data less its val
    longtail = {"longtail": {"imbalance_factor": 10}, "val_per_class": 4}
    expected = build_longtail_split(np.repeat([0, 1, 2], 40), 3, 10, seed=0, val_per_class=4)
    assert expected.counts == [36, 12, 4]
    for dataset, where in [("image_folder", root), ("image_csv", lists)]:
        cfg = dcfg(dataset=dataset, data_dir=str(where), image_root=str(root), **longtail)
        data = build_data(cfg)
        assert data.class_counts == expected.counts and data.split.val_counts == [4, 4, 4], dataset
        assert data.describe()["index_sha256"] == expected.sha256
        assert data.describe()["imbalance_factor"] == 10.0 and data.describe()["profile"] == "exp"
    data = build_data(dcfg(dataset="npz", data_dir=str(tmp_path / "bal.npz"), **longtail))
    assert data.class_counts == build_longtail_split(np.repeat([0, 1, 2], 36), 3, 10, val_per_class=4).counts
    step = build_data(
        dcfg(dataset="image_folder", data_dir=str(root), longtail={"imbalance_factor": 10, "profile": "step"})
    )
    assert step.class_counts == [20, 4, 4]  # n_max 40, IF 10; the head keeps its pool (40 less 20 for val)


def test_longtail_picks_the_images_of_the_builtin_rule(tmp_path):
    """Own data written from a built-in dataset (in class order, as the conversion script does) keeps
    exactly the training and validation images the built-in dataset keeps."""
    synth = make_synthetic(num_classes=4, per_class=30, image_size=6, seed=3)
    test = make_synthetic(num_classes=4, per_class=5, image_size=6, seed=3, train=False)
    builtin = build_data(
        dcfg(
            dataset="synthetic",
            imbalance_factor=10,
            val_per_class=3,
            synthetic={"num_classes": 4, "per_class": 30, "test_per_class": 5, "image_size": 6, "seed": 3},
        )
    )
    path = tmp_path / "synth.npz"
    np.savez(
        path,
        x_train=synth.images.numpy(),
        y_train=synth.labels.numpy(),
        x_test=test.images.numpy(),
        y_test=test.labels.numpy(),
    )
    own = build_data(
        dcfg(dataset="npz", data_dir=str(path), longtail={"imbalance_factor": 10}, val_per_class=3)
    )
    assert own.class_counts == builtin.class_counts and builtin.class_counts[0] == 27
    assert torch.equal(own.train.images, builtin.train.images)
    assert torch.equal(own.val.images, builtin.val.images)
    assert own.describe()["index_sha256"] == builtin.sha256  # the LDAM rule's hash of the kept positions


def test_longtail_errors_name_the_class(tmp_path):
    root = write_tree(tmp_path / "p", {"train": {"cat": 40, "dog": 40, "owl": 3}, "test": balanced(1)})
    with pytest.raises(DataError, match="class 'owl' has 3 images, fewer than val_per_class=4"):
        build_data(
            dcfg(
                dataset="image_folder", data_dir=str(root), longtail={"imbalance_factor": 2}, val_per_class=4
            )
        )


def test_builtin_and_own_keys_are_kept_apart(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("data.longtail is a setting of own data")):
        build_data(dcfg(dataset="synthetic", longtail={"imbalance_factor": 10}))
    with pytest.raises(ConfigError, match=re.escape("data.resize is a setting of own data")):
        build_data(dcfg(dataset="synthetic", resize=[8, 8]))
    root = write_tree(tmp_path / "p", {"train": balanced(4), "test": balanced(1)})
    own = {"dataset": "image_folder", "data_dir": str(root)}
    with pytest.raises(
        ConfigError, match=r"data.imbalance_factor / data.profile are settings of the built-in"
    ):
        build_data(dcfg(**own, imbalance_factor=10))
    with pytest.raises(ConfigError, match=re.escape("data.val_per_class applies with data.longtail")):
        build_data(dcfg(**own, val_per_class=5))
    with pytest.raises(ConfigError, match=re.escape("remove data.split_fractions.val")):
        build_data(dcfg(**own, longtail={"imbalance_factor": 2}, split_fractions={"val": 0.1}))
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'data.longtail.imbalance'")):
        config_from_dict({"data": {"longtail": {"imbalance": 10}}})


# ---------------------------------------------------------------------------------------------- images
def test_normalisation_is_computed_from_the_training_set(tmp_path):
    root = write_tree(tmp_path / "p", {"train": {"cat": 8, "dog": 8}, "test": {"cat": 2, "dog": 30}}, seed=1)
    data = build_data(dcfg(dataset="image_folder", data_dir=str(root), pad_to=12))
    pixels = data.train.images[:, :, 2:10, 2:10].double() / 255  # the training images, without the padding
    assert data.mean == pytest.approx([float(pixels.mean())], abs=1e-9)
    assert data.std == pytest.approx([float(pixels.std(unbiased=False))], abs=1e-9)
    test_pixels = data.test.images[:, :, 2:10, 2:10].double() / 255
    assert abs(float(test_pixels.mean()) - data.mean[0]) > 1e-4  # not the test set's (nor all data's)
    assert data.preprocessing()["mean"] == data.mean and data.preprocessing()["pad_to"] == 12
    given = build_data(
        dcfg(dataset="image_folder", data_dir=str(root), augment={"mean": [0.5], "std": [0.2]})
    )
    assert given.mean == [0.5] and given.std == [0.2]
    with pytest.raises(ConfigError, match="1 / 1 values for 3-channel images"):
        build_data(
            dcfg(
                dataset="image_folder", data_dir=str(root), channels=3, augment={"mean": [0.5], "std": [0.2]}
            )
        )
    mean, std = channel_statistics(torch.tensor([[[[0, 255]]], [[[255, 255]]]], dtype=torch.uint8))
    assert mean == pytest.approx([0.75]) and std == pytest.approx([0.4330127])


def test_resize_and_channels_come_from_the_data_or_the_settings(tmp_path):
    root = write_tree(tmp_path / "p", {"train": balanced(3), "test": balanced(1)}, size=(8, 8))
    odd = root / "train" / "dog" / "big.png"
    Image.new("RGB", (12, 10), color=(200, 10, 10)).save(odd)
    with pytest.raises(DataError, match="images differ in size") as e:
        build_data(dcfg(dataset="image_folder", data_dir=str(root)))
    assert str(odd) in str(e.value) and "000.png" in str(e.value) and "10x12" in str(e.value)
    data = build_data(dcfg(dataset="image_folder", data_dir=str(root), resize=[6, 7]))
    assert data.stored_size == (3, 6, 7) and data.in_channels == 3  # one RGB image: every image RGB
    assert (
        data.resize_to_size
        and data.preprocessing()["resize_to_size"]
        and data.preprocessing()["mode"] == "RGB"
    )
    expected = np.array(Image.open(odd).convert("RGB").resize((7, 6), Image.BILINEAR)).transpose(2, 0, 1)
    images = torch.cat([data.train.images, data.val.images])
    assert any(torch.equal(img, torch.from_numpy(expected)) for img in images)
    gray = build_data(dcfg(dataset="image_folder", data_dir=str(root), resize=6, channels=1))
    assert gray.stored_size == (1, 6, 6) and gray.preprocessing()["mode"] == "L"


def test_without_check_files_a_bad_size_is_found_when_decoded(tmp_path):
    root = write_tree(tmp_path / "p", {"train": balanced(3), "test": balanced(1)})
    odd = root / "test" / "owl" / "000.png"
    Image.new("L", (5, 5)).save(odd)
    with pytest.raises(DataError, match="images differ in size") as e:
        build_data(dcfg(dataset="image_folder", data_dir=str(root), check_files=False))
    assert str(odd) in str(e.value) and str(root / "train" / "cat" / "000.png") in str(e.value)
    fine = build_data(dcfg(dataset="image_folder", data_dir=str(root), check_files=False, resize=8))
    assert fine.stored_size == (1, 8, 8)


def test_memory_and_files_paths_give_the_same_batches(tmp_path):

    root = write_tree(
        tmp_path / "p", {"train": {"cat": 12, "dog": 7, "owl": 4}, "test": balanced(3)}, mode="RGB"
    )
    cfg = config_from_dict(tiny_run({"dataset": "image_folder", "data_dir": str(root), "num_workers": 0}))
    memory = build_data(cfg.data)
    cfg.data.memory_budget_mb = 0.0
    files = build_data(cfg.data)
    assert (memory.storage, files.storage) == ("memory", "files")  # one bundle type, two storages
    assert files.class_counts == memory.class_counts and files.sha256 == memory.sha256
    assert files.preprocessing()["size"] == memory.preprocessing()["size"]
    assert files.class_names == memory.class_names and files.in_channels == memory.in_channels == 3
    assert files.describe()["source"]["storage"] == "files"
    # statistics from a sample of at most 5000 training images: here all of them
    assert files.mean == pytest.approx(memory.mean) and files.std == pytest.approx(memory.std)
    device = torch.device("cpu")
    for epoch in (0, 1):
        loaders = []
        for data in (memory, files):
            loader = data.train_loader(cfg, device, 0, 1)  # the config's sampler (instance)
            loader.set_epoch(epoch)
            loaders.append(list(loader))
        assert len(loaders[0]) == len(loaders[1]) == 2
        for (xm, ym), (xf, yf) in zip(*loaders, strict=True):
            assert torch.equal(ym, yf) and torch.equal(xm, xf)
    for split in ("val", "test"):
        (xm, ym), (xf, yf) = (next(iter(d.eval_loader(split, cfg, device))) for d in (memory, files))
        assert torch.equal(xm, xf) and torch.equal(ym, yf)


def test_subset_hash_is_of_the_data_not_its_location(tmp_path):
    root = write_tree(tmp_path / "a", {"train": balanced(4), "test": balanced(1)})
    first = build_data(dcfg(dataset="image_folder", data_dir=str(root))).sha256
    moved = root.rename(tmp_path / "b")
    assert build_data(dcfg(dataset="image_folder", data_dir=str(moved))).sha256 == first
    (moved / "train" / "owl" / "000.png").rename(moved / "train" / "dog" / "999.png")
    assert build_data(dcfg(dataset="image_folder", data_dir=str(moved))).sha256 != first


# ---------------------------------------------------------------------------------------------- training
COUNT_LOSSES = [
    ("balanced_softmax", {}, "linear"),
    ("cb", {}, "linear"),
    ("drw", {"drw_epoch": 0}, "linear"),
    ("efl", {}, "linear"),
    ("eqfl", {}, "linear"),
    ("gala", {}, "linear"),
    ("ldam", {}, "cosine"),
    ("logit_adjust", {}, "linear"),
    ("seesaw", {}, "linear"),
    ("sigmoid_eql", {}, "linear"),
    ("softmax_eql", {}, "linear"),
]


@pytest.fixture(scope="module")
def own_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own") / "pets"
    return write_tree(root, {"train": {"cat": 24, "dog": 10, "owl": 4}, "test": balanced(4)})


@pytest.mark.parametrize("loss,params,head", COUNT_LOSSES, ids=[c[0] for c in COUNT_LOSSES])
def test_every_loss_that_needs_class_counts_trains_on_own_data(own_tree, tmp_path, loss, params, head):
    cfg = config_from_dict(
        tiny_run(
            {"dataset": "image_folder", "data_dir": str(own_tree)},
            loss={"name": loss, "params": params},
            model={"head": head},
        )
    )
    final = Trainer(cfg, output_dir=tmp_path / "run", verbose=False).fit()
    assert final["class_counts"] == [22, 9, 3]  # the data's counts, less the stratified validation
    assert 0.0 <= final["last_epoch"]["top1"] <= 1.0
    subset = json.loads((tmp_path / "run" / "subset.json").read_text())
    assert subset["counts"] == [22, 9, 3] and subset["source"]["class_names"] == CLASSES


def test_posthoc_adjusters_run_on_own_data(own_tree, tmp_path):
    cfg = config_from_dict(
        tiny_run(
            {"dataset": "image_folder", "data_dir": str(own_tree)},
            eval={"posthoc": ["posthoc_la", "tau_norm"]},
        )
    )
    final = Trainer(cfg, output_dir=tmp_path / "run", verbose=False).fit()
    assert set(final["posthoc"]) == {"posthoc_la", "tau_norm"}
    for result in final["posthoc"].values():
        assert 0.0 <= result["top1"] <= 1.0


def test_files_path_trains_with_workers_and_longtail(tmp_path):
    root = write_tree(tmp_path / "bal", {"train": balanced(20), "test": balanced(3)}, mode="RGB")
    data = {
        "dataset": "image_folder",
        "data_dir": str(root),
        "memory_budget_mb": 0,
        "num_workers": 1,
        "longtail": {"imbalance_factor": 5},
        "val_per_class": 2,
    }
    cfg = config_from_dict(tiny_run(data, loss={"name": "balanced_softmax"}))
    trainer = Trainer(cfg, output_dir=tmp_path / "run", verbose=False)
    assert trainer.data.storage == "files" and trainer.data.class_counts == [18, 8, 4]
    final = trainer.fit()
    assert final["class_counts"] == [18, 8, 4] and 0.0 <= final["last_epoch"]["top1"] <= 1.0
    subset = json.loads((tmp_path / "run" / "subset.json").read_text())
    assert subset["imbalance_factor"] == 5.0 and subset["source"]["storage"] == "files"


def test_shipped_own_data_configs_build_and_train(tmp_path, repo_root):
    """configs/own_data/*.yaml with their placeholder path set to generated data of each format."""
    root = write_tree(tmp_path / "tree", {"train": {"cat": 12, "dog": 6, "owl": 3}, "test": balanced(2)})
    write_csv(root / "train.csv", tree_rows(root, "train"))
    write_csv(root / "test.csv", tree_rows(root, "test"))
    folder = build_data(dcfg(dataset="image_folder", data_dir=str(root), split_fractions={"val": 0}))
    np.savez(
        tmp_path / "d.npz",
        x_train=folder.train.images.numpy(),
        y_train=folder.train_labels.numpy(),
        x_test=folder.test.images.numpy(),
        y_test=folder.test.labels.numpy(),
    )
    paths = {"image_folder": root, "csv": root, "npz": tmp_path / "d.npz"}
    shipped = sorted((repo_root / "configs" / "own_data").glob("*.yaml"))
    assert [p.stem for p in shipped] == ["csv", "image_folder", "npz"]
    for path in shipped:
        placeholder = load_config(path)
        assert placeholder.data.data_dir.startswith("/path/to/your/")
        with pytest.raises(DataError, match=r"does not exist.*--set data\.data_dir=PATH"):
            build_data(placeholder.data)
        cfg = load_config(
            path,
            [
                f"data.data_dir={paths[path.stem]}",
                "optim.epochs=1",
                "train.progress=false",
                "optim.batch_size=8",
                "model.params.width=4",
            ],
        )
        final = Trainer(cfg, output_dir=tmp_path / path.stem, verbose=False).fit()
        assert len(final["class_counts"]) == 3 and "posthoc_la" in final["posthoc"]


def test_gradtail_list_shows_the_own_datasets(capsys):
    assert {"image_folder", "image_csv", "npz"} <= set(DATASETS.names())
    assert main(["list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("datasets:"))
    assert all(name in line for name in ("image_folder", "image_csv", "npz"))


# ---------------------------------------------------------------------------------------------- bad input
def _bad_tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "bad", {"train": balanced(3), "test": balanced(1)})


def case_empty_class_folder(tmp_path: Path) -> tuple[dict, list[str]]:
    root = _bad_tree(tmp_path)
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "notes.txt").write_text("no images here")
    return {"dataset": "image_folder", "data_dir": str(root)}, [
        "empty class folder",
        str(root / "train" / "emu"),
    ]


def case_unreadable_image(tmp_path: Path) -> tuple[dict, list[str]]:
    root = _bad_tree(tmp_path)
    victim = root / "train" / "dog" / "001.png"
    victim.write_bytes(b"not an image")
    return {"dataset": "image_folder", "data_dir": str(root)}, ["cannot read image", str(victim)]


def case_truncated_image_in_a_worker(tmp_path: Path) -> tuple[dict, list[str]]:
    root = _bad_tree(tmp_path)
    victim = root / "test" / "cat" / "000.png"
    victim.write_bytes(victim.read_bytes()[:60])  # the header reads; the pixels do not
    data = {"dataset": "image_folder", "data_dir": str(root), "memory_budget_mb": 0, "num_workers": 1}
    return data, ["cannot read image", str(victim)]


def case_csv_label_not_in_class_list(tmp_path: Path) -> tuple[dict, list[str]]:
    root = _bad_tree(tmp_path)
    rows = tree_rows(root, "train")
    rows[4] = (rows[4][0], "wolf")
    write_csv(root / "train.csv", rows)
    write_csv(root / "test.csv", tree_rows(root, "test"))
    (root / "classes.txt").write_text("cat\ndog\nowl\n")
    data = {"dataset": "image_csv", "data_dir": str(root), "class_list": "classes.txt"}
    return data, [f"{root / 'train.csv'}:6", "'wolf'", "is not in the class list", "classes.txt"]


def case_test_class_absent_from_training_folders(tmp_path: Path) -> tuple[dict, list[str]]:
    root = _bad_tree(tmp_path)
    write_tree(root, {"test": {"emu": 1}})
    return {"dataset": "image_folder", "data_dir": str(root)}, [
        "test class folder",
        "emu",
        "not a training class",
    ]


def case_test_class_absent_from_training_csv(tmp_path: Path) -> tuple[dict, list[str]]:
    root = _bad_tree(tmp_path)
    write_csv(root / "train.csv", tree_rows(root, "train"))
    write_csv(root / "test.csv", [*tree_rows(root, "test"), ("test/cat/000.png", "emu")])
    data = {"dataset": "image_csv", "data_dir": str(root)}
    return data, [f"{root / 'test.csv'}:5", "test class 'emu' has no training images"]


def case_test_class_absent_from_training_npz(tmp_path: Path) -> tuple[dict, list[str]]:
    path = tmp_path / "d.npz"
    np.savez(
        path,
        x_train=np.zeros((4, 5, 5), np.uint8),
        y_train=np.array([0, 1, 1, 0]),
        x_test=np.zeros((2, 5, 5), np.uint8),
        y_test=np.array([0, 3]),
    )
    return {"dataset": "npz", "data_dir": str(path)}, ["y_test[1]", "test class 3 has no training images"]


def case_mixed_sizes(tmp_path: Path) -> tuple[dict, list[str]]:
    root = _bad_tree(tmp_path)
    odd = root / "test" / "owl" / "000.png"
    Image.new("L", (9, 8)).save(odd)
    first = str(root / "train" / "cat" / "000.png")
    return {"dataset": "image_folder", "data_dir": str(root)}, ["images differ in size", str(odd), first]


def case_missing_folder(tmp_path: Path) -> tuple[dict, list[str]]:
    where = tmp_path / "nowhere"
    return {"dataset": "image_folder", "data_dir": str(where)}, [f"data.data_dir {where} does not exist"]


def case_missing_csv_image(tmp_path: Path) -> tuple[dict, list[str]]:
    root = _bad_tree(tmp_path)
    write_csv(root / "train.csv", [*tree_rows(root, "train"), ("train/cat/gone.png", "cat")])
    write_csv(root / "test.csv", tree_rows(root, "test"))
    data = {"dataset": "image_csv", "data_dir": str(root)}
    return data, [
        str(root / "train.csv"),
        "line 11",
        str(root / "train" / "cat" / "gone.png"),
        "do not exist",
    ]


def case_npz_without_test_arrays(tmp_path: Path) -> tuple[dict, list[str]]:
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((4, 5, 5), np.uint8), labels=np.array([0, 1, 1, 0]))
    return {"dataset": "npz", "data_dir": str(path)}, ["has no x_train", "its arrays: images, labels"]


def case_no_test_split_and_no_fraction(tmp_path: Path) -> tuple[dict, list[str]]:
    root = write_tree(tmp_path / "one", {"": balanced(3)})
    return {"dataset": "image_folder", "data_dir": str(root)}, [
        "has no test split",
        "data.split_fractions.test",
    ]


BAD_INPUTS = [
    case_empty_class_folder,
    case_unreadable_image,
    case_truncated_image_in_a_worker,
    case_csv_label_not_in_class_list,
    case_test_class_absent_from_training_folders,
    case_test_class_absent_from_training_csv,
    case_test_class_absent_from_training_npz,
    case_mixed_sizes,
    case_missing_folder,
    case_missing_csv_image,
    case_npz_without_test_arrays,
    case_no_test_split_and_no_fraction,
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.__name__[5:] for c in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_problem(case, tmp_path, capsys):
    data, expected = case(tmp_path)
    trainer = None
    try:
        trainer = Trainer(config_from_dict(tiny_run(data)), output_dir=tmp_path / "direct", verbose=False)
        trainer.fit()  # a file that only fails when decoded (by a worker) fails in the first epoch
    except (DataError, ConfigError) as e:
        message = str(e)
    else:
        pytest.fail("no error")
    finally:
        if trainer is not None and trainer.data.storage == "files":
            trainer.train_loader.close()  # stop the workers now, not at a later garbage collection
            trainer.data.close()
    assert "\n" not in message, message
    for part in expected:
        assert part in message, (part, message)
    err = one_line_error(tiny_run(data), tmp_path, capsys)
    for part in expected:
        assert part in err, (part, err)


# ---------------------------------------------------------------------------------------------- script
def _write_idx(path: Path, array: np.ndarray) -> None:
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_script_writes_folders_csv_and_npz_in_original_order(tmp_path, repo_root):
    rng = np.random.default_rng(0)
    idx = tmp_path / "idx"
    idx.mkdir()
    train_labels, test_labels = rng.permutation(np.repeat(np.arange(10), 3)), np.arange(10)
    train_images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    test_images = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    _write_idx(idx / "train-images-idx3-ubyte.gz", train_images)
    _write_idx(idx / "train-labels-idx1-ubyte.gz", train_labels)
    _write_idx(idx / "t10k-images-idx3-ubyte.gz", test_images)
    _write_idx(idx / "t10k-labels-idx1-ubyte.gz", test_labels)
    spec = importlib.util.spec_from_file_location(
        "fm_script", repo_root / "scripts" / "fashion_mnist_to_folders.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out"
    assert script.main([str(out), "--csv", "--npz", "--data-dir", str(idx)]) == 0
    assert script.main([str(out), "--data-dir", str(idx)]) == 2  # not empty: refused
    names = (out / "classes.txt").read_text().splitlines()
    assert names[0] == "T-shirt_top" and names[9] == "Ankle boot" and len(names) == 10
    kept = sorted(int(p.stem) for p in (out / "train" / names[train_labels[0]]).glob("*.png"))
    assert kept == np.flatnonzero(train_labels == train_labels[0]).tolist()
    assert np.array_equal(
        np.array(Image.open(out / "train" / names[train_labels[7]] / "00007.png")), train_images[7]
    )
    base = {"class_list": str(out / "classes.txt"), "split_fractions": {"val": 0}}
    folder = build_data(dcfg(dataset="image_folder", data_dir=str(out), **base))
    listed = build_data(dcfg(dataset="image_csv", data_dir=str(out), **base))
    arrays = build_data(
        dcfg(dataset="npz", data_dir=str(out / "fashion_mnist.npz"), split_fractions={"val": 0})
    )
    # folders: class by class; the CSV lists and the arrays: the original order
    for data, order in [(folder, np.argsort(train_labels, kind="stable")), (listed, None), (arrays, None)]:
        kept = slice(None) if order is None else order
        assert data.class_names == names and data.class_counts == [3] * 10
        assert torch.equal(data.train.images[:, 0], torch.from_numpy(train_images[kept]))
        assert torch.equal(data.train.labels, torch.from_numpy(train_labels[kept].astype(np.int64)))
        assert torch.equal(data.test.labels, torch.from_numpy(test_labels.astype(np.int64)))
