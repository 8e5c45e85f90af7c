"""Elastic ``BatchNormAct2d`` of timm (ResNet-D, RegNet, EfficientNet, MobileNetV3... in ``timm``): a
``BatchNorm2d`` subclass that applies its own dropout and activation after normalising.

The type is recognised by name (``timm.layers.norm_act.BatchNormAct2d``), so timm is not imported unless the model
uses it. Normalisation runs on the active channels' views (the BatchNorm op's rule), then the module's own
``drop`` and ``act`` children, which are channel-wise.

Example:
    >>> import torch.nn as nn
    >>> from lightning_supernet.ops import op_for
    >>> class BatchNormAct2d(nn.BatchNorm2d):  # a look-alike is not timm's class
    ...     pass
    >>> op_for(BatchNormAct2d(4)).name
    'BatchNorm'
"""

from __future__ import annotations

import torch

from lightning_supernet.elastic.norm import BATCHNORM, ElasticBatchNorm
from lightning_supernet.ops import ElasticOp, class_named, register_op

__all__ = ["BATCHNORM_ACT", "ElasticBatchNormAct"]

_NAME = "timm.layers.norm_act.BatchNormAct2d"


class ElasticBatchNormAct(ElasticBatchNorm):
    """Mixin for timm's ``BatchNormAct2d``: elastic BatchNorm, then the module's ``drop`` and ``act``.

    Example:
        >>> ElasticBatchNormAct._elastic_attrs
        ('active_num_features',)
    """

    _elastic_attrs = ElasticBatchNorm._elastic_attrs  # make_elastic/restore read a mixin's own attributes

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the torch name
        return self.act(self.drop(super().forward(input)))


def _accepts(module: torch.nn.Module) -> bool:
    cls = class_named(module, _NAME)
    original = type(module).__dict__.get("_original_class", type(module))
    return cls is not None and original.forward is cls.forward and hasattr(module, "act") and hasattr(module, "drop")


#: timm's ``BatchNormAct2d``: channel-wise, the same tensors as BatchNorm.
BATCHNORM_ACT = register_op(ElasticOp(
    "timm.BatchNormAct2d", (_NAME,), "channelwise", BATCHNORM.ports, ElasticBatchNormAct, accepts=_accepts,
    channel_dim=1,
))
