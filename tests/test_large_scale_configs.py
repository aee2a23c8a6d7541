"""The large-scale recipes at the papers' class counts: configs/{imagenet_lt,places_lt,inat2018}/*.yaml.

Two checks per config (Softmax-EQL, GALA, GALA + re-balancing, BGP, GBG on ImageNet-LT, Places-LT and
iNaturalist 2018; docs/methods/protocol.md §2-3):

- the file loads with the strict config loader as shipped, its components pass the parameter check, and
  its recipe numbers are the ones the method documents state (protocol.md §3, eql.md §4-5, gala.md §2-4,
  bgp.md §2, gbg.md §1-2);
- ``gradtail train``'s path (:class:`~gradtail.engine.trainer.Trainer`, ``fit``) builds it on a tiny
  generated copy of the benchmark in its exact on-disk form (the community's list files, one
  ``relative/path label`` per line, in their ``ImageNet_LT/`` / ``Places_LT/`` / ``iNaturalist18/`` folder;
  real JPEG files at the paths the lists use) and trains three steps at the full class count (1,000 /
  365 / 8,142; the lists hold the highest label). Only what a CPU test cannot afford is overridden: the
  model (a width-8 ``small_cnn`` under the config's head, at full class count), the image size, the batch,
  one epoch and no loader workers.

iNaturalist 2018 has no validation split (its val list is the test set): GALA's re-balancing runs there at
the published tau without a fit (a tuned one is refused in one line), and final.json leaves out the
confusion matrix above 1,000 classes.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gradtail.config import RunConfig, load_config
from gradtail.data.image_list import known_splits
from gradtail.engine.components import check_component_params
from gradtail.engine.trainer import Trainer
from gradtail.errors import ConfigError
from gradtail.metrics.classification import CONFUSION_MAX_CLASSES

REPO = Path(__file__).resolve().parent.parent
DATASETS = ("imagenet_lt", "places_lt", "inat2018")
METHODS = ("softmax_eql", "gala", "gala_rebalance", "bgp", "gbg")
NUM_CLASSES = {"imagenet_lt": 1000, "places_lt": 365, "inat2018": 8142}  # protocol.md §2
REBALANCE_TAU = {"imagenet_lt": 1.7, "places_lt": 1.4, "inat2018": 1.5}  # gala.md §3

# The tiny copies: four classes with images, the first three and the last, so that the lists' highest
# label is C - 1; 12 training images (3 steps of 4), one validation and one test image per class.
TRAIN_PER_CLASS = (4, 3, 3, 2)
BATCH = 4
IMAGE_SIZE = 16

# What each benchmark's files look like. ImageNet: wnids of labels 0, 1, 2 and 999, val images from
# ImageNet's training folders, test images from its val folder. Places365: data_256/<letter>/<category>/
# for train and val (categories_places365.txt's 0, 1, 2 and 364), val_256/ for test. iNaturalist 2018:
# train_val2018/<supercategory>/<category id>/<32 hex digits>.jpg for both lists (which supercategory
# holds an id is not modelled: the reader never looks at it).
WNIDS = {0: "n01440764", 1: "n01443537", 2: "n01484850", 999: "n15075141"}
PLACES = {0: "a/airfield", 1: "a/airplane_cabin", 2: "a/airport_terminal", 364: "z/zen_garden"}
SUPERCATEGORY = {0: "Plantae", 1: "Plantae", 2: "Insecta", 8141: "Aves"}


def _relative_path(dataset: str, split: str, label: int, serial: int) -> str:
    """Where image ``serial`` of class ``label`` lives under the image root, as the real lists name it."""
    if dataset == "imagenet_lt":
        wnid = WNIDS[label]
        if split == "test":
            return f"val/{wnid}/ILSVRC2012_val_{serial:08d}.JPEG"
        return f"train/{wnid}/{wnid}_{serial}.JPEG"
    if dataset == "places_lt":
        if split == "test":
            return f"val_256/Places365_val_{serial:08d}.jpg"
        return f"data_256/{PLACES[label]}/{serial:08d}.jpg"
    digest = f"{(label * 7919 + serial) * 2654435761 % 16**32:032x}"
    return f"train_val2018/{SUPERCATEGORY[label]}/{label}/{digest}.jpg"


def write_benchmark_copy(dataset: str, base: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny copy of ``dataset`` in its on-disk form under ``base``: ``(image_root, list_dir)``.

    Real JPEG images of random content and random size (8 to 32 pixels a side) are written where the
    list files say; the list files go to ``list_dir/<the benchmark's folder>/`` with the community's
    names. Labels are the four of :data:`TRAIN_PER_CLASS`'s classes, the last one being C - 1.
    """
    from PIL import Image

    spec = known_splits()[dataset]
    labels = [0, 1, 2, spec.num_classes - 1]
    per_split = {"train": TRAIN_PER_CLASS, "val": (1,) * 4, "test": (1,) * 4}
    if "test" not in spec.files:  # iNaturalist 2018: the val list is the test set
        per_split = {"train": TRAIN_PER_CLASS, "val": (1,) * 4}
    root, list_dir = base / "images", base / "lists"
    rng = np.random.default_rng(seed)
    serial = 1
    for split, counts in per_split.items():
        lines = []
        for label, n in zip(labels, counts, strict=True):
            for _ in range(n):
                rel = _relative_path(dataset, split, label, serial)
                serial += 1
                height, width = (int(v) for v in rng.integers(8, 33, size=2))
                pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / rel, format="JPEG", quality=90)
                lines.append(f"{rel} {label}")
        folder = list_dir / spec.subdir
        folder.mkdir(parents=True, exist_ok=True)
        (folder / spec.files[split][0]).write_text("\n".join(lines) + "\n")
    return root, list_dir


@pytest.fixture(scope="module")
def benchmark_copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("large_scale")
    return {name: write_benchmark_copy(name, base / name) for name in DATASETS}


def _config_path(dataset: str, method: str) -> Path:
    return REPO / "configs" / dataset / f"{method}.yaml"


def _cpu_overrides(root: Path, list_dir: Path) -> list[str]:
    return [
        f"data.image_root={root}",
        f"data.list_dir={list_dir}",
        f"data.image_size={IMAGE_SIZE}",
        "data.num_workers=0",
        "model.name=small_cnn",
        "model.params={width: 8}",
        f"optim.batch_size={BATCH}",
        "optim.epochs=1",
        "eval.batch_size=8",
        "train.progress=false",
    ]


# ------------------------------------------------------------------------------------ the recipes as shipped
def _assert_recipe(cfg: RunConfig, dataset: str, method: str) -> None:
    o, d, m = cfg.optim, cfg.data, cfg.model
    # protocol.md §3, Softmax-EQL on ImageNet-LT: the schedule of every large-scale config
    assert (o.epochs, o.lr, o.batch_size, o.schedule) == (90, 0.1, 256, "cosine")
    assert (o.momentum, o.nesterov, o.weight_decay, o.warmup_epochs, o.min_lr) == (0.9, True, 5e-4, 0.0, 0.0)
    assert (m.name, d.dataset, d.image_size, d.sampler) == ("resnet50", dataset, 224, "instance")
    assert (cfg.eval.many_threshold, cfg.eval.few_threshold) == (100, 20)  # protocol.md §4
    assert cfg.name == f"{dataset}_{method}"
    if method == "softmax_eql":  # eql.md §4-5
        assert (m.head, m.head_scale) == ("cosine", 30.0)
        params = {"tau": 1.0, "eps": 1e-4, "indicator": "pos"}
        assert (cfg.loss.name, cfg.loss.params) == ("softmax_eql", params)
    elif method in ("gala", "gala_rebalance"):  # gala.md §2 defaults, §4's plain linear classifier
        assert m.head == "linear"
        params = {"variant": "paper", "accumulation": "single", "lambda1": 1.0, "lambda2": 1.0}
        assert (cfg.loss.name, cfg.loss.params) == ("gala", params)
    elif method == "bgp":  # bgp.md §2: gradtail's default reading
        assert (m.head, cfg.loss.name) == ("cosine", "ce")
        assert (cfg.regularizer.name, cfg.regularizer.params) == ("bgp", {"variant": "logit", "beta": 0.1})
    else:  # gbg.md §1-2 at its defaults, frequency grouping (image lists)
        assert (m.head, cfg.loss.name, cfg.regularizer.name) == ("cosine", "ce", None)
        params = dict(cfg.update_rule.params)
        assert cfg.update_rule.name == "gbg" and params.pop("grouping") == "frequency"
        assert params == {"num_groups": 4, "group_at": "init", "normalization": "loss+", "combiner": "mgda",
                          "params": "backbone"}  # fmt: skip
    if method == "gala_rebalance":  # gala.md §3: the published tau, fixed
        assert cfg.eval.posthoc == ["gala_rebalance"]
        assert cfg.eval.posthoc_params == {"gala_rebalance": {"tau": REBALANCE_TAU[dataset], "tune": False}}
    else:
        assert cfg.eval.posthoc == []
    if method != "gbg":
        assert cfg.update_rule.name == "plain"


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_shipped_recipe_loads_unmodified(dataset: str, method: str) -> None:
    cfg = load_config(_config_path(dataset, method))
    check_component_params(cfg)
    _assert_recipe(cfg, dataset, method)
    assert known_splits()[dataset].num_classes == NUM_CLASSES[dataset]


def test_the_large_scale_folders_hold_these_configs_only() -> None:
    """A new file in these folders gets its recipe check here (and its training check)."""
    for dataset in DATASETS:
        shipped = sorted(p.stem for p in (REPO / "configs" / dataset).glob("*.yaml"))
        assert shipped == sorted(METHODS), dataset


def test_gala_rebalance_extends_gala_with_the_post_hoc_step_only() -> None:
    """One run gives both published columns: the training is gala.yaml's (gala.md §4)."""
    for dataset in DATASETS:
        plain = load_config(_config_path(dataset, "gala")).to_dict()
        rebalanced = load_config(_config_path(dataset, "gala_rebalance")).to_dict()
        for key in ("data", "model", "loss", "regularizer", "update_rule", "optim", "train"):
            assert rebalanced[key] == plain[key], (dataset, key)


# ------------------------------------------------------------------------------------ a few steps, full C
def _train(
    dataset: str, method: str, copies: dict[str, tuple[Path, Path]], out: Path
) -> tuple[Trainer, dict[str, object]]:
    """``gradtail train``'s path on the tiny copy: one epoch of 3 steps, the test split, the post-hoc
    step and final.json."""
    root, list_dir = copies[dataset]
    cfg = load_config(_config_path(dataset, method), _cpu_overrides(root, list_dir))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*entries, the community", category=UserWarning)
        trainer = Trainer(cfg, output_dir=out, verbose=False)
        final = trainer.fit()
    return trainer, final


def _check_training(trainer: Trainer, dataset: str, method: str) -> None:
    """Three finite steps at the full class count, and the method's per-class state of C entries."""
    c = NUM_CLASSES[dataset]
    assert trainer.data.num_classes == c
    counts = trainer.data.class_counts
    assert len(counts) == c and [counts[0], counts[1], counts[2], counts[-1]] == list(TRAIN_PER_CLASS)
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert tuple(out.shape) == (2, c)
    (record,) = trainer.history
    assert record["steps"] == sum(TRAIN_PER_CLASS) // BATCH
    assert math.isfinite(record["train_loss"])
    assert trainer.diagnostics is not None and trainer.diagnostics.stats.pos.shape == (c,)

    present = torch.tensor([0, 1, 2, c - 1])
    absent = torch.ones(c, dtype=torch.bool)
    absent[present] = False
    if method in ("softmax_eql", "gala", "gala_rebalance"):  # per-class gradient statistics (eql.md §1)
        stats = trainer.loss_fn.stats
        assert stats.pos.shape == (c,) and stats.neg.shape == (c,) and int(stats.steps) == record["steps"]
        assert bool((stats.pos[present] > 0).all()) and bool((stats.pos[absent] == 0).all())
        assert bool((stats.neg > 0).all())  # every class is a negative of every sample
    if method == "bgp":  # bgp.md §2: the penalty of the last step
        assert trainer.regularizer is not None and trainer.regularizer.last_value is not None
        assert math.isfinite(float(trainer.regularizer.last_value))
    if method == "gbg":  # gbg.md §1: every class in one of 4 frequency blocks
        groups = trainer.update_rule.groups
        assert groups is not None and groups.shape == (c,)
        assert torch.bincount(groups).tolist() == [len(b) for b in torch.arange(c).tensor_split(4)]
        assert bool((groups[present] == 0).all())  # the classes with images are the most frequent


def _check_final(trainer: Trainer, final: dict, dataset: str, method: str) -> None:
    """The test split evaluated once at the full class count, and the post-hoc step where configured."""
    c = NUM_CLASSES[dataset]
    assert len(final["class_counts"]) == c
    assert final["last_epoch"]["num_samples"] == 4 and len(final["last_epoch"]["per_class"]) == c
    if method == "gala_rebalance":  # gala.md §3 at the published tau; the state gradtail predict reads
        assert final["posthoc"]["gala_rebalance"]["params"] == {"tau": REBALANCE_TAU[dataset]}
        saved = trainer.run_dir.load_posthoc("gala_rebalance")
        assert saved["state"]["tau"] == REBALANCE_TAU[dataset]
        if trainer.data.has_split("val"):  # the validation class mass, for gradtail export
            assert saved["state"]["q"].shape == (c,)
        else:
            assert "q" not in saved["state"]
    else:
        assert final["posthoc"] == {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_recipe_trains_and_evaluates_at_the_full_class_count(
    dataset: str, method: str, benchmark_copies: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """Three steps, the test split, the post-hoc step and final.json at 1,000 / 365 / 8,142 classes.
    iNaturalist 2018 has no validation split (its val list is the test set): GALA's re-balancing runs at
    the published tau without a fit, and final.json leaves out the 8,142 x 8,142 confusion matrix."""
    trainer, final = _train(dataset, method, benchmark_copies, tmp_path / "run")
    _check_training(trainer, dataset, method)
    _check_final(trainer, final, dataset, method)
    large = NUM_CLASSES[dataset] > CONFUSION_MAX_CLASSES
    assert ("confusion" in final["last_epoch"]) != large
    if large:
        assert (tmp_path / "run" / "final.json").stat().st_size < 2_000_000


def test_a_tuned_post_hoc_step_without_a_validation_split_is_one_line(
    benchmark_copies: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    root, list_dir = benchmark_copies["inat2018"]
    cfg = load_config(_config_path("inat2018", "gala_rebalance"), _cpu_overrides(root, list_dir))
    cfg.eval.posthoc_params = {"gala_rebalance": {"tau": 1.5, "tune": True}}
    with pytest.raises(ConfigError, match=r"eval.posthoc \['gala_rebalance'\] tune on a validation split"):
        Trainer(cfg, output_dir=tmp_path / "run", verbose=False)
