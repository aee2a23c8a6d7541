"""Segmentation models: torchvision's FCN / DeepLabV3 / LR-ASPP, and a small net for CPU benchmarks.

Each is a :class:`SegmentationModel`: ``features(x)`` is the dense feature map before the last 1x1
convolution (stride s of the input), ``classifier`` is that convolution, and ``forward(x,
return_features=True)`` returns (features, logits) with the logits bilinearly upsampled to the input's
size, (n, C, H, W): what the dense-prediction task (:mod:`gradtail.tasks`) trains and evaluates.

torchvision models are built with ``weights=None, weights_backbone=None`` (nothing is downloaded);
``model.params.checkpoint`` loads a local state dict (e.g. a torchvision ``.pth`` file) whose keys match
the torchvision model (the last classifier layer is skipped when its class count differs; the auxiliary
head's keys are dropped). The auxiliary FCN head is not built.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradtail.errors import ConfigError
from gradtail.models.base import LongTailClassifier
from gradtail.models.registry import register_model

TORCHVISION_SEGMENTATION = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)


class PixelClassifier(nn.Conv2d):
    """The last 1x1 convolution of a segmentation head: per-pixel linear logits (kind ``"linear"``)."""

    kind = "linear"
    scale = 1.0

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes, kernel_size=1)


class SegmentationModel(LongTailClassifier):
    """A dense-prediction network: ``backbone`` maps images to a feature map, ``classifier`` (1x1 conv)
    to per-pixel logits, upsampled to the input size by :meth:`forward`.

    Example:
        >>> import torch
        >>> from gradtail.models import create_model
        >>> net = create_model("seg_small", num_classes=5, in_channels=1, width=4)
        >>> h, z = net(torch.zeros(2, 1, 32, 32), return_features=True)
        >>> tuple(z.shape)
        (2, 5, 32, 32)
    """

    dense = True

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        z = self.classifier(h)
        if z.shape[-2:] != x.shape[-2:]:
            z = F.interpolate(z, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (h, z) if return_features else z

    def reset_classifier(self, head: str | None = None, head_scale: float | None = None) -> None:
        if head not in (None, "linear"):
            raise ConfigError(f"segmentation models have a linear per-pixel classifier, not {head!r}")
        device = self.classifier.weight.device
        self.classifier = PixelClassifier(self.feature_dim, self.num_classes).to(device)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()


def _check_head(name: str, head: str) -> None:
    if head != "linear":
        raise ConfigError(f"model {name!r} has a linear per-pixel classifier; model.head must be 'linear'")


class _TorchvisionFeatures(nn.Module):
    """torchvision's backbone followed by its head without the last convolution."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return self.head(out["out"])


class _LRASPPFeatures(nn.Module):
    """LR-ASPP's backbone and head: its two branches (low- and high-level) add up to the logits, so the
    whole head is the 'feature' and the classifier is a 1x1 convolution initialised to the identity."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TorchvisionSegmentation(SegmentationModel):
    """A torchvision segmentation model (``weights=None``) as a :class:`SegmentationModel`.

    Args:
        arch: ``fcn_resnet50``, ``deeplabv3_resnet50``, ``deeplabv3_mobilenet_v3_large``,
            ``lraspp_mobilenet_v3_large`` (and the ResNet-101 variants).
        num_classes: C.
        in_channels: 3 (RGB stems).
        checkpoint: optional local state dict of the torchvision model (keys as torchvision names them).
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_channels: int = 3,
        head: str = "linear",
        head_scale: float = 16.0,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        _check_head(arch, head)
        if in_channels != 3:
            raise ConfigError(f"model {arch!r} takes RGB images (in_channels=3), got {in_channels}")
        from torchvision.models import segmentation as tvseg

        net = getattr(tvseg, arch)(
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=None
        )
        if checkpoint is not None:
            _load_checkpoint(net, Path(checkpoint), arch)
        self.arch = arch
        self.num_classes = int(num_classes)
        if arch.startswith("lraspp"):
            self.backbone = _LRASPPFeatures(net.backbone, net.classifier)
            self.feature_dim = num_classes
            self.classifier = PixelClassifier(num_classes, num_classes)
            with torch.no_grad():
                self.classifier.weight.copy_(torch.eye(num_classes).view(num_classes, num_classes, 1, 1))
                self.classifier.bias.zero_()
        else:
            head_layers = list(net.classifier.children())
            last = head_layers[-1]
            assert isinstance(last, nn.Conv2d)
            self.backbone = _TorchvisionFeatures(net.backbone, nn.Sequential(*head_layers[:-1]))
            self.feature_dim = last.in_channels
            self.classifier = PixelClassifier(last.in_channels, num_classes)
            self.classifier.load_state_dict(last.state_dict())

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}"


def _load_checkpoint(net: nn.Module, path: Path, arch: str) -> None:
    from gradtail.models.timm_backbones import read_state_dict_file  # the one state-dict file reader

    state = read_state_dict_file(path.expanduser())
    own = net.state_dict()
    kept = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not kept:
        raise ConfigError(f"model.params.checkpoint: no key of {path} matches torchvision's {arch!r}")
    net.load_state_dict(kept, strict=False)


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1, norm: bool = True) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=not norm)
    return nn.Sequential(conv, nn.BatchNorm2d(cout) if norm else nn.Identity(), nn.ReLU(inplace=True))


class _SmallEncoderDecoder(nn.Module):
    """Three stages (strides 1, 2, 4; the last dilated) and a two-step decoder with skip connections back
    to stride 1: a feature map of ``width`` channels at the input resolution."""

    def __init__(self, in_channels: int, width: int, norm: bool = True) -> None:
        super().__init__()
        w, n = width, norm
        self.enc1 = nn.Sequential(_conv(in_channels, w, norm=n), _conv(w, w, norm=n))
        self.enc2 = nn.Sequential(_conv(w, 2 * w, stride=2, norm=n), _conv(2 * w, 2 * w, norm=n))
        self.enc3 = nn.Sequential(
            _conv(2 * w, 4 * w, stride=2, norm=n), _conv(4 * w, 4 * w, dilation=2, norm=n)
        )
        self.dec2 = _conv(6 * w, 2 * w, norm=n)
        self.dec1 = _conv(3 * w, w, norm=n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        up = F.interpolate(e3, size=e2.shape[-2:], mode="bilinear", align_corners=False)
        d2 = self.dec2(torch.cat([up, e2], 1))
        up = F.interpolate(d2, size=e1.shape[-2:], mode="bilinear", align_corners=False)
        return self.dec1(torch.cat([up, e1], 1))


class SmallSegmenter(SegmentationModel):
    """``seg_small``: a small encoder-decoder that trains on 2 CPU cores (the Fashion-MNIST canvas
    benchmark, docs/segmentation.md); real data should use a torchvision model. ``width``: channels at
    stride 1 (2x, 4x deeper); ``norm``: ``"batch"`` or ``"none"`` (no batch statistics: exact
    multi-process equivalence tests)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        head: str = "linear",
        head_scale: float = 16.0,
        width: int = 16,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        _check_head("seg_small", head)
        if int(width) < 1:
            raise ConfigError(f"model.params.width must be >= 1, got {width}")
        if norm not in ("batch", "none"):
            raise ConfigError(f"model.params.norm must be 'batch' or 'none', got {norm!r}")
        self.num_classes = int(num_classes)
        self.backbone = _SmallEncoderDecoder(in_channels, int(width), norm == "batch")
        self.feature_dim = int(width)
        self.classifier = PixelClassifier(self.feature_dim, num_classes)


def _register_torchvision(arch: str) -> None:
    def build(
        num_classes: int,
        in_channels: int = 3,
        head: str = "linear",
        head_scale: float = 16.0,
        checkpoint: str | None = None,
    ) -> TorchvisionSegmentation:
        return TorchvisionSegmentation(arch, num_classes, in_channels, head, head_scale, checkpoint)

    build.__doc__ = f"torchvision's {arch} (weights=None) as a segmentation model."
    register_model(arch)(build)


for _arch in TORCHVISION_SEGMENTATION:
    _register_torchvision(_arch)
register_model("seg_small")(SmallSegmenter)

#: The registered dense-prediction models (the segmentation task's).
SEGMENTATION_MODELS = (*TORCHVISION_SEGMENTATION, "seg_small")
