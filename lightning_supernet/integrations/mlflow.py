"""MLflow tracking for supernet training and subnet search; a tracking server that is down never stops the work.

* Training: :func:`mlflow_logger` gives Lightning's ``MLFlowLogger`` (tracking URI default
  ``sqlite:///mlflow.db``) that also records the search space (``search_space.json`` and its size) and the
  settings of the supernet callbacks in the Trainer.
* Search: :class:`MlflowTracking` makes a parent run for the study, one nested run per trial (params: the flat
  subnet config; metrics: every measured metric; tags: state, motif, reuse), a Pareto-front plot
  (``log_figure``) and the top-k Pareto subnets as extracted, physically smaller models (``log_model``).

If the tracking server cannot be reached, both warn once and carry on without tracking.

Example:
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(logger=mlflow_logger(experiment_name="digits"))  # doctest: +SKIP
    >>> study, front = search_subnets(supernet, dm, mlflow=MlflowTracking(top_k=3))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import MLFlowLogger

from lightning_supernet.integrations import require

if TYPE_CHECKING:
    import optuna

    from lightning_supernet.integrations._objectives import ParetoFront
    from lightning_supernet.integrations.optuna import SubnetSearch

__all__ = ["MlflowTracking", "SupernetMLFlowLogger", "mlflow_logger", "server_reachable"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


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


def _down_message(uri: str, err: Any = None) -> str:
    why = f" ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})" if err else ""
    return (f"MLflow tracking at {uri!r} is not reachable{why}; going on without MLflow tracking. HINT: start it with "
            f"`mlflow server --backend-store-uri sqlite:///mlflow.db`, or use the default {DEFAULT_TRACKING_URI!r}")


class _NullClient:
    """Stands in for ``MlflowClient`` once tracking is off: every method does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class SupernetMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` that logs the supernet's search space and callback settings, and survives a dead server.

    On the first failure to reach the tracking server it warns once and turns into a no-op logger, so training
    goes on. Build it with :func:`mlflow_logger`.

    Example:
        >>> logger = SupernetMLFlowLogger(tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.disabled = not server_reachable(self._tracking_uri)
        if self.disabled:
            warnings.warn(_down_message(self._tracking_uri), stacklevel=3)

    def _fail(self, err: Exception) -> None:
        if not self.disabled:
            self.disabled = True
            warnings.warn(_down_message(self._tracking_uri, err), stacklevel=3)

    @property
    def experiment(self) -> Any:
        if self.disabled:
            return _NullClient()
        try:
            return MLFlowLogger.experiment.fget(self)
        except Exception as err:  # the server or database went away: keep training
            self._fail(err)
            return _NullClient()

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
        except Exception as err:  # any tracking failure: warn once, keep training
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


class MlflowTracking:
    """Tracks a subnet search in MLflow: parent run, nested trial runs, Pareto plot, top-k subnets as models.

    Args:
        tracking_uri: default ``sqlite:///mlflow.db``. experiment_name: the MLflow experiment.
        run_name: name of the parent run (default ``search-<study name>``).
        top_k: Pareto subnets (best first by the first objective) extracted and logged with ``log_model``.
        log_figure: log ``pareto_front.png``.
        artifact_location: artifact root of a new experiment (default: MLflow's).
        pip_requirements: of the logged models (default: this torch, lightning and lightning-supernet).
        tags: extra tags of the parent run.

    Note:
        Trials that forked workers (``n_jobs > 1``) or other processes finish are logged by the process that
        calls :meth:`finish`, from the study. A trial whose process was killed gets its run on the next search.

    Example:
        >>> tracking = MlflowTracking(tracking_uri="sqlite:///mlflow.db", top_k=2)
        >>> study, front = search_subnets(supernet, dm, mlflow=tracking, n_trials=30)  # doctest: +SKIP
        >>> tracking.model_uris  # doctest: +SKIP
        {12: 'models:/m-...'}
    """

    def __init__(self, tracking_uri: str = DEFAULT_TRACKING_URI, experiment_name: str = "lightning-supernet-search",
                 run_name: str | None = None, top_k: int = 3, log_figure: bool = True,
                 artifact_location: str | None = None, pip_requirements: list[str] | None = None,
                 tags: Mapping[str, Any] | None = None) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"`top_k` must be an int >= 0, got {top_k!r}")
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.top_k = top_k
        self.log_figure = log_figure
        self.artifact_location = artifact_location
        self.pip_requirements = pip_requirements
        self.tags = dict(tags or {})
        self.enabled = True
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.model_uris: dict[int, str] = {}
        self._logged: set[int] = set()
        self._client: Any = None
        self._pid = os.getpid()

    @classmethod
    def from_any(cls, spec: Any) -> MlflowTracking:
        """``True`` (defaults), a tracking URI, or an ``MlflowTracking`` (returned as is).

        Raises:
            SearchError: anything else.

        Example:
            >>> MlflowTracking.from_any("sqlite:///x.db").tracking_uri
            'sqlite:///x.db'
        """
        from lightning_supernet.errors import SearchError

        if spec is True:
            return cls()
        if isinstance(spec, str):
            return cls(tracking_uri=spec)
        if isinstance(spec, cls):
            return spec
        raise SearchError(f"`mlflow` is {spec!r}; allowed: None, True, a tracking URI (str) or an MlflowTracking")

    # -- guarded entry points (called by SubnetSearch) --------------------------------------------------------
    def start(self, search: SubnetSearch) -> None:
        """Open (or, for a resumed study, reopen) the parent run and log the search's settings."""
        require("mlflow", "mlflow", "MLflow tracking")
        if not server_reachable(self.tracking_uri):
            self._disable(None)
            return
        self._guard(self._start, search)

    def log_trial(self, search: SubnetSearch, trial: optuna.trial.FrozenTrial) -> None:
        """One nested run for a finished trial (skipped in forked workers: :meth:`finish` logs those)."""
        if os.getpid() == self._pid:
            self._guard(self._log_trial, search, trial)

    def finish(self, search: SubnetSearch, front: ParetoFront) -> None:
        """Log missing trials, the Pareto plot and the top-k models; close the parent run."""
        self._guard(self._finish, search, front)

    def abort(self, search: SubnetSearch) -> None:
        """The search stopped with an error: log the trials so far and mark the parent run FAILED."""
        self._guard(self._abort, search)

    def _guard(self, fn: Any, *args: Any) -> Any:
        if not self.enabled:
            return None
        try:
            return fn(*args)
        except Exception as err:  # tracking must never stop a search
            self._disable(err)
            return None

    def _disable(self, err: Exception | None) -> None:
        self.enabled = False
        warnings.warn(_down_message(self.tracking_uri, err), stacklevel=4)

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` for ``tracking_uri``."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    # -- the work -----------------------------------------------------------------------------------------------
    def _start(self, search: SubnetSearch) -> None:
        client = self.client
        exp = client.get_experiment_by_name(self.experiment_name)
        self.experiment_id = exp.experiment_id if exp is not None else client.create_experiment(
            self.experiment_name, artifact_location=self.artifact_location)
        key = "mlflow_parent_run_id"
        previous = search.study.user_attrs.get(key)
        if previous:
            from mlflow.exceptions import MlflowException

            try:  # a resumed study continues its parent run, if this tracking store has it
                run = client.get_run(previous)
                if run.info.experiment_id == self.experiment_id:
                    self.parent_run_id = previous
                    client.update_run(previous, status="RUNNING")
            except MlflowException:
                self.parent_run_id = None
        if self.parent_run_id is None:
            tags = {"mlflow.runName": self.run_name or f"search-{search.study_name}", "study_name": search.study_name,
                    **{k: str(v) for k, v in self.tags.items()}}
            self.parent_run_id = client.create_run(self.experiment_id, tags=tags).info.run_id
            search.study.set_user_attr(key, self.parent_run_id)
            self._log_settings(search)
        self._logged = self._logged_trials()

    def _log_settings(self, search: SubnetSearch) -> None:
        from lightning_supernet.integrations._storage import redact

        storage = search.storage_spec if isinstance(search.storage_spec, str) else type(search.storage_spec).__name__
        params = {"objectives": ",".join(o.name for o in search.objectives),
                  "directions": ",".join(o.direction for o in search.objectives),
                  "constraints": "; ".join(c.describe() for c in search.constraints) or "none",
                  "sampler": type(search.study.sampler).__name__, "study_name": search.study_name,
                  "storage": redact(storage) if storage else "in-memory",
                  "limit_val_batches": search.limit_val_batches, "num_subnets": search.space.num_subnets}
        self._log(self.parent_run_id, params=params)
        self.client.log_dict(self.parent_run_id, search.space.to_dict(), "search_space.json")
        self.client.log_dict(self.parent_run_id, {"largest": search.reference}, "reference_metrics.json")

    def _logged_trials(self) -> set[int]:
        runs = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
                                       max_results=50000)
        return {int(r.data.tags["trial_number"]) for r in runs if "trial_number" in r.data.tags}

    def _log_trial(self, search: SubnetSearch, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number in self._logged or trial.state.name not in _STATUS:
            return
        attrs = trial.user_attrs
        tags = {"mlflow.parentRunId": self.parent_run_id, "mlflow.runName": f"trial-{trial.number}",
                "trial_number": str(trial.number), "trial_state": trial.state.name,
                "motif": str(attrs.get("motif", "")), "study_name": search.study_name}
        if "reused_from" in attrs:
            tags["reused_from"] = str(attrs["reused_from"])
        if trial.state.name == "FAIL":
            tags["fail_reason"] = str(attrs.get("fail_reason", "unknown (see the search's log)"))
        if trial.constraints:
            tags["feasible"] = str(all(v <= 0 for v in trial.constraints.values()))
        run_id = self.client.create_run(self.experiment_id, tags=tags,
                                        start_time=_ms(trial.datetime_start)).info.run_id
        metrics = {k: float(v) for k, v in attrs.get("metrics", {}).items()}
        metrics.update({f"constraint/{k}": float(v) for k, v in trial.constraints.items()})
        self._log(run_id, params=attrs.get("config", trial.params), metrics=metrics)
        self.client.set_terminated(run_id, _STATUS[trial.state.name], end_time=_ms(trial.datetime_complete))
        self._logged.add(trial.number)

    def _finish(self, search: SubnetSearch, front: ParetoFront) -> None:
        self._logged = self._logged_trials()
        for t in search.study.get_trials(deepcopy=False):
            self._log_trial(search, t)
        states = [t.state.name for t in search.study.get_trials(deepcopy=False)]
        reused = sum(1 for t in search.study.get_trials(deepcopy=False) if "reused_from" in t.user_attrs)
        self._log(self.parent_run_id, metrics={
            "trials_complete": states.count("COMPLETE"), "trials_pruned": states.count("PRUNED"),
            "trials_failed": states.count("FAIL"), "trials_reusing_a_motif": reused,
            "pareto_size": len(front)})
        self.client.log_dict(self.parent_run_id, json.loads(json.dumps(list(front), default=str)),
                             "pareto_front.json")
        if self.log_figure and len(search.objectives) >= 1:
            fig = pareto_figure(search.study, [o.name for o in search.objectives], front)
            self.client.log_figure(self.parent_run_id, fig, "pareto_front.png")
        self._log_models(search, front)
        self.client.set_terminated(self.parent_run_id, "FINISHED")

    def _abort(self, search: SubnetSearch) -> None:
        if self.parent_run_id is None:
            return
        self._logged = self._logged_trials()
        for t in search.study.get_trials(deepcopy=False):
            self._log_trial(search, t)
        self.client.set_terminated(self.parent_run_id, "FAILED")

    def _log_models(self, search: SubnetSearch, front: ParetoFront) -> None:
        if not self.top_k or not front:
            return
        import mlflow
        import mlflow.pytorch

        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.tracking_uri)
        quiet = logging.getLogger("mlflow.pytorch")  # its pickle notice, once per model: we chose pickle on purpose
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with mlflow.start_run(run_id=self.parent_run_id):
                for row in list(front)[: self.top_k]:
                    small = search.export(row["config"])
                    info = mlflow.pytorch.log_model(
                        small, name=f"subnet-trial-{row['trial']}", serialization_format="pickle",
                        pip_requirements=self.pip_requirements or default_pip_requirements(),
                        params={k: str(v) for k, v in row["config"].items()},
                        tags={"trial_number": str(row["trial"]), "motif": str(row["motif"])})
                    self.model_uris[row["trial"]] = info.model_uri
        finally:
            quiet.setLevel(level)
            mlflow.set_tracking_uri(previous)

    def _log(self, run_id: str, params: Mapping[str, Any] | None = None,
             metrics: Mapping[str, float] | None = None) -> None:
        from mlflow.entities import Metric, Param

        ps = [Param(str(k), str(v)[:6000]) for k, v in (params or {}).items()]
        ms = [Metric(str(k), float(v), 0, 0) for k, v in (metrics or {}).items()]
        for i in range(0, max(len(ps), len(ms), 1), 100):
            if ps[i:i + 100] or ms[i:i + 100]:
                self.client.log_batch(run_id, metrics=ms[i:i + 100], params=ps[i:i + 100])


def default_pip_requirements() -> list[str]:
    """Pinned ``torch``, ``lightning`` and ``lightning-supernet`` (the classes a pickled subnet needs).

    Example:
        >>> [r.split("==")[0] for r in default_pip_requirements()]
        ['torch', 'lightning', 'lightning-supernet']
    """
    import lightning
    import torch

    import lightning_supernet

    return [f"torch=={torch.__version__.split('+')[0]}", f"lightning=={lightning.__version__}",
            f"lightning-supernet=={lightning_supernet.__version__}"]


def pareto_figure(study: optuna.Study, objectives: list[str], front: ParetoFront) -> Any:
    """A matplotlib ``Figure``: every complete trial (feasible or not) on the first two objectives, the front
    highlighted; with one objective, its value against the trial number.

    Example:
        >>> fig = pareto_figure(study, ["val_acc", "params"], front)  # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    ax = fig.add_subplot()
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    ok = [t for t in done if all(v <= 0 for v in t.constraints.values())]
    bad = [t for t in done if t not in ok]
    two = len(objectives) >= 2
    xy = (lambda t: (t.values[1], t.values[0])) if two else (lambda t: (t.number, t.values[0]))
    for group, style in ((ok, {"c": "tab:blue", "label": "feasible"}), (bad, {"c": "tab:gray", "label": "infeasible"})):
        if group:
            ax.scatter(*zip(*map(xy, group), strict=True), s=14, alpha=0.6, **style)
    if front:
        pts = sorted(((r[objectives[1]], r[objectives[0]]) if two else (r["trial"], r[objectives[0]])) for r in front)
        ax.plot(*zip(*pts, strict=True), "o-", c="tab:red", label="Pareto front")
    ax.set_xlabel(objectives[1] if two else "trial")
    ax.set_ylabel(objectives[0])
    ax.set_title(f"{study.study_name}: {len(done)} complete trials")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _ms(when: Any) -> int | None:
    return int(when.timestamp() * 1000) if when is not None else None
