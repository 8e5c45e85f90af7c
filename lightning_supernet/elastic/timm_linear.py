"""Elastic ``Linear`` of timm (``timm.layers.linear.Linear``, the classifier of MobileNetV3, EfficientNet and
others): an ``nn.Linear`` subclass whose ``forward`` only adds a cast for TorchScript, so it slices exactly like
``nn.Linear``.

The type is recognised by name, so timm is not imported unless the model uses it.

Example:
    >>> import torch.nn as nn
    >>> from lightning_supernet.ops import op_for
    >>> class Linear(nn.Linear):  # a look-alike with its own forward is not timm's class: not sliced
    ...     def forward(self, x):
    ...         return super().forward(x) * 2
    >>> op_for(Linear(2, 2)) is None
    True
"""

from __future__ import annotations

from torch import nn

from lightning_supernet.elastic.linear import LINEAR, ElasticLinear
from lightning_supernet.ops import ElasticOp, class_named, register_op

__all__ = ["TIMM_LINEAR"]

_NAME = "timm.layers.linear.Linear"


def _accepts(module: nn.Module) -> bool:
    cls = class_named(module, _NAME)
    original = type(module).__dict__.get("_original_class", type(module))
    return cls is not None and original.forward is cls.forward


#: timm's ``Linear``: the ports and slicing of ``nn.Linear``.
TIMM_LINEAR = register_op(ElasticOp("timm.Linear", (_NAME,), "transform", LINEAR.ports, ElasticLinear,
                                    accepts=_accepts, channel_dim=-1))
