"""Pretrained models into supernets (issue 13): does the largest stay the original, are its subnets as good as
dedicated students, what does the sandwich step cost — and the ablations behind the recipe's defaults.

The benchmark pre-trains its own model (no downloads): a TinyViT (6 blocks, dim 64, 4 heads, MLP 128, 17 tokens)
on scikit-learn's digits, Adam, ``--pretrain-steps`` steps. Then, on the same training data:

* **Importance kinds, no training**: the first-k 50 %-MLP subnet (every ``mlp.fc1`` at half) after sorting with
  ``prioritize(kind=...)`` for none / magnitude / activation / taylor on the task loss / taylor on the output's
  sensitivity (the default), 4 and 16 batches. **Depth order, no training**: the 4-of-6
  blocks subnet keeping the 4 blocks ranked most important (``block_importance``), the first 4 (model order), the
  least important 4.
* **Supernet fine-tunes** of ``--steps`` steps (batch 64, Adam lr ``--lr``, SandwichSampling(num_random=2):
  4 subnets a step), each from a fresh copy of the pretrained model:
  ``defaults`` (the library's defaults and default space: ParameterPrioritization() magnitude at train start,
  InplaceDistillation() teacher = largest, KL, task loss on every subnet), ``recipe`` (space: widths and heads
  down to 50 %, at least 4 blocks; ``prioritize()`` (taylor on the output, block ranking: nested depths) +
  ``pretrained_recipe(features=["norm"])``: teacher = frozen original, largest anchored with weight 3 and no task
  term, students distilled only, KL on logits + cosine on the final norm's tokens), and the ablations
  ``recipe teacher=largest`` (same, but the moving largest teaches, largest keeps its task term since it cannot
  be anchored), ``recipe no feature KD``, ``recipe magnitude`` (importance), ``recipe model-order depth``.
* **Standalone students**: the 50 %-MLP and 4-of-6-blocks shapes extracted from the sorted (untrained) supernet
  and distilled from the original with the recipe's losses, for the same steps, batches and optimizer.
* **Step cost**: the recipe's sandwich step (teacher forward + 4 subnets' forward/backward + one Adam step, timed
  in-process from ``on_train_batch_start`` to ``on_train_batch_end`` with ``time.process_time``) against a plain
  step of the largest alone (no distillation) timed in the same process right after; and the ratio the sizes
  predict: ``(3 Σ MACs(subnet) + MACs(teacher forward)) / (3 MACs(largest))``, forward+backward = 3 forwards.

Metrics on the held-out split: cosine of the embedding (final norm's class token) to the original's, and
accuracy (the original's in the header).

Usage:
    python benchmarks/bench_pretrained.py                 # ~10 min on one CPU thread
    python benchmarks/bench_pretrained.py --steps 60 --pretrain-steps 200   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_supernet import SupernetModule  # noqa: E402
from lightning_supernet.callbacks import InplaceDistillation, ParameterPrioritization, SandwichSampling  # noqa: E402
from lightning_supernet.callbacks.distillation import feature_loss  # noqa: E402
from lightning_supernet.demo import DigitsDataModule  # noqa: E402
from lightning_supernet.importance import block_importance, prioritize  # noqa: E402
from lightning_supernet.models import TinyViT  # noqa: E402
from lightning_supernet.recipes import pretrained_recipe  # noqa: E402

FEATURES = ["norm"]
#: the recipe's search space: widths and heads down to 50 %, at least 4 of the 6 blocks
SPACE = {"width_ratios": [0.5, 0.75, 1.0], "head_ratios": [0.5, 0.75, 1.0], "min_depth": 4}


def data() -> tuple[TensorDataset, TensorDataset]:
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    return dm.train_set, dm.val_set


def loader(train: TensorDataset, seed: int = 1) -> DataLoader:
    return DataLoader(train, batch_size=64, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed))


def pretrain(train: TensorDataset, steps: int, lr: float = 3e-3) -> TinyViT:
    torch.manual_seed(0)
    model = TinyViT(dim=64, depth=6, num_heads=4, mlp_ratio=2.0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    done = 0
    while done < steps:
        for x, y in loader(train, done):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    return model.eval()


def embed(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    h = model.get_submodule("norm").register_forward_hook(lambda m, a, o: seen.__setitem__("e", o))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        h.remove()
    return seen["e"][:, 0], logits


class Ref:
    def __init__(self, original: TinyViT, val: TensorDataset) -> None:
        self.x, self.y = val.tensors
        self.emb, logits = embed(original.eval(), self.x)
        self.acc = (logits.argmax(-1) == self.y).float().mean().item()

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        e, logits = embed(model, self.x)
        model.train(was)
        return {"cos": round(F.cosine_similarity(e, self.emb, -1).mean().item(), 4),
                "acc": round((logits.argmax(-1) == self.y).float().mean().item() * 100, 2)}

    def score_cfg(self, sn: SupernetModule, cfg) -> dict[str, float]:
        with sn.subnet(cfg):
            return self.score(sn.model)


def supernet(model: TinyViT, lr: float, space=None) -> SupernetModule:
    return SupernetModule(copy.deepcopy(model), F.cross_entropy, example_input=torch.randn(1, 1, 8, 8),
                          optimizer=lambda p: torch.optim.Adam(p, lr=lr), eval_subnets=None, space=space)


def half_mlp(sn: SupernetModule):
    return sn.search_space.config({n: max(d.choices) // 2 for n, d in sn.search_space.dims.items()
                                   if n.endswith("mlp.fc1.width")})


def keep_blocks(sn: SupernetModule, keep: list[str]):
    return sn.search_space.config({n: n in keep for n, d in sn.search_space.dims.items() if d.kind == "depth"})


def four_of_six(sn: SupernetModule):
    space = sn.search_space
    names = [n for n, d in space.dims.items() if d.kind == "depth"]
    if space.block_priority:
        names = sorted(names, key=lambda n: -space.block_priority[n])
    return keep_blocks(sn, names[:4])


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.plans: list[list] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.plans.append([p.config for p in pl_module.make_plan(batch_idx)])
        self._t0 = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.process_time() - self._t0)


def fit(sn: SupernetModule, callbacks: list, train: TensorDataset, steps: int) -> StepTimer:
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, callbacks=[timer, *callbacks], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, accelerator="cpu", devices=1, max_epochs=-1)
    trainer.fit(sn, train_dataloaders=loader(train))
    return timer


def variant(name: str, original: TinyViT, train: TensorDataset, ref: Ref, args) -> tuple[dict, SupernetModule, StepTimer]:
    sn = supernet(original, args.lr, None if name == "defaults" else SPACE)
    t0 = time.time()
    if name == "defaults":
        cbs = [ParameterPrioritization(), SandwichSampling(num_random=2), InplaceDistillation()]
    else:
        kind = "magnitude" if name == "recipe magnitude" else "taylor"  # taylor: on the output's sensitivity
        prioritize(sn, loader(train, 7), kind=kind, batches=4, depth=name != "recipe model-order depth")
        feats = None if name == "recipe no feature KD" else FEATURES
        if name == "recipe feature weight 1":
            feats = {path: 1.0 for path in FEATURES}
        cbs = pretrained_recipe(features=feats, num_random=4 if name == "recipe 4 random" else 2)
        if name == "recipe teacher=largest":
            cbs[1] = InplaceDistillation(teacher="largest", student_task_weight=0.0, largest_task_weight=1.0,
                                         features=feats, feature_loss_kind="cosine")
    timer = fit(sn, cbs, train, args.steps)
    row = {"largest": ref.score(sn.model), "50% MLP": ref.score_cfg(sn, half_mlp(sn)),
           "4 of 6 blocks": ref.score_cfg(sn, four_of_six(sn)), "wall_s": round(time.time() - t0, 1)}
    return row, sn, timer


def student(original: TinyViT, sorted_sn: SupernetModule, cfg, train: TensorDataset, ref: Ref, args) -> dict:
    small = sorted_sn.extract(cfg).train()
    teacher = copy.deepcopy(original).eval().requires_grad_(False)
    opt = torch.optim.Adam(small.parameters(), lr=args.lr)
    done = 0
    while done < args.steps:
        for x, _ in loader(train):
            t_emb, t_logits = embed(teacher, x)
            seen = {}
            h = small.get_submodule("norm").register_forward_hook(lambda m, a, o: seen.__setitem__("e", o))
            logits = small(x)
            h.remove()
            with torch.no_grad():
                tn = {}
                h = teacher.get_submodule("norm").register_forward_hook(lambda m, a, o: tn.__setitem__("e", o))
                teacher(x)
                h.remove()
            loss = (F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), reduction="batchmean",
                             log_target=True) + feature_loss(seen["e"], tn["e"], "cosine"))
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == args.steps:
                break
    return ref.score(small)


def step_cost(sn: SupernetModule, timer: StepTimer, original: TinyViT, train: TensorDataset, args) -> dict:
    macs: dict = {}

    def m(cfg):
        key = sn.search_space.canonical(cfg)
        if key not in macs:
            macs[key] = sn.cost(cfg)["macs"]
        return macs[key]

    big = m(sn.search_space.largest())
    predicted = statistics.mean((3 * sum(m(c) for c in plan) + big) / (3 * big) for plan in timer.plans)
    plain = supernet(original, args.lr)
    ptimer = fit(plain, [SandwichSampling(num_random=0, smallest=False)], train, min(args.steps, 60))
    skip = 5
    sand, one = statistics.median(timer.times[skip:]), statistics.median(ptimer.times[skip:])
    return {"sandwich_ms": round(sand * 1e3, 1), "plain_ms": round(one * 1e3, 1), "ratio": round(sand / one, 2),
            "predicted_by_macs": round(predicted, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="defaults,recipe,recipe teacher=largest,recipe no feature KD,"
                                         "recipe magnitude,recipe model-order depth,recipe feature weight 1")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    t_start = time.time()
    train, val = data()
    original = pretrain(train, args.pretrain_steps)
    ref = Ref(original, val)
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                            f"{args.threads} thread(s)", "args": vars(args), "original_acc": round(ref.acc * 100, 2)}
    print(f"original: val acc {ref.acc * 100:.2f} %  ({time.time() - t_start:.0f} s)", flush=True)

    kinds = {}
    for kind, loss, n in (("none", None, 0), ("magnitude", None, 4), ("activation", None, 4), ("taylor", "task", 4),
                          ("taylor", "task", 16), ("taylor", "output", 4), ("taylor", "output", 16)):
        sn = supernet(original, args.lr)
        if kind != "none":
            prioritize(sn, loader(train, 7), kind=kind, batches=n, depth=False, loss=loss or "output")
        kinds[f"{kind}{f' ({loss} loss)' if loss else ''}{f', {n} batches' if n else ''}"] = \
            ref.score_cfg(sn, half_mlp(sn))
    res["importance_no_training_50%_MLP"] = kinds
    print("importance kinds, 50% MLP, no training:", kinds, flush=True)

    sn = supernet(original, args.lr)
    batches = [b for _, b in zip(range(4), loader(train, 7))]
    scores = block_importance(sn, batches)
    ranked = sorted(scores, key=scores.get, reverse=True)
    order = [n for n, d in sn.search_space.dims.items() if d.kind == "depth"]
    res["block_importance"] = {n: round(v, 4) for n, v in scores.items()}
    res["depth_no_training_4_of_6"] = {
        "ranked (keep most important)": ref.score_cfg(sn, keep_blocks(sn, ranked[:4])),
        "model order (first 4)": ref.score_cfg(sn, keep_blocks(sn, order[:4])),
        "least important 4": ref.score_cfg(sn, keep_blocks(sn, ranked[-4:]))}
    print("block importance:", res["block_importance"], "\n4 of 6, no training:", res["depth_no_training_4_of_6"],
          flush=True)

    runs = {}
    for name in [v for v in args.variants.split(",") if v]:
        row, sn_v, timer = variant(name, original, train, ref, args)
        runs[name] = row
        print(f"{name}: {row}", flush=True)
        if name == "recipe":
            res["step_cost"] = step_cost(sn_v, timer, original, train, args)
            print("step cost:", res["step_cost"], flush=True)
    res["finetune"] = runs

    sorted_sn = supernet(original, args.lr, SPACE)
    prioritize(sorted_sn, loader(train, 7), batches=4)
    res["students"] = {"50% MLP": student(original, sorted_sn, half_mlp(sorted_sn), train, ref, args),
                       "4 of 6 blocks": student(original, sorted_sn, four_of_six(sorted_sn), train, ref, args)}
    print("standalone students:", res["students"], flush=True)
    res["total_s"] = round(time.time() - t_start)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
