"""BatchNorm recalibration: exact BN statistics for a subnet before it is evaluated.

Running statistics are shared by all subnets in a supernet, so they fit none of them exactly. Before a subnet is
validated, its statistics are re-estimated on a few training batches (cumulative average, no gradients) and the
training statistics are put back afterwards, so training is unaffected.

Example:
    >>> BNRecalibration(num_batches=8).num_batches
    8
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_supernet.errors import InvalidArgumentError
from lightning_supernet.ir.graph import call_model

if TYPE_CHECKING:
    from lightning_supernet.module import SupernetModule
    from lightning_supernet.space import SubnetConfig

__all__ = ["BNRecalibration", "bn_state", "load_bn_state", "recalibrate_bn"]

_BN = nn.modules.batchnorm._BatchNorm


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BatchNorm buffer (running mean/var, batches tracked).

    Example:
        >>> sorted(bn_state(nn.BatchNorm1d(2)))
        ['num_batches_tracked', 'running_mean', 'running_var']
    """
    return {f"{p}.{n}".lstrip("."): b.detach().clone() for p, m in model.named_modules() if isinstance(m, _BN)
            for n, b in m.named_buffers(recurse=False) if b is not None}


def load_bn_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`bn_state` back in place.

    Example:
        >>> bn = nn.BatchNorm1d(2); saved = bn_state(bn)
        >>> _ = bn.train()(torch.randn(8, 2) + 5)  # the running mean moves
        >>> load_bn_state(bn, saved); bn.running_mean.tolist()
        [0.0, 0.0]
    """
    for p, m in model.named_modules():
        if isinstance(m, _BN):
            for n, b in m.named_buffers(recurse=False):
                key = f"{p}.{n}".lstrip(".")
                if b is not None and key in state:
                    b.copy_(state[key])


def recalibrate_bn(supernet: SupernetModule, batches: Iterable[Any], num_batches: int | None = None) -> int:
    """Re-estimate the BN statistics of the *active* subnet on ``batches``; returns the batches used.

    Args:
        supernet: the supernet (its active config is the one recalibrated).
        batches: training batches (``supernet.batch_to_input`` extracts the model input).
        num_batches: use at most this many.

    Example:
        >>> import torch.nn.functional as F
        >>> from lightning_supernet import SupernetModule
        >>> from lightning_supernet.models import ResNetLike
        >>> sn = SupernetModule(ResNetLike(), F.cross_entropy, example_input=torch.randn(2, 1, 8, 8))
        >>> recalibrate_bn(sn, [(torch.randn(4, 1, 8, 8), None)] * 2)
        2
    """
    bns = [m for m in supernet.model.modules() if isinstance(m, _BN)]
    if not bns:
        return 0
    modes = {m: m.training for m in supernet.model.modules()}
    momenta = {m: m.momentum for m in bns}
    used = 0
    try:
        supernet.model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        with torch.no_grad():
            for batch in itertools.islice(batches, num_batches):
                call_model(supernet.model, move_data_to_device(supernet.batch_to_input(batch), supernet.device))
                used += 1
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for m, momentum in momenta.items():
            m.momentum = momentum
    if used == 0:
        raise InvalidArgumentError("recalibrate_bn got no batch: pass a non-empty iterable of training batches")
    return used


class BNRecalibration(Callback):
    """Recalibrate BatchNorm statistics of each subnet before it is validated (and restore them after).

    Args:
        num_batches: training batches per recalibration.
        dataloader: where the batches come from (default: the datamodule's ``train_dataloader()``, else the
            trainer's training dataloader). They are fetched once and reused.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[BNRecalibration(num_batches=4)], logger=False)  # doctest: +SKIP
    """

    def __init__(self, num_batches: int = 10, dataloader: Iterable[Any] | None = None) -> None:
        if not isinstance(num_batches, int) or num_batches < 1:
            raise InvalidArgumentError(f"`num_batches` must be an int >= 1, got {num_batches!r}")
        self.num_batches = num_batches
        self.dataloader = dataloader
        self._batches: list[Any] | None = None
        self._cache: dict[Any, dict[str, torch.Tensor]] = {}
        self._saved: list[dict[str, torch.Tensor]] = []
        self._trainer: pl.Trainer | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cache.clear()

    on_test_epoch_start = on_validation_epoch_start

    def _fetch(self, supernet: SupernetModule) -> list[Any]:
        if self._batches is None:
            trainer = self._trainer
            loader = self.dataloader
            if loader is None and trainer is not None and trainer.datamodule is not None:
                loader = trainer.datamodule.train_dataloader()
            if loader is None and trainer is not None:
                loader = trainer.train_dataloader
            if loader is None and trainer is not None and trainer.sanity_checking:
                return []  # the sanity check runs before the training data is set up
            if loader is None:
                raise InvalidArgumentError("BNRecalibration needs training batches: give it `dataloader=` or use a "
                                 "datamodule with `train_dataloader()`")
            self._batches = list(itertools.islice(iter(loader), self.num_batches))
        return self._batches

    def supernet_eval_enter(self, supernet: SupernetModule, name: str, cfg: SubnetConfig) -> None:
        """Save the training statistics and load (or compute) the statistics of ``cfg``."""
        self._saved.append(bn_state(supernet.model))
        key = supernet.search_space.canonical(cfg)
        if key not in self._cache:
            batches = self._fetch(supernet)
            if not batches:
                return
            recalibrate_bn(supernet, batches, self.num_batches)
            self._cache[key] = bn_state(supernet.model)
        else:
            load_bn_state(supernet.model, self._cache[key])

    def supernet_eval_exit(self, supernet: SupernetModule, name: str, cfg: SubnetConfig) -> None:
        """Put the training statistics back."""
        load_bn_state(supernet.model, self._saved.pop())
