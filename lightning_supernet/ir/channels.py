"""Where the channels of a tensor go through the operations between modules (pooling, flatten, permute...).

Discovery couples a producer's output channels with the consumers and channel-wise modules that read them. Between
them a model runs operations outside any module: activations, pooling, padding, upsampling, a spatial mean,
``flatten`` before a ``Linear``, ``permute`` to channels-last, splits and concatenations along other dims. This
module follows the channels through each such autograd node, as a :class:`Layout`: the dim that holds them and the
number of consecutive entries each channel occupies along it (``flatten`` of ``[N, C, H, W]`` gives ``[N, C*H*W]``
whose channels are runs of ``H*W`` entries: the ``Linear`` reading it keeps its first ``k*H*W`` input features when
the channels shrink to ``k``). An operation that mixes channels with other dims (a reduction over the channels, a
channel shuffle, a concatenation along the channels) stops the walk with a reason in words.

Shapes come from the autograd graph itself (each node's input metadata), so no module code is read.

Example:
    >>> import torch
    >>> x = torch.randn(2, 3, 4, 4, requires_grad=True) * 1
    >>> flat = torch.nn.functional.max_pool2d(x, 2).flatten(1)
    >>> through(flat.grad_fn, 0, Layout(1, 1))   # the flatten: 3 channels of 2*2 entries each
    Layout(dim=1, unit=4)
    >>> back_through(flat.grad_fn, Layout(1, 1))  # the flatten's input holds them in dim 1, 4 features a channel
    [(0, Layout(dim=1, unit=4))]
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

__all__ = ["ELEMENTWISE", "Layout", "back_through", "in_shape", "op_name", "out_shape", "through"]

#: element-wise ops: channels stay where they are (broadcasting aligns dims from the end)
ELEMENTWISE = frozenset({
    "Relu", "Gelu", "Silu", "Tanh", "Sigmoid", "Hardswish", "Hardsigmoid", "Hardtanh", "LeakyRelu", "Elu",
    "Mish", "Softplus", "Threshold", "Mul", "Add", "Sub", "Div", "Neg", "Rsub", "Pow", "Exp", "Sqrt", "Abs",
    "NativeDropout", "Clone", "ToCopy", "Clamp", "ClampMin", "ClampMax", "Alias", "Erf", "Prelu", "Where",
    "GeLUFunction",  # BLOOM's custom autograd gelu (train mode)
    "Relu6", "LogSigmoid", "Log", "Reciprocal", "Rsqrt", "Maximum", "Minimum", "Square", "Sin", "Cos",
})
_REDUCTIONS = frozenset({"Mean", "Sum", "Amax", "Amin", "Max", "Min", "Std", "Var", "Logsumexp", "LinalgVectorNorm",
                         "Norm", "Prod", "StdMean", "VarMean"})
_VIEWS = frozenset({"View", "UnsafeView", "Reshape", "ReshapeAlias", "Squeeze", "Unsqueeze", "Flatten",
                    "Unflatten", "AsStrided_never"})
# operations on the trailing spatial dims only: channels (and the batch) keep their place and size
_SPATIAL = re.compile(r"^(MaxPool|AvgPool|AdaptiveAvgPool|AdaptiveMaxPool|FractionalMaxPool|Upsample\w*?|"
                      r"ReflectionPad|ReplicationPad|LpPool)([123])D(WithIndices)?$")
_NAME = re.compile(r"^(.*?)Backward\d*$")


class Layout(NamedTuple):
    """Where a tensor's channels are: dim ``dim`` (non-negative), each channel ``unit`` consecutive entries of it;
    after a concatenation along the channels, only the part ``[offset, offset + span)`` of that dim.

    Example:
        >>> Layout(1, 1).channels((2, 16, 8, 8))
        16
    """

    dim: int
    unit: int = 1
    #: channels concatenated with others along ``dim``: they are ``[offset, offset + span)`` of it (``span=0``:
    #: the whole dim)
    offset: int = 0
    span: int = 0

    def __repr__(self) -> str:
        extra = f", offset={self.offset}, span={self.span}" if self.span else ""
        return f"Layout(dim={self.dim}, unit={self.unit}{extra})"

    def channels(self, shape: tuple[int, ...]) -> int:
        """How many channels a tensor of ``shape`` holds in this layout."""
        return (self.span or shape[self.dim]) // self.unit


def op_name(node: Any) -> str:
    """``AddBackward0`` -> ``Add``; ``""`` for a node that is not a backward op.

    Example:
        >>> import torch
        >>> op_name((torch.ones(1, requires_grad=True) * 2).grad_fn)
        'Mul'
    """
    m = _NAME.match(type(node).__name__)
    if m is None:
        return ""
    return m.group(1) if m.group(1) == "UnsafeView" else m.group(1).removeprefix("Unsafe")


def out_shape(node: Any, nr: int = 0) -> tuple[int, ...] | None:
    """Shape of output ``nr`` of the op that created ``node`` (``None`` if autograd does not know it).

    Example:
        >>> import torch
        >>> out_shape((torch.ones(2, 3, requires_grad=True) * 2).sum(1).grad_fn)
        (2,)
    """
    if type(node).__name__ == "AccumulateGrad":
        return tuple(node.variable.shape)
    meta = getattr(node, "_input_metadata", None)
    if meta is None or nr >= len(meta):
        return None
    try:
        return tuple(int(s) for s in meta[nr].shape)
    except (TypeError, AttributeError):  # a symbolic or nested shape
        return None


def in_shape(node: Any, i: int) -> tuple[int, ...] | None:
    """Shape of the ``i``-th input of the op that created ``node`` (``None`` if unknown or not a tensor).

    Example:
        >>> import torch
        >>> in_shape((torch.ones(2, 3, requires_grad=True) * 2).sum(1).grad_fn, 0)
        (2, 3)
    """
    child, nr = node.next_functions[i]
    return None if child is None else out_shape(child, nr)


def _dims(value: Any, rank: int) -> tuple[int, ...]:
    dims = value if isinstance(value, (tuple, list)) else (value,)
    return tuple(int(d) % rank for d in dims) if rank else ()


def through(node: Any, i: int, layout: Layout) -> Layout | str:
    """The layout of ``node``'s output when its ``i``-th input holds channels in ``layout``; a reason in words
    when the op mixes the channels with anything else.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 3, 4, 4, requires_grad=True) * 1
        >>> through(x.mean((2, 3)).grad_fn, 0, Layout(1))
        Layout(dim=1, unit=1)
        >>> through(x.mean(1).grad_fn, 0, Layout(1))
        'is reduced over its channels (mean/sum/max over the channel dim)'
    """
    name = op_name(node)
    shape_in, shape_out = in_shape(node, i), out_shape(node)
    if shape_in is None or shape_out is None:
        return "goes through an operation whose shapes autograd does not record"
    d, unit = layout.dim, layout.unit
    if d >= len(shape_in):
        return "changes rank in a way the library cannot follow"
    if name in ELEMENTWISE or name == "Expand":
        e = d + len(shape_out) - len(shape_in)
        if e < 0 or shape_out[e] != shape_in[d]:
            return "is broadcast along its channels"
        return layout._replace(dim=e)
    spatial = _spatial_dims(node, name)
    if spatial is not None:
        if d >= len(shape_in) - spatial or len(shape_out) != len(shape_in) or shape_out[d] != shape_in[d]:
            return "is pooled, padded or resized along its channels"
        return layout._replace(dim=d)
    if name in _REDUCTIONS:
        if not hasattr(node, "_saved_dim"):
            return "is reduced to a single value (over its channels too)"
        dims = _dims(node._saved_dim, len(shape_in)) or tuple(range(len(shape_in)))
        if d in dims:
            return "is reduced over its channels (mean/sum/max over the channel dim)"
        keep = bool(getattr(node, "_saved_keepdim", False))
        return layout._replace(dim=d if keep else d - sum(r < d for r in dims))
    if name in _VIEWS:
        mapped = _view_forward(shape_in, shape_out, layout)
        if isinstance(mapped, Layout) and layout.span and mapped.unit != 1:
            return "is concatenated with other tensors along its channels, then flattened with other dims"
        return mapped
    if name in ("Permute", "Transpose", "T"):
        perm = _permutation(node, name, len(shape_in))
        return layout._replace(dim=perm.index(d))
    if name in ("Cat", "Split", "SplitWithSizes", "Slice", "Narrow"):
        if _dims(node._saved_dim, len(shape_in))[0] != d:
            return layout._replace(dim=d)
        if name != "Cat":
            return "is split or sliced along its channels"
        before = [in_shape(node, j) for j in range(i)]
        if unit != 1 or any(s is None for s in before):
            return "is concatenated with other tensors along its channels after a reshape"
        # each input of a concatenation keeps its own channels: a segment of the result's channel dim
        return layout._replace(offset=layout.offset + sum(s[d] for s in before), span=layout.span or shape_in[d])
    if name in ("Stack", "Select", "Unbind"):
        dim = _dims(node._saved_dim, len(shape_out) if name == "Stack" else len(shape_in))[0]
        if name == "Stack":
            return layout._replace(dim=d + (dim <= d))
        if dim == d:
            return "is split or indexed along its channels"
        return layout._replace(dim=d - (dim < d))
    return ""  # not a channel-preserving op: the caller words it


def back_through(node: Any, layout: Layout) -> list[tuple[int, Layout]] | str:
    """The inputs of ``node`` that carry the channels of its output (which are in ``layout``), with their
    layouts; a reason in words when the op mixes them with anything else. ``unit`` is relative: how many of the
    reader's entries one entry of this tensor's channel dim stands for (a ``Linear`` after ``flatten`` reads
    ``H*W`` features per channel).

    Example:
        >>> import torch
        >>> x = torch.randn(2, 3, 4, 4, requires_grad=True) * 1
        >>> back_through(x.permute(0, 2, 3, 1).grad_fn, Layout(3))
        [(0, Layout(dim=1, unit=1))]
    """
    name = op_name(node)
    shape_out = out_shape(node)
    if shape_out is None:
        return "goes through an operation whose shapes autograd does not record"
    e, unit = layout.dim, layout.unit
    inputs = [(i, in_shape(node, i)) for i, (c, _) in enumerate(node.next_functions) if c is not None]
    if name in ELEMENTWISE or name == "Expand":
        found = []
        for i, shape in inputs:
            if shape is None:
                return "goes through an operation whose shapes autograd does not record"
            d = e - len(shape_out) + len(shape)
            if d >= 0 and shape[d] == shape_out[e] and shape_out[e] > 1:
                found.append((i, layout._replace(dim=d)))  # an operand broadcast along the channels holds none
        return found
    if not inputs or inputs[0][1] is None:
        return "goes through an operation whose shapes autograd does not record"
    shape_in = inputs[0][1]
    spatial = _spatial_dims(node, name)
    if spatial is not None:
        if e >= len(shape_out) - spatial or len(shape_out) != len(shape_in) or shape_out[e] != shape_in[e]:
            return "is pooled, padded or resized along its channels"
        return [(inputs[0][0], layout._replace(dim=e))]
    if name in _REDUCTIONS:
        if not hasattr(node, "_saved_dim"):
            return "is a single value reduced from a whole tensor"
        dims = _dims(node._saved_dim, len(shape_in)) or tuple(range(len(shape_in)))
        keep = bool(getattr(node, "_saved_keepdim", False))
        kept = list(range(len(shape_in))) if keep else [j for j in range(len(shape_in)) if j not in dims]
        if kept[e] in dims:
            return "is reduced over its channels (mean/sum/max over the channel dim)"
        return [(inputs[0][0], layout._replace(dim=kept[e]))]
    if name in _VIEWS:
        mapped = _view_backward(shape_in, shape_out, layout)
        if isinstance(mapped, Layout) and layout.span and mapped.unit != 1:
            return "is concatenated from several tensors along its channels and flattened with other dims"
        return mapped if isinstance(mapped, str) else [(inputs[0][0], mapped)]
    if name in ("Permute", "Transpose", "T"):
        return [(inputs[0][0], layout._replace(dim=_permutation(node, name, len(shape_in))[e]))]
    if name in ("Cat", "Split", "SplitWithSizes", "Slice", "Narrow"):
        if _dims(node._saved_dim, len(shape_out))[0] != e:
            return [(i, layout._replace(dim=e)) for i, _ in inputs]
        if name != "Cat":
            return "is split or sliced along its channels"
        shapes = [in_shape(node, j) for j in range(len(node.next_functions))]
        if unit != 1 or any(s is None for s in shapes):
            return "is concatenated from several tensors along its channels, one of them a constant or reshaped"
        # each input is its own segment of the reader's channels
        offsets = [layout.offset + sum(s[e] for s in shapes[:j]) for j in range(len(shapes))]
        return [(i, layout._replace(offset=offsets[i], span=shapes[i][e])) for i, _ in inputs]
    if name == "Stack":
        dim = _dims(node._saved_dim, len(shape_out))[0]
        if dim == e:
            return "is stacked from several tensors along its channels"
        return [(i, layout._replace(dim=e - (dim < e))) for i, _ in inputs]
    if name in ("Select", "Unbind"):
        dim = _dims(node._saved_dim, len(shape_in))[0]
        return [(inputs[0][0], layout._replace(dim=e + (dim <= e)))]
    return ""


def _spatial_dims(node: Any, name: str) -> int | None:
    """How many trailing (spatial) dims a pooling/padding/resizing op works on; ``None`` for other ops."""
    if name == "ConstantPadNd":
        return len(node._saved_pad) // 2
    m = _SPATIAL.match(name)
    return int(m.group(2)) if m else None


def _permutation(node: Any, name: str, rank: int) -> list[int]:
    """``perm`` with ``out.dim(j) == in.dim(perm[j])``."""
    if name == "Permute":
        return [int(p) % rank for p in node._saved_dims]
    perm = list(range(rank))
    a, b = (0, 1) if name == "T" else (int(node._saved_dim0) % rank, int(node._saved_dim1) % rank)
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _prefix(shape: tuple[int, ...]) -> list[int]:
    out = [1]
    for s in shape:
        out.append(out[-1] * s)
    return out


def _view_forward(shape_in: tuple[int, ...], shape_out: tuple[int, ...], layout: Layout) -> Layout | str:
    """A reshape keeps the row-major order: channel ``c`` of dim ``d`` is a run of ``unit * prod(in[d+1:])`` flat
    entries inside each of the ``prod(in[:d])`` outer slabs; find the output dim where that run starts a dim."""
    d, unit = layout.dim, layout.unit
    pin, pout = _prefix(shape_in), _prefix(shape_out)
    outer, run = pin[d], unit * math.prod(shape_in[d + 1:])
    for e, size in enumerate(shape_out):
        if pout[e] != outer or size == 1:
            continue
        below = math.prod(shape_out[e + 1:])
        if run % below or size % (run // below):
            break
        new_unit = run // below
        if size // new_unit != shape_in[d] // unit:
            break
        return layout._replace(dim=e, unit=new_unit)
    return ("is reshaped so that its channels spread over several dims (split into attention heads or groups, a "
            "channel shuffle)")


def _view_backward(shape_in: tuple[int, ...], shape_out: tuple[int, ...], layout: Layout) -> Layout | str:
    """The inverse of :func:`_view_forward`: the input dim where the output's channel dim starts, the relative
    unit scaled by how many entries the reshape merged below it (``flatten``) or divided by the parts it split
    off (``unflatten``)."""
    e, unit = layout.dim, layout.unit
    pin, pout = _prefix(shape_in), _prefix(shape_out)
    outer = pout[e]
    for d, size in enumerate(shape_in):
        if pin[d] != outer or size == 1:
            continue
        merged, split = pout[e + 1], pin[d + 1]
        if merged >= split and merged % split == 0:
            return layout._replace(dim=d, unit=unit * (merged // split))
        if split % merged == 0 and unit % (split // merged) == 0:
            return layout._replace(dim=d, unit=unit // (split // merged))
        break
    return ("is reshaped from several dims merged into its channels (attention heads merged back, a channel shuffle)")
