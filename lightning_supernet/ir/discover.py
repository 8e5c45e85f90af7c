"""Discovery: which dims of a traced model can shrink, which together, and which blocks can be skipped.

No model-specific code: everything comes from the IR (:mod:`lightning_supernet.ir.graph`).

* **Width groups** (the DepGraph idea, :mod:`lightning_supernet.ir.couplings`): walk the autograd graph backward
  from every consumer's input and forward from every producer's output, following the channels through the
  operations between modules (activations, gating products, pooling, spatial means, ``flatten``, permutes:
  :mod:`lightning_supernet.ir.channels`). Producers (``Linear``/``Conv2d`` outputs), consumers (their inputs) and
  channel-wise modules (BatchNorm, depthwise conv, LayerNorm) reached together form one group and shrink together.
  A group that touches anything else (a reshape that mixes channels with other dims, a concat along the channels,
  a per-channel parameter, a residual stream that reaches the model's input, the model's output) is frozen, with
  the reason kept.
* **Heads** through the head adapters (:mod:`lightning_supernet.ir.heads`).
* **Skippable blocks** (module-wise pruning by edge contraction): members of a ``ModuleList``/``Sequential``
  called once, whose output has the input's shape, with an identity path from output back to input (a residual
  connection), and whose inner results are used nowhere outside the block.

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_supernet.ir.graph import trace
    >>> mlp = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4))
    >>> d = discover(mlp, trace(mlp, torch.randn(2, 4)))
    >>> [(w.producers, w.consumers, w.size) for w in d.widths]
    [(('0',), ('2',), 16)]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from lightning_supernet.ir.block_outputs import extra_outputs_read, skip_output
from lightning_supernet.ir.couplings import couple
from lightning_supernet.ir.graph import Call, ModuleGraph, seq_nr
from lightning_supernet.ir.heads import HeadSpec, find_head_specs, looks_like_attention
from lightning_supernet.ops import op_for

__all__ = ["Discovery", "HeadGroup", "SkipBlock", "WidthGroup", "discover", "module_kind"]

_NAME = re.compile(r"^(.*?)Backward\d*$")


def _op_name(node: Any) -> str:
    """``AddBackward0`` -> ``Add``."""
    m = _NAME.match(type(node).__name__)
    return m.group(1) if m else ""


def module_kind(module: nn.Module) -> str | None:
    """The role of the registered elastic op covering ``module`` (:mod:`lightning_supernet.ops`): ``"transform"``
    (produces and consumes a width: Linear, Conv2d), ``"channelwise"`` (BatchNorm, LayerNorm, depthwise/grouped
    conv) or ``"heads"``; ``None`` for a module no op slices (a subclass with its own ``forward`` is opaque).

    Example:
        >>> module_kind(nn.Linear(2, 2)), module_kind(nn.BatchNorm2d(3)), module_kind(nn.Embedding(3, 2))
        ('transform', 'channelwise', None)
    """
    op = op_for(module)
    return None if op is None or op.internal else op.role


@dataclass(frozen=True)
class WidthGroup:
    """Coupled dims that shrink together (one elastic width).

    Attributes:
        name: the dim's name in the search space.
        size: the full width.
        producers: modules whose output features/channels are in the group.
        consumers: modules whose input features/channels are in the group.
        channelwise: BatchNorm/LayerNorm/depthwise modules sliced along the group.
        block: the enclosing skippable block, if any (a skipped block makes the width irrelevant).
        multiple: every active width is a multiple of this (a grouped convolution shrinks in whole groups).
        scales: ``(consumer, features per channel)`` for consumers that read each channel as several consecutive
            input features (a ``Linear`` after ``flatten`` of a ``[N, C, H, W]`` map: ``H*W``); 1 when not listed.
        offsets: ``(consumer, offset)`` for consumers that read the group's channels as the segment
            ``[offset, offset + size)`` of a concatenation along the channels (GoogLeNet, SqueezeNet).

    Example:
        >>> WidthGroup("fc1.width", 64, ("fc1",), ("fc2",), ()).members
        ('fc1', 'fc2')
        >>> WidthGroup("conv.width", 8, ("conv",), ("fc",), (), scales=(("fc", 16),)).scale("fc")
        16
    """

    name: str
    size: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    channelwise: tuple[str, ...]
    block: str | None = None
    multiple: int = 1
    scales: tuple[tuple[str, int], ...] = ()
    offsets: tuple[tuple[str, int], ...] = ()

    def scale(self, path: str) -> int:
        """Entries per channel member ``path`` reads or writes (1 but for flattened consumers)."""
        return dict(self.scales).get(path, 1)

    def offset(self, path: str) -> int | None:
        """Where this group's channels start in consumer ``path``'s input when it reads a concatenation along the
        channels (each input of the concatenation is its own group, a segment of the consumer's input); ``None``:
        the consumer reads the group's channels alone."""
        return dict(self.offsets).get(path)

    @property
    def members(self) -> tuple[str, ...]:
        """Every module path in the group."""
        return self.producers + self.consumers + self.channelwise


@dataclass(frozen=True)
class HeadGroup:
    """The heads of one attention module.

    Attributes:
        spec: the layout in use; candidates: the other layouts the adapter proposed, tried in order when
            verification rejects the current one.

    Example:
        >>> HeadGroup("attn.heads", "attn", HeadSpec(4, 4, 8, o="proj", qkv="qkv")).spec.num_heads
        4
    """

    name: str
    path: str
    spec: HeadSpec
    block: str | None = None
    candidates: tuple[HeadSpec, ...] = ()

    def next_candidate(self) -> HeadGroup:
        """This group with its next candidate layout (after the current one failed verification)."""
        return replace(self, spec=self.candidates[0], candidates=self.candidates[1:])


@dataclass(frozen=True)
class SkipBlock:
    """A residual block that can be contracted to an edge (skipped).

    Attributes:
        path: the block. stack: its container. index: position in the container.
        out_len: ``None`` if the block returns a tensor, else the length of its output tuple (or a template naming
            the inputs it passes on, see ``SkippableBlock.skip_output_len``).
        mode: ``"identity"`` (the block adds its own residual: skipped, it returns its input) or ``"zero"`` (the
            caller adds the residual, ``h = h + block(h)``: skipped, it returns zeros).

    Example:
        >>> SkipBlock("blocks.3", "blocks", 3, None).name
        'blocks.3.keep'
    """

    path: str
    stack: str
    index: int
    out_len: int | tuple | None
    mode: str = "identity"

    @property
    def name(self) -> str:
        """The dim's name in the search space."""
        return f"{self.path}.keep"


@dataclass
class Discovery:
    """What :func:`discover` found.

    Attributes:
        widths, heads, blocks: the elastic dims.
        stacks: container path -> number of children (kept + skippable).
        frozen: dims considered and left fixed, with the reason (``{"blocks.0.attn.qkv.out": "reshape..."}``).
        unsupported: attention-like modules no head adapter recognises (path -> class name).
        order: module path -> position in ``model.named_modules()`` (model order: ``blocks.2`` before
            ``blocks.10``); dims are listed and stacks are ordered by it, never by the path's string.

    Example:
        >>> Discovery().widths
        []
    """

    widths: list[WidthGroup] = field(default_factory=list)
    heads: list[HeadGroup] = field(default_factory=list)
    blocks: list[SkipBlock] = field(default_factory=list)
    stacks: dict[str, int] = field(default_factory=dict)
    frozen: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)

    def retry(self, names: set[str]) -> Discovery:
        """A copy where the head groups ``names`` move on to their next candidate layout.

        Example:
            >>> spec = HeadSpec(2, 2, 4, o="proj", qkv="qkv")
            >>> d = Discovery(heads=[HeadGroup("a.heads", "a", spec, candidates=(replace(spec, layout="head"),))])
            >>> d.retry({"a.heads"}).heads[0].spec.layout
            'head'
        """
        heads = [h.next_candidate() if h.name in names and h.candidates else h for h in self.heads]
        return replace(self, heads=heads)

    def without(self, reasons: dict[str, str]) -> Discovery:
        """A copy with the dims named in ``reasons`` left fixed (moved to :attr:`frozen` with their reason).

        Example:
            >>> d = Discovery(widths=[WidthGroup("fc1.width", 8, ("fc1",), ("fc2",), ())])
            >>> d.without({"fc1.width": "crashes"}).frozen
            {'fc1.width': 'crashes'}
        """
        return Discovery(
            widths=[w for w in self.widths if w.name not in reasons],
            heads=[h for h in self.heads if h.name not in reasons],
            blocks=[b for b in self.blocks if b.name not in reasons],
            stacks=dict(self.stacks), frozen={**self.frozen, **reasons}, unsupported=dict(self.unsupported),
            order=self.order,
        )


class _Kinds:
    """The registered role of every traced leaf module, and which leaf call owns an autograd node."""

    def __init__(self, model: nn.Module, graph: ModuleGraph) -> None:
        self.graph = graph
        self.mods = dict(model.named_modules())
        self.kinds = {c.path: module_kind(self.mods[c.path]) for c in graph.calls if graph.is_unit(c.path)}

    def owner(self, node: Any) -> Call | None:
        return self.graph.leaf_call_owning(node)


def _port_size(mod: nn.Module, port: str) -> int:
    return op_for(mod).port_size(mod, port)


def _port_multiple(mod: nn.Module, port: str) -> int:
    return op_for(mod).port_multiple(mod, port)


def discover(model: nn.Module, graph: ModuleGraph, residual: bool = False) -> Discovery:
    """Find width groups, head groups and skippable blocks of ``model`` from its traced ``graph``.

    Args:
        model: the traced model (its modules are inspected, not changed).
        graph: from :func:`lightning_supernet.ir.graph.trace`.
        residual: also make residual streams elastic (a group that spans several skippable blocks, such as a
            CNN stage's channels); off by default since it changes every block of the stream at once.

    Example:
        >>> import torch
        >>> from lightning_supernet.ir.graph import trace
        >>> lin = nn.Linear(3, 3); discover(lin, trace(lin, torch.randn(1, 3))).widths
        []
    """
    found = Discovery(order={path: i for i, path in enumerate(graph.modules)})
    walker = _Kinds(model, graph)
    groups = couple(model, graph)
    found.blocks, found.stacks = _skippable_blocks(model, graph, walker)
    _head_groups(model, graph, found)
    claimed = {_join(h.path, p) for h in found.heads for p in h.spec.paths}
    for root, ports in groups.groups().items():
        ports.sort(key=lambda p: graph.modules[p[0]].calls[0])
        label = f"{ports[0][0]}.{ports[0][1]}"
        producers = tuple(p for p, k in ports if k == "out")
        consumers = tuple(p for p, k in ports if k.startswith("in"))
        channel = tuple(p for p, k in ports if k == "ch")
        # a consumer of a concatenation reads this group's channels as one segment of its input: "in@offset+span"
        offsets = tuple((p, int(k[3:].split("+")[0])) for p, k in ports if k.startswith("in@"))
        spans = {(p, k): int(k.split("+")[1]) for p, k in ports if k.startswith("in@")}
        scales = {p: groups.scales.get(p, 1) for p in ports}
        sizes = {spans.get((p, k)) or _port_size(walker.mods[p], k) // scales[(p, k)] for p, k in ports}
        why = groups.reason.get(root)
        if why is None and any(_port_size(walker.mods[p], k.split('@')[0]) % scales[(p, k)] for p, k in ports):
            why = "is read flattened with dims it does not divide"
        if why is None and len(set(consumers)) < len(consumers):
            why = "is read twice by one module (concatenated with itself)"
        if why is None and (not producers or not consumers):
            why = "has no producer/consumer pair"
        if why is None and len(sizes) > 1:
            why = f"couples dims of different sizes {sorted(sizes)}"
        if why is None and any(p in claimed for p, _ in ports):
            why = "belongs to attention heads"
        block = _enclosing_block(found.blocks, producers + consumers + channel)
        if why is None and not residual and block is None and any(
            _enclosing_block(found.blocks, (p,)) for p, _ in ports
        ):
            why = "is a residual stream across blocks (opt in with `space={'residual': True}`)"
        if why:
            found.frozen[label] = why
            continue
        multiple = math.lcm(*(_port_multiple(walker.mods[p], k.split('@')[0]) for p, k in ports))
        size = sizes.pop()
        if size % multiple:
            found.frozen[label] = f"its width {size} is not a multiple of its groups' size {multiple}"
            continue
        found.widths.append(WidthGroup(f"{producers[0]}.width", size, producers, consumers, channel, block,
                                       multiple, tuple((p, s) for (p, _), s in scales.items() if s != 1), offsets))
    found.heads = [replace(h, block=_enclosing_block(found.blocks, (h.path,))) for h in found.heads]
    return found


def _join(path: str, rel: str) -> str:
    return f"{path}.{rel}" if path and rel else path or rel


def _enclosing_block(blocks: list[SkipBlock], paths: tuple[str, ...]) -> str | None:
    best = None
    for b in blocks:
        if all(p == b.path or p.startswith(b.path + ".") for p in paths):
            if best is None or len(b.path) > len(best):
                best = b.path
    return best


def _head_groups(model: nn.Module, graph: ModuleGraph, found: Discovery) -> None:
    mods = dict(model.named_modules())
    claimed: set[str] = set()
    for path, node in graph.modules.items():
        if not node.calls:
            continue
        specs = find_head_specs(mods[path])
        if not specs:
            continue
        claimed.update(_join(path, p) for p in specs[0].paths)
        if specs[0].fixed:  # recognised, but its design ties the heads (the reason says how)
            found.frozen[f"{path}.heads" if path else "heads"] = specs[0].fixed
            continue
        found.heads.append(HeadGroup(f"{path}.heads" if path else "heads", path, specs[0],
                                     candidates=tuple(specs[1:])))
    for path, node in graph.modules.items():
        mod = mods[path]
        if node.calls and looks_like_attention(mod):
            children = [_join(path, n) for n, _ in mod.named_children()]
            if not any(p in claimed for p in children):
                found.unsupported[path] = type(mod).__name__


def _skippable_blocks(model: nn.Module, graph: ModuleGraph, walker: _Kinds) -> tuple[list[SkipBlock], dict[str, int]]:
    blocks: list[SkipBlock] = []
    stacks: dict[str, int] = {}
    for path, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
            continue
        if isinstance(container, nn.ModuleList) and len({type(c).__dict__.get("_original_class", type(c))
                                                          for c in container}) > 1:
            continue  # a list of different layers is indexed by position (T5Block.layer[-1]), not a stack
        for index, (name, _) in enumerate(container.named_children()):
            child = f"{path}.{name}" if path else name
            node = graph.modules.get(child)
            if node is None or len(node.calls) != 1:
                continue
            call = graph.calls[node.calls[0]]
            weighted = any(walker.kinds.get(p) == "transform" for p in graph.modules if p.startswith(child + "."))
            if not weighted or not _contractible(call, graph):
                continue
            if _is_residual(call, graph, walker):
                blocks.append(SkipBlock(child, path, index, skip_output(call)))
            elif _residual_in_parent(call, graph):
                blocks.append(SkipBlock(child, path, index, skip_output(call), mode="zero"))
    # keep the finest granularity: a block that holds skippable blocks (a whole stage) is not one itself
    blocks = [b for b in blocks if not any(o.path.startswith(b.path + ".") for o in blocks)]
    for b in blocks:
        stacks[b.stack] = len(model.get_submodule(b.stack))
    return blocks, stacks


def _is_residual(call: Call, graph: ModuleGraph, walker: _Kinds) -> bool:
    source, sink = call.in_nodes[0], call.out_nodes[0]
    if source in graph.output_nodes:
        return False
    # an identity path sink -> source through ops of this call that avoid every linear/conv
    stack, seen, identity = [sink], set(), False
    while stack and not identity:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        owner = walker.owner(node)
        if owner is not None and walker.kinds.get(owner.path) == "transform":
            continue
        for child, _ in node.next_functions:
            if child is source and _op_name(node) in ("Add", "Sub"):  # an additive identity path, not a gate
                identity = True
            elif child is not None and (seq := seq_nr(child)) is not None and call.owns(seq):
                stack.append(child)
    return identity


def _contractible(call: Call, graph: ModuleGraph) -> bool:
    """Edge contraction is only valid if nothing outside the block reads the block's inner results."""
    if not call.in_nodes or not call.out_nodes or call.in_nodes[0] is None or call.out_nodes[0] is None:
        return False
    if call.in_shapes[0] != call.out_shapes[0] or call.out_len == -1:
        return False
    if any(call.out_is_tensor[1:]) and extra_outputs_read(call, graph):
        return False
    sink = call.out_nodes[0]
    for node, parents in graph.parents.items():
        seq = seq_nr(node)
        if seq is None or not call.owns(seq) or node is sink:
            continue
        for parent in parents:
            pseq = seq_nr(parent)
            if pseq is not None and not call.owns(pseq):
                return False
    return True


_PASS_THROUGH = {"NativeDropout", "Mul", "Clone", "Alias", "ToCopy", "View", "Div"}


def _residual_in_parent(call: Call, graph: ModuleGraph) -> bool:
    """``h = h + block(h)`` written by the caller (``for layer in self.layers: h = h + layer(h)``): the block's
    output reaches, through dropout or scaling only, an addition whose other operand is the block's own input.
    Skipping such a block means it contributes nothing, so its skipped form returns zeros."""
    source, node = call.in_nodes[0], call.out_nodes[0]
    if source in graph.output_nodes:
        return False
    for _ in range(4):
        parents = graph.parents.get(node, [])
        if len(parents) != 1:
            return False  # the block's output is read elsewhere too: zeroing it would change that reader
        parent = parents[0]
        name = _NAME.match(type(parent).__name__)
        op = name.group(1) if name else ""
        if op == "Add":
            others = [c for c, _ in parent.next_functions if c is not node]
            return len(others) == 1 and others[0] is source
        if op not in _PASS_THROUGH or (seq := seq_nr(parent)) is None or call.owns(seq):
            return False
        node = parent
    return False
