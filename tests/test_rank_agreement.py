"""Decisions taken from data agree across ranks: data-driven ParameterPrioritization on 2 gloo ranks leaves every
tensor identical on both ranks after a step (each rank's batches differ; the importance is reduced)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import ParameterPrioritization, SandwichSampling

from test_training import Lit  # noqa: I001 - the plain LightningModule of the step-loop tests


class SavePerRank(pl.Callback):
    def __init__(self, path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, ParameterPrioritization))
        torch.save({"w": pl_module.state_dict(), "reorders": cb.reorders, "perms": cb.last_permutations},
                   self.path / f"rank{trainer.global_rank}.pt")


class Unreduced(ParameterPrioritization):
    """The behaviour before the fix: each rank sorts by its own batches."""

    def agree(self, trainer, importance):
        return importance


def _run(tmp_path, callback):
    from lightning.pytorch.strategies import DDPStrategy

    torch.manual_seed(0)
    sn = SupernetModule(Lit(lr=0.05), eval_subnets=None)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))
    # spawn, not fork: see test_training.test_ddp_syncs_once_per_step
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo"),
                         callbacks=[callback, SandwichSampling(num_random=1), SavePerRank(tmp_path)])
    trainer.fit(sn, DataLoader(data, batch_size=4, shuffle=True))
    return [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]


def _differing(a, b) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("importance", ["taylor", pytest.param("activation", marks=pytest.mark.slow)])
def test_data_driven_prioritization_agrees_across_ranks(tmp_path, importance):
    r0, r1 = _run(tmp_path, ParameterPrioritization(importance=importance, num_batches=2))
    assert r0["reorders"] == r1["reorders"] == 1
    assert r0["perms"] and r0["perms"].keys() == r1["perms"].keys()
    for name, perm in r0["perms"].items():
        assert torch.equal(perm, r1["perms"][name]), name
    assert _differing(r0["w"], r1["w"]) == []


@pytest.mark.slow
def test_without_the_reduction_ranks_would_disagree(tmp_path):
    """The control: the same run with each rank's own importance permutes the replicas differently."""
    r0, r1 = _run(tmp_path, Unreduced(importance="taylor", num_batches=2))
    assert _differing(r0["w"], r1["w"])
