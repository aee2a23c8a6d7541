"""Tasks: what differs between classification and dense prediction, behind
:class:`gradtail.contracts.TaskContract` (docs/segmentation.md, "Design").

- classification: the contract's own defaults (:data:`gradtail.contracts.CLASSIFICATION`);
- :class:`SegmentationTask`: dense logits (n, C, H, W) from the model's ``forward``, any registered loss
  applied per pixel (:class:`gradtail.losses.dense.PixelLoss`), evaluation from a confusion matrix summed
  across processes (whole-image or sliding-window inference), mIoU selects the epoch.

:func:`create_task` picks the task from the run's data.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradtail.contracts import CLASSIFICATION, EvalView, LossContract, TaskContract
from gradtail.data.segmentation import SegmentationData
from gradtail.errors import ConfigError
from gradtail.losses.base import LongTailLoss
from gradtail.losses.dense import PixelLoss
from gradtail.metrics.segmentation import ConfusionState, SegmentationResult, segmentation_metrics


def _pair(value: Any, default: tuple[int, int] | None) -> tuple[int, int] | None:
    if value is None:
        return default
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


class SegmentationTask(TaskContract):
    """Semantic segmentation (docs/segmentation.md).

    Args:
        num_classes: C.
        ignore_index: label of ignored pixels (255).
        frequent_threshold, rare_threshold: the pixel-share thresholds of the frequency groups.
        inference: ``"whole"`` (the whole image at once) or ``"slide"`` (``window`` crops every
            ``stride`` pixels, logits averaged where they overlap).
    """

    name = "segmentation"
    supports_posthoc = False

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        frequent_threshold: float = 0.01,
        rare_threshold: float = 0.001,
        inference: str = "whole",
        window: tuple[int, int] | None = None,
        stride: tuple[int, int] | None = None,
    ) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.frequent_threshold = float(frequent_threshold)
        self.rare_threshold = float(rare_threshold)
        if inference == "slide" and window is None:
            raise ConfigError("data.segmentation.inference: slide needs data.segmentation.window (or crop)")
        self.inference = inference
        self.window = window
        self.stride = stride or (
            None if window is None else (max(1, window[0] * 2 // 3), max(1, window[1] * 2 // 3))
        )

    @classmethod
    def from_data(cls, data: SegmentationData) -> SegmentationTask:
        s = data.settings
        window = _pair(s["window"], _pair(s["crop"], None))
        return cls(
            data.num_classes, data.ignore_index, s["frequent_threshold"], s["rare_threshold"], s["inference"],
            window, _pair(s["stride"], None),
        )  # fmt: skip

    def forward(
        self, model: nn.Module, inputs: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, dense logits (n, C, H, W)) through the model's forward (the DDP wrapper's too)."""
        h, z = model(inputs, return_features=True)
        return h, z[:batch]

    def adapt_loss(self, loss: LossContract) -> LossContract:
        """The registry's loss applied to the non-ignored pixels (:class:`PixelLoss`)."""
        assert isinstance(loss, LongTailLoss)
        return PixelLoss(loss, self.ignore_index)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Test-time dense logits of a batch (whole image or sliding window)."""
        if self.inference == "slide":
            assert self.window is not None and self.stride is not None
            return slide_inference(model, x, self.num_classes, self.window, self.stride)
        return model(x)

    @torch.no_grad()
    def evaluate(self, view: EvalView, split: str) -> SegmentationResult:
        """The split's confusion matrix (this process's share, then summed across processes) and the
        metrics of :func:`gradtail.metrics.segmentation_metrics`."""
        model = view.model
        model.eval()
        state = ConfusionState(self.num_classes, self.ignore_index, view.device)
        for x, y in view.data.eval_loader(split, view.cfg, view.device):
            with view.autocast():
                z = self.logits(model, x)
            z = view.loss_fn.inference_logits(z.float())  # type: ignore[operator]
            if z.shape[-2:] != y.shape[-2:]:  # scored at the label map's own size
                z = F.interpolate(z, size=y.shape[-2:], mode="bilinear", align_corners=False)
            state.update(z.argmax(1), y)
        state.all_reduce()
        return segmentation_metrics(
            state.matrix, view.data.class_counts, self.frequent_threshold, self.rare_threshold
        )

    def groups(self, view: EvalView) -> dict[str, Any]:
        from gradtail.metrics.segmentation import pixel_frequency_groups

        groups = pixel_frequency_groups(view.data.class_counts, self.frequent_threshold, self.rare_threshold)
        return {
            "rule": "pixel_frequency",
            "thresholds": {"frequent": self.frequent_threshold, "rare": self.rare_threshold},
            "sizes": {k: len(v) for k, v in groups.items()},
            "classes": groups,
        }

    def check(self, cfg: Any) -> None:
        """Settings of classification that have no per-pixel meaning here are errors."""
        if cfg.eval.posthoc:
            raise ConfigError("eval.posthoc adjusters are fit on classification logits; not for segmentation")
        if cfg.regularizer.name:
            raise ConfigError(
                f"regularizer {cfg.regularizer.name!r} works on image features; not for segmentation"
            )
        if cfg.train.diagnostics:
            raise ConfigError("train.diagnostics observes classification logits; set train.diagnostics: "
                              "false"
                              " for segmentation")  # fmt: skip
        if (cfg.update_rule.name or "plain") != "plain":
            raise ConfigError(
                f"update rule {cfg.update_rule.name!r} is not supported for segmentation (plain)"
            )
        if cfg.data.augment.views:
            raise ConfigError("data.augment.views (contrastive views) is not supported for segmentation")
        if cfg.train.init_from:
            raise ConfigError("train.init_from (decoupled stage 2) is not supported for segmentation")


def create_task(data: Any) -> TaskContract:
    """The task of a run: :class:`SegmentationTask` for segmentation data, else classification."""
    if isinstance(data, SegmentationData):
        return SegmentationTask.from_data(data)
    return CLASSIFICATION


__all__ = ["SegmentationTask", "create_task", "slide_inference"]
