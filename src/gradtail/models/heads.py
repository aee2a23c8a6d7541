"""Classifier heads: linear (with bias) and cosine (normalised weights and features, scale s)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gradtail.errors import ConfigError


class LinearHead(nn.Linear):
    """z = W h + b."""

    kind = "linear"
    scale = 1.0  # declared for a uniform head interface (``reset_classifier`` keeps it); unused

    def __init__(self, in_features: int, num_classes: int, bias: bool = True) -> None:
        super().__init__(in_features, num_classes, bias=bias)


class CosineHead(nn.Module):
    """z_j = s * cos(w_j, h) (normalised classifier, as in LDAM's NormedLinear and cosine classifiers).

    With ``scale=1`` the logits are plain cosines in [-1, 1] (LDAM applies its own s in the loss).
    """

    kind = "cosine"

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ConfigError(f"cosine head scale must be > 0, got {scale}")
        self.in_features = in_features
        self.out_features = num_classes
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same range as LDAM's NormedLinear: uniform(-1, 1), renormed; direction is what matters.
        nn.init.uniform_(self.weight, -1.0, 1.0)
        with torch.no_grad():
            self.weight.renorm_(2, 0, 1e-5).mul_(1e5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(h, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


def create_head(kind: str, in_features: int, num_classes: int, scale: float = 16.0) -> nn.Module:
    if kind == "linear":
        head: nn.Module = LinearHead(in_features, num_classes)
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(head.weight, -bound, bound)
        return head
    if kind == "cosine":
        return CosineHead(in_features, num_classes, scale=scale)
    raise ConfigError(f"unknown classifier head {kind!r}; valid: cosine, linear")
