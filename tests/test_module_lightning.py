"""SupernetModule inside Lightning: checkpoints without a prefix, ``trainer.fit``, the user's ``self.log``."""

from __future__ import annotations

import io

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_supernet import SupernetModule
from lightning_supernet.models import TinyViT


def _trainer(**kwargs) -> pl.Trainer:
    args = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_checkpointing": False, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0, **kwargs}
    return pl.Trainer(**args)


def _loaders(dataset: torch.utils.data.Dataset, batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    return (DataLoader(dataset, batch_size=batch_size, shuffle=False),
            DataLoader(dataset, batch_size=batch_size, shuffle=False))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- state_dict --------------------------------------------------------------------------------------------------------
def test_state_dict_has_the_wrapped_models_keys(lit_tiny_vit):
    before = _snapshot(lit_tiny_vit)
    sn = SupernetModule(lit_tiny_vit)
    state = sn.state_dict()
    assert list(state) == list(before)
    assert not any(k.startswith("model.") for k in state)
    for key, value in before.items():
        assert torch.equal(state[key], value), key


def test_state_dict_loads_back(lit_tiny_vit, make_lit_tiny_vit):
    sn = SupernetModule(lit_tiny_vit)
    state = _snapshot(sn)
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    sn.load_state_dict(changed)
    for key, value in sn.state_dict().items():
        assert torch.equal(value, changed[key]), key
    # the wrapped model's own parameters were the ones changed
    assert torch.equal(lit_tiny_vit.net.head.weight, changed["net.head.weight"])

    # a plain (unwrapped) model loads the supernet's checkpoint strictly, and the other way round
    torch.manual_seed(1)
    plain = make_lit_tiny_vit()
    plain.load_state_dict(sn.state_dict(), strict=True)
    x = torch.randn(3, 1, 8, 8)
    sn.eval(), plain.eval()
    torch.testing.assert_close(plain(x), sn(x), rtol=0, atol=0)
    sn.load_state_dict(state)
    assert torch.equal(sn.state_dict()["net.head.weight"], state["net.head.weight"])

    # through torch.save / torch.load
    buffer = io.BytesIO()
    torch.save(sn.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_lit_tiny_vit()
    fresh.load_state_dict(torch.load(buffer), strict=True)
    fresh.eval()
    torch.testing.assert_close(fresh(x), sn(x), rtol=0, atol=0)


def test_load_state_dict_is_strict_by_default(lit_tiny_vit):
    sn = SupernetModule(lit_tiny_vit)
    state = sn.state_dict()
    prefixed = {f"model.{k}": v for k, v in state.items()}
    with pytest.raises(RuntimeError, match="Missing key"):
        sn.load_state_dict(prefixed)


# -- trainer.fit -------------------------------------------------------------------------------------------------------
def test_fit_trains_and_the_users_self_log_works(lit_tiny_vit, random_images):
    sn = SupernetModule(lit_tiny_vit)
    before = _snapshot(sn)
    train, val = _loaders(random_images)
    trainer = _trainer(max_steps=3, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(sn, train, val)
    assert trainer.global_step == 3
    after = sn.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    # every trainable tensor of the largest subnet moved, and nothing became NaN
    trainable = {n for n, p in lit_tiny_vit.named_parameters() if p.requires_grad}
    assert trainable <= set(changed), sorted(trainable - set(changed))
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    # the user's own self.log calls, from training_step and validation_step
    metrics = trainer.callback_metrics
    for key in ("user_train_loss", "user_val_loss", "user_val_acc"):
        assert key in metrics, sorted(metrics)
        assert torch.isfinite(metrics[key])
    assert 0.0 <= float(metrics["user_val_acc"]) <= 1.0
    assert float(metrics["user_val_loss"]) > 0
    # the user's other hooks are called too
    assert lit_tiny_vit.epochs_ended == 1


def test_fit_lowers_the_loss(lit_tiny_vit, random_images):
    # a fixed batch seen repeatedly: a training loop that works must fit it
    x, y = random_images.x[:8], random_images.y[:8]
    data = TensorDataset(x, y)
    sn = SupernetModule(lit_tiny_vit)
    sn.eval()
    with torch.no_grad():
        start = F.cross_entropy(sn(x), y).item()
    sn.train()  # Lightning keeps the modules' modes as they are
    trainer = _trainer(max_steps=15, max_epochs=100, limit_val_batches=0)
    trainer.fit(sn, DataLoader(data, batch_size=8))
    assert trainer.global_step == 15
    sn.eval()
    with torch.no_grad():
        end = F.cross_entropy(sn(x), y).item()
    assert end < 0.7 * start, (start, end)


def test_fit_plain_module_with_loss_fn(random_images):
    torch.manual_seed(0)
    model = TinyViT(img_size=8, patch_size=2, in_chans=1, dim=32, depth=2, num_heads=2)
    sn = SupernetModule(model, F.cross_entropy, example_input=torch.randn(1, 1, 8, 8),
                        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    before = _snapshot(sn)
    x, y = random_images.x[:8], random_images.y[:8]
    with torch.no_grad():
        start = F.cross_entropy(sn.eval()(x), y).item()
    sn.train()
    train, val = _loaders(random_images)
    trainer = _trainer(max_steps=8, max_epochs=2, limit_val_batches=1)
    trainer.fit(sn, train, val)
    assert trainer.global_step == 8
    after = sn.state_dict()
    assert list(after) == list(before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {k for k in trainable if not torch.equal(before[k], after[k])}
    assert changed == trainable, sorted(trainable - changed)
    assert any("loss" in k for k in trainer.callback_metrics), sorted(trainer.callback_metrics)
    assert all(torch.isfinite(v) for v in trainer.callback_metrics.values())
    with torch.no_grad():
        end = F.cross_entropy(sn.eval()(x), y).item()
    assert end < start, (start, end)
