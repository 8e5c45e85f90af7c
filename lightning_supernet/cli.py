"""The ``lightning-supernet`` command: ``fit``, ``search``, ``export`` and ``demo``.

LightningCLI conventions where they fit: one YAML config (``--config``) names the user's LightningModule and
LightningDataModule by ``class_path``/``init_args``; any value can be overridden with a dotted flag
(``--trainer.max_epochs 3``, ``--search.n_trials=50``); ``--print_config`` prints the merged config and exits.

.. code-block:: yaml

    seed_everything: 0
    torch_num_threads: null                           # torch.set_num_threads (null: torch's default)
    model: {class_path: lightning_supernet.demo.DigitsViT, init_args: {dim: 64}}
    data: {class_path: lightning_supernet.demo.DigitsDataModule, init_args: {batch_size: 64}}
    supernet: {space: {min_depth: 0.5}}               # SupernetModule arguments
    trainer:                                          # Trainer arguments; callbacks by class_path
      max_epochs: 8
      callbacks: [{class_path: lightning_supernet.callbacks.SandwichSampling, init_args: {num_random: 2}}]
    mlflow: {enabled: true, tracking_uri: "sqlite:///mlflow.db"}
    checkpoint: runs/supernet.pt                      # written by fit, read by search and export
    search: {objectives: [val_acc, params], n_trials: 30, storage: "sqlite:///search.db"}
    export: {top_k: 3, out_dir: runs/exported}

``fit`` trains the supernet and saves its weights to ``checkpoint``; ``search`` runs (or resumes) the Optuna
study; ``export`` writes the best Pareto subnets as standalone models; ``demo`` does all three on the digits ViT.

Example:
    >>> main(["demo", "--print_config"])  # doctest: +SKIP
    >>> main(["search", "--config", "cfg.yaml", "--search.n_trials", "50"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_supernet.errors import SupernetError

__all__ = ["DEMO_CONFIG", "CLIError", "load_config", "main", "run_export", "run_fit", "run_search"]

DEMO_CONFIG: dict[str, Any] = {
    "seed_everything": 0,
    # the digits ViT is tiny: intra-op threads only add synchronisation (4-5x slower on a busy 2-core machine)
    "torch_num_threads": 1,
    "model": {"class_path": "lightning_supernet.demo.DigitsViT",
              "init_args": {"dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0, "patch_size": 4, "lr": 5e-3}},
    "data": {"class_path": "lightning_supernet.demo.DigitsDataModule", "init_args": {"batch_size": 32}},
    "supernet": {"space": {"min_depth": 0.5}, "eval_subnets": ["largest", "smallest"]},
    "trainer": {"max_epochs": 12, "accelerator": "cpu", "devices": 1, "enable_checkpointing": False,
                "log_every_n_steps": 10,
                "callbacks": [{"class_path": "lightning_supernet.callbacks.SandwichSampling",
                               "init_args": {"num_random": 1}},
                              {"class_path": "lightning_supernet.callbacks.InplaceDistillation"}]},
    "mlflow": {"enabled": True, "tracking_uri": "sqlite:///mlflow.db", "experiment_name": "lightning-supernet-demo"},
    "checkpoint": "runs/demo/supernet.pt",
    "search": {"objectives": ["val_acc", "params"], "n_trials": 30, "storage": "sqlite:///search.db",
               "study_name": None, "sampler": "tpe", "constraints": None, "limit_val_batches": None, "n_jobs": 1,
               "seed": 0},
    "export": {"top_k": 3, "out_dir": "runs/demo/exported", "trials": None},
}
_SECTIONS = ("seed_everything", "torch_num_threads", "model", "data", "supernet", "trainer", "mlflow", "checkpoint",
             "search", "export")


class CLIError(SupernetError, ValueError):
    """A bad config file, override or class path given to the ``lightning-supernet`` command.

    Example:
        >>> issubclass(CLIError, ValueError)
        True
    """


# -- config -------------------------------------------------------------------------------------------------------
def load_config(path: str | None, overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None) -> dict:
    """The merged config: ``base`` (or nothing), then the YAML file, then ``--a.b value`` overrides.

    Raises:
        CLIError: a missing or malformed file, an unknown top-level key, a malformed override.

    Example:
        >>> load_config(None, ["--search.n_trials=5"], base=DEMO_CONFIG)["search"]["n_trials"]
        5
    """
    cfg = copy.deepcopy(dict(base or {}))
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise CLIError(f"`--config` {path!r} cannot be read: {err}") from err
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise CLIError(f"`--config` {path!r} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise CLIError(f"`--config` {path!r} must hold a mapping, got {type(loaded).__name__}")
        _merge(cfg, loaded)
    items = list(overrides)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--") or flag == "--":
            raise CLIError(f"unexpected argument {flag!r}; allowed: --config PATH, --print_config, --section.key VALUE")
        key, eq, value = flag[2:].partition("=")
        if not eq:
            if not items:
                raise CLIError(f"override `--{key}` has no value; allowed: --{key} VALUE or --{key}=VALUE")
            value = items.pop(0)
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CLIError(f"override `--{key}`: `{part}` is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    unknown = [k for k in cfg if k not in _SECTIONS]
    if unknown:
        raise CLIError(f"config key {unknown[0]!r} is unknown; allowed top-level keys: {', '.join(_SECTIONS)}")
    return cfg


def _merge(into: dict, new: Mapping) -> None:
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict) and "class_path" not in v:
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)


def instantiate(spec: Any, what: str) -> Any:
    """Build ``{"class_path": "pkg.Class", "init_args": {...}}`` (nested specs too); other values pass through.

    Example:
        >>> instantiate({"class_path": "collections.Counter", "init_args": {"a": 2}}, "x")["a"]
        2
    """
    if isinstance(spec, str) and "." in spec and spec.split(".")[-1][:1].isupper():
        spec = {"class_path": spec}
    if isinstance(spec, list):
        return [instantiate(s, what) for s in spec]
    if not (isinstance(spec, Mapping) and "class_path" in spec):
        return spec
    path = spec["class_path"]
    module, _, name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise CLIError(f"`{what}.class_path` {path!r} cannot be imported ({err}); allowed: an importable "
                       "'package.module.ClassName'") from err
    args = {k: instantiate(v, f"{what}.init_args.{k}") for k, v in (spec.get("init_args") or {}).items()}
    try:
        return cls(**args)
    except TypeError as err:
        raise CLIError(f"`{what}`: {path}({', '.join(args)}) failed: {err}") from err


# -- the steps ----------------------------------------------------------------------------------------------------
def _build(cfg: Mapping[str, Any]) -> tuple[Any, Any]:
    import lightning.pytorch as pl

    from lightning_supernet import SupernetModule

    if cfg.get("seed_everything") is not None:
        pl.seed_everything(cfg["seed_everything"], verbose=False)
    threads = cfg.get("torch_num_threads")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise CLIError(f"`torch_num_threads` is {threads!r}; allowed: an int >= 1, or null for torch's default")
        import torch

        torch.set_num_threads(threads)
    if "model" not in cfg or "data" not in cfg:
        raise CLIError("the config needs `model` and `data` sections (class_path + init_args of your "
                       "LightningModule and LightningDataModule)")
    model = instantiate(cfg["model"], "model")
    data = instantiate(cfg["data"], "data")
    supernet = SupernetModule(model, **(cfg.get("supernet") or {}))
    return supernet, data


def _load_weights(supernet: Any, path: str | None) -> None:
    import torch

    if not path or not Path(path).exists():
        raise CLIError(f"`checkpoint` {path!r} does not exist; run `lightning-supernet fit` first (it writes the "
                       "supernet weights there)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != supernet.search_space.fingerprint:
        raise CLIError(f"`checkpoint` {path!r} was saved for search space {state.get('fingerprint')}, the config "
                       f"builds {supernet.search_space.fingerprint}: use the config that trained it")
    supernet.load_state_dict(state["state_dict"])


def _tracking_uri(cfg: Mapping[str, Any]) -> str | None:
    m = cfg.get("mlflow") or {}
    return m.get("tracking_uri", "sqlite:///mlflow.db") if m.get("enabled", False) else None


def run_fit(cfg: Mapping[str, Any]) -> tuple[Any, Any]:
    """Train the supernet with the config's Trainer and save its weights to ``checkpoint``.

    Returns:
        ``(supernet, datamodule)``.

    Example:
        >>> supernet, dm = run_fit(load_config("cfg.yaml"))  # doctest: +SKIP
    """
    import lightning.pytorch as pl
    import torch

    supernet, data = _build(cfg)
    targs = dict(cfg.get("trainer") or {})
    targs["callbacks"] = instantiate(targs.get("callbacks") or [], "trainer.callbacks")
    uri = _tracking_uri(cfg)
    if "logger" in targs:
        targs["logger"] = instantiate(targs["logger"], "trainer.logger")
    elif uri is not None:
        from lightning_supernet.integrations.mlflow import mlflow_logger

        targs["logger"] = mlflow_logger(tracking_uri=uri, experiment_name=cfg["mlflow"].get(
            "experiment_name", "lightning-supernet"), run_name="fit")
    else:
        targs["logger"] = False
    trainer = pl.Trainer(**targs)
    trainer.fit(supernet, datamodule=data)
    path = cfg.get("checkpoint")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": supernet.state_dict(), "fingerprint": supernet.search_space.fingerprint,
                    "config": {k: cfg[k] for k in ("model", "data", "supernet") if k in cfg}}, path)
        _say(f"supernet weights: {path}")
    return supernet, data


_SEARCH_KEYS = ("objectives", "directions", "constraints", "sampler", "storage", "study_name", "load_if_exists",
                "limit_val_batches", "latency_device", "bn_recalibration_batches", "seed", "trainer_kwargs")
_RUN_KEYS = ("n_trials", "n_jobs", "timeout", "show_progress_bar")


def _search_args(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    s = dict(cfg.get("search") or {})
    unknown = [k for k in s if k not in _SEARCH_KEYS + _RUN_KEYS]
    if unknown:
        raise CLIError(f"`search.{unknown[0]}` is unknown; allowed: {', '.join(_SEARCH_KEYS + _RUN_KEYS)}")
    return {k: s[k] for k in _SEARCH_KEYS if k in s}, {k: s[k] for k in _RUN_KEYS if k in s}


def _search(cfg: Mapping[str, Any], supernet: Any, data: Any) -> Any:
    from lightning_supernet.integrations.optuna import SubnetSearch

    kwargs, run_args = _search_args(cfg)
    uri = _tracking_uri(cfg)
    tracking = None
    if uri is not None:
        from lightning_supernet.integrations.mlflow import MlflowTracking

        tracking = MlflowTracking(tracking_uri=uri, experiment_name=cfg["mlflow"].get(
            "experiment_name", "lightning-supernet"), top_k=int((cfg.get("export") or {}).get("top_k", 3)))
    return SubnetSearch(supernet, data, mlflow=tracking, **kwargs), run_args


def run_search(cfg: Mapping[str, Any], supernet: Any = None, data: Any = None) -> Any:
    """Run (or resume) the search on the weights in ``checkpoint``; prints the Pareto front; returns the result.

    Example:
        >>> study, front = run_search(load_config("cfg.yaml"))  # doctest: +SKIP
    """
    _search_args(cfg)
    if supernet is None:
        supernet, data = _build(cfg)
        _load_weights(supernet, cfg.get("checkpoint"))
    search, run_args = _search(cfg, supernet, data)
    result = search.run(**run_args)
    done = sum(t.state.name == "COMPLETE" for t in result.study.trials)
    reused = sum("reused_from" in t.user_attrs for t in result.study.trials)
    _say(f"study {search.study_name!r}: {done} complete trials ({reused} reused an evaluated motif)\n"
         f"Pareto front:\n{result.pareto_front}")
    return result


def run_export(cfg: Mapping[str, Any], supernet: Any = None, data: Any = None) -> list[Path]:
    """Write the top-k Pareto subnets (or ``export.trials``) as standalone models (``torch.save``) + JSON.

    Example:
        >>> paths = run_export(load_config("cfg.yaml"))  # doctest: +SKIP
    """
    import torch

    _search_args(cfg)
    if supernet is None:
        supernet, data = _build(cfg)
        _load_weights(supernet, cfg.get("checkpoint"))
    search, _ = _search({**cfg, "mlflow": {"enabled": False}}, supernet, data)
    search.load_study()
    front = search.pareto_front()
    e = cfg.get("export") or {}
    trials = e.get("trials")
    if trials is not None:
        wanted = [int(t) for t in (trials if isinstance(trials, list) else str(trials).split(","))]
        by_number = {t.number: t for t in search.study.trials}
        missing = [n for n in wanted if n not in by_number or by_number[n].state.name != "COMPLETE"]
        if missing:
            raise CLIError(f"`export.trials` has {missing[0]}, not a complete trial of study {search.study_name!r}")
        rows = [{"trial": n, "config": by_number[n].user_attrs.get("config", by_number[n].params),
                 "metrics": by_number[n].user_attrs.get("metrics", {})} for n in wanted]
    else:
        rows = list(front)[: int(e.get("top_k", 3))]
    out = Path(e.get("out_dir") or "runs/exported")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for row in rows:
        small = search.export(row["config"])
        path = out / f"subnet-trial-{row['trial']}.pt"
        torch.save(small, path)
        path.with_suffix(".json").write_text(json.dumps(
            {"trial": row["trial"], "study": search.study_name, "config": row["config"],
             "metrics": row.get("metrics", {})}, indent=2, default=str))
        written.append(path)
    from lightning_supernet.cost import count_params

    full = count_params(supernet.extract(supernet.search_space.largest()))
    sizes = [count_params(torch.load(p, weights_only=False)) for p in written]
    _say("exported subnets (load with torch.load(path, weights_only=False)):\n"
         + "\n".join(f"  {p}  {n:,} params ({n / full:.0%} of the largest, {full:,})"
                      for p, n in zip(written, sizes, strict=True)))
    return written


def run_demo(cfg: Mapping[str, Any]) -> Any:
    """fit -> search -> MLflow -> export on the digits ViT, with a fresh study; prints where to look.

    Example:
        >>> run_demo(load_config(None, ["--search.n_trials", "30"], base=DEMO_CONFIG))  # doctest: +SKIP
    """
    start = time.time()
    cfg = copy.deepcopy(dict(cfg))
    if not (cfg.get("search") or {}).get("study_name"):
        cfg["search"]["study_name"] = time.strftime("demo-%Y%m%d-%H%M%S")
    _say("[1/3] training the supernet (digits ViT)")
    supernet, data = run_fit(cfg)
    _say(str(supernet.search_space))
    _say(f"[2/3] searching {cfg['search'].get('n_trials', 50)} subnets")
    run_search(cfg, supernet, data)
    _say("[3/3] exporting the best subnets")
    run_export(cfg, supernet, data)
    uri = _tracking_uri(cfg)
    _say(f"done in {time.time() - start:.0f} s.\n"
         + (f"MLflow runs (training, search, nested trials, Pareto plot, models):\n"
            f"  mlflow ui --backend-store-uri {uri}\n" if uri else "")
         + f"Optuna study {cfg['search']['study_name']!r} in {cfg['search'].get('storage')}")


def _say(text: str) -> None:
    print(text, flush=True)


# -- entry point --------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-supernet", description="Train a weight-sharing supernet, search "
                                "its subnets (Optuna), track them (MLflow) and export the best ones.")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"fit": "train the supernet; saves its weights to `checkpoint`",
             "search": "multi-objective subnet search (Optuna), resumable",
             "export": "write the best Pareto subnets as standalone models",
             "demo": "digits ViT: fit -> search -> MLflow -> export, in a few minutes on a CPU"}
    for name, text in helps.items():
        sp = sub.add_parser(name, help=text, description=text + ". Override any config value with "
                            "--section.key VALUE (e.g. --trainer.max_epochs 3).")
        sp.add_argument("--config", "-c", help="YAML config (model/data class paths, trainer, search...)")
        sp.add_argument("--print_config", action="store_true", help="print the merged config and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lightning-supernet`` command; returns the exit code.

    Example:
        >>> main(["demo", "--search.n_trials", "30"])  # doctest: +SKIP
        0
    """
    args, rest = _parser().parse_known_args(argv)
    try:
        base = DEMO_CONFIG if args.command == "demo" else None
        cfg = load_config(args.config, rest, base=base)
        if args.print_config:
            print(yaml.safe_dump(cfg, sort_keys=False), end="")
            return 0
        if args.command != "demo" and args.config is None and not rest:
            raise CLIError(f"`{args.command}` needs `--config PATH` (see `lightning-supernet demo --print_config` "
                           "for an example)")
        {"fit": run_fit, "search": run_search, "export": run_export, "demo": run_demo}[args.command](cfg)
    except SupernetError as err:
        print(f"lightning-supernet {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
