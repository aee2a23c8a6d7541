"""Image classification: the task every method was published on (docs/methods/protocol.md).

One sample per image: logits (n, C) from ``model.classifier(model.features(x))``, the registry's loss on
them, every method family (regularizers, update rules such as SAM and GBG, post-hoc adjusters, the
gradient-ratio diagnostics), top-1 / Many / Medium / Few / calibration metrics; validation balanced
accuracy selects the epoch and the trial.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from gradtail.contracts import (
    TASKS,
    EvalView,
    ExportRequest,
    LossContract,
    PredictRequest,
    RunData,
    TaskContract,
)
from gradtail.data.builder import DATASETS, build_data
from gradtail.data.synthetic import make_synthetic
from gradtail.distributed import is_distributed
from gradtail.errors import ConfigError
from gradtail.export import classification as classification_export
from gradtail.losses import create_loss
from gradtail.metrics import shot_groups
from gradtail.models import MODELS, LongTailClassifier, create_model
from gradtail.predict import classification as classification_predict
from gradtail.registry import check_call_params
from gradtail.report import classification as classification_report
from gradtail.report.table import CLASSIFICATION_KEYS, COLUMNS, format_percent, run_rows
from gradtail.rundir import load_checkpoint
from gradtail.tasks.spaces import method_search_space

# Arguments the task passes to the model / the synthetic generator itself -> where their value comes from.
MODEL_ARGS_SET_BY_TRAINER: Mapping[str, str] = {
    "num_classes": "the dataset",
    "in_channels": "the dataset",
    "head": "model.head",
    "head_scale": "model.head_scale",
}
SYNTHETIC_ARGS_SET_BY_BUILDER: Mapping[str, str] = {"train": "the split being built"}
SYNTHETIC_EXTRA_KEYS = ("test_per_class",)  # taken out by the data builder (per_class of the test split)


@TASKS.register("classification")
class ClassificationTask(TaskContract):
    """Image classification (the default task; module docstring)."""

    name: ClassVar[str] = "classification"
    selection_metric: ClassVar[str] = "balanced_accuracy"
    objectives: ClassVar[tuple[str, ...]] = ("balanced_accuracy", "top1", "few", "mix")

    @classmethod
    def catalog(cls) -> dict[str, list[str]]:
        from gradtail.models import model_name_patterns, model_names
        from gradtail.models.segmentation import SEGMENTATION_MODELS

        models = [n for n in model_names() if n not in SEGMENTATION_MODELS]
        return {
            "datasets": DATASETS.names(),
            "models": models + model_name_patterns(),
            "losses": ["every loss"],
        }

    # ------------------------------------------------------------------ configuration
    def check(self) -> None:
        """The dataset (and the synthetic generator's options) and ``model.params`` against the model."""
        cfg = self.cfg
        DATASETS.get(cfg.data.dataset)
        if cfg.data.synthetic:
            check_call_params(make_synthetic, cfg.data.synthetic, "data.synthetic", "the synthetic dataset",
                              reserved=SYNTHETIC_ARGS_SET_BY_BUILDER, extra=SYNTHETIC_EXTRA_KEYS)  # fmt: skip
        MODELS.check_params(cfg.model.name, cfg.model.params, "model.params", MODEL_ARGS_SET_BY_TRAINER)

    # ------------------------------------------------------------------ building
    def build_data(self) -> RunData:
        data: RunData = build_data(self.cfg.data)
        return data

    def build_loss(self, data: RunData) -> LossContract:
        loss = self.cfg.loss
        return create_loss(loss.name, data.num_classes, class_counts=data.class_counts, **loss.params)

    def build_model(self, data: RunData, loss: LossContract) -> torch.nn.Module:
        """The registry's model with a ``num_classes``-way head; then the head the loss needs, a decoupled
        stage 2's start (``train.init_from``), SyncBatchNorm, channels-last and compilation as configured."""
        cfg, t = self.cfg, self.cfg.train
        model: LongTailClassifier = create_model(
            cfg.model.name, data.num_classes, in_channels=data.in_channels, head=cfg.model.head,
            head_scale=cfg.model.head_scale, **cfg.model.params,
        )  # fmt: skip
        required = loss.required_head
        if required is not None and required != model.head_kind:
            raise ConfigError(
                f"loss {cfg.loss.name!r} needs a {required!r} classifier head; set model.head: {required} "
                f"(the config has {model.head_kind!r})"
            )
        if t.init_from:
            self._init_from_stage1(model, Path(t.init_from), data)
        if t.sync_batchnorm:
            if not torch.cuda.is_available() or t.device == "cpu":
                raise ConfigError("train.sync_batchnorm needs CUDA devices (SyncBatchNorm is GPU-only)")
            if is_distributed():  # same Parameter objects: the optimizer built later sees them
                model = model.convert_sync_batchnorm()  # type: ignore[assignment]
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if t.compile:
            model.backbone.compile()
        return model

    def _init_from_stage1(self, model: LongTailClassifier, path: Path, data: RunData) -> None:
        """Stage 2 of decoupled training (cRT): stage-1 weights, frozen backbone, re-initialised head."""
        state = load_checkpoint(path)
        if state.get("subset_sha256") != data.sha256:
            raise ConfigError(f"train.init_from {path} was trained on another subset (hash mismatch)")
        model.load_state_dict(state["model"])
        t = self.cfg.train
        if t.reset_classifier:
            model.reset_classifier()
        if t.freeze_backbone:
            for p in model.backbone_parameters():
                p.requires_grad_(False)

    def train_mode(self, model: torch.nn.Module) -> None:
        model.train()
        if self.cfg.train.freeze_backbone:
            model.backbone.eval()  # type: ignore[union-attr]  # a frozen backbone keeps its BN statistics

    # ------------------------------------------------------------------ evaluation
    def class_groups(self, view: EvalView) -> dict[str, list[int]]:
        """Many / Medium / Few by the run's group rule (:meth:`gradtail.metrics.GroupRule`)."""
        rule = view.group_rule()
        return shot_groups(view.data.class_counts, rule.many_threshold, rule.few_threshold)

    def search_space(self) -> list[Any]:
        return method_search_space(self.cfg)

    def objective(self, val: Mapping[str, Any], name: str, weight: float = 0.5) -> float:
        """``balanced_accuracy``, ``top1``, ``few`` (Few-shot accuracy) or ``mix`` = (1 - ``weight``)
        balanced accuracy + ``weight`` Few. A Few group that validation leaves empty is an error."""
        if name in ("balanced_accuracy", "top1"):
            return float(val[name])
        if name not in self.objectives:
            return super().objective(val, name, weight)
        few = val.get("few")
        if few is None:
            raise ConfigError(
                f"tune objective {name!r} needs Few classes in the validation split; there are none"
            )
        if name == "few":
            return float(few)
        return (1.0 - weight) * float(val["balanced_accuracy"]) + weight * float(few)

    # ------------------------------------------------------------------ presentation
    def final_rows(self, final: Mapping[str, Any], label: str) -> tuple[list[str], list[list[str]]]:
        return list(COLUMNS), run_rows(final, label, CLASSIFICATION_KEYS)

    def headline(self, final: Mapping[str, Any]) -> str:
        last = final["last_epoch"]
        return f"top-1 {format_percent(last['top1'])}, few {format_percent(last.get('few'))}"

    def report(self) -> Any:
        return classification_report

    def predict(self, state: dict[str, Any], checkpoint: Path, request: PredictRequest) -> str:
        return classification_predict.run(state, checkpoint, request)

    def export(self, state: dict[str, Any], checkpoint: Path, request: ExportRequest) -> str:
        return classification_export.run(state, checkpoint, request)


__all__ = ["ClassificationTask"]
