"""Multi-objective subnet search with Optuna: accuracy against params, MACs or measured latency.

Each trial suggests one value per elastic dim (the trial's params are the flat subnet config), repairs a config
that skips too many blocks, and looks its canonical motif key up: configs that extract to the same network
(e.g. differing only in the widths of a skipped block) are evaluated once, later trials copy the metrics. A new
motif is evaluated with ``trainer.validate`` on the active subnet (after BatchNorm recalibration for CNNs), plus
its exact params/MACs and, when asked for, its latency. Constraints go through ``trial.set_constraint``, which
Optuna's TPE, NSGA-II and GP samplers all take into account. The study lives in an Optuna storage
(``sqlite:///search.db`` by default), so a killed search resumes, and several workers can share one PostgreSQL
study.

Example:
    >>> study, front = search_subnets(supernet, datamodule=dm, objectives=("val_acc", "macs"),
    ...                               constraints={"params": 0.5}, n_trials=50)  # doctest: +SKIP
    >>> print(front)  # doctest: +SKIP
    trial  val_acc       macs
       12   0.9611  1,024,512
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_supernet import cost as _cost
from lightning_supernet.errors import SearchError
from lightning_supernet.integrations import require
from lightning_supernet.integrations._objectives import (
    COST_METRICS,
    ParetoFront,
    SearchResult,
    motif_key,
    parse_constraints,
    resolve_objectives,
)
from lightning_supernet.integrations._resume import RequeueExtremes, measured_motifs, weights_digest
from lightning_supernet.integrations._storage import make_storage
from lightning_supernet.integrations._study import (
    bn_state,
    calibration_loader,
    check_arguments,
    check_feasible,
    check_metrics,
    has_batchnorm,
    load_study,
    open_study,
    restore_bn_state,
    run_search,
    val_loaders,
)
from lightning_supernet.integrations._tracking import default_tracking_uri

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import optuna

    from lightning_supernet.integrations.mlflow import MlflowTracking
    from lightning_supernet.module import SupernetModule
    from lightning_supernet.space import SubnetConfig

__all__ = ["SearchResult", "SubnetSearch", "search_subnets"]

_REPEATED_NOTICES = (r".*treespec.*", r".*does not have many workers.*", r".*limit_val_batches.*")


class SubnetSearch:
    """An Optuna study over a supernet's subnets; the small methods below are the places to customise.

    Args:
        supernet: a trained :class:`~lightning_supernet.SupernetModule`.
        datamodule: gives the validation loader (and the training loader used for BN recalibration).
        val_dataloaders: validation loader(s), instead of or overriding the datamodule's.
        objectives: metric names: anything the model's ``validation_step`` logs, plus ``params``, ``macs`` and
            ``latency_ms``.
        directions: ``None`` (costs, losses and errors are minimised, the rest maximised), a list, or a mapping.
        constraints: ``{metric: bound}``; see :func:`~lightning_supernet.integrations._objectives.parse_constraints`
            (``{"params": 0.5}`` = at most half the largest subnet's params; ``{"val_acc": ">= 0.9"}``).
        sampler: ``None``/``"tpe"`` (multivariate TPE), ``"nsga2"``, ``"gp"``, ``"random"`` or an Optuna sampler.
        storage: an Optuna storage URL or object; ``None`` keeps the study in memory.
        study_name: defaults to ``"supernet-<search space fingerprint>"``.
        load_if_exists: resume a study of the same name (its objectives and search space must match).
        resume: a study of the same name measured on other weights (the supernet was retrained, or another
            checkpoint is loaded; weights are compared by a digest of the ``state_dict``): ``"check"`` (default)
            refuses with :class:`~lightning_supernet.errors.SearchError`, ``"new"`` starts (or resumes) the study
            ``"<study_name>-w<digest>"``, ``"ignore_weights"`` continues it. Metrics measured on other weights are
            never copied to a new trial of the same motif.
        limit_val_batches: validation batches per trial (int), or a fraction of the loader (float).
        latency_device: where ``latency_ms`` is measured (default: the supernet's device).
        bn_recalibration_batches: training batches used to re-estimate BatchNorm statistics before each
            evaluation; ``None`` = 20 when the model has BatchNorm layers, else 0.
        mlflow: ``None`` (default): track to MLflow when it is installed and a tracking URI is set
            (``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``) or its default store ``mlflow.db`` is in the
            working directory; ``False``: never track; ``True`` (``sqlite:///mlflow.db``), a tracking URI, or a
            :class:`~lightning_supernet.integrations.mlflow.MlflowTracking`: track there.
        seed: seed of the sampler.
        trainer_kwargs: extra arguments of the validation ``Trainer`` (e.g. ``{"accelerator": "gpu"}``).

    Raises:
        SearchError: a bad objective, direction, constraint, sampler or limit (metric names are checked in
            :meth:`setup`, after one validation of the largest subnet).

    Attributes set by :meth:`setup` and :meth:`run` (read by the search's own helpers): ``resolved_constraints``,
    ``rdb_storage`` (the RDB storage, or ``None``), ``bn_state_at_start`` (BN statistics put back after the
    search), ``total_trials_callback`` (``total_trials=``), ``calibration_loader`` (BN recalibration batches).

    Example:
        >>> class SmallFirst(SubnetSearch):
        ...     def should_evaluate(self, trial, cfg):
        ...         return self.costs(cfg)["params"] < 50_000   # prune (skip) bigger subnets
        >>> study, front = SmallFirst(supernet, dm, storage=None).run(n_trials=20)  # doctest: +SKIP
    """

    #: untimed and timed forward passes of a latency measurement
    latency_warmup: int = 3
    latency_repeats: int = 10
    #: start a new study with the largest and the smallest subnet (they anchor the Pareto front)
    enqueue_extremes: bool = True
    #: exceptions that fail one trial instead of stopping the search
    catch: tuple[type[Exception], ...] = ()
    #: RDB storages: seconds between trial heartbeats (``None``: off), and seconds without one after which a RUNNING
    #: trial counts as killed (``None``: twice the interval). A search (or worker) marks such trials FAIL when it
    #: starts and before each trial, and enqueues the largest/smallest subnet again if a killed trial ran them.
    heartbeat_interval: int | None = 10
    grace_period: int | None = 30
    #: Optuna's log level while the search runs (its per-trial INFO lines are replaced by the progress bar)
    optuna_verbosity: int = 30

    def __init__(self, supernet: SupernetModule, datamodule: pl.LightningDataModule | None = None, *,
                 val_dataloaders: Any = None, objectives: str | Sequence[str] = ("val_acc", "params"),
                 directions: Sequence[str] | Mapping[str, str] | None = None,
                 constraints: Mapping[str, Any] | None = None, sampler: Any = None,
                 storage: Any = "sqlite:///search.db", study_name: str | None = None, load_if_exists: bool = True,
                 limit_val_batches: int | float | None = None, latency_device: str | torch.device | None = None,
                 bn_recalibration_batches: int | None = None, mlflow: MlflowTracking | str | bool | None = None,
                 seed: int | None = None, trainer_kwargs: Mapping[str, Any] | None = None,
                 resume: str = "check") -> None:
        if not hasattr(supernet, "search_space") or not hasattr(supernet, "subnet"):
            raise SearchError(f"`supernet` must be a SupernetModule, got {type(supernet).__name__}. "
                              "HINT: wrap the model first: `SupernetModule(model)`")
        if datamodule is None and val_dataloaders is None:
            raise SearchError("`datamodule` and `val_dataloaders` are both None; allowed: a LightningDataModule with "
                              "a `val_dataloader()`, or validation DataLoader(s)")
        check_arguments(limit_val_batches=limit_val_batches, bn_recalibration_batches=bn_recalibration_batches,
                        sampler=sampler, resume=resume)
        self.supernet = supernet
        self.space = supernet.search_space
        self.datamodule = datamodule
        self.val_dataloaders = val_dataloaders
        self.objectives = resolve_objectives(objectives, directions)
        self.constraints = parse_constraints(constraints, self.objectives)
        self.sampler_spec = sampler
        self.storage_spec = storage
        self.study_name = study_name or f"supernet-{self.space.fingerprint}"
        self.load_if_exists = load_if_exists
        self.resume = resume
        self.weights: str | None = None  # digest of the supernet's state_dict, taken by `setup`
        self.limit_val_batches = limit_val_batches
        self.latency_device = latency_device
        self.bn_recalibration_batches = bn_recalibration_batches
        self.tracking = None
        if mlflow is None:  # track by default where MLflow is set up
            mlflow = default_tracking_uri()
        if mlflow is not None and mlflow is not False:
            from lightning_supernet.integrations.mlflow import MlflowTracking

            self.tracking = MlflowTracking.from_any(mlflow)
            self.tracking.find_training_run(supernet)
        self.seed = seed
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.needed = {o.name for o in self.objectives} | {c.metric for c in self.constraints}
        self.study: optuna.Study | None = None
        self.reference: dict[str, float] | None = None
        self.evaluations = 0
        self._cache: dict[str, tuple[dict[str, float], int | str]] = {}
        self._cost_cache: dict[str, dict[str, float]] = {}
        self._trainer: pl.Trainer | None = None
        self.resolved_constraints: list = []
        self.rdb_storage = None

    # -- the pieces a subclass may override -------------------------------------------------------------------
    def make_sampler(self, seed: int | None) -> optuna.samplers.BaseSampler:
        """The sampler for ``sampler=`` (a string or ``None``); an instance given by the user is used as is.

        Example:
            >>> type(SubnetSearch(supernet, dm, sampler="nsga2").make_sampler(0)).__name__  # doctest: +SKIP
            'NSGAIISampler'
        """
        optuna = _optuna()
        spec = self.sampler_spec
        if spec is not None and not isinstance(spec, str):
            return spec
        if spec == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if spec == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        if spec == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=10)

    def suggest(self, trial: optuna.Trial) -> SubnetConfig:
        """One value per dim (param name = dim name), then :meth:`repair`; the repaired config is recorded."""
        values = {name: trial.suggest_categorical(name, list(dim.choices)) for name, dim in self.space.dims.items()}
        cfg = self.repair(values)
        if cfg.to_dict() != values:
            trial.set_user_attr("config", cfg.to_dict())
        return cfg

    def repair(self, values: Mapping[str, Any]) -> SubnetConfig:
        """Keep the earliest skipped blocks of a stack that keeps fewer than its minimum depth; validate
        (:meth:`SearchSpace.repair <lightning_supernet.space.SearchSpace.repair>`).

        Example:
            >>> search.repair(dict(search.space.smallest()))  # doctest: +SKIP
        """
        return self.space.repair(values)

    def motif(self, cfg: SubnetConfig) -> str:
        """The motif key of a config: equal for configs that extract to the same network.

        Example:
            >>> search.motif(space.config({"b.0.keep": False, "b.0.fc1.width": 8}))  # doctest: +SKIP
        """
        return motif_key(self.space.canonical(cfg))

    def should_evaluate(self, trial: optuna.Trial, cfg: SubnetConfig) -> bool:
        """Return ``False`` to prune the trial before its (new) motif is evaluated (see the class example)."""
        return True

    def costs(self, cfg: SubnetConfig) -> dict[str, float]:
        """``params``; ``macs`` and ``latency_ms`` when an objective or constraint needs them; cached by motif.

        Example:
            >>> search.costs(search.space.smallest())  # doctest: +SKIP
            {'params': 19562, 'macs': 283264}
        """
        key = self.motif(cfg)
        if key not in self._cost_cache:
            if "macs" in self.needed or self.reference is None:  # a MAC count is a traced forward: only if used
                out: dict[str, float] = dict(self.supernet.cost(cfg))
            else:
                with self.supernet.subnet(cfg):
                    out = {"params": _cost.active_params(self.supernet.model)}
            if "latency_ms" in self.needed:
                small = self.supernet.extract(cfg)
                out["latency_ms"] = _cost.measure_latency(
                    small, self.supernet.example_input_array, device=self.latency_device or self.supernet.device,
                    warmup=self.latency_warmup, repeats=self.latency_repeats)
            self._cost_cache[key] = out
        return dict(self._cost_cache[key])

    def recalibrate(self, cfg: SubnetConfig) -> None:
        """Re-estimate BatchNorm statistics of the active subnet (``recalibrate_bn``), when enabled."""
        batches = self.bn_recalibration_batches
        if batches is None:
            batches = 20 if has_batchnorm(self.supernet) else 0
        if not batches:
            return
        from lightning_supernet.callbacks.bn_recalibration import recalibrate_bn

        loader = calibration_loader(self)
        if loader is None:  # the same message from the same line is shown once
            warnings.warn("BN recalibration is skipped: it needs training batches; pass a `datamodule` with a "
                          "`train_dataloader()`", stacklevel=2)
            return
        recalibrate_bn(self.supernet, loader, batches)

    def validate(self, cfg: SubnetConfig) -> dict[str, float]:
        """Metrics of the active subnet from ``trainer.validate`` (the user's own metric names)."""
        with warnings.catch_warnings():  # the same Lightning notices on every trial would drown the progress bar
            for text in _REPEATED_NOTICES:
                warnings.filterwarnings("ignore", message=text)
            results = self._trainer.validate(self.supernet, dataloaders=val_loaders(self), verbose=False)
        metrics: dict[str, float] = {}
        for res in results:
            metrics.update({k: float(v) for k, v in res.items()})
        if not metrics:
            raise SearchError("`trainer.validate` logged no metric: the model's `validation_step` must `self.log` "
                              "the metrics named in `objectives` (e.g. self.log('val_acc', acc))")
        return metrics

    def evaluate(self, cfg: SubnetConfig) -> dict[str, float]:
        """All metrics of one subnet: its costs, then validation (after BN recalibration) under the subnet.

        Example:
            >>> search.evaluate(search.space.smallest())  # {'params': 19562, 'val_acc': 0.95, ...}  # doctest: +SKIP
        """
        metrics = self.costs(cfg)
        with self.supernet.subnet(cfg):
            self.recalibrate(cfg)
            metrics.update(self.validate(cfg))
        self.evaluations += 1
        return metrics

    def objective(self, trial: optuna.Trial) -> list[float]:
        """Optuna's objective: suggest, reuse the motif's metrics or evaluate, set constraints, return values."""
        cfg = self.suggest(trial)
        key = self.motif(cfg)
        trial.set_user_attr("motif", key)
        trial.set_user_attr("weights", self.weights)
        hit = self.lookup(key)
        if hit is not None:
            metrics, source = hit
            trial.set_user_attr("reused_from", source)
        else:
            if not self.should_evaluate(trial, cfg):
                raise _optuna().TrialPruned(f"`should_evaluate` rejected motif {key}")
            metrics = self.evaluate(cfg)
            self._cache[key] = (metrics, trial.number)
        trial.set_user_attr("metrics", metrics)
        for c in self.resolved_constraints:
            trial.set_constraint(c.metric, c.violation(metrics[c.metric]))
        return [metrics[o.name] for o in self.objectives]

    def lookup(self, key: str) -> tuple[dict[str, float], int | str] | None:
        """Metrics already measured for a motif (this process first, then trials other workers completed)."""
        if key not in self._cache and self.study is not None and self.rdb_storage is not None:
            self._load_cache()
        return self._cache.get(key)

    def export(self, cfg: Mapping[str, Any]) -> torch.nn.Module:
        """The standalone subnet of ``cfg`` (BatchNorm recalibrated when enabled); the supernet is unchanged.

        Example:
            >>> small = search.export(front[0]["config"])  # doctest: +SKIP
        """
        cfg = self.space.validate(cfg)
        state = bn_state(self.supernet)
        try:
            with self.supernet.subnet(cfg):
                self.recalibrate(cfg)
                return self.supernet.extract(cfg)
        finally:
            restore_bn_state(self.supernet, state)

    def pareto_front(self) -> ParetoFront:
        """The feasible non-dominated trials, one per motif, best first by the first objective.

        Example:
            >>> print(search.pareto_front())  # doctest: +SKIP
        """
        return ParetoFront.from_study(self.study, self.objectives)

    # -- running ----------------------------------------------------------------------------------------------
    def setup(self) -> optuna.Study:
        """Measure the largest subnet, check objectives/constraints against it, open or resume the study."""
        if self.study is not None:
            return self.study
        import lightning.pytorch as pl

        requeue = RequeueExtremes({"largest": self.space.largest().to_dict(),
                                   "smallest": self.space.smallest().to_dict()}) if self.enqueue_extremes else None
        storage, self.rdb_storage = make_storage(self.storage_spec, self.heartbeat_interval,  # fail fast, before evaluating
                                          grace_period=self.grace_period, stale_callback=requeue)
        if requeue is not None:
            requeue.rdb = self.rdb_storage
        self.weights = weights_digest(self.supernet)  # before BN recalibration touches any statistics
        self._trainer = pl.Trainer(**{
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, "devices": 1, "num_sanity_val_steps": 0,
            "limit_val_batches": self.limit_val_batches, **self.trainer_kwargs})
        self.bn_state_at_start = bn_state(self.supernet)
        largest = self.space.largest()
        self.reference = self.evaluate(largest)
        check_metrics(self.objectives, self.constraints, self.reference)
        self.resolved_constraints = [c.resolve(self.reference) for c in self.constraints]
        if any(c.metric in COST_METRICS for c in self.resolved_constraints):
            check_feasible(self.resolved_constraints, self.constraints, self.costs(self.space.smallest()), self.reference)
        self.study = open_study(self, storage, self.rdb_storage)
        self._cache.setdefault(self.motif(largest), (self.reference, "reference"))
        self._load_cache()
        if self.tracking is not None:
            self.tracking.start(self)
        return self.study

    def load_study(self) -> optuna.Study:
        """Open the existing study without evaluating anything (to export or inspect a finished search).

        The objectives are taken from the study.

        Raises:
            SearchError: no study of this name, or one made for another search space.

        Example:
            >>> search = SubnetSearch(supernet, dm, study_name="s"); _ = search.load_study()  # doctest: +SKIP
            >>> print(search.pareto_front())  # doctest: +SKIP
        """
        self.study, self.rdb_storage, self.objectives = load_study(self)
        return self.study

    def run(self, n_trials: int | None = 50, *, n_jobs: int = 1, timeout: float | None = None,
            show_progress_bar: bool | None = None, total_trials: int | None = None) -> SearchResult:
        """Run ``n_trials`` more trials (split over ``n_jobs`` forked worker processes) and return the result.

        With ``total_trials``, run until the study holds that many trials, counting earlier runs (Optuna's
        ``MaxTrialsCallback`` idiom): complete, pruned and failed trials and those other workers are running
        count; trials killed with their process do not (they are redone), nor does a trial killed less than
        ``grace_period`` seconds ago that has not been marked FAIL yet. ``n_trials`` (``None``: no limit) then caps
        what this call runs.

        Raises:
            SearchError: a bad ``n_trials``/``n_jobs``/``total_trials``, or ``n_jobs > 1`` without a shared
                storage.
            InfeasibleConstraintsError: even the smallest subnet breaks a cost constraint.
            StorageError: the storage cannot be reached.

        Example:
            >>> study, front = SubnetSearch(supernet, dm, storage=None).run(n_trials=30)  # doctest: +SKIP
        """
        return run_search(self, n_trials, n_jobs=n_jobs, timeout=timeout, show_progress_bar=show_progress_bar,
                          total_trials=total_trials)

    def run_trials(self, n_trials: int, timeout: float | None, show_progress_bar: bool) -> None:
        """Run ``n_trials`` trials of this process on the study (no resume bookkeeping: :meth:`run` does that).

        Example:
            >>> SubnetSearch(supernet, dm, storage=None).run_trials(4, None, False)  # doctest: +SKIP
        """
        callbacks = [self._after_trial] + ([self.total_trials_callback] if getattr(self, "total_trials_callback", None) else [])
        self.study.optimize(self._objective, n_trials=n_trials, timeout=timeout, catch=self.catch,
                            callbacks=callbacks, show_progress_bar=show_progress_bar, gc_after_trial=False)

    def _objective(self, trial: optuna.Trial) -> list[float]:
        try:
            return self.objective(trial)
        except _optuna().TrialPruned:
            raise
        except Exception as err:  # recorded for the trial's MLflow run, then Optuna marks the trial FAIL
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}"[:2000])
            raise

    def _after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.tracking is not None:
            self.tracking.log_trial(self, trial)

    def _load_cache(self) -> None:
        for key, hit in measured_motifs(self.study, self.weights).items():
            self._cache.setdefault(key, hit)


def search_subnets(supernet: SupernetModule, datamodule: pl.LightningDataModule | None = None, *,
                   val_dataloaders: Any = None, objectives: str | Sequence[str] = ("val_acc", "params"),
                   directions: Sequence[str] | Mapping[str, str] | None = None,
                   constraints: Mapping[str, Any] | None = None, n_trials: int | None = 50, sampler: Any = None,
                   storage: Any = "sqlite:///search.db", study_name: str | None = None, load_if_exists: bool = True,
                   limit_val_batches: int | float | None = None, latency_device: str | torch.device | None = None,
                   bn_recalibration_batches: int | None = None, mlflow: MlflowTracking | str | bool | None = None,
                   n_jobs: int = 1, show_progress_bar: bool | None = None, timeout: float | None = None,
                   seed: int | None = None, resume: str = "check", total_trials: int | None = None) -> SearchResult:
    """Search a trained supernet for the best subnets under several objectives (see :class:`SubnetSearch`).

    Args:
        n_trials: trials this call runs (a resumed study keeps its earlier trials and adds these); with
            ``total_trials``, at most this many (``None``: no limit).
        total_trials: run until the study holds this many trials over all its runs, so that a killed and resumed
            search reaches the total instead of adding ``n_trials`` each time (see :meth:`SubnetSearch.run`).
        n_jobs: worker processes (forked; they share the study through ``storage``).
        show_progress_bar: Optuna's progress bar (default: when stderr is a terminal).
        timeout: stop starting trials after this many seconds.
        mlflow: tracking; by default on when MLflow is installed and a tracking URI is set or ``mlflow.db`` is
            in the working directory; ``mlflow=False`` opts out (see :class:`SubnetSearch`).
        The other arguments are :class:`SubnetSearch`'s.

    Returns:
        ``SearchResult(study, pareto_front)``; ``print(pareto_front)`` shows the table.

    Raises:
        SearchError: unknown objective, constraint on a missing metric, bad arguments.
        InfeasibleConstraintsError: no subnet can satisfy the cost constraints.
        StorageError: the storage URL cannot be reached.

    Example:
        >>> study, front = search_subnets(supernet, dm, objectives=("val_acc", "latency_ms"),
        ...                               constraints={"params": 0.5}, n_trials=30, sampler="nsga2",
        ...                               storage="sqlite:///search.db")  # doctest: +SKIP
        >>> front[0]["config"]  # doctest: +SKIP
    """
    search = SubnetSearch(supernet, datamodule, val_dataloaders=val_dataloaders, objectives=objectives,
                          directions=directions, constraints=constraints, sampler=sampler, storage=storage,
                          study_name=study_name, load_if_exists=load_if_exists, limit_val_batches=limit_val_batches,
                          latency_device=latency_device, bn_recalibration_batches=bn_recalibration_batches,
                          mlflow=mlflow, seed=seed, resume=resume)
    return search.run(n_trials, n_jobs=n_jobs, timeout=timeout, show_progress_bar=show_progress_bar,
                      total_trials=total_trials)


# -- helpers --------------------------------------------------------------------------------------------------------
def _optuna() -> Any:
    return require("optuna", "optuna", "the subnet search")

