"""R1: the HW4 residual network for CIFAR-100 (seed 001 and the author's code).

Quirks of the reported model are named switches: `post_add_relu=False` (the author's block has
no ReLU after the residual addition), `shortcut_kernel=3` (3x3 projection shortcut, seed 001
"Channel downsampling") and `stem_dropout=0.02`.
"""

from __future__ import annotations

from torch import Tensor, nn

from bench.models.init import init_resnet_
from bench.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, post_add_relu: bool, shortcut_kernel: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            pad = shortcut_kernel // 2
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, shortcut_kernel, stride, pad, bias=False), nn.BatchNorm2d(cout)
            )
        self.post_add_relu = post_add_relu

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out = out + self.shortcut(x)
        return self.relu(out) if self.post_add_relu else out


class HW4ResNet(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        stem_width: int,
        stem_dropout: float,
        post_add_relu: bool,
        shortcut_kernel: int,
        pool_kernel: int,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=stem_dropout),
        )
        layers: list[nn.Module] = []
        cin = stem_width
        for i, (n, width) in enumerate(zip(blocks, widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, width, stride, post_add_relu, shortcut_kernel))
                cin = width
        self.stages = nn.Sequential(*layers)
        # The author's head: MaxPool2d(kernel=4, stride=1) on the 4x4 map of a 32-px input.
        self.pool = nn.MaxPool2d(kernel_size=pool_kernel, stride=1)
        self.fc = nn.Linear(cin, num_classes)
        init_resnet_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(x.flatten(1))


@register_model("hw4_resnet")
def hw4_resnet(
    *,
    num_classes: int = 100,
    blocks: tuple[int, ...] = (2, 4, 4, 2),
    widths: tuple[int, ...] = (32, 64, 128, 256),
    stem_width: int = 32,
    stem_dropout: float = 0.02,
    post_add_relu: bool = False,
    shortcut_kernel: int = 3,
    pool_kernel: int = 4,
) -> nn.Module:
    return HW4ResNet(
        num_classes=num_classes,
        blocks=tuple(blocks),
        widths=tuple(widths),
        stem_width=stem_width,
        stem_dropout=stem_dropout,
        post_add_relu=post_add_relu,
        shortcut_kernel=shortcut_kernel,
        pool_kernel=pool_kernel,
    )
