"""The search space: elastic dims, their choices, and subnet configs.

A :class:`SubnetConfig` is a frozen, flat, hashable mapping from dim name to value (``int`` widths and head
counts, ``bool`` keep flags for skippable blocks). A :class:`SearchSpace` knows each dim's choices, validates
configs (naming the dim, the value and what is allowed), samples from its own generator and gives each config a
canonical "motif" key: two configs that extract to the same network share it.

Example:
    >>> space = SearchSpace([Dim("fc1.width", "width", (8, 16)), Dim("blocks.1.keep", "depth", (True, False),
    ...                      stack="blocks")], stacks={"blocks": (2, 1)})
    >>> space.num_subnets
    4
    >>> dict(space.smallest())
    {'fc1.width': 8, 'blocks.1.keep': False}
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_supernet.errors import ConfigMismatchError, SearchSpaceError
from lightning_supernet.options import KINDS, SpaceOptions, some_names

__all__ = ["Dim", "SearchSpace", "SpaceOptions", "SubnetConfig"]

class SubnetConfig(Mapping):
    """One subnet: a frozen, flat, hashable mapping ``dim name -> value``.

    Args:
        values: the dims' values.
        fingerprint: the search space it was made for (set by :class:`SearchSpace`; checked on use).

    Example:
        >>> cfg = SubnetConfig({"a.width": 8, "b.keep": True})
        >>> cfg["a.width"], hash(cfg) == hash(SubnetConfig.from_dict(cfg.to_dict()))
        (8, True)
    """

    __slots__ = ("_items", "_map", "fingerprint")

    def __init__(self, values: Mapping[str, Any], fingerprint: str | None = None) -> None:
        self._items = tuple(values.items())
        self._map = dict(self._items)
        self.fingerprint = fingerprint

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SubnetConfig:
        """Build from a plain dict (e.g. Optuna trial params or a JSON file).

        Example:
            >>> SubnetConfig.from_dict({"x.width": 4})["x.width"]
            4
        """
        return cls(dict(values))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict, JSON-serialisable.

        Example:
            >>> SubnetConfig({"x.keep": False}).to_dict()
            {'x.keep': False}
        """
        return dict(self._items)

    def __getitem__(self, key: str) -> Any:
        return self._map[key]

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self._map == dict(other)

    def __repr__(self) -> str:
        return f"SubnetConfig({self._map!r})"

    def __reduce__(self):
        return (SubnetConfig, (self._map, self.fingerprint))


@dataclass(frozen=True)
class Dim:
    """One elastic dimension.

    Attributes:
        name: ``"<module path>.width"``, ``"<module path>.heads"`` or ``"<block path>.keep"``.
        kind: ``"width"``, ``"heads"`` or ``"depth"``.
        choices: allowed values, largest first for widths/heads; ``(True, False)`` for depth.
        block: the skippable block holding this dim (its value is irrelevant when the block is skipped).
        stack: for depth dims, the container of the block.

    Example:
        >>> Dim("fc.width", "width", (16, 8)).largest
        16
    """

    name: str
    kind: str
    choices: tuple
    block: str | None = None
    stack: str | None = None

    @property
    def largest(self) -> Any:
        """The value of the full model."""
        return True if self.kind == "depth" else max(self.choices)

    @property
    def smallest(self) -> Any:
        """The value of the smallest subnet (depth: decided per stack by the minimum depth)."""
        return False if self.kind == "depth" else min(self.choices)


class SearchSpace:
    """The elastic dims of one supernet and the rules that make a valid subnet.

    Args:
        dims: the elastic dims, in model order.
        stacks: ``container path -> (number of blocks, minimum kept)``.
        keep_prob: the chance :meth:`sample` keeps each skippable block.

    Example:
        >>> s = SearchSpace([Dim("w", "width", (4, 8))]); print(s)  # doctest: +NORMALIZE_WHITESPACE
        SearchSpace: 1 elastic dims, 2 subnets
        dim  kind   choices
        w    width  4, 8
    """

    def __init__(self, dims: list[Dim], stacks: Mapping[str, tuple[int, int]] | None = None,
                 keep_prob: float = 0.5, frozen: Mapping[str, str] | None = None) -> None:
        self.dims: dict[str, Dim] = {d.name: d for d in dims}
        #: dims considered and left fixed, with the reason in words (shown by ``print(space)``)
        self.frozen: dict[str, str] = dict(frozen or {})
        self.stacks = dict(stacks or {})
        self.keep_prob = keep_prob
        text = repr([(d.name, d.kind, d.choices) for d in dims]) + repr(sorted(self.stacks.items()))
        self.fingerprint = hashlib.sha1(text.encode()).hexdigest()[:16]
        self._stack_blocks: dict[str, list[str]] = {}
        #: keep-dim -> importance (higher: dropped later); set by :meth:`set_block_priority`, empty: model order
        self.block_priority: dict[str, float] = {}
        for d in dims:
            if d.kind == "depth":
                self._stack_blocks.setdefault(d.stack, []).append(d.name)

    # -- building configs -------------------------------------------------------------------------------------
    def _make(self, values: Mapping[str, Any]) -> SubnetConfig:
        return SubnetConfig({n: values[n] for n in self.dims}, self.fingerprint)

    def largest(self) -> SubnetConfig:
        """The full model.

        Example:
            >>> SearchSpace([Dim("w", "width", (4, 8))]).largest()["w"]
            8
        """
        return self._make({n: d.largest for n, d in self.dims.items()})

    def set_block_priority(self, scores: Mapping[str, float]) -> None:
        """Rank skippable blocks: depth choices (:meth:`smallest`, :meth:`middle`, :meth:`repair`) keep the
        highest-scored blocks and drop the lowest first; unscored blocks rank after scored ones, in model order.

        Example:
            >>> s = SearchSpace([Dim(f"b.{i}.keep", "depth", (True, False), stack="b") for i in range(4)],
            ...                 stacks={"b": (4, 2)})
            >>> s.set_block_priority({"b.0.keep": 0.1, "b.1.keep": 0.9, "b.2.keep": 0.05, "b.3.keep": 0.5})
            >>> [n for n, v in s.smallest().items() if v]
            ['b.1.keep', 'b.3.keep']
        """
        unknown = [n for n in scores if n not in self.dims or self.dims[n].kind != "depth"]
        if unknown:
            raise SearchSpaceError(f"block priority names `{unknown[0]}`, which is no depth dim of this space; "
                                   f"depth dims are e.g. {some_names({n: 0 for s in self._stack_blocks.values() for n in s})}")
        self.block_priority = {n: float(v) for n, v in scores.items()}

    def _by_priority(self, stack: str) -> list[str]:
        """The stack's keep-dims, most important first (model order without a priority)."""
        names = self._stack_blocks[stack]
        return sorted(names, key=lambda n: -self.block_priority.get(n, -math.inf))

    def smallest(self) -> SubnetConfig:
        """Every width and head count at its minimum; each stack keeps its ``min`` most important skippable
        blocks (:meth:`set_block_priority`; by default the first ones).

        Example:
            >>> SearchSpace([Dim("w", "width", (4, 8))]).smallest()["w"]
            4
        """
        values = {n: d.smallest for n, d in self.dims.items()}
        for stack in self._stack_blocks:
            for name in self._by_priority(stack)[: self.min_skippable_kept(stack)]:
                values[name] = True
        return self._make(values)

    def middle(self) -> SubnetConfig:
        """Every width and head count at its median choice; each stack keeps the blocks halfway between its
        minimum and all.

        Example:
            >>> SearchSpace([Dim("w", "width", (4, 8, 16))]).middle()["w"]
            8
        """
        values = {n: sorted(d.choices)[(len(d.choices) - 1) // 2] for n, d in self.dims.items() if d.kind != "depth"}
        for stack, names in self._stack_blocks.items():
            keep = math.ceil((self.min_skippable_kept(stack) + len(names)) / 2)
            values.update({n: i < keep for i, n in enumerate(self._by_priority(stack))})
        return self._make(values)

    def config(self, values: Mapping[str, Any] | None = None, **kwargs: Any) -> SubnetConfig:
        """The largest config with some dims changed; validated.

        Example:
            >>> SearchSpace([Dim("w", "width", (4, 8))]).config(w=4)["w"]
            4
        """
        merged = dict(self.largest())
        merged.update(values or {})
        merged.update(kwargs)
        return self.validate(merged)

    def sample(self, generator: torch.Generator | int | None = None) -> SubnetConfig:
        """A random valid config: uniform widths/heads, each block kept with ``keep_prob``, min depth repaired.
        With a block priority (:meth:`set_block_priority`) the number of kept blocks is drawn the same way, and the
        most important ones are kept (depths are nested: a shallower subnet drops the least important first).

        Args:
            generator: a ``torch.Generator``, a seed, or ``None`` for a fresh OS-seeded generator (the global RNG
                is never used).

        Example:
            >>> s = SearchSpace([Dim("w", "width", (4, 8, 16))])
            >>> s.sample(0) == s.sample(0)
            True
        """
        gen = _generator(generator)
        values: dict[str, Any] = {}
        for name, d in self.dims.items():
            if d.kind == "depth":
                values[name] = bool(torch.rand((), generator=gen).item() < self.keep_prob)
            else:
                values[name] = d.choices[int(torch.randint(len(d.choices), (), generator=gen))]
        if self.block_priority:  # ranked blocks: as many kept as drawn, but the most important ones (nested depths)
            for stack in self._stack_blocks:
                ranked = self._by_priority(stack)
                kept = max(sum(values[n] for n in ranked), self.min_skippable_kept(stack))
                values.update({n: i < kept for i, n in enumerate(ranked)})
        return self.repair(values, gen)

    def repair(self, values: Mapping[str, Any], generator: torch.Generator | int | None = None) -> SubnetConfig:
        """Turn a config whose stacks keep too few blocks into a valid one: the one place of the min-depth rule.

        Each stack below its minimum depth gets back skipped blocks: the most important ones
        (:meth:`set_block_priority`; the earliest in model order by default), or random ones drawn from
        ``generator`` when one is given. The result is validated.

        Example:
            >>> s = SearchSpace([Dim(f"b.{i}.keep", "depth", (True, False), stack="b") for i in range(12)],
            ...                 stacks={"b": (12, 2)})
            >>> [n for n, v in s.repair({n: False for n in s.dims}).items() if v]
            ['b.0.keep', 'b.1.keep']
        """
        values = dict(values)
        gen = None if generator is None else _generator(generator)
        for stack, names in self._stack_blocks.items():
            need = self.min_skippable_kept(stack) - sum(bool(values.get(n, True)) for n in names)
            skipped = [n for n in self._by_priority(stack) if not values.get(n, True)]
            if need <= 0:
                continue
            picks = range(need) if gen is None else torch.randperm(len(skipped), generator=gen)[:need].tolist()
            for i in picks:
                values[skipped[i]] = True
        return self.validate(values)

    # -- checking ---------------------------------------------------------------------------------------------
    def validate(self, cfg: Mapping[str, Any]) -> SubnetConfig:
        """Check a config against this space and return it as a :class:`SubnetConfig` of this space.

        Raises:
            ConfigMismatchError: the config was made for another supernet.
            SearchSpaceError: an unknown or missing dim, a value outside the dim's choices, a stack below its
                minimum depth.

        Example:
            >>> SearchSpace([Dim("w", "width", (4, 8))]).validate({"w": 5})
            Traceback (most recent call last):
            ...
            lightning_supernet.errors.SearchSpaceError: dim `w` has value 5; allowed: 4, 8
        """
        from lightning_supernet.ir.checks import check_config

        fp = getattr(cfg, "fingerprint", None)
        if isinstance(cfg, SubnetConfig) and fp == self.fingerprint:
            return cfg
        if not isinstance(cfg, Mapping):
            raise SearchSpaceError(f"a subnet config must be a mapping of dim -> value, got {type(cfg).__name__}")
        unknown = [k for k in cfg if k not in self.dims]
        if fp is not None and fp != self.fingerprint:
            raise ConfigMismatchError(
                f"this SubnetConfig was made for another supernet (space {fp}, this one is {self.fingerprint})"
                + (f"; e.g. its dim `{unknown[0]}` does not exist here" if unknown else "")
                + ". HINT: build configs with this supernet's `search_space` (largest/smallest/sample/config)."
            )
        if unknown and len(unknown) * 2 > max(len(cfg), 1) and len(cfg) > 1:
            raise ConfigMismatchError(
                f"{len(unknown)} of the config's {len(cfg)} dims are unknown here (e.g. `{unknown[0]}`): was it "
                f"made for another model? This space has {len(self.dims)} dims, e.g. {some_names(self.dims)}"
            )
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self.dims), n=3)
            raise SearchSpaceError(
                f"unknown dim `{unknown[0]}`; " + (f"did you mean {', '.join(close)}? " if close else "")
                + f"this space has {len(self.dims)} dims, e.g. {some_names(self.dims)}"
            )
        missing = [n for n in self.dims if n not in cfg]
        if missing:
            raise SearchSpaceError(
                f"the config has no value for dim `{missing[0]}` ({len(missing)} missing). HINT: "
                "`search_space.config(partial_dict)` fills the others with their largest value"
            )
        for name, value in cfg.items():
            d = self.dims[name]
            if value not in d.choices or isinstance(value, bool) != (d.kind == "depth"):
                raise SearchSpaceError(
                    f"dim `{name}` has value {value!r}; allowed: {', '.join(map(str, sorted(d.choices)))}"
                )
        result = self._make(cfg)
        check_config(self, result)
        return result

    def min_skippable_kept(self, stack: str) -> int:
        """How many of ``stack``'s skippable blocks every subnet keeps (its minimum depth less the fixed blocks).

        Example:
            >>> from lightning_supernet.space import Dim
            >>> s = SearchSpace([Dim("b.0.keep", "depth", (True, False), stack="b"),
            ...                  Dim("b.1.keep", "depth", (True, False), stack="b")], stacks={"b": (3, 2)})
            >>> s.min_skippable_kept("b")  # block b.2 is not skippable: one of the other two stays
            1
        """
        length, min_kept = self.stacks[stack]
        fixed = length - len(self._stack_blocks.get(stack, ()))
        return max(0, min_kept - fixed)

    def stack_blocks(self, stack: str) -> list[str]:
        """The keep-dims of one stack, in order."""
        return list(self._stack_blocks.get(stack, ()))

    # -- motifs and size --------------------------------------------------------------------------------------
    def canonical(self, cfg: Mapping[str, Any]) -> SubnetConfig:
        """The motif key: dims inside skipped blocks set to their largest value, since they do not matter.

        Example:
            >>> s = SearchSpace([Dim("b.keep", "depth", (True, False), stack="s"),
            ...                  Dim("b.fc.width", "width", (4, 8), block="b")], stacks={"s": (2, 0)})
            >>> s.canonical({"b.keep": False, "b.fc.width": 4}) == s.canonical({"b.keep": False, "b.fc.width": 8})
            True
        """
        cfg = self.validate(cfg)
        skipped = {n[: -len(".keep")] for n, d in self.dims.items() if d.kind == "depth" and not cfg[n]}
        values = {n: (d.largest if d.block in skipped else cfg[n]) for n, d in self.dims.items()}
        return self._make(values)

    @property
    def num_subnets(self) -> int:
        """How many valid configs the space holds (keep patterns respecting min depth × width/head choices)."""
        total = 1
        for d in self.dims.values():
            if d.kind != "depth":
                total *= len(d.choices)
        for stack, names in self._stack_blocks.items():
            n, need = len(names), self.min_skippable_kept(stack)
            total *= sum(math.comb(n, k) for k in range(need, n + 1))
        return total

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (for logging).

        Example:
            >>> SearchSpace([Dim("w", "width", (4, 8))]).to_dict()["dims"]["w"]
            {'kind': 'width', 'choices': [4, 8]}
        """
        return {"dims": {n: {"kind": d.kind, "choices": list(d.choices)} for n, d in self.dims.items()},
                "stacks": {s: {"length": n, "min_depth": m} for s, (n, m) in self.stacks.items()},
                "num_subnets": self.num_subnets, "fingerprint": self.fingerprint}

    def __len__(self) -> int:
        return len(self.dims)

    def __str__(self) -> str:
        rows = [(n, d.kind, ", ".join(map(str, sorted(d.choices, key=lambda v: (isinstance(v, bool), v)))))
                for n, d in self.dims.items()]
        w0 = max([len("dim")] + [len(r[0]) for r in rows])
        w1 = max([len("kind")] + [len(r[1]) for r in rows])
        lines = [f"SearchSpace: {len(self.dims)} elastic dims, {self.num_subnets:,} subnets",
                 f"{'dim':<{w0}}  {'kind':<{w1}}  choices"]
        lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        for stack, (n, m) in self.stacks.items():
            lines.append(f"stack `{stack}`: {n} blocks, {len(self._stack_blocks.get(stack, ()))} skippable, "
                         f"keeps at least {m}")
        if self.frozen:
            groups: dict[tuple[str, str], int] = {}
            for name, why in self.frozen.items():  # blocks.3.x and blocks.7.x left fixed alike: one line
                key = (_INDEX.sub(".*", name), _NUMBER.sub("…", _INDEX.sub(".*", why)))
                groups[key] = groups.get(key, 0) + 1
            lines.append(f"left fixed: {len(self.frozen)} dims (each one's reason: `search_space.frozen`)")
            for (name, why), count in list(groups.items())[:_FROZEN_SHOWN]:
                lines.append(f"  {name}{f' (x{count})' if count > 1 else ''}: {why}")
            if len(groups) > _FROZEN_SHOWN:
                lines.append(f"  ... and {len(groups) - _FROZEN_SHOWN} more")
        return "\n".join(lines)

    __repr__ = __str__


_FROZEN_SHOWN = 12
_INDEX = re.compile(r"\.\d+(?=[.`]|$)")
_NUMBER = re.compile(r"\b\d+\.\d+\b|(?<=difference )\d+\b")


def _generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    gen = torch.Generator()
    if generator is None:
        gen.seed()
    elif isinstance(generator, int) and not isinstance(generator, bool):
        gen.manual_seed(generator)
    else:
        raise SearchSpaceError(f"`generator` must be a torch.Generator, an int seed or None, got {generator!r}")
    return gen
