"""The ``lightning-supernet`` command: Lightning's ``LightningCLI`` for supernets, plus search, export and demo.

``fit``/``validate``/``test``/``predict`` are LightningCLI's own (``--help`` lists every key, ``--config`` files
merge key by key, ``--print_config``, ``--ckpt_path``, the config saved beside the run); ``search``, ``export``
and ``demo`` read the same config file. See :class:`~lightning_supernet.cli_lightning.SupernetCLI`.

.. code-block:: yaml

    seed_everything: 0
    run_dir: runs/digits                        # weights, logs, Lightning checkpoints, config.yaml, search.db
    model: {class_path: lightning_supernet.demo.DigitsViT, init_args: {dim: 64}}
    data: {class_path: lightning_supernet.demo.DigitsDataModule, init_args: {batch_size: 64}}
    supernet: {space: {min_depth: 0.5}, sandwich: 2, distillation: kl}
    trainer: {max_epochs: 8}
    search: {objectives: [val_acc, params], n_trials: 30}
    export: {top_k: 3}

Class paths are imported with the current directory first on ``sys.path`` (as ``python -m`` does), so a
``my_model.py`` beside the config is found.

Example:
    >>> main(["--help"])  # doctest: +SKIP
    >>> main(["fit", "--config", "cfg.yaml", "--trainer.max_epochs", "3"])  # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning_supernet.errors import SupernetError

__all__ = ["main"]

_USAGE = """usage: lightning-supernet [-h] {fit,validate,test,predict,search,export,demo} ...

Train a weight-sharing supernet (LightningCLI), search its subnets (Optuna), track (MLflow) and export the best.

subcommands (each reads the same --config file; `lightning-supernet SUBCOMMAND --help` lists every key):
  fit        train the supernet; writes <run_dir>/supernet.pt (sha256-checked), logs and config.yaml
  validate   validate the trained supernet's eval subnets (or --ckpt_path)
  test       test the trained supernet (or --ckpt_path)
  predict    predict with the trained supernet (or --ckpt_path)
  search     multi-objective subnet search (Optuna), resumable
  export     write the best Pareto subnets as standalone models
  demo       digits ViT: fit -> search -> MLflow -> export, in a few minutes on a CPU

common options of every subcommand:
  -c, --config PATH   YAML config; several --config files merge key by key, later ones win
  --print_config      print the merged config and exit
  --SECTION.KEY VALUE override one key, e.g. --trainer.max_epochs 3 --search.n_trials 50
"""


class _Tee(io.TextIOBase):
    """Writes to the real stream and keeps a copy of the first 64 kB (to add a hint after jsonargparse's error)."""

    def __init__(self, stream: Any, copy: io.StringIO) -> None:
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        if self.copy.tell() < 65536:
            self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def _import_cwd() -> None:
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lightning-supernet`` command; returns the exit code (2: bad input, reported on stderr).

    ``--help`` without a subcommand answers without importing Lightning.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        usage: lightning-supernet [-h] {fit,validate,test,predict,search,export,demo} ...
        ...
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0 if args else 2
    _import_cwd()
    command = args[0]
    err_copy = io.StringIO()
    stderr = sys.stderr
    sys.stderr = _Tee(stderr, err_copy)
    try:
        from lightning_supernet.cli_lightning import SupernetCLI

        SupernetCLI(args=args)
    except SystemExit as exit_:  # jsonargparse's --help, --print_config and parse errors
        code = exit_.code
        code = code if isinstance(code, int) else (0 if code is None else 2)
        if code and "No module named" in err_copy.getvalue():
            print(f"HINT: class paths are imported with the current directory ({os.getcwd()}) first on sys.path, "
                  "as `python -m` does: run from the folder that holds your module, or add that folder to "
                  "PYTHONPATH", file=stderr)
        return code
    except SupernetError as err:
        print(f"lightning-supernet {command}: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        if "jsonargparse" not in str(err):
            raise
        print(f"lightning-supernet {command}: error: the command line needs jsonargparse ({err}). "
              "HINT: pip install 'lightning-supernet[cli]'", file=sys.stderr)
        return 2
    finally:
        sys.stderr = stderr
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
