"""Seesaw in the two-stage box head as mmdetection's LVIS configs use it (docs/instance.md §2; the spec:
``instance.md`` §2): a cosine ("normed linear") classifier with two objectness channels.

mmdetection (``configs/seesaw_loss/*lvis*``: ``cls_predictor_cfg=dict(type='NormedLinear',
tempearture=20)``, ``loss_cls=dict(type='SeesawLoss', p=0.8, q=2.0, num_classes=C)``) computes, for the
RoIs of a step, C + 2 scores: C category channels and 2 objectness channels (foreground, background):

- classifier: z = temperature * <x / (|x| + eps), W_j / (|W_j| + eps)> + b_j (:class:`NormedLinear`;
  temperature 20, eps 1e-6, W ~ N(0, 0.01), b = 0), C + 2 outputs;
- loss = [sum over foreground RoIs of the seesaw-weighted softmax CE over the C category channels
  + sum over every RoI of the 2-way CE of the objectness channels (label: foreground 0, background 1)]
  / the number of sampled RoIs (mmdetection's ``avg_factor``: both terms are divided by all RoIs);
- the seesaw factors' counts N are the cumulative *foreground* labels (mmdetection counts the background
  label too but only reads the first C entries): :class:`gradtail.losses.seesaw.SeesawLoss` on the C
  category channels of the foreground RoIs (its ``cum_samples``: float64, synchronised, checkpointed);
- test score of category j = softmax(categories)_j x softmax(objectness)_foreground.

:class:`SeesawObjectnessPredictor` replaces torchvision's ``FastRCNNPredictor`` (the box regression stays
torchvision's class-specific ``Linear`` over C + 1 classes); :class:`SeesawObjectnessTerm` is the
:class:`~gradtail.models.detection.heads.TwoStageTerm` of this layout (its logits are already in gradtail's
order: categories, then foreground, background).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradtail.losses import create_loss
from gradtail.losses.base import LongTailLoss
from gradtail.models.detection.heads import TwoStageTerm


class NormedLinear(nn.Linear):
    """mmdetection's ``NormedLinear``: a linear layer on L2-normalised inputs and weight rows, times a
    temperature (module docstring). ``NormedLinear(in, out, temperature=20.0)``.

    Example:
        >>> import torch
        >>> layer = NormedLinear(4, 3, temperature=20.0)
        >>> z = layer(torch.randn(5, 4))
        >>> bool((z.abs() <= 20.0 + 1e-4).all())  # a scaled cosine (bias 0)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        temperature: float = 20.0,
        eps: float = 1e-6,
        bias: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.temperature = float(temperature)
        self.eps = float(eps)
        nn.init.normal_(self.weight, mean=0.0, std=0.01)
        if self.bias is not None:
            nn.init.constant_(self.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight / (self.weight.norm(dim=1, keepdim=True) + self.eps)
        x = x / (x.norm(dim=1, keepdim=True) + self.eps)
        return F.linear(x * self.temperature, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


class SeesawObjectnessPredictor(nn.Module):
    """The box predictor of the seesaw head: class logits (n, C + 2) from a :class:`NormedLinear`
    (categories, then foreground / background objectness) and torchvision's box regression (n, 4 (C + 1),
    background first, as ``FastRCNNPredictor``)."""

    def __init__(self, in_channels: int, num_classes: int, temperature: float = 20.0) -> None:
        super().__init__()
        self.cls_score = NormedLinear(in_channels, num_classes + 2, temperature=temperature)
        self.bbox_pred = nn.Linear(in_channels, (num_classes + 1) * 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 4:
            torch._assert(list(x.shape[2:]) == [1, 1], f"expected (n, C, 1, 1) inputs, got {tuple(x.shape)}")
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def seesaw_objectness_loss(
    loss: LongTailLoss, logits: torch.Tensor, labels: torch.Tensor, num_classes: int, observers: Any = ()
) -> torch.Tensor:
    """The seesaw head's classification loss (module docstring): ``logits`` (n, C + 2) in the order
    categories, foreground, background; ``labels`` (n,) 0..C-1, C = background; ``loss`` the registered
    ``seesaw`` over C classes. ``observers`` see the foreground RoIs' category logits and labels."""
    c = num_classes
    n = logits.shape[0]
    z = logits if logits.dtype not in (torch.float16, torch.bfloat16) else logits.float()
    pos = labels < c
    fg_logits, fg_labels = z[pos, :c], labels[pos]
    for obs in observers:
        obs.observe(fg_logits, fg_labels)
    per_roi = loss.per_sample_loss(fg_logits, fg_labels)  # type: ignore[attr-defined]  # updates N
    objectness = F.cross_entropy(z[:, c:], (~pos).long(), reduction="sum")
    return (per_roi.sum() + objectness) / max(n, 1)


def seesaw_objectness_scores(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(n, C) scores softmax(categories)_j x softmax(objectness)_foreground."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    classes = F.softmax(z[:, :num_classes], dim=-1)
    foreground = F.softmax(z[:, num_classes:], dim=-1)[:, :1]
    return classes * foreground


class SeesawObjectnessTerm(TwoStageTerm):
    """The :class:`~gradtail.models.detection.heads.TwoStageTerm` of the seesaw head (module docstring):
    ``forward(logits, tv_labels)`` with the predictor's (n, C + 2) logits and torchvision's labels
    (0 = background); ``scores`` the (n, C) test scores. ``loss``: the registered ``seesaw`` over C
    classes (its ``p``, ``q``, ``eps`` from ``loss_params``)."""

    def __init__(
        self,
        num_classes: int,
        loss_params: dict[str, Any] | None = None,
        loss: LongTailLoss | None = None,
    ) -> None:
        built = loss if loss is not None else create_loss("seesaw", num_classes, **dict(loss_params or {}))
        super().__init__("seesaw", num_classes, loss=built)

    def forward(self, logits: torch.Tensor, tv_labels: torch.Tensor) -> torch.Tensor:
        c = self.num_classes
        labels = torch.where(tv_labels > 0, tv_labels - 1, torch.full_like(tv_labels, c))
        return seesaw_objectness_loss(self.loss, logits, labels, c, self.observers)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return seesaw_objectness_scores(logits, self.num_classes)


__all__ = [
    "NormedLinear",
    "SeesawObjectnessPredictor",
    "SeesawObjectnessTerm",
    "seesaw_objectness_loss",
    "seesaw_objectness_scores",
]
