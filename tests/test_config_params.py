"""Config numbers in every float form Python reads, and parameter mappings checked against their components
when the config is loaded (issue 13, faults 3 and 4)."""

import math
import re

import pytest
import yaml

from conftest import shipped_run_configs
from gradtail.bench import load_suite
from gradtail.cli.main import main
from gradtail.config import config_from_dict, dump_config, load_config, parse_yaml
from gradtail.engine.components import check_component_params
from gradtail.errors import ConfigError
from gradtail.losses import create_loss
from gradtail.registry import Registry

SYNTHETIC_BASE = {
    "data": {
        "dataset": "synthetic",
        "imbalance_factor": 10,
        "val_per_class": 3,
        "synthetic": {"num_classes": 4, "per_class": 33, "test_per_class": 10, "image_size": 10},
    },
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "optim": {"batch_size": 16, "epochs": 2, "warmup_epochs": 0, "schedule": "cosine"},
    "train": {"progress": False},
    "eval": {"many_threshold": 20, "few_threshold": 5},
}


def write_config(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def one_line_error(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- numbers (fault 3)


def test_scientific_notation_in_a_config_file(tmp_path):
    path = write_config(
        tmp_path,
        "optim: {lr: 1e-2, weight_decay: 5e-4, min_lr: 1E-6, warmup_epochs: .5}\n"
        "loss: {name: logit_adjust, params: {tau: 1e-2}}\n",
    )
    cfg = load_config(path)
    assert cfg.optim.lr == 0.01 and cfg.optim.weight_decay == 5e-4 and cfg.optim.min_lr == 1e-6
    assert cfg.optim.warmup_epochs == 0.5
    tau = cfg.loss.params["tau"]
    assert isinstance(tau, float) and tau == 0.01
    loss = create_loss(cfg.loss.name, 3, class_counts=[10, 5, 1], **cfg.loss.params)
    assert loss.tau == 0.01


def test_scientific_notation_in_set_overrides(tmp_path):
    path = write_config(tmp_path, "loss: {name: logit_adjust}\n")
    cfg = load_config(
        path,
        ["optim.lr=1e6", "optim.weight_decay=5E-4", "loss.params.tau=1e-2", "optim.momentum=+.9"],
    )
    assert cfg.optim.lr == 1e6 and cfg.optim.weight_decay == 5e-4 and cfg.optim.momentum == 0.9
    assert cfg.loss.params == {"tau": 0.01} and isinstance(cfg.loss.params["tau"], float)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1e-2", 0.01),
        ("5E-4", 5e-4),
        ("1e6", 1e6),
        ("1.5e+3", 1500.0),
        ("1.0e-2", 0.01),
        ("-1e-2", -0.01),
        (".5", 0.5),
        ("+.5", 0.5),
        ("1.", 1.0),
        ("1_000.5", 1000.5),
        ("1e1_0", 1e10),
    ],
)
def test_python_float_forms_are_floats(text, expected):
    value = parse_yaml(text)
    assert isinstance(value, float) and value == float(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3", 3),
        ("+3", 3),
        ("1_000", 1000),
        ("cifar10", "cifar10"),
        ("1e-2abc", "1e-2abc"),
        ("1e", "1e"),
        ("e5", "e5"),
        ("1.2.3", "1.2.3"),
        ("inf", "inf"),
        ("nan", "nan"),
        ("1__0.5", "1__0.5"),  # not a Python float (one underscore between digits)
    ],
)
def test_integers_and_strings_keep_their_type(text, expected):
    value = parse_yaml(text)
    assert type(value) is type(expected) and value == expected


def test_integer_fields_take_integral_numbers(tmp_path):
    path = write_config(tmp_path, "optim: {epochs: 1e2, milestones: [6e1, 8e1]}\n")
    cfg = load_config(path, ["optim.batch_size=1.28e2", "train.seed=7"])
    assert cfg.optim.epochs == 100 and type(cfg.optim.epochs) is int
    assert cfg.optim.milestones == [60, 80] and all(type(m) is int for m in cfg.optim.milestones)
    assert cfg.optim.batch_size == 128 and type(cfg.optim.batch_size) is int
    assert cfg.train.seed == 7 and type(cfg.train.seed) is int


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.epochs=2.5", "'optim.epochs': expected an integer, got 2.5"),
        ("optim.epochs=1e30", "'optim.epochs': expected an integer"),  # beyond exact float integers
        ("data.n_max=1.5", "'data.n_max': expected int | None"),
    ],
)
def test_integer_fields_reject_fractions(tmp_path, override, match):
    path = write_config(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match=re.escape(match)) as e:
        load_config(path, [override])
    one_line_error(e)


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.lr=1e-2abc", "'optim.lr': expected a number, got '1e-2abc'"),
        ("optim.lr=inf", "'optim.lr': expected a number, got 'inf'"),
        ("optim.lr=.inf", "'optim.lr': expected a finite number, got inf"),
        ("optim.weight_decay=-.inf", "'optim.weight_decay': expected a finite number, got -inf"),
        ("optim.momentum=.nan", "'optim.momentum': expected a finite number, got nan"),
        ("optim.lr=" + "9" * 400, "'optim.lr': " + "9" * 400 + " is too large for a number"),
        ("optim.lr=2020-13-45", "value is not valid YAML"),  # a date pattern that does not construct
    ],
)
def test_bad_numbers_are_one_line_config_errors(tmp_path, override, match):
    path = write_config(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match=re.escape(match)) as e:
        load_config(path, [override])
    one_line_error(e)


def test_bad_number_in_a_file_names_the_key(tmp_path):
    path = write_config(tmp_path, "optim: {weight_decay: 5e-4x}\n")
    with pytest.raises(ConfigError, match=re.escape("'optim.weight_decay': expected a number, got '5e-4x'")):
        load_config(path)


def test_strings_stay_strings_and_dump_round_trips(tmp_path):
    path = write_config(
        tmp_path,
        "name: '1e-2'\n"
        "data: {dataset: cifar10}\n"
        "optim: {lr: 1e-5, weight_decay: 5e-4}\n"
        "train: {output_dir: 'runs/1e5'}\n"
        "loss: {name: logit_adjust, params: {tau: 1e-2}}\n",
    )
    cfg = load_config(path)
    assert cfg.name == "1e-2" and cfg.data.dataset == "cifar10" and cfg.train.output_dir == "runs/1e5"
    text = dump_config(cfg)
    assert "'1e-2'" in text  # quoted: read back as a string, not the number 0.01
    again = tmp_path / "again.yaml"
    again.write_text(text)
    reloaded = load_config(again)
    assert reloaded.to_dict() == cfg.to_dict()
    assert reloaded.hash() == cfg.hash()
    assert yaml.safe_load(text)["optim"]["lr"] == 1e-5  # plain YAML 1.1 readers get the same numbers


def test_suite_files_read_scientific_notation(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(SYNTHETIC_BASE))
    (tmp_path / "suite.yaml").write_text(
        "base: base.yaml\n"
        "overrides: {optim: {lr: 5e-2}}\n"
        "methods:\n"
        "  la: {loss: {name: logit_adjust, params: {tau: 1e-1}}}\n"
    )
    suite = load_suite(tmp_path / "suite.yaml")
    cfg = suite.run_config(suite.method("la"), 0)
    assert cfg.optim.lr == 0.05 and cfg.loss.params == {"tau": 0.1}


# --------------------------------------------------------------------------- parameters (fault 4)


@pytest.mark.parametrize(
    "settings,full_key,valid",
    [
        ({"loss": {"name": "logit_adjust", "params": {"tua": 1}}}, "loss.params.tua", ["tau", "drw_epoch"]),
        (
            {"loss": {"name": "drw", "params": {"base": "ldam", "max_margn": 0.5}}},
            "loss.params.max_margn",
            ["max_margin", "scale", "base", "drw_epoch"],
        ),
        ({"model": {"name": "small_cnn", "params": {"widht": 8}}}, "model.params.widht", ["width", "norm"]),
        (
            {"model": {"name": "resnet50", "params": {"zero_init": True}}},
            "model.params.zero_init",
            ["zero_init_residual"],
        ),
        (
            {"regularizer": {"name": "bgp", "params": {"bta": 0.1}}},
            "regularizer.params.bta",
            ["variant", "beta"],
        ),
        ({"update_rule": {"name": "sam", "params": {"roh": 0.1}}}, "update_rule.params.roh", ["rho", "eps"]),
        (
            {"eval": {"posthoc": ["tau_norm"], "posthoc_params": {"tau_norm": {"tuen": False}}}},
            "eval.posthoc_params.tau_norm.tuen",
            ["tau", "tune", "bias_mode"],
        ),
        (
            {"data": {"sampler": "power", "sampler_params": {"pwr": 0.5}}},
            "data.sampler_params.pwr",
            ["num_samples", "power"],
        ),
        (
            {"data": {"dataset": "synthetic", "synthetic": {"per_clas": 5}}},
            "data.synthetic.per_clas",
            ["num_classes", "per_class", "test_per_class"],
        ),
    ],
)
def test_misspelled_parameter_names_full_key_and_lists_valid(settings, full_key, valid):
    cfg = config_from_dict(settings)
    with pytest.raises(ConfigError) as e:
        check_component_params(cfg)
    message = one_line_error(e)
    section = full_key.rsplit(".", 1)[0]
    assert message.startswith(f"unknown config key {full_key!r}")
    listing = message.split(f"valid keys in {section}: ", 1)[1].split(", ")
    assert set(valid) <= set(listing)


@pytest.mark.parametrize(
    "settings,message",
    [
        (
            {"update_rule": {"name": "plain", "params": {"rho": 0.1}}},
            "unknown config key 'update_rule.params.rho' (update rule 'plain'); "
            "update rule 'plain' takes no parameters",
        ),
        (
            {"model": {"name": "small_cnn", "params": {"head": "cosine"}}},
            "config key 'model.params.head' cannot be set: model 'small_cnn' gets 'head' from model.head",
        ),
        (
            {"loss": {"name": "ldam", "params": {"class_counts": [3, 2, 1]}}},
            "config key 'loss.params.class_counts' cannot be set: loss 'ldam' gets 'class_counts' "
            "from the training data",
        ),
        (
            {"data": {"sampler": "class_balanced", "sampler_params": {"seed": 3}}},
            "config key 'data.sampler_params.seed' cannot be set: sampler 'class_balanced' gets 'seed' "
            "from train.seed",
        ),
        (
            {"eval": {"posthoc_params": {"posthoc_la": {"class_counts": [3, 2, 1]}}}},
            "config key 'eval.posthoc_params.posthoc_la.class_counts' cannot be set",
        ),
        (
            {"eval": {"posthoc_params": {"tau_nrom": {"tau": 1.0}}}},
            "config key 'eval.posthoc_params.tau_nrom': unknown post-hoc adjuster 'tau_nrom'",
        ),
        (
            {"eval": {"posthoc_params": {"tau_norm": 1.0}}},
            "config key 'eval.posthoc_params.tau_norm': expected a mapping of parameters, got 1.0",
        ),
        (
            {"loss": {"name": "drw", "params": {"base": "ldm"}}},
            "config key 'loss.params.base': unknown loss 'ldm'",
        ),
        ({"loss": {"name": "drw", "params": {"base": "drw"}}}, "must wrap another loss, not 'drw'"),
        ({"loss": {"name": "no_such_loss"}}, "unknown loss 'no_such_loss'; valid:"),
        ({"model": {"name": "resnet5"}}, "unknown model 'resnet5'; valid:"),
        ({"data": {"sampler": "balanced"}}, "unknown sampler 'balanced'; valid:"),
        ({"eval": {"posthoc": ["tau_nrom"]}}, "unknown post-hoc adjuster 'tau_nrom'"),
    ],
)
def test_parameters_the_trainer_sets_and_unknown_components(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        check_component_params(config_from_dict(settings))
    one_line_error(e)


def test_valid_parameters_pass():
    cfg = config_from_dict(
        {
            "data": {
                "dataset": "synthetic",
                "sampler": "progressive",
                "sampler_params": {"total_epochs": 10, "num_samples": 100},
                "synthetic": {"num_classes": 4, "test_per_class": 5},
            },
            "model": {"name": "resnet32", "params": {}},
            "loss": {"name": "drw", "params": {"base": "ldam", "max_margin": 0.5, "drw_epoch": 1e2}},
            "regularizer": {"name": "bcl", "params": {"temperature": 1e-1}},
            "update_rule": {"name": "gbg", "params": {"num_groups": 2, "tol": 1e-5}},
            "eval": {
                "posthoc": ["posthoc_la", "tau_norm"],
                "posthoc_params": {"posthoc_la": {"tune": False}, "tau_norm": {"bias_mode": "scale"}},
            },
        }
    )
    check_component_params(cfg)
    check_component_params(config_from_dict({"loss": {"name": "ldam", "params": {"drw_epoch": 160}}}))


def test_set_override_with_a_misspelled_parameter(tmp_path):
    """What ``gradtail train cfg.yaml --set loss.params.tua=1`` meets once the trainer checks parameters."""
    path = write_config(tmp_path, "loss: {name: logit_adjust}\n")
    cfg = load_config(path, ["loss.params.tua=1"])
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'loss.params.tua'")) as e:
        check_component_params(cfg)
    assert "valid keys in loss.params: tau" in one_line_error(e)


def test_synthetic_keys_match_the_data_builder():
    from gradtail.data import builder

    settings = {"data": {"dataset": "synthetic", "synthetic": {"nope": 1}}}
    with pytest.raises(ConfigError) as e:
        check_component_params(config_from_dict(settings))
    listed = one_line_error(e).split("valid keys in data.synthetic: ", 1)[1].split(", ")
    assert set(listed) == set(builder._SYNTHETIC_KEYS)


def test_registry_check_params_signatures():
    registry: Registry[object] = Registry("widget")

    @registry.register("strict")
    def strict(size: int, /, depth: int, *, scale: float = 1.0) -> object:
        return object()

    @registry.register("forwarding")
    def forwarding(depth: int = 1, **rest: object) -> object:
        return object()

    assert registry.check_params("strict", {"depth": 2, "scale": 1e-1}, "widget.params") == {}
    with pytest.raises(ConfigError, match=re.escape("valid keys in widget.params: depth, scale")):
        registry.check_params("strict", {"depth": 2, "size": 3}, "widget.params")  # size is positional-only
    with pytest.raises(
        ConfigError, match=re.escape("'widget.params' lacks 'depth', required by widget 'strict'")
    ):
        registry.check_params("strict", {"scale": 2.0}, "widget.params")
    registry.check_params("strict", {}, "widget.params", reserved={"depth": "widget.depth"})
    with pytest.raises(ConfigError, match=re.escape("gets 'depth' from widget.depth")):
        registry.check_params("strict", {"depth": 1}, "widget.params", reserved={"depth": "widget.depth"})
    forwarded = registry.check_params("forwarding", {"depth": 2, "colour": "red"}, "widget.params")
    assert forwarded == {"colour": "red"}
    with pytest.raises(ConfigError, match=re.escape("unknown widget 'nope'; valid: forwarding, strict")):
        registry.check_params("nope", {}, "widget.params")


def test_shipped_configs_pass_the_parameter_check(repo_root):
    paths = shipped_run_configs()
    assert paths
    for path in paths:
        check_component_params(load_config(path))


def write_suite(tmp_path, bad_method: dict) -> object:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(SYNTHETIC_BASE))
    suite = {
        "name": "tiny",
        "base": "base.yaml",
        "seeds": [0],
        "methods": {"ce": {}, "bad": bad_method},
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "bad_method,match",
    [
        ({"loss": {"name": "logit_adjust", "params": {"tua": 1.0}}}, "'loss.params.tua'"),
        ({"model": {"params": {"widht": 8}}}, "'model.params.widht'"),
        ({"data": {"synthetic": {"per_clas": 5}}}, "'data.synthetic.per_clas'"),
        (
            {"eval": {"posthoc": ["posthoc_la"], "posthoc_params": {"posthoc_la": {"tua": 1}}}},
            "posthoc_la.tua",
        ),
    ],
)
def test_suite_with_a_bad_method_fails_before_training(tmp_path, capsys, bad_method, match):
    path = write_suite(tmp_path, bad_method)
    with pytest.raises(
        ConfigError, match=re.escape("suite 'tiny', method 'bad': ") + ".*" + re.escape(match)
    ):
        load_suite(path)
    out = tmp_path / "out"
    assert main(["bench", str(path), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradtail: error: suite 'tiny', method 'bad': ")
    assert not (out / "ce").exists()  # not even the good first method trained


def test_non_finite_float_message_is_clear():
    with pytest.raises(ConfigError, match="expected a finite number"):
        config_from_dict({"data": {"imbalance_factor": math.inf}})
