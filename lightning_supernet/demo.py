"""The demo's data and model: scikit-learn's 8x8 digits and a small ViT LightningModule (no downloads).

:class:`DigitsDataModule` serves ``load_digits()`` (1797 images, 10 classes) as ``(N, 1, 8, 8)`` float tensors
scaled to ``[0, 1]``, split once with a seeded generator. :class:`DigitsViT` is an ordinary LightningModule around
:class:`~lightning_supernet.models.TinyViT` that logs ``train_loss``, ``val_loss`` and ``val_acc``; it knows
nothing about supernets. Both back the ``lightning-supernet demo`` command, the tests and the benchmarks.

Example:
    >>> dm = DigitsDataModule(batch_size=32)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), DigitsViT(dim=32, depth=2, num_heads=2)(x).shape[-1]
    ((32, 1, 8, 8), 10)
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_supernet.errors import MissingDependencyError
from lightning_supernet.models import TinyViT

__all__ = ["DigitsDataModule", "DigitsViT", "EpochSampler", "one_cycle_factor"]


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "the digits demo needs scikit-learn (its `load_digits` data ships inside the package). "
            "HINT: pip install 'lightning-supernet[demo]'"
        ) from err
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


class EpochSampler(RandomSampler):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``; Lightning calls ``set_epoch`` each epoch.

    So a run resumed from a checkpoint taken at the end of an epoch sees the same batches as an uninterrupted one
    (a plain ``DataLoader(shuffle=True, generator=g)`` continues ``g``'s stream, which a resume restarts). Under
    DDP Lightning replaces it with a ``DistributedSampler``, which is seeded by epoch too.

    Example:
        >>> s = EpochSampler(range(5), seed=0)
        >>> s.set_epoch(1); a = list(s); s.set_epoch(1)
        >>> a == list(s) and sorted(a) == [0, 1, 2, 3, 4]
        True
    """

    def __init__(self, data_source: Any, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation."""
        self.epoch = epoch

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits as a LightningDataModule: a seeded train/val split, tensors held in memory.

    Args:
        batch_size: batch size of every loader.
        val_fraction: share of the 1797 images held out for validation (and test).
        seed: seed of the split and of the training loader's shuffling.
        num_workers: ``DataLoader`` workers (0 is fastest for this tiny data set).
        stateful: serve training batches with ``torchdata``'s ``StatefulDataLoader``, whose position Lightning
            saves in checkpoints, so a run resumed from a mid-epoch checkpoint continues where it stopped. Either
            way the order is seeded per epoch (:class:`EpochSampler`), so later epochs match too.

    Raises:
        ValueError: ``val_fraction`` outside (0, 1) or ``batch_size`` < 1.

    Example:
        >>> dm = DigitsDataModule(val_fraction=0.25)
        >>> dm.setup("validate")
        >>> len(dm.val_set)
        449
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0,
                 stateful: bool = False) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.stateful = stateful
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load and split the images once (later calls are free)."""
        if self.train_set is not None:
            return
        x, y = _load_digits()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(len(y) * self.val_fraction))
        val, train = order[:n_val], order[n_val:]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, in an order seeded by (seed, epoch); see ``stateful``."""
        self.setup()
        if self.stateful:
            try:
                from torchdata.stateful_dataloader import StatefulDataLoader
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise MissingDependencyError("`stateful=True` needs torchdata's StatefulDataLoader. "
                                             "HINT: pip install torchdata") from err
            return StatefulDataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                                      sampler=EpochSampler(self.train_set, self.seed))
        return DataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                          sampler=EpochSampler(self.train_set, self.seed))

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in a fixed order."""
        self.setup()
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The validation split again (the demo has no separate test split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The validation split's images and labels (``DigitsViT.predict_step`` returns class indices)."""
        return self.val_dataloader()


def one_cycle_factor(step: int, total_steps: Any, warmup: float, div: float = 25.0, final_div: float = 1e4) -> float:
    """The learning-rate factor of ``OneCycleLR`` (cosine, ``cycle_momentum=False``) at ``step``, as a function.

    ``total_steps`` is a callable, called only from step 1 on: step 0 (evaluated when the scheduler is built,
    inside ``configure_optimizers``) is ``1 / div`` whatever the length.

    Example:
        >>> round(one_cycle_factor(0, None, 0.15), 4), one_cycle_factor(14, lambda: 100, 0.15)
        (0.04, 1.0)
    """
    if step == 0:
        return 1.0 / div
    total = total_steps()
    if not math.isfinite(total) or total < 2:
        return 1.0

    def anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (1 + math.cos(math.pi * min(1.0, pct)))

    warm_end = float(warmup * total) - 1
    if step <= warm_end:
        return anneal(1.0 / div, 1.0, step / warm_end)
    return anneal(1.0, 1.0 / (div * final_div), (step - warm_end) / (total - 1 - warm_end))


class DigitsViT(pl.LightningModule):
    """A TinyViT classifier for 8x8 digits; logs ``train_loss``, ``val_loss`` and ``val_acc``.

    Args:
        dim: embedding width. depth: transformer blocks. num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / ``dim``. patch_size: side of a patch (8 must be divisible by it).
        lr: peak AdamW learning rate of the one-cycle schedule (warm-up then cosine decay, per step;
            :func:`one_cycle_factor`: OneCycleLR's learning rates, without its momentum cycling).
        weight_decay: AdamW weight decay. warmup: share of the steps spent warming up.

    Note:
        The schedule's length is read from ``trainer.estimated_stepping_batches`` when the scheduler first steps, not
        in ``configure_optimizers``: asking for it there loads the training loader before Lightning restores the
        loader's position from a checkpoint, which makes a resumed run differ from an uninterrupted one.
        The schedule itself holds no state (a ``LambdaLR`` of the step), so a resume continues it exactly.

        A subnet extracted from a supernet of this module is a ``DigitsViT`` whose tensors are smaller; its
        ``hparams`` still describe the full model.

    Example:
        >>> m = DigitsViT(dim=32, depth=2, num_heads=2)
        >>> m.example_input_array.shape
        torch.Size([1, 1, 8, 8])
    """

    def __init__(self, dim: int = 64, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0, patch_size: int = 4,
                 lr: float = 5e-3, weight_decay: float = 0.01, warmup: float = 0.15) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyViT(img_size=8, patch_size=patch_size, in_chans=1, dim=dim, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, num_classes=10)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log("val_loss", loss, prog_bar=True, batch_size=len(y))
        self.log("val_acc", acc, prog_bar=True, batch_size=len(y))
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.log("test_acc", (logits.argmax(-1) == y).float().mean(), batch_size=len(y))
        return F.cross_entropy(logits, y)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        return self(x).argmax(-1)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self._trainer is None:
            return opt
        warmup = self.hparams.warmup

        def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict stores nothing for it
            return one_cycle_factor(step, lambda: self.trainer.estimated_stepping_batches, warmup)

        # small ViTs learn slowly from a cold start: OneCycleLR's warm-up then cosine decay, as a LambdaLR
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
