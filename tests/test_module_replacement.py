"""Modules replaced after the supernet was built keep their elastic behaviour: Lightning's
``Trainer(sync_batchnorm=True)`` swaps every BatchNorm for a new ``SyncBatchNorm``; smaller subnets still run and
compute what they computed before."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import SandwichSampling
from lightning_supernet.models import ResNetLike


def _supernet() -> SupernetModule:
    torch.manual_seed(0)
    model = ResNetLike(in_chans=1, widths=(16, 32), depths=(2, 2), num_classes=10)
    return SupernetModule(model, F.cross_entropy, example_input=torch.randn(2, 1, 8, 8), eval_subnets=None)


def test_sync_batchnorm_conversion_keeps_every_subnet(tmp_path):
    sn = _supernet().eval()
    x = torch.randn(4, 1, 8, 8)
    space = sn.search_space
    configs = [space.largest(), space.smallest(), space.middle(), space.sample(3)]
    before = []
    for cfg in configs:
        with torch.no_grad(), sn.subnet(cfg):
            before.append(sn(x))
    converted = TorchSyncBatchNorm().apply(sn)  # what Trainer(sync_batchnorm=True) does to the module
    assert converted is sn
    assert not any(type(m) is nn.BatchNorm2d for m in sn.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sn.modules())
    for cfg, expected in zip(configs, before, strict=True):
        with torch.no_grad(), sn.subnet(cfg):
            torch.testing.assert_close(sn(x), expected)
    sn.train()
    with sn.subnet(space.smallest()):  # training mode reads the (sliced) running statistics too
        loss = F.cross_entropy(sn(x), torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert sn.cost(space.smallest())["params"] < sn.cost(space.largest())["params"]


def test_replacement_while_a_smaller_subnet_is_pinned_is_refreshed_when_a_run_starts():
    sn = _supernet().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    cfg = sn.search_space.smallest()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with sn.subnet(cfg):
        with torch.no_grad():
            expected = F.cross_entropy(sn(x), y)
        TorchSyncBatchNorm().apply(sn)  # full-size SyncBatchNorm modules under a pinned smaller subnet
        trainer.validate(sn, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


class _Save(pl.Callback):
    def __init__(self, path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module):
        kinds = sorted({type(m).__name__ for m in pl_module.model.modules() if "Norm" in type(m).__name__})
        torch.save({"w": pl_module.state_dict(), "kinds": kinds}, self.path / f"rank{trainer.global_rank}.pt")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_trainer_sync_batchnorm_on_two_ranks_trains_smaller_subnets(tmp_path):
    """On CPU torch refuses SyncBatchNorm under DDP ("SyncBatchNorm layers only work with GPU modules"), so the
    two-rank version needs two GPUs; the conversion itself is tested above in one process."""
    from lightning.pytorch.strategies import DDPStrategy

    sn = _supernet()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))
    trainer = pl.Trainer(accelerator="gpu", devices=2, max_steps=2, sync_batchnorm=True, logger=False,
                         strategy=DDPStrategy(start_method="spawn", find_unused_parameters=False),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SandwichSampling(num_random=1), _Save(tmp_path)])
    trainer.fit(sn, DataLoader(data, batch_size=4))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert any("SyncBatchNorm" in k for k in r0["kinds"])
    for k, v in r0["w"].items():
        torch.testing.assert_close(v.cpu(), r1["w"][k].cpu(), msg=k)
