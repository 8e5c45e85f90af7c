"""Objectives, constraints, motif keys and the Pareto-front table of a subnet search (no Optuna import).

Example:
    >>> objs = resolve_objectives(("val_acc", "params"), None)
    >>> [(o.name, o.direction) for o in objs]
    [('val_acc', 'maximize'), ('params', 'minimize')]
    >>> c = parse_constraints({"params": 0.5}, objs)[0]
    >>> c.resolve({"params": 1000}).bound, c.describe()
    (500.0, 'params <= 50% of the largest')
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from lightning_supernet.errors import SearchError

__all__ = ["COST_METRICS", "Constraint", "Objective", "ParetoFront", "SearchResult", "motif_key",
           "parse_constraints", "resolve_objectives"]

#: metrics every search can use without a validation pass (latency is measured on the extracted subnet)
COST_METRICS = ("params", "macs", "latency_ms")
_LOWER_IS_BETTER = ("loss", "err", "error", "mse", "mae", "rmse", "perplexity", "ppl", "wer", "cer", "latency",
                    "time", "params", "macs", "flops", "size", "memory")
_DIRECTIONS = ("minimize", "maximize")
_BOUND = re.compile(r"^\s*(<=|>=|<|>)?\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(%)?\s*$")


@dataclass(frozen=True)
class Objective:
    """One objective of the study: a metric name and whether lower or higher is better.

    Example:
        >>> Objective("val_loss", "minimize").better(0.1, 0.2)
        True
    """

    name: str
    direction: str

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b`` for this objective."""
        return a < b if self.direction == "minimize" else a > b


def default_direction(name: str) -> str:
    """``"minimize"`` for costs, losses and errors (by name), ``"maximize"`` for everything else (accuracy...).

    Example:
        >>> default_direction("val_acc"), default_direction("val/loss"), default_direction("latency_ms")
        ('maximize', 'minimize', 'minimize')
    """
    tokens = re.split(r"[^a-z0-9]+", name.lower())
    return "minimize" if any(t in _LOWER_IS_BETTER for t in tokens) else "maximize"


def resolve_objectives(objectives: Any, directions: Any) -> list[Objective]:
    """Check ``objectives``/``directions`` and pair them up (directions default by name).

    Args:
        objectives: a metric name or a sequence of distinct names.
        directions: ``None``; a sequence of ``"minimize"``/``"maximize"`` of the same length; or a mapping
            ``{name: direction}`` for some of them.

    Raises:
        SearchError: an empty or repeated objective, a non-string name, or a bad direction.

    Example:
        >>> [o.direction for o in resolve_objectives(["val_acc", "macs"], {"val_acc": "minimize"})]
        ['minimize', 'minimize']
    """
    names = [objectives] if isinstance(objectives, str) else list(objectives or ())
    if not names:
        raise SearchError(f"`objectives` must name at least one metric, got {objectives!r}; allowed: metrics that "
                          f"the model's `validation_step` logs (e.g. 'val_acc') and {', '.join(COST_METRICS)}")
    for n in names:
        if not isinstance(n, str) or not n:
            raise SearchError(f"`objectives` holds {n!r}; allowed: non-empty metric names (str)")
    if len(set(names)) != len(names):
        raise SearchError(f"`objectives` repeats a metric: {names!r}; allowed: distinct names")
    if directions is None:
        dirs = [default_direction(n) for n in names]
    elif isinstance(directions, Mapping):
        unknown = [k for k in directions if k not in names]
        if unknown:
            raise SearchError(f"`directions` names {unknown[0]!r}, which is not an objective; allowed: {names}")
        dirs = [directions.get(n, default_direction(n)) for n in names]
    else:
        dirs = [directions] if isinstance(directions, str) else list(directions)
        if len(dirs) != len(names):
            raise SearchError(f"`directions` has {len(dirs)} entries for {len(names)} objectives {names}; "
                              "allowed: one per objective, or a {name: direction} mapping")
    for n, d in zip(names, dirs, strict=True):
        if d not in _DIRECTIONS:
            raise SearchError(f"`directions` gives objective {n!r} the direction {d!r}; allowed: minimize, maximize")
    return [Objective(n, d) for n, d in zip(names, dirs, strict=True)]


@dataclass(frozen=True)
class Constraint:
    """A bound on one metric: ``value <= bound`` or ``value >= bound``, absolute or relative to the largest.

    Attributes:
        metric: the metric's name. bound: the bound (a fraction when ``relative``). sense: ``"<="`` or ``">="``.
        relative: whether ``bound`` is a fraction of the largest subnet's value. spec: what the user wrote.

    Example:
        >>> c = Constraint("val_acc", 0.9, ">=")
        >>> c.violation(0.95) <= 0 < c.violation(0.8)
        True
    """

    metric: str
    bound: float
    sense: str
    relative: bool = False
    spec: Any = None

    def resolve(self, reference: Mapping[str, float]) -> Constraint:
        """The absolute constraint, given the largest subnet's metrics (for relative bounds)."""
        if not self.relative:
            return self
        return replace(self, bound=float(self.bound) * float(reference[self.metric]), relative=False)

    def violation(self, value: float) -> float:
        """Optuna's constraint value: ``<= 0`` when satisfied, else the violation relative to the bound."""
        diff = value - self.bound if self.sense == "<=" else self.bound - value
        return float(diff / max(abs(self.bound), 1e-12))

    def satisfied(self, value: float) -> bool:
        """Whether ``value`` meets the bound."""
        return self.violation(value) <= 0

    def describe(self) -> str:
        """Human-readable form, e.g. ``params <= 50% of the largest``."""
        if self.relative:
            return f"{self.metric} {self.sense} {self.bound * 100:g}% of the largest"
        return f"{self.metric} {self.sense} {self.bound:,.6g}"


def parse_constraints(constraints: Mapping[str, Any] | None, objectives: Sequence[Objective]) -> list[Constraint]:
    """Turn the ``constraints`` argument into :class:`Constraint` objects (metric names are checked later).

    A bound is a number or a string. A number bounds the metric from the side that is worse: from above for
    minimised metrics (costs, losses), from below for maximised ones (accuracy); a float in (0, 1] on
    ``params``/``macs``/``latency_ms`` is a fraction of the largest subnet's value. A string gives the sense and
    unit explicitly: ``"<= 2e5"``, ``">= 0.9"``, ``"<= 50%"`` (``%`` = relative to the largest subnet).

    Raises:
        SearchError: not a mapping, a non-numeric bound, or a relative bound that is not positive.

    Example:
        >>> [c.describe() for c in parse_constraints({"macs": "<= 1e6", "val_acc": 0.9}, [])]
        ['macs <= 1e+06', 'val_acc >= 0.9']
    """
    if constraints is None:
        return []
    if not isinstance(constraints, Mapping):
        raise SearchError(f"`constraints` must be a mapping {{metric: bound}}, got {type(constraints).__name__}; "
                          "e.g. {'params': 0.5} (at most half the largest) or {'val_acc': '>= 0.9'}")
    directions = {o.name: o.direction for o in objectives}
    out = []
    for metric, spec in constraints.items():
        where = f"`constraints[{metric!r}]`"
        worse_above = directions.get(metric, default_direction(str(metric))) == "minimize"
        if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
            raise SearchError(f"{where} is {spec!r}; allowed: a number, or a string like '<= 2e5', '>= 0.9', "
                              "'<= 50%'")
        if isinstance(spec, str):
            m = _BOUND.match(spec)
            if m is None:
                raise SearchError(f"{where} is {spec!r}; allowed: a number, or a string like '<= 2e5', '>= 0.9', "
                                  "'<= 50%' (% = relative to the largest subnet)")
            op, num, pct = m.groups()
            sense = {"<": "<=", ">": ">="}.get(op, op) if op else ("<=" if worse_above else ">=")
            bound, relative = float(num), bool(pct)
            if relative:
                bound /= 100.0
        else:
            bound = float(spec)
            sense = "<=" if worse_above else ">="
            relative = metric in COST_METRICS and isinstance(spec, float) and 0 < spec <= 1
        if not math.isfinite(bound):
            raise SearchError(f"{where} is {spec!r}; allowed: a finite bound")
        if relative and bound <= 0:
            raise SearchError(f"{where} is {spec!r}; a bound relative to the largest subnet must be > 0")
        out.append(Constraint(str(metric), bound, sense, relative, spec))
    return out


def motif_key(canonical: Mapping[str, Any]) -> str:
    """A short, stable string for a canonical config (the motif): equal for configs with the same topology.

    Example:
        >>> motif_key({"a": 1, "b": True}) == motif_key({"b": True, "a": 1})
        True
    """
    text = json.dumps(sorted(canonical.items()), separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class ParetoFront(list):
    """The non-dominated feasible trials of a search, best first by the first objective; prints as a table.

    Each row is a dict: ``trial``, one key per objective, ``feasible``, ``motif``, ``config`` (the flat subnet
    config) and ``metrics`` (every metric measured).

    Example:
        >>> front = ParetoFront([{"trial": 3, "val_acc": 0.9, "params": 1200, "config": {}}], ["val_acc", "params"])
        >>> print(front)  # doctest: +NORMALIZE_WHITESPACE
        trial  val_acc  params
            3      0.9   1,200
    """

    def __init__(self, rows: Iterable[dict[str, Any]], objectives: Sequence[str]) -> None:
        super().__init__(rows)
        self.objectives = list(objectives)

    @classmethod
    def from_study(cls, study: Any, objectives: Sequence[Objective]) -> ParetoFront:
        """The study's feasible non-dominated trials (``study.best_trials``): the first per motif and per point.

        Example:
            >>> ParetoFront.from_study(study, resolve_objectives(["val_acc", "params"], None))  # doctest: +SKIP
        """
        rows, seen = [], set()
        for t in sorted(study.best_trials, key=lambda t: t.number):
            motif = t.user_attrs.get("motif")
            if motif in seen or tuple(t.values) in seen:  # one row per network, and per point of the front
                continue
            seen.update((motif, tuple(t.values)))
            row: dict[str, Any] = {"trial": t.number}
            row.update({o.name: v for o, v in zip(objectives, t.values, strict=True)})
            row.update(feasible=all(v <= 0 for v in t.constraints.values()), motif=motif,
                       config=t.user_attrs.get("config", dict(t.params)), metrics=t.user_attrs.get("metrics", {}))
            rows.append(row)
        first = objectives[0]
        rows.sort(key=lambda r: r[first.name], reverse=first.direction == "maximize")
        return cls(rows, [o.name for o in objectives])

    def configs(self) -> list[dict[str, Any]]:
        """The flat subnet configs, in table order.

        Example:
            >>> ParetoFront([{"trial": 0, "config": {"a.width": 8}}], ["val_acc"]).configs()
            [{'a.width': 8}]
        """
        return [row["config"] for row in self]

    def __str__(self) -> str:
        if not self:
            return "(empty Pareto front: no complete feasible trial)"
        cols = ["trial", *self.objectives]
        cells = [[_fmt(row.get(c)) for c in cols] for row in self]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ParetoFront({len(self)} trials; objectives {self.objectives})"


class SearchResult(NamedTuple):
    """What a search returns: the Optuna study and its Pareto front (unpacks as ``study, front``).

    Example:
        >>> study, front = SearchResult(study=None, pareto_front=[])
        >>> front
        []
    """

    study: Any  # optuna.Study
    pareto_front: ParetoFront


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
