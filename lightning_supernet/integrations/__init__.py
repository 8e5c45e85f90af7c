"""Integrations with other tools: Optuna for the subnet search, MLflow for tracking.

Nothing heavy is imported here: ``import lightning_supernet.integrations`` does not import Optuna or MLflow. The
public names are loaded on first use, and a missing optional dependency raises
:class:`~lightning_supernet.errors.MissingDependencyError` naming the extra to install.

Example:
    >>> from lightning_supernet.integrations import search_subnets  # doctest: +SKIP
    >>> from lightning_supernet.integrations.optuna import SubnetSearch  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from lightning_supernet.errors import MissingDependencyError

__all__ = ["MlflowTracking", "SearchResult", "SubnetSearch", "mlflow_logger", "require", "search_subnets"]

_LAZY = {
    "MlflowTracking": "lightning_supernet.integrations.mlflow",
    "mlflow_logger": "lightning_supernet.integrations.mlflow",
    "SearchResult": "lightning_supernet.integrations.optuna",
    "SubnetSearch": "lightning_supernet.integrations.optuna",
    "search_subnets": "lightning_supernet.integrations.optuna",
}


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise an error naming the extra that installs it.

    Args:
        module: the module to import, e.g. ``"optuna"``.
        extra: the ``lightning-supernet`` extra that provides it, e.g. ``"optuna"``.
        purpose: what needs it, for the message (``"the subnet search"``).

    Raises:
        MissingDependencyError: the module cannot be imported.

    Example:
        >>> require("json", "none", "the example").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{purpose} needs `{module}`, which is not installed ({err}). "
            f"HINT: pip install 'lightning-supernet[{extra}]'"
        ) from err


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
