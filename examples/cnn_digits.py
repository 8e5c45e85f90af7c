"""A ResNet-style CNN on scikit-learn's 8x8 digits as a supernet: channels, depth, BN recalibration, export.

The user's LightningModule (``DigitsResNet``) knows nothing about supernets. ``SupernetModule`` finds the
bottleneck widths (conv1/conv2 of each block, with their BatchNorms) and the skippable blocks; with ``--residual``
also each stage's residual channels. Training uses the sandwich rule with in-place distillation and parameter
prioritisation; before each subnet is validated its BatchNorm statistics are recalibrated. Then three subnets
are recalibrated, extracted to plain smaller ``DigitsResNet``s and evaluated.

Run (about a minute on a laptop CPU)::

    python examples/cnn_digits.py
    python examples/cnn_digits.py --epochs 30 --widths 64 128 --depths 3 3 --residual --accelerator gpu
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
import torch.nn.functional as F

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import (
    BNRecalibration,
    InplaceDistillation,
    ParameterPrioritization,
    SandwichSampling,
    recalibrate_bn,
)
from lightning_supernet.cost import count_params
from lightning_supernet.demo import DigitsDataModule
from lightning_supernet.models import ResNetLike


class DigitsResNet(L.LightningModule):
    """An ordinary LightningModule: ResNetLike, cross-entropy, SGD with cosine decay."""

    def __init__(self, widths: tuple[int, ...] = (32, 64), depths: tuple[int, ...] = (2, 2), lr: float = 0.1,
                 max_epochs: int = 6) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = ResNetLike(in_chans=1, widths=tuple(widths), depths=tuple(depths), num_classes=10)
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=self.hparams.max_epochs)}


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader, device: torch.device) -> float:
    model.eval().to(device)
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(-1).cpu() == y).sum().item()
        total += len(y)
    return correct / total


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 2])
    p.add_argument("--residual", action="store_true", help="also shrink each stage's residual channels")
    p.add_argument("--num-random", type=int, default=2, help="random subnets per step besides largest/smallest")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    L.seed_everything(args.seed)
    dm = DigitsDataModule(batch_size=args.batch_size, seed=args.seed)
    model = DigitsResNet(args.widths, args.depths, max_epochs=args.epochs)
    supernet = SupernetModule(model, space={"residual": args.residual}, eval_subnets=("largest", "smallest"))
    print(supernet.search_space)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10,
                        callbacks=[ParameterPrioritization(), SandwichSampling(num_random=args.num_random),
                                   InplaceDistillation(), BNRecalibration(num_batches=4)])
    t0 = time.time()
    trainer.fit(supernet, datamodule=dm)
    print(f"supernet trained in {time.time() - t0:.0f} s")

    space = supernet.search_space
    subnets = {"largest": space.largest(), "middle": space.config(
        {n: sorted(d.choices)[len(d.choices) // 2] for n, d in space.dims.items() if d.kind != "depth"}),
        "smallest": space.smallest()}
    device = supernet.device
    results = {}
    print(f"\n{'subnet':<9} {'params':>8} {'MACs':>10} {'val acc':>8}   extracted shapes")
    for name, cfg in subnets.items():
        with supernet.subnet(cfg):
            recalibrate_bn(supernet, dm.train_dataloader(), num_batches=8)  # the subnet's own BN statistics
            small = supernet.extract(cfg)
        acc = accuracy(small, dm.val_dataloader(), device)
        cost = supernet.cost(cfg)
        block = small.net.layers[0][0]
        results[name] = {"params": count_params(small), "macs": cost["macs"], "val_acc": acc}
        print(f"{name:<9} {count_params(small):>8,} {cost['macs']:>10,} {acc:>8.3f}   "
              f"blocks/stage {[len(s) for s in small.net.layers]}, first block conv1 {tuple(block.conv1.weight.shape)}"
              f" bn1 {block.bn1.num_features}")
    return results


if __name__ == "__main__":
    main()
