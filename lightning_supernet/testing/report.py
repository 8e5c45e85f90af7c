"""The outcome of one conformance check, and totals over a zoo of them.

A :class:`Report` says, for one model, one of:

* ``PASS`` — every clause of the contract holds (see :mod:`lightning_supernet.testing.conformance`);
* ``REFUSED`` — construction raised ``UnsupportedModelError`` (with its reason) and left the model as it was;
* ``FAIL`` — a clause broke: a late crash, a wrong answer, a cost mismatch, a mode flipped (``step`` says which);
* ``COVERAGE`` — correct everywhere, but the smallest subnet keeps more than half the parameters;
* ``SKIPPED`` — not run (too large for the machine, a missing optional package; ``detail`` says why);
* ``TIMEOUT`` — the zoo runner stopped it after its time limit.

Example:
    >>> r = Report("toy", "FAIL", step="extract", detail="smallest: outputs differ")
    >>> str(r)
    'toy                                   FAIL      extract: smallest: outputs differ'
    >>> summarize([r, Report("a", "PASS")])["PASS"]
    1
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from typing import Any

__all__ = ["OUTCOMES", "Report", "summarize"]

OUTCOMES = ("PASS", "COVERAGE", "REFUSED", "FAIL", "TIMEOUT", "SKIPPED")


@dataclasses.dataclass
class Report:
    """The result of :func:`~lightning_supernet.testing.conformance.check_conformance` for one model.

    Attributes:
        name: the model's name. outcome: one of :data:`OUTCOMES`. step: the contract clause that failed (``FAIL``).
        detail: the refusal's reason, the failure in words, or why it was skipped.
        smallest_fraction: the smallest subnet's params over the full model's (``None`` if not built).
        dims: number of elastic dims by kind (``{"width": 12, "heads": 4, "depth": 8}``).
        failures: every ``(step, detail)`` that failed (the first is ``step``/``detail``).
        seconds: wall time of the check. extra: free-form columns (e.g. Torch-Pruning's result).

    Example:
        >>> Report("m", "PASS", smallest_fraction=0.31).ok
        True
    """

    name: str
    outcome: str
    step: str = ""
    detail: str = ""
    smallest_fraction: float | None = None
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No silent wrong answer and no late crash: ``PASS``, ``COVERAGE`` or a clean ``REFUSED``."""
        return self.outcome in ("PASS", "COVERAGE", "REFUSED")

    def summary(self) -> str:
        """The outcome with its reason in a few words, e.g. ``COVERAGE 63%`` or ``FAIL extract: ...``."""
        if self.outcome == "PASS":
            frac = f" smallest {self.smallest_fraction:.0%}" if self.smallest_fraction is not None else ""
            return f"PASS{frac}"
        if self.outcome == "COVERAGE":
            return f"COVERAGE smallest {self.smallest_fraction:.0%}"
        if self.outcome == "FAIL":
            return f"FAIL {self.step}: {self.detail}"
        return f"{self.outcome} {self.detail}".strip()

    def __str__(self) -> str:
        head = self.outcome
        if self.outcome == "FAIL":
            tail = f"{self.step}: {self.detail}"
        elif self.outcome in ("PASS", "COVERAGE") and self.smallest_fraction is not None:
            tail = f"smallest {self.smallest_fraction:.0%} params; dims " + ", ".join(
                f"{k} {v}" for k, v in sorted(self.dims.items()))
        else:
            tail = self.detail
        return f"{self.name:<37} {head:<9} {tail}".rstrip()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def summarize(reports: Iterable[Report]) -> Counter:
    """Count reports per outcome (every outcome present, zero if none).

    Example:
        >>> summarize([Report("a", "PASS"), Report("b", "REFUSED", detail="x")])["REFUSED"]
        1
    """
    counts: Counter = Counter({o: 0 for o in OUTCOMES})
    counts.update(r.outcome for r in reports)
    return counts
