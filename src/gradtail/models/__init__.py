"""Models: a registry and ``create_model(name, num_classes, **kw)``; every model has ``features`` and
``classifier``."""

from __future__ import annotations

from typing import Any

from gradtail.models import resnet_cifar, small_cnn, torchvision_backbones  # noqa: F401
from gradtail.models.base import LongTailClassifier
from gradtail.models.heads import CosineHead, LinearHead, create_head
from gradtail.models.registry import MODELS, register_model


def create_model(name: str, num_classes: int, **kwargs: Any) -> LongTailClassifier:
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


def model_names() -> list[str]:
    return MODELS.names()


__all__ = [
    "MODELS",
    "CosineHead",
    "LinearHead",
    "LongTailClassifier",
    "create_head",
    "create_model",
    "model_names",
    "register_model",
]
