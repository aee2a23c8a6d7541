"""Any gradtail loss applied per pixel: dense logits (N, C, H, W), label maps (N, H, W), an ignore label.

:class:`PixelLoss` flattens the non-ignored pixels into samples and calls the wrapped classification loss
on them (docs/methods/eql.md §9: "the flattened non-ignored pixels are the samples"). So every loss of
the registry works per pixel with the same meaning it has per image: ``ce``, ``focal``, ``seesaw``,
``softmax_eql`` (whose statistics then come from the non-ignored pixels only, synchronised across
processes by :mod:`gradtail.gradstats` as in classification), ``balanced_softmax`` / ``logit_adjust``
with the class counts the trainer passes (for segmentation, training pixels per class: pixel-frequency
priors).
"""

from __future__ import annotations

import torch

from gradtail.errors import InputError
from gradtail.losses.base import Accumulation, LongTailLoss


class PixelLoss(LongTailLoss):
    """``inner`` applied to the non-ignored pixels of dense logits.

    Args:
        inner: a classification loss (``forward(logits (M, C), targets (M,))``).
        ignore_index: the label of pixels left out (not in the loss, its normaliser or any statistics).

    ``forward(logits (N, C, H, W), targets (N, H, W))`` = ``inner(z[valid], y[valid])`` with z the logits
    as (N H W, C) rows (a free view for channels-last logits), y the labels flattened, valid = y !=
    ignore_index. A batch with every pixel ignored is an empty batch for the inner loss (convention E of
    :mod:`gradtail.losses.base`).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = PixelLoss(create_loss("ce", 3), ignore_index=255)
        >>> labels = torch.tensor([[[0, 255], [2, 1]]])
        >>> round(loss(torch.zeros(1, 3, 2, 2), labels).item(), 4)  # log 3 over the 3 counted pixels
        1.0986
    """

    allows_single_class = True

    def __init__(self, inner: LongTailLoss, ignore_index: int = 255) -> None:
        super().__init__(inner.num_classes)
        if 0 <= int(ignore_index) < inner.num_classes:
            raise InputError(
                f"ignore_index {ignore_index} is a class index (classes are [0, {inner.num_classes}))"
            )
        self.inner = inner
        self.ignore_index = int(ignore_index)
        self.required_head = inner.required_head  # type: ignore[misc]
        self.report_note = inner.report_note  # type: ignore[misc]
        self.stateful = inner.stateful

    def flatten(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z (M, C), y (M,)): the non-ignored pixels as samples."""
        c = self.num_classes
        if logits.dim() != 4 or logits.shape[1] != c:
            raise InputError(f"dense logits must be (N, {c}, H, W), got shape {tuple(logits.shape)}")
        expected = (logits.shape[0], *logits.shape[2:])
        if tuple(targets.shape) != expected:
            raise InputError(f"label maps must have shape {expected}, got {tuple(targets.shape)}")
        z = logits.permute(0, 2, 3, 1).reshape(-1, c)
        y = targets.reshape(-1).to(device=logits.device, dtype=torch.long)
        valid = y != self.ignore_index
        return z[valid], y[valid]

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z, y = self.flatten(logits, targets)
        return self.inner(z, y)

    def normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        """The wrapped loss's normaliser of the non-ignored pixels of label maps ``targets``."""
        if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
            raise InputError("PixelLoss.normalizer expects label maps")
        y = targets.reshape(-1)
        return self.inner.normalizer(y[y != self.ignore_index])

    def _begin_accumulation(self, acc: Accumulation, targets: torch.Tensor | None) -> None:
        """The wrapped loss accumulates over the non-ignored pixels (convention A)."""
        if targets is not None:
            y = targets.reshape(-1)
            self.inner.start_accumulation(targets=y[y != self.ignore_index])
        else:
            self.inner.start_accumulation(acc.total)

    def _end_accumulation(self, commit: bool) -> None:
        self.inner.finish_accumulation(commit)

    def train(self, mode: bool = True) -> PixelLoss:
        super().train(mode)
        return self

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)

    def inference_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The inner loss's test-time transform, per pixel (channel dimension 1)."""
        z = self.inner.inference_logits(logits.movedim(1, -1).reshape(-1, self.num_classes))
        return z.view(*logits.shape[:1], *logits.shape[2:], -1).movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"
