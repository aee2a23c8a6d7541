"""Config loading: strict keys, types, overrides."""

import re

import pytest

from conftest import shipped_run_configs
from gradtail.config import RunConfig, apply_overrides, config_from_dict, load_config
from gradtail.errors import ConfigError


def test_shipped_configs_load(repo_root):
    """Every shipped config loads, names registered pieces its task takes (dataset, model, loss, ...;
    :func:`check_component_params`), and its update rule, regularizer and views settings build and agree
    (so a config fails here, not after hours of training)."""
    from gradtail.engine.components import check_component_params
    from gradtail.optim import create_update_rule
    from gradtail.regularizers import create_regularizer

    paths = shipped_run_configs()
    assert len(paths) >= 40
    tasks = set()
    for path in paths:
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig)
        check_component_params(cfg)
        tasks.add(cfg.task)
        create_update_rule(cfg.update_rule.name or "plain", **cfg.update_rule.params)
        r = cfg.regularizer
        reg = create_regularizer(r.name, **r.params) if r.name else None
        assert cfg.data.augment.views == (reg.num_views if reg is not None else 0), path
    assert tasks == {"classification", "segmentation", "detection", "instance_segmentation"}


def test_unknown_key_names_key_and_lists_valid():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"optim": {"learning_rate": 0.1}})
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "lr" in msg and "momentum" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=re.escape("'modle'")):
        config_from_dict({"modle": {}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=re.escape("optim.epochs")):
        config_from_dict({"optim": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=re.escape("train.progress")):
        config_from_dict({"train": {"progress": "yes"}})


def test_int_accepted_for_float_and_lists_checked():
    cfg = config_from_dict({"optim": {"lr": 1, "milestones": [3, 4], "milestone_factors": [0.1, 0.01]}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    with pytest.raises(ConfigError, match=re.escape("optim.milestones[1]")):
        config_from_dict({"optim": {"milestones": [3, "x"], "milestone_factors": [0.1, 0.2]}})


def test_cross_key_validation():
    with pytest.raises(ConfigError, match="milestone"):
        config_from_dict({"optim": {"milestones": [1], "milestone_factors": [0.1, 0.2]}})
    with pytest.raises(ConfigError, match="amp"):
        config_from_dict({"train": {"amp": "fp8"}})


def test_overrides_parse_yaml_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.1\n")
    cfg = load_config(
        p,
        [
            "optim.lr=0.05",
            "optim.milestones=[1, 2]",
            "optim.milestone_factors=[0.5, 0.1]",
            "loss.params.tau=1.5",
            "train.amp=bf16",
        ],
    )
    assert cfg.optim.lr == 0.05 and cfg.optim.milestones == [1, 2]
    assert cfg.loss.params == {"tau": 1.5} and cfg.train.amp == "bf16"
    assert cfg.name == "c"
    with pytest.raises(ConfigError, match=re.escape("optim.lrr")):
        load_config(p, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=re.escape("a.b=value")):
        apply_overrides({}, ["optim.lr"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_hash_ignores_output_dir():
    a = config_from_dict({"train": {"output_dir": "x"}})
    b = config_from_dict({"train": {"output_dir": "y"}})
    c = config_from_dict({"optim": {"lr": 0.2}})
    assert a.hash() == b.hash() != c.hash()
