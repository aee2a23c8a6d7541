"""torchvision ImageNet backbones (ResNet-18/50, ResNeXt-50 32x4d) as :class:`LongTailClassifier`s.

The backbone is the torchvision model with its ``fc`` replaced by an identity, so it maps
(n, 3, H, W) images to the pooled (n, feature_dim) feature; the classifier is gradtail's linear or
cosine head (the large-scale recipes of docs/methods/protocol.md §3, e.g. Softmax-EQL's ResNet-50 + cosine
head). Weights are randomly initialised (``weights=None``): gradtail never downloads checkpoints.
"""

from __future__ import annotations

from torch import nn

from gradtail.errors import ConfigError
from gradtail.models.base import LongTailClassifier
from gradtail.models.registry import register_model


class TorchvisionClassifier(LongTailClassifier):
    """A torchvision ResNet-family network with its ``fc`` swapped for a gradtail head.

    Args:
        arch: the torchvision builder's name in ``torchvision.models`` (``resnet50``, ...).
        num_classes: number of classes of the head.
        in_channels: must be 3 (the torchvision stems are RGB).
        head: ``"linear"`` or ``"cosine"``.
        head_scale: the cosine head's scale ``s``.
        zero_init_residual: zero the last BatchNorm of every residual branch (Goyal et al. 2017).
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_channels: int = 3,
        head: str = "linear",
        head_scale: float = 16.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if in_channels != 3:
            raise ConfigError(
                f"model {arch!r} takes RGB images (in_channels=3), got in_channels={in_channels}; "
                "use an RGB dataset or a model such as small_cnn"
            )
        self.arch = arch
        from torchvision import models as tv  # imported here: torchvision is slow to import

        builder = getattr(tv, arch, None)
        if builder is None:
            raise ConfigError(f"torchvision has no model {arch!r}")
        net = builder(weights=None, zero_init_residual=bool(zero_init_residual))
        fc = getattr(net, "fc", None)
        if not isinstance(fc, nn.Linear):
            raise ConfigError(f"torchvision model {arch!r} has no linear 'fc' layer to replace")
        self.feature_dim = fc.in_features
        net.fc = nn.Identity()
        self.backbone = net
        self._make_head(num_classes, head, head_scale)

    def extra_repr(self) -> str:
        return f"arch={self.arch}, feature_dim={self.feature_dim}"


def _register(arch: str, doc: str) -> None:
    def factory(
        num_classes: int,
        in_channels: int = 3,
        head: str = "linear",
        head_scale: float = 16.0,
        zero_init_residual: bool = False,
    ) -> TorchvisionClassifier:
        return TorchvisionClassifier(arch, num_classes, in_channels, head, head_scale, zero_init_residual)

    factory.__name__ = factory.__qualname__ = arch
    factory.__doc__ = doc
    register_model(arch)(factory)


_register("resnet18", "torchvision ResNet-18, 512-d feature.")
_register("resnet50", "torchvision ResNet-50, 2048-d feature.")
_register("resnext50_32x4d", "torchvision ResNeXt-50 (32 groups x 4d), 2048-d feature.")
