"""lightning-supernet: turn a PyTorch Lightning model into a weight-sharing supernet; train, search, export.

The names below are imported on first use (PEP 562 ``__getattr__``): ``import lightning_supernet`` and the
errors module are cheap, so ``lightning-supernet --help`` answers before Lightning or transformers are imported.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from lightning_supernet import SupernetModule
    >>> from lightning_supernet.models import TinyViT
    >>> sn = SupernetModule(TinyViT(dim=32, depth=2, num_heads=2), F.cross_entropy,
    ...                     example_input=torch.randn(1, 1, 8, 8))
    >>> sn.search_space.num_subnets > 1
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_supernet.errors import (
    ArgumentError,
    CheckpointError,
    ConfigMismatchError,
    DiscoveryError,
    InfeasibleConstraintsError,
    InvalidArgumentError,
    MissingDependencyError,
    SearchError,
    SearchSpaceError,
    SearchWorkerError,
    StorageError,
    SupernetError,
    UnsupportedModelError,
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from lightning_supernet.module import SupernetModule
    from lightning_supernet.space import Dim, SearchSpace, SpaceOptions, SubnetConfig
    from lightning_supernet.strategies import ForkJoinDDPStrategy

_LAZY = {
    "SupernetModule": "lightning_supernet.module",
    "Dim": "lightning_supernet.space",
    "SearchSpace": "lightning_supernet.space",
    "SpaceOptions": "lightning_supernet.space",
    "SubnetConfig": "lightning_supernet.space",
    "ForkJoinDDPStrategy": "lightning_supernet.strategies",
}


def __getattr__(name: str) -> Any:
    """Import the public classes on first access (``lightning_supernet.SupernetModule`` imports Lightning)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_supernet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ArgumentError",
    "CheckpointError",
    "ConfigMismatchError",
    "Dim",
    "DiscoveryError",
    "ForkJoinDDPStrategy",
    "InfeasibleConstraintsError",
    "InvalidArgumentError",
    "MissingDependencyError",
    "SearchError",
    "SearchSpace",
    "SearchSpaceError",
    "SearchWorkerError",
    "SpaceOptions",
    "StorageError",
    "SubnetConfig",
    "SupernetError",
    "SupernetModule",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
