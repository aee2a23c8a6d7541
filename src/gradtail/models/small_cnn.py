"""A small CNN for 28x28 (Fashion-MNIST) or 32x32 inputs: the CPU-scale benchmark's model (protocol.md §3).

Four 3x3 conv + BN + ReLU layers (widths w, w, 2w, 2w by default w=32), max-pool after the 2nd and 4th,
then global average pooling to a 2w-d feature.
"""

from __future__ import annotations

from torch import nn

from gradtail.models.base import LongTailClassifier
from gradtail.models.registry import register_model


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(LongTailClassifier):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        width: int = 32,
        head: str = "linear",
        head_scale: float = 16.0,
    ) -> None:
        super().__init__()
        w = width
        self.backbone = nn.Sequential(
            *_conv_bn(in_channels, w),
            *_conv_bn(w, w),
            nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w),
            *_conv_bn(2 * w, 2 * w),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = 2 * w
        self._make_head(num_classes, head, head_scale)
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


@register_model("small_cnn")
def small_cnn(
    num_classes: int, in_channels: int = 1, width: int = 32, head: str = "linear", head_scale: float = 16.0
) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, width, head, head_scale)
