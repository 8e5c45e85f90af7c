"""Building a supernet from a discovery: the search space's dims and the setters that apply a config.

Example:
    >>> import torch
    >>> from lightning_supernet.ir.discover import discover
    >>> from lightning_supernet.ir.graph import trace
    >>> from lightning_supernet.models import TinyViT
    >>> from lightning_supernet.space import SpaceOptions
    >>> m = TinyViT(dim=32, depth=2, num_heads=2)
    >>> space = build_space(discover(m, trace(m, torch.randn(1, 1, 8, 8))), SpaceOptions())
    >>> sorted({d.kind for d in space.dims.values()})
    ['depth', 'heads', 'width']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_supernet.elastic import SkippableBlock, make_elastic, mixin_for
from lightning_supernet.errors import SearchSpaceError
from lightning_supernet.ir.discover import Discovery
from lightning_supernet.space import Dim, SearchSpace, SpaceOptions

__all__ = ["build_space", "candidate_dims", "make_appliers"]


def candidate_dims(found: Discovery) -> list[Dim]:
    """Every dim discovery found, before ``space=`` options select and size them."""
    dims = [Dim(b.name, "depth", (True, False), stack=b.stack) for b in found.blocks]
    dims += [Dim(h.name, "heads", (h.spec.num_heads,), block=h.block) for h in found.heads]
    dims += [Dim(w.name, "width", (w.size,), block=w.block) for w in found.widths]
    return dims


def _ratios_to_choices(full: int, ratios: tuple[float, ...], step: int) -> tuple[int, ...]:
    values = set()
    for r in ratios:
        v = int(round(r * full / step)) * step
        values.add(min(full, max(step, v)))
    values.add(full)
    return tuple(sorted(values, reverse=True))


def build_space(found: Discovery, opts: SpaceOptions) -> SearchSpace:
    """The search space of a discovery under ``opts`` (choices from ratios or explicit lists)."""
    dims: list[Dim] = []
    order: list[tuple[str, Dim]] = []
    for h in found.heads:
        if opts.selects(h.name, "heads"):
            g = h.spec.kv_group
            choices = opts.explicit_choices(h.name) or _ratios_to_choices(h.spec.num_heads, opts.head_ratios, g)
            _check_choices(h.name, choices, h.spec.num_heads, g)
            order.append((h.path, Dim(h.name, "heads", tuple(choices), block=h.block)))
    for w in found.widths:
        if opts.selects(w.name, "width"):
            step = opts.round_to if w.size % opts.round_to == 0 and w.size >= 4 * opts.round_to else 1
            choices = opts.explicit_choices(w.name) or _ratios_to_choices(w.size, opts.width_ratios, step)
            _check_choices(w.name, choices, w.size, 1)
            order.append((w.producers[0], Dim(w.name, "width", tuple(choices), block=w.block)))
    stacks: dict[str, tuple[int, int]] = {}
    for b in found.blocks:
        if opts.selects(b.name, "depth"):
            order.append((b.path, Dim(b.name, "depth", (True, False), stack=b.stack)))
            length = found.stacks[b.stack]
            stacks[b.stack] = (length, opts.min_kept(length))
    # model order (the order of ``named_modules()``, so ``blocks.2`` comes before ``blocks.10``): a block's keep
    # flag first, then the dims inside it
    position = found.order
    order.sort(key=lambda item: (position.get(item[0], len(position)), item[1].kind != "depth"))
    dims = [d for _, d in order]
    return SearchSpace(dims, stacks, keep_prob=opts.keep_prob)


def _check_choices(name: str, choices: tuple, full: int, multiple: int) -> None:
    for v in choices:
        if not isinstance(v, int) or isinstance(v, bool) or not (1 <= v <= full) or v % multiple:
            allowed = f"ints in [1, {full}]" + (f" that are multiples of {multiple}" if multiple > 1 else "")
            raise SearchSpaceError(f"`space['choices']` gives dim `{name}` the choice {v!r}; allowed: {allowed}")


_OUT = {"linear": "active_out_features", "conv": "active_out_channels"}
_IN = {"linear": "active_in_features", "conv": "active_in_channels"}


def _port_attr(mod: nn.Module, port: str) -> str:
    if port == "ch":
        return "active_out_channels" if isinstance(mod, nn.Conv2d) else "active_num_features"
    kind = "linear" if isinstance(mod, nn.Linear) else "conv"
    return (_OUT if port == "out" else _IN)[kind]


class _WidthSetter:
    """Sets the active width on every port of a group (an object, not a closure, so deepcopy/pickle of the
    supernet re-point it at the copied modules)."""

    def __init__(self, targets: list[tuple[nn.Module, str]], full: int) -> None:
        self.targets, self.full = targets, full

    def __call__(self, value: int) -> None:
        v = None if value == self.full else value
        for mod, attr in self.targets:
            setattr(mod, attr, v)


class _HeadSetter:
    """Slices q/k/v (or fused qkv) rows and output-projection columns head by head; sets the head attributes."""

    def __init__(self, anchor: nn.Module, spec) -> None:
        self.anchor, self.spec = anchor, spec
        self.q, self.k, self.v, self.qkv, self.o = (anchor.get_submodule(p) if p else None
                                                    for p in (spec.q, spec.k, spec.v, spec.qkv, spec.o))
        self.originals = {(p, a): getattr(anchor.get_submodule(p) if p else anchor, a)
                          for p, a in spec.head_attrs + spec.size_attrs + spec.kv_attrs}
        if self.qkv is not None:
            self.qkv.out_blocks = 3

    def __call__(self, heads: int) -> None:
        spec = self.spec
        full = heads == spec.num_heads
        width = None if full else heads * spec.head_dim
        kv = None if full else heads // spec.kv_group * spec.head_dim
        for lin, w in ((self.q, width), (self.qkv, width), (self.k, kv), (self.v, kv)):
            if lin is not None:
                lin.active_out_features = w
        self.o.active_in_features = width
        values = {**{key: heads for key in spec.head_attrs}, **{key: heads * spec.head_dim for key in spec.size_attrs},
                  **{key: heads // spec.kv_group for key in spec.kv_attrs}}
        for (p, a), value in values.items():
            target = self.anchor.get_submodule(p) if p else self.anchor
            setattr(target, a, self.originals[(p, a)] if full else value)


class _KeepSetter:
    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, value: bool) -> None:
        self.block.skipped = not value


def make_appliers(model: nn.Module, found: Discovery, space: SearchSpace) -> dict[str, Callable[[Any], None]]:
    """Make the space's modules elastic (in place) and return ``dim name -> apply(value)``."""
    appliers: dict[str, Callable[[Any], None]] = {}
    for w in found.widths:
        if w.name not in space.dims:
            continue
        targets = []
        for ports, port in ((w.producers, "out"), (w.consumers, "in"), (w.channelwise, "ch")):
            for path in ports:
                mod = model.get_submodule(path)
                make_elastic(mod, mixin_for(mod))
                targets.append((mod, _port_attr(mod, port)))
        appliers[w.name] = _WidthSetter(targets, w.size)
    for h in found.heads:
        if h.name not in space.dims:
            continue
        anchor = model.get_submodule(h.path)
        for p in (h.spec.q, h.spec.k, h.spec.v, h.spec.qkv, h.spec.o):
            if p:
                make_elastic(anchor.get_submodule(p), mixin_for(anchor.get_submodule(p)))
        appliers[h.name] = _HeadSetter(anchor, h.spec)
    for b in found.blocks:
        if b.name not in space.dims:
            continue
        block = model.get_submodule(b.path)
        make_elastic(block, SkippableBlock, skip_output_len=b.out_len)
        appliers[b.name] = _KeepSetter(block)
    return appliers
