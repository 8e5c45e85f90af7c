"""``ParameterPrioritization``: reorder each coupled group by importance so the first ``k`` units are the best.

Runs once when training starts (for pretrained models) and optionally every ``every_n_epochs`` epochs; later
reorders can protect the widths already trained (OFA's banding). The reorder is function-preserving and moves
the optimizer state with the parameters (see :mod:`lightning_supernet.prioritize`).

Example:
    >>> ParameterPrioritization(importance="taylor", num_batches=2).importance
    'taylor'
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_supernet.errors import ArgumentError, InvalidArgumentError
from lightning_supernet import prioritize

if TYPE_CHECKING:
    from lightning_supernet.module import SupernetModule

__all__ = ["ParameterPrioritization"]

_KINDS = ("magnitude", "taylor", "activation")


class ParameterPrioritization(Callback):
    """Sort channels, neurons and heads by importance.

    Args:
        importance: ``"magnitude"`` (L1 of the consumer weights, OFA), ``"taylor"`` (``Σ|w·g|`` on
            ``num_batches`` training batches) or ``"activation"`` (mean |activation| on ``num_batches`` batches).
        at_start: reorder when training starts (skipped when resuming from a checkpoint that already did).
        every_n_epochs: also reorder at the start of every n-th epoch (``None``: never).
        protect_trained: later reorders only sort within the bands between consecutive width choices.
        num_batches: training batches used by the data-driven importances.

    Raises:
        ValueError: unknown ``importance`` or bad counts.

    Example:
        >>> ParameterPrioritization(every_n_epochs=5).every_n_epochs
        5
    """

    def __init__(self, importance: str = "magnitude", at_start: bool = True, every_n_epochs: int | None = None,
                 protect_trained: bool = True, num_batches: int = 4) -> None:
        if importance not in _KINDS:
            raise InvalidArgumentError(f"`importance` must be one of {_KINDS}, got {importance!r}")
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or every_n_epochs < 1):
            raise InvalidArgumentError(f"`every_n_epochs` must be an int >= 1 or None, got {every_n_epochs!r}")
        if not isinstance(num_batches, int) or num_batches < 1:
            raise InvalidArgumentError(f"`num_batches` must be an int >= 1, got {num_batches!r}")
        self.importance = importance
        self.at_start = at_start
        self.every_n_epochs = every_n_epochs
        self.protect_trained = protect_trained
        self.num_batches = num_batches
        self.reorders = 0
        self.last_permutations: dict[str, Any] = {}
        self._last_epoch = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_supernet.module import SupernetModule

        if not isinstance(pl_module, SupernetModule):
            raise ArgumentError(f"ParameterPrioritization needs a SupernetModule, got {type(pl_module).__name__}")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: SupernetModule) -> None:
        if self.at_start and self.reorders == 0:
            self.apply(trainer, pl_module, protect=False)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: SupernetModule) -> None:
        epoch = trainer.current_epoch
        if self.every_n_epochs and epoch > 0 and epoch % self.every_n_epochs == 0 and epoch != self._last_epoch:
            self.apply(trainer, pl_module, protect=self.protect_trained)

    def compute_importance(self, trainer: pl.Trainer | None, pl_module: SupernetModule) -> dict[str, Any]:
        """Importance per group (override for a custom criterion)."""
        if self.importance == "magnitude":
            return prioritize.magnitude_importance(pl_module)
        batches = self._batches(trainer, pl_module)
        if self.importance == "taylor":
            return prioritize.taylor_importance(pl_module, batches)
        return prioritize.activation_importance(pl_module, batches)

    def apply(self, trainer: pl.Trainer | None, pl_module: SupernetModule, protect: bool) -> dict[str, Any]:
        """Compute importance and reorder (parameters, BN statistics, optimizer state)."""
        optimizers = [getattr(o, "optimizer", o) for o in (trainer.optimizers if trainer is not None else [])]
        importance = self.compute_importance(trainer, pl_module)
        if trainer is not None and trainer.world_size > 1:
            importance = self.agree(trainer, importance)
        perms = prioritize.reorder(pl_module, importance, optimizers, protect)
        self.last_permutations = perms
        self.reorders += 1
        self._last_epoch = trainer.current_epoch if trainer is not None else -1
        return perms

    def agree(self, trainer: pl.Trainer, importance: dict[str, Any]) -> dict[str, Any]:
        """Make every rank use the same importance, as Lightning's own callbacks agree on decisions.

        Data-driven scores (each rank saw its own batches) are summed over the ranks with the strategy's
        ``reduce``; then rank 0's result is broadcast, so ties and float round-off cannot permute replicas
        differently. Magnitudes are computed from identical weights and need no communication.
        """
        if self.importance == "magnitude":
            return importance
        strategy = trainer.strategy
        summed = {}
        for name in sorted(importance):
            score = importance[name]
            summed[name] = strategy.reduce(score.to(strategy.root_device).clone(), reduce_op="sum").to(score.device)
        return strategy.broadcast(summed, src=0)

    def _batches(self, trainer: pl.Trainer | None, pl_module: SupernetModule) -> list[Any]:
        loader = None
        if trainer is not None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        elif trainer is not None:
            loader = trainer.train_dataloader
        if loader is None:
            raise InvalidArgumentError(f"importance={self.importance!r} needs training batches; none are available")
        move = trainer.strategy.batch_to_device if trainer is not None else None
        return [move(b) if move is not None else move_data_to_device(b, pl_module.device)
                for b in itertools.islice(iter(loader), self.num_batches)]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reorders": self.reorders, "last_epoch": self._last_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reorders = state_dict["reorders"]
        self._last_epoch = state_dict["last_epoch"]
