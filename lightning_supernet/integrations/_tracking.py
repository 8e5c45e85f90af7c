"""When to track, and which tracking failures to survive (no MLflow import here: it takes ~10 s).

* :func:`default_tracking_uri`: the tracking URI a search uses when ``mlflow=`` is not given, or ``None``.
* :func:`is_connection_error`: whether an exception means the tracking server or its store cannot be reached
  (then tracking warns once and stops); any other error is a bug and propagates.

Example:
    >>> is_connection_error(ConnectionRefusedError()), is_connection_error(TypeError("bad value"))
    (True, False)
"""

from __future__ import annotations

import importlib.util
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_TRACKING_URI", "NullClient", "default_tracking_uri", "down_message", "is_connection_error",
           "server_reachable"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_CONNECTION_WORDS = ("connection", "connect", "unreachable", "timed out", "timeout", "max retries",
                     "name or service not known", "temporary failure in name resolution", "database is locked",
                     "unable to open database", "disk i/o error", "bad gateway", "service unavailable",
                     "gateway time")


def default_tracking_uri() -> str | None:
    """The tracking URI of a search given no ``mlflow=``: ``None`` (no tracking) unless MLflow is installed and a
    tracking URI is set (``MLFLOW_TRACKING_URI``, which ``mlflow.set_tracking_uri`` also sets) or MLflow's default
    store ``mlflow.db`` exists in the working directory.

    Example:
        >>> import os
        >>> os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///runs.db"
        >>> default_tracking_uri() if importlib.util.find_spec("mlflow") else "sqlite:///runs.db"
        'sqlite:///runs.db'
        >>> del os.environ["MLFLOW_TRACKING_URI"]
    """
    if importlib.util.find_spec("mlflow") is None:
        return None
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    if Path("mlflow.db").is_file():
        return DEFAULT_TRACKING_URI
    return None


def is_connection_error(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) means the tracking server or store is unreachable.

    Connection errors are ``OSError`` (``ConnectionError``, ``TimeoutError``, socket errors, ``urllib``'s
    ``URLError``, a store's I/O error), ``requests``' ``ConnectionError``/``Timeout`` (not its HTTP errors),
    SQLAlchemy's ``OperationalError`` (a store that cannot be opened or is locked), and ``MlflowException``
    caused by one of these or saying so (MLflow wraps a failed REST call as ``API request ... failed with
    exception ... Max retries exceeded``).

    Example:
        >>> is_connection_error(OSError(5, "Input/output error")), is_connection_error(ValueError("nan"))
        (True, False)
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if _is_network(err):
            return True
        name = type(err).__name__
        if name == "MlflowException" or name.endswith("RestException"):
            text = str(err).lower()
            if any(w in text for w in _CONNECTION_WORDS):
                return True
        err = err.__cause__ or err.__context__
    return False


def _is_network(err: BaseException) -> bool:
    module = type(err).__module__
    names = {c.__name__ for c in type(err).__mro__}
    if module.startswith(("requests", "urllib3")):  # requests' errors are all OSErrors; only these are the network
        return bool(names & {"ConnectionError", "Timeout", "ProtocolError", "NewConnectionError", "MaxRetryError"})
    if isinstance(err, OSError):  # ConnectionError, TimeoutError, socket errors, URLError, a store's I/O error
        return True
    return module.startswith("sqlalchemy") and "OperationalError" in names


def server_reachable(tracking_uri: str, timeout: float = 3.0) -> bool:
    """Whether an ``http(s)://`` tracking server answers its ``/health`` endpoint (other URIs: ``True``).

    Example:
        >>> server_reachable("sqlite:///mlflow.db"), server_reachable("http://127.0.0.1:9", timeout=0.5)
        (True, False)
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def down_message(uri: str, err: Any = None) -> str:
    """The warning given once when tracking stops because ``uri`` cannot be reached.

    Example:
        >>> down_message("http://x:5000").split(";")[0]
        "MLflow tracking at 'http://x:5000' is not reachable"
    """
    why = f" ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})" if err else ""
    return (f"MLflow tracking at {uri!r} is not reachable{why}; going on without MLflow tracking. HINT: start it with "
            f"`mlflow server --backend-store-uri sqlite:///mlflow.db`, or use the default {DEFAULT_TRACKING_URI!r}")


class NullClient:
    """Stands in for ``MlflowClient`` once tracking is off: every method does nothing.

    Example:
        >>> NullClient().log_metric("run", "x", 1.0) is None
        True
    """

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
