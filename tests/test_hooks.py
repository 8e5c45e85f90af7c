"""Every LightningModule hook reaches the wrapped module: a table-driven test over Lightning's own hook classes
(it fails when Lightning adds a hook the wrapper does not forward), then a real ``fit`` whose hooks, dataloaders,
scheduler step and optimizer calls go through the user's overrides."""

from __future__ import annotations

import inspect
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.core.hooks import CheckpointHooks, DataHooks, ModelHooks
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, TensorDataset

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import SandwichSampling
from lightning_supernet.hooks import EXTRA_HOOKS
from lightning_supernet.models import TinyViT


def _hook_names() -> list[str]:
    """Read straight from Lightning (not from the library's table), so a new Lightning hook shows up here."""
    names = [n for cls in (ModelHooks, DataHooks, CheckpointHooks) for n, v in vars(cls).items()
             if callable(v) and not n.startswith("_")]
    return sorted(set(names) | set(EXTRA_HOOKS))


class Base(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyViT(dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
        self.example_input_array = torch.randn(1, 1, 8, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _recording_class(names: list[str]) -> type:
    """A LightningModule overriding every hook in ``names`` with one that records its call and returns a token."""

    def make(name):
        def hook(self, *args, **kwargs):
            self.calls.append(name)
            return f"from-{name}"

        return hook

    return type("Recorder", (Base,), {n: make(n) for n in names})


def _dummy_args(name: str) -> list:
    params = list(inspect.signature(getattr(pl.LightningModule, name)).parameters.values())[1:]
    args = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        args.append({} if "checkpoint" in p.name else torch.optim.SGD([torch.nn.Parameter(torch.ones(1))])
                    if "optimizer" in p.name else object())
    return args


@pytest.mark.parametrize("name", _hook_names())
def test_every_lightning_hook_is_forwarded(name):
    inner = _recording_class(_hook_names())()
    inner.calls = []
    sn = SupernetModule(inner, eval_subnets=None)
    sn.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert is_overridden(name, sn), f"`{name}` looks not overridden on the wrapper although the user's module has it"
    out = getattr(sn, name)(*_dummy_args(name))
    assert inner.calls == [name], f"`SupernetModule.{name}` did not reach the wrapped module"
    if name not in ("on_save_checkpoint", "on_load_checkpoint", "on_before_optimizer_step", "on_train_epoch_end",
                    "on_validation_epoch_start", "on_test_epoch_start", "teardown"):
        assert out == f"from-{name}"


def test_hooks_the_user_does_not_override_keep_lightnings_defaults():
    sn = SupernetModule(Base(), eval_subnets=None)
    for name in ("train_dataloader", "val_dataloader", "prepare_data", "configure_model", "lr_scheduler_step",
                 "transfer_batch_to_device", "on_after_backward"):
        assert not is_overridden(name, sn), name
    batch = [torch.ones(2), (torch.zeros(1), {"y": torch.ones(1)})]  # a list, as default_collate returns
    moved = sn.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert isinstance(moved, list) and torch.equal(moved[1][1]["y"], torch.ones(1))


class Counting(Base):
    """A user's module that owns its data and overrides hooks the step loop must call."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))

    def prepare_data(self):
        self.counts["prepare_data"] += 1

    def setup(self, stage):
        self.counts[f"setup:{getattr(stage, 'value', stage)}"] += 1

    def teardown(self, stage):
        self.counts[f"teardown:{getattr(stage, 'value', stage)}"] += 1

    def configure_model(self):
        self.counts["configure_model"] += 1

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=16)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.counts["on_before_batch_transfer"] += 1
        assert isinstance(batch, list)  # default_collate's list for a TensorDataset
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.counts["on_after_batch_transfer"] += 1
        return batch

    def on_before_backward(self, loss):
        self.counts["on_before_backward"] += 1

    def on_after_backward(self):
        self.counts["on_after_backward"] += 1
        self.log("grad_seen", 1.0)  # the user's self.log works inside a forwarded hook

    def on_before_zero_grad(self, optimizer):
        self.counts["on_before_zero_grad"] += 1

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        self.counts["optimizer_step"] += 1
        optimizer.step(closure=optimizer_closure)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        self.counts["optimizer_zero_grad"] += 1
        optimizer.zero_grad()

    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0):
        self.counts["on_validation_batch_start"] += 1

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        self.counts["on_validation_batch_end"] += 1

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric):
        self.counts["lr_scheduler_step"] += 1
        scheduler.step()

    def configure_callbacks(self):
        return [SandwichSampling(num_random=1, seed=0)]


def test_fit_uses_the_users_hooks_and_dataloaders():
    inner = Counting()
    sn = SupernetModule(inner, eval_subnets=("largest", "smallest"))
    before = {k: v.clone() for k, v in sn.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(sn)  # no loaders: the wrapped module's train_dataloader / val_dataloader
    c = inner.counts
    steps, plan = 4, 3  # 32 samples / 8; the sandwich from the user's configure_callbacks: largest, random, smallest
    assert trainer.global_step == steps
    assert any(isinstance(cb, SandwichSampling) for cb in trainer.callbacks)
    assert c["prepare_data"] == 1 and c["setup:fit"] == 1 and c["teardown:fit"] == 1 and c["configure_model"] == 1
    assert c["on_before_backward"] == c["on_after_backward"] == steps * plan
    assert c["optimizer_step"] == c["on_before_zero_grad"] == c["optimizer_zero_grad"] == steps
    assert c["lr_scheduler_step"] == steps
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**steps)
    assert c["on_before_batch_transfer"] == c["on_after_batch_transfer"] == steps + 2  # + 2 validation batches
    assert c["on_validation_batch_start"] == c["on_validation_batch_end"] == 2
    assert "grad_seen" in trainer.callback_metrics and "val/loss/smallest" in trainer.callback_metrics
    assert any(not torch.equal(before[k], v) for k, v in sn.state_dict().items())


def test_a_hook_set_on_the_instance_wins_and_can_be_removed():
    from unittest import mock

    sn = SupernetModule(Base(), eval_subnets=None)
    with mock.patch.object(sn, "on_after_backward") as patched:
        sn.on_after_backward()
        patched.assert_called_once()
    assert not is_overridden("on_after_backward", sn)
