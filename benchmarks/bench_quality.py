"""Training-quality benchmark (issue 3, "Quality result"): subnets of a supernet vs the same shapes trained alone.

On scikit-learn's 8x8 digits (``lightning_supernet.demo``):

1. **Supernet.** ``SupernetModule(DigitsViT(...))`` trained for ``E`` epochs with
   ``ParameterPrioritization() + SandwichSampling(num_random=2) + InplaceDistillation(...)``.
2. **Standalone twins**, trained for the same ``E`` epochs with the same optimiser and schedule (the
   ``DigitsViT``'s own ``configure_optimizers``): the largest shape and two *uniform* subnets whose parameter
   count (``supernet.cost(cfg)["params"]``) is closest to 50 % and 30 % of the largest's. Uniform means one MLP
   width and one head count for every kept block, and the *last* blocks dropped, so the twin is a fresh
   ``DigitsViT`` with fewer blocks and a smaller ``mlp_ratio``. A head count below the full one cannot be built
   through ``TinyViT``'s arguments (``TinyViT(num_heads=h)`` keeps ``qkv`` at ``3*dim`` outputs and makes the heads
   wider, while the supernet keeps the head dim and shrinks ``qkv`` to ``3*h*head_dim``), so for those twins each
   block's ``attn.qkv`` / ``attn.proj`` are replaced by freshly initialised ``nn.Linear`` of the subnet's size and
   ``attn.num_heads`` is set. Before anything is trained, each twin is checked to be the subnet's shape:
   ``count_params(twin) == supernet.cost(cfg)["params"]`` and ``twin.load_state_dict(supernet.extract(cfg)
   .state_dict(), strict=True)`` succeeds.
3. **Evaluation.** Validation accuracy of ``supernet.extract(cfg)`` (no retraining, no fine-tuning; the model has
   LayerNorm only, so there is no BN statistic to recalibrate) vs its twin's. The extracted model's logits are
   checked against the supernet's under ``cfg`` first.
4. **Ablations** (all with the same E, seeds and optimiser): without distillation, without prioritisation, and
   uniform sampling (``SandwichSampling(num_random=4, largest=False, smallest=False)``: four random subnets per
   step, the same number of forward/backward passes as the sandwich). The uniform run is trained *without*
   ``InplaceDistillation``: that callback makes the plan's first subnet the teacher, which without ``largest`` is
   a random subnet, so "uniform + KD" would distil from a random (often smaller) subnet; compare it with the
   "no distillation" row for a sampling-only comparison.

Seeds fix the model initialisation, the train/val split and shuffling (``DigitsDataModule(seed=s)``) and the
sandwich sampler (``SandwichSampling(seed=s)``); within a seed every run sees the same split, so the per-seed
difference "supernet subnet − twin" is a paired comparison. Tables give mean ± std (sample std) over seeds.

Runs are independent and are spread over ``--jobs`` worker processes with ``torch.set_num_threads(--threads)``
each (on a 2-core machine 2 workers x 1 thread is much faster than 1 x 2).

Usage:
    python benchmarks/bench_quality.py --quick             # 1 seed, 4 epochs: a smoke run (~1.5 min on 2 cores)
    python benchmarks/bench_quality.py                     # the reported run: 30 epochs, seeds 0,1,2 (~18 min)
    python benchmarks/bench_quality.py --variants full --student-task-weight 1    # a distillation setting
    python benchmarks/bench_quality.py --epochs 20 --seeds 0 --lr 3e-3 --temperature 2 --json out.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import inspect
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

VARIANTS = {
    # name: (prioritisation, distillation, sampling)
    "full": (True, True, "sandwich"),
    "no_distillation": (True, False, "sandwich"),
    "no_prioritization": (False, True, "sandwich"),
    "uniform": (True, False, "uniform"),
}
VARIANT_LABELS = {
    "full": "supernet: PP + sandwich(2) + KD",
    "no_distillation": "ablation: no distillation",
    "no_prioritization": "ablation: no prioritisation",
    "uniform": "ablation: uniform sampling (4 random, no KD)",
}
TARGETS = {"largest": 1.0, "p50": 0.5, "p30": 0.3}


@dataclass
class Settings:
    epochs: int
    seeds: list[int]
    batch_size: int
    lr: float | None
    temperature: float
    kd_loss: str
    student_task_weight: float
    num_random: int
    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int | None
    threads: int
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))


# -- helpers used in the workers -----------------------------------------------------------------------------


def _quiet() -> None:
    import lightning.pytorch  # noqa: F401  (importing it sets its loggers to INFO: silence them after)

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _model_kwargs(s: Settings, **over: Any) -> dict[str, Any]:
    """``DigitsViT`` arguments (only those its signature has: the demo's arguments have changed over time)."""
    from lightning_supernet.demo import DigitsViT

    params = inspect.signature(DigitsViT.__init__).parameters
    kw = {"dim": s.dim, "depth": s.depth, "num_heads": s.num_heads, "mlp_ratio": s.mlp_ratio}
    if s.patch_size is not None:
        kw["patch_size"] = s.patch_size
    if s.lr is not None:
        kw["lr"] = s.lr
    if "max_epochs" in params:  # older demo: cosine schedule over max_epochs epochs
        kw["max_epochs"] = s.epochs
    kw.update(over)
    return {k: v for k, v in kw.items() if k in params}


def _trainer(s: Settings, callbacks: list[Any]) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(max_epochs=s.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=callbacks, deterministic=False)


def _data(seed: int, s: Settings) -> Any:
    from lightning_supernet.demo import DigitsDataModule

    dm = DigitsDataModule(batch_size=s.batch_size, seed=seed)
    dm.setup("fit")
    return dm


@torch.no_grad()
def accuracy(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy in percent."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    model.train(was)
    return 100.0 * correct / total


def build_supernet(s: Settings) -> Any:
    from lightning_supernet import SupernetModule
    from lightning_supernet.demo import DigitsViT

    return SupernetModule(DigitsViT(**_model_kwargs(s)), eval_subnets=None)


def uniform_config(supernet: Any, depth: int, heads: int | None, width: int | None) -> Any:
    """Every kept block with the same head count / MLP width; the first ``depth`` blocks kept."""
    space = supernet.search_space
    values = {}
    for name, d in space.dims.items():
        if d.kind == "depth":
            index = int(name.split(".")[-2])
            values[name] = index < depth
        elif d.kind == "heads" and heads is not None:
            values[name] = heads
        elif d.kind == "width" and width is not None:
            values[name] = width
    return space.config(values)


def pick_shapes(s: Settings) -> dict[str, dict[str, Any]]:
    """The largest shape and the uniform configs closest to 50 % and 30 % of its parameters."""
    sn = build_supernet(s)
    space = sn.search_space
    heads = sorted({c for d in space.dims.values() if d.kind == "heads" for c in d.choices})
    widths = sorted({c for d in space.dims.values() if d.kind == "width" for c in d.choices})
    n_blocks = sum(1 for d in space.dims.values() if d.kind == "depth")
    min_depth = sum(space.smallest()[n] for n, d in space.dims.items() if d.kind == "depth")
    big = sn.cost(space.largest())["params"]
    rows = []
    for depth in range(min_depth, n_blocks + 1):
        for h in heads:
            for w in widths:
                cfg = uniform_config(sn, depth, h, w)
                rows.append({"depth": depth, "heads": h, "width": w, "params": sn.cost(cfg)["params"]})
    shapes = {"largest": {"depth": n_blocks, "heads": max(heads), "width": max(widths), "params": big}}
    for key, frac in (("p50", 0.5), ("p30", 0.3)):
        # closest in params; ties: the shape that keeps more heads (buildable through TinyViT's own args)
        best = min(rows, key=lambda r: (abs(r["params"] / big - frac), -r["heads"], -r["depth"]))
        shapes[key] = dict(best)
    for r in shapes.values():
        r["fraction"] = r["params"] / big
    return shapes


def build_twin(s: Settings, shape: dict[str, Any]) -> nn.Module:
    """A fresh ``DigitsViT`` of the subnet's shape (see the module docstring for the head count)."""
    from lightning_supernet.demo import DigitsViT

    twin = DigitsViT(**_model_kwargs(s, depth=shape["depth"], mlp_ratio=shape["width"] / s.dim))
    if shape["heads"] != s.num_heads:
        head_dim = s.dim // s.num_heads
        for block in twin.net.blocks:
            block.attn.qkv = nn.Linear(s.dim, 3 * shape["heads"] * head_dim)
            block.attn.proj = nn.Linear(shape["heads"] * head_dim, s.dim)
            block.attn.num_heads = shape["heads"]
            block.attn.head_dim = head_dim
    return twin


def check_twins(s: Settings, shapes: dict[str, dict[str, Any]]) -> None:
    """Each twin has the subnet's params and accepts the extracted subnet's state dict (strict)."""
    from lightning_supernet.cost import count_params

    sn = build_supernet(s)
    x = torch.randn(4, 1, 8, 8)
    for key, shape in shapes.items():
        cfg = uniform_config(sn, shape["depth"], shape["heads"], shape["width"])
        twin, small = build_twin(s, shape), sn.extract(cfg)
        assert count_params(twin) == sn.cost(cfg)["params"] == count_params(small), (key, count_params(twin))
        twin.load_state_dict(small.state_dict(), strict=True)
        with torch.no_grad(), sn.subnet(cfg):
            torch.testing.assert_close(twin(x), sn(x), rtol=1e-4, atol=1e-5)


# -- one run (in a worker) ------------------------------------------------------------------------------------


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    _quiet()
    s = Settings(**job["settings"])
    torch.set_num_threads(s.threads)
    import lightning.pytorch as pl

    from lightning_supernet.callbacks import (
        InplaceDistillation,
        ParameterPrioritization,
        SandwichSampling,
    )

    seed, shapes = job["seed"], job["shapes"]
    dm = _data(seed, s)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"kind": job["kind"], "name": job["name"], "seed": seed}
    if job["kind"] == "standalone":
        pl.seed_everything(seed, verbose=False)
        twin = build_twin(s, shapes[job["name"]])
        _trainer(s, []).fit(twin, datamodule=dm)
        out["acc"] = {job["name"]: accuracy(twin, dm.val_dataloader())}
    else:
        prio, kd, sampling = VARIANTS[job["name"]]
        pl.seed_everything(seed, verbose=False)
        sn = build_supernet(s)
        callbacks: list[Any] = [ParameterPrioritization()] if prio else []
        if sampling == "sandwich":
            callbacks.append(SandwichSampling(num_random=s.num_random, seed=seed))
        else:
            callbacks.append(SandwichSampling(num_random=s.num_random + 2, largest=False, smallest=False, seed=seed))
        if kd:
            callbacks.append(InplaceDistillation(loss=s.kd_loss, temperature=s.temperature,
                                                 student_task_weight=s.student_task_weight))
        _trainer(s, callbacks).fit(sn, datamodule=dm)
        sn.eval()
        configs = {k: uniform_config(sn, v["depth"], v["heads"], v["width"]) for k, v in shapes.items()}
        configs["smallest"] = sn.search_space.smallest()
        out["acc"] = {}
        x = next(iter(dm.val_dataloader()))[0]
        for key, cfg in configs.items():
            small = sn.extract(cfg)
            with torch.no_grad(), sn.subnet(cfg):
                torch.testing.assert_close(small.eval()(x), sn(x), rtol=1e-4, atol=1e-4)
            out["acc"][key] = accuracy(small, dm.val_dataloader())
    out["seconds"] = time.perf_counter() - t0
    out["n_val"] = len(dm.val_set)
    return out


# -- reporting ------------------------------------------------------------------------------------------------


def _ms(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(s: Settings, shapes: dict[str, dict[str, Any]], results: list[dict[str, Any]]) -> str:
    def acc(kind: str, name: str, key: str) -> dict[int, float]:
        return {r["seed"]: r["acc"][key] for r in results if r["kind"] == kind and r["name"] == name}

    cols = ["largest", "p50", "p30"]
    head = [f"{k} ({shapes[k]['params']:,} p, {100 * shapes[k]['fraction']:.1f} %)" for k in cols]
    lines = ["| run | " + " | ".join(head) + " | smallest (no twin) |", "|---|" + "---|" * (len(cols) + 1)]
    twin = {k: acc("standalone", k, k) for k in cols}
    lines.append("| standalone twin (same epochs) | " + " | ".join(_ms(list(twin[k].values())) for k in cols)
                 + " | — |")
    for v in s.variants:
        row = [_ms(list(acc("supernet", v, k).values())) for k in cols + ["smallest"]]
        lines.append(f"| {VARIANT_LABELS[v]} | " + " | ".join(row) + " |")
    n_val = results[0].get("n_val", 0)
    if n_val:
        se = 100 * (0.97 * 0.03 / n_val) ** 0.5
        lines.append("")
        lines.append(f"Noise floor: {n_val} validation images, so one image = {100 / n_val:.2f} points and the "
                     f"binomial standard error of one accuracy near 97 % is {se:.2f} points.")
    lines.append("")
    lines.append("Paired difference supernet subnet − standalone twin (points; mean ± std over seeds), "
                 "target: ≥ −0.5 for the largest, ≥ −1.0 for the subnets:")
    lines.append("")
    lines.append("| run | " + " | ".join(cols) + " | targets met |")
    lines.append("|---|" + "---|" * (len(cols) + 1))
    for v in s.variants:
        diffs, met = [], []
        for k in cols:
            a = acc("supernet", v, k)
            d = [a[seed] - twin[k][seed] for seed in a if seed in twin[k]]
            diffs.append(_ms(d))
            tol = 0.5 if k == "largest" else 1.0
            met.append(bool(d) and statistics.mean(d) >= -tol)
        lines.append(f"| {VARIANT_LABELS[v]} | " + " | ".join(diffs) + " | "
                     + ", ".join(f"{k}: {'yes' if m else 'NO'}" for k, m in zip(cols, met)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=None, help="training epochs of every run (default 30, quick 4)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick 0)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 4 epochs")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="peak lr of every run (default: DigitsViT's)")
    p.add_argument("--temperature", type=float, default=1.0, help="InplaceDistillation temperature")
    p.add_argument("--kd-loss", default="kl", help="InplaceDistillation loss")
    p.add_argument("--student-task-weight", type=float, default=0.0,
                   help="InplaceDistillation student_task_weight (0: BigNAS, students learn from the teacher only)")
    p.add_argument("--num-random", type=int, default=2, help="random subnets per sandwich step")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--patch-size", type=int, default=None, help="default: DigitsViT's")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--no-standalone", action="store_true", help="train the supernets only (for tuning)")
    p.add_argument("--json", default=None, help="write settings, shapes and per-run results here")
    a = p.parse_args(argv)
    epochs = a.epochs if a.epochs is not None else (4 if a.quick else 30)
    seeds = [int(x) for x in (a.seeds or ("0" if a.quick else "0,1,2")).split(",")]
    variants = [v for v in a.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    s = Settings(epochs=epochs, seeds=seeds, batch_size=a.batch_size, lr=a.lr, temperature=a.temperature,
                 kd_loss=a.kd_loss, student_task_weight=a.student_task_weight, num_random=a.num_random, dim=a.dim,
                 depth=a.depth, num_heads=a.heads, mlp_ratio=a.mlp_ratio, patch_size=a.patch_size, threads=a.threads,
                 variants=variants)
    _quiet()
    torch.set_num_threads(a.threads)
    from lightning_supernet.demo import DigitsViT

    print(f"# bench_quality  python {platform.python_version()}  torch {torch.__version__}  "
          f"cpus {os.cpu_count()}  load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"# settings: {asdict(s)}", flush=True)
    print(f"# DigitsViT kwargs: {_model_kwargs(s)}  (signature: {inspect.signature(DigitsViT.__init__)})", flush=True)
    shapes = pick_shapes(s)
    check_twins(s, shapes)
    for k, v in shapes.items():
        print(f"# shape {k:8s} depth {v['depth']} heads {v['heads']} mlp width {v['width']}  "
              f"params {v['params']:,} ({100 * v['fraction']:.1f} %)  twin checked", flush=True)
    jobs = []
    for seed in seeds:
        for v in variants:
            jobs.append({"kind": "supernet", "name": v, "seed": seed})
        for k in shapes if not a.no_standalone else ():
            jobs.append({"kind": "standalone", "name": k, "seed": seed})
    jobs.sort(key=lambda j: j["kind"] != "supernet")  # the long runs first
    for j in jobs:
        j.update(settings=asdict(s), shapes=shapes)
    t0 = time.perf_counter()
    results = []
    with cf.ProcessPoolExecutor(max_workers=max(1, a.jobs), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(run_job, j) for j in jobs]
        for fut in cf.as_completed(futures):
            r = fut.result()
            results.append(r)
            accs = "  ".join(f"{k} {v:.2f}" for k, v in r["acc"].items())
            print(f"  {r['kind']:10s} {r['name']:18s} seed {r['seed']}  {r['seconds']:6.1f} s  acc: {accs}",
                  flush=True)
    wall = time.perf_counter() - t0
    print()
    print(f"## digits, {epochs} epochs, seeds {seeds}, val accuracy % (mean ± std over seeds); wall {wall:.0f} s, "
          f"load {os.getloadavg()[0]:.1f}")
    print()
    print(report(s, shapes, results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": asdict(s), "shapes": shapes, "results": results, "wall_s": wall}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
