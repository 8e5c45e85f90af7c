"""Elastic ``FalconLinear`` of Hugging Face ``transformers`` (Falcon): an ``nn.Linear`` whose ``forward`` is
``x @ weight.T (+ bias)`` written out by hand, so it is not covered by the ``nn.Linear`` op (which accepts only
subclasses that keep torch's ``forward``). The computation is the same, so it slices like ``nn.Linear``.

The type is recognised by name, so ``transformers`` is not imported unless the model already uses it.

Example:
    >>> import torch.nn as nn
    >>> from lightning_supernet.ops import op_for
    >>> class FalconLinear(nn.Linear):  # a look-alike is not transformers' class: not covered
    ...     def forward(self, x):
    ...         return x @ self.weight.T
    >>> op_for(FalconLinear(2, 2)) is None
    True
"""

from __future__ import annotations

import torch

from lightning_supernet.elastic.linear import LINEAR, ElasticLinear
from lightning_supernet.ops import ElasticOp, class_named, register_op

__all__ = ["FALCON_LINEAR"]

_NAME = "transformers.models.falcon.modeling_falcon.FalconLinear"


def _accepts(module: torch.nn.Module) -> bool:
    cls = class_named(module, _NAME)
    original = type(module).__dict__.get("_original_class", type(module))
    return cls is not None and original.forward is cls.forward


#: Falcon's ``FalconLinear``: the ports, tensors and slicing of ``nn.Linear``.
FALCON_LINEAR = register_op(ElasticOp(
    "transformers.FalconLinear", (_NAME,), "transform", LINEAR.ports, ElasticLinear, accepts=_accepts,
    channel_dim=-1,
))
