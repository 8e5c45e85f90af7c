"""``SupernetModule.load_from_checkpoint(path)``, the standard Lightning idiom, rebuilds the supernet from the
hyper-parameters it saved: the wrapped LightningModule's class and hparams, the space options, the eval subnets."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_supernet import SupernetModule
from lightning_supernet.errors import ArgumentError
from lightning_supernet.models import ResNetLike, TinyViT


class HParamsLit(pl.LightningModule):
    def __init__(self, dim: int = 16, depth: int = 2, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyViT(dim=dim, depth=depth, num_heads=2, mlp_ratio=2.0)
        self.example_input_array = torch.randn(1, 1, 8, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))


def _fit_and_save(sn, tmp_path):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(sn, DataLoader(_data(), batch_size=8))
    path = tmp_path / "sn.ckpt"
    trainer.save_checkpoint(path)
    return path


def _same_supernet(a, b):
    assert a.search_space.fingerprint == b.search_space.fingerprint
    x = torch.randn(3, 1, 8, 8)
    a.eval(), b.eval()
    for cfg in (a.search_space.largest(), a.search_space.smallest()):
        with torch.no_grad(), a.subnet(cfg), b.subnet(cfg):
            torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_load_from_checkpoint_rebuilds_a_wrapped_lightning_module(tmp_path):
    torch.manual_seed(0)
    sn = SupernetModule(HParamsLit(dim=24, depth=3), space={"min_depth": 2}, eval_subnets=("largest", "smallest"),
                        gradient_clip_val=0.5)
    path = _fit_and_save(sn, tmp_path)
    loaded = SupernetModule.load_from_checkpoint(path)
    assert isinstance(loaded.model, HParamsLit) and loaded.model.hparams.dim == 24
    assert loaded.space_options == sn.space_options and loaded.gradient_clip_val == 0.5
    assert list(loaded.eval_configs()) == ["largest", "smallest"]
    _same_supernet(sn, loaded)


def test_load_from_checkpoint_of_a_plain_module_given_as_a_class_path(tmp_path):
    torch.manual_seed(1)
    spec = {"class_path": "lightning_supernet.models.ResNetLike",
            "init_args": {"in_chans": 1, "widths": [16, 32], "depths": [2, 2], "num_classes": 10}}
    sn = SupernetModule(spec, F.cross_entropy, example_input=torch.randn(2, 1, 8, 8), eval_subnets=None)
    loaded = SupernetModule.load_from_checkpoint(_fit_and_save(sn, tmp_path))
    assert loaded.loss_fn is F.cross_entropy
    _same_supernet(sn, loaded)


def test_a_plain_module_instance_needs_model_when_loading(tmp_path):
    torch.manual_seed(2)
    make = lambda: ResNetLike(in_chans=1, widths=(16, 32), depths=(2, 2), num_classes=10)  # noqa: E731
    sn = SupernetModule(make(), F.cross_entropy, example_input=torch.randn(2, 1, 8, 8), eval_subnets=None)
    path = _fit_and_save(sn, tmp_path)
    with pytest.raises(ArgumentError, match=r"load_from_checkpoint\(path, model=MyNet"):
        SupernetModule.load_from_checkpoint(path)
    _same_supernet(sn, SupernetModule.load_from_checkpoint(path, model=make()))
