"""Elastic ``nn.Linear``: ``F.linear(x, weight[:out, :in], bias[:out])`` on views of the full parameters.

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_supernet.elastic.registry import make_elastic
    >>> lin = nn.Linear(8, 6); make_elastic(lin, ElasticLinear)
    >>> lin.active_in_features, lin.active_out_features = 4, 3
    >>> lin(torch.randn(2, 4)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch import nn

from lightning_supernet.elastic.base import ElasticMixin
from lightning_supernet.ops import ElasticOp, Port, register_op, same_forward

__all__ = ["LINEAR", "ElasticLinear"]


class ElasticLinear(ElasticMixin):
    """Mixin for ``nn.Linear`` (and subclasses that keep its ``forward``).

    Attributes:
        active_in_features: input features used, or ``None`` for all.
        active_out_features: output features used per block, or ``None`` for all.
        in_segments: when the input is a concatenation along the features, ``offset -> (size, kept)`` of each
            input that shrinks (``active_in_features`` is then the kept ranges).
        out_blocks: the output dim is this many equal blocks (3 for a fused q/k/v projection), each sliced to
            its first ``active_out_features`` rows.

    Example:
        >>> import torch.nn as nn
        >>> from lightning_supernet.elastic.registry import make_elastic
        >>> qkv = nn.Linear(4, 12); make_elastic(qkv, ElasticLinear, out_blocks=3)
        >>> qkv.active_out_features = 2
        >>> qkv.active_tensor("weight", qkv.weight).shape
        torch.Size([6, 4])
    """

    _elastic_attrs = ("active_in_features", "active_out_features", "out_blocks", "in_segments")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's name
        weight = self.active_tensor("weight", self.weight)
        bias = self.active_tensor("bias", self.bias)
        return F.linear(input, weight, bias)

    def export_(self) -> dict[str, int]:
        super().export_()
        self.out_features, self.in_features = self.weight.shape
        return {"in_features": self.in_features, "out_features": self.out_features}


#: ``nn.Linear`` and subclasses that keep its ``forward`` (e.g. ``NonDynamicallyQuantizableLinear``).
LINEAR = register_op(ElasticOp(
    "Linear", (nn.Linear,), "transform",
    {"out": Port((("weight", 0), ("bias", 0)), "active_out_features", "out_features", blocks="out_blocks"),
     "in": Port((("weight", 1),), "active_in_features", "in_features")},
    ElasticLinear, accepts=lambda m: same_forward(m, nn.Linear), channel_dim=-1,
))
