"""The study side of a subnet search: checks against the largest subnet, opening/resuming the study, workers.

These are :class:`~lightning_supernet.integrations.optuna.SubnetSearch`'s helpers, kept apart so that the class
shows only the steps a user may override.

Example:
    >>> from lightning_supernet.integrations._objectives import resolve_objectives
    >>> check_metrics(resolve_objectives(["val_acc"], None), [], {"val_acc": 0.9, "params": 10, "macs": 20})
"""

from __future__ import annotations

import difflib
import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_supernet.callbacks.bn_recalibration import bn_state  # the callback's BN snapshot
from lightning_supernet.callbacks.bn_recalibration import load_bn_state as restore_bn_state
from lightning_supernet.errors import InfeasibleConstraintsError, SearchError, SearchWorkerError
from lightning_supernet.integrations import require
from lightning_supernet.integrations._objectives import (
    COST_METRICS,
    Constraint,
    Objective,
    SearchResult,
    resolve_objectives,
)
from lightning_supernet.integrations._resume import (
    RESUME_MODES,
    TotalTrials,
    ensure_extremes,
    fail_stale,
    trials_left,
    weights_digest,
)
from lightning_supernet.integrations._storage import make_storage, prepare_fork, redact, reopen_after_fork

if TYPE_CHECKING:
    import optuna

    from lightning_supernet.integrations.optuna import SubnetSearch

__all__ = ["SAMPLERS", "bn_state", "calibration_loader", "check_arguments", "check_feasible", "check_metrics",
           "check_run_arguments", "has_batchnorm", "is_int", "load_study", "open_study", "restore_bn_state",
           "run_forked", "run_search", "val_loaders", "warn_if_empty"]

_META = "lightning_supernet"


SAMPLERS = ("tpe", "nsga2", "gp", "random")


def check_arguments(*, limit_val_batches: Any = None, bn_recalibration_batches: Any = None, sampler: Any = None,
                    resume: Any = "check") -> None:
    """Check :class:`~lightning_supernet.integrations.optuna.SubnetSearch`'s simple arguments.

    Raises:
        SearchError: naming the argument, the value and what is allowed.

    Example:
        >>> check_arguments(resume="maybe")
        Traceback (most recent call last):
        ...
        lightning_supernet.errors.SearchError: `resume` is 'maybe'; allowed: 'check', 'new', 'ignore_weights'
    """
    if limit_val_batches is not None and not (is_int(limit_val_batches, 1) or (
            isinstance(limit_val_batches, float) and 0 < limit_val_batches <= 1)):
        raise SearchError(f"`limit_val_batches` is {limit_val_batches!r}; allowed: None, an int >= 1 (batches) "
                          "or a float in (0, 1] (fraction of the loader)")
    if bn_recalibration_batches is not None and not is_int(bn_recalibration_batches, 0):
        raise SearchError(f"`bn_recalibration_batches` is {bn_recalibration_batches!r}; allowed: None or an "
                          "int >= 0")
    if not (sampler is None or sampler in SAMPLERS or hasattr(sampler, "sample_independent")):
        raise SearchError(f"`sampler` is {sampler!r}; allowed: None, {', '.join(map(repr, SAMPLERS))} or an "
                          "optuna.samplers.BaseSampler")
    if resume not in RESUME_MODES:
        raise SearchError(f"`resume` is {resume!r}; allowed: {', '.join(map(repr, RESUME_MODES))}")


def check_run_arguments(n_trials: Any, n_jobs: Any, total_trials: Any, storage: Any) -> None:
    """Check :meth:`~lightning_supernet.integrations.optuna.SubnetSearch.run`'s arguments.

    Raises:
        SearchError: naming the argument, the value and what is allowed.

    Example:
        >>> check_run_arguments(10, 2, None, None)
        Traceback (most recent call last):
        ...
        lightning_supernet.errors.SearchError: `n_jobs`=2 needs a storage the workers share, but `storage` is None \
(in memory); allowed: e.g. 'sqlite:///search.db' or a PostgreSQL URL
    """
    if n_trials is None and total_trials is None:
        raise SearchError("`n_trials` and `total_trials` are both None; allowed: an int >= 0 for either")
    if n_trials is not None and not is_int(n_trials, 0):
        raise SearchError(f"`n_trials` is {n_trials!r}; allowed: an int >= 0 (trials this call runs), or None "
                          "with `total_trials`")
    if total_trials is not None and not is_int(total_trials, 0):
        raise SearchError(f"`total_trials` is {total_trials!r}; allowed: None or an int >= 0 (trials the study "
                          "should hold, over all resumes)")
    if not is_int(n_jobs, 1):
        raise SearchError(f"`n_jobs` is {n_jobs!r}; allowed: an int >= 1 (worker processes)")
    if n_jobs > 1 and storage is None:
        raise SearchError(f"`n_jobs`={n_jobs} needs a storage the workers share, but `storage` is None "
                          "(in memory); allowed: e.g. 'sqlite:///search.db' or a PostgreSQL URL")


def is_int(value: Any, low: int) -> bool:
    """Whether ``value`` is an int (not a bool) ``>= low``.

    Example:
        >>> is_int(3, 1), is_int(True, 0), is_int(2.0, 1)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_metrics(objectives: Sequence[Objective], constraints: Sequence[Constraint],
                  reference: Mapping[str, float]) -> None:
    """Every objective and constrained metric must be measured (and finite) on the largest subnet.

    Raises:
        SearchError: naming the argument, the metric and the metrics that exist.

    Example:
        >>> check_metrics([Objective("val_accuracy", "maximize")], [], {"val_acc": 0.9})
        Traceback (most recent call last):
        ...
        lightning_supernet.errors.SearchError: `objectives` has 'val_accuracy', which the search cannot measure \
(did you mean 'val_acc'?); allowed: val_acc, params, macs, latency_ms (metrics the `validation_step` logs, and costs)
    """
    available = list(reference) + [m for m in COST_METRICS if m not in reference]
    for o in objectives:
        if o.name not in reference:
            raise SearchError(f"`objectives` has {o.name!r}, which the search cannot measure"
                              f"{_close(o.name, available)}; allowed: {', '.join(available)} (metrics the "
                              "`validation_step` logs, and costs)")
    for c in constraints:
        if c.metric not in reference:
            raise SearchError(f"`constraints` bounds {c.metric!r}, a metric that is never measured"
                              f"{_close(c.metric, available)}; allowed: {', '.join(available)}")
    for name in [o.name for o in objectives] + [c.metric for c in constraints]:
        if not math.isfinite(reference[name]):
            raise SearchError(f"the largest subnet's {name!r} is {reference[name]}; metrics used by the search must "
                              "be finite numbers")


def check_feasible(resolved: Sequence[Constraint], raw: Sequence[Constraint], smallest: Mapping[str, float],
                   largest: Mapping[str, float]) -> None:
    """Params and MACs shrink with every dim, so if the smallest subnet breaks a cost bound, every subnet does.

    Raises:
        InfeasibleConstraintsError: naming the constraint, the smallest subnet's value and the bound allowed.

    Example:
        >>> c = Constraint("params", 0.01, "<=", relative=True, spec=0.01)
        >>> check_feasible([c.resolve({"params": 1000})], [c], {"params": 200}, {"params": 1000})
        Traceback (most recent call last):
        ...
        lightning_supernet.errors.InfeasibleConstraintsError: `constraints['params']` = 0.01 (params <= 10) cannot \
be met: even the smallest subnet has params = 200 (largest: 1,000). Allowed: a bound >= 200, i.e. a fraction >= 0.2
    """
    for c, spec in zip(resolved, raw, strict=True):
        bounded = c.metric in COST_METRICS and c.sense == "<=" and c.metric in smallest
        if bounded and not c.satisfied(smallest[c.metric]):
            need = smallest[c.metric] / largest[c.metric]
            raise InfeasibleConstraintsError(
                f"`constraints[{c.metric!r}]` = {spec.spec!r} ({c.describe()}) cannot be met: even the smallest "
                f"subnet has {c.metric} = {smallest[c.metric]:,.6g} (largest: {largest[c.metric]:,.6g}). "
                f"Allowed: a bound >= {smallest[c.metric]:,.6g}, i.e. a fraction >= {need:.4g}")


def open_study(search: SubnetSearch, storage: Any, rdb: Any = None) -> optuna.Study:
    """Create or resume ``search.study_name``; a resumed study must have the same search space, objectives and
    weights (``search.weights``, see ``resume=``).

    Stale trials (heartbeat stopped) are failed, then the largest and the smallest subnet are enqueued if they
    have not run (``search.enqueue_extremes``), once even when several workers start together.

    Raises:
        SearchError: the study exists with other objectives/space, with other weights (``resume="check"``), or
            exists and ``load_if_exists`` is False.
    """
    optuna = require("optuna", "optuna", "the subnet search")
    directions = [o.direction for o in search.objectives]
    names = [o.name for o in search.objectives]
    try:
        study = optuna.create_study(storage=storage, sampler=search.make_sampler(search.seed),
                                    study_name=search.study_name, directions=directions,
                                    load_if_exists=search.load_if_exists)
    except optuna.exceptions.DuplicatedStudyError as err:
        raise SearchError(f"`study_name`={search.study_name!r} already exists in the storage and `load_if_exists` "
                          "is False; allowed: a new name, or load_if_exists=True") from err
    fingerprint = search.space.fingerprint
    meta = study.user_attrs.get(_META)
    if meta is None:
        study.set_user_attr(_META, {"fingerprint": fingerprint, "objectives": names, "directions": directions,
                                    "weights": search.weights})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    elif (meta.get("fingerprint"), meta.get("objectives"), meta.get("directions")) != (fingerprint, names, directions):
        raise SearchError(
            f"`study_name`={search.study_name!r} holds a study of search space {meta.get('fingerprint')} with "
            f"objectives {meta.get('objectives')} {meta.get('directions')}; this search has space {fingerprint} and "
            f"{names} {directions}. HINT: pass another `study_name`, or the same model and objectives")
    elif meta.get("weights") != search.weights and search.resume != "ignore_weights":
        if search.resume == "new":
            search.study_name = f"{search.study_name}-w{search.weights[:8]}"
            return open_study(search, storage, rdb)
        old = meta.get("weights") or "unrecorded (an older lightning-supernet)"
        raise SearchError(
            f"`study_name`={search.study_name!r} in storage {_where(search.storage_spec)} was measured on other "
            f"supernet weights (digest {old}) than this supernet's (digest {search.weights}): retrained, or another "
            f"checkpoint? Its trials and Pareto front do not describe these weights. Allowed: resume='new' (start a "
            f"fresh study, {search.study_name + '-w' + search.weights[:8]!r}), resume='ignore_weights' (continue "
            "this study; metrics measured on other weights are never reused), or another `study_name`")
    fail_stale(study)
    if search.enqueue_extremes:
        ensure_extremes(study, rdb, {"largest": search.space.largest().to_dict(),
                                     "smallest": search.space.smallest().to_dict()})
    return study


def _where(spec: Any) -> str:
    if spec is None:
        return "in memory"
    return repr(redact(str(spec))) if isinstance(spec, (str, os.PathLike)) else type(spec).__name__


def load_study(search: SubnetSearch) -> tuple[optuna.Study, Any, list[Objective]]:
    """Open an existing study without evaluating anything; its objectives come from the study.

    Raises:
        SearchError: no study of that name, or one made for another search space.
    """
    optuna = require("optuna", "optuna", "the subnet search")
    storage, rdb = make_storage(search.storage_spec, search.heartbeat_interval, grace_period=search.grace_period)
    try:
        study = optuna.load_study(study_name=search.study_name, storage=storage)
    except KeyError as err:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise SearchError(f"`study_name`={search.study_name!r} is not in the storage; allowed: {names}") from err
    meta = study.user_attrs.get(_META) or {}
    if meta.get("fingerprint", search.space.fingerprint) != search.space.fingerprint:
        raise SearchError(f"`study_name`={search.study_name!r} was made for search space {meta['fingerprint']}, "
                          f"this supernet's is {search.space.fingerprint}: build it with the same model and `space=`")
    digest = search.weights = weights_digest(search.supernet)
    if meta.get("weights") != digest:
        warnings.warn(f"`study_name`={search.study_name!r} was measured on other supernet weights (digest "
                      f"{meta.get('weights')}) than this supernet's ({digest}): its metrics may not hold for subnets "
                      "exported from these weights", stacklevel=3)
    objectives = search.objectives
    if meta.get("objectives"):
        objectives = resolve_objectives(meta["objectives"], meta.get("directions"))
    return study, rdb, objectives


def run_search(search: SubnetSearch, n_trials: int | None, *, n_jobs: int = 1, timeout: float | None = None,
               show_progress_bar: bool | None = None, total_trials: int | None = None) -> SearchResult:
    """The body of :meth:`SubnetSearch.run <lightning_supernet.integrations.optuna.SubnetSearch.run>`: set up,
    run the trials this call owes (here or in forked workers), restore BatchNorm statistics, track, and return.

    Example:
        >>> study, front = run_search(search, 10)  # doctest: +SKIP
    """
    check_run_arguments(n_trials, n_jobs, total_trials, search.storage_spec)
    optuna = require("optuna", "optuna", "the subnet search")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(search.optuna_verbosity)
    try:
        search.setup()
        if show_progress_bar is None:
            show_progress_bar = sys.stderr.isatty()
        search.total_trials_callback = None if total_trials is None else TotalTrials(total_trials)
        n_trials = trials_left(search.study, n_trials, total_trials)
        if n_trials and n_jobs == 1:
            search.run_trials(n_trials, timeout, show_progress_bar)
        elif n_trials:
            run_forked(search, n_trials, n_jobs, timeout)
    except BaseException:
        if search.tracking is not None and search.study is not None:
            search.tracking.abort(search)  # the trials so far get their runs; the parent run is marked FAILED
        raise
    finally:
        optuna.logging.set_verbosity(verbosity)
        if getattr(search, "bn_state_at_start", None):
            restore_bn_state(search.supernet, search.bn_state_at_start)
    front = search.pareto_front()
    warn_if_empty(search.study, front, search.resolved_constraints)
    if search.tracking is not None:
        search.tracking.finish(search, front)
    return SearchResult(search.study, front)


def run_forked(search: SubnetSearch, n_trials: int, n_jobs: int, timeout: float | None) -> None:
    """Split ``n_trials`` over ``n_jobs`` forked processes sharing the study's storage; wait for all.

    Each worker gets its own sampler seed (else all would propose the same subnets) and a share of the CPU threads.

    Raises:
        SearchError: CUDA is initialised (it does not survive ``fork``) or the platform cannot fork.
        SearchWorkerError: a worker exited with an error (the trials it completed stay in the study).
    """
    if os.name != "posix" or torch.cuda.is_initialized():
        raise SearchError(f"`n_jobs`={n_jobs} forks worker processes, which CUDA (or this OS) does not allow; "
                          "allowed here: n_jobs=1. HINT: start several `lightning-supernet search` processes on one "
                          "PostgreSQL study instead")
    # the queued trials (largest, smallest) run here first: SQLite cannot lock the row of a waiting trial, so two
    # workers could both pop it and the second would fail to report it
    optuna = require("optuna", "optuna", "the subnet search")
    waiting = search.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    if waiting:
        first = min(len(waiting), n_trials)
        search.run_trials(first, timeout, show_progress_bar=False)
        n_trials -= first
    if n_trials <= 0:
        return
    prepare_fork(search.rdb_storage)
    ctx = multiprocessing.get_context("fork")
    shares = [n_trials // n_jobs + (i < n_trials % n_jobs) for i in range(n_jobs)]
    procs = [ctx.Process(target=_worker, args=(search, i, share, timeout, n_jobs))
             for i, share in enumerate(shares) if share]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise SearchWorkerError(f"search worker(s) {failed} (index, exit code) failed; the trials they completed are "
                                "in the study. See their tracebacks above")


def _worker(search: SubnetSearch, index: int, n_trials: int, timeout: float | None, n_jobs: int) -> None:
    optuna = require("optuna", "optuna", "the subnet search")
    reopen_after_fork(search.rdb_storage, child=True)
    torch.set_num_threads(max(1, torch.get_num_threads() // n_jobs))
    seed = None if search.seed is None else search.seed + 1000 * (index + 1)
    sampler = search.make_sampler(seed)
    if sampler is search.sampler_spec and hasattr(sampler, "reseed_rng"):
        sampler.reseed_rng()
    search.study = optuna.load_study(study_name=search.study_name, storage=search.study._storage, sampler=sampler)
    search.run_trials(n_trials, timeout, show_progress_bar=False)


def val_loaders(search: SubnetSearch) -> Any:
    """The search's validation loader(s): given, or the datamodule's, materialised once (not set up every trial)."""
    if search.val_dataloaders is None:
        search.datamodule.prepare_data()
        search.datamodule.setup("validate")
        search.val_dataloaders = search.datamodule.val_dataloader()
    return search.val_dataloaders


def calibration_loader(search: SubnetSearch) -> Any:
    """Training batches for BN recalibration: the datamodule's ``train_dataloader()``, or ``None``."""
    if not hasattr(search, "calibration_loader"):
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        search.calibration_loader = None
        if search.datamodule is not None:
            try:  # a datamodule without `train_dataloader` raises one of these
                search.datamodule.setup("fit")
                search.calibration_loader = search.datamodule.train_dataloader()
            except (NotImplementedError, MisconfigurationException):
                search.calibration_loader = None
    return search.calibration_loader


def warn_if_empty(study: optuna.Study, front: Sequence[Any], resolved: Sequence[Constraint]) -> None:
    """Warn when trials completed but none meets the constraints (the Pareto front is empty).

    Example:
        >>> warn_if_empty(None, [{"trial": 0}], [])  # a front: nothing to say
    """
    if front or not resolved:
        return
    if any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        warnings.warn(f"no completed trial meets the constraints ({'; '.join(c.describe() for c in resolved)}): the "
                      "Pareto front is empty. HINT: loosen them or run more trials", stacklevel=5)


def has_batchnorm(module: torch.nn.Module) -> bool:
    """Whether the model holds a BatchNorm layer (then subnets need recalibrated statistics)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _close(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=2)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
