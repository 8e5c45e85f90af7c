"""Elastic ops: slicing views of the full weights, selected by the module's active widths.

Example:
    >>> import torch.nn as nn
    >>> mixin_for(nn.Linear(2, 2)) is ElasticLinear
    True
"""

from torch import nn

from lightning_supernet.elastic.attention import HeadSpec, find_head_spec, register_head_adapter
from lightning_supernet.elastic.conv import ElasticConv2d
from lightning_supernet.elastic.depth import SkippableBlock
from lightning_supernet.elastic.linear import ElasticLinear
from lightning_supernet.elastic.norm import ElasticBatchNorm, ElasticLayerNorm
from lightning_supernet.elastic.registry import is_elastic, make_elastic, original_class, restore

__all__ = [
    "ElasticBatchNorm", "ElasticConv2d", "ElasticLayerNorm", "ElasticLinear", "HeadSpec", "SkippableBlock",
    "find_head_spec", "is_elastic", "make_elastic", "mixin_for", "original_class", "register_head_adapter",
    "restore",
]


def mixin_for(module: nn.Module) -> type | None:
    """The elastic mixin for a sliceable module, or ``None``.

    Example:
        >>> mixin_for(nn.BatchNorm2d(3)).__name__
        'ElasticBatchNorm'
    """
    if isinstance(module, nn.Linear):
        return ElasticLinear
    if isinstance(module, nn.Conv2d):
        return ElasticConv2d
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return ElasticBatchNorm
    if isinstance(module, nn.LayerNorm):
        return ElasticLayerNorm
    return None
