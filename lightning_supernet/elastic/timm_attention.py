"""Elastic heads for timm's LeViT attention (``timm.models.levit.Attention`` and ``AttentionDownsample``).

LeViT's attention reads its heads through attributes (``num_heads``, ``val_attn_dim``) and calls its projections
as modules, so the head setter's slicing suffices (the adapter ``_timm_levit`` in
:mod:`lightning_supernet.ir.heads` says where the heads live: head-major ``qkv.linear`` rows
``[heads][key_dim, key_dim, val_dim]`` with the ``qkv.bn`` channels beside them, ``proj.ln.linear`` input columns,
``attention_biases`` rows) — except for one thing: in eval mode timm caches the gathered attention biases per
device, and a cache filled with one head count is wrong for another. :class:`ElasticLevitAttention` (registered
with :func:`~lightning_supernet.elastic.attention.register_head_forward`) gathers the biases on every call
instead (the same values), and an extracted module starts with an empty cache. timm's own class runs any head
count, so an extracted subnet keeps it. (timm's ``Attention.train``/``eval`` return ``None``: do not chain them.)

Example:
    >>> import torch
    >>> from timm.models.levit import Attention
    >>> from lightning_supernet.elastic.attention import HeadSetter
    >>> from lightning_supernet.ir.heads import find_head_spec
    >>> attn = Attention(16, key_dim=4, num_heads=4, attn_ratio=2, resolution=2); _ = attn.eval()
    >>> x = torch.randn(1, 4, 16)
    >>> full = attn(x); setter = HeadSetter(attn, "", find_head_spec(attn)); setter(2)
    >>> attn(x).shape, attn.qkv.bn.active_num_features
    (torch.Size([1, 4, 16]), 32)
    >>> setter(4); torch.allclose(attn(x), full)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_supernet.elastic.attention import register_head_forward
from lightning_supernet.elastic.base import ElasticMixin
from lightning_supernet.elastic.registry import original_class
from lightning_supernet.ops import class_named

__all__ = ["LEVIT_ATTENTION", "ElasticLevitAttention", "accepts_levit_attention"]

LEVIT_ATTENTION = ("timm.models.levit.Attention", "timm.models.levit.AttentionDownsample")


class ElasticLevitAttention(ElasticMixin):
    """Mixin for timm's LeViT ``Attention`` / ``AttentionDownsample``: the attention biases are gathered on every call (no cache), so any
    active head count reads its own rows of ``attention_biases``.

    Example:
        >>> from timm.models.levit import Attention
        >>> from lightning_supernet.elastic.registry import make_elastic
        >>> attn = Attention(16, key_dim=4, num_heads=2, resolution=2); _ = attn.eval()
        >>> make_elastic(attn, ElasticLevitAttention); _ = attn(torch.randn(1, 4, 16)); attn.attention_bias_cache
        {}
    """

    _elastic_attrs = ()

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        return self.attention_biases[:, self.attention_bias_idxs]

    def export_(self) -> dict[str, Any]:
        out = super().export_()
        self.attention_bias_cache = {}  # a copy may hold biases gathered with the full heads
        self.key_attn_dim = self.num_heads * self.key_dim
        return {**out, "num_heads": self.num_heads}


def accepts_levit_attention(module: nn.Module) -> bool:
    """timm's LeViT ``Attention`` or ``AttentionDownsample`` running timm's own ``forward``.

    Example:
        >>> accepts_levit_attention(nn.Linear(2, 2))
        False
    """
    bases = [class_named(module, name) for name in LEVIT_ATTENTION]
    return any(base is not None and original_class(module).forward is base.forward for base in bases)


register_head_forward(accepts_levit_attention, ElasticLevitAttention)
