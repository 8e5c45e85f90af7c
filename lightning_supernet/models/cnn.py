"""A small ResNet with BatchNorm and bottleneck residual blocks.

Example:
    >>> import torch
    >>> ResNetLike(in_chans=1, widths=(16, 32), depths=(2, 2))(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bottleneck", "ResNetLike"]


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand, each with BatchNorm, plus an identity or projection shortcut.

    Example:
        >>> import torch
        >>> Bottleneck(16, 32, stride=2)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, expansion: int = 4) -> None:
        super().__init__()
        mid = out_ch // expansion
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNetLike(nn.Module):
    """Stem conv, stages of bottlenecks (the first of a stage may downsample), global pool, linear head.

    Args:
        in_chans: input channels. widths: output channels per stage. depths: blocks per stage.
        num_classes: output classes.

    Example:
        >>> len(ResNetLike(widths=(16,), depths=(3,)).layers[0])
        3
    """

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (32, 64), depths: tuple[int, ...] = (2, 2),
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, ch = [], widths[0]
        for i, (w, d) in enumerate(zip(widths, depths, strict=True)):
            blocks = [Bottleneck(ch, w, stride=1 if i == 0 else 2)] + [Bottleneck(w, w) for _ in range(d - 1)]
            stages.append(nn.Sequential(*blocks))
            ch = w
        self.layers = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.layers:
            x = stage(x)
        return self.head(self.pool(x).flatten(1))
