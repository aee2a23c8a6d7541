"""Models: a registry and ``create_model(name, num_classes, **kw)``; every model has ``features`` and
``classifier``."""

from __future__ import annotations

from typing import Any

from gradtail.models import (  # noqa: F401
    resnet_cifar,
    segmentation,
    small_cnn,
    timm_backbones,
    torchvision_backbones,
)
from gradtail.models.base import LongTailClassifier
from gradtail.models.heads import CosineHead, LinearHead, create_head
from gradtail.models.registry import MODELS, register_model


def create_model(name: str, num_classes: int, **kwargs: Any) -> LongTailClassifier:
    """Build the registered model ``name`` (see :func:`model_names`) with a ``num_classes``-way head.

    ``kwargs`` go to the model: e.g. ``in_channels``, ``head`` (``"linear"`` or ``"cosine"``),
    ``head_scale``, and the model's own settings (``width`` for ``small_cnn``). ``timm:<name>`` builds any
    timm model (the optional ``timm`` extra; :mod:`gradtail.models.timm_backbones`).

    Example:
        >>> import torch
        >>> from gradtail.models import create_model
        >>> _ = torch.manual_seed(0)
        >>> model = create_model("small_cnn", num_classes=10, width=8)
        >>> h = model.features(torch.randn(2, 1, 28, 28))
        >>> tuple(h.shape), tuple(model.classifier(h).shape), model.classifier.kind
        ((2, 16), (2, 10), 'linear')
        >>> resnet = create_model("resnet32", num_classes=100, in_channels=3, head="cosine", head_scale=30.0)
        >>> resnet.feature_dim, tuple(resnet(torch.randn(2, 3, 32, 32)).shape), resnet.classifier.kind
        (64, (2, 100), 'cosine')
    """
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


def model_names() -> list[str]:
    """The registered model names (``timm:<name>`` is accepted too: :func:`model_name_patterns`)."""
    return MODELS.names()


def model_name_patterns() -> list[str]:
    """Model names accepted without being listed, one line each (``timm:<name>``)."""
    return MODELS.prefix_descriptions()


__all__ = [
    "MODELS",
    "CosineHead",
    "LinearHead",
    "LongTailClassifier",
    "create_head",
    "create_model",
    "model_name_patterns",
    "model_names",
    "register_model",
]
