"""ResNet-32 for CIFAR exactly as docs/methods/protocol.md §3 (the LDAM recipe's backbone).

3 stages x 5 basic blocks, widths 16/32/64, option-A shortcuts (stride-2 subsampling + zero-padding of
the new channels, no parameters), Kaiming-normal init of conv and linear weights, global average
pooling to a 64-d feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradtail.models.base import LongTailClassifier, global_avg_pool
from gradtail.models.registry import register_model


class _ShortcutA(nn.Module):
    """Option A: subsample spatially by 2 and zero-pad channels (He et al. 2016, CIFAR ResNets)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA((planes - in_planes) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetBackbone(nn.Module):
    def __init__(self, blocks_per_stage: int, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.out_dim = in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return global_avg_pool(out)


class CifarResNet(LongTailClassifier):
    def __init__(
        self,
        num_classes: int,
        depth: int = 32,
        in_channels: int = 3,
        head: str = "linear",
        head_scale: float = 16.0,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        self.backbone = CifarResNetBackbone((depth - 2) // 6, in_channels=in_channels)
        self.feature_dim = self.backbone.out_dim
        self._make_head(num_classes, head, head_scale)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)


@register_model("resnet32")
def resnet32(
    num_classes: int, in_channels: int = 3, head: str = "linear", head_scale: float = 16.0
) -> CifarResNet:
    return CifarResNet(num_classes, 32, in_channels, head, head_scale)


@register_model("resnet20")
def resnet20(
    num_classes: int, in_channels: int = 3, head: str = "linear", head_scale: float = 16.0
) -> CifarResNet:
    return CifarResNet(num_classes, 20, in_channels, head, head_scale)
