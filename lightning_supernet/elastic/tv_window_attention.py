"""Elastic heads for torchvision's Swin and Swin-v2 window attention (``ShiftedWindowAttention``, ``...V2``) and
MaxViT's block/grid attention (``RelativePositionalMultiHeadAttention``).

torchvision's ``forward`` hands ``self.qkv.weight`` and ``self.proj.weight`` to a function that derives the head
size from the residual width (``C // num_heads``), so slicing the projections or lowering ``num_heads`` alone is
wrong. :class:`ElasticWindowAttention` is registered with
:func:`~lightning_supernet.elastic.attention.register_head_forward`: at the full head count it runs torchvision's
own ``forward`` unchanged; with fewer heads it computes the same shifted-window attention
(:func:`window_attention`) on views: the active heads' q/k/v rows of the fused projection (``[3][heads][head_dim]``),
the output projection's columns of those heads, the active columns of the relative-position bias table (v1) or
the active outputs of the continuous position-bias MLP and the active ``logit_scale`` entries (v2), with the head
size kept at ``full width // full heads``. Which tensors are per-head comes from the head adapter
(:mod:`lightning_supernet.ir.heads`) and is verified numerically at construction like any layout.

torchvision's class cannot hold fewer heads than ``C // head_dim``, so ``extract`` turns an attention module with
fewer heads into ``PrunedShiftedWindowAttention`` (or ``...V2``): a subclass whose ``forward`` is
:func:`window_attention` on its (physically smaller) weights. MaxViT's attention calls its projections as modules
(so they slice themselves) but reshapes its output to the input width: :class:`ElasticMaxVitAttention` computes it
with ``heads * head_dim`` features instead, and exports as ``PrunedRelativePositionalMultiHeadAttention``.

Example:
    >>> import torch
    >>> from torchvision.models.swin_transformer import ShiftedWindowAttention
    >>> from lightning_supernet.elastic.attention import HeadSetter
    >>> from lightning_supernet.ir.heads import find_head_spec
    >>> attn = ShiftedWindowAttention(16, [4, 4], [2, 2], num_heads=4).eval(); x = torch.randn(1, 8, 8, 16)
    >>> full = attn(x); setter = HeadSetter(attn, "", find_head_spec(attn)); setter(4)
    >>> torch.equal(attn(x), full)
    True
    >>> setter(2); attn(x).shape
    torch.Size([1, 8, 8, 16])
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_supernet.elastic.attention import register_head_forward
from lightning_supernet.elastic.base import ElasticMixin
from lightning_supernet.elastic.registry import original_class
from lightning_supernet.ops import class_named

__all__ = ["MAXVIT_ATTENTION", "SWIN_ATTENTION", "ElasticMaxVitAttention", "ElasticWindowAttention",
           "accepts_maxvit_attention", "accepts_window_attention", "pruned_class", "window_attention"]

SWIN_ATTENTION = ("torchvision.models.swin_transformer.ShiftedWindowAttention",
                  "torchvision.models.swin_transformer.ShiftedWindowAttentionV2")


def _shift_mask(pad_h: int, pad_w: int, window: tuple[int, int], shift: tuple[int, int],
                like: torch.Tensor) -> torch.Tensor:
    """``[windows, N, N]``: -100 between tokens of a window that came from different regions of the rolled map."""
    def regions(n: int, w: int, s: int) -> torch.Tensor:
        idx = torch.arange(n, device=like.device)
        return (idx >= n - w).long() + (idx >= n - s).long() * (s > 0)
    label = regions(pad_h, window[0], shift[0])[:, None] * 3 + regions(pad_w, window[1], shift[1])[None, :]
    label = label.view(pad_h // window[0], window[0], pad_w // window[1], window[1]).permute(0, 2, 1, 3)
    label = label.reshape(-1, window[0] * window[1])
    differs = label[:, None, :] != label[:, :, None]
    return torch.zeros(differs.shape, dtype=like.dtype, device=like.device).masked_fill(differs, -100.0)


def window_attention(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                     proj_weight: torch.Tensor, proj_bias: torch.Tensor | None, position_bias: torch.Tensor,
                     window_size: list[int], shift_size: list[int], heads: int, head_dim: int,
                     logit_scale: torch.Tensor | None = None, attention_dropout: float = 0.0, dropout: float = 0.0,
                     training: bool = False) -> torch.Tensor:
    """Swin's (shifted) window attention on ``x`` (``[B, H, W, C]``) with ``heads`` heads of ``head_dim``.

    Args:
        x: the input map, channels last.
        qkv_weight, qkv_bias: the fused projection, rows ``[3][heads][head_dim]``.
        proj_weight, proj_bias: the output projection (``heads * head_dim`` input columns).
        position_bias: ``[1, heads, N, N]`` added to the attention logits (``N`` tokens per window).
        window_size, shift_size: as torchvision's module holds them (no shift along a dim the window covers).
        heads, head_dim: the active heads and the head size.
        logit_scale: ``[heads, 1, 1]`` for Swin-v2's cosine attention (the key bias is then unused), else ``None``.
        attention_dropout, dropout, training: dropout on the attention weights and the output.

    Example:
        >>> x = torch.randn(1, 4, 4, 8); w, p = torch.randn(12, 8), torch.randn(8, 4)
        >>> window_attention(x, w, None, p, None, torch.zeros(1, 1, 4, 4), [2, 2], [1, 1], 1, 4).shape
        torch.Size([1, 4, 4, 8])
    """
    B, H, W, C = x.shape
    wh, ww = window_size
    x = F.pad(x, (0, 0, 0, -W % ww, 0, -H % wh))
    pad_h, pad_w = x.shape[1], x.shape[2]
    shift = (0 if wh >= pad_h else shift_size[0], 0 if ww >= pad_w else shift_size[1])
    if any(shift):
        x = torch.roll(x, (-shift[0], -shift[1]), (1, 2))
    nh, nw, n = pad_h // wh, pad_w // ww, wh * ww
    windows = x.view(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, n, C)
    if logit_scale is not None and qkv_bias is not None:  # v2: no key bias
        third = qkv_bias.numel() // 3
        qkv_bias = torch.cat([qkv_bias[:third], torch.zeros_like(qkv_bias[third:2 * third]), qkv_bias[2 * third:]])
    qkv = F.linear(windows, qkv_weight, qkv_bias).reshape(windows.shape[0], n, 3, heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    if logit_scale is None:
        logits = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    else:
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logits = logits * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    logits = logits + position_bias
    if any(shift):
        mask = _shift_mask(pad_h, pad_w, (wh, ww), shift, logits)
        logits = (logits.view(B, nh * nw, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    attn = F.dropout(logits.softmax(-1), attention_dropout, training)
    out = (attn @ v).transpose(1, 2).reshape(windows.shape[0], n, heads * head_dim)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), dropout, training)
    out = out.view(B, nh, nw, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, pad_h, pad_w, -1)
    if any(shift):
        out = torch.roll(out, shift, (1, 2))
    return out[:, :H, :W].contiguous()


def _view(module: nn.Module, name: str) -> Any:
    t = getattr(module, name)
    return module.active_tensor(name, t) if hasattr(module, "active_tensor") else t


def _position_bias(attn: nn.Module, heads: int) -> torch.Tensor:
    """``[1, heads, N, N]``: the first ``heads`` heads' relative-position bias (v1 table, v2 MLP)."""
    n = attn.window_size[0] * attn.window_size[1]
    if hasattr(attn, "cpb_mlp"):
        table = attn.cpb_mlp(attn.relative_coords_table)
        table = table.reshape(-1, table.shape[-1])[:, :heads]
    else:
        table = attn.relative_position_bias_table[:, :heads]
    bias = table[attn.relative_position_index].view(n, n, heads).permute(2, 0, 1).contiguous().unsqueeze(0)
    return 16 * torch.sigmoid(bias) if hasattr(attn, "cpb_mlp") else bias


def _attend(attn: nn.Module, x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    scale = getattr(attn, "logit_scale", None)
    return window_attention(
        x, _view(attn.qkv, "weight"), _view(attn.qkv, "bias"), _view(attn.proj, "weight"), attn.proj.bias,
        _position_bias(attn, heads), attn.window_size, attn.shift_size, heads, head_dim,
        None if scale is None else scale[:heads], attn.attention_dropout, attn.dropout, attn.training)


class ElasticWindowAttention(ElasticMixin):
    """Mixin for torchvision's ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2``: fewer heads computed
    on views (see the module docstring); all heads: torchvision's own ``forward``.

    Attributes:
        full_heads: the module's head count when it was made elastic (``num_heads`` follows the active heads).

    Example:
        >>> from torchvision.models.swin_transformer import ShiftedWindowAttentionV2
        >>> from lightning_supernet.elastic.registry import make_elastic
        >>> attn = ShiftedWindowAttentionV2(16, [4, 4], [0, 0], num_heads=4)
        >>> make_elastic(attn, ElasticWindowAttention); attn.full_heads
        4
    """

    _elastic_attrs = ("full_heads",)

    def init_elastic(self) -> None:
        self.full_heads = self.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_heads == self.full_heads:
            return super().forward(x)
        return _attend(self, x, self.num_heads, self.qkv.weight.shape[0] // 3 // self.full_heads)

    def export_(self) -> dict[str, Any]:
        out = super().export_()
        if self.num_heads != self.full_heads:  # torchvision's forward needs heads x head_dim == C
            self.__dict__["_exported_as"] = pruned_class(original_class(self))
        return {**out, "num_heads": self.num_heads}


def _pruned_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(self, "n_heads"):  # MaxViT
        return _maxvit_attend(self, x)
    return _attend(self, x, self.num_heads, self.proj.in_features // self.num_heads)


_PRUNED: dict[type, type] = {}


def pruned_class(base: type) -> type:
    """``Pruned<base>``: torchvision's window attention class holding fewer heads than ``C // head_dim`` (what
    ``extract`` gives for a subnet with fewer heads); it pickles by name through this module.

    Example:
        >>> from torchvision.models.swin_transformer import ShiftedWindowAttention
        >>> pruned_class(ShiftedWindowAttention).__name__
        'PrunedShiftedWindowAttention'
    """
    if base not in _PRUNED:
        name = f"Pruned{base.__name__}"
        _PRUNED[base] = type(name, (base,), {"forward": _pruned_forward, "__module__": __name__,
                                             "__qualname__": name, "__doc__": pruned_class.__doc__})
    return _PRUNED[base]


def __getattr__(name: str) -> type:  # PEP 562: unpickling an extracted model finds its pruned class by name
    for qualified in (*SWIN_ATTENTION, "torchvision.models.maxvit.RelativePositionalMultiHeadAttention"):
        module_name, _, cls = qualified.rpartition(".")
        if name == f"Pruned{cls}":
            return pruned_class(getattr(importlib.import_module(module_name), cls))
    raise AttributeError(name)


def accepts_window_attention(module: nn.Module) -> bool:
    """torchvision's Swin window attention (v1 or v2) running torchvision's own ``forward``.

    Example:
        >>> accepts_window_attention(nn.Linear(2, 2))
        False
    """
    cls = original_class(module)
    for name in reversed(SWIN_ATTENTION):
        base = class_named(module, name)
        if base is not None:
            return cls.forward is base.forward
    return False


register_head_forward(accepts_window_attention, ElasticWindowAttention)

MAXVIT_ATTENTION = "torchvision.models.maxvit.RelativePositionalMultiHeadAttention"


def _maxvit_attend(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaxViT's block/grid attention on ``x`` (``[B, G, P, D]``) with ``attn.n_heads`` heads of ``attn.head_dim``
    (the fused ``to_qkv`` rows are ``[3][heads][head_dim]``; the logits are scaled by the input width)."""
    B, G, P, _ = x.shape
    heads, head_dim = attn.n_heads, attn.head_dim
    q, k, v = attn.to_qkv(x).reshape(B, G, P, 3, heads, head_dim).permute(3, 0, 1, 4, 2, 5)
    logits = q @ (k * attn.scale_factor).transpose(-2, -1) + attn.get_relative_positional_bias()[:, :heads]
    out = logits.softmax(-1) @ v
    return attn.merge(out.permute(0, 1, 3, 2, 4).reshape(B, G, P, heads * head_dim))


class ElasticMaxVitAttention(ElasticMixin):
    """Mixin for torchvision's MaxViT ``RelativePositionalMultiHeadAttention``, whose ``forward`` reshapes its
    output to the input width: fewer heads are computed by :func:`_maxvit_attend`; all heads: torchvision's own.

    Attributes:
        full_heads: the module's head count when it was made elastic (``n_heads`` follows the active heads).

    Example:
        >>> from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
        >>> from lightning_supernet.elastic.registry import make_elastic
        >>> attn = RelativePositionalMultiHeadAttention(16, 4, 16); make_elastic(attn, ElasticMaxVitAttention)
        >>> attn.full_heads
        4
    """

    _elastic_attrs = ("full_heads",)

    def init_elastic(self) -> None:
        self.full_heads = self.n_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.n_heads == self.full_heads else _maxvit_attend(self, x)

    def export_(self) -> dict[str, Any]:
        out = super().export_()
        if self.n_heads != self.full_heads:  # torchvision's forward needs heads x head_dim == D
            self.__dict__["_exported_as"] = pruned_class(original_class(self))
        return {**out, "n_heads": self.n_heads}


def accepts_maxvit_attention(module: nn.Module) -> bool:
    """torchvision's MaxViT attention running torchvision's own ``forward``.

    Example:
        >>> accepts_maxvit_attention(nn.Linear(2, 2))
        False
    """
    base = class_named(module, MAXVIT_ATTENTION)
    return base is not None and original_class(module).forward is base.forward


register_head_forward(accepts_maxvit_attention, ElasticMaxVitAttention)
