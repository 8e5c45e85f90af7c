"""Supernet training tracked in MLflow: Lightning's ``MLFlowLogger`` that also records the search space and the
supernet callbacks' settings, and survives a tracking server that goes away (imported by
:mod:`lightning_supernet.integrations.mlflow`, where these names are public).

Example:
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(logger=mlflow_logger(experiment_name="digits"))  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger

from lightning_supernet.integrations import require
from lightning_supernet.integrations._tracking import (
    DEFAULT_TRACKING_URI,
    NullClient,
    down_message,
    is_connection_error,
    server_reachable,
)

__all__ = ["SupernetMLFlowLogger", "callback_settings", "mlflow_logger"]


class SupernetMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` that logs the supernet's search space and callback settings, and survives a dead server.

    On the first failure to reach the tracking server (a connection error) it warns once and turns into a no-op
    logger, so training goes on; other errors propagate. Build it with :func:`mlflow_logger`.

    Example:
        >>> logger = SupernetMLFlowLogger(tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.disabled = not server_reachable(self._tracking_uri)
        if self.disabled:
            warnings.warn(down_message(self._tracking_uri), stacklevel=3)

    def _fail(self, err: Exception) -> None:
        if not self.disabled:
            self.disabled = True
            warnings.warn(down_message(self._tracking_uri, err), stacklevel=3)

    @property
    def experiment(self) -> Any:
        if self.disabled:
            return NullClient()
        try:
            return MLFlowLogger.experiment.fget(self)
        except Exception as err:  # the server or database went away: keep training; a bug propagates
            if not is_connection_error(err):
                raise
            self._fail(err)
            return NullClient()

    @property
    def run_id(self) -> str | None:
        _ = self.experiment
        return self._run_id

    def log_hyperparams(self, params: Any) -> None:
        self._guard(super().log_hyperparams, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._guard(super().log_metrics, metrics, step)

    def finalize(self, status: str = "success") -> None:
        self._guard(super().finalize, status)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guard(super().after_save_checkpoint, checkpoint_callback)

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """Called by Lightning at fit start: logs the search space, the wrapped model's hparams, callbacks."""
        if self.disabled or not hasattr(model, "search_space"):
            return
        self._guard(self._log_supernet, model)

    def _log_supernet(self, supernet: Any) -> None:
        space = supernet.search_space
        params = {"supernet/num_dims": len(space.dims), "supernet/num_subnets": space.num_subnets,
                  "supernet/fingerprint": space.fingerprint, "supernet/model": type(supernet.model).__name__}
        inner_hparams = getattr(supernet.model, "hparams", None)
        if inner_hparams:
            params.update({f"model/{k}": v for k, v in dict(inner_hparams).items()})
        trainer = getattr(supernet, "_trainer", None)
        for cb in (trainer.callbacks if trainer is not None else []):
            params.update(callback_settings(cb))
        super().log_hyperparams(params)
        self.experiment.log_dict(self.run_id, space.to_dict(), "search_space.json")

    def _guard(self, fn: Any, *args: Any) -> None:
        if self.disabled:
            return
        try:
            fn(*args)
        except Exception as err:  # the server went away: warn once, keep training; a bug propagates
            if not is_connection_error(err):
                raise
            self._fail(err)


def callback_settings(callback: Any) -> dict[str, Any]:
    """``{"callbacks/<Class>/<attr>": value}`` for the public scalar settings of a lightning-supernet callback.

    Example:
        >>> class Sandwich:  # stands in for lightning_supernet.callbacks.SandwichSampling
        ...     __module__ = "lightning_supernet.callbacks.sandwich"
        ...     def __init__(self): self.num_random, self._rng = 2, object()
        >>> callback_settings(Sandwich())
        {'callbacks/Sandwich/num_random': 2}
    """
    cls = type(callback)
    if not cls.__module__.startswith("lightning_supernet"):
        return {}
    return {f"callbacks/{cls.__name__}/{k}": v for k, v in vars(callback).items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None), tuple))}


def mlflow_logger(tracking_uri: str = DEFAULT_TRACKING_URI, experiment_name: str = "lightning-supernet",
                  run_name: str | None = None, tags: Mapping[str, Any] | None = None,
                  **kwargs: Any) -> SupernetMLFlowLogger:
    """Lightning's ``MLFlowLogger`` for supernet training (see :class:`SupernetMLFlowLogger`).

    Args:
        tracking_uri: where runs go; default ``sqlite:///mlflow.db`` (look with
            ``mlflow ui --backend-store-uri sqlite:///mlflow.db``).
        experiment_name: the MLflow experiment. run_name: the run's name. tags: run tags.
        **kwargs: other ``MLFlowLogger`` arguments (``log_model``, ``artifact_location``, ``prefix``...).

    Raises:
        MissingDependencyError: MLflow is not installed.

    Example:
        >>> trainer = pl.Trainer(logger=mlflow_logger(), callbacks=[SandwichSampling()])  # doctest: +SKIP
        >>> trainer.fit(supernet, datamodule=dm)  # doctest: +SKIP
    """
    require("mlflow", "mlflow", "MLflow tracking")
    return SupernetMLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                                tags=dict(tags) if tags else None, **kwargs)
