"""The model interface: ``features(x) -> h`` and ``classifier(h) -> z`` kept separate."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from gradtail.models.heads import create_head


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
