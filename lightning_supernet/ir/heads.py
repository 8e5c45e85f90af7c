"""Head adapters: how an attention implementation lays out its heads, so heads can be sliced.

This is the IR side (recognition only; slicing lives in :mod:`lightning_supernet.elastic.attention`). Head counts
are baked into ``reshape`` calls, so the autograd graph alone cannot say which rows of a projection make a head.
An adapter recognises an attention module by its structure (projections, a head-count attribute) and proposes
:class:`HeadSpec` candidates; nothing is trusted by name: the supernet verifies each candidate numerically
(slicing the first ``h`` heads must compute what removing the other heads computes, see
:mod:`lightning_supernet.verify`) and takes the first that passes, or leaves the heads fixed.

Candidates vary in what the names cannot tell: a fused projection laid out ``[3][heads][head_dim]`` (timm, SAM,
``nn.MultiheadAttention``) or head-major ``[heads][3][head_dim]`` (GPT-NeoX, BLOOM, Falcon), and whether integer
attributes equal to ``heads * head_dim`` (timm's ``attn_dim``, GPT-2's ``split_size``, BERT's ``all_head_size``)
follow the active heads.

Built in: fused ``qkv``/``c_attn``/``query_key_value``/``Wqkv`` projections with a head-count attribute;
separate ``q_proj/k_proj/v_proj`` (or ``q/k/v``, ``query/key/value``, ``q_lin/k_lin/v_lin``) with grouped-query
attention; Hugging Face's split ``self.{query,key,value}`` + ``output.dense`` (BERT, RoBERTa, ViT); PyTorch's
``nn.MultiheadAttention`` (packed ``in_proj_weight``). Projections are any layer with a registered elastic op
(``nn.Linear``, GPT-2's ``Conv1D``...). Register more with :func:`register_head_adapter`.

Example:
    >>> import torch.nn as nn
    >>> class Attn(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.num_heads = 2; self.qkv = nn.Linear(8, 24); self.proj = nn.Linear(8, 8)
    >>> spec = find_head_spec(Attn())
    >>> spec.num_heads, spec.head_dim, spec.qkv, spec.o, spec.layout
    (2, 4, 'qkv', 'proj', 'qkv')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from lightning_supernet.ops import class_named, op_for

__all__ = ["HEAD_ATTRS", "HeadSpec", "find_head_spec", "find_head_specs", "fixed_by_design", "looks_like_attention",
           "register_head_adapter"]

#: attribute names that hold a head count; a module with one and no adapter is reported as unsupported.
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_attention_heads_per_partition")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "num_key_value_groups_never")


@dataclass(frozen=True)
class HeadSpec:
    """Where the heads of one attention module live (paths relative to the module; ``""`` is the module itself).

    Attributes:
        num_heads: query heads of the full model.
        num_kv_heads: key/value heads (``< num_heads`` with grouped-query attention).
        head_dim: features per head (never elastic).
        q, k, v: separate projections, or ``qkv``: one fused projection.
        o: the output projection (its input columns are ``[heads][head_dim]``).
        layout: of a fused projection's rows: ``"qkv"`` (``[3][heads][head_dim]``), ``"head"``
            (``[heads][3][head_dim]``) or ``"group"`` (``[kv heads][kv_group + 2][head_dim]``: each key/value
            head's query heads, then its key and value, as Falcon's new decoder architecture).
        head_attrs: ``(relative module path, attribute)`` pairs set to the active query-head count.
        size_attrs: ``(path, attribute)`` pairs set to ``heads * head_dim``.
        kv_attrs: ``(path, attribute)`` pairs set to the active key/value-head count.
        extra_q: more projections whose output rows are ``[heads][head_dim]`` like the query's (DeBERTa's
            ``pos_key_proj``/``pos_query_proj`` of the relative embeddings), sliced with the query heads.
        fixed: if set, the heads are recognised but fixed by the module's design; the reason, in words.
        per_head: ``(path, tensor, dim)`` of tensors with one entry per query head beside the projections
            (relative-position bias tables), sliced to the active heads.
        head_rows: rows per head of a head-major fused projection whose query, key and value sizes differ
            (LeViT: ``key_dim + key_dim + val_dim``; ``head_dim`` is then the value size the output projection
            reads per head); ``0``: ``3 * head_dim``.
        extra_rows: ``(path, rows per head)`` of more modules whose output rows (a projection) or channels (a
            ``BatchNorm``) are laid out ``[heads][rows]``, sliced to ``heads * rows`` (LeViT: the BatchNorm after
            the fused projection, the downsampling attention's query projection and its BatchNorm).

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
    layout: str = "qkv"
    head_attrs: tuple[tuple[str, str], ...] = ()
    size_attrs: tuple[tuple[str, str], ...] = ()
    kv_attrs: tuple[tuple[str, str], ...] = ()
    per_head: tuple[tuple[str, str, int], ...] = ()
    extra_q: tuple[str, ...] = ()
    fixed: str = ""
    head_rows: int = 0
    extra_rows: tuple[tuple[str, int], ...] = ()

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head; the active head count must be a multiple of it."""
        return self.num_heads // self.num_kv_heads

    @property
    def paths(self) -> tuple[str, ...]:
        """The projections' paths (``""`` for a module that is its own fused projection)."""
        return tuple(p for p in (self.q, self.k, self.v, self.qkv, self.o, *self.extra_q,
                                              *(p for p, _ in self.extra_rows))
                     if p is not None)


Adapter = Callable[[nn.Module], "HeadSpec | list[HeadSpec] | None"]
_ADAPTERS: list[Adapter] = []


def register_head_adapter(adapter: Adapter) -> Adapter:
    """Register ``adapter(module) -> HeadSpec | list[HeadSpec] | None``; adapters registered later are tried first.

    A list gives candidates in order of preference; each is verified numerically before it is used.

    Args:
        adapter: returns a :class:`HeadSpec` (or candidates) for modules it recognises, else ``None``.

    Example:
        >>> @register_head_adapter
        ... def my_attention(module):
        ...     return None  # recognise nothing
        >>> _ADAPTERS.remove(my_attention)
    """
    _ADAPTERS.insert(0, adapter)
    return adapter


def find_head_specs(module: nn.Module) -> list[HeadSpec]:
    """Every candidate layout of the first adapter that recognises ``module`` (see the module docstring).

    Example:
        >>> mha = nn.MultiheadAttention(8, 2)
        >>> [(s.qkv, s.o, s.layout) for s in find_head_specs(mha)][:1]
        [('', 'out_proj', 'qkv')]
    """
    for adapter in _ADAPTERS:
        found = adapter(module)
        if found:
            specs = found if isinstance(found, list) else [found]
            reason = fixed_by_design(module, specs[0])
            if reason:
                return [replace(specs[0], fixed=reason)]
            out: list[HeadSpec] = []
            for spec in specs:
                for variant in _variants(module, spec):
                    if variant not in out:
                        out.append(variant)
            return out
    return []


def fixed_by_design(module: nn.Module, spec: HeadSpec) -> str:
    """Why the heads of a recognised attention module cannot shrink on their own, in words ("" if they can).

    * T5-style relative attention: the first block computes a bias with one entry per head and passes it to every
      later block, so all blocks would need the same head count;
    * talking-heads attention (CaiT): linear layers over the head dim mix the heads;
    * attention that derives its head size from its input width (``C // num_heads``: timm's ``ClassAttn``);
    * ALiBi attention (BLOOM): the per-head slopes are built by the model from the config's head count, outside
      the attention module.

    Example:
        >>> fixed_by_design(nn.Linear(2, 2), HeadSpec(2, 2, 1, o="o"))
        ''
    """
    cls = type(module).__dict__.get("_original_class", type(module))
    names = {f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__}
    if hasattr(module, "has_relative_attention_bias"):
        return ("fixed by design: the first block computes the relative-position bias with one entry per head and "
                "passes it to every later block, so the blocks' head counts cannot differ (the library shrinks "
                "heads per block)")
    mixers = [n for n, c in module.named_children() if isinstance(c, nn.Linear) and n not in spec.paths
              and c.in_features == c.out_features == spec.num_heads > 1]
    if mixers:
        return (f"fixed by design: talking-heads attention mixes the heads with `{'`, `'.join(mixers)}` (linear "
                "layers over the head dim), so a head cannot be removed on its own")
    if "timm.models.cait.ClassAttn" in names:
        return ("fixed by design: `ClassAttn` derives its head size from its input width (C // num_heads), so "
                "fewer heads would change the head size instead of removing heads")
    if "transformers.models.bloom.modeling_bloom.BloomAttention" in names:
        return ("fixed by design: BLOOM's ALiBi slopes (one per head) are built by `BloomModel` from "
                "`config.n_head` outside the attention module and passed to every layer")
    return ""


def find_head_spec(module: nn.Module) -> HeadSpec | None:
    """The first candidate of :func:`find_head_specs`, or ``None``.

    Example:
        >>> find_head_spec(nn.Linear(2, 2)) is None
        True
    """
    specs = find_head_specs(module)
    return specs[0] if specs else None


def looks_like_attention(module: nn.Module) -> bool:
    """A module with an integer head-count attribute and a projection child: attention that needs an adapter.

    Example:
        >>> looks_like_attention(nn.Linear(2, 2))
        False
    """
    has_heads = _int_attr(module, HEAD_ATTRS) is not None
    return has_heads and any(_proj(module, n) is not None for n, _ in module.named_children())


def _per_head_tensors(module: nn.Module, spec: HeadSpec) -> tuple[tuple[str, str, int], ...]:
    """Parameters/buffers of the attention module (outside its projections) with a dim of ``num_heads`` entries;
    a candidate only, kept if the layout verifies numerically."""
    projections = {p for p in spec.paths}
    found = []
    for path, mod in module.named_modules():
        if path in projections or any(path.startswith(p + ".") for p in projections if p):
            continue
        if op_for(mod) is not None and path != "":
            continue
        tensors = list(mod._parameters.items()) + [(n, b) for n, b in mod._buffers.items()
                                                   if b is not None and b.is_floating_point()]
        for name, t in tensors:
            if t is None or t.dim() < 1:
                continue
            dims = [d for d in range(t.dim()) if t.shape[d] == spec.num_heads]
            if dims and not (spec.num_heads == 1):
                found.append((path, name, dims[-1]))
    return tuple(found)


def _variants(module: nn.Module, spec: HeadSpec) -> list[HeadSpec]:
    """Layouts a fused projection may have, each with and without the size attributes that equal heads x dim,
    and with the per-head tensors beside the projections first, then without them."""
    per_head = _per_head_tensors(module, spec) if not spec.per_head else ()
    if per_head:
        return [v for ph in (per_head, ()) for v in _plain_variants(module, replace(spec, per_head=ph))]
    return _plain_variants(module, spec)


def _plain_variants(module: nn.Module, spec: HeadSpec) -> list[HeadSpec]:
    if spec.qkv == "":
        return [spec]  # the module is its own fused projection (nn.MultiheadAttention): its op knows the layout
    width = spec.num_heads * spec.head_dim
    named = {a for _, a in spec.head_attrs + spec.kv_attrs}
    extra = tuple(("", a) for a, v in vars(module).items()
                  if isinstance(v, int) and not isinstance(v, bool) and v == width and not a.startswith("_")
                  and a not in named and ("", a) not in spec.size_attrs)
    sizes = [spec.size_attrs + extra, spec.size_attrs]
    if len(extra) > 1:
        sizes += [spec.size_attrs + (e,) for e in extra]
    sizes = list(dict.fromkeys(sizes))
    layouts = ([spec.layout, "head" if spec.layout == "qkv" else "qkv"] if spec.qkv is not None
               and spec.layout != "group" and not spec.head_rows else [spec.layout])
    return [replace(spec, layout=layout, size_attrs=size) for layout in layouts for size in sizes]


def _proj(module: nn.Module, name: str, port: str = "out") -> nn.Module | None:
    """The child ``name`` if a registered op can slice its ``port`` (``""``: the module itself)."""
    child = module if name == "" else getattr(module, name, None)
    if not isinstance(child, nn.Module):
        return None
    op = op_for(child)
    return child if op is not None and port in op.ports and op.role != "channelwise" else None


def _out(module: nn.Module, name: str) -> int:
    child = module if name == "" else getattr(module, name)
    return op_for(child).port_size(child, "out")


def _in(module: nn.Module, name: str) -> int:
    child = getattr(module, name)
    return op_for(child).port_size(child, "in")


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def _first(module: nn.Module, names: tuple[str, ...], port: str = "out") -> str | None:
    return next((n for n in names if _proj(module, n, port) is not None), None)


_O_NAMES = ("proj", "out_proj", "o_proj", "c_proj", "dense", "out_lin", "wo", "o", "out", "attn_out", "Wo")


@register_head_adapter
def _fused_qkv(module: nn.Module) -> HeadSpec | None:
    qkv = _first(module, ("qkv", "c_attn", "query_key_value", "Wqkv", "qkv_proj", "in_proj", "to_qkv"))
    heads = _int_attr(module, HEAD_ATTRS)
    attrs: tuple[tuple[str, str], ...] = (("", heads[0]),) if heads else ()
    if heads is None and _int_attr(getattr(module, "config", None), ("num_attention_heads",)) is not None:
        # the forward infers the head count from the shape (GPT-NeoX: `view(..., -1, 3 * head_size)`), so only
        # the config knows it; the layout candidates are verified numerically like any other
        heads = ("", module.config.num_attention_heads)
    o_name = _first(module, _O_NAMES, "in")
    if qkv is None or heads is None or o_name is None or _out(module, qkv) % (3 * heads[1]):
        return None
    head_dim = _out(module, qkv) // 3 // heads[1]
    if _in(module, o_name) != heads[1] * head_dim:
        return None
    return HeadSpec(heads[1], heads[1], head_dim, o=o_name, qkv=qkv, head_attrs=attrs)


@register_head_adapter
def _grouped_fused_qkv(module: nn.Module) -> HeadSpec | None:
    """A fused projection of ``kv * (group + 2) * head_dim`` rows with query and key/value head counts (Falcon's
    new decoder architecture); plain multi-head (``group == 1``) is left to the ``[3][heads]`` adapter."""
    qkv = _first(module, ("query_key_value", "qkv", "Wqkv"))
    heads, kv = _int_attr(module, HEAD_ATTRS), _int_attr(module, ("num_kv_heads", "num_key_value_heads"))
    o_name = _first(module, _O_NAMES, "in")
    if qkv is None or heads is None or kv is None or o_name is None or heads[1] % kv[1] or kv[1] == heads[1]:
        return None
    group = heads[1] // kv[1]
    head_dim = _in(module, o_name) // heads[1]
    if not head_dim or _out(module, qkv) != kv[1] * (group + 2) * head_dim or head_dim * heads[1] != _in(module, o_name):
        return None
    return HeadSpec(heads[1], kv[1], head_dim, o=o_name, qkv=qkv, layout="group", head_attrs=(("", heads[0]),),
                    kv_attrs=(("", kv[0]),))


@register_head_adapter
def _separate_qkv(module: nn.Module) -> HeadSpec | None:
    for names in (("q_proj", "k_proj", "v_proj"), ("q", "k", "v"), ("query", "key", "value"),
                  ("q_lin", "k_lin", "v_lin"), ("to_q", "to_k", "to_v")):
        if all(_proj(module, n) is not None for n in names):
            break
    else:
        return None
    o_name = _first(module, _O_NAMES, "in")
    if o_name is None:
        return None
    config = getattr(module, "config", None)
    num_heads = getattr(config, "num_attention_heads", None)
    found = _int_attr(module, HEAD_ATTRS)
    if found is not None:
        num_heads = found[1]
    head_dim = getattr(module, "head_dim", None)
    q_out, k_out, v_out = (_out(module, n) for n in names)
    if not isinstance(head_dim, int) and num_heads:
        head_dim = q_out // num_heads
    if not isinstance(head_dim, int) or not head_dim or q_out % head_dim or k_out % head_dim:
        return None
    num_heads, num_kv = q_out // head_dim, k_out // head_dim
    if v_out != k_out or num_heads % num_kv or _in(module, o_name) != q_out:
        return None
    kv = _int_attr(module, _KV_ATTRS)
    return HeadSpec(num_heads, num_kv, head_dim, o=o_name, q=names[0], k=names[1], v=names[2],
                    head_attrs=((("", found[0]),) if found else ()), kv_attrs=((("", kv[0]),) if kv else ()))


@register_head_adapter
def _hf_self_output(module: nn.Module) -> HeadSpec | None:
    inner = out = None
    inner_name = out_name = ""
    names = ("query", "key", "value")
    for name, child in module.named_children():
        for triple in (("query", "key", "value"), ("query_proj", "key_proj", "value_proj")):
            if all(_proj(child, n) is not None for n in triple):
                inner, inner_name, names = child, name, triple
        if _proj(child, "dense", "in") is not None:
            out, out_name = child, name
    if inner is None or out is None:
        return None
    heads = _int_attr(inner, HEAD_ATTRS)
    if heads is None:
        return None
    q, k, v = names
    head_dim = _out(inner, q) // heads[1]
    if _out(inner, k) != heads[1] * head_dim or _in(out, "dense") != heads[1] * head_dim:
        return None
    width = heads[1] * head_dim
    # other projections of the inner module with query-shaped rows (DeBERTa's pos_key_proj / pos_query_proj)
    extra = tuple(f"{inner_name}.{n}" for n, c in inner.named_children() if n not in names
                  and _proj(inner, n) is not None and _out(inner, n) == width and op_for(c).ports.get("in")
                  and _in(inner, n) == _in(inner, q))
    size = (((inner_name, "all_head_size"),) if isinstance(getattr(inner, "all_head_size", None), int) else ())
    return HeadSpec(heads[1], heads[1], head_dim, o=f"{out_name}.dense", q=f"{inner_name}.{q}",
                    k=f"{inner_name}.{k}", v=f"{inner_name}.{v}", head_attrs=((inner_name, heads[0]),),
                    size_attrs=size, extra_q=extra)


@register_head_adapter
def _torch_multihead_attention(module: nn.Module) -> HeadSpec | None:
    if not isinstance(module, nn.MultiheadAttention) or op_for(module) is None:
        return None
    heads, dim = module.num_heads, module.embed_dim
    return HeadSpec(heads, heads, dim // heads, o="out_proj", qkv="", head_attrs=(("", "num_heads"),))


_SWIN = "torchvision.models.swin_transformer.ShiftedWindowAttention"


@register_head_adapter
def _torchvision_swin(module: nn.Module) -> HeadSpec | None:
    """torchvision's Swin window attention: a fused ``qkv`` (``[3][heads][head_dim]``), ``proj``, and per head a
    column of the relative-position bias table (v1), or an output of the position-bias MLP ``cpb_mlp.2`` and an
    entry of ``logit_scale`` (v2). Its ``forward`` reads the full weights, so the elastic layer registers a forward
    for it (``lightning_supernet.elastic.tv_window_attention``)."""
    v2 = class_named(module, _SWIN + "V2")
    base = v2 or class_named(module, _SWIN)
    if base is None or type(module).__dict__.get("_original_class", type(module)).forward is not base.forward:
        return None
    heads = module.num_heads
    if _proj(module, "qkv") is None or _proj(module, "proj", "in") is None or _out(module, "qkv") % (3 * heads):
        return None
    per_head = ((("", "logit_scale", 0), ("cpb_mlp.2", "weight", 0)) if v2 is not None
                else (("", "relative_position_bias_table", 1),))
    return HeadSpec(heads, heads, _out(module, "qkv") // 3 // heads, o="proj", qkv="qkv",
                    head_attrs=(("", "num_heads"),), per_head=per_head)


@register_head_adapter
def _torchvision_maxvit(module: nn.Module) -> HeadSpec | None:
    """torchvision's MaxViT attention: fused ``to_qkv`` (``[3][heads][head_dim]``), ``merge``, ``n_heads`` and a
    per-head column of the relative-position bias table (its ``forward`` is registered by the elastic layer)."""
    base = class_named(module, "torchvision.models.maxvit.RelativePositionalMultiHeadAttention")
    if base is None or type(module).__dict__.get("_original_class", type(module)).forward is not base.forward:
        return None
    heads, head_dim = module.n_heads, module.head_dim
    if _proj(module, "to_qkv") is None or _proj(module, "merge", "in") is None or \
            _out(module, "to_qkv") != 3 * heads * head_dim or _in(module, "merge") != heads * head_dim:
        return None
    return HeadSpec(heads, heads, head_dim, o="merge", qkv="to_qkv", head_attrs=(("", "n_heads"),),
                    per_head=(("", "relative_position_bias_table", 1),))


@register_head_adapter
def _timm_levit(module: nn.Module) -> HeadSpec | None:
    """timm's LeViT ``Attention`` and ``AttentionDownsample`` (token layout, not ``use_conv``).

    ``Attention``: ``qkv`` is a ``LinearNorm`` (``linear`` + ``bn``, a ``BatchNorm1d`` with one channel per row)
    laid out head-major ``[heads][key_dim, key_dim, val_dim]``. ``AttentionDownsample``: ``kv`` (``[heads][key_dim,
    val_dim]``) and a query ``q.ln`` (``[heads][key_dim]``), each a ``LinearNorm``. Both: ``proj`` is an activation
    then a ``LinearNorm`` reading ``heads * val_dim``, ``attention_biases`` has a row per head and ``val_attn_dim``
    follows the heads. Their eval-mode bias cache is bypassed by the elastic layer
    (``lightning_supernet.elastic.timm_attention``)."""
    base = class_named(module, "timm.models.levit.Attention") or \
        class_named(module, "timm.models.levit.AttentionDownsample")
    if base is None or type(module).__dict__.get("_original_class", type(module)).forward is not base.forward \
            or module.use_conv:
        return None
    heads, key_dim, val_dim = module.num_heads, module.key_dim, module.val_dim
    fused, rows = ("kv", key_dim + val_dim) if hasattr(module, "kv") else ("qkv", 2 * key_dim + val_dim)
    extra: tuple[tuple[str, int], ...] = ((f"{fused}.bn", rows),)
    if fused == "kv":
        extra += (("q.ln.linear", key_dim), ("q.ln.bn", key_dim))
        if _proj(module.q.ln, "linear") is None or _out(module.q.ln, "linear") != heads * key_dim:
            return None
    norm = getattr(getattr(module, fused), "bn", None)
    if _proj(getattr(module, fused), "linear") is None or not hasattr(module.proj, "ln") or \
            _proj(module.proj.ln, "linear", "in") is None or _out(getattr(module, fused), "linear") != heads * rows or \
            _in(module.proj.ln, "linear") != heads * val_dim or norm is None or op_for(norm) is None:
        return None
    return HeadSpec(heads, heads, val_dim, o="proj.ln.linear", qkv=f"{fused}.linear", layout="head",
                    head_attrs=(("", "num_heads"),), size_attrs=(("", "val_attn_dim"),),
                    per_head=(("", "attention_biases", 0),), head_rows=rows, extra_rows=extra)
