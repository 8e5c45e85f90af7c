"""The library's own exceptions.

Each error subclasses ``ValueError`` or ``TypeError`` so callers that already catch those keep working, and
each message names the argument or dimension, the value received and what is allowed.

Example:
    >>> from lightning_supernet.errors import SearchSpaceError
    >>> issubclass(SearchSpaceError, ValueError)
    True
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "CheckpointError",
    "ConfigMismatchError",
    "DiscoveryError",
    "InvalidArgumentError",
    "InfeasibleConstraintsError",
    "MissingDependencyError",
    "SearchError",
    "SearchSpaceError",
    "SearchWorkerError",
    "StorageError",
    "SupernetError",
    "UnsupportedModelError",
]


class SupernetError(Exception):
    """Base class of every error raised by lightning-supernet.

    Example:
        >>> isinstance(SearchSpaceError("x"), SupernetError)
        True
    """


class SearchSpaceError(SupernetError, ValueError):
    """A subnet config or a search-space override is not valid for this supernet.

    Example:
        >>> raise SearchSpaceError("unknown dim `foo`")  # doctest: +SKIP
    """


class ConfigMismatchError(SearchSpaceError):
    """A :class:`~lightning_supernet.SubnetConfig` made for another supernet was given to this one.

    Example:
        >>> issubclass(ConfigMismatchError, SearchSpaceError)
        True
    """


class DiscoveryError(SupernetError, ValueError):
    """The model could not be traced to discover its search space (no example input, forward failed).

    Example:
        >>> issubclass(DiscoveryError, ValueError)
        True
    """


class UnsupportedModelError(SupernetError, TypeError):
    """The model holds a layer or attention implementation that the elastic ops cannot slice.

    Example:
        >>> issubclass(UnsupportedModelError, TypeError)
        True
    """


class SearchError(SupernetError, ValueError):
    """A subnet search was given an argument it cannot use (unknown objective, bad direction or constraint).

    Example:
        >>> issubclass(SearchError, ValueError)
        True
    """


class InfeasibleConstraintsError(SearchError):
    """No subnet of the search space can satisfy the search's constraints (even the smallest breaks one).

    Example:
        >>> issubclass(InfeasibleConstraintsError, SearchError)
        True
    """


class StorageError(SupernetError, RuntimeError):
    """The Optuna storage of a search cannot be opened or reached.

    Example:
        >>> issubclass(StorageError, RuntimeError)
        True
    """


class SearchWorkerError(SupernetError, RuntimeError):
    """A search worker process exited with an error (the trials it completed stay in the study).

    Example:
        >>> issubclass(SearchWorkerError, RuntimeError)
        True
    """


class MissingDependencyError(SupernetError, ImportError):
    """An optional dependency of an integration is not installed; the message names the extra to install.

    Example:
        >>> issubclass(MissingDependencyError, ImportError)
        True
    """


class ArgumentError(SupernetError, TypeError):
    """An argument of the wrong kind (e.g. a plain ``nn.Module`` without the ``loss_fn`` it needs).

    Example:
        >>> issubclass(ArgumentError, TypeError)
        True
    """


class InvalidArgumentError(SupernetError, ValueError):
    """An argument with a value outside what is allowed (a negative count, an unknown mode name...).

    Example:
        >>> issubclass(InvalidArgumentError, ValueError)
        True
    """


class CheckpointError(SupernetError, ValueError):
    """A weights or checkpoint file cannot be written, or cannot be loaded (missing, truncated, corrupted, wrong kind).

    The message names the file and what was expected in it.

    Example:
        >>> issubclass(CheckpointError, ValueError)
        True
    """
