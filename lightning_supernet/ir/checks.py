"""Checks that reject a subnet before it runs: connectivity and dimension compatibility.

* **At discovery** (:func:`check_discovery`): every width group couples dims of one size (producers' outputs,
  consumers' inputs, channel-wise modules), every head group's projections agree on heads × head_dim, and every
  skippable block maps its input shape to itself, so contracting it to an edge keeps the graph connected and
  every kept consumer sees the dims it expects.
* **Per config** (:func:`check_config`): each stack keeps at least its minimum number of blocks (an all-skipped
  stack would contract a whole stage), widths are within the full size and head counts are whole key/value
  groups.

Example:
    >>> from lightning_supernet.space import Dim, SearchSpace, SubnetConfig
    >>> s = SearchSpace([Dim("b.0.keep", "depth", (True, False), stack="b")], stacks={"b": (1, 1)})
    >>> check_config(s, SubnetConfig({"b.0.keep": False}))
    Traceback (most recent call last):
    ...
    lightning_supernet.errors.SearchSpaceError: stack `b` keeps 0 of 1 blocks; it must keep at least 1 (connectivity)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from lightning_supernet.errors import DiscoveryError, SearchSpaceError
from lightning_supernet.ops import op_for

if TYPE_CHECKING:
    from lightning_supernet.ir.discover import Discovery
    from lightning_supernet.ir.graph import ModuleGraph
    from lightning_supernet.space import SearchSpace, SubnetConfig

__all__ = ["check_config", "check_discovery"]


def check_config(space: SearchSpace, cfg: SubnetConfig) -> None:
    """Reject a config whose subnet would be disconnected or dimension-incompatible.

    Raises:
        SearchSpaceError: naming the stack or dim and what is allowed.

    Example:
        >>> from lightning_supernet.space import Dim, SearchSpace, SubnetConfig
        >>> s = SearchSpace([Dim("b.0.keep", "depth", (True, False), stack="b")], stacks={"b": (2, 1)})
        >>> check_config(s, SubnetConfig({"b.0.keep": False}))  # block b.1 is kept: connected, returns None
    """
    for stack, (length, _) in space.stacks.items():
        names = space.stack_blocks(stack)
        kept = length - len(names) + sum(bool(cfg[n]) for n in names)
        need = length - len(names) + space.min_skippable_kept(stack)
        if kept < need:
            raise SearchSpaceError(
                f"stack `{stack}` keeps {kept} of {length} blocks; it must keep at least {need} (connectivity)"
            )


def check_discovery(model: nn.Module, graph: ModuleGraph, found: Discovery) -> None:
    """Prove the discovered dims compatible on the traced graph (see the module docstring).

    Raises:
        DiscoveryError: a group whose members disagree, or a block that changes the shape.

    Example:
        >>> import torch
        >>> from lightning_supernet.ir.discover import discover
        >>> from lightning_supernet.ir.graph import trace
        >>> mlp = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> graph = trace(mlp, torch.randn(2, 4))
        >>> check_discovery(mlp, graph, discover(mlp, graph))  # fc1.out and fc2.in agree: returns None
    """
    mods = dict(model.named_modules())
    for w in found.widths:
        for ports, port in ((w.producers, "out"), (w.consumers, "in"), (w.channelwise, "ch")):
            for p in ports:
                op = op_for(mods[p])
                size = op.port_size(mods[p], port) if op is not None and port in op.ports else None
                if size is not None and size % w.scale(p) == 0:
                    size //= w.scale(p)  # a consumer reading each channel as several features (after flatten)
                offset = w.offset(p) if port == "in" else None
                if size is not None and offset is not None and offset + w.size <= size:
                    size = w.size  # a consumer reading the group as one segment of a concatenation
                if size != w.size:
                    raise DiscoveryError(f"width group `{w.name}`: `{p}` has {size} on its {port} port, the group "
                                         f"has {w.size}")
    for h in found.heads:
        anchor, spec = mods[h.path], h.spec
        o = anchor.get_submodule(spec.o)
        size = op_for(o).port_size(o, "in")
        if size != spec.num_heads * spec.head_dim:
            raise DiscoveryError(f"head group `{h.name}`: `{spec.o}` takes {size} inputs, expected "
                                 f"{spec.num_heads} heads x {spec.head_dim}")
    for b in found.blocks:
        call = graph.calls[graph.modules[b.path].calls[0]]
        if call.in_shapes[0] != call.out_shapes[0]:
            raise DiscoveryError(f"block `{b.path}` maps {call.in_shapes[0]} to {call.out_shapes[0]}; "
                                 "skipping it would break dimension compatibility")
