"""The ``Example:`` sections of the docstrings run, and say what they print.

Every module of the gradtail package is run through :func:`doctest.testmod` (``NORMALIZE_WHITESPACE``
and ``ELLIPSIS``); a failure names the module and shows the failing example with what it printed. The
global torch and NumPy random states are restored after each module, so examples that seed them do
not change the rest of the session. A module whose import needs a package gradtail does not depend on
(an optional extra) is skipped.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import inspect
import io
import pkgutil
from types import ModuleType

import numpy as np
import pytest
import torch

import gradtail

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
SKIPPED_MODULES = ("gradtail.__main__",)

# Public objects whose docstring must have a runnable ``Example:`` section (extend as examples are added).
DOCUMENTED = (
    "gradtail.contracts.TaskContract",
    "gradtail.contracts.UpdateRule",
    "gradtail.data.segmentation.make_canvases",
    "gradtail.losses.dense.PixelLoss",
    "gradtail.metrics.segmentation.ConfusionState",
    "gradtail.metrics.segmentation.pixel_frequency_groups",
    "gradtail.metrics.segmentation.segmentation_metrics",
    "gradtail.models.segmentation.SegmentationModel",
    "gradtail.tasks.segmentation.slide_inference",
    "gradtail.contracts.unwrap_model",
    "gradtail.data.detection.lvis.frequency_from_image_count",
    "gradtail.data.detection.lvis.read_detection_json",
    "gradtail.data.longtail.build_longtail_split",
    "gradtail.data.longtail.longtail_counts",
    "gradtail.data.own_csv.read_image_csv",
    "gradtail.data.own_data.build_own_data",
    "gradtail.data.own_data.channel_statistics",
    "gradtail.data.own_data.stratified_holdout",
    "gradtail.data.own_folders.read_image_folders",
    "gradtail.data.own_npz.read_npz",
    "gradtail.data.samplers.RepeatFactorSampler",
    "gradtail.data.samplers.create_sampler",
    "gradtail.diagnostics.GradientRatioObserver",
    "gradtail.gradstats.GradientStatistics",
    "gradtail.losses.create_loss",
    "gradtail.losses.base.LongTailLoss",
    "gradtail.losses.base.PerSampleLoss",
    "gradtail.losses.equalization.EqualizedFocalLoss",
    "gradtail.losses.equalization.EqualizedQualityFocalLoss",
    "gradtail.losses.equalization.SigmoidEQL",
    "gradtail.losses.equalization.SoftmaxEQL",
    "gradtail.losses.gala.GALALoss",
    "gradtail.losses.ldam.LDAMLoss",
    "gradtail.losses.reweighting.ClassBalancedLoss",
    "gradtail.losses.reweighting.DeferredReweighting",
    "gradtail.losses.reweighting.deferred_reweighting",
    "gradtail.losses.seesaw.SeesawLoss",
    "gradtail.losses.softmax.AdditiveLogitAdjustedCE",
    "gradtail.losses.softmax.BalancedSoftmaxLoss",
    "gradtail.losses.softmax.CrossEntropyLoss",
    "gradtail.losses.softmax.FocalLoss",
    "gradtail.losses.softmax.LogitAdjustedLoss",
    "gradtail.metrics.calibration_errors",
    "gradtail.metrics.confusion_matrix",
    "gradtail.metrics.evaluate_logits",
    "gradtail.metrics.detection.evaluate_detections",
    "gradtail.metrics.format_percent",
    "gradtail.metrics.per_class_accuracy",
    "gradtail.metrics.shot_groups",
    "gradtail.models.create_model",
    "gradtail.optim.min_norm.min_norm_weights",
    "gradtail.optim.gbg.GBGRule",
    "gradtail.optim.sam.SAM",
    "gradtail.posthoc.logit_adjust.PosthocLogitAdjuster",
    "gradtail.posthoc.rebalance.PredictionRebalancer",
    "gradtail.posthoc.tau_norm.TauNormAdjuster",
    "gradtail.regularizers.bcl.BCLRegularizer",
    "gradtail.regularizers.bcl.BalancedContrastiveLoss",
    "gradtail.regularizers.bgp.BalancedGradientPenalty",
    "gradtail.rundir.RunDirectory",
)


def module_names() -> list[str]:
    """Every module of the package (packages included), found by walking ``gradtail.__path__``."""
    names = {"gradtail"}
    for info in pkgutil.walk_packages(gradtail.__path__, prefix="gradtail.", onerror=lambda name: None):
        if info.name not in SKIPPED_MODULES:
            names.add(info.name)
    return sorted(names)


def import_or_skip(name: str) -> ModuleType:
    """Import ``name``; skip when it needs a third-party package that is not installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing and missing != "gradtail":
            pytest.skip(f"{name} needs the optional package {missing!r}")
        raise


@pytest.mark.parametrize("name", module_names())
def test_docstring_examples_run(name: str) -> None:
    module = import_or_skip(name)
    out = io.StringIO()
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out):
            result = doctest.testmod(module, optionflags=FLAGS, report=False, verbose=False)
    finally:
        np.random.set_state(np_state)
    assert result.failed == 0, (
        f"{name}: {result.failed} of {result.attempted} docstring examples failed\n{out.getvalue()}"
    )


def resolve(path: str) -> object:
    """The object named by a dotted path: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise LookupError(path)


@pytest.mark.parametrize("path", DOCUMENTED)
def test_public_api_has_examples(path: str) -> None:
    doc = inspect.getdoc(resolve(path)) or ""
    lines = [line.strip() for line in doc.splitlines()]
    assert "Example:" in lines or "Examples:" in lines, f"{path} has no 'Example:' section in its docstring"
    assert any(line.startswith(">>> ") for line in lines), f"{path}: its Example has no '>>>' line to run"
