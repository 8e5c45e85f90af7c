"""Per-head tensors beside the projections: relative-position bias tables (Swin, BEiT), per-head scales.

An attention module that reads a tensor with one entry per head directly (``self.relative_position_bias_table[
index]``, shape ``[positions, heads]``) computes with all heads unless that tensor shrinks with the active heads.
:class:`ElasticPerHead` is put in front of the module holding it: during its ``forward`` the tensor is replaced by
a view of its first ``heads`` entries along the head dim (gradients reach the full parameter), and on export the
slice is cloned. Which tensors are per-head is proposed by the head adapters (:mod:`lightning_supernet.ir.heads`)
and verified numerically like every head layout.

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_supernet.elastic.registry import make_elastic
    >>> class Bias(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.table = nn.Parameter(torch.randn(5, 4))
    ...     def forward(self, x):
    ...         return x + self.table.sum(0)
    >>> m = Bias(); make_elastic(m, ElasticPerHead); m.per_head_active = {"table": (1, 2)}
    >>> m(torch.zeros(2)).shape
    torch.Size([2])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_supernet.elastic.base import ElasticMixin

__all__ = ["ElasticPerHead"]


class ElasticPerHead(ElasticMixin):
    """Mixin for a module holding per-head tensors.

    Attributes:
        per_head_active: tensor name -> ``(head dim, active heads or None)``.

    Example:
        >>> ElasticPerHead._elastic_attrs
        ('per_head_active',)
    """

    _elastic_attrs = ("per_head_active",)

    def active_tensor(self, name: str, t: Any) -> Any:
        """``t`` sliced to the active heads if it is a per-head tensor (and to any other port's widths)."""
        t = super().active_tensor(name, t)
        dim, heads = (self.per_head_active or {}).get(name, (0, None))
        return t if t is None or heads is None or t.shape[dim] <= heads else t.narrow(dim, 0, heads)

    def _views(self) -> dict[str, Any]:
        out = {}
        for name, (dim, heads) in (self.per_head_active or {}).items():
            if heads is None:
                continue
            store = self._parameters if name in self._parameters else self._buffers
            full = store[name]
            if full is not None and full.shape[dim] > heads:
                out[name] = (store, full, full.narrow(dim, 0, heads))
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        views = self._views()
        for name, (store, _, view) in views.items():
            store[name] = view
        try:
            return super().forward(*args, **kwargs)
        finally:
            for name, (store, full, _) in views.items():
                store[name] = full

    def export_(self) -> dict[str, Any]:
        super().export_()
        for name, (store, full, view) in self._views().items():
            new = view.detach().clone().contiguous()
            store[name] = nn.Parameter(new, requires_grad=full.requires_grad) if store is self._parameters else new
        self.per_head_active = None
        return {}
