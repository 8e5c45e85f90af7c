"""MLflow tracking for supernet training and subnet search; a tracking server that is down never stops the work.

* Training: :func:`mlflow_logger` gives Lightning's ``MLFlowLogger`` (tracking URI default
  ``sqlite:///mlflow.db``) that also records the search space (``search_space.json`` and its size) and the
  settings of the supernet callbacks in the Trainer.
* Search: :class:`MlflowTracking` makes a parent run for the study, one nested run per trial (params: the flat
  subnet config; metrics: every measured metric; tags: state, motif, reuse), a Pareto-front plot
  (``log_figure``) and the top-k Pareto subnets as extracted, physically smaller models (``log_model``).

If the tracking server or store cannot be reached (a connection error: see
:func:`~lightning_supernet.integrations._tracking.is_connection_error`), both warn once and carry on without
tracking; any other error (a bad metric value, a bug) propagates.

Example:
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(logger=mlflow_logger(experiment_name="digits"))  # doctest: +SKIP
    >>> study, front = search_subnets(supernet, dm, mlflow=MlflowTracking(top_k=3))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import MLFlowLogger

from lightning_supernet.integrations import require
from lightning_supernet.integrations._tracking import (
    DEFAULT_TRACKING_URI,
    down_message,
    is_connection_error,
    server_reachable,
)
from lightning_supernet.integrations._training_logger import SupernetMLFlowLogger, callback_settings, mlflow_logger

if TYPE_CHECKING:
    import optuna

    from lightning_supernet.integrations._objectives import ParetoFront
    from lightning_supernet.integrations.optuna import SubnetSearch

__all__ = ["DEFAULT_TRACKING_URI", "MlflowTracking", "SupernetMLFlowLogger", "callback_settings", "mlflow_logger",
           "server_reachable"]

_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
#: the experiment tag that makes MLflow open an experiment as model training (not GenAI)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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
        training_run_id: the MLflow run that trained the supernet; default: the run of the ``MLFlowLogger`` of
            the Trainer that fitted it, if any. The search run gets the tag ``training_run_id`` (and becomes the
            training run's child when both are in one experiment).

    Each top-k subnet is logged inside its trial's run, as an MLflow logged model (``name="subnet-trial-<n>"``)
    whose metrics are that trial's (``val_acc``, ``params``, ``macs``...), with the subnet config as params, a
    signature and an input example from the supernet's ``example_input_array``. The experiment is tagged
    ``mlflow.experimentKind=custom_model_development`` so that MLflow's UI opens it as model training.

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
                 tags: Mapping[str, Any] | None = None, training_run_id: str | None = None) -> None:
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
        self.training_run_id = training_run_id
        self.enabled = True
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.model_uris: dict[int, str] = {}
        self._logged: dict[int, str] = {}  # trial number -> its run id
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
        except Exception as err:  # a tracking server that went away never stops a search; a bug propagates
            if not is_connection_error(err):
                raise
            self._disable(err)
            return None

    def _disable(self, err: Exception | None) -> None:
        self.enabled = False
        warnings.warn(down_message(self.tracking_uri, err), stacklevel=4)

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
            self.experiment_name, artifact_location=self.artifact_location, tags=EXPERIMENT_KIND)
        if exp is not None and not set(EXPERIMENT_KIND) & set(exp.tags):
            for k, v in EXPERIMENT_KIND.items():
                client.set_experiment_tag(self.experiment_id, k, v)
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
                    "weights_digest": str(search.weights), **self._training_link(search),
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

    def find_training_run(self, supernet: Any) -> str | None:
        """Remember the run of the ``MLFlowLogger`` of the Trainer that fitted ``supernet`` (unless
        ``training_run_id`` was given); call it before the search validates (which attaches its own Trainer).

        Example:
            >>> MlflowTracking(training_run_id="abc").find_training_run(supernet)  # doctest: +SKIP
            'abc'
        """
        if self.training_run_id is None:
            trainer = getattr(supernet, "_trainer", None)
            for logger in getattr(trainer, "loggers", None) or []:
                if isinstance(logger, MLFlowLogger) and getattr(logger, "_run_id", None):
                    self.training_run_id = logger._run_id
        return self.training_run_id

    def _training_link(self, search: SubnetSearch) -> dict[str, str]:
        run_id = self.training_run_id
        if not run_id:
            return {}
        from mlflow.exceptions import MlflowException

        try:
            same = self.client.get_run(run_id).info.experiment_id == self.experiment_id
        except MlflowException:  # not in this tracking store: keep the id as a tag only
            same = False
        return {"training_run_id": run_id, **({"mlflow.parentRunId": run_id} if same else {})}

    def _logged_trials(self) -> dict[int, str]:
        runs = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
                                       max_results=50000)
        return {int(r.data.tags["trial_number"]): r.info.run_id for r in runs if "trial_number" in r.data.tags}

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
        self._logged[trial.number] = run_id

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

        previous = os.environ.get("MLFLOW_TRACKING_URI")  # `set_tracking_uri` also sets it: restore both
        mlflow.set_tracking_uri(self.tracking_uri)
        quiet = logging.getLogger("mlflow.pytorch")  # its pickle notice, once per model: we chose pickle on purpose
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            for row in list(front)[: self.top_k]:
                small = search.export(row["config"])
                signature, example = model_signature(small, search.supernet.example_input_array)
                # logged inside the trial's run, the model gets that run's metrics (MLflow 3 links them)
                with mlflow.start_run(run_id=self._logged.get(row["trial"], self.parent_run_id)):
                    info = mlflow.pytorch.log_model(
                        small, name=f"subnet-trial-{row['trial']}", serialization_format="pickle",
                        pip_requirements=self.pip_requirements or default_pip_requirements(),
                        params={k: str(v) for k, v in row["config"].items()}, model_type="subnet",
                        signature=signature, input_example=example,
                        tags={"trial_number": str(row["trial"]), "motif": str(row["motif"]),
                              "study_name": search.study_name, "search_run_id": str(self.parent_run_id)})
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


def model_signature(model: Any, example_input: Any) -> tuple[Any, Any]:
    """``(signature, input example)`` for ``log_model`` from a tensor (or dict of tensors) example input, the
    model's output on it (a tensor, or a ``.logits``) included; ``(None, None)`` without a usable example.

    Example:
        >>> import torch
        >>> sig, x = model_signature(torch.nn.Linear(3, 2), torch.zeros(1, 3))
        >>> x.shape, sig.inputs.to_dict()[0]["tensor-spec"]["shape"]
        ((1, 3), (-1, 3))
    """
    import torch
    from mlflow.models import infer_signature

    if isinstance(example_input, torch.Tensor):
        example = example_input.detach().cpu().numpy()
    elif isinstance(example_input, Mapping) and all(isinstance(v, torch.Tensor) for v in example_input.values()):
        example = {k: v.detach().cpu().numpy() for k, v in example_input.items()}
    else:
        return None, None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example_input, Mapping):
                out = model(**{k: v.to(device) for k, v in example_input.items()})
            else:
                out = model(example_input.to(device))
    finally:
        model.train(was_training)
    out = getattr(out, "logits", out)
    output = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else None
    return infer_signature(example, output), example


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
