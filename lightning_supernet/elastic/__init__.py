"""Elastic ops: slicing views of the full weights, selected by the module's active widths.

Each op is one file that declares its mixin and registers it (:func:`lightning_supernet.ops.register_op`):
``linear.py`` (``nn.Linear``), ``conv.py`` (dense, depthwise and grouped ``nn.Conv2d``), ``norm.py`` (BatchNorm,
SyncBatchNorm, LayerNorm), ``norm_act.py`` and ``timm_linear.py`` (timm's ``BatchNormAct2d`` and ``Linear``),
``conv1d.py`` (GPT-2's ``Conv1D``), ``hf_linear.py`` (Falcon's ``FalconLinear``), ``moe.py`` (Mixtral's experts),
``per_head.py`` (per-head tables), ``attention.py`` (``nn.MultiheadAttention`` and the head setter),
``tv_window_attention.py`` (torchvision's Swin window attention), ``depth.py``
(skippable blocks), ``fastpath.py`` (guards for fused fast paths).

Example:
    >>> import torch.nn as nn
    >>> mixin_for(nn.Linear(2, 2)) is ElasticLinear
    True
"""

from torch import nn

from lightning_supernet.elastic.attention import ElasticMultiheadAttention, HeadSetter, PrunedMultiheadAttention
from lightning_supernet.elastic.conv import ElasticConv2d
from lightning_supernet.elastic.conv1d import ElasticConv1D
from lightning_supernet.elastic.depth import SkippableBlock
from lightning_supernet.elastic import hf_linear, moe, timm_attention, tv_window_attention  # noqa: F401 - register their ops
from lightning_supernet.elastic.fastpath import FastPathGuard, guard_fast_paths, register_fast_path
from lightning_supernet.elastic.linear import ElasticLinear
from lightning_supernet.elastic.norm import ElasticBatchNorm, ElasticLayerNorm
from lightning_supernet.elastic.norm_act import ElasticBatchNormAct
from lightning_supernet.elastic.timm_linear import TIMM_LINEAR  # noqa: F401 - registers timm's Linear
from lightning_supernet.elastic.registry import is_elastic, make_elastic, original_class, restore
from lightning_supernet.ir.heads import HeadSpec, find_head_spec, register_head_adapter
from lightning_supernet.ops import op_for

__all__ = [
    "ElasticBatchNorm", "ElasticBatchNormAct", "ElasticConv1D", "ElasticConv2d", "ElasticLayerNorm", "ElasticLinear",
    "ElasticMultiheadAttention", "FastPathGuard", "HeadSetter", "HeadSpec", "PrunedMultiheadAttention",
    "SkippableBlock", "find_head_spec", "guard_fast_paths", "is_elastic", "make_elastic", "mixin_for",
    "original_class", "register_fast_path", "register_head_adapter", "restore",
]


def mixin_for(module: nn.Module) -> type | None:
    """The elastic mixin of the registered op covering ``module``, or ``None``.

    Example:
        >>> mixin_for(nn.BatchNorm2d(3)).__name__
        'ElasticBatchNorm'
    """
    op = op_for(module)
    return None if op is None else op.mixin
