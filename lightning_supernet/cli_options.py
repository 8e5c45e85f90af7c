"""The config sections the ``lightning-supernet`` command adds to LightningCLI's ``model``/``data``/``trainer``.

Each is a dataclass: jsonargparse turns its fields into ``--section.field`` flags and config keys, with these
docstrings as help, type checks, and typos reported with the allowed keys.

Example:
    >>> SupernetOptions(sandwich=1).callbacks()[0].num_random
    1
    >>> SupernetOptions(distillation=None, sandwich=None).callbacks()
    []
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

__all__ = ["ExportOptions", "MlflowOptions", "SearchOptions", "SupernetOptions"]


@dataclass
class SupernetOptions:
    """How the model is wrapped into a ``SupernetModule`` and which supernet callbacks train it.

    Args:
        space: ``SupernetModule(space=...)``: restricts or overrides the discovered space, e.g.
            ``{min_depth: 0.5, width_ratios: [0.5, 0.75, 1.0]}``.
        eval_subnets: subnets validated every epoch (names ``largest``/``smallest``/``middle``); null: only
            the active (largest) subnet, under your own metric names.
        gradient_clip_val: gradient clipping done by the wrapper (the Trainer's is off under manual optimisation).
        accumulate_grad_batches: micro-batches per optimizer step (done by the wrapper).
        sandwich: ``SandwichSampling(num_random=...)``: random subnets per step besides the largest and smallest;
            null: no sandwich sampling (only the largest subnet trains).
        sampler: how the sandwich's random subnets are drawn: ``uniform`` or ``complexity``.
        distillation: ``InplaceDistillation(loss=...)``: the largest subnet teaches the others with this loss;
            null: off.
        temperature: distillation temperature.
        prioritization: ``ParameterPrioritization(importance=...)``: reorder channels/heads by importance before
            training; null: off.
        bn_recalibration: ``BNRecalibration(num_batches=...)`` before each validation (models with BatchNorm);
            null: off.

    Example:
        >>> [type(c).__name__ for c in SupernetOptions(prioritization="magnitude").callbacks()]
        ['ParameterPrioritization', 'SandwichSampling', 'InplaceDistillation']
    """

    space: Optional[dict[str, Any]] = None
    eval_subnets: Optional[list[str]] = field(default_factory=lambda: ["largest", "smallest", "middle"])
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    sandwich: Optional[int] = 2
    sampler: Literal["uniform", "complexity"] = "uniform"
    distillation: Optional[Literal["kl", "alpha_divergence", "mse", "bce"]] = "kl"
    temperature: float = 1.0
    prioritization: Optional[Literal["magnitude", "taylor", "activation"]] = None
    bn_recalibration: Optional[int] = None

    def module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``SupernetModule`` besides the model."""
        subnets = None if self.eval_subnets is None else tuple(self.eval_subnets)
        return {"space": self.space, "eval_subnets": subnets,
                "gradient_clip_val": self.gradient_clip_val, "accumulate_grad_batches": self.accumulate_grad_batches}

    def callbacks(self) -> list[Any]:
        """The supernet callbacks these options ask for (prioritization first, as it should run first)."""
        from lightning_supernet.callbacks import (BNRecalibration, InplaceDistillation, ParameterPrioritization,
                                                  SandwichSampling)

        out: list[Any] = []
        if self.prioritization is not None:
            out.append(ParameterPrioritization(importance=self.prioritization))
        if self.sandwich is not None:
            out.append(SandwichSampling(num_random=self.sandwich, sampler=self.sampler))
        if self.distillation is not None:
            out.append(InplaceDistillation(loss=self.distillation, temperature=self.temperature))
        if self.bn_recalibration is not None:
            out.append(BNRecalibration(num_batches=self.bn_recalibration))
        return out


@dataclass
class MlflowOptions:
    """MLflow tracking of ``fit`` (an ``MLFlowLogger`` when ``trainer.logger`` is not set) and of ``search``.

    Args:
        enabled: track in MLflow.
        tracking_uri: MLflow tracking URI (``sqlite:///mlflow.db`` is a file in the working directory).
        experiment_name: MLflow experiment.
        artifact_location: artifact root of a new experiment (null: MLflow's, ``./mlruns`` beside a sqlite store),
            e.g. ``runs/mlflow-artifacts``.

    Example:
        >>> MlflowOptions(enabled=True).tracking_uri
        'sqlite:///mlflow.db'
    """

    enabled: bool = False
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "lightning-supernet"
    artifact_location: Optional[str] = None

    def location(self) -> dict[str, Any]:
        """``{"artifact_location": ...}`` when one is set (for ``mlflow_logger`` and ``MlflowTracking``)."""
        return {} if self.artifact_location is None else {"artifact_location": self.artifact_location}


@dataclass
class SearchOptions:
    """The Optuna search of ``lightning-supernet search`` (arguments of ``SubnetSearch`` and its ``run``).

    Args:
        objectives: metrics the model's ``validation_step`` logs, plus ``params``, ``macs``, ``latency_ms``.
        directions: ``minimize``/``maximize`` per objective (null: costs minimised, the rest maximised).
        constraints: ``{metric: bound}``, e.g. ``{params: 0.5}`` (half the largest subnet's params).
        sampler: ``tpe``, ``nsga2``, ``gp`` or ``random``.
        storage: Optuna storage URL; null: ``sqlite:///<run_dir>/search.db``.
        study_name: null: derived by the search from the search space.
        load_if_exists: resume a study of the same name.
        n_trials: trials the study should hold: ``search`` runs only the missing ones, so a rerun after a kill
            completes the study instead of adding ``n_trials`` more (raise it to extend a finished search).
        n_jobs: worker processes sharing the study.
        timeout: stop starting trials after this many seconds.
        limit_val_batches: validation batches per trial (int) or fraction (float).
        seed: seed of the sampler.
        resume: a study measured on other weights: ``SubnetSearch(resume=...)`` (null: the search's default).
        extra: further keyword arguments of ``SubnetSearch`` (passed as given).

    Example:
        >>> SearchOptions(sampler="nsga2").objectives
        ['val_acc', 'params']
    """

    objectives: list[str] = field(default_factory=lambda: ["val_acc", "params"])
    directions: Optional[list[str]] = None
    constraints: Optional[dict[str, Any]] = None
    sampler: Literal["tpe", "nsga2", "gp", "random"] = "tpe"
    storage: Optional[str] = None
    study_name: Optional[str] = None
    load_if_exists: bool = True
    n_trials: int = 30
    n_jobs: int = 1
    timeout: Optional[float] = None
    limit_val_batches: Optional[Union[int, float]] = None
    seed: Optional[int] = 0
    resume: Optional[str] = None
    extra: Optional[dict[str, Any]] = None


@dataclass
class ExportOptions:
    """What ``lightning-supernet export`` writes.

    Args:
        top_k: export the first ``top_k`` subnets of the Pareto front.
        trials: export these trial numbers instead.
        out_dir: null: ``<run_dir>/exported``.

    Example:
        >>> ExportOptions(trials=[3]).top_k
        3
    """

    top_k: int = 3
    trials: Optional[list[int]] = None
    out_dir: Optional[str] = None
