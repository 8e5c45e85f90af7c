"""Pretrained models (issue 13): the original as a frozen teacher, feature distillation, importance and block
priority from data before training, and the pretrained recipe — on a small ViT pre-trained here on digits."""

from __future__ import annotations

import copy
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
    sn = _supernet(_pretrained(depth=2, steps=0))
    with pytest.raises(InvalidArgumentError, match="`blocks.9`"):
        InplaceDistillation(features=["blocks.9"])._attach(sn)


# -- 3. importance before training, from data --------------------------------------------------------------------
def _mlp_half(sn: SupernetModule) -> dict:
    return {n: max(d.choices) // 2 for n, d in sn.search_space.dims.items() if n.endswith("mlp.fc1.width")}


def _cos_to_full(sn: SupernetModule, cfg, x) -> float:
    with torch.no_grad():
        sn.eval()
        full = sn(x)
        with sn.subnet(cfg):
            sub = sn(x)
    return F.cosine_similarity(sub, full, dim=-1).mean().item()


def test_prioritize_runs_standalone_preserves_the_model_and_helps_the_half_mlp_subnet():
    from lightning_supernet.importance import prioritize

    x = _digits(256)[0]
    sn = _supernet(_pretrained(depth=4, steps=80))
    half = sn.search_space.config(_mlp_half(sn))
    with torch.no_grad():
        before = sn.eval()(x).clone()
    cos_before = _cos_to_full(sn, half, x)
    report = prioritize(sn, _loader(), batches=4)
    assert report["signal"] == "output" and report["kind"] == "taylor" and report["permutations"]
    with torch.no_grad():
        assert torch.allclose(sn(x), before, atol=1e-4)
    cos_after = _cos_to_full(sn, half, x)
    assert 1 - cos_after < 0.5 * (1 - cos_before), (cos_before, cos_after)  # the error at least halves
    with pytest.raises(InvalidArgumentError, match="kind"):
        prioritize(sn, _loader(), kind="fisher")
    with pytest.raises(InvalidArgumentError, match="loss"):
        prioritize(sn, _loader(), loss="fisher")
    with pytest.raises(InvalidArgumentError, match="yielded no batch"):
        prioritize(sn, [], kind="taylor")


class _SelfDistilled(L.LightningModule):
    """An embedding-style fine-tune whose loss is the distance to a frozen copy of itself: exactly 0 at step 0."""

    def __init__(self, model: TinyViT) -> None:
        super().__init__()
        import copy

        self.net = model
        self.frozen = [copy.deepcopy(model).requires_grad_(False)]  # a list: not a submodule
        self.example_input_array = torch.randn(1, 1, 8, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return F.mse_loss(self(x), self.frozen[0](x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_taylor_with_a_zero_loss_warns_and_uses_the_perturbation_loss():
    from lightning_supernet.importance import prioritize, task_signal

    x = _digits(256)[0]
    sn = SupernetModule(_SelfDistilled(_pretrained(depth=4, steps=80)), eval_subnets=None)
    loss, grad = task_signal(sn, (x[:32], None))
    assert loss < 1e-6 and grad < 1e-7
    half = sn.search_space.config(_mlp_half(sn))
    cos_before = _cos_to_full(sn, half, x)
    with pytest.warns(UserWarning, match="no signal"):
        report = prioritize(sn, _loader(), kind="taylor", batches=4, depth=False, loss="task")
    assert report["signal"] == "output (the task loss had none)" and report["permutations"]
    cos_after = _cos_to_full(sn, half, x)
    assert 1 - cos_after < 0.7 * (1 - cos_before), (cos_before, cos_after)


# -- 4. depth importance --------------------------------------------------------------------------------------
def test_block_priority_drops_a_nearly_identity_block_first():
    from lightning_supernet.importance import block_importance, prioritize

    model = _pretrained(depth=4, steps=40)
    with torch.no_grad():  # block 1 adds almost nothing to its input: nearly the identity
        for lin in (model.blocks[1].attn.proj, model.blocks[1].mlp.fc2):
            lin.weight.mul_(1e-3)
            lin.bias.mul_(1e-3)
    sn = SupernetModule(model, F.cross_entropy, example_input=torch.randn(1, 1, 8, 8))
    space = sn.search_space
    assert space.smallest()["blocks.1.keep"]  # model order keeps the first blocks by default
    scores = block_importance(sn, [(x, None) for x in _digits(128)[0].split(32)])
    assert min(scores, key=scores.get) == "blocks.1.keep"
    prioritize(sn, _loader(), kind="magnitude", batches=2)
    assert space.block_priority == pytest.approx(scores, rel=0.05)  # measured on other batches
    smallest, middle = space.smallest(), space.middle()
    ranked = sorted(scores, key=scores.get, reverse=True)
    assert not smallest["blocks.1.keep"] and not middle["blocks.1.keep"]
    assert [n for n, v in smallest.items() if n.endswith(".keep") and v] == sorted(ranked[:2])  # model order
    assert sn.eval_configs()["smallest"] == smallest
    x = _digits(16)[0]
    small = sn.extract(smallest)
    with torch.no_grad(), sn.subnet(smallest):
        assert len(small.blocks) == 2 and torch.allclose(small.eval()(x), sn.eval()(x), atol=1e-5)
    with pytest.raises(Exception, match="no depth dim"):
        space.set_block_priority({"blocks.0.mlp.fc1.width": 1.0})


def test_sampled_depths_are_nested_under_a_block_priority():
    from lightning_supernet.space import Dim, SearchSpace

    space = SearchSpace([Dim(f"b.{i}.keep", "depth", (True, False), stack="b") for i in range(6)],
                        stacks={"b": (6, 3)})
    counts_before = [sum(space.sample(seed).values()) for seed in range(40)]
    space.set_block_priority({f"b.{i}.keep": s for i, s in enumerate([0.9, 0.1, 0.5, 0.05, 0.7, 0.3])})
    ranked = ["b.0.keep", "b.4.keep", "b.2.keep", "b.5.keep", "b.1.keep", "b.3.keep"]
    for seed in range(40):
        cfg = space.sample(seed)
        k = sum(cfg.values())
        assert k == counts_before[seed]  # as many blocks as without the ranking ...
        assert {n for n, v in cfg.items() if v} == set(ranked[:k])  # ... the k most important


def test_the_original_teacher_travels_in_the_checkpoint_state():
    model = _pretrained(depth=2, steps=10)
    x = _digits(32)[0]
    with torch.no_grad():
        original = model(x).clone()
    sn = _supernet(model)
    kd = InplaceDistillation(teacher="original", loss="mse", anchor_weight=1.0)
    _fit(sn, [SandwichSampling(num_random=1), kd], steps=3)
    resumed = InplaceDistillation(teacher="original", loss="mse", anchor_weight=1.0)
    resumed.load_state_dict(kd.state_dict())
    teacher = resumed.make_teacher(sn)  # built from the trained supernet, weights from the checkpoint state
    with torch.no_grad():
        assert torch.allclose(teacher(x), original, atol=1e-5)
        assert not torch.allclose(InplaceDistillation(teacher="original").make_teacher(sn)(x), original, atol=1e-4)


# -- 5. the recipe ------------------------------------------------------------------------------------------------
def test_recipe_keeps_the_largest_closer_to_the_original_than_the_defaults():
    from lightning_supernet.callbacks import ParameterPrioritization
    from lightning_supernet.importance import prioritize
    from lightning_supernet.recipes import pretrained_recipe

    model = _pretrained(depth=4, steps=80)
    x = _digits(256)[0]
    space = {"width_ratios": [0.5, 0.75, 1.0], "head_ratios": [0.5, 0.75, 1.0], "min_depth": 3}

    def drift(recipe: bool) -> float:
        sn = _supernet(copy.deepcopy(model), space=space, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
        if recipe:
            prioritize(sn, _loader(), batches=2)
            cbs = pretrained_recipe(features=["norm"])
        else:
            cbs = [ParameterPrioritization(), SandwichSampling(num_random=2), InplaceDistillation()]
        _fit(sn, cbs, steps=15)
        with torch.no_grad():
            return 1 - F.cosine_similarity(sn.eval()(x), model(x), dim=-1).mean().item()

    recipe, defaults = drift(True), drift(False)
    assert recipe < 0.5 * defaults and recipe < 0.01, (recipe, defaults)


@pytest.mark.slow
def test_pretrained_finetune_example_runs_end_to_end(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "pretrained_finetune.py"
    spec = importlib.util.spec_from_file_location("pretrained_finetune", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    res = example.main(["--pretrain-epochs", "2", "--epochs", "1", "--trials", "3", "--out-dir", str(tmp_path)])
    assert set(res) == {"largest", "50% MLP", "smallest", "original", "exported"}
    assert (tmp_path / "subnet.pt").exists() and 0 <= res["exported"] <= 1
