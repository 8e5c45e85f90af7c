"""Core overhead benchmark: a subnet run through the supernet vs the same network built natively.

Measured side by side in one run, every comparison interleaved (round r runs the sides in order A, B, ... and
round r+1 in the reverse order, so a load spike from another process hits every side alike); medians per side and
ratios are printed:

1. training step of a uniform subnet (75 % MLP width, 75 % heads, every block kept) through the supernet vs a
   natively built model of that shape: forward + backward, and forward + backward + AdamW step;
2. inference of ``supernet.extract(cfg)`` vs the native model (and the supernet itself under ``cfg``);
3. the tiny model through Lightning: ``trainer.fit`` of ``SupernetModule(lit)`` at its largest subnet vs
   ``trainer.fit`` of the plain ``lit`` (same Trainer flags, the Trainer's overhead on both sides);
4. the masking alternative for reference: the full-size network whose weights are multiplied by 0/1 masks
   (rows/columns outside the subnet zeroed) instead of sliced.

The native model is loaded with the extracted subnet's state dict, and its outputs (and gradients of the
parameters that are not elastic) are checked against the supernet's, the extracted and the masked model's before
anything is timed: every side computes the same function with the same weights.

Each comparison also runs its reference side a second time ("A/A control"): that row's ratio is the noise floor of
the run. Times are taken on two clocks: wall time and the process's CPU time, which on a shared CPU leaves out the
time spent waiting for a core (with the default single torch thread on CPU it is the compute of the call).

Only public APIs are used (``SupernetModule``, ``search_space``, ``subnet(cfg)``, ``extract(cfg)``,
``trainer.fit``), so the benchmark stays valid when the supernet's step loop changes.

Usage:
    python benchmarks/bench_core.py                                   # CPU, shape "small", fp32, 1 thread
    python benchmarks/bench_core.py --quick                           # fewer rounds (under a minute)
    python benchmarks/bench_core.py --device cuda --dtype bf16        # ViT-B shape, bf16 autocast
    python benchmarks/bench_core.py --profile                         # + where the wrapper's time goes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import gc
import io
import logging
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_supernet import SupernetModule
from lightning_supernet.models import TinyViT

# -- shapes ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A TinyViT shape and the batch size it is timed with."""

    img_size: int
    patch_size: int
    in_chans: int
    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    num_classes: int
    batch: int

    def model_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in ("img_size", "patch_size", "in_chans", "dim", "depth", "num_heads",
                                              "mlp_ratio", "num_classes")}


SHAPES = {
    # the tiny model of the Lightning comparison (TinyViT's defaults: 8x8 digits-like input)
    "tiny": Shape(8, 2, 1, 64, 4, 4, 4.0, 10, batch=32),
    # the CPU stand-in for ViT-B: same layout, head_dim 32, 65 tokens
    "small": Shape(32, 4, 3, 256, 4, 8, 4.0, 100, batch=16),
    # ViT-B/16 at 224x224: dim 768, 12 heads, depth 12, MLP 3072
    "vit-b": Shape(224, 16, 3, 768, 12, 12, 4.0, 1000, batch=64),
}

#: a second run of the reference side: its ratio to the reference shows the timing noise of the run.
CONTROL = "native again (A/A control)"

#: the uniform subnet measured: this fraction of every MLP width and of every block's heads, all blocks kept.
SUBNET_RATIO = 0.75


# -- models ------------------------------------------------------------------------------------------------------


def uniform_config(supernet: SupernetModule, ratio: float):
    """Every width and head dim at ``ratio`` of its full size (must be one of its choices), every block kept."""
    values = {}
    for name, dim in supernet.search_space.dims.items():
        if dim.kind == "depth":
            values[name] = True
            continue
        target = ratio * dim.largest
        if target not in dim.choices:
            raise SystemExit(f"dim {name}: {ratio:.0%} of {dim.largest} is not among its choices {dim.choices}; "
                             "pick a shape whose widths and head counts divide evenly")
        values[name] = int(target)
    return supernet.search_space.validate(values)


def build_native(shape: Shape, heads: int, hidden: int) -> TinyViT:
    """A TinyViT built directly at the subnet's shape: MLP hidden ``hidden``, ``heads`` heads per block.

    TinyViT ties ``head_dim`` to ``dim // num_heads``, so the attention projections are built here as plain
    ``nn.Linear`` layers of ``heads`` heads of the full model's ``head_dim`` (what a subnet with fewer heads is).
    """
    kw = shape.model_kwargs()
    kw["mlp_ratio"] = hidden / shape.dim
    model = TinyViT(**kw)
    for blk in model.blocks:
        attn = blk.attn
        width = heads * attn.head_dim
        attn.num_heads = heads
        attn.qkv = nn.Linear(shape.dim, 3 * width)
        attn.proj = nn.Linear(width, shape.dim)
        if blk.mlp.fc1.out_features != hidden:
            raise SystemExit(f"cannot build an MLP of width {hidden} from dim {shape.dim}")
    return model


class MaskedLinear(nn.Linear):
    """``F.linear(x, weight * mask, bias * bias_mask)``: the masking alternative to slicing (full-size matmul)."""

    @classmethod
    def from_linear(cls, lin: nn.Linear, out_keep: torch.Tensor, in_keep: torch.Tensor) -> MaskedLinear:
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device=lin.weight.device)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        out_keep, in_keep = out_keep.to(lin.weight), in_keep.to(lin.weight)
        new.register_buffer("weight_mask", out_keep[:, None] * in_keep[None, :])
        new.register_buffer("bias_mask", out_keep.clone())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.bias_mask if self.bias is not None else None
        return F.linear(x, self.weight * self.weight_mask, bias)


def build_masked(shape: Shape, state: dict, heads: int, hidden: int) -> TinyViT:
    """The full-size TinyViT with the supernet's weights, its subnet selected by 0/1 weight masks."""
    model = TinyViT(**shape.model_kwargs())
    model.load_state_dict(state)
    H = shape.num_heads
    for blk in model.blocks:
        attn, mlp = blk.attn, blk.mlp
        hd = attn.head_dim
        head_rows = torch.zeros(3, H, hd)
        head_rows[:, :heads] = 1
        head_cols = torch.zeros(H, hd)
        head_cols[:heads] = 1
        full_dim = torch.ones(shape.dim)
        hidden_keep = torch.zeros(mlp.fc1.out_features)
        hidden_keep[:hidden] = 1
        attn.qkv = MaskedLinear.from_linear(attn.qkv, head_rows.flatten(), full_dim)
        attn.proj = MaskedLinear.from_linear(attn.proj, full_dim, head_cols.flatten())
        mlp.fc1 = MaskedLinear.from_linear(mlp.fc1, hidden_keep, full_dim)
        mlp.fc2 = MaskedLinear.from_linear(mlp.fc2, full_dim, hidden_keep)
    return model


# -- timing ------------------------------------------------------------------------------------------------------


def make_sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


Samples = dict[str, dict[str, list[float]]]  # clock ("wall", "cpu") -> side -> milliseconds per call


def interleaved(sides: dict[str, Callable[[], None]], *, rounds: int, sample_s: float, warmup: int,
                sync: Callable[[], None]) -> Samples:
    """Milliseconds per call of each side: ``rounds`` samples each, taken in alternating order (ABBA...).

    Each sample times ``iters`` back-to-back calls, ``iters`` chosen once (from the slowest side) so a sample
    lasts about ``sample_s``. Two clocks: wall time (``perf_counter``, after a device sync) and the process's
    CPU time (``process_time``: on a CPU shared with other processes it leaves out the time this process waited
    for a core; with one torch thread it is the compute time of the call).
    """
    names = list(sides)
    one = {}
    for n in names:
        for _ in range(warmup):
            sides[n]()
        sync()
        t0 = time.perf_counter()
        sides[n]()
        sync()
        one[n] = time.perf_counter() - t0
    iters = max(1, round(sample_s / max(one.values())))
    samples: Samples = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(rounds):
        gc.collect()
        for n in (names if r % 2 == 0 else names[::-1]):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                sides[n]()
            sync()
            samples["wall"][n].append((time.perf_counter() - t0) / iters * 1e3)
            samples["cpu"][n].append((time.process_time() - c0) / iters * 1e3)
    return samples


_T0 = time.perf_counter()


def progress(msg: str) -> None:
    print(f"  {time.perf_counter() - _T0:6.0f} s  {msg}", flush=True)


@dataclass
class Stat:
    ms: float  # median of the side
    ratio: float | None  # median(side) / median(reference)
    paired: tuple[float, float, float] | None  # per-round side/reference: median, min, max


@dataclass
class Row:
    section: str
    side: str
    wall: Stat
    cpu: Stat
    target: str = ""


def _stat(vals: list[float], ref: list[float], is_ref: bool) -> Stat:
    med = statistics.median(vals)
    if is_ref:
        return Stat(med, None, None)
    per_round = [a / b for a, b in zip(vals, ref, strict=True)]
    return Stat(med, med / statistics.median(ref), (statistics.median(per_round), min(per_round), max(per_round)))


def rows_from(section: str, samples: Samples, ref: str, targets: dict[str, str]) -> list[Row]:
    return [Row(section, side, _stat(samples["wall"][side], samples["wall"][ref], side == ref),
                _stat(samples["cpu"][side], samples["cpu"][ref], side == ref), targets.get(side, ""))
            for side in samples["wall"]]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# -- sections 1, 2 and 4: one shape, supernet vs native vs masked ------------------------------------------------


def bench_shape(shape_name: str, device: torch.device, dtype: torch.dtype | None, rounds: int, sample_s: float,
                sync) -> list[Row]:
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    original = TinyViT(**shape.model_kwargs())
    example = torch.randn(1, shape.in_chans, shape.img_size, shape.img_size)
    supernet = SupernetModule(original, F.cross_entropy, example_input=example).to(device)
    cfg = uniform_config(supernet, SUBNET_RATIO)
    heads = int(SUBNET_RATIO * shape.num_heads)
    hidden = int(SUBNET_RATIO * shape.dim * shape.mlp_ratio)

    extracted = supernet.extract(cfg).to(device)
    native = build_native(shape, heads, hidden).to(device)
    native.load_state_dict(extracted.state_dict())  # strict: the shapes are the subnet's, key for key
    masked = build_masked(shape, supernet.state_dict(), heads, hidden).to(device)
    print(f"[{shape_name}] subnet: {heads}/{shape.num_heads} heads, MLP {hidden}/{int(shape.dim * shape.mlp_ratio)}, "
          f"depth {shape.depth}; params {supernet.cost(cfg)['params']:,} of "
          f"{supernet.cost(supernet.search_space.largest())['params']:,}; batch {shape.batch}", flush=True)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape.batch, shape.in_chans, shape.img_size, shape.img_size, generator=gen).to(device)
    y = torch.randint(shape.num_classes, (shape.batch,), generator=gen).to(device)

    # -- equal computations: outputs and gradients match before anything is timed (fp32) --
    def run_supernet(inp):
        with supernet.subnet(cfg):
            return supernet(inp)

    exact = 0.0 if device.type == "cpu" else 1e-5  # cuBLAS may pick kernels by pointer alignment
    with torch.no_grad():
        ref = native(x)
        torch.testing.assert_close(extracted(x), ref, rtol=exact, atol=exact)  # same class, same tensors
        torch.testing.assert_close(run_supernet(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(masked(x), ref, rtol=1e-4, atol=1e-4)
    grads = {}
    for name, model, fwd in (("native", native, native), ("supernet", supernet.model, run_supernet),
                             ("masked", masked, masked)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(fwd(x), y).backward()
        grads[name] = {k: model.get_parameter(k).grad.clone() for k in ("patch_embed.weight", "pos_embed",
                                                                        "head.weight", "blocks.0.norm1.weight")}
        model.zero_grad(set_to_none=True)
    for side in ("supernet", "masked"):
        for k, g in grads["native"].items():
            torch.testing.assert_close(grads[side][k], g, rtol=1e-3, atol=1e-5,
                                       msg=lambda m, k=k, side=side: f"{side} {k}: {m}")
    if dtype is not None:  # and under the timed dtype, to its tolerance
        with torch.no_grad(), autocast(device, dtype):
            ref = native(x).float()
            for side, out in (("extract", extracted(x)), ("supernet", run_supernet(x)), ("masked", masked(x))):
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                if err > 0.05:  # a sanity check; the fp32 comparison above is the strict one
                    raise AssertionError(f"{side} differs from native under {dtype}: max error {err:.3f} of max |y|")
    print(f"[{shape_name}] outputs and gradients match (native == extract(cfg) == supernet under cfg == masked)",
          flush=True)

    # -- 1 and 4: training --
    opts = {"native": torch.optim.AdamW(native.parameters(), lr=1e-4),
            "supernet": torch.optim.AdamW(supernet.parameters(), lr=1e-4),
            "masked": torch.optim.AdamW(masked.parameters(), lr=1e-4)}
    forwards = {"native": native, "supernet": run_supernet, "masked": masked}
    models = {"native": native, "supernet": supernet, "masked": masked}
    for m in models.values():
        m.train()

    def fwd_bwd(side):
        model, fwd = models[side], forwards[side]

        def step():
            model.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = F.cross_entropy(fwd(x), y)
            loss.backward()

        return step

    def train_step(side):
        inner, opt = fwd_bwd(side), opts[side]

        def step():
            inner()
            opt.step()

        return step

    rows: list[Row] = []
    label = f"{shape_name} {device.type} {'bf16' if dtype else 'fp32'}"
    sides = {f"{s}": fwd_bwd(s) for s in ("native", "supernet", "masked")}
    sides[CONTROL] = fwd_bwd("native")
    progress(f"[{shape_name}] 1. train fwd+bwd ...")
    samples = interleaved(sides, rounds=rounds, sample_s=sample_s, warmup=2, sync=sync)
    rows += rows_from(f"1. train fwd+bwd [{label}]", samples, "native",
                      {"supernet": "<= 1.03 (GPU)", "masked": "reference", CONTROL: "noise"})
    sides = {f"{s}": train_step(s) for s in ("native", "supernet", "masked")}
    progress(f"[{shape_name}] 1. train fwd+bwd+AdamW ...")
    samples = interleaved(sides, rounds=rounds, sample_s=sample_s, warmup=2, sync=sync)
    rows += rows_from(f"1. train fwd+bwd+AdamW [{label}]", samples, "native",
                      {"supernet": "<= 1.03 (GPU)", "masked": "reference"})
    for m in models.values():
        m.zero_grad(set_to_none=True)
    opts.clear()  # free the optimizer state before the inference runs

    # -- 2 and 4: inference --
    for m in (native, extracted, supernet, masked):
        m.eval()

    def infer(fwd):
        def call():
            with torch.inference_mode(), autocast(device, dtype):
                fwd(x)

        return call

    sides = {"native": infer(native), "extract(cfg)": infer(extracted), "supernet": infer(run_supernet),
             "masked": infer(masked), CONTROL: infer(native)}
    progress(f"[{shape_name}] 2. inference ...")
    samples = interleaved(sides, rounds=rounds, sample_s=sample_s, warmup=3, sync=sync)
    rows += rows_from(f"2. inference [{label}]", samples, "native",
                      {"extract(cfg)": "<= 1.02", "supernet": "info", "masked": "reference", CONTROL: "noise"})
    return rows


# -- section 3: the tiny model through Lightning -----------------------------------------------------------------


def bench_lightning(device: torch.device, dtype: torch.dtype | None, rounds: int, steps: int,
                    sync) -> tuple[list[Row], dict]:
    import lightning as L

    shape = SHAPES["tiny"]

    class LitViT(L.LightningModule):
        """A plain user LightningModule around TinyViT."""

        def __init__(self) -> None:
            super().__init__()
            self.net = TinyViT(**shape.model_kwargs())
            self.example_input_array = torch.randn(1, shape.in_chans, shape.img_size, shape.img_size)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class StepTimer(L.Callback):
        """Per training batch, on both clocks: ``step`` from on_train_batch_start to on_train_batch_end
        (training_step, backward, optimizer step, logging); ``loop`` from one on_train_batch_end to the next
        (everything the Trainer does per step, the data fetch included)."""

        def __init__(self) -> None:
            self.step: dict[str, list[float]] = {"wall": [], "cpu": []}
            self.loop: dict[str, list[float]] = {"wall": [], "cpu": []}
            self._start = self._last = None

        @staticmethod
        def _now() -> dict[str, float]:
            sync()
            return {"wall": time.perf_counter(), "cpu": time.process_time()}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._start = self._now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = self._now()
            for clock in now:
                self.step[clock].append(now[clock] - self._start[clock])
                if self._last is not None:
                    self.loop[clock].append(now[clock] - self._last[clock])
            self._last = now

    torch.manual_seed(0)
    plain = LitViT()
    supernet = SupernetModule(copy.deepcopy(plain))  # the same initial weights; wrapping edits its model in place
    with torch.no_grad():
        xb = torch.randn(4, shape.in_chans, shape.img_size, shape.img_size)
        torch.testing.assert_close(supernet(xb), plain(xb), rtol=0, atol=0)  # largest subnet == the plain model
    gen = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(
        torch.randn(shape.batch * steps, shape.in_chans, shape.img_size, shape.img_size, generator=gen),
        torch.randint(shape.num_classes, (shape.batch * steps,), generator=gen))
    loader = torch.utils.data.DataLoader(data, batch_size=shape.batch, shuffle=False, num_workers=0)
    precision = "bf16-mixed" if dtype is not None else "32-true"
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    warm = max(3, steps // 5)

    def fit(module) -> tuple[dict[str, float], dict[str, float]]:
        """Train ``steps`` steps; the median step and loop times (ms) after ``warm`` steps, per clock."""
        timer = StepTimer()
        trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=steps,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            callbacks=[timer])
        trainer.fit(module, train_dataloaders=loader)
        return ({c: statistics.median(v[warm:]) * 1e3 for c, v in timer.step.items()},
                {c: statistics.median(v[warm:]) * 1e3 for c, v in timer.loop.items()})

    progress(f"[tiny] 3. trainer.fit, {rounds} rounds of {steps} steps per side ...")
    fit(plain), fit(supernet)  # warm-up (first-call costs, allocator)
    sides = {"plain LightningModule": plain, "SupernetModule (largest)": supernet, "plain again (A/A control)": plain}
    step: Samples = {c: {k: [] for k in sides} for c in ("wall", "cpu")}
    loop: Samples = {c: {k: [] for k in sides} for c in ("wall", "cpu")}
    names = list(sides)
    for r in range(rounds):
        gc.collect()
        for n in (names if r % 2 == 0 else names[::-1]):
            s, lp = fit(sides[n])
            for c in ("wall", "cpu"):
                step[c][n].append(s[c])
                loop[c][n].append(lp[c])
    label = f"tiny {device.type} {'bf16' if dtype else 'fp32'}, trainer.fit"
    target = {"SupernetModule (largest)": "<= 1.15 (CPU)", "plain again (A/A control)": "noise"}
    rows = rows_from(f"3. Lightning step, batch_start->batch_end [{label}]", step, "plain LightningModule", target)
    rows += rows_from(f"3. Lightning loop, per step end->end [{label}]", loop, "plain LightningModule", target)
    return rows, {"plain": plain, "supernet": supernet, "fit": fit}


# -- where the wrapper's time goes --------------------------------------------------------------------------------


def profile_wrapper(light: dict, shape_name: str, device: torch.device) -> None:
    """Micro-timings of the wrapper's own work and a cProfile of ``trainer.fit`` on both sides."""
    print("\n== profile: where the wrapper's time goes (tiny model; process CPU time, microseconds) ==")
    plain, supernet = light["plain"], light["supernet"]
    space = supernet.search_space
    largest, smallest = space.largest(), space.smallest()

    def per_call_us(fn, n=2000):
        fn()
        t0 = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t0) / n * 1e6

    print(f"tiny search space: {len(space.dims)} dims")
    print(f"  activate(largest)                 {per_call_us(lambda: supernet.activate(largest)):8.1f} us")
    print(f"  activate(smallest)                {per_call_us(lambda: supernet.activate(smallest)):8.1f} us")
    supernet.activate(largest)
    print(f"  search_space.validate(largest)    {per_call_us(lambda: space.validate(largest)):8.1f} us")

    def ctx():
        with supernet.subnet(largest):
            pass

    print(f"  with subnet(cfg): (2 activates)   {per_call_us(ctx):8.1f} us")
    print(f"  search_space.largest()            {per_call_us(space.largest):8.1f} us")
    if hasattr(supernet, "make_plan"):  # the multi-subnet step loop's plan (no callbacks: [largest])
        print(f"  make_plan()                       {per_call_us(supernet.make_plan):8.1f} us")
    x = torch.randn(SHAPES["tiny"].batch, 1, 8, 8)
    sync = make_sync(torch.device("cpu"))
    plain.train(), supernet.train()
    for grad in (False, True):
        def fwd_plain(grad=grad):
            with torch.set_grad_enabled(grad):
                plain(x)

        def fwd_super(grad=grad):
            with torch.set_grad_enabled(grad):
                supernet(x)

        s = interleaved({"plain": fwd_plain, "super": fwd_super}, rounds=31, sample_s=0.1, warmup=5, sync=sync)
        a, b = statistics.median(s["cpu"]["plain"]), statistics.median(s["cpu"]["super"])
        print(f"  forward at largest, grad={grad!s:5}  plain {a * 1e3:8.1f} us  supernet {b * 1e3:8.1f} us  "
              f"(+{(b - a) * 1e3:.1f} us, {b / a:.3f}x)")
    lin, plain_lin = supernet.model.net.blocks[0].mlp.fc1, plain.net.blocks[0].mlp.fc1
    xin = torch.randn(64, lin.in_features)
    with torch.no_grad():
        s = interleaved({"plain": lambda: plain_lin(xin), "elastic": lambda: lin(xin)}, rounds=31, sample_s=0.05,
                        warmup=20, sync=sync)
    a, b = statistics.median(s["cpu"]["plain"]), statistics.median(s["cpu"]["elastic"])
    print(f"  one Linear forward (64x{lin.in_features}->{lin.out_features}), full width: plain {a * 1e3:6.1f} us, "
          f"elastic {b * 1e3:6.1f} us (+{(b - a) * 1e3:.1f} us per elastic op call)")
    n_elastic = sum(1 for m in supernet.model.modules() if type(m).__name__.startswith(("Elastic", "Skippable")))
    print(f"  elastic modules in the tiny model: {n_elastic}")

    for name in ("plain", "supernet"):
        prof = cProfile.Profile()
        prof.enable()
        light["fit"](light[name])
        prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        total = stats.total_tt
        lib = [(k, v) for k, v in stats.stats.items() if "lightning_supernet" in k[0]]
        own = sum(v[2] for _, v in lib)  # tottime inside lightning_supernet
        print(f"  cProfile trainer.fit({name}): {total:.2f} s total, {own * 1e3:.0f} ms inside lightning_supernet")
        if name == "supernet":
            lib.sort(key=lambda kv: -kv[1][2])
            for (fname, line, func), v in lib[:8]:
                print(f"    {v[2] * 1e3:7.1f} ms tottime {v[3] * 1e3:7.1f} ms cumtime {v[1]:6d} calls  "
                      f"{os.path.relpath(fname)}:{line}({func})")


# -- reporting ---------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _git_describe() -> str:
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lightning_supernet"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"git {head}" + (" + uncommitted changes in lightning_supernet/" if dirty else "")


def _fmt(st: Stat) -> list[str]:
    ratio = f"{st.ratio:.3f}x" if st.ratio is not None else "1 (ref)"
    paired = f"{st.paired[0]:.3f} [{st.paired[1]:.3f}, {st.paired[2]:.3f}]" if st.paired else ""
    return [f"{st.ms:.3f}", ratio, paired]


def print_table(rows: list[Row], cpu_clock: bool) -> None:
    head = ["section", "side", "wall ms", "wall ratio", "wall per-round ratio med [min, max]"]
    if cpu_clock:
        head += ["CPU-time ms", "CPU-time ratio", "CPU-time per-round ratio med [min, max]"]
    head.append("target")
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" if "ms" in h or h.endswith("ratio") else "---" for h in head) + "|")
    for r in rows:
        cells = [r.section, r.side] + _fmt(r.wall) + (_fmt(r.cpu) if cpu_clock else []) + [r.target]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: torch.autocast(bfloat16) with fp32 weights (Lightning's bf16-mixed)")
    p.add_argument("--shape", choices=tuple(SHAPES), default=None,
                   help="shape of sections 1, 2, 4 (default: small on cpu, vit-b on cuda); section 3 uses tiny")
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: 1 on cpu, steady on a shared machine; the usable cores "
                        "on cuda)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per comparison")
    p.add_argument("--profile", action="store_true",
                   help="profile the wrapper (also done when a CPU step ratio is above 1.10)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: shape,lightning")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    if dtype is not None and device.type == "cpu":
        warnings.warn("bf16 autocast on a CPU without AVX-512 BF16 can be much slower than fp32", stacklevel=1)
    shape = args.shape or ("vit-b" if device.type == "cuda" else "small")
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or (cores if device.type == "cuda" else 1)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    rounds = args.rounds or (5 if args.quick else 15)
    sample_s = 0.05 if args.quick else 0.2
    lightning_steps = 25 if args.quick else 40
    skip = set(filter(None, args.skip.split(",")))

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*`self.log\\(.*")

    import lightning

    sync = make_sync(device)
    print(f"torch {torch.__version__}, lightning {lightning.__version__}, python {platform.python_version()}")
    print(f"device: {device.type} ({device_name(device)}), torch threads: {torch.get_num_threads()} "
          f"(interop {torch.get_num_interop_threads()}), dtype: {args.dtype}, mode: "
          f"{'quick' if args.quick else 'default'}, rounds: {rounds}, load avg at start: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"code: {_git_describe()}")
    if device.type == "cpu" and os.getloadavg()[0] > cores:
        print(f"NOTE: load average {os.getloadavg()[0]:.1f} exceeds the {cores} usable cores: other processes share "
              "the CPU, single timings are noisy (read the CPU-time columns and the A/A control rows)"
              + ("; with more torch threads than free cores OpenMP spin-waits, `--threads 1` is steadier"
                 if threads > 1 else ""))
    print(f"command: python {' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}", flush=True)
    t_start = time.perf_counter()

    rows: list[Row] = []
    if "shape" not in skip:
        rows += bench_shape(shape, device, dtype, rounds, sample_s, sync)
    light = None
    if "lightning" not in skip:
        light_rows, light = bench_lightning(device, dtype, rounds, lightning_steps, sync)
        rows += light_rows
    print_table(rows, cpu_clock=device.type == "cpu")
    print(f"\nratio = median(side) / median(ref); per-round ratio pairs each round's samples (same load); "
          "CPU time = process_time (excludes waiting for a core; with --threads 1 the compute of the call). "
          f"Load avg at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"wall {time.perf_counter() - t_start:.0f} s")

    def ratio(r: Row) -> float | None:  # the CPU-time ratio on a CPU (steadier under load), else wall time
        return (r.cpu if device.type == "cpu" else r.wall).ratio

    bad_step = any(ratio(r) is not None and ratio(r) > 1.10 and r.side.startswith(("supernet", "SupernetModule"))
                   and r.section.startswith(("1.", "3.")) for r in rows)
    if light is not None and (args.profile or (bad_step and device.type == "cpu")):
        profile_wrapper(light, shape, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
