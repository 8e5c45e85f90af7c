"""Shared pieces of the elastic ops: the slicing rule and the mixin contract.

Every elastic mixin keeps the module's parameters as they are and, in ``forward``, uses views of their leading
rows/columns (``weight[:out, :in]``). A dim split into ``blocks`` equal parts (a fused q/k/v projection is three
blocks of heads) keeps the first ``k`` rows of each block.

Example:
    >>> import torch
    >>> slice_dim(torch.arange(6), 0, 2, blocks=2).tolist()
    [0, 1, 3, 4]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ElasticMixin", "segment_ranges", "slice_dim"]

Ranges = tuple[tuple[int, int], ...]


def slice_dim(t: torch.Tensor, dim: int, k: int | Ranges | None, blocks: int = 1) -> torch.Tensor:
    """The first ``k`` entries along ``dim`` (of each of ``blocks`` equal parts); ``k=None`` keeps all; ``k`` a
    tuple of ``(start, length)`` ranges keeps those (the kept channels of each input of a concatenation).

    A plain prefix is a view (no copy); a multi-block slice of a dim that is not the full size makes one
    contiguous copy of the weight (tiny next to the matmul it feeds).

    Args:
        t: the tensor.
        dim: the dimension to slice.
        k: entries kept per block, or ``None`` for all.
        blocks: how many equal parts the dimension holds.

    Example:
        >>> slice_dim(torch.ones(4, 3), 1, 2).shape
        torch.Size([4, 2])
        >>> slice_dim(torch.arange(6), 0, ((0, 1), (3, 2))).tolist()
        [0, 3, 4]
    """
    size = t.shape[dim]
    if isinstance(k, tuple):
        return torch.cat([t.narrow(dim, start, length) for start, length in k], dim)
    if k is None or k * blocks == size:
        return t
    if blocks == 1:
        return t.narrow(dim, 0, k)
    parts = t.unflatten(dim, (blocks, size // blocks))
    return parts.narrow(dim + 1, 0, k).flatten(dim, dim + 1)


def segment_ranges(segments: dict[int, tuple[int, int]], full: int) -> int | Ranges | None:
    """The kept entries of a dim made of segments (``offset -> (size, kept)``; entries outside every segment are
    kept): ``None`` if all are kept, ``k`` if they are a prefix, else ``(start, length)`` ranges.

    Example:
        >>> segment_ranges({0: (4, 2), 4: (6, 6)}, 10), segment_ranges({0: (4, 4)}, 10)
        (((0, 2), (4, 6)), None)
        >>> segment_ranges({4: (6, 3)}, 10)
        7
    """
    ranges: list[list[int]] = []
    pos = 0
    for offset, (size, kept) in sorted(segments.items()):
        parts = ([pos, offset - pos],) if offset > pos else ()
        for start, length in (*parts, [offset, kept]):
            if length and ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1][1] += length
            elif length:
                ranges.append([start, length])
        pos = offset + size
    if pos < full:
        if ranges and ranges[-1][0] + ranges[-1][1] == pos:
            ranges[-1][1] += full - pos
        else:
            ranges.append([pos, full - pos])
    if ranges == [[0, full]]:
        return None
    if len(ranges) == 1 and ranges[0][0] == 0:
        return ranges[0][1]
    return tuple((s, n) for s, n in ranges)


class ElasticMixin:
    """The contract of an elastic op (put in front of an ``nn.Module`` class by ``make_elastic``).

    Subclasses list their state in ``_elastic_attrs`` (all ``None`` = the full module), say which dims of which
    tensors each of their ports slices in ``_ports``, and implement ``forward``.

    Example:
        >>> from lightning_supernet.elastic.linear import ElasticLinear
        >>> ElasticLinear._ports["out"]
        (('weight', 0), ('bias', 0))
    """

    _elastic_attrs: tuple[str, ...] = ()
    #: port name -> ((tensor name, dim), ...): the tensors a width on that port slices.
    _ports: dict[str, tuple[tuple[str, int], ...]] = {}
    #: port name -> attribute holding the active width of the port.
    _port_attrs: dict[str, str] = {}
    #: port name -> attribute holding the number of equal blocks of the port (optional).
    _port_blocks: dict[str, str] = {}

    def init_elastic(self) -> None:
        """Reset every elastic attribute to ``None`` (the full module)."""
        for key in self._elastic_attrs:
            setattr(self, key, None)

    def _port_width(self, port: str) -> tuple[int | None, int]:
        blocks = getattr(self, self._port_blocks[port], 1) if port in self._port_blocks else 1
        return getattr(self, self._port_attrs[port]), blocks or 1

    def active_tensor(self, name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        """``t`` (the tensor called ``name`` of this module) sliced to the active widths of every port."""
        if t is None:
            return None
        for dim, attr, blocks_attr in _slices(type(self)).get(name, ()):
            k = getattr(self, attr)
            if k is not None:
                blocks = getattr(self, blocks_attr, 1) if blocks_attr else 1
                t = slice_dim(t, dim, k, blocks or 1)
        return t

    def export_(self) -> dict[str, Any]:
        """Make this module physically the active shape (clone the slices) and return its new sizes.

        Used on a deep copy by :func:`lightning_supernet.extract.extract`.
        """
        for name, t in list(self._parameters.items()) + list(self._buffers.items()):
            if t is None or t.dim() == 0:
                continue
            sliced = self.active_tensor(name, t)
            if sliced is t:
                continue
            new = sliced.detach().clone().contiguous()
            if name in self._parameters:
                self._parameters[name] = nn.Parameter(new, requires_grad=t.requires_grad)
            else:
                self._buffers[name] = new
        return {}


_SLICES: dict[type, tuple[object, dict[str, list[tuple[int, str, str | None]]]]] = {}


def _slices(cls: type) -> dict[str, list[tuple[int, str, str | None]]]:
    """tensor name -> ``(dim, active attribute, blocks attribute)`` over every port of ``cls`` (each pair once:
    two ports may slice the same tensor with the same attribute). Cached until the ports are re-declared."""
    ports = cls._ports
    cached = _SLICES.get(cls)
    if cached is not None and cached[0] is ports:
        return cached[1]
    table: dict[str, list[tuple[int, str, str | None]]] = {}
    for port, targets in ports.items():
        for tensor_name, dim in targets:
            entry = (dim, cls._port_attrs[port], cls._port_blocks.get(port))
            if entry not in table.setdefault(tensor_name, []):
                table[tensor_name].append(entry)
    _SLICES[cls] = (ports, table)
    return table
