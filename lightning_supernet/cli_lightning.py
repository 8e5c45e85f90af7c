"""``SupernetCLI``: Lightning's own ``LightningCLI`` whose model is wrapped into a ``SupernetModule``.

``model`` is your LightningModule (``class_path`` + ``init_args``), ``data`` your LightningDataModule, ``trainer``
the Trainer: all as in any LightningCLI. The subclass adds the sections ``supernet`` (wrapping and training
options, :class:`~lightning_supernet.cli_options.SupernetOptions`), ``search``, ``export``, ``mlflow``,
``run_dir`` (where every file goes) and ``weights``, and the subcommands ``search``, ``export`` and ``demo`` next
to Lightning's ``fit``/``validate``/``test``/``predict``; all read the same config file.

Example:
    >>> SupernetCLI(args=["fit", "--config", "cfg.yaml", "--trainer.max_epochs", "3"])  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_supernet.cli_options import ExportOptions, MlflowOptions, SearchOptions, SupernetOptions
from lightning_supernet.cli_steps import (export_subnets, load_supernet_weights, run_search, save_supernet_weights,
                                          say)
from lightning_supernet.files import check_writable, load_checkpoint

__all__ = ["DEMO_CONFIG", "SaveConfigBesideRun", "SupernetCLI", "config_dir"]

_EXTRA = {"search": "Search the trained supernet's subnets (Optuna, multi-objective, resumable).",
          "export": "Write the best Pareto subnets as standalone models.",
          "demo": "Digits ViT: fit -> search -> MLflow -> export, in a few minutes on a CPU."}

#: the ``demo`` subcommand's defaults (``lightning-supernet demo --print_config`` shows them merged)
DEMO_CONFIG: dict[str, Any] = {
    "seed_everything": 0,
    # the digits ViT is tiny: intra-op threads only add synchronisation (4-5x slower on a busy 2-core machine)
    "torch_num_threads": 1,
    "run_dir": "runs/demo",
    "model": {"class_path": "lightning_supernet.demo.DigitsViT",
              "init_args": {"dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0, "patch_size": 4, "lr": 5e-3}},
    "data": {"class_path": "lightning_supernet.demo.DigitsDataModule", "init_args": {"batch_size": 32}},
    "supernet": {"space": {"min_depth": 0.5}, "eval_subnets": ["largest", "smallest"], "sandwich": 1},
    "trainer": {"max_epochs": 12, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 10},
    "mlflow": {"enabled": True, "tracking_uri": "sqlite:///mlflow.db", "experiment_name": "lightning-supernet-demo"},
    "search": {"objectives": ["val_acc", "params"], "n_trials": 30, "storage": "sqlite:///search.db"},
    "export": {"top_k": 3},
}


class SaveConfigBesideRun(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback``; with a logger that has no local directory (MLflow) the config goes to
    ``trainer.default_root_dir`` instead of failing.

    Example:
        >>> issubclass(SaveConfigBesideRun, SaveConfigCallback)
        True
    """

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if trainer.log_dir is not None:
            return super().setup(trainer, pl_module, stage)
        if not self.already_saved and trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / self.config_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=self.multifile)
        self.already_saved = trainer.strategy.broadcast(True)
        return None


def config_dir(trainer: Trainer) -> str:
    """Where :class:`SaveConfigBesideRun` writes ``config.yaml`` for this trainer.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> config_dir(Trainer(default_root_dir=d, logger=False)) == d
        True
    """
    return trainer.log_dir or trainer.default_root_dir


class SupernetCLI(LightningCLI):
    """LightningCLI for supernets: ``fit``/``validate``/``test``/``predict`` plus ``search``, ``export``, ``demo``.

    After ``fit`` the supernet's weights are written to ``weights`` (default ``<run_dir>/supernet.pt``, atomic,
    with a sha256 digest); ``validate``/``test``/``predict``/``search``/``export`` load them (unless
    ``--ckpt_path`` names a Lightning checkpoint). ``trainer.default_root_dir`` defaults to ``run_dir``, so logs,
    Lightning checkpoints and the saved ``config.yaml`` all land there.

    Example:
        >>> SupernetCLI(args=["validate", "--config", "cfg.yaml"])  # doctest: +SKIP
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", SaveConfigBesideRun)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {})
        kwargs["parser_kwargs"].setdefault("prog", "lightning-supernet")
        kwargs["parser_kwargs"].setdefault("description", "Train a weight-sharing supernet (LightningCLI), search "
                                           "its subnets (Optuna), track (MLflow) and export the best ones.")
        super().__init__(args=args, run=run, **kwargs)

    # -- parser -----------------------------------------------------------------------------------------------
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """LightningCLI's parser, without argparse's prefix matching (``--trainer.max_epoch`` is a typo)."""
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus ``search``, ``export`` and ``demo`` (no Trainer method arguments)."""
        return {**LightningCLI.subcommands(), **{name: set() for name in _EXTRA}}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        self._subcommand_parsers = {}
        subcommands = parser.add_subcommands()
        for name in self.subcommands():
            sub_kwargs = dict(kwargs.get(name, {}))
            if name in _EXTRA:
                sub_kwargs.setdefault("description", _EXTRA[name])
                sub = self.init_parser(**sub_kwargs)
                self._add_arguments(sub)
                self._subcommand_method_arguments[name] = []
                if name == "demo":
                    sub.set_defaults(copy.deepcopy(DEMO_CONFIG))
                help_text = _EXTRA[name]
            else:
                help_text = (getattr(Trainer, name).__doc__ or "").strip().splitlines()[0]
                sub_kwargs.setdefault("description", help_text)
                sub = self._prepare_subcommand_parser(Trainer, name, **sub_kwargs)
            self._subcommand_parsers[name] = sub
            subcommands.add_subcommand(name, sub, help=help_text)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The supernet sections: ``supernet``, ``search``, ``export``, ``mlflow``, ``run_dir``, ``weights``."""
        parser.add_argument("--run_dir", type=str, default="runs/supernet",
                            help="Directory of this run: weights, logs, Lightning checkpoints, saved config, search "
                                 "study (unless set otherwise).")
        parser.add_argument("--weights", type=Optional[str], default=None,
                            help="Supernet weights written by fit, read by the other subcommands "
                                 "(default: <run_dir>/supernet.pt).")
        parser.add_argument("--torch_num_threads", type=Optional[int], default=None,
                            help="torch.set_num_threads before running (null: torch's default).")
        parser.add_class_arguments(SupernetOptions, "supernet")
        parser.add_class_arguments(SearchOptions, "search")
        parser.add_class_arguments(ExportOptions, "export")
        parser.add_class_arguments(MlflowOptions, "mlflow")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (the command line when ``None``); LightningCLI's warning about both is not wanted here."""
        self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        """Check the checkpoint loads safely (a clear error naming the file otherwise). LightningCLI would also
        merge the checkpoint's hyper-parameters into ``model``: here they are the ``SupernetModule``'s (the wrapped
        model, loss, space), not the config's model's arguments, so the config keeps describing the model."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in ("last", "best", "hpc", "registry") and not str(ckpt).startswith("registry:"):
            load_checkpoint(ckpt, "a Lightning checkpoint (a dict with 'state_dict', written by ModelCheckpoint)")

    # -- objects ----------------------------------------------------------------------------------------------
    def _opt(self, key: str) -> Any:
        return self._get(self.config_init, key)

    @property
    def run_dir(self) -> Path:
        """The run's directory (``run_dir``)."""
        return Path(self._opt("run_dir"))

    @property
    def weights_path(self) -> Path:
        """Where ``fit`` writes and the other subcommands read the supernet weights."""
        return Path(self._opt("weights") or self.run_dir / "supernet.pt")

    def instantiate_classes(self) -> None:
        """Build model and data, wrap the model into a ``SupernetModule``, build the Trainer with the callbacks."""
        from lightning_supernet.module import SupernetModule

        threads = self._get(self.config, "torch_num_threads")
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule = self._opt("data")
        self.model = self._opt("model")
        self._add_configure_optimizers_method_to_model(self.subcommand)
        options: SupernetOptions = self._opt("supernet")
        self.user_model = self.model
        self.model = SupernetModule(self.user_model, **options.module_kwargs())
        trainer_cfg = self._opt("trainer") or {}
        own = list(trainer_cfg.get("callbacks") or [])
        present = {type(c) for c in own}
        callbacks = own + [c for c in options.callbacks() if type(c) not in present]
        extra: dict[str, Any] = {"callbacks": callbacks}
        if not trainer_cfg.get("default_root_dir"):
            extra["default_root_dir"] = str(self.run_dir)
        mlflow: MlflowOptions = self._opt("mlflow")
        if trainer_cfg.get("logger") is None and mlflow.enabled and self.subcommand in ("fit", "demo"):
            from lightning_supernet.integrations.mlflow import mlflow_logger

            extra["logger"] = mlflow_logger(tracking_uri=mlflow.tracking_uri, experiment_name=mlflow.experiment_name,
                                            run_name="fit", **mlflow.location())
        self.trainer = self.instantiate_trainer(**extra)

    def _config_for_weights(self) -> dict[str, Any]:
        dumped = yaml.safe_load(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False))
        return {k: dumped.get(k) for k in ("model", "data", "supernet")}

    def _load_trained(self, required: bool) -> bool:
        if self.weights_path.exists() or required:
            self.weights_meta = load_supernet_weights(self.model, self.weights_path)
            say(f"supernet weights: {self.weights_path}")
            return True
        say(f"no supernet weights at {self.weights_path} (run `fit` first): using the model as initialised")
        return False

    # -- subcommands ------------------------------------------------------------------------------------------
    def before_fit(self) -> None:
        """Check the output paths are writable before training; say where the files go."""
        check_writable(self.weights_path, "weights")
        check_writable(Path(self.trainer.default_root_dir) / "config.yaml", "trainer.default_root_dir")
        say(f"run directory: {self.run_dir} (trainer.default_root_dir: {self.trainer.default_root_dir})")

    def after_fit(self) -> None:
        """Write the trained supernet's weights (rank 0), atomically with a sha256 digest; say where files are."""
        if not self.trainer.is_global_zero:
            return
        run_id = getattr(self.trainer.logger, "run_id", None)  # MLFlowLogger's training run
        save_supernet_weights(self.model, self.weights_path, self._config_for_weights(), self.trainer.global_step,
                              run_id if isinstance(run_id, str) else None)
        ckpt = self.trainer.checkpoint_callback
        lines = [f"supernet weights: {self.weights_path}",
                 f"saved config: {Path(config_dir(self.trainer)) / 'config.yaml'}",
                 f"logs: {self.trainer.log_dir or self.trainer.logger and type(self.trainer.logger).__name__}"]
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            lines.append(f"Lightning checkpoints (for --ckpt_path): {ckpt.dirpath}")
        say("\n".join(lines))

    def _before_eval(self) -> None:
        if self.config_init[self.subcommand].get("ckpt_path") is None:
            self._load_trained(required=False)

    before_validate = before_test = before_predict = _before_eval

    def search(self) -> Any:
        """Run (or resume) the search on the weights written by ``fit``."""
        self._load_trained(required=True)
        return run_search(self.model, self.datamodule, self._opt("search"), self.run_dir, self._opt("mlflow"),
                          self._opt("export").top_k, self.weights_meta.get("mlflow_run_id"))

    def export(self) -> list[Path]:
        """Export the best subnets of the study."""
        self._load_trained(required=True)
        return export_subnets(self.model, self.datamodule, self._opt("search"), self._opt("export"), self.run_dir)

    def demo(self) -> None:
        """fit -> search -> export with a fresh study; prints where to look."""
        start = time.time()
        opts: SearchOptions = self._opt("search")
        if not opts.study_name:
            opts.study_name = time.strftime("demo-%Y%m%d-%H%M%S")
        say("[1/3] training the supernet (digits ViT)")
        self.before_fit()
        self.trainer.fit(self.model, datamodule=self.datamodule)
        self.after_fit()
        say(str(self.model.search_space))
        say(f"[2/3] searching {opts.n_trials} subnets")
        run_search(self.model, self.datamodule, opts, self.run_dir, self._opt("mlflow"), self._opt("export").top_k)
        say("[3/3] exporting the best subnets")
        export_subnets(self.model, self.datamodule, opts, self._opt("export"), self.run_dir)
        mlflow: MlflowOptions = self._opt("mlflow")
        say(f"done in {time.time() - start:.0f} s.\n"
            + (f"MLflow runs (training, search, nested trials, Pareto plot, models):\n"
               f"  mlflow ui --backend-store-uri {mlflow.tracking_uri}\n" if mlflow.enabled else "")
            + f"Optuna study {opts.study_name!r}")

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand not in _EXTRA:
            return super()._run_subcommand(subcommand)
        getattr(self, subcommand)()
        return None
