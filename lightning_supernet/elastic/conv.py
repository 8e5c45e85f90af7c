"""Elastic ``nn.Conv2d`` (dense and depthwise): convolution with ``weight[:out, :in]`` views.

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_supernet.elastic.registry import make_elastic
    >>> conv = nn.Conv2d(8, 6, 3, padding=1); make_elastic(conv, ElasticConv2d)
    >>> conv.active_in_channels, conv.active_out_channels = 4, 3
    >>> conv(torch.randn(1, 4, 5, 5)).shape
    torch.Size([1, 3, 5, 5])
"""

from __future__ import annotations

import torch

from lightning_supernet.elastic.base import ElasticMixin

__all__ = ["ElasticConv2d", "is_depthwise"]


def is_depthwise(conv: torch.nn.Conv2d) -> bool:
    """A depthwise conv (``groups == in == out``) is channel-wise: one width for its input and output.

    Example:
        >>> is_depthwise(torch.nn.Conv2d(4, 4, 3, groups=4))
        True
    """
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


class ElasticConv2d(ElasticMixin):
    """Mixin for ``nn.Conv2d`` with ``groups == 1`` or depthwise.

    Attributes:
        active_in_channels: input channels used (``None``: all). Unused for depthwise convs.
        active_out_channels: output channels used (``None``: all); for a depthwise conv also the groups.

    Example:
        >>> import torch.nn as nn
        >>> from lightning_supernet.elastic.registry import make_elastic
        >>> dw = nn.Conv2d(4, 4, 3, groups=4); make_elastic(dw, ElasticConv2d)
        >>> dw.active_out_channels = 2; dw(torch.randn(1, 2, 5, 5)).shape
        torch.Size([1, 2, 3, 3])
    """

    _elastic_attrs = ("active_in_channels", "active_out_channels")
    _ports = {"out": (("weight", 0), ("bias", 0)), "in": (("weight", 1),)}
    _port_attrs = {"out": "active_out_channels", "in": "active_in_channels"}

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Conv2d's name
        weight = self.active_tensor("weight", self.weight)
        bias = self.active_tensor("bias", self.bias)
        if is_depthwise(self) and self.active_out_channels is not None:
            return self._conv_forward_groups(input, weight, bias, self.active_out_channels)
        return self._conv_forward(input, weight, bias)

    def _conv_forward_groups(self, input, weight, bias, groups):  # noqa: A002
        import torch.nn.functional as F

        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(input, weight, bias, self.stride, 0, self.dilation, groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, groups)

    def export_(self) -> dict[str, int]:
        depthwise = is_depthwise(self)
        if depthwise:
            self.active_in_channels = None
        super().export_()
        self.out_channels = self.weight.shape[0]
        self.in_channels = self.out_channels if depthwise else self.weight.shape[1] * self.groups
        if depthwise:
            self.groups = self.out_channels
        return {"in_channels": self.in_channels, "out_channels": self.out_channels}
