"""LDAM: label-distribution-aware margin loss (Cao et al. 2019), ``ldam``.

l_i = CE(s * (z_i - m_{y_i} e_{y_i}), y_i) with m_j = m_max * n_j^(-1/4) / max_k n_k^(-1/4), so the
rarest class gets the margin m_max. The loss is defined on a normalised (cosine) classifier whose logits
are plain cosines (``CosineHead(scale=1)``): the scale s is applied here, after the margin, as in the
reference code. ``required_head = "cosine"`` tells the trainer to build that head. Combine with deferred
re-weighting for LDAM-DRW: ``create_loss("drw", C, counts, base="ldam")`` (switches on at epoch 160) or
``create_loss("ldam", C, counts, drw_epoch=160)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from gradtail.errors import ConfigError
from gradtail.losses.base import PerSampleLoss, checked_logits_targets, upcast_half, validate_class_counts
from gradtail.losses.closed_form import adjusted_log_softmax, per_sample_cross_entropy
from gradtail.losses.registry import register_loss
from gradtail.search_space import FloatRange, SearchSpace


def ldam_margins(counts: torch.Tensor, max_margin: float) -> torch.Tensor:
    """m_j = m_max * n_j^(-1/4) / max_k n_k^(-1/4)."""
    inv_quarter = counts.pow(-0.25)
    return inv_quarter * (max_margin / inv_quarter.max())


@register_loss("ldam")
class LDAMLoss(PerSampleLoss):
    """l_i = CE(s * (z_i - m_{y_i} e_{y_i}), y_i); z are cosines (head scale 1). Defaults m_max 0.5, s 30.

    ``margins`` is a constant buffer (not statistics). Conventions (empty batch, labels):
    :mod:`gradtail.losses.base` (``docs/losses.md``).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("ldam", num_classes=3, class_counts=[100, 10, 1])
        >>> cosines = torch.tensor([[0.9, -0.2, 0.1], [0.0, 0.3, 0.5]])
        >>> round(loss(cosines, torch.tensor([0, 2])).item(), 4)
        4.5001
    """

    search_space: ClassVar[SearchSpace] = {
        "max_margin": FloatRange(0.1, 1.0),
        "scale": FloatRange(5.0, 50.0, log=True),
    }

    required_head = "cosine"
    margins: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | torch.Tensor | None = None,
        max_margin: float = 0.5,
        scale: float = 30.0,
    ) -> None:
        super().__init__(num_classes)
        counts = validate_class_counts(class_counts, num_classes, "ldam")
        max_margin, scale = float(max_margin), float(scale)
        if not (math.isfinite(max_margin) and max_margin >= 0):
            raise ConfigError(f"loss 'ldam': max_margin must be >= 0, got {max_margin}")
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"loss 'ldam': scale must be > 0, got {scale}")
        self.max_margin = max_margin
        self.scale = scale
        self.register_buffer("margins", ldam_margins(counts, max_margin))

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = checked_logits_targets(logits, targets, self.num_classes)
        z = upcast_half(logits)
        y = targets.long()
        with torch.no_grad():  # t = s (z - m_y e_y): s z but at the label, where s (z_y - m_y)
            zd = z.detach()
            at_label = (zd.gather(1, y.unsqueeze(1)) - self.margins.to(z.dtype)[y].unsqueeze(1)) * self.scale
            log_p = adjusted_log_softmax(zd, scale=self.scale, label_logits=at_label, y=y)
        return per_sample_cross_entropy(z, log_p, y, self.scale)  # dl/dz = s dl/dt (losses.closed_form)

    def inference_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """s * z: the scale (not the margin) belongs to the classifier at test time."""
        return self.scale * logits

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, max_margin={self.max_margin}, scale={self.scale}"
