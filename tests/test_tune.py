"""gradtail tune: declared search spaces, a planted optimum, the test split never read, resume after kill,
tuned suites."""

from __future__ import annotations

import inspect
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
import yaml

from gradtail.bench.suite import load_suite
from gradtail.config import config_from_dict, load_config
from gradtail.data.builder import build_data
from gradtail.errors import ConfigError
from gradtail.losses import LOSSES, register_loss
from gradtail.losses.base import LongTailLoss
from gradtail.optim import UPDATE_RULES
from gradtail.posthoc import POSTHOC
from gradtail.regularizers import REGULARIZERS
from gradtail.search_space import Choice, EpochFraction, FloatRange, IntRange, SearchSpace
from gradtail.tune import TuneSettings, method_search_space, tune_method
from gradtail.tune.spaces import apply_values, declared_search_space, defaults
from gradtail.tune.study import ForbiddenSplitRead, ValidationOnlyData

optuna = pytest.importorskip("optuna")

# Constructor arguments that are not hyperparameters: data the trainer passes, label conventions,
# numerical guards, bookkeeping, and the post-hoc adjusters' own search settings.
NOT_HYPERPARAMETERS = {
    "num_classes", "class_counts", "ignore_index", "background_label", "objectness", "eps", "seed",
    "tune", "grid", "tol", "classifier", "weight", "bias", "init_ratio", "max_iter", "batch_size",
    "sketch_dim", "start_epoch", "hidden_dim", "out_dim", "num_views", "drw_beta", "temperature_init",
}  # fmt: skip


def _hyperparameters(factory) -> dict[str, object]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    out = {}
    for name, p in inspect.signature(target).parameters.items():
        d = p.default
        if name in NOT_HYPERPARAMETERS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            continue
        if isinstance(d, (int, float)) and not isinstance(d, bool):
            out[name] = d
    return out


REGISTRIES = {"loss": LOSSES, "regularizer": REGULARIZERS, "update_rule": UPDATE_RULES, "posthoc": POSTHOC}


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_every_registered_component_with_hyperparameters_declares_a_search_space(kind):
    registry = REGISTRIES[kind]
    missing, wrong = [], []
    for name in registry.names():
        factory = registry.get(name)
        space = declared_search_space(kind, name)
        hyper = _hyperparameters(factory)
        if hyper and not space:
            missing.append(f"{kind} {name!r} ({', '.join(hyper)})")
        target = factory.__init__ if inspect.isclass(factory) else factory
        params = inspect.signature(target).parameters
        for key, param in space.items():
            if key not in params:
                wrong.append(f"{kind} {name!r}: {key} is not a constructor parameter")
                continue
            default = params[key].default
            if default is inspect.Parameter.empty:
                continue
            if isinstance(param, EpochFraction):
                continue  # an epoch number: checked against the schedule by method_search_space
            value = float(default) if isinstance(param, FloatRange) and isinstance(default, int) else default
            if not param.contains(value):
                wrong.append(f"{kind} {name!r}: default {key}={default!r} outside {param}")
    assert not missing, f"components with hyperparameters but no search_space: {missing}"
    assert not wrong, wrong


def _fm_like(**sections):
    cfg = {
        "name": "m",
        "data": {"dataset": "synthetic", "synthetic": {"num_classes": 3, "per_class": 10}},
        "model": {"name": "small_cnn", "params": {"width": 4}},
        "loss": {"name": "ce"},
        "optim": {"epochs": 10, "warmup_epochs": 0},
    }
    cfg.update(sections)
    return config_from_dict(cfg)


def test_method_space_gathers_every_component_with_the_config_defaults():
    cfg = _fm_like(
        loss={"name": "ldam", "params": {"max_margin": 0.3, "drw_epoch": 8}},
        model={"name": "small_cnn", "head": "cosine", "params": {"width": 4}},
        regularizer={"name": "bgp", "params": {"beta": 0.2}},
        update_rule={"name": "sam"},
    )
    space = {p.key: p for p in method_search_space(cfg)}
    assert set(space) == {
        "loss.params.max_margin", "loss.params.scale", "loss.params.drw_epoch",
        "regularizer.params.variant", "regularizer.params.beta", "update_rule.params.rho",
    }  # fmt: skip
    assert space["loss.params.max_margin"].default == 0.3  # the config's value
    assert space["loss.params.scale"].default == 30.0  # the constructor's default
    assert space["loss.params.drw_epoch"].default == pytest.approx(0.8)  # epoch 8 of 10, as a fraction
    assert space["regularizer.params.variant"].default == "logit"
    assert method_search_space(_fm_like()) == []  # CE has nothing to tune


def test_default_outside_the_space_is_a_config_error():
    cfg = _fm_like(loss={"name": "focal", "params": {"gamma": 9.0}})
    with pytest.raises(ConfigError, match=r"loss.params.gamma.*outside"):
        method_search_space(cfg)


def test_apply_values_writes_params_and_converts_epoch_fractions():
    cfg = _fm_like(loss={"name": "ce", "params": {"drw_epoch": 5}})
    space = method_search_space(cfg)
    out = apply_values(cfg.to_dict(), space, {"loss.params.drw_epoch": 0.62})
    assert out["loss"]["params"]["drw_epoch"] == 6  # round(0.62 * 10)
    assert cfg.loss.params["drw_epoch"] == 5  # the input is not modified
    assert defaults(space) == {"loss.params.drw_epoch": 0.5}


def test_param_kinds():
    class FixedTrial:
        def suggest_float(self, name, low, high, *, log=False):
            return (low, high, log)

        def suggest_int(self, name, low, high, *, step=1, log=False):
            return (low, high, step)

        def suggest_categorical(self, name, choices):
            return tuple(choices)

    t = FixedTrial()
    assert FloatRange(0.01, 1.0, log=True).suggest(t, "b", 10) == (0.01, 1.0, True)
    assert IntRange(2, 8).suggest(t, "g", 10) == (2, 8, 1)
    assert Choice(("a", "b")).suggest(t, "v", 10) == ("a", "b")
    assert EpochFraction(0.5, 0.9).to_config(0.75, 12) == 9
    with pytest.raises(ValueError):
        FloatRange(0.0, 1.0, log=True)


# --------------------------------------------------------------------------- tuning on tiny data

PLANTED = 0.7


class PlantedLoss(LongTailLoss):
    """CE on z + K (shift - 0.7) e_0: the model learns raw logits biased against class 0 by the same amount,
    so validation balanced accuracy (raw logits) is best at shift = 0.7, the planted optimum."""

    search_space: ClassVar[SearchSpace] = {"shift": FloatRange(0.0, 1.0)}

    def __init__(self, num_classes: int, class_counts=None, shift: float = 0.0) -> None:
        super().__init__(num_classes)
        self.shift = float(shift)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        offset = torch.zeros(self.num_classes, device=logits.device)
        offset[0] = 10.0 * (self.shift - PLANTED)
        return F.cross_entropy(logits.float() + offset, targets)


@pytest.fixture
def planted_loss():
    """Registered for one test only (the registry-wide loss tests must not see it)."""
    register_loss("planted_tune_test")(PlantedLoss)
    yield "planted_tune_test"
    LOSSES._factories.pop("planted_tune_test")  # the registry has no public removal: tests only


SYNTHETIC = {"num_classes": 3, "per_class": 60, "test_per_class": 10, "image_size": 8, "noise": 0.3}


def tiny_config(loss: dict, epochs: int = 5, **train) -> dict:
    return {
        "name": "tiny",
        "data": {
            "dataset": "synthetic",
            "imbalance_factor": 1,
            "val_per_class": 10,
            "synthetic": dict(SYNTHETIC),
        },
        "model": {"name": "small_cnn", "params": {"width": 8}},
        "loss": loss,
        "optim": {"lr": 0.05, "batch_size": 16, "epochs": epochs, "warmup_epochs": 0, "schedule": "cosine"},
        "train": {"seed": 0, "progress": False, **train},
    }


def test_tune_finds_the_planted_optimum_and_never_reads_test(tmp_path, planted_loss):
    cfg = config_from_dict(tiny_config({"name": planted_loss}))
    data = build_data(cfg.data)
    reads: list[str] = []

    original = data.eval_loader

    def eval_loader(split, *args, **kwargs):
        reads.append(split)
        return original(split, *args, **kwargs)

    data.eval_loader = eval_loader  # type: ignore[method-assign]
    settings = TuneSettings(trials=14, pruner="none", final_test=False, seed=0)
    result = tune_method("planted", cfg, tmp_path, settings, data=data, log=lambda _: None)
    assert "test" not in reads and "val" in reads  # selection saw validation only
    best = result.best_params["loss.params.shift"]
    assert abs(best - PLANTED) < 0.15, result.best_params
    assert result.best_value > result.default_value + 0.2  # the default (shift 0) is far from it
    assert result.trials == {"COMPLETE": 14}
    chosen = load_config(result.best_config)
    assert chosen.loss.params["shift"] == pytest.approx(best, abs=1e-6) and chosen.optim.epochs == 5

    # then the chosen configuration, once, on test (a second call reuses the finished study)
    settings.final_test = True
    again = tune_method("planted", cfg, tmp_path, settings, data=data, log=lambda _: None)
    assert again.trials == {"COMPLETE": 14} and again.final is not None and "top1" in again.final
    assert reads.count("test") >= 1


def test_validation_only_view_refuses_the_test_split():
    cfg = config_from_dict(tiny_config({"name": "ce"}))
    view = ValidationOnlyData(build_data(cfg.data))
    assert view.has_split("val") and not view.has_split("test")
    with pytest.raises(ForbiddenSplitRead, match="not read while tuning"):
        view.eval_loader("test", cfg, torch.device("cpu"))
    no_val = tiny_config({"name": "ce"})
    no_val["data"]["val_per_class"] = 0
    cfg = config_from_dict(no_val)
    with pytest.raises(ConfigError, match="validation split"):
        ValidationOnlyData(build_data(cfg.data))


def _completed(db: Path) -> list[tuple[int, float]]:
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(db, timeout=1) as con:
            rows = con.execute(
                "select t.number, v.value from trials t join trial_values v on v.trial_id = t.trial_id "
                "where t.state = 'COMPLETE' order by t.number"
            ).fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or locked
        return []
    return [(int(n), float(v)) for n, v in rows]


def test_resume_after_kill_continues_the_same_study(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config({"name": "logit_adjust"}, epochs=4)))
    out = tmp_path / "tune"
    cmd = [sys.executable, "-m", "gradtail", "tune", str(config), "--trials", "5", "--no-test"]
    cmd += ["--output", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = out / "study.db"
    deadline = time.time() + 120
    while len(_completed(db)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _completed(db)
    assert 2 <= len(before) < 5, "the tune must be killed part-way"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = _completed(db)
    assert after[: len(before)] == before  # the finished trials are kept, not redone
    assert len(after) == 5
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    assert sum(bool(t.user_attrs.get("default")) for t in study.trials) == 1  # the default enqueued once
    assert (out / "tiny" / "best.yaml").is_file() and (out / "report.html").is_file()


def test_tuned_suite_runs_each_method_at_its_chosen_setting(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_config({"name": "ce"})))
    suite_file = tmp_path / "suite.yaml"
    suite = {
        "name": "s",
        "base": "base.yaml",
        "seeds": [0, 1],
        "tuned": True,
        "tune_dir": str(tmp_path / "tune"),
        "methods": {"ce": {}, "la": {"loss": {"name": "logit_adjust"}}},
    }
    suite_file.write_text(yaml.safe_dump(suite))
    with pytest.raises(ConfigError, match=r"best.yaml does not exist; run `gradtail tune"):
        load_suite(suite_file)
    assert [m.name for m in load_suite(suite_file, tuned=False).methods] == ["ce", "la"]
    best = tiny_config({"name": "logit_adjust", "params": {"tau": 1.7}})
    (tmp_path / "tune" / "la").mkdir(parents=True)
    (tmp_path / "tune" / "la" / "best.yaml").write_text(yaml.safe_dump(best))
    loaded = load_suite(suite_file)
    assert [m.name for m in loaded.methods] == ["ce", "la", "la_tuned"]  # CE has nothing to tune
    cfg = loaded.run_config(loaded.method("la_tuned"), 1)
    assert cfg.loss.params == {"tau": 1.7} and cfg.train.seed == 1 and cfg.name == "la_tuned"
    from gradtail.report.page import method_notes

    assert any(n.startswith("la_tuned: tau=1.7, chosen by gradtail tune") for n in method_notes(loaded))
    suite["tuned"] = "yes"
    suite_file.write_text(yaml.safe_dump(suite))
    with pytest.raises(ConfigError, match="tuned must be true or false"):
        load_suite(suite_file)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="trials"):
        TuneSettings(trials=0)
    with pytest.raises(ConfigError, match="pruner"):
        TuneSettings(pruner="hyperband")
