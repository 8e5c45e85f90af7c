"""Sandwich-step cost benchmark (issue 3, "Measure"): one multi-subnet step vs its subnets' native steps.

**Time.** The sandwich step is the real one: ``SupernetModule.training_step`` inside a Lightning ``Trainer`` with
``SandwichSampling(num_random=2)`` (largest + 2 random + smallest) and ``InplaceDistillation`` (the largest's
detached logits are the students' soft targets); it is timed from ``on_train_batch_start`` to
``on_train_batch_end`` of a callback (forward + backward of the four subnets, one optimizer step, Lightning's
per-batch hooks and the user's ``self.log`` calls; no data loading). Its reference is the *sum of the subnets'
native steps*: for every step the callback asks the module for that step's plan (``make_plan``: the same
configs the step trains), each subnet is extracted with ``supernet.extract(cfg)`` (outside the timed window,
cached, with one untimed warm-up step) and stepped natively on the same batch: forward, the same loss (cross
entropy for the largest, the distillation loss to the native largest's detached logits for the others),
backward, its own AdamW step. A third side drives the same step loop by hand without Lightning (a second
supernet: ``with supernet.subnet(cfg): loss(supernet(x)).backward()`` per subnet, then one AdamW step), which
separates Lightning's per-step overhead from the supernet's. Rounds are interleaved inside the Trainer's own
loop (even rounds: native, manual, sandwich; odd rounds: sandwich, manual, native), so load from other
processes hits every side alike; the table gives medians per side, the ratio of medians and the median
(min, max) of the per-round ratios. On CPU each side is timed twice: wall clock and this process's CPU time
(``time.process_time``, which leaves out the time spent waiting for a core on a shared machine: with one torch
thread it is the compute the step used). Target: sandwich / native sum <= 1.05.

**Peak memory** (separate phase, nothing else alive): the sandwich step vs the largest subnet stepped alone
(``extract(largest)`` + AdamW). Target <= 1.15.

- CUDA: ``torch.cuda.max_memory_allocated()`` over one step (peak reset at the step's start; the optimizer state
  already exists) — the total (weights, gradients, AdamW state, activations, temporaries) and the growth over
  the step's start.
- CPU (no allocator statistics; RSS is dominated by the allocator's caching and tracemalloc does not see tensor
  memory): an exact count of what autograd keeps alive. A ``torch.autograd.graph.saved_tensors_hooks`` pack hook
  wraps every tensor saved for backward; a ``weakref.finalize`` on the wrapper fires when autograd frees it
  (after that subnet's backward, or when its graph dies). Saved tensors are counted by storage (a storage saved
  twice, or through views, counts once, with its full size) and those that are parameter storages (weights and
  their sliced views) are not activations and are left out. At every pack, and after every step, the meter
  records ``live saved-activation bytes + bytes of the .grad tensors that exist``; its maximum over the step
  plus the resident state (parameters + AdamW state) is the peak. Transient buffers (activation gradients inside
  backward, matmul temporaries) are not seen by this method; they are of the order of one layer's activations
  on both sides. The same meter also runs on CUDA as a cross-check.
- Control: the same kind of plan with one backward of the *summed* losses (every subnet's graph alive at once,
  what the step loop avoids) is metered too, to show that the method sees retained graphs.

Usage:
    python benchmarks/bench_sandwich.py --quick                  # CPU smoke run
    python benchmarks/bench_sandwich.py                          # CPU, digits-sized ViT, 40 rounds
    python benchmarks/bench_sandwich.py --shape small            # CPU, a wider ViT (65 tokens, dim 256)
    python benchmarks/bench_sandwich.py --device cuda            # GPU, ViT-S/16 shape (fp32)
    python benchmarks/bench_sandwich.py --device cuda --shape vit-b --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import logging
import os
import platform
import statistics
import sys
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import InplaceDistillation, SandwichSampling
from lightning_supernet.cost import count_params
from lightning_supernet.models import TinyViT


def _quiet() -> None:
    import lightning.pytorch  # noqa: F401  (importing it sets its loggers to INFO: silence them after)

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -- shapes and the user's module --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    img_size: int
    patch_size: int
    in_chans: int
    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    num_classes: int
    batch: int

    def model_kwargs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("img_size", "patch_size", "in_chans", "dim", "depth", "num_heads",
                                              "mlp_ratio", "num_classes")}


SHAPES = {
    # DigitsViT's shape (the quality benchmark's model): 8x8 input, 4x4 patches (5 tokens), dim 64
    "digits": Shape(8, 4, 1, 64, 4, 4, 2.0, 10, batch=64),
    # a wider CPU model: 65 tokens, dim 256, head_dim 32
    "small": Shape(32, 4, 3, 256, 4, 8, 4.0, 100, batch=16),
    # ViT-S/16 and ViT-B/16 at 224x224 (GPU)
    "vit-s": Shape(224, 16, 3, 384, 12, 6, 4.0, 1000, batch=64),
    "vit-b": Shape(224, 16, 3, 768, 12, 12, 4.0, 1000, batch=64),
}


class BenchViT(pl.LightningModule):
    """An ordinary LightningModule around ``TinyViT`` (like ``DigitsViT``, for any input size)."""

    def __init__(self, shape: Shape, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = TinyViT(**shape.model_kwargs())
        self.lr = lr
        self.example_input_array = torch.zeros(1, shape.in_chans, shape.img_size, shape.img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def make_data(shape: Shape, n_batches: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = shape.batch * n_batches
    return TensorDataset(torch.randn(n, shape.in_chans, shape.img_size, shape.img_size, generator=g),
                         torch.randint(0, shape.num_classes, (n,), generator=g))


def make_supernet(shape: Shape, seed: int = 0) -> SupernetModule:
    torch.manual_seed(seed)
    return SupernetModule(BenchViT(shape), eval_subnets=None)


def _trainer(args: argparse.Namespace, steps: int, callbacks: list[Any]) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator=args.device, devices=1, precision=args.precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)


def _clock() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds)."""
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - t0[0], cpu - t0[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(args: argparse.Namespace, device: torch.device) -> Any:
    if args.precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if args.precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


# -- the reference sides ---------------------------------------------------------------------------------------


class NativeSubnets:
    """Extracted subnets (cached by canonical config, at most ``cache`` alive) with their own AdamW."""

    def __init__(self, args: argparse.Namespace, device: torch.device, cache: int) -> None:
        self.args, self.device, self.cache = args, device, cache
        self.models: collections.OrderedDict[Any, tuple[nn.Module, torch.optim.Optimizer]] = (
            collections.OrderedDict())
        self.extracted = 0

    def get(self, supernet: SupernetModule, cfg: Any, batch: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
        key = supernet.search_space.canonical(cfg)
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        while len(self.models) >= self.cache:
            self.models.popitem(last=False)
        model = supernet.extract(cfg).to(self.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.models[key] = (model, opt)
        self.extracted += 1
        x, y = batch
        with _autocast(self.args, self.device):  # warm-up: allocates the AdamW state, first-call kernels
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return model, opt

    def step(self, supernet: SupernetModule, plan: list[Any], batch: Any) -> tuple[float, float]:
        """One native step per subnet of the plan, with the plan's loss terms."""
        x, y = batch
        teacher = None
        models = [self.get(supernet, item.config, batch) for item in plan]
        _sync(self.device)
        t0 = _clock()
        for item, (model, opt) in zip(plan, models):
            with _autocast(self.args, self.device):
                out = model(x)
                loss = _plan_loss(item, out, y, teacher)
            if item.teacher:
                teacher = out.detach()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return _since(t0)


def _plan_loss(item: Any, out: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
    """The loss ``SupernetModule.training_step`` computes for a plan item (task term + distillation term)."""
    loss = F.cross_entropy(out, y) * item.task_weight if item.task_weight else out.new_zeros(())
    if item.distill_weight and teacher is not None:
        loss = loss + item.distill_weight * item.distill_fn(out, teacher)
    return loss


class ManualLoop:
    """The same sandwich step driven by hand through the public API, without Lightning."""

    def __init__(self, shape: Shape, args: argparse.Namespace, device: torch.device) -> None:
        self.supernet = make_supernet(shape).to(device).train()
        self.opt = torch.optim.AdamW(self.supernet.parameters(), lr=1e-3)
        self.args, self.device = args, device

    def step(self, plan: list[Any], batch: Any) -> tuple[float, float]:
        x, y = batch
        sn, teacher = self.supernet, None
        _sync(self.device)
        t0 = _clock()
        for item in plan:
            with sn.subnet(item.config), _autocast(self.args, self.device):
                out = sn(x)
                loss = _plan_loss(item, out, y, teacher)
            if item.teacher:
                teacher = out.detach()
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return _since(t0)


class Interleave(pl.Callback):
    """Times the Trainer's sandwich step and, in alternating order, the reference sides on the same batch/plan."""

    def __init__(self, args: argparse.Namespace, shape: Shape, device: torch.device, warmup: int) -> None:
        self.args, self.device, self.warmup = args, device, warmup
        self.native = NativeSubnets(args, device, cache=args.cache)
        self.manual = ManualLoop(shape, args, device) if not args.no_manual else None
        self.times: dict[str, list[tuple[float, float]]] = {"sandwich (Trainer)": [], "manual loop": [], "native sum": []}
        self.plan_sizes: list[int] = []
        self._t0 = (0.0, 0.0)
        self._plan: list[Any] = []
        self._batch: Any = None

    def _references(self, round_: int) -> None:
        record = round_ >= 0
        t = self.native.step(self._module, self._plan, self._batch)
        if record:
            self.times["native sum"].append(t)
        if self.manual is not None:
            t = self.manual.step(self._plan, self._batch)
            if record:
                self.times["manual loop"].append(t)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: SupernetModule, batch: Any, batch_idx: int) -> None:
        self._module = pl_module
        self._plan = pl_module.make_plan(batch_idx)  # the plan training_step will build (same generator state)
        self._batch = [t.to(self.device) for t in batch]
        round_ = trainer.global_step - self.warmup
        for item in self._plan:  # extraction and warm-up outside every timed window
            self.native.get(pl_module, item.config, self._batch)
        if round_ % 2 == 0:
            self._references(round_)
        _sync(self.device)
        self._t0 = _clock()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: SupernetModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        _sync(self.device)
        elapsed = _since(self._t0)
        round_ = trainer.global_step - 1 - self.warmup  # global_step counts the step just taken
        if round_ >= 0:
            self.times["sandwich (Trainer)"].append(elapsed)
            self.plan_sizes.append(len(self._plan))
        if round_ % 2 == 1:
            self._references(round_)


# -- memory ------------------------------------------------------------------------------------------------------


class _Packed:
    __slots__ = ("__weakref__", "t")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class SavedTensorMeter:
    """Live bytes of tensors autograd saved for backward (+ live ``.grad`` bytes), and their maximum.

    See the module docstring: storages are counted once, parameter storages are left out, a finalizer on the
    packed wrapper releases the bytes when autograd drops the saved tensor.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list[int]] = {}
        self.live_saved = 0
        self.peak_saved = 0
        self.peak_total = 0  # saved + grads
        self._ctx: Any = None

    def grad_bytes(self) -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live_saved -= entry[1]
            del self.live[ptr]

    def _pack(self, t: torch.Tensor) -> Any:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.param_ptrs or storage.nbytes() == 0:
            return t
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [1, storage.nbytes()]
            self.live_saved += storage.nbytes()
        else:
            entry[0] += 1
        # a detached alias: wrapping ``t`` itself would make a node that saves its own output keep itself alive
        # (node -> saved wrapper -> t -> t.grad_fn == node) when backward never reaches it
        packed = _Packed(t.detach())
        weakref.finalize(packed, self._release, ptr)
        self.peak_saved = max(self.peak_saved, self.live_saved)
        self.peak_total = max(self.peak_total, self.live_saved + self.grad_bytes())
        return packed

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.t if isinstance(packed, _Packed) else packed

    def observe(self) -> None:
        """Record the current state (after a backward: grads grown, saved tensors released)."""
        self.peak_total = max(self.peak_total, self.live_saved + self.grad_bytes())

    def __enter__(self) -> SavedTensorMeter:  # noqa: PYI034
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
        gc.collect()
        self.observe()


def _state_bytes(params: list[nn.Parameter], opts: list[torch.optim.Optimizer]) -> int:
    total = sum(p.numel() * p.element_size() for p in params)
    for opt in opts:
        for state in opt.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


class MemoryProbe(pl.Callback):
    """Per step: the saved-tensor meter (all devices) and, on CUDA, the allocator's peak."""

    def __init__(self, device: torch.device, skip: int) -> None:
        self.device, self.skip = device, skip
        self.meter: SavedTensorMeter | None = None
        self.rows: list[dict[str, int]] = []
        self._cuda_base = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: SupernetModule, batch: Any, batch_idx: int) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
        self.meter = SavedTensorMeter(list(pl_module.parameters())).__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: SupernetModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.meter.__exit__(None, None, None)
        opts = [getattr(o, "optimizer", o) for o in trainer.optimizers]
        row = {"saved_peak": self.meter.peak_saved, "saved_grads_peak": self.meter.peak_total,
               "retained": self.meter.live_saved, "state": _state_bytes(list(pl_module.parameters()), opts)}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            row["cuda_peak"] = torch.cuda.max_memory_allocated(self.device)
            row["cuda_base"] = self._cuda_base
        if trainer.global_step > self.skip:  # the first step allocates the AdamW state
            self.rows.append(row)


def measure_memory(args: argparse.Namespace, shape: Shape, device: torch.device, steps: int) -> dict[str, Any]:
    """Peak memory of the sandwich step (Trainer) and of the largest subnet stepped alone."""
    skip = 1
    # the largest subnet alone, natively
    sn = make_supernet(shape)
    largest = sn.extract(sn.search_space.largest()).to(device).train()
    del sn
    opt = torch.optim.AdamW(largest.parameters(), lr=1e-3)
    data = make_data(shape, steps + skip)
    native_rows = []
    for i, (x, y) in enumerate(DataLoader(data, batch_size=shape.batch)):
        x, y = x.to(device), y.to(device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with SavedTensorMeter(list(largest.parameters())) as meter:
            with _autocast(args, device):
                loss = F.cross_entropy(largest(x), y)
            loss.backward()
            meter.observe()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
        row = {"saved_peak": meter.peak_saved, "saved_grads_peak": meter.peak_total, "retained": meter.live_saved,
               "state": _state_bytes(list(largest.parameters()), [opt])}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row["cuda_peak"] = torch.cuda.max_memory_allocated(device)
            row["cuda_base"] = base
        if i >= skip:
            native_rows.append(row)
    del largest, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # the sandwich step, inside the Trainer
    sn = make_supernet(shape)
    probe = MemoryProbe(device, skip)
    cbs = [SandwichSampling(num_random=args.num_random, seed=args.seed), probe]
    if not args.no_distill:
        cbs.append(InplaceDistillation())
    _trainer(args, steps + skip, cbs).fit(sn, DataLoader(data, batch_size=shape.batch))
    out = {"native": {k: max(r[k] for r in native_rows) for k in native_rows[0]},
           "sandwich": {k: max(r[k] for r in probe.rows) for k in probe.rows[0]}}
    # control: the same kind of plan with ONE backward of the summed losses (every subnet's graph alive at once),
    # which is what the step loop avoids; shows that the meter sees retained graphs
    sn = sn.to(device).train()
    opt = torch.optim.AdamW(sn.parameters(), lr=1e-3)
    sampler = SandwichSampling(num_random=args.num_random, seed=args.seed)
    x, y = (t.to(device) for t in next(iter(DataLoader(data, batch_size=shape.batch))))
    rows = []
    for step in range(skip + steps):
        configs = [sn.search_space.largest(), *sampler.sample_random(sn, sampler.generator(step)),
                   sn.search_space.smallest()]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with SavedTensorMeter(list(sn.parameters())) as meter:
            total = 0.0
            for cfg in configs:
                with sn.subnet(cfg), _autocast(args, device):
                    total = total + F.cross_entropy(sn(x), y)
            total.backward()
            meter.observe()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del total
        row = {"saved_peak": meter.peak_saved, "saved_grads_peak": meter.peak_total, "retained": meter.live_saved,
               "state": _state_bytes(list(sn.parameters()), [opt])}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row["cuda_peak"] = torch.cuda.max_memory_allocated(device)
            row["cuda_base"] = base
        if step >= skip:
            rows.append(row)
    out["summed"] = {k: max(r[k] for r in rows) for k in rows[0]}
    del sn, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# -- checks, report ------------------------------------------------------------------------------------------------


def check_equal(shape: Shape, device: torch.device) -> None:
    """The extracted subnets compute what the supernet computes under their configs."""
    sn = make_supernet(shape).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, shape.in_chans, shape.img_size, shape.img_size, generator=g).to(device)
    for cfg in (sn.search_space.largest(), sn.search_space.smallest(), sn.search_space.sample(g)):
        small = sn.extract(cfg).to(device).eval()
        with torch.no_grad(), sn.subnet(cfg):
            torch.testing.assert_close(small(x), sn(x), rtol=1e-4, atol=1e-4)
        assert count_params(small) == sn.cost(cfg)["params"]


def _fmt_ratio(a: list[float], b: list[float]) -> str:
    per_round = sorted(x / y for x, y in zip(a, b))
    return (f"{statistics.median(a) / statistics.median(b):.3f}x ({statistics.median(per_round):.3f}, "
            f"{per_round[0]:.3f}, {per_round[-1]:.3f})")


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: digits on CPU, vit-s on CUDA")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    p.add_argument("--rounds", type=int, default=None, help="timed steps (default 40; quick 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--mem-steps", type=int, default=3, help="steps of the memory phase (after 1 warm-up step)")
    p.add_argument("--quick", action="store_true", help="few rounds (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU)")
    p.add_argument("--num-random", type=int, default=2, help="random subnets per sandwich step")
    p.add_argument("--no-distill", action="store_true", help="without InplaceDistillation (all subnets: CE)")
    p.add_argument("--no-manual", action="store_true", help="skip the hand-driven step loop side")
    p.add_argument("--cache", type=int, default=None, help="extracted subnets kept (default 256 CPU, 8 CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma list of: time,memory")
    args = p.parse_args(argv)
    _quiet()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    args.device = device.type
    shape = SHAPES[args.shape or ("digits" if device.type == "cpu" else "vit-s")]
    rounds = args.rounds if args.rounds is not None else (10 if args.quick else 40)
    args.cache = args.cache or (256 if device.type == "cpu" else 8)
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    skip = {s for s in args.skip.split(",") if s}
    load0 = os.getloadavg()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# bench_sandwich  python {platform.python_version()}  torch {torch.__version__}  "
          f"lightning {pl.__version__}  device {device.type} ({name})  threads {threads}  "
          f"load {' '.join(f'{v:.2f}' for v in load0)}")
    print(f"# shape {shape}  precision {args.precision}  plan: largest + {args.num_random} random + smallest"
          f"{'' if args.no_distill else ', InplaceDistillation(kl)'}")
    check_equal(shape, device)
    print("# extracted subnets == supernet under their configs (largest, smallest, a random one): ok")
    t_start = time.perf_counter()

    if "time" not in skip:
        sn = make_supernet(shape)
        probe = Interleave(args, shape, device, args.warmup)
        cbs = [SandwichSampling(num_random=args.num_random, seed=args.seed), probe]
        if not args.no_distill:
            cbs.append(InplaceDistillation())
        _trainer(args, args.warmup + rounds, cbs).fit(
            sn, DataLoader(make_data(shape, args.warmup + rounds), batch_size=shape.batch))
        print()
        print(f"## Step time, {rounds} interleaved rounds ({probe.native.extracted} subnets extracted, "
              f"{statistics.mean(probe.plan_sizes):.0f} per step)")
        clocks = [("wall", 0)] + ([("CPU time (process_time)", 1)] if device.type == "cpu" else [])
        for clock, idx in clocks:
            times = {k: [t[idx] for t in v] for k, v in probe.times.items() if v}
            ref = times["native sum"]
            print()
            print(f"| side ({clock}) | median ms | vs native sum: ratio of medians (per-round median, min, max) |")
            print("|---|---|---|")
            for k, v in times.items():
                print(f"| {k} | {1e3 * statistics.median(v):.2f} | "
                      f"{'1' if k == 'native sum' else _fmt_ratio(v, ref)} |")
            ratio = statistics.median(times["sandwich (Trainer)"]) / statistics.median(ref)
            print()
            print(f"Target sandwich step <= 1.05x the sum of its subnets' native steps ({clock}): "
                  f"{'MET' if ratio <= 1.05 else 'NOT MET'} ({ratio:.3f}x)")
        del sn, probe
        gc.collect()

    if "memory" not in skip:
        mem = measure_memory(args, shape, device, args.mem_steps)
        nat, sw, sm = mem["native"], mem["sandwich"], mem["summed"]
        print()
        print(f"## Peak memory of one step (max over {args.mem_steps} steps after a warm-up step)")
        print()
        print("| measure | largest alone (native) | sandwich step | ratio | control: one backward of the summed "
              "losses | ratio |")
        print("|---|---|---|---|---|---|")
        rows = [("saved activations, peak (saved-tensor hooks)", "saved_peak"),
                ("saved activations + grads, peak", "saved_grads_peak"),
                ("params + AdamW state (resident)", "state"),
                ("total = resident + (saved + grads) peak", "total")]
        if device.type == "cuda":
            rows += [("CUDA max_memory_allocated (total)", "cuda_peak"),
                     ("CUDA peak growth over the step's start", "cuda_growth")]
        for d in (nat, sw, sm):
            d["total"] = d["state"] + d["saved_grads_peak"]
            if device.type == "cuda":
                d["cuda_growth"] = d["cuda_peak"] - d["cuda_base"]
        for label, k in rows:
            print(f"| {label} | {_mib(nat[k])} | {_mib(sw[k])} | {sw[k] / nat[k]:.3f}x | {_mib(sm[k])} | "
                  f"{sm[k] / nat[k]:.3f}x |")
        print(f"| saved tensors still alive after the step (graphs leaked) | {_mib(nat['retained'])} | "
              f"{_mib(sw['retained'])} | | {_mib(sm['retained'])} | |")
        rows = [(label, nat[k], sw[k]) for label, k in rows]
        key = rows[-2] if device.type == "cuda" else rows[3]
        ratio = key[2] / key[1]
        print()
        print(f"Target peak memory <= 1.15x the largest subnet alone ({key[0]}): "
              f"{'MET' if ratio <= 1.15 else 'NOT MET'} ({ratio:.3f}x)")
        print("Method: " + ("torch.cuda.max_memory_allocated over one step, peak reset at the step's start; "
                            "the saved-tensor rows are the CPU method, as a cross-check."
                            if device.type == "cuda" else
                            "no allocator statistics on CPU: autograd's saved tensors are counted exactly with "
                            "torch.autograd.graph.saved_tensors_hooks (pack: +storage bytes, dedup by storage, "
                            "parameter storages excluded; a weakref finalizer on the packed wrapper: -bytes when "
                            "autograd frees it), maximum over the step of live saved bytes + live .grad bytes, "
                            "plus params + AdamW state. Transient buffers inside kernels/backward are not seen."))
    print()
    print(f"# wall {time.perf_counter() - t_start:.0f} s; load at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
