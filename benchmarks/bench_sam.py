"""SuperSAM benchmark: supernet training step time, and the extracted half-size encoder's inference speed-up.

1. **Training step** of ``SupernetModule(SamFineTuner(sam))`` through ``trainer.fit`` with the sandwich rule (the
   largest, the smallest and 2 random subnets drawn with per-layer keep probabilities: 4 forward/backward passes
   per step), in-place distillation of the mask logits (``bce``) and AdamW; median wall time per optimizer step
   after warm-up steps, measured by a callback around each training batch.
2. **Inference**: the image encoder of the subnet whose encoder has about 50 % of the full encoder's parameters
   (a search over "keep k droppable blocks" x "MLP width ratio", global-attention blocks always kept), extracted
   with ``supernet.extract``, vs the full encoder; also the supernet itself under that config (slicing views).
   Median latency over interleaved rounds (A, B, C then C, B, A...), each after warm-up.

Before timing, the extracted encoder's output is checked against the supernet's under the same config.

Usage:
    python benchmarks/bench_sam.py --small                       # CPU: tiny SAM (256x256, fp32), ~1-2 min
    python benchmarks/bench_sam.py                               # GPU: SAM ViT-B at 1024x1024, bf16 autocast
    python benchmarks/bench_sam.py --json results.json           # also write the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
import warnings
from typing import Any

import lightning as L
import torch

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import InplaceDistillation, SandwichSampling
from lightning_supernet.cost import active_params, count_params
from lightning_supernet.integrations.segment_anything import (
    LayerDropSampler,
    SamFineTuner,
    build_sam,
    layer_keep_probs,
    supersam_space,
)


class StepTimer(L.Callback):
    """Wall time of every training batch (one optimizer step of the whole sandwich)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def synthetic_batches(n: int, batch_size: int, size: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n * batch_size):
        mask = torch.zeros(1, size, size)
        x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        mask[:, y0 : y0 + size // 3, x0 : x0 + size // 3] = 1
        items.append({"image": torch.rand(3, size, size, generator=g) * 255, "mask": mask,
                      "box": torch.tensor([x0, y0, x0 + size // 3, y0 + size // 3], dtype=torch.float)})
    return items


def half_size_config(supernet: SupernetModule, target: float = 0.5) -> tuple[Any, float]:
    """The config (keep the first k droppable blocks, one MLP width ratio) whose encoder params are nearest
    ``target`` of the full encoder's."""
    space = supernet.search_space
    encoder = supernet.model.sam.image_encoder
    full = active_params(encoder)
    droppable = [n for n, d in space.dims.items() if d.kind == "depth"]
    widths = [n for n, d in space.dims.items() if d.kind == "width"]
    best, best_ratio = None, None
    for keep in range(len(droppable) + 1):
        for i in range(len(space.dims[widths[0]].choices)):
            values = {n: j < keep for j, n in enumerate(droppable)}
            values.update({n: sorted(space.dims[n].choices)[i] for n in widths})
            try:
                cfg = space.config(values)
            except ValueError:
                continue  # below the minimum depth
            with supernet.subnet(cfg):
                ratio = active_params(encoder) / full
            if best is None or abs(ratio - target) < abs(best_ratio - target):
                best, best_ratio = cfg, ratio
    return best, best_ratio


def latency_rounds(models: dict[str, torch.nn.Module], x: torch.Tensor, dtype: torch.dtype | None,
                   rounds: int, warmup: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    autocast = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else torch.autocast("cpu",
                                                                                                   enabled=False)
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    with torch.no_grad(), autocast:
        for name in names:
            for _ in range(warmup):
                models[name](x)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                sync()
                t0 = time.perf_counter()
                models[name](x)
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CPU mode: tiny SAM at 256x256, fp32")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 2 on GPU, 2 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=None, help="timed inference rounds per model")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else None  # bf16 autocast is slow on CPUs without AVX-512
    torch.manual_seed(0)
    sam = build_sam("vit_b") if not args.small else build_sam("tiny", embed_dim=192, depth=6,
                                                               global_attn_indexes=(2, 5), num_heads=3)
    size = sam.image_encoder.img_size
    bs = args.batch_size or 2
    steps = args.steps or (10 if cuda else 4)
    rounds = args.rounds or (20 if cuda else 8)

    tuner = SamFineTuner(sam, lr=1e-5)
    supernet = SupernetModule(tuner, space=supersam_space(tuner), eval_subnets=("largest",))
    cfg, ratio = half_size_config(supernet)
    info = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "image": size, "batch_size": bs,
            "dtype": "bf16 autocast" if cuda else "fp32", "encoder_params": count_params(sam.image_encoder),
            "subnet_encoder_param_ratio": round(ratio, 3)}
    print(json.dumps(info))

    # -- 1. training step of the sandwich (4 subnets) -------------------------------------------------------------
    timer = StepTimer()
    sampler = LayerDropSampler(layer_keep_probs(tuner))
    trainer = L.Trainer(max_steps=steps + 2, accelerator="gpu" if cuda else "cpu", devices=1, logger=False,
                        precision="bf16-mixed" if cuda else "32-true", enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[SandwichSampling(num_random=2, sampler=sampler), InplaceDistillation(loss="bce"),
                                   timer])
    loader = torch.utils.data.DataLoader(synthetic_batches(steps + 2, bs, size), batch_size=bs)
    trainer.fit(supernet, loader)
    step_s = statistics.median(timer.times[2:])
    print(f"training step (sandwich of 4, batch {bs}, {size}x{size}): median {step_s * 1e3:.0f} ms "
          f"over {len(timer.times) - 2} steps")

    # -- 2. inference: full encoder vs the extracted ~50 % encoder ------------------------------------------------
    supernet.eval().to(device)
    x = (torch.rand(1, 3, size, size, device=device) * 255 - sam.pixel_mean.to(device)) / sam.pixel_std.to(device)
    small = supernet.extract(cfg).sam.image_encoder.eval().to(device)
    full = supernet.extract(supernet.search_space.largest()).sam.image_encoder.eval().to(device)
    with torch.no_grad(), supernet.subnet(cfg):
        torch.testing.assert_close(small(x), supernet.model.sam.image_encoder(x), atol=1e-4, rtol=1e-4)

    class UnderConfig(torch.nn.Module):
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            with supernet.subnet(cfg):
                return supernet.model.sam.image_encoder(inp)

    lat = latency_rounds({"full": full, "extracted": small, "supernet_under_cfg": UnderConfig()}, x, dtype,
                         rounds, warmup=3)
    kept = len(small.blocks)
    print(f"encoder inference {size}x{size} ({info['dtype']}): full {lat['full']:.1f} ms, extracted "
          f"{ratio:.0%}-params encoder ({kept} of {len(full.blocks)} blocks) {lat['extracted']:.1f} ms -> speed-up "
          f"{lat['full'] / lat['extracted']:.2f}x; supernet under the config {lat['supernet_under_cfg']:.1f} ms")
    result = {**info, "train_step_ms": round(step_s * 1e3, 1), "train_steps_timed": len(timer.times) - 2,
              "latency_ms": {k: round(v, 2) for k, v in lat.items()},
              "speedup_extracted_vs_full": round(lat["full"] / lat["extracted"], 3), "subnet_blocks": kept,
              "subnet_config": cfg.to_dict()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
