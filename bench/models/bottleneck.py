"""R3 and R4: bottleneck ResNet and ResNet-B for CIFAR-10 (seed 004).

Both use the same block; only where the stride of a down-sampling block sits differs:
on path A's first 1x1 conv (original bottleneck, He et al. 2015) or on its 3x3 conv
(ResNet-B, He et al. 2019 "Bag of Tricks"). Same parameters, more FLOPs for ResNet-B.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from bench.models.init import init_resnet_
from bench.models.registry import register_model

StrideOn = Literal["conv1x1", "conv3x3"]


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, expansion: int, stride: int, stride_on: StrideOn):
        super().__init__()
        cout = width * expansion
        s1, s3 = (stride, 1) if stride_on == "conv1x1" else (1, stride)
        self.path_a = nn.Sequential(
            nn.Conv2d(cin, width, 1, s1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, s3, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.path_b: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.path_b = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.path_a(x) + self.path_b(x))


class BottleneckResNet(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        stem_width: int,
        widths: tuple[int, ...],
        blocks_per_stage: int,
        expansion: int,
        stride_on: StrideOn,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        cin = stem_width
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(Bottleneck(cin, width, expansion, stride, stride_on))
                cin = width * expansion
        self.stages = nn.Sequential(*layers)
        # Global average pooling: the seed's AvgPool(8) on the 8x8 map of a 32-px input.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_resnet_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def _build(num_classes, stem_width, widths, blocks_per_stage, expansion, stride_on) -> nn.Module:
    return BottleneckResNet(
        num_classes=num_classes,
        stem_width=stem_width,
        widths=tuple(widths),
        blocks_per_stage=blocks_per_stage,
        expansion=expansion,
        stride_on=stride_on,
    )


@register_model("bottleneck_resnet")
def bottleneck_resnet(
    *,
    num_classes: int = 10,
    stem_width: int = 32,
    widths: tuple[int, ...] = (32, 64, 128),
    blocks_per_stage: int = 3,
    expansion: int = 4,
) -> nn.Module:
    return _build(num_classes, stem_width, widths, blocks_per_stage, expansion, "conv1x1")


@register_model("resnet_b")
def resnet_b(
    *,
    num_classes: int = 10,
    stem_width: int = 32,
    widths: tuple[int, ...] = (32, 64, 128),
    blocks_per_stage: int = 3,
    expansion: int = 4,
) -> nn.Module:
    return _build(num_classes, stem_width, widths, blocks_per_stage, expansion, "conv3x3")
