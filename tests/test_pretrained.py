"""Pretrained models (issue 13): the original as a frozen teacher, feature distillation, importance and block
priority from data before training, and the pretrained recipe — on a small ViT pre-trained here on digits."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import InplaceDistillation, SandwichSampling
from lightning_supernet.callbacks.distillation import feature_loss, pooled_embedding
from lightning_supernet.demo import DigitsDataModule
from lightning_supernet.errors import InvalidArgumentError
from lightning_supernet.models import TinyViT

X = Y = None


def _digits(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    global X, Y
    if X is None:
        dm = DigitsDataModule(batch_size=64)
        dm.setup("fit")
        X, Y = dm.train_set.tensors
    return X[:n], Y[:n]


def _pretrained(depth: int = 4, steps: int = 60, seed: int = 0) -> TinyViT:
    torch.manual_seed(seed)
    model = TinyViT(dim=32, depth=depth, num_heads=2)
    x, y = _digits()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _supernet(model: TinyViT, **kw) -> SupernetModule:
    return SupernetModule(model, F.cross_entropy, example_input=torch.randn(1, 1, 8, 8),
                          optimizer=kw.pop("optimizer", None), eval_subnets=None, **kw)


def _loader(n: int = 256, batch: int = 32) -> DataLoader:
    x, y = _digits(n)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _fit(sn: SupernetModule, callbacks: list, steps: int) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, accelerator="cpu", devices=1)
    trainer.fit(sn, train_dataloaders=_loader())
    return trainer


# -- 1. the original as the teacher ---------------------------------------------------------------------------
def test_frozen_original_teacher_shares_nothing_and_stays_the_original():
    model = _pretrained(depth=2, steps=20)
    x = _digits(64)[0]
    with torch.no_grad():
        before = model(x).clone()
    sn = _supernet(model)
    kd = InplaceDistillation(teacher="original", loss="mse", anchor_weight=1.0)
    _fit(sn, [SandwichSampling(num_random=1), kd], steps=4)
    teacher = kd.teacher_model
    mine = {t.data_ptr() for t in list(teacher.parameters()) + list(teacher.buffers())}
    theirs = {t.data_ptr() for t in list(sn.model.parameters()) + list(sn.model.buffers())}
    assert mine and not mine & theirs
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with torch.no_grad():
        assert torch.allclose(teacher(x), before, atol=1e-5)  # the teacher is the original, untouched
        sn.eval()
        assert not torch.allclose(sn(x), before, atol=1e-4)  # while the supernet trained
    assert kd._handles == []  # hooks removed at the end of training


def test_anchor_alone_leaves_the_original_unchanged_and_task_weight_moves_it():
    """Plan = the largest only. Anchored to the frozen original with no task term, its loss and gradient are 0 at the
    first step, so SGD leaves every weight as it was; with its own task term the weights move."""
    def run(task_weight: float) -> float:
        model = _pretrained(depth=2, steps=10)
        ref = {k: v.clone() for k, v in model.state_dict().items()}
        sn = _supernet(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        sn.model.train()
        kd = InplaceDistillation(teacher="original", loss="mse", anchor_weight=1.0, largest_task_weight=task_weight)
        _fit(sn, [SandwichSampling(num_random=0, smallest=False), kd], steps=1)
        return max((v - ref[k]).abs().max().item() for k, v in sn.model.state_dict().items())

    assert run(0.0) == 0.0
    assert run(1.0) > 1e-4


def test_plan_weights_per_term():
    sn = _supernet(_pretrained(depth=2, steps=0))
    kd = InplaceDistillation(teacher="original", anchor_weight=0.5, largest_task_weight=0.2, student_task_weight=0.0)
    plan = kd.supernet_plan(sn, SandwichSampling(num_random=1).supernet_plan(sn, [], 0), 0)
    assert [(p.name, p.task_weight, p.distill_weight, p.own_teacher, p.teacher) for p in plan] == [
        ("largest", 0.2, 0.5, True, False), ("random", 0.0, 1.0, True, False), ("smallest", 0.0, 1.0, True, False)]
    largest = InplaceDistillation(largest_task_weight=0.3).supernet_plan(sn, plan, 0)
    assert largest[0].teacher and largest[0].task_weight == 0.3
    with pytest.raises(InvalidArgumentError, match="anchor_weight"):
        InplaceDistillation(anchor_weight=1.0)
    with pytest.raises(InvalidArgumentError, match="teacher"):
        InplaceDistillation(teacher="biggest")


# -- 2. feature-level distillation ------------------------------------------------------------------------------
def test_feature_terms_equal_the_losses_computed_by_hand():
    model = _pretrained(depth=4, steps=20)
    sn = _supernet(model)
    feats = {"blocks.1": 0.5, "blocks.0.mlp.fc1": {"loss": "cosine", "weight": 2.0}, "blocks.3": 1.0}
    kd = InplaceDistillation(teacher="original", loss="kl", weight=0.3, features=feats)
    kd._attach(sn)
    teacher = kd.make_teacher(sn)
    x, y = _digits(32)
    kd.teacher_forward(sn, (x, y))
    cfg = sn.search_space.config({"blocks.0.mlp.fc1.width": 64, "blocks.3.keep": False})
    seen = {}
    hooks = [sn.model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen.__setitem__(p, o))
             for p in feats]
    with sn.subnet(cfg):
        out = sn(x)
        got = kd.frozen_loss(out)
    for h in hooks:
        h.remove()
    t_seen = {}
    hooks = [teacher.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: t_seen.__setitem__(p, o))
             for p in feats]
    with torch.no_grad():
        t_out = teacher(x)
    for h in hooks:
        h.remove()
    assert seen["blocks.0.mlp.fc1"].shape[-1] == 64 and t_seen["blocks.0.mlp.fc1"].shape[-1] == 128
    want = (0.3 * F.kl_div(F.log_softmax(out, -1), F.log_softmax(t_out, -1), reduction="batchmean", log_target=True)
            + 0.5 * F.mse_loss(seen["blocks.1"], t_seen["blocks.1"])
            + 2.0 * (1 - F.cosine_similarity(seen["blocks.0.mlp.fc1"], t_seen["blocks.0.mlp.fc1"][..., :64], -1).mean()))
    # blocks.3 is skipped in this subnet: its term is left out
    assert torch.allclose(got, want, atol=1e-6), (got, want)
    got.backward()
    assert sn.model.blocks[0].mlp.fc1.weight.grad[:64].abs().sum() > 0
    kd.detach()


def test_feature_distillation_from_the_largest_in_the_step_loop():
    sn = _supernet(_pretrained(depth=2, steps=10))
    kd = InplaceDistillation(features=["blocks.0"], weight=0.0, student_task_weight=0.0)
    seen = []
    orig = kd.student_loss
    kd.student_loss = lambda s, t: seen.append(orig(s, t).item()) or orig(s, t)
    _fit(sn, [SandwichSampling(num_random=0), kd], steps=2)
    # the smallest's only term: MSE of its blocks.0 output to the largest's, non-zero and finite
    assert len(seen) == 2 and all(0 < v < 10 for v in seen)


def test_kl_on_embeddings_warns_and_cosine_responds():
    kd = InplaceDistillation(loss="kl", output_transform=pooled_embedding(normalize=True))
    a, b = torch.randn(8, 5, 16), torch.randn(8, 5, 16)
    with pytest.warns(UserWarning, match="cosine"):
        kl = kd.distill_loss(kd._transform(a), kd._transform(b)).item()
    cos = InplaceDistillation(loss="cosine", output_transform=pooled_embedding(normalize=True))
    one_minus_cos = cos.distill_loss(cos._transform(a), cos._transform(b)).item()
    assert one_minus_cos > 0.5 and kl < one_minus_cos / 5  # KL barely responds to unrelated embeddings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kd2 = InplaceDistillation(loss="kl")
        kd2.distill_loss(torch.randn(4, 10) * 3, torch.randn(4, 10) * 3)  # logits: no warning
    assert feature_loss(a, a, "kl").abs().item() < 1e-6
    with pytest.raises(InvalidArgumentError, match="features"):
        InplaceDistillation(features={"blocks.1": {"loss": "l1"}})
