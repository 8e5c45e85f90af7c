"""CNNs: channel elasticity, depth, BatchNorm recalibration and export of ``ResNetLike``.

The extracted model is the user's class (a ``ResNetLike``) holding plain ``nn.Conv2d``/``nn.BatchNorm2d`` of the
smaller sizes, with skipped bottlenecks removed from their ``Sequential``; in eval mode it computes exactly what
the supernet computes under the config.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import BNRecalibration, recalibrate_bn
from lightning_supernet.callbacks.bn_recalibration import bn_state
from lightning_supernet.cost import count_params
from lightning_supernet.elastic import is_elastic
from lightning_supernet.models import ResNetLike


def _resnet(residual: bool = False, **kwargs) -> SupernetModule:
    torch.manual_seed(0)
    model = ResNetLike(in_chans=1, widths=(16, 32), depths=(2, 2), num_classes=10)
    for mod in model.modules():  # trained-looking BN statistics, so eval outputs depend on them
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(mod.weight, 0.5, 1.5)
    return SupernetModule(model.eval(), F.cross_entropy, example_input=torch.randn(2, 1, 8, 8),
                          space={"residual": residual}, **kwargs).eval()


CONFIG = {"layers.0.0.conv1.width": 2, "layers.0.0.conv2.width": 1, "layers.0.1.keep": False,
          "layers.1.0.conv1.width": 4, "layers.1.1.conv2.width": 6}


def _plain(model: nn.Module) -> bool:
    return not any(is_elastic(m) for m in model.modules())


def test_channels_and_depth_export_to_a_plain_smaller_network() -> None:
    supernet = _resnet()
    dims = supernet.search_space.dims
    assert {n for n, d in dims.items() if d.kind == "depth"} == {"layers.0.0.keep", "layers.0.1.keep",
                                                                "layers.1.1.keep"}  # layers.1.0 downsamples
    cfg = supernet.search_space.config(CONFIG)
    x = torch.randn(4, 1, 8, 8)
    with supernet.subnet(cfg), torch.no_grad():
        expected = supernet(x)
    small = supernet.extract(cfg).eval()
    assert type(small) is ResNetLike and _plain(small)
    assert len(small.layers[0]) == 1 and len(small.layers[1]) == 2
    b = small.layers[0][0]
    assert (b.conv1.out_channels, b.bn1.num_features, b.conv2.in_channels) == (2, 2, 2)
    assert (b.conv2.out_channels, b.bn2.num_features, b.conv3.in_channels) == (1, 1, 1)
    assert tuple(b.conv2.weight.shape) == (1, 2, 3, 3) and tuple(b.bn2.running_mean.shape) == (1,)
    assert small.layers[1][0].conv1.out_channels == 4 and small.layers[1][1].conv2.out_channels == 6
    assert type(b.conv1) is nn.Conv2d and type(b.bn1) is nn.BatchNorm2d
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected)
    assert count_params(small) == supernet.cost(cfg)["params"] < count_params(supernet.model)
    # the export is a standalone network: gradients flow into its smaller tensors
    small.train()
    F.cross_entropy(small(x), torch.tensor([0, 1, 2, 3])).backward()
    assert b.conv2.weight.grad.shape == (1, 2, 3, 3)


def test_residual_stream_channels_opt_in() -> None:
    supernet = _resnet(residual=True)
    assert supernet.search_space.dims["stem.0.width"].choices == (16, 12, 8, 4)
    cfg = supernet.search_space.config({**CONFIG, "stem.0.width": 8})
    x = torch.randn(4, 1, 8, 8)
    with supernet.subnet(cfg), torch.no_grad():
        expected = supernet(x)
    small = supernet.extract(cfg).eval()
    assert small.stem[0].out_channels == 8 and small.stem[1].num_features == 8
    assert small.layers[0][0].conv1.in_channels == 8 and small.layers[0][0].conv3.out_channels == 8
    assert small.layers[1][0].downsample[0].in_channels == 8 and small.layers[1][0].conv1.in_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected)


def test_bn_recalibration_gives_the_subnets_own_statistics() -> None:
    supernet = _resnet()
    cfg = supernet.search_space.config(CONFIG)
    batches = [(torch.randn(8, 1, 8, 8) * 2 + 1, torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    training_stats = bn_state(supernet.model)
    with supernet.subnet(cfg):
        assert recalibrate_bn(supernet, batches) == 3
        small = supernet.extract(cfg).eval()
    # the same statistics, estimated directly on the exported network (cumulative average over the batches)
    direct = supernet.extract(cfg)
    for mod in direct.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    direct.train()
    with torch.no_grad():
        for x, _ in batches:
            direct(x)
    direct.eval()
    recalibrated, estimated = bn_state(small), bn_state(direct)
    assert recalibrated.keys() == estimated.keys()
    for key in recalibrated:
        torch.testing.assert_close(recalibrated[key], estimated[key])
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(small(x), direct(x))
        before = training_stats["layers.0.0.bn1.running_mean"][:2]
        assert not torch.allclose(small.layers[0][0].bn1.running_mean, before)


class LitResNet(__import__("lightning").pytorch.LightningModule):
    """A user's LightningModule around ResNetLike."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ResNetLike(in_chans=1, widths=(16, 32), depths=(2, 2), num_classes=10)
        self.example_input_array = torch.randn(2, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_training_with_bn_recalibration_callback() -> None:
    import lightning as L

    from lightning_supernet.callbacks import SandwichSampling

    torch.manual_seed(0)
    supernet = SupernetModule(LitResNet(), eval_subnets=("largest", "smallest"))
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8, generator=g),
                                          torch.randint(0, 10, (32,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = L.Trainer(max_epochs=1, limit_val_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SandwichSampling(num_random=1), BNRecalibration(num_batches=2)])
    trainer.fit(supernet, loader, loader)
    assert {"val_acc", "val/acc/smallest"} <= set(trainer.callback_metrics)
    # validation recalibrated each subnet and put the training statistics back
    training_stats = bn_state(supernet.model)
    assert all(torch.isfinite(v).all() for v in training_stats.values())
    small = supernet.extract(supernet.search_space.smallest()).eval()
    assert isinstance(small, LitResNet) and _plain(small)
    x = torch.randn(2, 1, 8, 8)
    supernet.eval()
    with supernet.subnet(supernet.search_space.smallest()), torch.no_grad():
        torch.testing.assert_close(small(x), supernet(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_subnets_export_exactly(seed: int) -> None:
    supernet = _resnet(residual=True)
    cfg = supernet.search_space.sample(seed)
    x = torch.randn(2, 1, 8, 8)
    with supernet.subnet(cfg), torch.no_grad():
        expected = supernet(x)
    small = supernet.extract(cfg).eval()
    assert _plain(small)
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected)
