"""Head adapters: how an attention implementation lays out its heads, so heads can be sliced.

Head counts are baked into ``reshape`` calls, so the autograd graph alone cannot say which rows of a projection
make a head. An adapter recognises an attention module by its structure (child names, head attributes), and the
supernet then slices q/k/v rows and output-projection columns head by head and sets the module's head attribute
(``num_heads``, ``num_attention_heads``) while a subnet is active. The user's class is never edited.

Built in: fused ``qkv`` + ``num_heads`` (timm, Segment Anything, most ViTs); separate ``q_proj/k_proj/v_proj/
o_proj`` with grouped-query attention (Hugging Face Llama, Mistral, Qwen); Hugging Face's split
``self.{query,key,value}`` + ``output.dense`` (BERT, RoBERTa, ViT). Register more with
:func:`register_head_adapter`.

Example:
    >>> import torch.nn as nn
    >>> class Attn(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.num_heads = 2; self.qkv = nn.Linear(8, 24); self.proj = nn.Linear(8, 8)
    >>> spec = find_head_spec(Attn())
    >>> spec.num_heads, spec.head_dim, spec.qkv, spec.o
    (2, 4, 'qkv', 'proj')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

__all__ = ["HEAD_ATTRS", "HeadSpec", "find_head_spec", "looks_like_attention", "register_head_adapter"]

#: attribute names that hold a head count; a module with one and no adapter is reported as unsupported.
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")


@dataclass(frozen=True)
class HeadSpec:
    """Where the heads of one attention module live (paths relative to the module).

    Attributes:
        num_heads: query heads of the full model.
        num_kv_heads: key/value heads (``< num_heads`` with grouped-query attention).
        head_dim: features per head (never elastic).
        q, k, v: separate projections, or ``qkv``: one fused projection laid out ``[3][heads][head_dim]``.
        o: the output projection (its input columns are ``[heads][head_dim]``).
        head_attrs: ``(relative module path, attribute)`` pairs set to the active query-head count.
        size_attrs: ``(path, attribute)`` pairs set to ``heads * head_dim``.
        kv_attrs: ``(path, attribute)`` pairs set to the active key/value-head count.

    Example:
        >>> HeadSpec(num_heads=4, num_kv_heads=2, head_dim=8, q="q", k="k", v="v", o="o").kv_group
        2
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    head_attrs: tuple[tuple[str, str], ...] = ()
    size_attrs: tuple[tuple[str, str], ...] = ()
    kv_attrs: tuple[tuple[str, str], ...] = field(default=())

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head; the active head count must be a multiple of it."""
        return self.num_heads // self.num_kv_heads


Adapter = Callable[[nn.Module], "HeadSpec | None"]
_ADAPTERS: list[Adapter] = []


def register_head_adapter(adapter: Adapter) -> Adapter:
    """Register ``adapter(module) -> HeadSpec | None``; adapters registered later are tried first.

    Args:
        adapter: returns a :class:`HeadSpec` for modules it recognises, else ``None``.

    Example:
        >>> @register_head_adapter
        ... def my_attention(module):
        ...     return None  # recognise nothing
        >>> _ADAPTERS.remove(my_attention)
    """
    _ADAPTERS.insert(0, adapter)
    return adapter


def find_head_spec(module: nn.Module) -> HeadSpec | None:
    """The first registered adapter's spec for ``module``, or ``None``.

    Example:
        >>> find_head_spec(nn.Linear(2, 2)) is None
        True
    """
    for adapter in _ADAPTERS:
        spec = adapter(module)
        if spec is not None:
            return spec
    return None


def looks_like_attention(module: nn.Module) -> bool:
    """A module with an integer head-count attribute and a linear child: attention that needs an adapter.

    Example:
        >>> looks_like_attention(nn.Linear(2, 2))
        False
    """
    has_heads = any(isinstance(getattr(module, a, None), int) for a in HEAD_ATTRS)
    return has_heads and any(isinstance(c, nn.Linear) for c in module.children())


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return name, value
    return None


@register_head_adapter
def _fused_qkv(module: nn.Module) -> HeadSpec | None:
    qkv = _linear(module, "qkv")
    heads = _int_attr(module, HEAD_ATTRS)
    o_name = next((n for n in ("proj", "out_proj", "o_proj", "c_proj") if _linear(module, n)), None)
    if qkv is None or heads is None or o_name is None or qkv.out_features % (3 * heads[1]):
        return None
    head_dim = qkv.out_features // 3 // heads[1]
    if getattr(module, o_name).in_features != heads[1] * head_dim:
        return None
    return HeadSpec(heads[1], heads[1], head_dim, o=o_name, qkv="qkv", head_attrs=(("", heads[0]),))


@register_head_adapter
def _separate_qkv(module: nn.Module) -> HeadSpec | None:
    names = ("q_proj", "k_proj", "v_proj")
    q, k, v = (_linear(module, n) for n in names)
    o_name = next((n for n in ("o_proj", "out_proj", "dense") if _linear(module, n)), None)
    if q is None or k is None or v is None or o_name is None:
        return None
    config = getattr(module, "config", None)
    num_heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(module, "head_dim", None)
    found = _int_attr(module, HEAD_ATTRS)
    if num_heads is None and found is not None:
        num_heads = found[1]
    if not isinstance(head_dim, int) and num_heads:
        head_dim = q.out_features // num_heads
    if not isinstance(head_dim, int) or not head_dim or q.out_features % head_dim or k.out_features % head_dim:
        return None
    num_heads, num_kv = q.out_features // head_dim, k.out_features // head_dim
    if v.out_features != k.out_features or num_heads % num_kv:
        return None
    head_attrs = (("", found[0]),) if found else ()
    kv = _int_attr(module, ("num_key_value_heads", "num_kv_heads"))
    return HeadSpec(num_heads, num_kv, head_dim, o=o_name, q="q_proj", k="k_proj", v="v_proj",
                    head_attrs=head_attrs, kv_attrs=((("", kv[0]),) if kv else ()))


@register_head_adapter
def _hf_self_output(module: nn.Module) -> HeadSpec | None:
    inner = out = None
    inner_name = out_name = ""
    for name, child in module.named_children():
        if all(_linear(child, n) for n in ("query", "key", "value")):
            inner, inner_name = child, name
        elif _linear(child, "dense") is not None:
            out, out_name = child, name
    if inner is None or out is None:
        return None
    heads = _int_attr(inner, HEAD_ATTRS)
    if heads is None:
        return None
    head_dim = inner.query.out_features // heads[1]
    if inner.key.out_features != heads[1] * head_dim or out.dense.in_features != heads[1] * head_dim:
        return None
    size = (((inner_name, "all_head_size"),) if isinstance(getattr(inner, "all_head_size", None), int) else ())
    return HeadSpec(heads[1], heads[1], head_dim, o=f"{out_name}.dense", q=f"{inner_name}.query",
                    k=f"{inner_name}.key", v=f"{inner_name}.value", head_attrs=((inner_name, heads[0]),),
                    size_attrs=size)
