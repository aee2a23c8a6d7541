"""``gradtail predict``: image files -> top-k classes from a checkpoint alone (issue 14).

A tiny run is trained through the CLI on synthetic data with every post-hoc adjuster in ``eval.posthoc``; its
test images are exported as PNG files and predicted through the CLI. The reference is the trained model's
logits computed by the Trainer on the same images (the checkpoint loaded as ``gradtail eval`` does) and
the post-hoc adjusters fitted as the trainer fits them. Also: the preprocessing module against hand
computations, the adjusters' saved states, and every one-line error.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gradtail.cli.main import main
from gradtail.config import config_from_dict
from gradtail.contracts import PosthocAdjuster
from gradtail.data.image_list import imagenet_transform
from gradtail.data.preprocess import check_preprocessing, collect_image_paths, load_images
from gradtail.engine.trainer import Trainer
from gradtail.errors import ConfigError, DataError, InputError
from gradtail.posthoc import create_posthoc
from gradtail.rundir import RunDirectory, load_checkpoint

# A run that learns something in 3 epochs (its predictions spread over the classes, and every post-hoc
# adjuster changes some of them: the grids exclude tau = 0, so an adjuster is never the identity).
TINY = {
    "name": "predict_tiny",
    "data": {
        "dataset": "synthetic",
        "imbalance_factor": 2,
        "val_per_class": 3,
        "synthetic": {"num_classes": 3, "per_class": 33, "test_per_class": 10, "image_size": 10},
    },
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "optim": {"batch_size": 8, "epochs": 3, "lr": 0.05, "warmup_epochs": 0, "schedule": "cosine"},
    "train": {"progress": False},
    "eval": {
        "posthoc": ["posthoc_la", "tau_norm", "gala_rebalance"],
        "posthoc_params": {
            name: {"grid": [0.5, 1.0]} for name in ("posthoc_la", "tau_norm", "gala_rebalance")
        },
    },
}
N_TEST = 30


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    cfg_file = root / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg_file), "--output", str(root / "run")]) == 0
    checkpoint = root / "run" / "checkpoints" / "last.pt"

    # the reference: the checkpoint turned back into a Trainer as `gradtail eval` does
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    trainer = Trainer(cfg, output_dir=root / "eval", verbose=False)
    trainer.load_state(state)
    test = trainer.predict("test", features=True)
    val = trainer.predict("val", features=True)
    final = json.loads((root / "run" / "final.json").read_text())
    adjusted = {}
    for name in cfg.eval.posthoc:  # fitted as Trainer._posthoc fits them
        params = dict(cfg.eval.posthoc_params.get(name, {}))
        adjuster = create_posthoc(name, **trainer._posthoc_args(name, params))
        features = adjuster.input_kind == "features"
        adjuster.fit(val.features if features else val.logits, val.targets)
        assert adjuster.fitted_params() == final["posthoc"][name]["params"]  # the run's own fit
        adjusted[name] = adjuster.transform(test.features if features else test.logits)

    # the test images as PNG files, in two sub-folders; sorted paths = dataset order
    images = trainer.data.test.images
    assert images.shape == (N_TEST, 1, 10, 10) and images.dtype == torch.uint8
    folder = root / "images"
    paths = []
    for i in range(N_TEST):
        path = folder / ("part_a" if i < 15 else "part_b") / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0].numpy(), mode="L").save(path)
        paths.append(path)
    (folder / "part_a" / "notes.md").write_text("not an image")  # ignored in folders
    return SimpleNamespace(
        root=root,
        checkpoint=checkpoint,
        folder=folder,
        paths=paths,
        logits=test.logits,
        adjusted=adjusted,
        names=trainer.data.class_names,
        final=final,
    )


def _predict(capsys, *args):
    code = main(["predict", *(str(a) for a in args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rows(text):
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], rows[1:]


def _csv_probs(row, k):
    return [float(row[2 + 2 * j]) for j in range(k)], [row[1 + 2 * j] for j in range(k)]


def _error(capsys, *args):
    code, out, err = _predict(capsys, *args)
    assert code == 2, (out, err)
    assert err.startswith("gradtail: error: ") and err.strip().count("\n") == 0, err
    return err


# ------------------------------------------------------------------------------------ the run's setup
def test_the_reference_is_not_trivial(run):
    """The checks below can fail: predictions spread over classes and each adjuster changes some."""
    raw = run.logits.argmax(1)
    assert len(set(raw.tolist())) >= 2
    for name, z in run.adjusted.items():
        assert (z.argmax(1) != raw).any(), name


def test_the_run_saved_its_fitted_adjusters(run):
    run_dir = RunDirectory(run.root / "run", writer=False)
    assert run_dir.saved_posthoc() == ["gala_rebalance", "posthoc_la", "tau_norm"]
    state = load_checkpoint(run.checkpoint)
    for name in ("gala_rebalance", "posthoc_la", "tau_norm"):
        record = run_dir.load_posthoc(name)
        assert record["epoch"] == state["epoch"] == 3
        assert record["subset_sha256"] == state["subset_sha256"]
        assert record["state"]["tau"] == run.final["posthoc"][name]["params"]["tau"]
    tau_norm = run_dir.load_posthoc("tau_norm")["state"]
    assert torch.equal(tau_norm["weight"], state["model"]["classifier.weight"])


# ------------------------------------------------------------------------------------ predictions
def test_folder_matches_the_trainer(run, capsys):
    code, out, _ = _predict(capsys, run.checkpoint, run.folder, "--top-k", 3)
    assert code == 0
    header, rows = _rows(out)
    assert header == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert [Path(r[0]) for r in rows] == run.paths  # recursive, sorted, the .md file left out
    expected = torch.softmax(run.logits.double(), dim=1)
    for i, row in enumerate(rows):
        probs, classes = _csv_probs(row, 3)
        assert classes[0] == run.names[int(run.logits[i].argmax())]
        assert sorted(classes) == sorted(run.names)
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-9)
        by_class = dict(zip(classes, probs, strict=True))
        for c, name in enumerate(run.names):
            assert by_class[name] == pytest.approx(float(expected[i, c]), abs=1e-6)


def test_files_and_list_files_in_the_order_given(run, capsys, tmp_path):
    chosen = [run.paths[i] for i in (7, 2, 21)]
    txt = run.folder / "some.txt"
    txt.write_text("# relative to the list's folder\npart_a/img_004.png\n\npart_b/img_020.png\n")
    csv_list = run.folder / "some.csv"
    csv_list.write_text(f"label,path\n0,part_b/img_029.png\n1,{run.paths[0]}\n")  # relative and absolute
    try:
        code, out, _ = _predict(capsys, run.checkpoint, *chosen, txt, csv_list, "--top-k", 1)
    finally:
        txt.unlink()
        csv_list.unlink()
    assert code == 0
    header, rows = _rows(out)
    assert header == ["path", "class_1", "prob_1"]
    order = [7, 2, 21, 4, 20, 29, 0]
    assert [Path(r[0]) for r in rows] == [run.paths[i] for i in order]
    for i, row in zip(order, rows, strict=True):
        assert row[1] == run.names[int(run.logits[i].argmax())]
        assert float(row[2]) == pytest.approx(float(torch.softmax(run.logits[i].double(), 0).max()), abs=1e-6)


@pytest.mark.parametrize("name", ["posthoc_la", "tau_norm", "gala_rebalance"])
def test_posthoc_applies_the_fitted_adjuster(run, capsys, tmp_path, name):
    """The whole test set in dataset order: gala_rebalance's q (from the images given) is the run's."""
    out_file = tmp_path / "preds.json"
    code, _, err = _predict(capsys, run.checkpoint, run.folder, "--posthoc", name, "--output", out_file)
    assert code == 0 and str(out_file) in err
    doc = json.loads(out_file.read_text())
    assert doc["posthoc"] == name and doc["top_k"] == 3  # default: min(5, classes)
    assert doc["posthoc_params"] == run.final["posthoc"][name]["params"]
    expected = torch.softmax(run.adjusted[name].double(), dim=1)
    raw_top = run.logits.argmax(1)
    changed = 0
    for i, pred in enumerate(doc["predictions"]):
        assert Path(pred["path"]) == run.paths[i]
        top = pred["top"]
        assert top[0]["index"] == int(run.adjusted[name][i].argmax())
        assert top[0]["class"] == run.names[top[0]["index"]]
        assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
        assert sum(t["prob"] for t in top) == pytest.approx(1.0, abs=1e-9)
        for t in top:
            assert t["prob"] == pytest.approx(float(expected[i, t["index"]]), abs=1e-6)
        changed += top[0]["index"] != int(raw_top[i])
    assert changed > 0  # the adjuster was applied, not the raw model


def test_csv_file_output_and_top_k(run, capsys, tmp_path):
    out_file = tmp_path / "nested" / "preds.csv"
    code, out, _ = _predict(capsys, run.checkpoint, run.paths[3], "--output", out_file, "--top-k", 2)
    assert code == 0 and out == ""
    header, rows = _rows(out_file.read_text())
    assert header == ["path", "class_1", "prob_1", "class_2", "prob_2"] and len(rows) == 1
    probs, classes = _csv_probs(rows[0], 2)
    assert probs[0] >= probs[1] and classes[0] != classes[1] and sum(probs) < 1.0
    assert not list(out_file.parent.glob("*.tmp"))


def test_the_installed_command(run):
    r = subprocess.run(
        [sys.executable, "-m", "gradtail", "predict", str(run.checkpoint), str(run.paths[5]), "--top-k", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    _, rows = _rows(r.stdout)
    assert rows[0][1] == run.names[int(run.logits[5].argmax())]


# ------------------------------------------------------------------------------------ errors
def test_error_missing_and_corrupt_checkpoint(run, capsys, tmp_path):
    assert "checkpoint not found" in _error(capsys, tmp_path / "missing.pt", run.folder)
    bad = tmp_path / "run" / "checkpoints" / "last.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    err = _error(capsys, bad, run.folder)
    assert "corrupt" in err and str(bad) in err


def test_error_no_images_in_a_folder(run, capsys, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    err = _error(capsys, run.checkpoint, tmp_path / "empty")
    assert "no images found in folder" in err and str(tmp_path / "empty") in err


def test_error_missing_input(run, capsys, tmp_path):
    err = _error(capsys, run.checkpoint, tmp_path / "nowhere.png")
    assert "nowhere.png" in err and "does not exist" in err


def test_error_unreadable_image(run, capsys, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    err = _error(capsys, run.checkpoint, run.paths[0], bad)
    assert "cannot read image" in err and str(bad) in err


def test_error_wrong_size(run, capsys, tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (14, 12)).save(big)
    err = _error(capsys, run.checkpoint, big)
    assert str(big) in err and "12x14" in err and "10x10" in err


def test_error_unwritable_output(run, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = _error(capsys, run.checkpoint, run.paths[0], "--output", blocker / "preds.csv")
    assert "cannot" in err and str(blocker) in err


def test_error_output_extension(run, capsys, tmp_path):
    err = _error(capsys, run.checkpoint, run.paths[0], "--output", tmp_path / "preds.txt")
    assert ".csv or .json" in err


def test_error_top_k_larger_than_the_classes(run, capsys):
    err = _error(capsys, run.checkpoint, run.paths[0], "--top-k", 4)
    assert "--top-k 4" in err and "3 classes" in err
    assert "--top-k 0" in _error(capsys, run.checkpoint, run.paths[0], "--top-k", 0)


def test_error_posthoc_not_fitted(run, capsys, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run.root / "run", copy)
    (copy / "extras" / "posthoc" / "tau_norm.pt").unlink()
    err = _error(capsys, copy / "checkpoints" / "last.pt", run.paths[0], "--posthoc", "tau_norm")
    assert "'tau_norm'" in err and "available: gala_rebalance, posthoc_la" in err
    bare = tmp_path / "bare" / "checkpoints" / "last.pt"  # a run without eval.posthoc: no extras
    bare.parent.mkdir(parents=True)
    shutil.copy(run.checkpoint, bare)
    err = _error(capsys, bare, run.paths[0], "--posthoc", "posthoc_la")
    assert "available: none" in err


def test_error_posthoc_fitted_on_another_epoch(run, capsys, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run.root / "run", copy)
    state = load_checkpoint(copy / "checkpoints" / "last.pt")
    state["epoch"] = 1
    older = copy / "checkpoints" / "epoch_0001.pt"
    torch.save(state, older)
    err = _error(capsys, older, run.paths[0], "--posthoc", "tau_norm")
    assert "epoch 3" in err and "epoch 1" in err and "last.pt" in err
    code, _, _ = _predict(capsys, older, run.paths[0])  # without post-hoc the checkpoint is fine
    assert code == 0


def test_error_corrupt_posthoc_state(run, capsys, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run.root / "run", copy)
    (copy / "extras" / "posthoc" / "posthoc_la.pt").write_bytes(b"garbage")
    err = _error(capsys, copy / "checkpoints" / "last.pt", run.paths[0], "--posthoc", "posthoc_la")
    assert "corrupt" in err and "posthoc_la.pt" in err


# ------------------------------------------------------------------------------------ preprocessing
def _save(path, array, mode):
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)
    return path


def test_in_memory_pipeline_by_hand(tmp_path):
    pixels = [[0, 51, 102], [153, 204, 255]]
    path = _save(tmp_path / "g.png", pixels, "L")
    prep = {"transform": "in_memory", "mode": "L", "size": [2, 3], "resize_to_size": False, "pad_to": 4,
            "mean": [0.5], "std": [0.25]}  # fmt: skip
    x = load_images([path], prep)
    # centred zero padding: top (4 - 2) // 2 = 1 row, left (4 - 3) // 2 = 0 columns; then (v/255 - .5)/.25
    padded = np.zeros((4, 4))
    padded[1:3, 0:3] = pixels
    expected = (padded / 255 - 0.5) / 0.25
    assert x.shape == (1, 1, 4, 4) and x.dtype == torch.float32
    np.testing.assert_allclose(x[0, 0].numpy(), expected, atol=1e-6)
    assert float(x[0, 0, 0, 0]) == pytest.approx(-2.0) and float(x[0, 0, 2, 2]) == pytest.approx(2.0)


def test_in_memory_rgb_channels_by_hand(tmp_path):
    path = _save(tmp_path / "c.png", [[[255, 0, 51], [0, 102, 255]]], "RGB")  # 1 x 2 pixels
    prep = {"transform": "in_memory", "mode": "RGB", "size": [1, 2], "pad_to": None,
            "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 2.0]}  # fmt: skip
    x = load_images([path, path], prep)
    assert x.shape == (2, 3, 1, 2)
    rgb = np.array([[255, 0, 51], [0, 102, 255]]) / 255  # (pixel, channel)
    expected = (rgb - [0.1, 0.2, 0.3]) / [0.5, 0.25, 2.0]
    np.testing.assert_allclose(x[1, :, 0, :].numpy(), expected.T, atol=1e-6)


def test_in_memory_size_check_and_resize(tmp_path):
    path = _save(tmp_path / "wide.png", np.full((4, 6), 100), "L")
    prep = {"transform": "in_memory", "mode": "L", "size": [2, 3], "resize_to_size": False, "pad_to": None,
            "mean": [0.0], "std": [1.0]}  # fmt: skip
    with pytest.raises(DataError, match=r"wide\.png is 4x6 \(HxW\).*2x3"):
        load_images([path], prep)
    x = load_images([path], {**prep, "resize_to_size": True})
    assert x.shape == (1, 1, 2, 3)
    np.testing.assert_allclose(x.numpy(), 100 / 255, atol=1e-6)  # a flat image stays flat
    ramp = _save(tmp_path / "ramp.png", np.tile(np.arange(0, 240, 40), (4, 1)), "L")
    x = load_images([ramp], {**prep, "resize_to_size": True})
    with Image.open(ramp) as im:
        ref = np.asarray(im.convert("L").resize((3, 2), Image.BILINEAR), dtype=np.float64) / 255
    np.testing.assert_allclose(x[0, 0].numpy(), ref, atol=1e-6)
    assert x[0, 0, 0, 0] < x[0, 0, 0, 1] < x[0, 0, 0, 2]


def test_mode_conversion_and_unreadable_files(tmp_path):
    path = _save(tmp_path / "c.png", np.full((2, 2, 3), [200, 10, 30]), "RGB")
    prep = {"transform": "in_memory", "mode": "L", "size": [2, 2], "mean": [0.0], "std": [1.0]}
    with Image.open(path) as im:
        luma = np.asarray(im.convert("L"), dtype=np.float64) / 255
    np.testing.assert_allclose(load_images([path], prep)[0, 0].numpy(), luma, atol=1e-6)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"JFIF?")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.jpg"):
        load_images([path, bad], prep)
    with pytest.raises(DataError, match=r"missing\.png does not exist"):
        load_images([tmp_path / "missing.png"], prep)


def test_imagenet_pipeline_is_the_test_transform(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(tmp_path / "photo.png", rng.integers(0, 256, (40, 50, 3)), "RGB")
    prep = {"transform": "imagenet", "mode": "RGB", "image_size": 24, "resize": 27,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
    x = load_images([path], prep)
    with Image.open(path) as im:
        ref = imagenet_transform(False, size=24, resize=27, mean=prep["mean"], std=prep["std"])(
            im.convert("RGB")
        )
    assert x.shape == (1, 3, 24, 24)
    torch.testing.assert_close(x[0], ref)


def test_check_preprocessing():
    with pytest.raises(DataError, match="no test-time preprocessing"):
        check_preprocessing(None)
    with pytest.raises(DataError, match="unknown preprocessing transform 'crop'"):
        check_preprocessing({"transform": "crop"})
    with pytest.raises(DataError, match="lacks size"):
        check_preprocessing({"transform": "in_memory", "mode": "L", "mean": [0.5], "std": [0.2]})
    with pytest.raises(DataError, match="do not fit mode RGB"):
        check_preprocessing(
            {"transform": "in_memory", "mode": "RGB", "size": [2, 2], "mean": [0.5], "std": [1]}
        )


def test_collect_image_paths(tmp_path):
    for name in ("z.png", "a/b.JPG", "a/c/d.png", "a/readme.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    folder = collect_image_paths([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in folder] == ["a/b.JPG", "a/c/d.png", "z.png"]
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "one.txt").write_text("../z.png\n  # comment\n\n../a/c/d.png\n")
    (lists / "plain.csv").write_text("../z.png\n../a/b.JPG\n")
    (lists / "header.csv").write_text("id,path\n1,../a/b.JPG\n")
    got = collect_image_paths(
        [lists / "one.txt", lists / "plain.csv", lists / "header.csv", tmp_path / "z.png"]
    )
    assert [p.resolve() for p in got] == [
        (tmp_path / n).resolve() for n in ("z.png", "a/c/d.png", "z.png", "a/b.JPG", "a/b.JPG", "z.png")
    ]
    (lists / "wide.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"wide\.csv:1: several columns"):
        collect_image_paths([lists / "wide.csv"])
    (lists / "gone.txt").write_text("../z.png\n../gone.png\n")
    with pytest.raises(DataError, match=r"gone\.txt:2: image .*gone\.png does not exist"):
        collect_image_paths([lists / "gone.txt"])
    (lists / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match=r"no image paths listed in .*empty\.txt"):
        collect_image_paths([lists / "empty.txt"])
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match="no images found in folder"):
        collect_image_paths([tmp_path / "void"])


# ------------------------------------------------------------------------------------ saved adjusters
def _round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what the trainer writes, predict reads


def _skewed(seed, c=3, n=40):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(c).repeat(n)
    return torch.randn(y.numel(), c, generator=gen) + 2.0 * torch.eye(c)[y] + torch.linspace(2, -2, c), y


def test_posthoc_la_state_round_trip():
    logits, y = _skewed(0)
    la = create_posthoc("posthoc_la", class_counts=[100, 10, 1]).fit(logits, y)
    assert la.tau != 1.0  # the constructor's default: a state that is not restored would show
    other = create_posthoc("posthoc_la", class_counts=[1, 1, 1])  # another prior: the saved one wins
    other.load_state_dict(_round_trip(la.state_dict()))
    torch.testing.assert_close(other.transform(logits), la.transform(logits))
    with pytest.raises(InputError, match="lacks log_prior"):
        other.load_state_dict({"tau": 1.0})
    with pytest.raises(InputError, match="4 classes"):
        create_posthoc("posthoc_la", class_counts=[1, 2, 3, 4]).load_state_dict(la.state_dict())


def test_tau_norm_state_round_trip():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 3)
    with torch.no_grad():
        head.weight.mul_(torch.tensor([[3.0], [1.0], [0.3]]))
    feats, y = torch.randn(60, 5), torch.arange(3).repeat(20)
    tn = create_posthoc("tau_norm", classifier=head, bias_mode="keep").fit(feats, y)
    other = create_posthoc("tau_norm", classifier=torch.nn.Linear(5, 3), tau=0.0)  # another head
    other.load_state_dict(_round_trip(tn.state_dict()))
    assert other.bias_mode == "keep" and other.tau == tn.tau
    torch.testing.assert_close(other.transform(feats), tn.transform(feats))
    no_bias = tn.state_dict() | {"bias": None}
    other.load_state_dict(no_bias)
    assert other.bias is None
    with pytest.raises(InputError, match="saved bias"):
        other.load_state_dict(tn.state_dict() | {"bias": torch.zeros(4)})


def test_gala_rebalance_state_round_trip():
    logits, y = _skewed(1)
    rb = create_posthoc("gala_rebalance").fit(logits, y)
    assert rb.tau != 1.0
    other = create_posthoc("gala_rebalance")
    other.load_state_dict(_round_trip(rb.state_dict()))
    assert other.tau == rb.tau
    torch.testing.assert_close(other.transform(logits), rb.transform(logits))


def test_an_adjuster_without_a_state_is_not_saved():
    class Plain(PosthocAdjuster):
        name = "plain"

    assert Plain().state_dict() is None
    with pytest.raises(ConfigError, match="cannot restore"):
        Plain().load_state_dict({})
