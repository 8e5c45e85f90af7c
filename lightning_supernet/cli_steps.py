"""What the ``lightning-supernet`` subcommands do besides Lightning's own loops: weights, search, export.

These functions take already-built objects (the CLI builds them from the config), so they are usable from Python.

Example:
    >>> from lightning_supernet.cli_options import SearchOptions
    >>> search_kwargs(SearchOptions(n_trials=5), "runs/x")["storage"]
    'sqlite:///runs/x/search.db'
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

from lightning_supernet.errors import CheckpointError, SearchError, SupernetError
from lightning_supernet.files import load_weights, save_module, save_weights

__all__ = ["CLIError", "export_subnets", "load_supernet_weights", "run_search", "save_supernet_weights",
           "search_kwargs", "say"]

_RUN_KEYS = ("n_trials", "n_jobs", "timeout")


class CLIError(SupernetError, ValueError):
    """A bad config value, missing file or class path given to the ``lightning-supernet`` command.

    Example:
        >>> issubclass(CLIError, ValueError)
        True
    """


def say(text: str) -> None:
    """Print a line of the command's report (flushed, so it interleaves with Lightning's output).

    Example:
        >>> say("supernet weights: runs/x/supernet.pt")
        supernet weights: runs/x/supernet.pt
    """
    print(text, flush=True)


def save_supernet_weights(supernet: Any, path: str | Path, config: dict[str, Any] | None = None,
                          global_step: int = 0, mlflow_run_id: str | None = None) -> str:
    """Write the supernet's weights, search-space fingerprint and config atomically, with a sha256 digest.

    ``mlflow_run_id`` (the training run) is kept so that a later ``search`` links its run to it.

    Returns the digest.

    Example:
        >>> save_supernet_weights(supernet, "runs/x/supernet.pt")  # doctest: +SKIP
    """
    return save_weights(path, supernet.state_dict(), fingerprint=supernet.search_space.fingerprint,
                        config=config or {}, global_step=int(global_step), mlflow_run_id=mlflow_run_id)


def load_supernet_weights(supernet: Any, path: str | Path) -> dict[str, Any]:
    """Load weights written by :func:`save_supernet_weights` into ``supernet`` (digest and fingerprint checked).

    Raises:
        CheckpointError: the file is missing, damaged, or was saved for another search space.

    Example:
        >>> load_supernet_weights(supernet, "runs/x/supernet.pt")  # doctest: +SKIP
    """
    if not Path(path).exists():
        raise CheckpointError(f"`weights` {str(path)!r} does not exist; run `lightning-supernet fit` with the same "
                              "config first (it writes the supernet weights there)")
    state = load_weights(path)
    if state.get("fingerprint") != supernet.search_space.fingerprint:
        raise CheckpointError(f"`weights` {str(path)!r} was saved for search space {state.get('fingerprint')}, the "
                              f"config builds {supernet.search_space.fingerprint}: use the config that trained it")
    supernet.load_state_dict(state["state_dict"])
    return state


def search_kwargs(opts: Any, run_dir: str | Path) -> dict[str, Any]:
    """``SubnetSearch`` keyword arguments from a :class:`~lightning_supernet.cli_options.SearchOptions`.

    The storage defaults to ``sqlite:///<run_dir>/search.db`` and the validation trainer writes under ``run_dir``.

    Example:
        >>> from lightning_supernet.cli_options import SearchOptions
        >>> search_kwargs(SearchOptions(extra={"bn_recalibration_batches": 0}), "r")["bn_recalibration_batches"]
        0
    """
    values = dataclasses.asdict(opts)
    extra = values.pop("extra") or {}
    if values["resume"] is None:  # only when asked: older SubnetSearch versions have no `resume`
        values.pop("resume")
    for key in _RUN_KEYS:
        values.pop(key)
    if values["storage"] is None:
        values["storage"] = f"sqlite:///{Path(run_dir).as_posix()}/search.db"
    values["trainer_kwargs"] = {"default_root_dir": str(run_dir), **extra.pop("trainer_kwargs", {})}
    return {**values, **extra}


def _make_search(supernet: Any, data: Any, opts: Any, run_dir: str | Path, tracking: Any) -> Any:
    from lightning_supernet.integrations.optuna import SubnetSearch

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    try:
        return SubnetSearch(supernet, data, mlflow=tracking, **search_kwargs(opts, run_dir))
    except TypeError as err:  # an unknown key in `search.extra`
        raise CLIError(f"`search.extra`: {err}") from err


def _run_kwargs(search: Any, opts: Any) -> dict[str, Any]:
    """``run`` arguments that make ``opts.n_trials`` the study's total (Optuna's MaxTrialsCallback idiom)."""
    if "total_trials" in inspect.signature(search.run).parameters:
        return {"n_trials": None, "total_trials": opts.n_trials, "n_jobs": opts.n_jobs, "timeout": opts.timeout}
    study = search.setup()
    states = ("COMPLETE", "PRUNED", "FAIL")
    done = sum(t.state.name in states for t in study.get_trials(deepcopy=False))
    return {"n_trials": max(0, opts.n_trials - done), "n_jobs": opts.n_jobs, "timeout": opts.timeout}


def run_search(supernet: Any, data: Any, opts: Any, run_dir: str | Path, mlflow: Any = None,
               top_k: int = 3, training_run_id: str | None = None) -> Any:
    """Run (or resume) the Optuna search; prints the study, where it is stored, and the Pareto front.

    Example:
        >>> study, front = run_search(supernet, dm, SearchOptions(n_trials=10), "runs/x")  # doctest: +SKIP
        >>> front[0]["config"]  # doctest: +SKIP
    """
    tracking = None
    if mlflow is not None and mlflow.enabled:
        from lightning_supernet.integrations.mlflow import MlflowTracking

        link = {}
        if training_run_id and "training_run_id" in inspect.signature(MlflowTracking).parameters:
            link = {"training_run_id": training_run_id}
        tracking = MlflowTracking(tracking_uri=mlflow.tracking_uri, experiment_name=mlflow.experiment_name,
                                  top_k=top_k, **mlflow.location(), **link)
    search = _make_search(supernet, data, opts, run_dir, tracking if tracking is not None else False)
    try:
        result = search.run(**_run_kwargs(search, opts))
    except SearchError as err:
        if "resume=" not in str(err):
            raise
        raise CLIError(f"{err}. On the command line: --search.resume new, --search.resume ignore_weights, or "
                       "--search.study_name NAME") from err
    done = sum(t.state.name == "COMPLETE" for t in result.study.trials)
    reused = sum("reused_from" in t.user_attrs for t in result.study.trials)
    say(f"study {search.study_name!r} in {search.storage_spec}: {done} complete trials ({reused} reused an "
        f"evaluated motif)\nPareto front:\n{result.pareto_front}")
    if tracking is not None:
        say(f"MLflow: mlflow ui --backend-store-uri {mlflow.tracking_uri}")
    return result


def export_subnets(supernet: Any, data: Any, search_opts: Any, export_opts: Any, run_dir: str | Path) -> list[Path]:
    """Write the top-k Pareto subnets (or ``export.trials``) as models (``torch.save``, atomic) + JSON sidecars.

    Each ``subnet-trial-N.pt`` loads with :func:`lightning_supernet.files.load_module` (digest checked) or
    ``torch.load(path, weights_only=False)``.

    Example:
        >>> paths = export_subnets(supernet, dm, SearchOptions(), ExportOptions(top_k=2), "runs/x")  # doctest: +SKIP
    """
    from lightning_supernet.cost import count_params

    search = _make_search(supernet, data, search_opts, run_dir, False)
    search.load_study()
    front = search.pareto_front()
    if export_opts.trials is not None:
        by_number = {t.number: t for t in search.study.trials}
        missing = [n for n in export_opts.trials if n not in by_number or by_number[n].state.name != "COMPLETE"]
        if missing:
            raise CLIError(f"`export.trials` has {missing[0]}, not a complete trial of study {search.study_name!r}")
        rows = [{"trial": n, "config": by_number[n].user_attrs.get("config", by_number[n].params),
                 "metrics": by_number[n].user_attrs.get("metrics", {})} for n in export_opts.trials]
    else:
        rows = list(front)[: export_opts.top_k]
    out = Path(export_opts.out_dir or Path(run_dir) / "exported")
    full = count_params(supernet.extract(supernet.search_space.largest()))
    written, lines = [], []
    for row in rows:
        small = search.export(row["config"])
        path = save_module(small, out / f"subnet-trial-{row['trial']}.pt", {
            "trial": row["trial"], "study": search.study_name, "config": row["config"],
            "metrics": row.get("metrics", {})})
        written.append(path)
        n = count_params(small)
        lines.append(f"  {path}  {n:,} params ({n / full:.0%} of the largest, {full:,})")
    say("exported subnets (load with lightning_supernet.files.load_module(path)):\n" + "\n".join(lines))
    return written
