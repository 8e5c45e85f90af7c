"""Coupled ports: which producers, consumers and channel-wise modules read or write the same channels.

The DepGraph idea on the traced autograd graph: walk backward from every consumer's input and forward from every
producer's output, following the channels through the operations between modules
(:mod:`lightning_supernet.ir.channels`). Ports reached together are unioned into one group; a walk that meets
something it cannot slice (a reshape that mixes channels with other dims, a per-channel parameter, the model's
input or output) leaves the group fixed, with the reason in words.

A consumer may read each channel as several consecutive input features (a ``Linear`` after ``flatten`` of a
``[N, C, H, W]`` map reads ``H*W`` features a channel): its **scale**, kept per port.

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_supernet.ir.graph import trace
    >>> cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    >>> c = couple(cnn, trace(cnn, torch.randn(1, 1, 8, 8)))
    >>> [sorted(ports) for ports in c.groups().values()][0], c.scales
    ([('0', 'out'), ('4', 'in')], {('4', 'in'): 9})
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_supernet.ir.channels import Layout, back_through, through
from lightning_supernet.ir.graph import Call, ModuleGraph
from lightning_supernet.ir.words import op_in_words
from lightning_supernet.ops import op_for

__all__ = ["Couplings", "couple", "segment_port"]

Port = tuple[str, str]


def segment_port(path: str, offset: int, span: int) -> Port:
    """The input port of ``path`` for the channels ``[offset, offset + span)`` of a concatenation it reads
    (``span=0``: its whole input, the plain ``"in"`` port).

    Example:
        >>> segment_port("fc", 8, 4), segment_port("fc", 0, 0)
        (('fc', 'in@8+4'), ('fc', 'in'))
    """
    return (path, f"in@{offset}+{span}") if span else (path, "in")


class Couplings:
    """Union-find over ports ``(path, "out"|"in"|"ch")`` with a 'frozen because' reason per set and the scale of
    each consumer port (input features per channel; 1 when not listed).

    Example:
        >>> c = Couplings(); c.union(("fc1", "out"), ("fc2", "in")); c.find(("fc2", "in"))
        ('fc1', 'out')
    """

    def __init__(self) -> None:
        self.parent: dict[Port, Port] = {}
        self.reason: dict[Port, str] = {}
        self.scales: dict[Port, int] = {}

    def find(self, p: Port) -> Port:
        """The representative of ``p``'s set."""
        self.parent.setdefault(p, p)
        while self.parent[p] != p:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def union(self, a: Port, b: Port) -> None:
        """Merge the sets of ``a`` and ``b`` (keeping a reason either had)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.reason:
                self.reason.setdefault(ra, self.reason.pop(rb))

    def freeze(self, p: Port, why: str) -> None:
        """Leave ``p``'s set fixed because ``why`` (the first reason stays)."""
        self.reason.setdefault(self.find(p), why)

    def scale(self, p: Port, value: int) -> None:
        """Record that port ``p`` reads ``value`` entries per channel; a second, different value freezes it."""
        if self.scales.setdefault(p, value) != value:
            self.freeze(p, f"`{p[0]}` reads its channels at two different strides ({self.scales[p]} and {value})")

    def groups(self) -> dict[Port, list[Port]]:
        """Representative -> the ports of its set."""
        members: dict[Port, list[Port]] = {}
        for port in list(self.parent):
            members.setdefault(self.find(port), []).append(port)
        return members


class _Segment:
    """What a backward walk found for one segment of the origin's channels."""

    def __init__(self) -> None:
        self.ports: set[Port] = set()
        self.scales: set[int] = set()
        self.why: str | None = None

    @property
    def scale(self) -> int | None:
        return next(iter(self.scales)) if len(self.scales) == 1 else None


class _Walker:
    def __init__(self, model: nn.Module, graph: ModuleGraph) -> None:
        self.graph = graph
        self.mods = dict(model.named_modules())
        self.kinds = {c.path: _kind(self.mods[c.path]) for c in graph.calls if graph.is_unit(c.path)}

    def _dim(self, path: str, rank: int) -> int:
        return op_for(self.mods[path]).channel_dim % max(rank, 1)

    def _describe(self, call: Call) -> str:
        return f"`{call.path}` ({self.graph.modules[call.path].cls_name})"

    def back(self, start: Any, layout: Layout, origin: str) -> dict[tuple[int, int], _Segment]:
        """Ports reached backward from ``start`` (whose channels are in ``layout``), per segment of the origin's
        channels (``(0, 0)``: all of them; ``(offset, span)``: one input of a concatenation along the channels),
        each with the origin's scale (entries per channel it reads) and a reason if its walk hits something
        unsliceable."""
        stack, seen, segments = [(start, layout)], set(), {}
        while stack:
            node, lay = stack.pop()
            if node is None or (node, lay) in seen:
                continue
            seen.add((node, lay))
            seg = segments.setdefault((lay.offset, lay.span), _Segment())
            if node in self.graph.input_nodes:
                seg.why = seg.why or "reaches a model input"
                continue
            if type(node).__name__ == "AccumulateGrad":
                seg.why = seg.why or f"is multiplied/added with a parameter of shape {tuple(node.variable.shape)}"
                continue
            call = self.graph.leaf_call_owning(node)
            if call is not None and call.path != origin:
                kind = self.kinds.get(call.path)
                if node not in call.out_nodes or kind is None:
                    seg.why = seg.why or f"passes through {self._describe(call)}"
                elif lay.dim != self._dim(call.path, len(call.out_shapes[0])):
                    seg.why = seg.why or f"has its channels in another dim than {self._describe(call)} makes them"
                elif kind == "channelwise":
                    seg.ports.add((call.path, "ch"))
                    seg.scales.add(lay.unit)
                    if call.in_nodes:
                        stack.append((call.in_nodes[0], lay._replace(dim=self._dim(call.path,
                                                                                   len(call.in_shapes[0])))))
                else:
                    seg.ports.add((call.path, "out"))
                    seg.scales.add(lay.unit)
                continue
            result = back_through(node, lay)
            if isinstance(result, str):
                seg.why = seg.why or result or op_in_words(node)
                continue
            stack.extend((node.next_functions[i][0], new) for i, new in result)
        for seg in segments.values():
            if len(seg.scales) > 1:
                seg.why = seg.why or f"reads its channels at different strides {sorted(seg.scales)}"
        # the walk passes through the whole reader's layout before it splits at a concatenation: keep what it found
        return {key: seg for key, seg in segments.items()
                if seg.ports or seg.why or (key == (0, 0) and len(segments) == 1)}

    def forward(self, start: Any, layout: Layout, origin: str, ports: dict[Port, int]) -> str | None:
        """Ports reached forward from ``start`` (whose channels are in ``layout``), each with the entries per
        channel it reads; returns a reason if the walk hits something unsliceable."""
        stack, seen, why = [(start, layout)], set(), None
        while stack:
            node, lay = stack.pop()
            if (node, lay) in seen:
                continue
            seen.add((node, lay))
            if node in self.graph.output_nodes:
                why = why or "is the model's output"
            for parent in self.graph.parents.get(node, ()):
                call = self.graph.leaf_call_owning(parent)
                if call is not None and call.path == origin:
                    continue
                if call is not None:
                    kind = self.kinds.get(call.path)
                    if kind not in ("transform", "channelwise") or not call.in_nodes or call.in_nodes[0] is not node:
                        why = why or f"feeds {self._describe(call)}"
                    elif lay.dim != self._dim(call.path, len(call.in_shapes[0])):
                        why = why or f"reaches {self._describe(call)} with its channels in another dim"
                    elif kind == "transform":
                        ports[segment_port(call.path, lay.offset, lay.span)] = lay.unit
                    elif lay.span:
                        why = why or ("is concatenated with other tensors along its channels before "
                                      f"{self._describe(call)}")
                    elif lay.unit != 1:
                        why = why or f"reaches {self._describe(call)} flattened with other dims"
                    else:
                        ports[(call.path, "ch")] = 1
                        stack.append((call.out_nodes[0], Layout(self._dim(call.path, len(call.out_shapes[0])))))
                    continue
                for i, (child, _) in enumerate(parent.next_functions):
                    if child is not node:
                        continue
                    result = through(parent, i, lay)
                    if isinstance(result, str):
                        why = why or result or op_in_words(parent)
                    else:
                        stack.append((parent, result))
        return why


def _kind(module: nn.Module) -> str | None:
    op = op_for(module)
    return None if op is None or op.internal else op.role


def couple(model: nn.Module, graph: ModuleGraph) -> Couplings:
    """Walk from every producer, consumer and channel-wise module of the traced ``graph`` and union what each
    walk reaches (see the module docstring).

    Example:
        >>> import torch
        >>> from lightning_supernet.ir.graph import trace
        >>> mlp = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4))
        >>> c = couple(mlp, trace(mlp, torch.randn(2, 4)))
        >>> c.find(("2", "in")) == c.find(("0", "out")), c.reason[c.find(("0", "in"))]
        (True, '`0` reaches a model input')
    """
    walker = _Walker(model, graph)
    found = Couplings()
    for call in graph.calls:
        op = op_for(walker.mods[call.path])
        if op is not None and op.internal:  # a width inside the module (MoE experts): a group of its own
            found.union((call.path, "out"), (call.path, "in"))
            continue
        kind = walker.kinds.get(call.path)
        if kind not in ("transform", "channelwise") or not call.out_nodes:
            continue
        out_port = (call.path, "ch" if kind == "channelwise" else "out")
        in_port = (call.path, "ch" if kind == "channelwise" else "in")
        found.find(out_port)
        reached: dict[Port, int] = {}
        why = walker.forward(call.out_nodes[0], Layout(walker._dim(call.path, len(call.out_shapes[0]))), call.path,
                             reached)
        for port, scale in reached.items():
            found.union(out_port, port)
            if port[1] == "in":
                found.scale(port, scale)
        if why:
            found.freeze(out_port, f"`{call.path}` {why}")
        start = call.in_nodes[0] if call.in_nodes else None
        if start is None:
            found.freeze(in_port, f"`{call.path}` has no traced input")
            continue
        segments = walker.back(start, Layout(walker._dim(call.path, len(call.in_shapes[0]))), call.path)
        split = [s for s in segments if s != (0, 0)]
        if not split or kind != "transform" or (0, 0) in segments:
            found.find(in_port)
        if split and (kind != "transform" or (0, 0) in segments):
            # a channel-wise module after a concatenation, or a reader mixing concatenated and whole channels
            for seg in segments.values():
                seg.why = seg.why or "is concatenated from several tensors along its channels"
        for (offset, span), seg in segments.items():
            port = in_port if (offset, span) == (0, 0) or seg.why and kind != "transform" else \
                segment_port(call.path, offset, span)
            for p in seg.ports:
                found.union(port, p)
            why = seg.why
            if seg.scale is not None and kind == "transform":
                found.scale(port, seg.scale)
            elif seg.scale is not None and seg.scale != 1:
                why = why or "is flattened with other dims before it"
            if why:
                found.freeze(port, f"`{call.path}` {why}")
    return found
