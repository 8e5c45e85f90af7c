"""Fork-join throughput: sandwich steps per second on 2 ranks (k=2) vs 1 rank, and teacher sharing modes.

Each configuration trains the same supernet (a TinyViT on random digit-sized images, sandwich of 4 with in-place
distillation) for ``--steps`` optimizer steps; the first ``--warmup`` steps are not timed. Every process uses
one thread (``torch.set_num_threads(1)``), so 2 ranks use 2 cores and 1 rank uses 1.

    python benchmarks/bench_fork_join.py            # CPU, gloo
    python benchmarks/bench_fork_join.py --device cuda --dim 768 --depth 12   # single-GPU overhead (k=1, W=1)

On a GPU it reports the single-GPU overhead of the strategy vs plain training (k=1, W=1), as the issue asks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_supernet import ForkJoinDDPStrategy, SupernetModule
from lightning_supernet.callbacks import InplaceDistillation, SandwichSampling
from lightning_supernet.models import TinyViT


class Lit(pl.LightningModule):
    def __init__(self, dim: int, depth: int, img: int) -> None:
        super().__init__()
        self.net = TinyViT(img_size=img, patch_size=img // 8, in_chans=1, dim=dim, depth=depth, num_heads=max(dim // 32, 2))
        self.example_input_array = torch.randn(1, 1, img, img)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Timer(pl.Callback):
    def __init__(self, warmup: int, out: str) -> None:
        self.warmup, self.out, self.t0 = warmup, out, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.set_num_threads(1)
        if trainer.global_step == self.warmup and self.t0 is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if trainer.global_rank == 0:
            steps = trainer.global_step - self.warmup
            with open(self.out, "w") as f:
                json.dump({"steps_per_s": steps / (time.perf_counter() - self.t0)}, f)


def run(args, strategy, devices: int, plain: bool = False) -> float:
    torch.manual_seed(0)
    sn = SupernetModule(Lit(args.dim, args.depth, args.img), eval_subnets=None)
    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + 2) * devices
    data = TensorDataset(torch.randn(n, 1, args.img, args.img, generator=g), torch.randint(0, 10, (n,), generator=g))
    out = tempfile.mktemp(suffix=".json")
    callbacks = [] if plain else [SandwichSampling(num_random=2), InplaceDistillation()]
    trainer = pl.Trainer(max_steps=args.steps, accelerator=args.device, devices=devices, strategy=strategy,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[*callbacks, Timer(args.warmup, out)])
    trainer.fit(sn, DataLoader(data, batch_size=args.batch))
    with open(out) as f:
        return json.load(f)["steps_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"torch {torch.__version__}, device {args.device}, ViT dim {args.dim} depth {args.depth}, "
          f"{args.img}x{args.img} images, batch {args.batch}, sandwich of 4 + distillation")
    if args.device == "cpu":
        rows = {}
        rows["1 rank (1 thread)"] = run(args, "auto", 1)
        for mode in ("recompute", "broadcast"):
            strategy = ForkJoinDDPStrategy(subnet_parallel=2, start_method="fork", process_group_backend="gloo",
                                           teacher_outputs=mode)
            rows[f"2 ranks, k=2, teacher {mode}"] = run(args, strategy, 2)
        base = rows["1 rank (1 thread)"]
        for name, value in rows.items():
            print(f"{name:<36} {value:6.2f} steps/s   x{value / base:.2f}")
    else:
        plain = run(args, "auto", 1)
        fork = run(args, ForkJoinDDPStrategy(subnet_parallel=1, process_group_backend="nccl"), 1)
        print(f"plain {plain:.2f} steps/s, fork-join k=1 W=1 {fork:.2f} steps/s, overhead x{plain / fork:.3f}")


if __name__ == "__main__":
    main()
