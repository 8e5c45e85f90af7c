"""Sandwich sampling: each step trains the largest, the smallest and ``num_random`` sampled subnets.

Subnets are drawn from the callback's own generator seeded by ``(seed, global step, micro-batch)``, so every rank
draws the same subnets, a resumed run draws what the uninterrupted run drew, and the global RNG is untouched.

Example:
    >>> import lightning as L
    >>> cb = SandwichSampling(num_random=2, sampler="complexity")
    >>> trainer = L.Trainer(callbacks=[cb], logger=False)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_supernet.errors import InvalidArgumentError
from lightning_supernet.training import PlanItem

if TYPE_CHECKING:
    from lightning_supernet.module import SupernetModule
    from lightning_supernet.space import SubnetConfig

__all__ = ["SandwichSampling"]

_SAMPLERS = ("uniform", "complexity")


class SandwichSampling(Callback):
    """Largest + smallest + ``num_random`` sampled subnets per step (BigNAS/OFA's sandwich rule).

    Args:
        num_random: sampled subnets per step besides the largest and the smallest.
        sampler: ``"uniform"`` (each dim uniform, blocks kept with the space's ``keep_prob``), ``"complexity"``
            (ElasticViT-style: the sampled subnets form a ladder from the largest's size to the smallest's, each
            drawn close to its rung, which bounds the size jump between consecutive subnets while covering the
            whole range), or a callable ``sampler(supernet, generator, k, num_random) -> SubnetConfig``.
        seed: seed of the sampling generator.
        largest: include the largest subnet (first).
        smallest: include the smallest subnet (last).
        tries: candidates drawn per rung by the complexity sampler.

    Raises:
        ValueError: ``num_random`` negative, unknown ``sampler``, or nothing to train.

    Example:
        >>> SandwichSampling(num_random=0, largest=True, smallest=True).num_random
        0
    """

    plan_order = 0  # samplers build the plan; loss policies (distillation) annotate it afterwards

    def __init__(self, num_random: int = 2, sampler: str | Callable[..., SubnetConfig] = "uniform", seed: int = 0,
                 largest: bool = True, smallest: bool = True, tries: int = 16) -> None:
        if not isinstance(num_random, int) or num_random < 0:
            raise InvalidArgumentError(f"`num_random` must be an int >= 0, got {num_random!r}")
        if not callable(sampler) and sampler not in _SAMPLERS:
            raise InvalidArgumentError(f"`sampler` must be one of {_SAMPLERS} or a callable, got {sampler!r}")
        if not (largest or smallest or num_random):
            raise InvalidArgumentError("SandwichSampling would train no subnet: set `largest`, `smallest` or `num_random`")
        if not isinstance(tries, int) or tries < 1:
            raise InvalidArgumentError(f"`tries` must be an int >= 1, got {tries!r}")
        self.num_random = num_random
        self.sampler = sampler
        self.seed = seed
        self.largest = largest
        self.smallest = smallest
        self.tries = tries
        self._size_cache: dict[Any, int] = {}

    def generator(self, step: int, micro: int = 0) -> torch.Generator:
        """The generator for one (global step, micro-batch): same on every rank and after a resume.

        Example:
            >>> g1, g2 = SandwichSampling().generator(5), SandwichSampling().generator(5)
            >>> torch.rand(1, generator=g1).item() == torch.rand(1, generator=g2).item()
            True
        """
        mixed = (self.seed * 1_000_003 + step * 9_176 + micro * 131) % (2**63 - 1)
        return torch.Generator().manual_seed(mixed)

    def supernet_plan(self, supernet: SupernetModule, plan: list[PlanItem], batch_idx: int) -> list[PlanItem]:
        """Replace the plan with the sandwich for this step."""
        try:
            step = supernet.trainer.global_step
        except RuntimeError:  # not attached to a Trainer (a plan drawn by hand)
            step = 0
        gen = self.generator(step, batch_idx % supernet.accumulate_grad_batches)
        space = supernet.search_space
        items = [PlanItem("largest", space.largest())] if self.largest else []
        items += [PlanItem("random", cfg) for cfg in self.sample_random(supernet, gen)]
        if self.smallest:
            items.append(PlanItem("smallest", space.smallest()))
        return items

    def sample_random(self, supernet: SupernetModule, generator: torch.Generator) -> list[SubnetConfig]:
        """The ``num_random`` sampled configs of one step (override to customise)."""
        if callable(self.sampler):
            return [supernet.search_space.validate(self.sampler(supernet, generator, k, self.num_random))
                    for k in range(self.num_random)]
        if self.sampler == "uniform" or self.num_random == 0:
            return [supernet.search_space.sample(generator) for _ in range(self.num_random)]
        return self._complexity_ladder(supernet, generator)

    def _size(self, supernet: SupernetModule, cfg: SubnetConfig) -> int:
        from lightning_supernet.cost import active_params

        key = supernet.search_space.canonical(cfg)
        if key not in self._size_cache:
            with supernet.subnet(cfg):
                self._size_cache[key] = active_params(supernet.model)
        return self._size_cache[key]

    def _complexity_ladder(self, supernet: SupernetModule, generator: torch.Generator) -> list[SubnetConfig]:
        space = supernet.search_space
        hi, lo = self._size(supernet, space.largest()), self._size(supernet, space.smallest())
        rung = (hi - lo) / (self.num_random + 1)
        chosen = []
        for k in range(self.num_random):
            target = hi - (k + 1) * rung + (torch.rand((), generator=generator).item() - 0.5) * rung
            level = (target - lo) / max(hi - lo, 1)
            # half the candidates uniform, half drawn around the rung's level: uniform draws alone pile up in the
            # middle of the range and miss the rungs near the largest and the smallest
            candidates = [space.sample(generator) if t % 2 else _around(space, level, generator)
                          for t in range(self.tries)]
            chosen.append(min(candidates, key=lambda c: abs(self._size(supernet, c) - target)))
        return chosen

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "num_random": self.num_random}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]


def _around(space: Any, level: float, generator: torch.Generator) -> SubnetConfig:
    """A config whose every dim sits near ``level`` of its range (0 = smallest choice, 1 = largest), jittered."""
    values: dict[str, Any] = {}
    for name, d in space.dims.items():
        at = min(max(level + (torch.rand((), generator=generator).item() - 0.5) * 0.5, 0.0), 1.0)
        if d.kind == "depth":
            values[name] = bool(torch.rand((), generator=generator).item() < at)
        else:
            ordered = sorted(d.choices)
            values[name] = ordered[min(int(at * len(ordered)), len(ordered) - 1)]
    return space.repair(values, generator)

