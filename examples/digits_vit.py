"""A small ViT on scikit-learn's 8x8 digits as a supernet: heads, MLP widths and depth; train, compare, export.

``DigitsViT`` is an ordinary LightningModule (``lightning_supernet.demo``). ``SupernetModule`` finds each block's
heads (fused qkv), MLP width and whether it can be skipped. Training uses the sandwich rule (largest, smallest
and random subnets each step) with in-place distillation and parameter prioritisation; then a few subnets are
evaluated and extracted into plain, smaller ``DigitsViT`` models saved with ``torch.save``. For the Optuna search
and MLflow tracking of the same model see ``lightning-supernet demo``.

Run (about a minute on a laptop CPU)::

    python examples/digits_vit.py
    python examples/digits_vit.py --epochs 30 --dim 128 --depth 6 --heads 8 --accelerator gpu
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import InplaceDistillation, ParameterPrioritization, SandwichSampling
from lightning_supernet.cost import count_params
from lightning_supernet.demo import DigitsDataModule, DigitsViT


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader, device: torch.device) -> float:
    model.eval().to(device)
    hits = [(model(x.to(device)).argmax(-1).cpu() == y) for x, y in loader]
    return torch.cat(hits).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    L.seed_everything(args.seed)
    dm = DigitsDataModule(batch_size=args.batch_size, seed=args.seed)
    model = DigitsViT(dim=args.dim, depth=args.depth, num_heads=args.heads)
    supernet = SupernetModule(model, eval_subnets=("largest", "smallest"))
    print(supernet.search_space)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10,
                        callbacks=[ParameterPrioritization(), SandwichSampling(num_random=2), InplaceDistillation()])
    t0 = time.time()
    trainer.fit(supernet, datamodule=dm)
    print(f"supernet trained in {time.time() - t0:.0f} s")

    space = supernet.search_space
    subnets = {"largest": space.largest(),
               "half widths/heads": space.config({n: sorted(d.choices)[len(d.choices) // 2 - 1]
                                                  for n, d in space.dims.items() if d.kind != "depth"}),
               "random": space.sample(args.seed), "smallest": space.smallest()}
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="digits_vit_"))
    results = {}
    print(f"\n{'subnet':<18} {'params':>8} {'MACs':>9} {'val acc':>8}  blocks")
    for i, (name, cfg) in enumerate(subnets.items()):
        small = supernet.extract(cfg)
        acc = accuracy(small, dm.val_dataloader(), supernet.device)
        macs = supernet.cost(cfg)["macs"]
        torch.save(small, out / f"subnet{i}.pt")  # a plain DigitsViT: torch.load(..., weights_only=False)
        results[name] = {"params": count_params(small), "macs": macs, "val_acc": acc}
        print(f"{name:<18} {count_params(small):>8,} {macs:>9,} {acc:>8.3f}  {len(small.net.blocks)}")
    print(f"saved under {out}")
    return results


if __name__ == "__main__":
    main()
