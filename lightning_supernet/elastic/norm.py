"""Elastic channel-wise normalisation: ``BatchNorm{1,2,3}d``, ``SyncBatchNorm`` and ``LayerNorm`` over the leading
channels.

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

from torch import nn

from lightning_supernet.elastic.base import ElasticMixin
from lightning_supernet.ops import ElasticOp, Port, register_op, same_forward

__all__ = ["BATCHNORM", "LAYERNORM", "ElasticBatchNorm", "ElasticLayerNorm"]


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

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the torch name
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update = self.running_mean if not self.training or self.track_running_stats else None
        running_mean = self.active_tensor("running_mean", update)
        running_var = self.active_tensor("running_var", self.running_var if update is not None else None)
        weight, bias = self.active_tensor("weight", self.weight), self.active_tensor("bias", self.bias)
        group = _sync_group(self, use_batch_stats)
        if group is not None:  # SyncBatchNorm under DDP: statistics over every rank's batch, as torch's own forward
            from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm

            world = torch.distributed.get_world_size(group)
            return sync_batch_norm.apply(input, weight, bias, running_mean, running_var, self.eps, momentum, group,
                                         world)
        return F.batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats, momentum, self.eps)

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


def _sync_group(bn: nn.Module, batch_stats: bool) -> object | None:
    """The process group a ``SyncBatchNorm`` synchronises over now, or ``None`` (any other norm, eval, one rank)."""
    dist = torch.distributed
    if not (isinstance(bn, nn.SyncBatchNorm) and batch_stats and bn.training and dist.is_available()
            and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

#: BatchNorm (1d/2d/3d and SyncBatchNorm, which Lightning's ``sync_batchnorm=True`` swaps in): channel-wise.
BATCHNORM = register_op(ElasticOp(
    "BatchNorm", _TORCH_BN, "channelwise",
    {"ch": Port((("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)), "active_num_features",
                "num_features")},
    ElasticBatchNorm, accepts=lambda m: any(same_forward(m, c) for c in _TORCH_BN), channel_dim=1,
))

#: LayerNorm over one (channel) dim: channel-wise inside a width group (it normalises over the active channels).
LAYERNORM = register_op(ElasticOp(
    "LayerNorm", (nn.LayerNorm,), "channelwise",
    {"ch": Port((("weight", 0), ("bias", 0)), "active_num_features", "normalized_shape")},
    ElasticLayerNorm, accepts=lambda m: same_forward(m, nn.LayerNorm) and len(m.normalized_shape) == 1,
    channel_dim=-1,
))
