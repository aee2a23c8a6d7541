"""Semantic segmentation (docs/segmentation.md): dense logits (n, C, H, W) from the model's ``forward``, any
registered loss applied per pixel (:class:`gradtail.losses.dense.PixelLoss`), evaluation from a confusion
matrix summed across processes (whole-image or sliding-window inference), mIoU selects the epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gradtail.contracts import TASKS, Accepts, EvalView, ExportRequest, LossContract, PredictRequest, RunData
from gradtail.data.samplers import SAMPLERS
from gradtail.data.segmentation import SEGMENTATION_DATASETS, SegmentationOptions, segmentation_settings
from gradtail.errors import ConfigError
from gradtail.export import segmentation as segmentation_export
from gradtail.losses.base import LongTailLoss
from gradtail.losses.dense import PixelLoss
from gradtail.metrics.segmentation import (
    ConfusionState,
    SegmentationResult,
    pixel_frequency_groups,
    segmentation_metrics,
)
from gradtail.models import MODELS
from gradtail.predict import segmentation as segmentation_predict
from gradtail.report import segmentation as segmentation_report
from gradtail.report.table import SEGMENTATION_COLUMNS, SEGMENTATION_KEYS, format_percent, run_rows
from gradtail.tasks.classification import MODEL_ARGS_SET_BY_TRAINER, ClassificationTask


def _pair(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return int(value), int(value)
    return int(value[0]), int(value[1])


@torch.no_grad()
def slide_inference(
    model: nn.Module, x: torch.Tensor, num_classes: int, window: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """Logits (n, C, H, W) averaged over overlapping ``window`` crops taken every ``stride`` pixels (the
    last window of a row / column aligned to the border; images smaller than the window are one crop).

    Example:
        >>> import torch
        >>> from gradtail.models import create_model
        >>> net = create_model("seg_small", num_classes=3, in_channels=1, width=2).eval()
        >>> x = torch.randn(1, 1, 20, 20)
        >>> tuple(slide_inference(net, x, 3, (12, 12), (8, 8)).shape)
        (1, 3, 20, 20)
    """
    n, _, h, w = x.shape
    wh, ww = min(window[0], h), min(window[1], w)
    sh, sw = stride
    rows = list(range(0, max(h - wh, 0) + 1, sh))
    cols = list(range(0, max(w - ww, 0) + 1, sw))
    if rows[-1] + wh < h:
        rows.append(h - wh)
    if cols[-1] + ww < w:
        cols.append(w - ww)
    out = torch.zeros(n, num_classes, h, w, dtype=torch.float32, device=x.device)
    hits = torch.zeros(1, 1, h, w, dtype=torch.float32, device=x.device)
    for top in rows:
        for left in cols:
            z = model(x[:, :, top : top + wh, left : left + ww])
            out[:, :, top : top + wh, left : left + ww] += z.float()
            hits[:, :, top : top + wh, left : left + ww] += 1
    return out / hits


@TASKS.register("segmentation")
class SegmentationTask(ClassificationTask):
    """Semantic segmentation (module docstring). Its section (``segmentation:``) is
    :class:`~gradtail.data.segmentation.SegmentationOptions`: the ignore label, the joint training
    transform, the frequency-group thresholds, whole / sliding-window inference and the canvas settings."""

    name: ClassVar[str] = "segmentation"
    options: ClassVar[type | None] = SegmentationOptions
    defaults: ClassVar[Mapping[str, Any]] = {"data": {"dataset": "fashion_mnist_seg"}}
    data_keys: ClassVar[frozenset[str] | None] = frozenset(
        {"dataset", "data_dir", "download", "imbalance_factor", "profile", "subset_seed", "sampler",
         "sampler_params", "augment", "class_list", "channels", "memory_budget_mb", "num_workers"}
    )  # fmt: skip
    selection_metric: ClassVar[str] = "miou"
    objectives: ClassVar[tuple[str, ...]] = ("miou", "macc", "miou_rare")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        s = segmentation_settings(cfg.options if cfg is not None else None)
        self.settings = s
        self.ignore_index = int(s["ignore_index"])
        self.frequent_threshold = float(s["frequent_threshold"])
        self.rare_threshold = float(s["rare_threshold"])
        self.inference = str(s["inference"])
        self.window = _pair(s["window"]) or _pair(s["crop"])
        stride = _pair(s["stride"])
        if stride is None and self.window is not None:
            stride = (max(1, self.window[0] * 2 // 3), max(1, self.window[1] * 2 // 3))
        self.stride = stride

    @classmethod
    def catalog(cls) -> dict[str, list[str]]:
        from gradtail.models.segmentation import SEGMENTATION_MODELS

        return {
            "datasets": SEGMENTATION_DATASETS.names(),
            "models": list(SEGMENTATION_MODELS),
            "losses": ["every loss, per pixel"],
        }

    # ------------------------------------------------------------------ configuration
    def accepts(self) -> Accepts:
        """Every loss (per pixel) and sampler (on each image's rarest class); no regularizer, update rule
        or post-hoc adjuster that works on image-level features or logits."""
        return Accepts(regularizers=(), update_rules=("plain",), posthoc=(), samplers=tuple(SAMPLERS.names()))

    def check(self) -> None:
        SEGMENTATION_DATASETS.get(self.cfg.data.dataset)
        MODELS.check_params(
            self.cfg.model.name, self.cfg.model.params, "model.params", MODEL_ARGS_SET_BY_TRAINER
        )
        t = self.cfg.train
        for key, value in (("init_from", t.init_from), ("freeze_backbone", t.freeze_backbone)):
            if value:
                raise ConfigError(f"train.{key} (decoupled stage 2) is not supported by task 'segmentation'")
        if self.cfg.data.augment.views:
            raise ConfigError(
                "data.augment.views (contrastive views) is not supported by task 'segmentation'"
            )

    # ------------------------------------------------------------------ building
    def build_data(self) -> RunData:
        build = SEGMENTATION_DATASETS.get(self.cfg.data.dataset)
        data: RunData = build(self.cfg.data, self.cfg.options)
        return data

    def build_loss(self, data: RunData) -> LossContract:
        """The registry's loss applied to the non-ignored pixels (:class:`PixelLoss`)."""
        loss = super().build_loss(data)
        assert isinstance(loss, LongTailLoss)
        return PixelLoss(loss, self.ignore_index)

    # ------------------------------------------------------------------ the step
    def forward(
        self, model: nn.Module, inputs: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, dense logits (n, C, H, W)) through the model's forward (the DDP wrapper's too)."""
        h, z = model(inputs, return_features=True)
        return h, z[:batch]

    # ------------------------------------------------------------------ evaluation
    def logits(self, model: nn.Module, x: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Test-time dense logits of a batch (whole image or sliding window)."""
        if self.inference == "slide":
            assert self.window is not None and self.stride is not None
            return slide_inference(model, x, num_classes, self.window, self.stride)
        out: torch.Tensor = model(x)
        return out

    @torch.no_grad()
    def evaluate(self, view: EvalView, split: str) -> SegmentationResult:
        """The split's confusion matrix (this process's share, then summed across processes) and the
        metrics of :func:`gradtail.metrics.segmentation_metrics`."""
        model = view.model
        model.eval()
        c = view.data.num_classes
        state = ConfusionState(c, self.ignore_index, view.device)
        for x, y in view.data.eval_loader(split, view.cfg, view.device):
            with view.autocast():
                z = self.logits(model, x, c)
            z = view.loss_fn.inference_logits(z.float())  # type: ignore[operator]
            if z.shape[-2:] != y.shape[-2:]:  # scored at the label map's own size
                z = F.interpolate(z, size=y.shape[-2:], mode="bilinear", align_corners=False)
            state.update(z.argmax(1), y)
        state.all_reduce()
        return segmentation_metrics(
            state.matrix, view.data.class_counts, self.frequent_threshold, self.rare_threshold
        )

    def groups(self, view: EvalView) -> dict[str, Any]:
        groups = pixel_frequency_groups(view.data.class_counts, self.frequent_threshold, self.rare_threshold)
        return {
            "rule": "pixel_frequency",
            "thresholds": {"frequent": self.frequent_threshold, "rare": self.rare_threshold},
            "sizes": {k: len(v) for k, v in groups.items()},
            "classes": groups,
        }

    def class_groups(self, view: EvalView) -> dict[str, list[int]]:
        """Frequent / common / rare by share of the training pixels."""
        groups = pixel_frequency_groups(view.data.class_counts, self.frequent_threshold, self.rare_threshold)
        return {str(name): [int(c) for c in members] for name, members in groups.items()}

    def draw_predictions(self, view: EvalView, path: Any) -> bool:
        """A few test images: input, ground truth and prediction (:mod:`gradtail.report.segmentation`)."""
        model = view.model
        model.eval()
        c = view.data.num_classes
        for x, y in view.data.eval_loader("test", view.cfg, view.device):
            with torch.no_grad(), view.autocast():
                z = self.logits(model, x[: segmentation_report.SAMPLE_IMAGES], c)
            pred = view.loss_fn.inference_logits(z.float()).argmax(1)  # type: ignore[operator]
            images = view.data.denormalize(x[: segmentation_report.SAMPLE_IMAGES])
            segmentation_report.draw_samples(images, y[: len(pred)], pred, c, self.ignore_index, path)
            return True
        return False

    def objective(self, val: Mapping[str, Any], name: str, weight: float = 0.5) -> float:
        if name not in self.objectives:
            return super(ClassificationTask, self).objective(val, name, weight)
        value = val.get(name)
        if value is None:
            raise ConfigError(f"tune objective {name!r}: the validation split has no such group")
        return float(value)

    # ------------------------------------------------------------------ presentation
    def final_rows(self, final: Mapping[str, Any], label: str) -> tuple[list[str], list[list[str]]]:
        return list(SEGMENTATION_COLUMNS), run_rows(final, label, SEGMENTATION_KEYS)

    def headline(self, final: Mapping[str, Any]) -> str:
        last = final["last_epoch"]
        return f"mIoU {format_percent(last['miou'])}, rare {format_percent(last.get('miou_rare'))}"

    def report(self) -> Any:
        return segmentation_report

    def predict(self, state: dict[str, Any], checkpoint: Path, request: PredictRequest) -> str:
        return segmentation_predict.run(self, state, checkpoint, request)

    def export(self, state: dict[str, Any], checkpoint: Path, request: ExportRequest) -> str:
        return segmentation_export.run(self, state, checkpoint, request)


__all__ = ["SegmentationTask", "slide_inference"]
