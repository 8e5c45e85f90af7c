"""Elastic ``Conv1D`` of Hugging Face ``transformers`` (GPT-2, GPT, some CLIP-era models): a linear layer whose
weight is stored transposed, ``[in, out]``.

The type is recognised by name (``transformers.pytorch_utils.Conv1D``), so ``transformers`` is not imported
unless the model already uses it. ``forward`` is ``addmm(bias[:out], x, weight[:in, :out])`` on views.

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_supernet.ops import op_for
    >>> class Conv1D(nn.Module):  # the same layout as transformers' class
    ...     def __init__(self, nf, nx):
    ...         super().__init__(); self.nf, self.nx = nf, nx
    ...         self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))
    >>> op_for(Conv1D(4, 2)) is None  # only transformers' own class is covered
    True
"""

from __future__ import annotations

import torch

from lightning_supernet.elastic.base import ElasticMixin
from lightning_supernet.ops import ElasticOp, Port, class_named, register_op

__all__ = ["CONV1D", "ElasticConv1D"]

_NAME = "transformers.pytorch_utils.Conv1D"


class ElasticConv1D(ElasticMixin):
    """Mixin for ``transformers.pytorch_utils.Conv1D``.

    Attributes:
        active_in_features: input features used (``None``: all). active_out_features: output features per block.
        out_blocks: equal blocks of the output (3 for GPT-2's fused ``c_attn``).

    Example:
        >>> ElasticConv1D._elastic_attrs
        ('active_in_features', 'active_out_features', 'out_blocks')
    """

    _elastic_attrs = ("active_in_features", "active_out_features", "out_blocks")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.active_tensor("weight", self.weight)
        bias = self.active_tensor("bias", self.bias)
        out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
        return out.view(*x.shape[:-1], weight.shape[1])

    def export_(self) -> dict[str, int]:
        super().export_()
        self.nx, self.nf = self.weight.shape
        return {"nx": self.nx, "nf": self.nf}


def _accepts(module: torch.nn.Module) -> bool:
    cls = class_named(module, _NAME)
    original = type(module).__dict__.get("_original_class", type(module))
    return cls is not None and original.forward is cls.forward


#: GPT-2's ``Conv1D``: weight ``[in, out]``, so the output port slices dim 1 and the input port dim 0.
CONV1D = register_op(ElasticOp(
    "transformers.Conv1D", (_NAME,), "transform",
    {"out": Port((("weight", 1), ("bias", 0)), "active_out_features", "nf", blocks="out_blocks"),
     "in": Port((("weight", 0),), "active_in_features", "nx")},
    ElasticConv1D, accepts=_accepts, channel_dim=-1,
))
