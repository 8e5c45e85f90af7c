"""Fine-tune a pretrained model into a supernet: pre-train, sort by importance, distil from the original, search,
export.

The example pre-trains its own model first (no downloads): a 6-block ``DigitsViT`` (``lightning_supernet.demo``)
on scikit-learn's 8x8 digits. Then the recipe for pretrained models (README, "Fine-tune a pretrained model into a
supernet"):

1. ``SupernetModule(model, space=...)`` with widths and heads down to 50 % and at least 4 of the 6 blocks, then
   ``prioritize(supernet, train_loader)`` — before ``fit``, no Trainer: Taylor importance on a few batches sorts
   channels, neurons and heads (the full model is unchanged), and the blocks are ranked by how much removing
   each one changes the output, so depth choices drop the least important first.
2. ``Trainer(callbacks=pretrained_recipe(features=["net.norm"]))`` — the sandwich, every subnet distilled from a
   frozen copy of the original (KL on the logits + cosine on the final norm's tokens), the largest anchored to it.
3. ``search_subnets`` (Optuna) for accuracy vs parameters under a size constraint, and ``extract`` of the best
   subnet into a plain, smaller ``DigitsViT``.

Run (a few minutes on one CPU core)::

    python examples/pretrained_finetune.py
    python examples/pretrained_finetune.py --pretrain-epochs 20 --epochs 6 --trials 30
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from lightning_supernet import SupernetModule
from lightning_supernet.cost import count_params
from lightning_supernet.demo import DigitsDataModule, DigitsViT
from lightning_supernet.importance import prioritize
from lightning_supernet.integrations.optuna import search_subnets
from lightning_supernet.recipes import pretrained_recipe


@torch.no_grad()
def evaluate(model: torch.nn.Module, original: torch.nn.Module, loader) -> tuple[float, float]:
    """(accuracy, mean cosine of the logits to the original's) on ``loader``."""
    model.eval()
    hits, cos = [], []
    for x, y in loader:
        out = model(x)
        hits.append(out.argmax(-1) == y)
        cos.append(F.cosine_similarity(out, original(x), dim=-1))
    return torch.cat(hits).float().mean().item(), torch.cat(cos).mean().item()


def trainer(epochs: int, accelerator: str, **kw) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, enable_progress_bar=False, **kw)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=8, help="supernet fine-tuning epochs (23 steps each)")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--max-params", type=float, default=0.6, help="size constraint, a fraction of the original")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="pretrained_finetune_"))
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)

    # 0. the "pretrained model" (here: trained on the spot)
    model = DigitsViT(dim=64, depth=6, num_heads=4, patch_size=2)
    t0 = time.time()
    trainer(args.pretrain_epochs, args.accelerator).fit(model, datamodule=dm)
    original = copy.deepcopy(model).eval()
    acc0, _ = evaluate(original, original, dm.val_dataloader())
    print(f"pre-trained in {time.time() - t0:.0f} s: val acc {acc0:.3f}")

    # 1. the supernet, sorted by importance measured on data before training
    # a pretrained model's subnets stay close to it down to about half its widths/heads and 4 of its 6 blocks
    space = {"width_ratios": [0.5, 0.75, 1.0], "head_ratios": [0.5, 0.75, 1.0], "min_depth": 4}
    supernet = SupernetModule(model, space=space, eval_subnets=("largest", "smallest"))
    report = prioritize(supernet, dm.train_dataloader(), batches=4)
    print(f"prioritize: {len(report['permutations'])} groups sorted ({report['kind']}, loss: {report['signal']}); "
          f"blocks by importance: {sorted(report['blocks'], key=report['blocks'].get, reverse=True)}")

    # 2. fine-tune: every subnet learns from the frozen original; a fine-tuning learning rate
    model.hparams.lr = 1e-3
    t0 = time.time()
    trainer(args.epochs, args.accelerator, num_sanity_val_steps=0).fit(
        supernet, datamodule=dm)
    space = supernet.search_space
    half = space.config({n: max(d.choices) // 2 for n, d in space.dims.items() if n.endswith("mlp.fc1.width")})
    results = {}
    for name, cfg in (("largest", space.largest()), ("50% MLP", half), ("smallest", space.smallest())):
        with supernet.subnet(cfg):
            acc, cos = evaluate(supernet.model, original, dm.val_dataloader())
        results[name] = acc
        print(f"  {name:<9} val acc {acc:.3f}  logit cosine to the original {cos:.4f}")
    print(f"supernet fine-tuned in {time.time() - t0:.0f} s")

    # 3. search accuracy vs size, then export the most accurate subnet under the constraint
    study, front = search_subnets(supernet, datamodule=dm, objectives=("val_acc", "params"),
                                  constraints={"params": args.max_params}, n_trials=args.trials,
                                  storage=f"sqlite:///{out / 'search.db'}", show_progress_bar=False, seed=0)
    print(front)
    best = max(front, key=lambda row: row["val_acc"])
    small = supernet.extract(best["config"])
    x = next(iter(dm.val_dataloader()))[0]
    with torch.no_grad(), supernet.subnet(best["config"]):
        assert torch.allclose(small.eval()(x), supernet.model.eval()(x), atol=1e-4)
    acc, cos = evaluate(small, original, dm.val_dataloader())
    torch.save(small, out / "subnet.pt")
    print(f"exported: {count_params(small):,} params ({count_params(small) / count_params(original):.0%} of the "
          f"original), {len(small.net.blocks)} blocks, val acc {acc:.3f} (original {acc0:.3f}) -> {out / 'subnet.pt'}")
    results.update({"original": acc0, "exported": acc})
    return results


if __name__ == "__main__":
    main()
