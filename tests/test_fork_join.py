"""Fork-join multi-subnet DDP on 2 gloo ranks: joined gradients equal the sequential sandwich on one process,
weights stay identical across ranks and equal the single-process run; k=1 equals standard DDP; clear errors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_supernet import ForkJoinDDPStrategy, SupernetModule
from lightning_supernet.callbacks import InplaceDistillation, SandwichSampling

from test_training import Lit  # noqa: I001 - the plain LightningModule of the step-loop tests


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


class Record(pl.Callback):
    """Saves each rank's gradients at the first optimizer step and its final weights."""

    def __init__(self, path):
        self.path, self.grads = path, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        torch.save({"grads": self.grads, "w": pl_module.state_dict()}, self.path / f"rank{trainer.global_rank}.pt")


def _run(tmp_path, strategy, devices, steps, batch_size, seed=0, one_data_group=False, data=None):
    torch.manual_seed(seed)
    sn = SupernetModule(Lit(lr=0.05, depth=3), eval_subnets=None)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SandwichSampling(num_random=2, seed=1), InplaceDistillation(),
                                    Record(tmp_path)])
    data = _data() if data is None else data
    # with one data group every rank sees the whole (shuffled) stream: the same sampler as a single process
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0) if one_data_group else None
    trainer.fit(sn, DataLoader(data, batch_size=batch_size, sampler=sampler))
    return [torch.load(p) for p in sorted(tmp_path.glob("rank*.pt"))]


def _fork(k, teacher_outputs="recompute"):
    # spawn, not fork: see test_training.test_ddp_syncs_once_per_step
    return ForkJoinDDPStrategy(subnet_parallel=k, start_method="spawn", process_group_backend="gloo",
                               teacher_outputs=teacher_outputs)


def _assert_same(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


@pytest.mark.parametrize("teacher_outputs", ["recompute", "broadcast"])
def test_k2_joined_gradients_and_weights_equal_the_sequential_sandwich(tmp_path, teacher_outputs):
    (tmp_path / "s").mkdir()
    (tmp_path / "f").mkdir()
    (single,) = _run(tmp_path / "s", "auto", 1, steps=20, batch_size=16, one_data_group=True)
    r0, r1 = _run(tmp_path / "f", _fork(2, teacher_outputs), 2, steps=20, batch_size=16, one_data_group=True)
    # the plan of step 0 skips blocks in its smallest subnet: those grads are zeros on the rank that skips them
    _assert_same(r0["grads"], single["grads"])
    _assert_same(r1["grads"], single["grads"])
    _assert_same(r0["w"], r1["w"], atol=0)
    _assert_same(r0["w"], single["w"])


def test_k1_equals_standard_ddp_with_the_same_sandwich(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    (tmp_path / "d").mkdir()
    (tmp_path / "f").mkdir()
    d0, _ = _run(tmp_path / "d", DDPStrategy(start_method="spawn", process_group_backend="gloo"), 2, 6, 8)
    f0, f1 = _run(tmp_path / "f", _fork(1), 2, 6, 8)
    _assert_same(f0["grads"], d0["grads"])
    _assert_same(f0["w"], d0["w"])
    _assert_same(f0["w"], f1["w"], atol=0)


def test_assignment_balances_macs():
    sn = SupernetModule(Lit(depth=3), eval_subnets=None)
    strategy = ForkJoinDDPStrategy(subnet_parallel=2)
    from lightning_supernet.training import PlanItem

    space = sn.search_space
    plan = [PlanItem("largest", space.largest()), PlanItem("random", space.sample(1)),
            PlanItem("random", space.sample(2)), PlanItem("smallest", space.smallest())]
    strategy._subnet_parallel = 2
    shares = strategy.assign(sn, plan)
    assert sorted(i for s in shares for i in s) == [0, 1, 2, 3]
    loads = [sum(strategy.macs(sn, plan[i].config) for i in s) for s in shares]
    assert 0 in shares[0]  # the largest goes first to the least loaded rank
    assert max(loads) <= strategy.macs(sn, plan[0].config) + min(loads)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="subnet_parallel"):
        ForkJoinDDPStrategy(subnet_parallel=0)
    sn = SupernetModule(Lit(), eval_subnets=None)
    strategy = ForkJoinDDPStrategy(subnet_parallel=2)
    from lightning_supernet.training import PlanItem

    strategy._subnet_parallel = 2
    with pytest.raises(ValueError, match="plan has 1 subnets but `subnet_parallel=2`"):
        strategy.assign(sn, [PlanItem("largest", sn.search_space.largest())])
    with pytest.raises(ValueError, match=r"`subnet_parallel=3` must divide the world size 2"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=ForkJoinDDPStrategy(subnet_parallel=3, start_method="fork"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=ForkJoinDDPStrategy(subnet_parallel=1),
                         max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(TypeError, match="ForkJoinDDPStrategy trains a SupernetModule"):
        trainer.fit(Lit(), DataLoader(_data(16), batch_size=8))


def test_registered_by_name():
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="fork_join_ddp", logger=False)
    assert isinstance(trainer.strategy, ForkJoinDDPStrategy)


class SyncLogging(Lit):
    """The user's training_step logs with ``sync_dist=True`` (a collective on every rank, every step)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("user_loss", loss, sync_dist=True)
        return loss


class Logged(pl.Callback):
    """Saves what each rank's Trainer holds as logged metrics after every step."""

    def __init__(self, path):
        self.path, self.rows = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.logged_metrics.items()})

    def on_train_end(self, trainer, pl_module):
        torch.save(self.rows, self.path / f"logs{trainer.global_rank}.pt")


def test_sync_dist_logging_and_per_subnet_losses_under_fork_join(tmp_path):
    """Every rank enters the same collectives (a deadlock would hit the 60 s timeout), and the losses of the
    subnets trained on the other rank reach rank 0's logger."""
    from datetime import timedelta

    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    sn = SupernetModule(SyncLogging(lr=0.05, depth=3), eval_subnets=None)
    strategy = ForkJoinDDPStrategy(subnet_parallel=2, start_method="spawn", process_group_backend="gloo",
                                   timeout=timedelta(seconds=60))
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy=strategy, log_every_n_steps=1,
                         logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[SandwichSampling(num_random=1, seed=1), Logged(tmp_path)])
    trainer.fit(sn, DataLoader(_data(48), batch_size=8))
    rows0, rows1 = (torch.load(tmp_path / f"logs{r}.pt") for r in (0, 1))
    assert len(rows0) == len(rows1) == 3
    for r0, r1 in zip(rows0, rows1):
        assert {"user_loss", "train/loss/largest", "train/loss/random", "train/loss/smallest"} <= r0.keys()
        assert r0 == r1  # one data group: both ranks log the same numbers
        # the user's loss is the largest subnet's task loss (task weight 1, no distillation)
        assert r0["user_loss"] == pytest.approx(r0["train/loss/largest"], rel=1e-5)


def _grid_reference(tmp_path, groups: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Single-process reference: the sandwich gradient of each data group's first batch (the one Lightning's
    distributed sampler gives data group d: shuffled with seed 0, sharded over the data groups), averaged."""
    data, grads = _data(), []
    for d in range(groups):
        (tmp_path / f"ref{d}").mkdir()
        idx = list(DistributedSampler(data, num_replicas=groups, rank=d, shuffle=True, seed=0))[:batch_size]
        shard = TensorDataset(*(t[idx] for t in data.tensors))
        (single,) = _run(tmp_path / f"ref{d}", "auto", 1, steps=1, batch_size=batch_size, data=shard)
        grads.append(single["grads"])
    return {k: sum(g[k] for g in grads) / groups for k in grads[0]}


def _check_grid(tmp_path, world: int, k: int) -> None:
    expected = _grid_reference(tmp_path, world // k, batch_size=8)
    (tmp_path / "grid").mkdir()
    ranks = _run(tmp_path / "grid", _fork(k), world, steps=1, batch_size=8)
    assert len(ranks) == world
    for r in ranks:
        _assert_same(r["grads"], expected)
        _assert_same(r["w"], ranks[0]["w"], atol=0)


def test_grid_w2_k1_mean_over_data_groups_equals_the_reference(tmp_path):
    _check_grid(tmp_path, world=2, k=1)


@pytest.mark.slow
def test_grid_w4_k2_mean_over_data_groups_equals_the_reference(tmp_path):
    """4 gloo ranks: 2 data groups x 2 subnet ranks; each rank's joined gradient is the mean over the data groups
    of the full sandwich gradient of that group's batch."""
    _check_grid(tmp_path, world=4, k=2)
