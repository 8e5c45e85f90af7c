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

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_supernet.elastic import HeadSetter, SkippableBlock, guard_fast_paths, make_elastic
from lightning_supernet.elastic.base import segment_ranges
from lightning_supernet.errors import SearchSpaceError
from lightning_supernet.ir.discover import Discovery
from lightning_supernet.ops import op_for
from lightning_supernet.space import Dim, SearchSpace, SpaceOptions

__all__ = ["build_space", "candidate_dims", "elastic_module", "make_appliers"]


def candidate_dims(found: Discovery) -> list[Dim]:
    """Every dim discovery found, before ``space=`` options select and size them.

    Example:
        >>> import torch
        >>> from lightning_supernet.ir.discover import discover
        >>> from lightning_supernet.ir.graph import trace
        >>> mlp = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> [(d.name, d.kind, d.choices) for d in candidate_dims(discover(mlp, trace(mlp, torch.randn(2, 4))))]
        [('0.width', 'width', (16,))]
    """
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
    """The search space of a discovery under ``opts`` (choices from ratios or explicit lists).

    Example:
        >>> import torch
        >>> from lightning_supernet.ir.discover import discover
        >>> from lightning_supernet.ir.graph import trace
        >>> mlp = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> found = discover(mlp, trace(mlp, torch.randn(2, 4)))
        >>> build_space(found, SpaceOptions(width_ratios=(0.5, 1.0), round_to=4)).dims["0.width"].choices
        (16, 8)
    """
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
            step = math.lcm(step, w.multiple) if w.size % math.lcm(step, w.multiple) == 0 else w.multiple
            choices = opts.explicit_choices(w.name) or _ratios_to_choices(w.size, opts.width_ratios, step)
            _check_choices(w.name, choices, w.size, w.multiple)
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
    # the projections of attention heads are the heads' business: their own widths are fixed by design
    heads = {h.path for h in found.heads}
    frozen = {n: why for n, why in found.frozen.items()
              if not any(n.startswith(f"{p}.") and not n.endswith(".heads") for p in heads if p)}
    return SearchSpace(dims, stacks, keep_prob=opts.keep_prob, frozen=frozen)


def _check_choices(name: str, choices: tuple, full: int, multiple: int) -> None:
    for v in choices:
        if not isinstance(v, int) or isinstance(v, bool) or not (1 <= v <= full) or v % multiple:
            allowed = f"ints in [1, {full}]" + (f" that are multiples of {multiple}" if multiple > 1 else "")
            raise SearchSpaceError(f"`space['choices']` gives dim `{name}` the choice {v!r}; allowed: {allowed}")


class _WidthSetter:
    """Sets the active width on every port of a group.

    Modules are looked up by path on every call (an object, not a closure, so deepcopy/pickle of the supernet
    re-point it at the copied model): a module that was replaced since — Lightning's ``sync_batchnorm=True`` swaps
    every BatchNorm for a new ``SyncBatchNorm`` — is made elastic again on the spot, so no subnet runs on a module
    that lost its slicing.
    """

    def __init__(self, model: nn.Module, targets: list[tuple[str, str]], full: int,
                 scales: dict[str, int] | None = None, offsets: dict[str, int] | None = None) -> None:
        self.model, self.full = model, full
        self.targets = []
        for path, port in targets:
            op = op_for(elastic_module(model, path))
            scale = (scales or {}).get(path, 1) if port == "in" else 1
            offset = (offsets or {}).get(path) if port == "in" else None
            self.targets.append((path, op.ports[port].active, op.mixin, scale, offset))

    def __call__(self, value: int) -> None:
        for path, attr, mixin, scale, offset in self.targets:
            mod = self.model.get_submodule(path)
            if not isinstance(mod, mixin):
                mod = elastic_module(self.model, path)
            if offset is not None:  # one segment of a concatenation the consumer reads: keep its first `value`
                segments = {**(mod.in_segments or {}), offset: (self.full, value)}
                mod.in_segments = segments
                setattr(mod, attr, segment_ranges(segments, op_for(mod).port_size(mod, "in")))
                continue
            # a consumer after flatten reads ``scale`` features a channel: it keeps the first value * scale
            setattr(mod, attr, None if value == self.full else value * scale)


class _KeepSetter:
    def __init__(self, model: nn.Module, path: str, out_len: int | None, mode: str) -> None:
        self.model, self.path, self.out_len, self.mode = model, path, out_len, mode

    def __call__(self, value: bool) -> None:
        block = self.model.get_submodule(self.path)
        if not isinstance(block, SkippableBlock):
            make_elastic(block, SkippableBlock, skip_output_len=self.out_len, skip_mode=self.mode)
        block.skipped = not value


def elastic_module(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path``, made elastic by its registered op if it is not (any more).

    Example:
        >>> import torch.nn as nn
        >>> from lightning_supernet.elastic import is_elastic
        >>> m = nn.Sequential(nn.Linear(2, 2)); is_elastic(elastic_module(m, "0"))
        True
    """
    mod = model.get_submodule(path)
    op = op_for(mod)
    if op is None:
        raise TypeError(f"`{path}` ({type(mod).__name__}) has no registered elastic op")
    if not isinstance(mod, op.mixin):
        make_elastic(mod, op.mixin)
    return mod


def make_appliers(model: nn.Module, found: Discovery, space: SearchSpace) -> dict[str, Callable[[Any], None]]:
    """Make the space's modules elastic (in place) and return ``dim name -> apply(value)``.

    Modules whose own ``forward`` reads their children's weights on a fused fast path (``nn.TransformerEncoderLayer``
    and friends, :data:`~lightning_supernet.elastic.fastpath.FAST_PATH_TYPES`) and hold an elastic dim get a guard
    that keeps them on their sliceable path.

    Example:
        >>> import torch
        >>> from lightning_supernet.ir.discover import discover
        >>> from lightning_supernet.ir.graph import trace
        >>> mlp = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> found = discover(mlp, trace(mlp, torch.randn(2, 4)))
        >>> apply = make_appliers(mlp, found, build_space(found, SpaceOptions(width_ratios=(0.5, 1.0))))
        >>> apply["0.width"](8); mlp(torch.randn(2, 4)).shape, mlp[0].active_out_features
        (torch.Size([2, 4]), 8)
    """
    appliers: dict[str, Callable[[Any], None]] = {}
    for w in found.widths:
        if w.name not in space.dims:
            continue
        targets = [(path, port) for ports, port in ((w.producers, "out"), (w.consumers, "in"), (w.channelwise, "ch"))
                   for path in ports]
        for path, _ in targets:
            elastic_module(model, path)
        appliers[w.name] = _WidthSetter(model, targets, w.size, dict(w.scales), dict(w.offsets))
    for h in found.heads:
        if h.name in space.dims:
            appliers[h.name] = HeadSetter(model, h.path, h.spec)
    for b in found.blocks:
        if b.name not in space.dims:
            continue
        make_elastic(model.get_submodule(b.path), SkippableBlock, skip_output_len=b.out_len, skip_mode=b.mode)
        appliers[b.name] = _KeepSetter(model, b.path, b.out_len, b.mode)
    guard_fast_paths(model)
    return appliers
