"""A small CNN for 28x28 (Fashion-MNIST) or 32x32 inputs: the CPU-scale benchmark's model
(docs/methods/protocol.md §3).

Four 3x3 conv + BN + ReLU layers (widths w, w, 2w, 2w by default w=32), max-pool after the 2nd and 4th,
then global average pooling to a 2w-d feature. ``norm="none"`` replaces conv + BN by conv with bias: no
batch statistics, so a multi-process step equals the single-process step exactly (DDP tests).

Where a max-pool follows, the ReLU runs after it (conv, BN, max-pool, ReLU): ReLU is monotone, so
``relu(maxpool(x)) == maxpool(relu(x))``, and the gradients are equal too (a window whose maximum is
positive sends its gradient to the same first maximal element; a window whose maximum is <= 0 sends none
either way), while the ReLU and its backward touch a 4x smaller tensor (about 0.5 ms of a 13 ms
Fashion-MNIST-LT step on 2 CPU cores). The parameter layers keep their indices, so state dicts are
unchanged. ``tests/test_models.py::test_small_cnn_relu_after_pool_equals_relu_before_pool`` checks both.
"""

from __future__ import annotations

from torch import nn

from gradtail.errors import ConfigError
from gradtail.models.base import GlobalAvgPool, LongTailClassifier
from gradtail.models.registry import register_model


def _conv_bn(cin: int, cout: int, norm: str, pool: bool = False) -> list[nn.Module]:
    """conv [+ BN] + ReLU, or with ``pool`` conv [+ BN] + max-pool + ReLU (the same function, see above)."""
    if norm == "none":  # no batch statistics: a multi-process step equals the single-process step exactly
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=True)]
    else:
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
    return [*layers, nn.MaxPool2d(2), nn.ReLU(inplace=True)] if pool else [*layers, nn.ReLU(inplace=True)]


class SmallCNN(LongTailClassifier):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        width: int = 32,
        head: str = "linear",
        head_scale: float = 16.0,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm not in ("batch", "none"):
            raise ConfigError(f"small_cnn: norm must be 'batch' or 'none', got {norm!r}")
        w = width
        self.backbone = nn.Sequential(
            *_conv_bn(in_channels, w, norm),
            *_conv_bn(w, w, norm, pool=True),
            *_conv_bn(w, 2 * w, norm),
            *_conv_bn(2 * w, 2 * w, norm, pool=True),
            GlobalAvgPool(),
        )
        self.feature_dim = 2 * w
        self._make_head(num_classes, head, head_scale)
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


@register_model("small_cnn")
def small_cnn(
    num_classes: int,
    in_channels: int = 1,
    width: int = 32,
    head: str = "linear",
    head_scale: float = 16.0,
    norm: str = "batch",
) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, width, head, head_scale, norm)
