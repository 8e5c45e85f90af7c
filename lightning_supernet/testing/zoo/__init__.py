"""Model zoos for the conformance contract: torchvision, Hugging Face, timm and PyTorch's own transformers.

Each zoo is a list of :class:`ZooModel` (a name, a builder of a fresh randomly initialised model, a builder of its
example input); nothing is downloaded (``weights=None``, ``pretrained=False``, configs). ``fast=True`` marks the
handful of small models of each zoo that run in the default test run. A model too large for a small machine has
``skip`` set to the reason.

Example:
    >>> from lightning_supernet.testing.zoo import get_zoo
    >>> m = next(m for m in get_zoo("torch") if m.fast)
    >>> out = m.build()(*m.example()) if isinstance(m.example(), tuple) else None
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["ZOOS", "ZooModel", "get_zoo", "seeded"]

#: the zoos :func:`get_zoo` knows
ZOOS = ("torchvision", "hf", "timm", "torch")


@dataclasses.dataclass
class ZooModel:
    """One model of a zoo.

    Attributes:
        name: unique within the zoo. build: returns a fresh model (random weights, seeded).
        example: returns its example input (tensor, tuple of args or dict of kwargs).
        fast: part of the fast slice run by the default tests. skip: why it is not run (``None``: run it).
        output: picks what the contract compares from the output (default: every tensor).
        space: ``space=`` for ``SupernetModule`` (default: the discovered space).

    Example:
        >>> m = ZooModel("lin", lambda: nn.Linear(2, 2), lambda: torch.randn(1, 2))
        >>> m.build()(m.example()).shape
        torch.Size([1, 2])
    """

    name: str
    build: Callable[[], nn.Module]
    example: Callable[[], Any]
    fast: bool = False
    skip: str | None = None
    output: Callable[[Any], Any] | None = None
    space: dict[str, Any] | None = None


def seeded(fn: Callable[..., Any], seed: int = 0) -> Callable[..., Any]:
    """``fn`` run under a fixed RNG seed (the global RNG is restored afterwards): same weights every build.

    Example:
        >>> make = seeded(lambda: torch.randn(2))
        >>> torch.equal(make(), make())
        True
    """
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn(*args, **kwargs)

    return run


def get_zoo(name: str) -> list[ZooModel]:
    """The models of zoo ``name`` (one of :data:`ZOOS`); imports the zoo's library lazily.

    Example:
        >>> len(get_zoo("torch")) >= 5
        True
    """
    if name == "torchvision":
        from lightning_supernet.testing.zoo.torchvision_zoo import torchvision_zoo as make
    elif name == "hf":
        from lightning_supernet.testing.zoo.hf_zoo import hf_zoo as make
    elif name == "timm":
        from lightning_supernet.testing.zoo.timm_zoo import timm_zoo as make
    elif name == "torch":
        from lightning_supernet.testing.zoo.torch_zoo import torch_zoo as make
    else:
        raise ValueError(f"`name` must be one of {ZOOS}, got {name!r}")
    return make()
