"""Callbacks: prioritisation (function-preserving, optimizer state permuted), BN recalibration (exact
statistics), sampling (deterministic, global RNG untouched, complexity ladder), exact resume mid-epoch."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import (BNRecalibration, InplaceDistillation, ParameterPrioritization,
                                          SandwichSampling, recalibrate_bn)
from lightning_supernet.cost import active_params
from lightning_supernet.models import ResNetLike, TinyViT
from lightning_supernet.prioritize import magnitude_importance, reorder, taylor_importance

X = torch.randn(4, 1, 8, 8)


def _vit():
    torch.manual_seed(0)
    return SupernetModule(TinyViT(dim=32, depth=2, num_heads=4, mlp_ratio=2.0), F.cross_entropy, example_input=X[:1])


def _cnn():
    torch.manual_seed(0)
    sn = SupernetModule(ResNetLike(widths=(16, 32), depths=(2, 2)), F.cross_entropy, example_input=X[:1])
    recalibrate_bn(sn, [(torch.randn(8, 1, 8, 8), None)])  # non-trivial running stats
    return sn


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    ids = torch.randint(0, 50, (2, 6))
    return SupernetModule(transformers.LlamaForCausalLM(cfg), F.cross_entropy,
                          example_input={"input_ids": ids, "use_cache": False}), {"input_ids": ids, "use_cache": False}


def _random_importance(sn):
    g = torch.Generator().manual_seed(0)
    return {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in magnitude_importance(sn).items()}


@pytest.mark.parametrize("build", ["vit", "cnn", "llama"])
def test_reorder_preserves_the_full_model(build):
    if build == "llama":
        sn, x = _llama()
        run = lambda: sn(**x).logits  # noqa: E731
    else:
        sn = _vit() if build == "vit" else _cnn()
        run = lambda: sn(X)  # noqa: E731
    sn.eval()
    with torch.no_grad():
        before = run()
        with sn.subnet(sn.search_space.smallest()):
            small_before = run()
    perms = reorder(sn, _random_importance(sn))
    assert perms, "a random importance must permute something"
    with torch.no_grad():
        torch.testing.assert_close(run(), before, atol=1e-5, rtol=1e-5)
        with sn.subnet(sn.search_space.smallest()):
            assert not torch.allclose(run(), small_before, atol=1e-4)  # the subnets now use other channels


def test_reorder_permutes_optimizer_state_so_the_next_step_is_the_permuted_step():
    sn = _vit()
    opt = torch.optim.Adam(sn.parameters(), lr=1e-2)
    y = torch.randint(0, 10, (4,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(sn(X), y).backward()
        opt.step()
    twin, twin_opt = copy.deepcopy(sn), None
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors
    perms = reorder(twin, _random_importance(twin), [twin_opt])
    for model, o in ((sn, opt), (twin, twin_opt)):
        o.zero_grad()
        F.cross_entropy(model(X), y).backward()
        o.step()
    name = "blocks.0.mlp.fc1.width"
    perm = perms[name]
    torch.testing.assert_close(twin.model.blocks[0].mlp.fc1.weight, sn.model.blocks[0].mlp.fc1.weight[perm])
    torch.testing.assert_close(twin.model.blocks[0].mlp.fc2.weight, sn.model.blocks[0].mlp.fc2.weight[:, perm])
    torch.testing.assert_close(twin.model.head.weight, sn.model.head.weight)


def test_magnitude_puts_the_heaviest_channels_first():
    sn = _vit()
    reorder(sn, magnitude_importance(sn))
    score = magnitude_importance(sn)["blocks.0.mlp.fc1.width"]
    assert torch.all(score[:-1] >= score[1:])


def test_taylor_importance_keeps_gradients():
    sn = _vit()
    for p in sn.parameters():
        p.grad = torch.ones_like(p)
    scores = taylor_importance(sn, [(X, torch.randint(0, 10, (4,)))])
    assert all(s.sum() > 0 for s in scores.values())  # equality with the definition: test_exact_expectations
    assert all(torch.all(p.grad == 1) for p in sn.parameters())


def test_bn_recalibration_gives_the_exact_statistics_of_the_subnet():
    sn = _cnn()
    cfg = sn.search_space.sample(3)
    batches = [(torch.randn(8, 1, 8, 8), None) for _ in range(3)]
    with sn.subnet(cfg):
        recalibrate_bn(sn, batches)
        small = sn.extract(cfg)
    expected = sn.extract(cfg)
    for m in expected.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    expected.train()
    with torch.no_grad():
        for x, _ in batches:
            expected(x)
    got = {k: v for k, v in small.state_dict().items() if "running" in k}
    assert got
    for k, v in got.items():
        torch.testing.assert_close(v, expected.state_dict()[k], atol=1e-5, rtol=1e-4, msg=k)


def test_sampling_is_deterministic_and_leaves_the_global_rng_alone():
    sn = _vit()
    cb = SandwichSampling(num_random=3, seed=11)
    state = torch.get_rng_state()
    a = cb.sample_random(sn, cb.generator(5, 0))
    assert torch.equal(torch.get_rng_state(), state)
    assert a == cb.sample_random(sn, cb.generator(5, 0))
    assert a != cb.sample_random(sn, cb.generator(6, 0))


class _Lit(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = ResNetLike(widths=(16, 32), depths=(2, 2))
        self.example_input_array = torch.randn(1, 1, 8, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)]


def _fit(max_steps, ckpt=None, save=None):
    """Save with ModelCheckpoint inside the loop: its checkpoint holds the loader's position (a checkpoint
    written by ``trainer.save_checkpoint`` after ``fit`` returns does not, even without a supernet)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g))
    loader = StatefulDataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    sn = SupernetModule(_Lit(), eval_subnets=("largest", "smallest"))
    callbacks = [ParameterPrioritization(), SandwichSampling(num_random=1), InplaceDistillation(),
                 BNRecalibration(num_batches=2)]
    if save:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=save, every_n_train_steps=max_steps, save_top_k=-1))
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=bool(save), enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=4, callbacks=callbacks)
    trainer.fit(sn, loader, DataLoader(data, batch_size=16), ckpt_path=ckpt)
    return sn


def test_resume_mid_epoch_ends_with_exactly_the_uninterrupted_weights(tmp_path):
    pytest.importorskip("torchdata")
    full = _fit(10)  # 6 batches an epoch: step 7 stops inside the second epoch
    _fit(7, save=tmp_path)
    (ckpt,) = tmp_path.glob("*.ckpt")
    resumed = _fit(10, ckpt=ckpt)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=0, rtol=0, msg=k)
