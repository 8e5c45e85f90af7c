"""Elastic attention heads: the head setter, and PyTorch's own ``nn.MultiheadAttention`` as an elastic op.

A :class:`~lightning_supernet.ir.heads.HeadSpec` (recognised and numerically verified on the IR side) says where
the heads of an attention module live; :class:`HeadSetter` applies an active head count to it: it slices the
query/key/value (or fused) projections' output rows and the output projection's input columns through their
registered ops, and sets the module's head-count and head-size attributes for as long as the subnet is active.

``nn.MultiheadAttention`` holds its fused projection itself (``in_proj_weight``, laid out ``[3][heads][head_dim]``)
and computes attention functionally, with the head size derived from ``embed_dim // num_heads``; so its elastic
form computes the sliced attention itself (same masks, dropout, ``need_weights``, ``batch_first`` and unbatched
inputs as torch's), and an extracted subnet with fewer heads becomes a :class:`PrunedMultiheadAttention` — a
subclass of ``nn.MultiheadAttention`` whose heads times head size is smaller than its ``embed_dim``, which torch's
own class cannot express.

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_supernet.ir.heads import find_head_spec
    >>> mha = nn.MultiheadAttention(8, 4, batch_first=True)
    >>> setter = HeadSetter(mha, "", find_head_spec(mha)); setter(2)
    >>> mha(torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8))[0].shape, mha.num_heads
    (torch.Size([1, 3, 8]), 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_supernet.elastic.per_head import ElasticPerHead
from lightning_supernet.elastic.base import ElasticMixin
from lightning_supernet.elastic.registry import make_elastic
from lightning_supernet.ir.heads import HeadSpec
from lightning_supernet.ops import ElasticOp, Port, op_for, register_op, same_forward

__all__ = ["MULTIHEAD_ATTENTION", "ElasticMultiheadAttention", "HeadSetter", "PrunedMultiheadAttention",
           "head_forward_for", "register_head_forward"]

#: ``(accepts(module) -> bool, mixin)``: attention modules whose own ``forward`` reads their projections' full
#: weights (torchvision's Swin calls a function with ``self.qkv.weight``), with the mixin that computes it on views
_HEAD_FORWARDS: list[tuple[Callable[[nn.Module], bool], type]] = []


def register_head_forward(accepts: Callable[[nn.Module], bool], mixin: type) -> type:
    """Register the elastic ``forward`` of an attention module that reads its projections' weights itself.

    :class:`HeadSetter` puts ``mixin`` in front of every attention module ``accepts`` takes, before any other
    head slicing, so its ``forward`` can compute the attention with the active heads (the head layout itself is
    still the adapter's, verified numerically). Registered later wins.

    Args:
        accepts: ``module -> bool``: the modules this forward is for.
        mixin: an :class:`~lightning_supernet.elastic.base.ElasticMixin` subclass overriding ``forward``.

    Example:
        >>> class MyForward(ElasticMixin):
        ...     pass
        >>> register_head_forward(lambda m: False, MyForward) is MyForward
        True
        >>> _ = _HEAD_FORWARDS.pop(0)
    """
    _HEAD_FORWARDS.insert(0, (accepts, mixin))
    return mixin


def head_forward_for(module: nn.Module) -> type | None:
    """The mixin registered with :func:`register_head_forward` for ``module``, or ``None``.

    Example:
        >>> head_forward_for(nn.MultiheadAttention(8, 2)) is None
        True
    """
    return next((mixin for accepts, mixin in _HEAD_FORWARDS if accepts(module)), None)


def _elastic(root: nn.Module, path: str) -> nn.Module:
    mod = root.get_submodule(path) if path else root
    op = op_for(mod)
    if op is None:
        raise TypeError(f"`{path}` ({type(mod).__name__}) has no registered elastic op")
    if not isinstance(mod, op.mixin):
        make_elastic(mod, op.mixin)
    return mod


class HeadSetter:
    """Applies an active head count to one attention module (see the module docstring).

    The module is looked up by path on every call, so a copy of the model (deepcopy, pickle) or a module swapped
    after construction still gets its heads sliced.

    Args:
        model: the model holding the attention module.
        path: the attention module's path in ``model`` (``""``: the model itself).
        spec: the verified layout.

    Example:
        >>> import torch.nn as nn
        >>> from lightning_supernet.ir.heads import find_head_spec
        >>> mha = nn.MultiheadAttention(8, 4); HeadSetter(mha, "", find_head_spec(mha))(2)
        >>> mha.in_proj_weight.shape, mha.active_tensor("in_proj_weight", mha.in_proj_weight).shape
        (torch.Size([24, 8]), torch.Size([12, 8]))
    """

    def __init__(self, model: nn.Module, path: str, spec: HeadSpec) -> None:
        self.model, self.path, self.spec = model, path, spec
        anchor = self.anchor
        self.originals = {(p, a): getattr(anchor.get_submodule(p) if p else anchor, a)
                          for p, a in spec.head_attrs + spec.size_attrs + spec.kv_attrs}
        own_forward = head_forward_for(anchor)
        if own_forward is not None:
            make_elastic(anchor, own_forward)
        for p in spec.paths:
            _elastic(anchor, p)
        for p, _, _ in spec.per_head:
            mod = anchor.get_submodule(p) if p else anchor
            make_elastic(mod, ElasticPerHead)

    @property
    def anchor(self) -> nn.Module:
        """The attention module."""
        return self.model.get_submodule(self.path) if self.path else self.model

    def __call__(self, heads: int) -> None:
        spec, anchor = self.spec, self.anchor
        full = heads == spec.num_heads
        width = None if full else heads * spec.head_dim
        kv = None if full else heads // spec.kv_group * spec.head_dim
        if spec.qkv is not None:
            fused = _elastic(anchor, spec.qkv)
            port = op_for(fused).ports["out"]
            head_major = spec.layout in ("head", "group")
            rows = (None if full else heads // spec.kv_group * (spec.kv_group + 2) * spec.head_dim
                    if spec.layout == "group" else heads * spec.head_rows if spec.head_rows
                    else 3 * width if head_major else width)
            setattr(fused, port.active, None if full else rows)
            if port.blocks:
                setattr(fused, port.blocks, 1 if head_major else 3)
        for path, w in ((spec.q, width), (spec.k, kv), (spec.v, kv), *((p, width) for p in spec.extra_q)):
            if path is not None:
                proj = _elastic(anchor, path)
                setattr(proj, op_for(proj).ports["out"].active, w)
        for path, per_head_rows in spec.extra_rows:  # [heads][rows] outputs or BatchNorm channels (LeViT)
            mod = _elastic(anchor, path)
            ports = op_for(mod).ports
            setattr(mod, ports["out" if "out" in ports else "ch"].active, None if full else heads * per_head_rows)
        o = _elastic(anchor, spec.o)
        setattr(o, op_for(o).ports["in"].active, width)
        values = {**{key: heads for key in spec.head_attrs}, **{key: heads * spec.head_dim for key in spec.size_attrs},
                  **{key: heads // spec.kv_group for key in spec.kv_attrs}}
        for (p, a), value in values.items():
            setattr(anchor.get_submodule(p) if p else anchor, a, self.originals[(p, a)] if full else value)
        for p, name, dim in spec.per_head:
            mod = anchor.get_submodule(p) if p else anchor
            if not isinstance(mod, ElasticPerHead):  # a copy made before the setter existed
                make_elastic(mod, ElasticPerHead)
            mod.per_head_active = {**(mod.per_head_active or {}), name: (dim, None if full else heads)}


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def sliced_attention(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     in_weight: Any, in_bias: torch.Tensor | None, out_weight: torch.Tensor,
                     out_bias: torch.Tensor | None, heads: int, head_dim: int, key_padding_mask: Any = None,
                     need_weights: bool = True, attn_mask: Any = None, average_attn_weights: bool = True,
                     is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention``'s computation with ``heads`` heads of ``head_dim`` (any ``heads * head_dim``).

    Args mirror ``nn.MultiheadAttention.forward``; the weights are the active (sliced) ones: ``in_weight`` is the
    packed ``[3 * heads * head_dim, embed_dim]`` projection or a ``(q, k, v)`` tuple of separate ones (``kdim`` /
    ``vdim`` different from ``embed_dim``).

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True); x = torch.randn(1, 3, 8)
        >>> out, _ = sliced_attention(mha, x, x, x, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
        ...                           mha.out_proj.bias, 2, 4)
        >>> torch.allclose(out, mha(x, x, x)[0], atol=1e-6)
        True
    """
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif not module.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    B, L, S = query.shape[0], query.shape[1], key.shape[1]
    wq, wk, wv = in_weight if isinstance(in_weight, tuple) else in_weight.chunk(3)
    bq, bk, bv = in_bias.chunk(3) if in_bias is not None else (None, None, None)
    q = F.linear(query, wq, bq).view(B, L, heads, head_dim).transpose(1, 2)  # (B, nh, L, hd)
    k = F.linear(key, wk, bk).view(B, S, heads, head_dim).transpose(1, 2)
    v = F.linear(value, wv, bv).view(B, S, heads, head_dim).transpose(1, 2)
    mask = _float_mask(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.view(B, -1, L, S)[:, :heads] if mask.dim() == 3 else mask.view(1, 1, L, S)
    padding = _float_mask(key_padding_mask, q.dtype)
    if padding is not None:
        padding = padding.view(B, 1, 1, S)
        mask = padding if mask is None else mask + padding
    causal = is_causal and mask is None
    dropout = module.dropout if module.training else 0.0
    weights = None
    if need_weights:
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        if causal:
            scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if mask is not None:
            scores = scores + mask
        attn = F.dropout(scores.softmax(-1), dropout, training=dropout > 0)
        out = attn @ v
        weights = attn.mean(1) if average_attn_weights else attn
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    out = F.linear(out.transpose(1, 2).reshape(B, L, heads * head_dim), out_weight, out_bias)
    if unbatched:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    return (out if module.batch_first else out.transpose(0, 1)), weights


class ElasticMultiheadAttention(ElasticMixin):
    """Mixin for ``nn.MultiheadAttention`` (packed projection, no ``bias_k``/``add_zero_attn``).

    Attributes:
        active_out_features: rows of each q/k/v block in use (``heads * head_dim``), ``None``: all heads (torch's
            own forward, fast path included).
        out_blocks: blocks of the fused projection (3).

    Example:
        >>> from lightning_supernet.elastic.registry import make_elastic
        >>> mha = nn.MultiheadAttention(8, 2); make_elastic(mha, ElasticMultiheadAttention)
        >>> mha.active_out_features is None
        True
    """

    _elastic_attrs = ("active_out_features", "out_blocks")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Any = None,
                need_weights: bool = True, attn_mask: Any = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.active_out_features is None:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        out_proj = self.out_proj
        out_weight = out_proj.active_tensor("weight", out_proj.weight) if hasattr(out_proj, "active_tensor") else \
            out_proj.weight[:, : self.active_out_features]
        return sliced_attention(
            self, query, key, value, _in_weight(self, self.active_tensor),
            self.active_tensor("in_proj_bias", self.in_proj_bias), out_weight, out_proj.bias, self.num_heads,
            self.head_dim, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)

    def export_(self) -> dict[str, int]:
        heads = self.active_out_features
        super().export_()
        if heads is not None:  # torch's class needs heads x head_dim == embed_dim: keep a forward that does not
            self.__dict__["_exported_as"] = PrunedMultiheadAttention
            # torch's fused transformer kernels (TransformerEncoderLayer's fast path) assume that too; this flag is
            # among what they check, and the pruned forward never reads it
            self._qkv_same_embed_dim = False
        return {"num_heads": self.num_heads}


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` with fewer heads than ``embed_dim // head_dim`` (what ``extract`` gives for a
    subnet with fewer heads): its projections map ``embed_dim`` to ``num_heads * head_dim`` and back.

    Note:
        Its ``_qkv_same_embed_dim`` is ``False`` although its projection is packed: that keeps PyTorch's fused
        transformer kernels, which assume ``num_heads * head_dim == embed_dim``, from being used on it.

    Example:
        >>> import copy
        >>> from lightning_supernet.elastic.registry import make_elastic, restore
        >>> mha = nn.MultiheadAttention(8, 4, batch_first=True).eval(); x = torch.randn(2, 3, 8)
        >>> make_elastic(mha, ElasticMultiheadAttention); HeadSetter(mha, "", _spec(mha))(2)
        >>> small = copy.deepcopy(mha); _ = small.out_proj.export_(); _ = small.export_(); restore(small.out_proj)
        >>> restore(small); small.__class__ = PrunedMultiheadAttention
        >>> torch.allclose(small(x, x, x)[0], mha(x, x, x)[0], atol=1e-6), small.in_proj_weight.shape
        (True, torch.Size([12, 8]))
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Any = None,
                need_weights: bool = True, attn_mask: Any = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return sliced_attention(self, query, key, value, _in_weight(self, lambda name, t: t), self.in_proj_bias,
                                self.out_proj.weight, self.out_proj.bias, self.num_heads, self.head_dim,
                                key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)


def _spec(mha: nn.MultiheadAttention) -> HeadSpec:
    return HeadSpec(mha.num_heads, mha.num_heads, mha.head_dim, o="out_proj", qkv="", head_attrs=(("", "num_heads"),))


def _in_weight(mha: nn.Module, view: Any) -> Any:
    """The packed input projection, or the separate (q, k, v) ones, through ``view(name, tensor)``."""
    if mha.in_proj_weight is not None:
        return view("in_proj_weight", mha.in_proj_weight)
    return tuple(view(n, getattr(mha, n)) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))


def _supported_mha(module: nn.Module) -> bool:
    return same_forward(module, nn.MultiheadAttention) and module.bias_k is None and not module.add_zero_attn


#: ``nn.MultiheadAttention``: its heads are elastic (the fused q/k/v rows are its "out" port, or the rows of its
#: separate q/k/v weights when ``kdim``/``vdim`` differ from ``embed_dim``).
MULTIHEAD_ATTENTION = register_op(ElasticOp(
    "MultiheadAttention", (nn.MultiheadAttention,), "heads",
    {"out": Port((("in_proj_weight", 0), ("in_proj_bias", 0)), "active_out_features", lambda m: 3 * m.embed_dim,
                 blocks="out_blocks"),
     # kdim/vdim != embed_dim: separate q/k/v weights, one block each (the bias stays packed)
     "out_separate": Port((("q_proj_weight", 0), ("k_proj_weight", 0), ("v_proj_weight", 0)), "active_out_features",
                          "embed_dim")},
    ElasticMultiheadAttention, accepts=_supported_mha, channel_dim=-1,
))
