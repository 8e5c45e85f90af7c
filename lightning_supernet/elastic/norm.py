"""Elastic channel-wise normalisation: ``BatchNorm{1,2}d`` and ``LayerNorm`` over the leading channels.

BatchNorm's running statistics are updated in place through views, so the first ``k`` channels' statistics are
shared by every subnet (``BNRecalibration`` re-estimates them per subnet before evaluation).

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_supernet.elastic.registry import make_elastic
    >>> bn = nn.BatchNorm2d(8); make_elastic(bn, ElasticBatchNorm)
    >>> bn.active_num_features = 3; bn(torch.randn(2, 3, 4, 4)).shape
    torch.Size([2, 3, 4, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_supernet.elastic.base import ElasticMixin

__all__ = ["ElasticBatchNorm", "ElasticLayerNorm"]

_CHANNEL = (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0))


class ElasticBatchNorm(ElasticMixin):
    """Mixin for ``nn.BatchNorm1d/2d``: normalise the first ``active_num_features`` channels.

    Example:
        >>> import torch.nn as nn
        >>> from lightning_supernet.elastic.registry import make_elastic
        >>> bn = nn.BatchNorm1d(4); make_elastic(bn, ElasticBatchNorm); bn.active_num_features = 2
        >>> bn.active_tensor("running_mean", bn.running_mean).shape
        torch.Size([2])
    """

    _elastic_attrs = ("active_num_features",)
    _ports = {"channels": _CHANNEL}
    _port_attrs = {"channels": "active_num_features"}

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the torch name
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update = self.running_mean if not self.training or self.track_running_stats else None
        return F.batch_norm(
            input,
            self.active_tensor("running_mean", update),
            self.active_tensor("running_var", self.running_var if update is not None else None),
            self.active_tensor("weight", self.weight),
            self.active_tensor("bias", self.bias),
            use_batch_stats,
            momentum,
            self.eps,
        )

    def export_(self) -> dict[str, int]:
        super().export_()
        if self.weight is not None:
            self.num_features = self.weight.shape[0]
        elif self.running_mean is not None:
            self.num_features = self.running_mean.shape[0]
        return {"num_features": self.num_features}


class ElasticLayerNorm(ElasticMixin):
    """Mixin for ``nn.LayerNorm`` over one (channel) dim that lies inside a width group.

    Example:
        >>> import torch.nn as nn
        >>> from lightning_supernet.elastic.registry import make_elastic
        >>> ln = nn.LayerNorm(6); make_elastic(ln, ElasticLayerNorm); ln.active_num_features = 4
        >>> ln(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """

    _elastic_attrs = ("active_num_features",)
    _ports = {"channels": (("weight", 0), ("bias", 0))}
    _port_attrs = {"channels": "active_num_features"}

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the torch name
        k = self.active_num_features
        shape = self.normalized_shape if k is None else (k,)
        weight = self.active_tensor("weight", self.weight)
        bias = self.active_tensor("bias", self.bias)
        return F.layer_norm(input, shape, weight, bias, self.eps)

    def export_(self) -> dict[str, int]:
        super().export_()
        if self.active_num_features is not None:
            self.normalized_shape = (self.active_num_features,)
        return {"normalized_shape": self.normalized_shape[0]}
