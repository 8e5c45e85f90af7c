"""The registry of elastic ops: one declaration per kind of layer, read by discovery, slicing, costing,
prioritization and export alike.

An :class:`ElasticOp` says, once, everything the library needs to know about a layer type:

* which module types it covers (classes, or ``"module.QualName"`` strings for a third-party class that must not
  be imported to be recognised) and which instances it accepts (``accepts``: e.g. torch's own ``forward``,
  ``groups == 1``);
* its **role** in discovery: a ``"transform"`` maps input channels to output channels (``Linear``, ``Conv2d``:
  it produces a width on its ``"out"`` port and consumes one on its ``"in"`` port); a ``"channelwise"`` op keeps
  channels apart (BatchNorm, LayerNorm over channels, depthwise/grouped convolution: one ``"ch"`` port); a
  ``"heads"`` op owns fused attention projections itself (``nn.MultiheadAttention``: its ``"out"`` port is the
  fused q/k/v rows);
* for each port (:class:`Port`): which ``(tensor, dim)`` pairs it slices — the same tensors prioritization
  permutes and export clones —, the attribute holding the active size, the attribute holding the full size, an
  optional number of equal blocks and the multiple a width must be;
* the elastic mixin that implements ``forward`` on views, and ``channel_dim``, where the output keeps its
  channels (activation importance).

Discovery (``lightning_supernet.ir``) reads declarations only, so it never imports the elastic layer: the
built-in ops register themselves when :mod:`lightning_supernet.elastic` is imported, which the first query here
does. Adding an op is one file that declares a mixin and calls :func:`register_op`, plus its case in
``tests/test_elastic_contract.py``. A user registers their own the same way.

Example:
    >>> import torch.nn as nn
    >>> op = op_for(nn.Linear(4, 8))
    >>> op.name, op.role, op.port_size(nn.Linear(4, 8), "out")
    ('Linear', 'transform', 8)
    >>> op.ports["in"].tensors
    (('weight', 1),)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["ElasticOp", "Port", "class_named", "op_for", "qualified_name", "register_op", "registered_ops",
           "same_forward"]

ROLES = ("transform", "channelwise", "heads")


@dataclass(frozen=True)
class Port:
    """One sliceable dim of an op.

    Attributes:
        tensors: ``(tensor name, dim)`` pairs this port slices (parameters and buffers).
        active: the module attribute holding the active size (``None``: the full size).
        size: the module attribute holding the full size (or a callable ``module -> int``).
        blocks: the attribute holding the number of equal blocks the dim is split into (fused q/k/v: 3), if any.
        multiple: the module attribute (or callable) giving the multiple every active size must be (a grouped
            convolution shrinks in whole groups); ``None``: any size.

    Example:
        >>> Port((("weight", 0), ("bias", 0)), "active_out_features", "out_features").blocks is None
        True
    """

    tensors: tuple[tuple[str, int], ...]
    active: str
    size: str | Callable[[nn.Module], int]
    blocks: str | None = None
    multiple: str | Callable[[nn.Module], int] | None = None


@dataclass(frozen=True)
class ElasticOp:
    """The declaration of one kind of elastic layer (see the module docstring).

    Example:
        >>> op_for(nn.BatchNorm2d(4)).ports["ch"].tensors[-1]
        ('running_var', 0)
    """

    name: str
    types: tuple[type | str, ...]
    role: str
    ports: Mapping[str, Port]
    mixin: type
    accepts: Callable[[nn.Module], bool] = field(default=lambda module: True)
    channel_dim: int = -1
    #: the width lives inside the module (mixture-of-experts MLPs): its ``out`` and ``in`` ports are one dim of
    #: its own, coupled with nothing outside
    internal: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"`role` must be one of {', '.join(ROLES)}, got {self.role!r}")
        expected = {"transform": {"out", "in"}, "channelwise": {"ch"}, "heads": {"out"}}[self.role]
        if not expected <= set(self.ports):
            raise ValueError(f"op `{self.name}` ({self.role}) must declare the ports {sorted(expected)}, "
                             f"got {sorted(self.ports)}")

    def port_size(self, module: nn.Module, port: str) -> int:
        """The full size of ``port`` on ``module``."""
        return _value(module, self.ports[port].size)

    def port_multiple(self, module: nn.Module, port: str) -> int:
        """The multiple every active size of ``port`` must be (1: any)."""
        multiple = self.ports[port].multiple
        return 1 if multiple is None else _value(module, multiple)


_OPS: list[ElasticOp] = []
_LOADED = False


def register_op(op: ElasticOp) -> ElasticOp:
    """Register ``op``; ops registered later are tried first (a user's op can override a built-in one).

    The op's mixin learns its ports from the declaration (``_ports``, ``_port_attrs``, ``_port_blocks``), so the
    slicing rule and the declaration cannot drift apart.

    Example:
        >>> from lightning_supernet.elastic.linear import ElasticLinear
        >>> class MyLinear(nn.Linear):
        ...     pass
        >>> op = register_op(ElasticOp("MyLinear", (MyLinear,), "transform", op_for(nn.Linear(1, 1)).ports,
        ...                            ElasticLinear))
        >>> op_for(MyLinear(2, 2)).name
        'MyLinear'
        >>> _OPS.remove(op)
    """
    ports = dict(getattr(op.mixin, "_ports", {}))
    attrs = dict(getattr(op.mixin, "_port_attrs", {}))
    blocks = dict(getattr(op.mixin, "_port_blocks", {}))
    for name, port in op.ports.items():
        ports[name], attrs[name] = port.tensors, port.active
        if port.blocks:
            blocks[name] = port.blocks
    op.mixin._ports, op.mixin._port_attrs, op.mixin._port_blocks = ports, attrs, blocks
    _OPS.insert(0, op)
    return op


def registered_ops() -> list[ElasticOp]:
    """Every registered op, most recently registered first (the built-in ones are loaded on first use).

    Example:
        >>> "Conv2d" in {op.name for op in registered_ops()}
        True
    """
    global _LOADED
    if not _LOADED:
        _LOADED = True
        importlib.import_module("lightning_supernet.elastic")  # the built-in ops register themselves
    return list(_OPS)


def op_for(module: nn.Module) -> ElasticOp | None:
    """The op that covers ``module`` (its original class, if it was made elastic), or ``None``.

    Example:
        >>> op_for(nn.ReLU()) is None
        True
    """
    cls = type(module).__dict__.get("_original_class", type(module))
    names = None
    for op in registered_ops():
        classes = tuple(t for t in op.types if isinstance(t, type))
        if classes and issubclass(cls, classes) and op.accepts(module):
            return op
        if len(classes) < len(op.types):  # types named by "module.QualName": matched without importing them
            names = names if names is not None else {qualified_name(c) for c in cls.__mro__}
            if any(t in names for t in op.types if isinstance(t, str)) and op.accepts(module):
                return op
    return None


def qualified_name(cls: type) -> str:
    """``"module.QualName"`` of a class: how an op names a type it must not import (``transformers``' Conv1D).

    Example:
        >>> qualified_name(nn.Linear)
        'torch.nn.modules.linear.Linear'
    """
    return f"{cls.__module__}.{cls.__qualname__}"


def class_named(module: nn.Module, name: str) -> type | None:
    """The class called ``name`` (``"module.QualName"``) among ``module``'s original class and its bases.

    Example:
        >>> class_named(nn.Linear(1, 1), "torch.nn.modules.module.Module").__name__
        'Module'
    """
    cls = type(module).__dict__.get("_original_class", type(module))
    return next((c for c in cls.__mro__ if qualified_name(c) == name), None)


def same_forward(module: nn.Module, cls: type) -> bool:
    """Whether ``module`` (by its original class) runs ``cls.forward`` unchanged: a subclass with a ``forward`` of
    its own may do anything with its weights, so it is not sliced as ``cls``.

    Example:
        >>> same_forward(nn.Linear(1, 1), nn.Linear)
        True
    """
    original = type(module).__dict__.get("_original_class", type(module))
    return original.forward is cls.forward


def _value(module: nn.Module, spec: str | Callable[[nn.Module], int]) -> int:
    value: Any = spec(module) if callable(spec) else getattr(module, spec)
    return int(value[0] if isinstance(value, (tuple, list)) else value)
