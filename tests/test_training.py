"""The multi-subnet step loop: the update equals the hand-computed sum of the plan's gradients, distillation,
accumulation, clipping, LR schedulers, multi-subnet validation, pinned validation and one DDP sync per step."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import InplaceDistillation, SandwichSampling
from lightning_supernet.models import TinyViT


class Lit(pl.LightningModule):
    """An ordinary LightningModule (knows nothing about supernets)."""

    def __init__(self, lr: float = 1.0, schedule: dict | None = None, depth: int = 2) -> None:
        super().__init__()
        self.net = TinyViT(dim=16, depth=depth, num_heads=2, mlp_ratio=2.0)
        self.example_input_array = torch.randn(1, 1, 8, 8)
        self.lr, self.schedule = lr, schedule

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_acc", (out.argmax(-1) == y).float().mean())
        self.log("val_loss", F.cross_entropy(out, y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.schedule is None:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, **self.schedule}}


def _data(n: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _trainer(**kw) -> pl.Trainer:
    base = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, accelerator="cpu", devices=1)
    base.update(kw)
    return pl.Trainer(**base)


def _grads(sn: SupernetModule, cfg, x, y, teacher=None, kd=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    sn.zero_grad(set_to_none=True)
    with sn.subnet(cfg):
        out = sn(x)
    loss = F.cross_entropy(out, y) if kd is None else kd.distill_loss(out, teacher)
    loss.backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in sn.model.named_parameters()}, out


def test_step_equals_sum_of_plan_gradients():
    torch.manual_seed(0)
    sn = SupernetModule(Lit(), eval_subnets=None)
    ref = copy.deepcopy(sn)
    data = _data(8)
    cb = SandwichSampling(num_random=2, seed=3)
    _trainer(max_steps=1, callbacks=[cb]).fit(sn, DataLoader(data, batch_size=8))
    x, y = data.tensors
    configs = [ref.search_space.largest(), *cb.sample_random(ref, cb.generator(0, 0)), ref.search_space.smallest()]
    assert len(set(configs)) == 4
    total = None
    for cfg in configs:
        g, _ = _grads(ref, cfg, x, y)
        total = g if total is None else {k: total[k] + g[k] for k in g}
    skipped = [n for n, v in configs[-1].items() if n.endswith(".keep") and not v]
    assert skipped, "the smallest subnet should skip a block"
    for name, p in sn.model.named_parameters():
        expected = dict(ref.model.named_parameters())[name] - total[name]
        torch.testing.assert_close(p, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_inplace_distillation_gradients():
    torch.manual_seed(1)
    sn = SupernetModule(Lit(), eval_subnets=None)
    ref = copy.deepcopy(sn)
    data = _data(8)
    kd = InplaceDistillation(loss="kl", temperature=2.0, student_task_weight=0.0)
    sw = SandwichSampling(num_random=1, seed=5)
    _trainer(max_steps=1, callbacks=[kd, sw]).fit(sn, DataLoader(data, batch_size=8))  # order must not matter
    x, y = data.tensors
    total, teacher = _grads(ref, ref.search_space.largest(), x, y)
    teacher = teacher.detach()
    for cfg in [*sw.sample_random(ref, sw.generator(0, 0)), ref.search_space.smallest()]:
        g, _ = _grads(ref, cfg, x, y, teacher=teacher, kd=kd)
        total = {k: total[k] + g[k] for k in g}
    for name, p in sn.model.named_parameters():
        torch.testing.assert_close(p, dict(ref.model.named_parameters())[name] - total[name], atol=1e-5, rtol=1e-5)


def test_distillation_needs_the_largest_as_teacher():
    sn = SupernetModule(Lit(), eval_subnets=None)
    from lightning_supernet.training import PlanItem

    kd = InplaceDistillation()
    plan = [PlanItem("random", sn.search_space.sample(1)), PlanItem("smallest", sn.search_space.smallest())]
    with pytest.warns(UserWarning, match="no largest subnet"):
        assert kd.supernet_plan(sn, plan, 0) == plan
    plan = [PlanItem("largest", sn.search_space.largest()), *plan]
    marked = kd.supernet_plan(sn, plan, 0)
    assert [p.teacher for p in marked] == [True, False, False]
    assert [p.distill_weight for p in marked] == [0.0, 1.0, 1.0]
    assert [p.task_weight for p in marked] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("loss", ["kl", "alpha_divergence", "mse", "bce"])
def test_distillation_losses_zero_at_teacher_and_positive_elsewhere(loss):
    kd = InplaceDistillation(loss=loss)
    t = torch.randn(6, 10)
    assert kd.distill_loss(t.clone(), t).abs().item() < 1e-5
    assert kd.distill_loss(torch.randn(6, 10), t).item() > 1e-3


def test_gradient_accumulation_and_clipping():
    torch.manual_seed(2)
    sn = SupernetModule(Lit(), eval_subnets=None, accumulate_grad_batches=2, gradient_clip_val=0.05)
    ref = copy.deepcopy(sn)
    data = _data(16)
    trainer = _trainer(max_epochs=1)
    trainer.fit(sn, DataLoader(data, batch_size=8))
    assert trainer.global_step == 1  # two batches, one optimizer step
    x, y = data.tensors
    g1, _ = _grads(ref, ref.search_space.largest(), x[:8], y[:8])
    g2, _ = _grads(ref, ref.search_space.largest(), x[8:], y[8:])
    grad = {k: (g1[k] + g2[k]) / 2 for k in g1}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grad.values()]))
    scale = min(1.0, 0.05 / (norm.item() + 1e-6))
    assert scale < 1.0
    for name, p in sn.model.named_parameters():
        torch.testing.assert_close(p, dict(ref.model.named_parameters())[name] - scale * grad[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("schedule", "expected"), [({"interval": "step", "frequency": 2}, 0.25),
                                                    ({"interval": "epoch", "frequency": 1}, 0.5)])
def test_lr_schedulers_step_as_declared(schedule, expected):
    sn = SupernetModule(Lit(lr=1.0, schedule=schedule), eval_subnets=None)
    trainer = _trainer(max_epochs=1, callbacks=[SandwichSampling(num_random=1)])
    trainer.fit(sn, DataLoader(_data(32), batch_size=8))  # 4 optimizer steps, 1 epoch
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)


def _accuracy(sn, cfg, x, y) -> float:
    sn.eval()
    with torch.no_grad(), sn.subnet(cfg):
        return (sn(x).argmax(-1) == y).float().mean().item()


def test_validation_logs_every_subnet_with_its_own_numbers():
    torch.manual_seed(3)
    sn = SupernetModule(Lit(), eval_subnets=("largest", "smallest", "middle"))
    data = _data(32)
    trainer = _trainer(max_epochs=1)
    trainer.validate(sn, DataLoader(data, batch_size=32), verbose=False)
    metrics = trainer.callback_metrics
    x, y = data.tensors
    for name, cfg in sn.eval_configs().items():
        assert metrics[f"val/acc/{name}"].item() == pytest.approx(_accuracy(sn, cfg, x, y))
    assert metrics["val_acc"].item() == pytest.approx(metrics["val/acc/largest"].item())


def test_pinned_validation_evaluates_only_that_subnet():
    torch.manual_seed(4)
    sn = SupernetModule(Lit())
    data = _data(32)
    trainer = _trainer()
    cfg = sn.search_space.sample(7)
    with sn.subnet(cfg):
        trainer.validate(sn, DataLoader(data, batch_size=32), verbose=False)
    assert not any(k.startswith("val/") for k in trainer.callback_metrics)
    assert trainer.callback_metrics["val_acc"].item() == pytest.approx(_accuracy(sn, cfg, *data.tensors))


def _count_hook(counter):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        counter.append(1)
        return allreduce_hook(state, bucket)

    return hook


class Dump(pl.Callback):
    """Counts DDP's bucket all-reduces (a comm hook) and saves each rank's count and weights."""

    def __init__(self, path) -> None:
        self.path, self.calls = path, []

    def on_train_start(self, trainer, pl_module):
        trainer.strategy.model.register_comm_hook(state=None, hook=_count_hook(self.calls))

    def on_train_end(self, trainer, pl_module):
        torch.save({"calls": len(self.calls), "w": pl_module.state_dict(), "steps": trainer.global_step},
                   self.path / f"rank{trainer.global_rank}.pt")


@pytest.mark.parametrize("num_random", [0, 2])
def test_ddp_syncs_once_per_step(tmp_path, num_random):
    """2 gloo ranks: a sandwich of 4 subnets (the smallest skips blocks) communicates exactly as often as a
    plan of one subnet, and both ranks end with the same weights."""
    from lightning.pytorch.strategies import DDPStrategy

    sn = SupernetModule(Lit(), eval_subnets=None)
    # spawn, not fork: a pytest process that ran other tests may hold locks (threads of MLflow, Optuna...) that a
    # forked child would inherit locked
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo")
    cbs = [SandwichSampling(num_random=num_random), InplaceDistillation()] if num_random else []
    trainer = _trainer(max_steps=3, strategy=strategy, devices=2, callbacks=[*cbs, Dump(tmp_path)])
    trainer.fit(sn, DataLoader(_data(48), batch_size=8))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["steps"] == 3 and r0["calls"] == r1["calls"]
    buckets = r0["calls"] / 3
    assert buckets == int(buckets) and 1 <= buckets <= 3, r0["calls"]  # per step: one reduction of the buckets
    for k, v in r0["w"].items():
        torch.testing.assert_close(v, r1["w"][k])


def test_plain_module_validation_logs_every_subnet():
    torch.manual_seed(5)
    sn = SupernetModule(TinyViT(dim=16, depth=2, num_heads=2, mlp_ratio=2.0), F.cross_entropy,
                        example_input=torch.randn(1, 1, 8, 8))
    data = _data(32)
    trainer = _trainer()
    trainer.validate(sn, DataLoader(data, batch_size=32), verbose=False)
    for name, cfg in sn.eval_configs().items():
        assert trainer.callback_metrics[f"val/acc/{name}"].item() == pytest.approx(_accuracy(sn, cfg, *data.tensors))
    assert trainer.callback_metrics["val_acc"].item() == pytest.approx(trainer.callback_metrics["val/acc/largest"].item())


def test_per_subnet_losses_reach_the_logger_at_lightnings_cadence(tmp_path):
    """A 66-step run with the default ``log_every_n_steps`` (50): Lightning writes its rows at step 49, and the
    per-subnet losses are in them."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    sn = SupernetModule(Lit(lr=0.05), eval_subnets=None)
    trainer = _trainer(max_steps=66, logger=CSVLogger(tmp_path), callbacks=[SandwichSampling(num_random=0)])
    trainer.fit(sn, DataLoader(_data(66 * 2), batch_size=2))
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    rows = [r for r in rows if r.get("train/loss/largest")]
    assert [int(r["step"]) for r in rows] == [49]
    assert rows[0]["train/loss/smallest"] and rows[0]["train_loss"]
    assert float(rows[0]["train_loss"]) == pytest.approx(float(rows[0]["train/loss/largest"]), rel=1e-5)


class WithMetric(Lit):
    """Logs a torchmetrics object from validation_step (the standard idiom)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        import torchmetrics

        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.acc(self(x), y)
        self.log("val_acc", self.acc)


def test_metric_copies_one_per_subnet_and_repeated_pinned_validation(monkeypatch):
    import copy as copy_module

    from lightning_supernet import training

    torch.manual_seed(6)
    sn = SupernetModule(WithMetric(), eval_subnets=("largest", "smallest"))
    data = _data(32)
    copies = []
    real = copy_module.deepcopy
    monkeypatch.setattr(training.copy, "deepcopy", lambda obj, *a: copies.append(type(obj).__name__) or real(obj, *a))
    trainer = _trainer()
    trainer.validate(sn, DataLoader(data, batch_size=4), verbose=False)  # 8 batches, 2 subnets
    assert copies.count("MulticlassAccuracy") == 1  # one per subnet after the first, not one per batch
    x, y = data.tensors
    for name, cfg in sn.eval_configs().items():
        assert trainer.callback_metrics[f"val/acc/{name}"].item() == pytest.approx(_accuracy(sn, cfg, x, y))
    cfg = sn.search_space.sample(3)
    with sn.subnet(cfg):
        for _ in range(2):  # a second validate on the same Trainer inside the pinned subnet
            trainer.validate(sn, DataLoader(data, batch_size=4), verbose=False)
            assert trainer.callback_metrics["val_acc"].item() == pytest.approx(_accuracy(sn, cfg, x, y))


def test_trainer_gradient_clip_val_is_taken_and_matches_a_manual_reference():
    torch.manual_seed(7)
    sn = SupernetModule(Lit(), eval_subnets=None)
    ref = copy.deepcopy(sn)
    data = _data(8)
    trainer = _trainer(max_steps=1, gradient_clip_val=0.05)  # Lightning alone refuses this under manual optimisation
    trainer.fit(sn, DataLoader(data, batch_size=8))
    assert trainer.gradient_clip_val == 0.05 and sn.gradient_clip_val is None  # given back after the run
    g, _ = _grads(ref, ref.search_space.largest(), *data.tensors)
    total = sum(p.grad.norm() ** 2 for p in ref.model.parameters() if p.grad is not None) ** 0.5
    torch.nn.utils.clip_grad_norm_(list(ref.model.parameters()), 0.05)  # torch's own clipping as the reference
    assert total > 0.05
    for name, p in sn.model.named_parameters():
        q = dict(ref.model.named_parameters())[name]
        expected = q - (q.grad if q.grad is not None else 0)
        torch.testing.assert_close(p, expected, atol=1e-6, rtol=1e-5, msg=name)


def test_trainer_accumulate_grad_batches_equals_one_step_on_the_doubled_batch():
    torch.manual_seed(8)
    sn = SupernetModule(Lit(), eval_subnets=None)
    ref = copy.deepcopy(sn)
    data = _data(16)
    trainer = _trainer(max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(sn, DataLoader(data, batch_size=8))
    assert trainer.global_step == 1 and trainer.accumulate_grad_batches == 2
    g, _ = _grads(ref, ref.search_space.largest(), *data.tensors)  # the mean loss over all 16 samples
    for name, p in sn.model.named_parameters():
        torch.testing.assert_close(p, dict(ref.model.named_parameters())[name] - g[name], atol=1e-6, rtol=1e-5)


def test_trainer_and_module_clip_values_that_disagree_fail_clearly():
    sn = SupernetModule(Lit(), eval_subnets=None, gradient_clip_val=0.2)
    with pytest.raises(ValueError, match=r"Trainer\(gradient_clip_val=0.1\)` and `SupernetModule\(gradient_clip_val=0.2"):
        _trainer(max_steps=1, gradient_clip_val=0.1).fit(sn, DataLoader(_data(8), batch_size=8))
