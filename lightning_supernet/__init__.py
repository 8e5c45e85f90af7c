"""lightning-supernet: turn a PyTorch Lightning model into a weight-sharing supernet; train, search, export.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from lightning_supernet import SupernetModule
    >>> from lightning_supernet.models import TinyViT
    >>> sn = SupernetModule(TinyViT(dim=32, depth=2, num_heads=2), F.cross_entropy,
    ...                     example_input=torch.randn(1, 1, 8, 8))
    >>> sn.search_space.num_subnets > 1
    True
"""

from lightning_supernet.errors import (
    ArgumentError,
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
from lightning_supernet.module import SupernetModule
from lightning_supernet.space import Dim, SearchSpace, SpaceOptions, SubnetConfig
from lightning_supernet.strategies import ForkJoinDDPStrategy
from lightning_supernet.integrations.transformers import install as _install_transformers

_install_transformers()  # the Hugging Face config finaliser (cheap: transformers itself is imported only if used)

__all__ = [
    "ArgumentError",
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
