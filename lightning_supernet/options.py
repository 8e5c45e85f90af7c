"""Options that restrict or override a supernet's search space (``SupernetModule(space=...)``).

:class:`SpaceOptions` is validated as a whole when it is built: a typo'd pattern, an empty or repeated choice
list, a depth out of range or a string where a list belongs is a :class:`~lightning_supernet.errors.SearchSpaceError`
naming the option, the value and what is allowed.

Example:
    >>> SpaceOptions.from_any({"width_ratios": [0.5, 1.0], "min_depth": 0.5}).min_kept(12)
    6
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from lightning_supernet.errors import SearchSpaceError

__all__ = ["KINDS", "SpaceOptions", "some_names"]

KINDS = ("width", "heads", "depth")


@dataclass(frozen=True)
class SpaceOptions:
    """How the discovered dims become a search space (the ``space=`` argument of ``SupernetModule``).

    Args:
        width_ratios: widths offered, as fractions of each full width.
        head_ratios: head counts offered, as fractions of each attention module's heads.
        min_depth: blocks each stack keeps at least: a fraction of its length (``0.5``) or a count (``2``).
        elastic: which kinds of dims are elastic (subset of ``("width", "heads", "depth")``).
        include: if given, only dims whose name matches one of these ``fnmatch`` patterns are elastic.
        exclude: dims whose name matches one of these patterns stay fixed.
        choices: ``{pattern: [values]}``: explicit choices for matching dims (overrides the ratios).
        round_to: widths are rounded to a multiple of this (when the full width is).
        residual: also make residual streams (e.g. a CNN stage's channels) elastic.
        keep_prob: probability that :meth:`SearchSpace.sample` keeps a skippable block (SuperSAM's layer drop).

    Example:
        >>> SpaceOptions.from_any({"min_depth": 2, "elastic": ["width"]}).elastic
        ('width',)
    """

    width_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    head_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    min_depth: float = 0.5
    elastic: tuple[str, ...] = KINDS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    choices: Mapping[str, tuple] = field(default_factory=dict)
    round_to: int = 8
    residual: bool = False
    keep_prob: float = 0.5

    @classmethod
    def from_any(cls, space: SpaceOptions | Mapping[str, Any] | None) -> SpaceOptions:
        """Accept ``None``, a dict of the fields above, or a ``SpaceOptions``; validate every value.

        Raises:
            SearchSpaceError: an unknown key or a value outside what is allowed.

        Example:
            >>> SpaceOptions.from_any(None).min_depth
            0.5
        """
        if space is None:
            return cls()
        if isinstance(space, SpaceOptions):
            opts = space
        elif isinstance(space, Mapping):
            names = [f.name for f in fields(cls)]
            unknown = [k for k in space if k not in names]
            if unknown:
                raise SearchSpaceError(
                    f"`space` has unknown key {unknown[0]!r}; allowed keys: {', '.join(names)}"
                )
            kw = {k: tuple(v) if isinstance(v, list) else v for k, v in space.items()}
            if isinstance(kw.get("choices"), Mapping):
                kw["choices"] = {p: tuple(v) if isinstance(v, list) else v for p, v in kw["choices"].items()}
            opts = cls(**kw)
        else:
            raise SearchSpaceError(f"`space` must be a dict or SpaceOptions, got {type(space).__name__}")
        opts._validate()
        return opts

    def _validate(self) -> None:
        for name in ("width_ratios", "head_ratios"):
            ratios = _sequence(name, getattr(self, name), "fractions in (0, 1]")
            if not ratios or any(not _is_real(r) or not 0 < r <= 1 for r in ratios):
                raise SearchSpaceError(f"`space[{name!r}]` must be a non-empty list of fractions in (0, 1], "
                                       f"got {ratios!r}")
        elastic = _sequence("elastic", self.elastic, f"a list among {', '.join(KINDS)}")
        bad = [k for k in elastic if k not in KINDS]
        if bad or not elastic:
            raise SearchSpaceError(f"`space['elastic']` has {bad[0] if bad else 'no kind'!r}; allowed: a non-empty "
                                   f"list among {', '.join(KINDS)}")
        for name in ("include", "exclude"):
            patterns = _sequence(name, getattr(self, name), "a list of fnmatch patterns such as 'blocks.0.*'")
            if any(not isinstance(p, str) or not p for p in patterns):
                raise SearchSpaceError(f"`space[{name!r}]` must be a list of non-empty pattern strings, got "
                                       f"{patterns!r}")
        if not isinstance(self.choices, Mapping):
            raise SearchSpaceError(f"`space['choices']` must be a dict {{pattern: [values]}}, got {self.choices!r}")
        for pattern, values in self.choices.items():
            values = _sequence(f"choices'][{pattern!r}", values, "a list of ints")
            if not values:
                raise SearchSpaceError(f"`space['choices'][{pattern!r}]` is empty; give at least one int")
            if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
                raise SearchSpaceError(f"`space['choices'][{pattern!r}]` must be ints (widths or head counts), got "
                                       f"{list(values)!r}")
            if len(set(values)) != len(values):
                raise SearchSpaceError(f"`space['choices'][{pattern!r}]` repeats a value: {list(values)!r}")
        md = self.min_depth
        if isinstance(md, bool) or not _is_real(md) or md < 0 or (isinstance(md, float) and md > 1 and md != int(md)):
            raise SearchSpaceError(f"`space['min_depth']` must be a fraction in [0, 1] of each stack's length or "
                                   f"an int count of blocks, got {md!r}")
        if isinstance(self.keep_prob, bool) or not _is_real(self.keep_prob) or not 0 < self.keep_prob <= 1:
            raise SearchSpaceError(f"`space['keep_prob']` must be in (0, 1], got {self.keep_prob!r}")
        if not isinstance(self.round_to, int) or isinstance(self.round_to, bool) or self.round_to < 1:
            raise SearchSpaceError(f"`space['round_to']` must be a positive int, got {self.round_to!r}")
        if not isinstance(self.residual, bool):
            raise SearchSpaceError(f"`space['residual']` must be True or False, got {self.residual!r}")

    def check_patterns(self, names: list[str]) -> None:
        """Every ``include``/``exclude``/``choices`` pattern must match one of the discovered dims ``names``.

        Raises:
            SearchSpaceError: naming the option, the pattern, close dim names and some dims that exist.

        Example:
            >>> SpaceOptions(exclude=("blocks.O.*",)).check_patterns(["blocks.0.keep"])
            Traceback (most recent call last):
            ...
            lightning_supernet.errors.SearchSpaceError: `space['exclude']` pattern 'blocks.O.*' matches no dim; did you mean `blocks.0.keep`? dims are e.g. `blocks.0.keep`
        """
        for option, patterns in (("include", self.include), ("exclude", self.exclude), ("choices", self.choices)):
            for pattern in patterns:
                if any(fnmatch.fnmatch(n, pattern) for n in names):
                    continue
                close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
                raise SearchSpaceError(
                    f"`space[{option!r}]` pattern {pattern!r} matches no dim; "
                    + (f"did you mean {', '.join(f'`{c}`' for c in close)}? " if close else "")
                    + f"dims are e.g. {some_names(names)}"
                )

    def check_depth(self, stacks: Mapping[str, int]) -> None:
        """``min_depth`` given as a count must not exceed a stack's length (``stacks``: container -> length).

        Example:
            >>> SpaceOptions(min_depth=20).check_depth({"blocks": 12})
            Traceback (most recent call last):
            ...
            lightning_supernet.errors.SearchSpaceError: `space['min_depth']` is 20 blocks but stack `blocks` has 12; give a count <= 12 or a fraction such as 0.5
        """
        if isinstance(self.min_depth, int) or self.min_depth > 1:
            for stack, length in stacks.items():
                if self.min_depth > length:
                    raise SearchSpaceError(
                        f"`space['min_depth']` is {self.min_depth:g} blocks but stack `{stack}` has {length}; give "
                        f"a count <= {min(stacks.values())} or a fraction such as 0.5"
                    )

    def asked_for(self, name: str) -> bool:
        """Whether the user named this dim explicitly (a ``choices`` or ``include`` pattern matches it).

        Example:
            >>> SpaceOptions(choices={"*.heads": (2, 4)}).asked_for("attn.heads")
            True
        """
        return self.explicit_choices(name) is not None or any(fnmatch.fnmatch(name, p) for p in self.include)

    def selects(self, name: str, kind: str) -> bool:
        """Whether a dim of this name and kind is elastic under these options."""
        if kind not in self.elastic:
            return False
        if self.include and not any(fnmatch.fnmatch(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatch(name, p) for p in self.exclude)

    def explicit_choices(self, name: str) -> tuple | None:
        """User-given choices for this dim, if a pattern in ``choices`` matches it."""
        for pattern, values in self.choices.items():
            if fnmatch.fnmatch(name, pattern):
                return tuple(values)
        return None

    def min_kept(self, length: int) -> int:
        """Blocks a stack of ``length`` keeps at least."""
        if isinstance(self.min_depth, float) and self.min_depth <= 1:
            return max(1, math.ceil(self.min_depth * length)) if self.min_depth > 0 else 0
        return min(int(self.min_depth), length)


def _sequence(option: str, value: Any, allowed: str) -> tuple:
    """A list/tuple option as a tuple; a string or scalar where a list belongs is the user's error."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise SearchSpaceError(f"`space[{option!r}]` must be {allowed}, got {value!r} ({type(value).__name__})"
                           + (f". HINT: [{value!r}]" if isinstance(value, str) else ""))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def some_names(names: Mapping[str, Any]) -> str:
    """The first three keys of ``names`` in backticks (for error messages).

    Example:
        >>> some_names({"a": 1, "b": 2, "c": 3, "d": 4})
        '`a`, `b`, `c`, ...'
    """
    keys = list(names)
    return ", ".join(f"`{k}`" for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
