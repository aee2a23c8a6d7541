"""The model interface: ``features(x) -> h`` and ``classifier(h) -> z`` kept separate."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from gradtail.models.heads import create_head


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial dimensions, (n, c, h, w) -> (n, c), keeping the input's memory layout in the
    backward pass.

    ``F.adaptive_avg_pool2d(x, 1)`` and ``x.mean((2, 3))`` hand back a contiguous (NCHW) gradient even for a
    channels-last input, so every layer below would first convert it (on the 2-core CPU benchmark the
    max-pool backward spent 0.5 ms of a 13 ms step copying it to NCHW and back). Averaging the (n, h, w, c)
    view of a channels-last tensor returns a channels-last gradient; the value is the same mean.
    """
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1).mean((1, 2))
    return x.mean((-2, -1))


class GlobalAvgPool(nn.Module):
    """:func:`global_avg_pool` as a module, (n, c, h, w) -> (n, c)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_avg_pool(x)


class LongTailClassifier(nn.Module):
    """A backbone producing a feature vector, and a classifier head on it.

    Subclasses build ``self.backbone`` (any module mapping images to (n, feature_dim)) and call
    :meth:`_make_head`. Methods that need features (BGP, GBG, BCL, cRT) use :meth:`features` and
    :attr:`classifier`; :meth:`backbone_parameters` are the shared parameters (head excluded).
    """

    feature_dim: int
    backbone: nn.Module
    classifier: nn.Module

    def _make_head(self, num_classes: int, head: str, head_scale: float) -> None:
        self.num_classes = num_classes
        self.classifier = create_head(head, self.feature_dim, num_classes, scale=head_scale)

    @property
    def head_kind(self) -> str:
        """``"linear"`` or ``"cosine"``: the kind of the classifier head (losses may require one)."""
        return str(self.classifier.kind)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        z = self.classifier(h)
        return (h, z) if return_features else z

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def convert_sync_batchnorm(self) -> nn.Module:
        """This model with its BatchNorm layers synchronised across processes (``train.sync_batchnorm``),
        keeping the same Parameter objects: PyTorch's converter; a model whose BatchNorm layers do more
        than normalise (timm's BatchNormAct2d also applies an activation) overrides it."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(self)

    def reset_classifier(self, head: str | None = None, head_scale: float | None = None) -> None:
        """Re-initialise the head (cRT); optionally switch its kind or scale."""
        kind = head or self.head_kind
        scale = head_scale if head_scale is not None else float(self.classifier.scale)
        device = next(self.classifier.parameters()).device
        self.classifier = create_head(kind, self.feature_dim, self.num_classes, scale=scale).to(device)
