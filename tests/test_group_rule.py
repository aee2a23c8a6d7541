"""Many / Medium / Few groups on any data (issue 14): the default rule (the protocol's > 100 / < 20 when no
group is empty, else terciles of the class counts), configured thresholds, and where the rule is recorded
(final.json ``groups``, the report's protocol paragraph)."""

import json
from pathlib import Path

import pytest
import torch

from conftest import shipped_run_configs, shipped_suites
from gradtail.bench import load_suite
from gradtail.config import config_from_dict, load_config
from gradtail.data.longtail import longtail_counts
from gradtail.engine.trainer import Trainer
from gradtail.errors import ConfigError, InputError
from gradtail.metrics import evaluate_logits, resolve_shot_groups, shot_groups
from gradtail.report.classification import group_record, protocol_paragraph

REPO = Path(__file__).resolve().parent.parent
CIFAR100_LT_IF100 = longtail_counts(500, 100, 100)  # 500 ... 5
FMNIST_LT_IF100 = [5980, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]  # head clipped by the val carve


def _sizes(counts, rule):
    g = shot_groups(counts, rule.many_threshold, rule.few_threshold)
    return len(g["many"]), len(g["medium"]), len(g["few"])


# ------------------------------------------------------------------------------------------- the rule
def test_cifar100_lt_keeps_the_protocol_thresholds():
    rule = resolve_shot_groups(CIFAR100_LT_IF100)
    assert (rule.rule, rule.many_threshold, rule.few_threshold) == ("protocol thresholds", 100, 20)
    assert rule.sizes == (35, 35, 30) == _sizes(CIFAR100_LT_IF100, rule)
    # the post-hoc configs carve 5 validation images per class first: same thresholds
    carved = [min(n, 495) for n in CIFAR100_LT_IF100]
    assert resolve_shot_groups(carved).to_dict() == {
        "rule": "protocol thresholds",
        "many_threshold": 100,
        "few_threshold": 20,
        "sizes": [35, 35, 30],
    }


def test_fashion_mnist_lt_default_uses_terciles():
    # the protocol's thresholds leave Few empty (smallest class: 60 images)
    assert len(shot_groups(FMNIST_LT_IF100, 100, 20)["few"]) == 0
    rule = resolve_shot_groups(FMNIST_LT_IF100)
    assert rule.rule == "terciles"
    assert (rule.many_threshold, rule.few_threshold) == (1292, 278)  # largest / smallest Medium count
    assert rule.sizes == (3, 4, 3) == _sizes(FMNIST_LT_IF100, rule)
    groups = rule.groups(FMNIST_LT_IF100)
    assert groups == {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}
    # configs/fashion_mnist_lt/base.yaml sets 1200 / 240 (x12 the protocol's): 4 / 3 / 3, kept as configured
    configured = resolve_shot_groups(FMNIST_LT_IF100, 1200, 240)
    assert (configured.rule, configured.sizes) == ("configured", (4, 3, 3))


@pytest.mark.parametrize("num_classes", [3, 4, 5, 6, 7, 10, 11, 100, 1000])
def test_terciles_are_k_largest_and_k_smallest(num_classes):
    counts = longtail_counts(60000, num_classes, 100)  # > 100 everywhere: the protocol has no Few
    rule = resolve_shot_groups(counts)
    k = num_classes // 3
    assert rule.rule == "terciles"
    assert rule.sizes == (k, num_classes - 2 * k, k)
    assert all(rule.sizes)


def test_order_of_classes_does_not_matter():
    shuffled = [FMNIST_LT_IF100[i] for i in (4, 9, 0, 7, 2, 5, 1, 8, 3, 6)]
    rule = resolve_shot_groups(shuffled)
    assert (rule.many_threshold, rule.few_threshold, rule.sizes) == (1292, 278, (3, 4, 3))


def test_ties_share_a_group_and_go_to_medium_at_a_cut():
    counts = [900, 900, 500, 500, 500, 300, 300, 300, 80]  # k = 3: the cuts fall inside ties
    rule = resolve_shot_groups(counts)
    assert rule.rule == "terciles"
    groups = rule.groups(counts)
    for group in groups.values():  # equal counts never split across groups
        assert not {counts[j] for j in group} & {
            counts[j] for g in groups.values() if g is not group for j in g
        }
    assert groups == {"many": [0, 1], "medium": [2, 3, 4, 5, 6, 7], "few": [8]}


def test_ties_never_empty_a_group_with_three_distinct_counts():
    # the top k + 1 classes tie: Many would be empty at the tercile cut; clamped so every group keeps one
    for counts in (
        [400, 400, 400, 400, 150, 110],
        [400, 150, 110, 110, 110, 110],
        [7, 7, 7, 7, 7, 7, 7, 6, 5],
    ):
        rule = resolve_shot_groups(counts)
        assert rule.rule == "terciles"
        assert all(rule.sizes), (counts, rule)
        assert rule.sizes == _sizes(counts, rule)
        assert rule.few_threshold <= rule.many_threshold


def test_three_classes_one_per_group():
    rule = resolve_shot_groups([300, 150, 120])
    assert rule.rule == "terciles" and rule.sizes == (1, 1, 1)
    assert rule.groups([300, 150, 120]) == {"many": [0], "medium": [1], "few": [2]}
    # three classes that the protocol separates keep its thresholds
    assert resolve_shot_groups([500, 50, 5]).rule == "protocol thresholds"


def test_two_classes_split_into_many_and_few_at_the_midpoint():
    rule = resolve_shot_groups([300, 30])
    assert rule.rule == "terciles"
    assert rule.many_threshold == rule.few_threshold == 165
    assert rule.groups([300, 30]) == {"many": [0], "medium": [], "few": [1]}
    # counts one apart cannot be split by integer thresholds with an inclusive Medium: Many + Medium
    assert resolve_shot_groups([31, 30]).groups([31, 30]) == {"many": [0], "medium": [1], "few": []}


def test_step_profile_and_balanced_counts():
    step = longtail_counts(6000, 10, 100, profile="step")  # 5 x 6000, 5 x 60: two distinct counts
    rule = resolve_shot_groups(step)
    assert rule.sizes == (5, 0, 5)
    balanced = resolve_shot_groups([50] * 4)  # one distinct count: nothing to split, all Medium
    assert balanced.sizes == (0, 4, 0) and balanced.many_threshold == balanced.few_threshold == 50
    assert resolve_shot_groups([42]).sizes == (0, 1, 0)  # one class


def test_configured_thresholds_are_kept_even_with_an_empty_group():
    rule = resolve_shot_groups(FMNIST_LT_IF100, 100, 20)
    assert (rule.rule, rule.many_threshold, rule.few_threshold, rule.sizes) == (
        "configured",
        100,
        20,
        (8, 2, 0),
    )
    assert resolve_shot_groups(CIFAR100_LT_IF100, 100, 20).rule == "configured"


def test_one_threshold_alone_is_an_error():
    with pytest.raises(InputError, match="both"):
        resolve_shot_groups(FMNIST_LT_IF100, many_threshold=100)
    with pytest.raises(InputError, match="no class counts"):
        resolve_shot_groups([])


def test_evaluate_logits_resolves_none_thresholds():
    counts = [300, 150, 120]
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 0, 0]])
    targets = torch.tensor([0, 1, 2, 2])
    by_rule = evaluate_logits(logits, targets, counts, None, None)
    assert (by_rule.many, by_rule.medium, by_rule.few) == (1.0, 1.0, 0.5)
    protocol = evaluate_logits(logits, targets, counts)  # the function's defaults stay 100 / 20
    assert (protocol.many, protocol.medium, protocol.few) == (pytest.approx(2.5 / 3), None, None)


# ------------------------------------------------------------------------------------------- configs
def test_config_defaults_to_the_rule_and_checks_both_thresholds():
    cfg = config_from_dict({"name": "x"})
    assert cfg.eval.many_threshold is None and cfg.eval.few_threshold is None
    with pytest.raises(ConfigError, match=r"eval.many_threshold and eval.few_threshold are set together"):
        config_from_dict({"eval": {"many_threshold": 50}})
    with pytest.raises(ConfigError, match="few_threshold must be <="):
        config_from_dict({"eval": {"many_threshold": 5, "few_threshold": 50}})
    cfg = config_from_dict({"eval": {"many_threshold": 50, "few_threshold": 5}})
    assert (cfg.eval.many_threshold, cfg.eval.few_threshold) == (50, 5)


POOL = {"cifar10": (10, 5000), "cifar100": (100, 500), "fashion_mnist": (10, 6000)}


def _shipped_configs():
    configs = [(str(p.relative_to(REPO)), load_config(p)) for p in shipped_run_configs()]
    for path in shipped_suites():
        suite = load_suite(path, tuned=False)
        configs += [(f"{path.name}:{m.name}", suite.run_config(m, suite.seeds[0])) for m in suite.methods]
    return configs


def test_shipped_configs_keep_their_group_thresholds():
    """Every shipped config and suite run has the thresholds it had before the rule: explicit ones are
    kept, and those that relied on the 100 / 20 default (CIFAR-100-LT) resolve to 100 / 20 again."""
    checked = 0
    for where, cfg in _shipped_configs():
        d = cfg.data
        if d.dataset not in POOL:  # list datasets (ImageNet-LT): counts come from the split files
            continue
        num_classes, n_max = POOL[d.dataset]
        counts = longtail_counts(d.n_max or n_max, num_classes, d.imbalance_factor, d.profile)
        counts = [min(n, n_max - d.val_per_class) for n in counts]
        rule = resolve_shot_groups(counts, cfg.eval.many_threshold, cfg.eval.few_threshold)
        before = (cfg.eval.many_threshold or 100, cfg.eval.few_threshold or 20)
        assert (rule.many_threshold, rule.few_threshold) == before, where
        assert all(rule.sizes), (where, rule)
        checked += 1
    assert checked > 20


# ------------------------------------------------------------------------------------------- records
def _tiny(**eval_cfg):
    return config_from_dict(
        {
            "name": "groups",
            "data": {
                "dataset": "synthetic",
                "imbalance_factor": 10,
                "val_per_class": 4,
                "synthetic": {"num_classes": 4, "per_class": 44, "test_per_class": 10, "image_size": 10},
                "augment": {"crop_padding": 0, "hflip": False},
            },
            "model": {"name": "small_cnn", "params": {"width": 4}},
            "optim": {"lr": 0.05, "batch_size": 16, "epochs": 2, "warmup_epochs": 0, "schedule": "cosine"},
            "train": {"seed": 0, "progress": False, "diagnostics": False},
            "eval": {"posthoc": ["posthoc_la"], **eval_cfg},
        }
    )


def _group_means(per_class, groups):
    return {
        name: (sum(per_class[j] for j in members) / len(members)) if members else None
        for name, members in groups.items()
    }


def test_final_json_records_the_rule_used_for_every_epoch_and_posthoc_row(tmp_path):
    final = Trainer(_tiny(), output_dir=tmp_path, verbose=False).fit()
    counts = final["class_counts"]
    assert counts == [40, 20, 9, 4]  # every class under 100: the protocol would leave Many empty
    expected = {"rule": "terciles", "many_threshold": 20, "few_threshold": 9, "sizes": [1, 2, 1]}
    assert final["groups"] == expected
    assert json.loads((tmp_path / "final.json").read_text())["groups"] == expected
    groups = shot_groups(counts, 20, 9)
    for row in (final["last_epoch"], final["posthoc"]["posthoc_la"]):  # the same groups in every row
        means = _group_means(row["per_class"], groups)
        for name in ("many", "medium", "few"):
            assert row[name] == pytest.approx(means[name])
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2
    for record in epochs:  # no empty group in any epoch (the protocol's 100 / 20 would give Many N/A)
        assert all(record["val"][name] is not None for name in ("many", "medium", "few"))
        assert "test" not in record and "test_curve" not in record  # the test split: once, at the end
    assert epochs[-1]["val"]["many"] == pytest.approx(final["val_last_epoch"]["many"])


def test_final_json_records_configured_thresholds(tmp_path):
    final = Trainer(_tiny(many_threshold=20, few_threshold=5), output_dir=tmp_path, verbose=False).fit()
    assert final["groups"] == {
        "rule": "configured",
        "many_threshold": 20,
        "few_threshold": 5,
        "sizes": [1, 2, 1],
    }


def _results(groups, many=None, few=None):
    return {
        "subset": {
            "dataset": "fashion_mnist",
            "imbalance_factor": 100,
            "profile": "exp",
            "subset_seed": 0,
            "train_images": sum(FMNIST_LT_IF100),
            "counts": FMNIST_LT_IF100,
            "sha256": "0" * 64,
            "val_counts": [20] * 10,
            "test_images": 10000,
        },
        "recipe": {
            "model": "small_cnn",
            "model_params": {},
            "epochs": 12,
            "batch_size": 128,
            "lr": 0.05,
            "schedule": "cosine",
            "warmup_epochs": 1,
            "weight_decay": 5e-4,
            "augment": {"crop_padding": 2, "hflip": True},
            "many_threshold": many,
            "few_threshold": few,
            "ece_bins": 15,
        },
        "groups": groups,
        "seeds": [0],
        "table": [],
    }


def test_report_paragraph_names_the_rule():
    terciles = resolve_shot_groups(FMNIST_LT_IF100).to_dict()
    text = protocol_paragraph(_results(terciles))
    assert "classes with > 1292, 278–1292, < 278 training images" in text
    assert "terciles of the training counts, 3 / 4 / 3 classes" in text
    assert "> 100 / < 20 would leave a group empty" in text

    protocol = resolve_shot_groups(CIFAR100_LT_IF100).to_dict()
    text = protocol_paragraph(_results(protocol))
    assert "classes with > 100, 20–100, < 20 training images (the protocol's thresholds" in text
    assert "35 / 35 / 30 classes" in text

    text = protocol_paragraph(_results(resolve_shot_groups(FMNIST_LT_IF100, 1200, 240).to_dict(), 1200, 240))
    assert "> 1200, 240–1200, < 240 training images (thresholds set in the config; 4 / 3 / 3 classes" in text


def test_report_without_recorded_groups_resolves_them_from_the_recipe():
    # results built from runs that predate final.json's "groups": the recipe's thresholds and the counts
    assert "terciles of the training counts" in protocol_paragraph(_results(None))
    assert "thresholds set in the config" in protocol_paragraph(_results(None, 1200, 240))


def test_group_record_of_a_suite():
    a = {"rule": "terciles", "many_threshold": 18, "few_threshold": 8, "sizes": [1, 2, 1]}
    b = {"rule": "configured", "many_threshold": 20, "few_threshold": 5, "sizes": [1, 2, 1]}
    finals = [{"method": "ce", "seed": 0, "groups": a}, {"method": "la", "seed": 0, "groups": a}]
    assert group_record(finals) == a
    finals[1]["groups"] = b
    mixed = group_record(finals)
    assert mixed["rule"] == "per run" and [r["rule"] for r in mixed["runs"]] == ["terciles", "configured"]
    assert "differ between runs" in protocol_paragraph(_results(mixed))
    assert group_record([{"method": "ce", "seed": 0}]) is None
