"""Elastic ``nn.Conv2d``: dense (``groups == 1``), depthwise and grouped, on ``weight[:out, :in]`` views.

A dense convolution maps input channels to output channels (a ``transform``). A depthwise or grouped one whose
input and output channels are equal keeps channels within groups (``channelwise``): it shrinks in whole groups,
so the active channels are a multiple of the channels per group and the active group count follows.

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
import torch.nn.functional as F
from torch import nn

from lightning_supernet.elastic.base import ElasticMixin
from lightning_supernet.ops import ElasticOp, Port, register_op, same_forward

__all__ = ["CONV2D", "GROUPED_CONV2D", "ElasticConv2d", "is_depthwise", "is_grouped"]


def is_depthwise(conv: nn.Conv2d) -> bool:
    """A depthwise conv (``groups == in == out``) is channel-wise: one width for its input and output.

    Example:
        >>> is_depthwise(torch.nn.Conv2d(4, 4, 3, groups=4))
        True
    """
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def is_grouped(conv: nn.Conv2d) -> bool:
    """A grouped conv with as many output as input channels (depthwise included): channel-wise, by groups.

    Example:
        >>> is_grouped(torch.nn.Conv2d(8, 8, 3, groups=2)), is_grouped(torch.nn.Conv2d(8, 16, 3, groups=2))
        (True, False)
    """
    return conv.groups > 1 and conv.in_channels == conv.out_channels


class ElasticConv2d(ElasticMixin):
    """Mixin for ``nn.Conv2d`` (dense, depthwise or grouped with ``in == out``).

    Attributes:
        active_in_channels: input channels used (``None``: all). Unused for grouped convs.
        in_segments: when the input is a concatenation along the channels, ``offset -> (size, kept)`` of each
            input that shrinks (``active_in_channels`` is then the kept ``(start, length)`` ranges).
        active_out_channels: output channels used (``None``: all); for a grouped conv also the input channels,
            a multiple of the channels per group.

    Example:
        >>> import torch.nn as nn
        >>> from lightning_supernet.elastic.registry import make_elastic
        >>> dw = nn.Conv2d(4, 4, 3, groups=4); make_elastic(dw, ElasticConv2d)
        >>> dw.active_out_channels = 2; dw(torch.randn(1, 2, 5, 5)).shape
        torch.Size([1, 2, 3, 3])
    """

    _elastic_attrs = ("active_in_channels", "active_out_channels", "in_segments")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Conv2d's name
        weight = self.active_tensor("weight", self.weight)
        bias = self.active_tensor("bias", self.bias)
        if self.groups > 1 and self.active_out_channels is not None:
            groups = self.active_out_channels // (self.in_channels // self.groups)
            if self.padding_mode != "zeros":
                input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
                return F.conv2d(input, weight, bias, self.stride, 0, self.dilation, groups)
            return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, groups)
        return self._conv_forward(input, weight, bias)

    def export_(self) -> dict[str, int]:
        grouped = self.groups > 1
        per_group = self.in_channels // self.groups
        if grouped:
            self.active_in_channels = None
        super().export_()
        self.out_channels = self.weight.shape[0]
        if grouped:
            self.in_channels = self.out_channels
            self.groups = self.out_channels // per_group
        else:
            self.in_channels = self.weight.shape[1]
        return {"in_channels": self.in_channels, "out_channels": self.out_channels}


_OUT = Port((("weight", 0), ("bias", 0)), "active_out_channels", "out_channels")

#: dense convolutions: a width on the output channels and one on the input channels.
CONV2D = register_op(ElasticOp(
    "Conv2d", (nn.Conv2d,), "transform",
    {"out": _OUT, "in": Port((("weight", 1),), "active_in_channels", "in_channels")},
    ElasticConv2d, accepts=lambda m: same_forward(m, nn.Conv2d) and m.groups == 1, channel_dim=1,
))

#: depthwise and grouped convolutions with ``in == out``: channel-wise, shrinking in whole groups.
GROUPED_CONV2D = register_op(ElasticOp(
    "GroupedConv2d", (nn.Conv2d,), "channelwise",
    {"ch": Port(_OUT.tensors, _OUT.active, _OUT.size, multiple=lambda m: m.in_channels // m.groups)},
    ElasticConv2d, accepts=lambda m: same_forward(m, nn.Conv2d) and is_grouped(m), channel_dim=1,
))
