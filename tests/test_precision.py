"""Mixed precision with the multi-subnet (manual-optimisation) step: bf16 autocast on CPU matches a hand-written
autocast reference; 16-mixed's gradient scaler unscales before clipping and skips the step on inf (on CPU through
Lightning's ``MixedPrecision`` plugin with a CPU ``GradScaler``: ``precision="16-mixed"`` alone falls back to bf16
on CPU); a CUDA version runs where a GPU is present."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import SandwichSampling
from lightning_supernet.models import TinyViT


class Tiny(pl.LightningModule):
    def __init__(self, lr: float = 1.0, poison: bool = False) -> None:
        super().__init__()
        self.net = TinyViT(dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
        self.example_input_array = torch.randn(1, 1, 8, 8)
        self.lr, self.poison, self.dtypes = lr, poison, []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        out = self(batch[0])
        self.dtypes.append(out.dtype)
        return F.cross_entropy(out.float(), batch[1])

    def on_after_backward(self):
        if self.poison:  # an overflow in one gradient, as fp16 produces
            self.net.head.weight.grad[0, 0] = float("inf")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _fit(sn, **kw):
    trainer = pl.Trainer(accelerator=kw.pop("accelerator", "cpu"), devices=1, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SandwichSampling(num_random=0)], **kw)
    trainer.fit(sn, DataLoader(_data(), batch_size=8))
    return trainer


def _reference_grads(ref, dtype, device="cpu"):
    """Sum of the largest's and the smallest's gradients with the forward under autocast."""
    x, y = (t.to(device) for t in _data().tensors)
    ref.zero_grad(set_to_none=True)
    for cfg in (ref.search_space.largest(), ref.search_space.smallest()):
        with ref.subnet(cfg), torch.autocast(device, dtype=dtype):
            out = ref(x)
        F.cross_entropy(out.float(), y).backward()
    return {n: p.grad.clone() for n, p in ref.model.named_parameters() if p.grad is not None}


def test_bf16_mixed_on_cpu_matches_an_autocast_reference():
    torch.manual_seed(0)
    sn = SupernetModule(Tiny(), eval_subnets=None)
    ref = copy.deepcopy(sn)
    _fit(sn, precision="bf16-mixed")
    assert sn.model.dtypes == [torch.bfloat16, torch.bfloat16]  # both subnets ran under autocast
    assert all(p.dtype == torch.float32 for p in sn.parameters())
    grads = _reference_grads(ref, torch.bfloat16)
    for name, p in sn.model.named_parameters():
        expected = dict(ref.model.named_parameters())[name] - grads.get(name, 0)
        torch.testing.assert_close(p, expected, atol=1e-5, rtol=1e-4, msg=name)


def _fp16_plugin(init_scale=2.0**12):
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_16_mixed_unscales_before_clipping():
    torch.manual_seed(1)
    sn = SupernetModule(Tiny(), eval_subnets=None, gradient_clip_val=0.05)
    ref = copy.deepcopy(sn)
    plugin = _fp16_plugin()
    _fit(sn, plugins=[plugin])
    assert sn.model.dtypes == [torch.float16, torch.float16]
    assert plugin.scaler.get_scale() == 2.0**12  # finite gradients: no back-off
    grads = _reference_grads(ref, torch.float16)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    scale = 0.05 / (norm.item() + 1e-6)
    assert scale < 1e-2  # clipping the scaled gradients (x4096) would have moved the weights 4096x less
    for name, p in sn.model.named_parameters():
        expected = dict(ref.model.named_parameters())[name] - scale * grads.get(name, 0)
        torch.testing.assert_close(p, expected, atol=1e-5, rtol=2e-3, msg=name)


def test_16_mixed_skips_the_step_on_inf_and_backs_off():
    torch.manual_seed(2)
    sn = SupernetModule(Tiny(poison=True), eval_subnets=None, gradient_clip_val=1.0)
    before = {k: v.clone() for k, v in sn.state_dict().items()}
    plugin = _fp16_plugin()
    trainer = _fit(sn, plugins=[plugin])
    assert trainer.global_step == 1  # the step was taken by the loop and skipped by the scaler
    assert plugin.scaler.get_scale() == 2.0**11
    for k, v in sn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_on_cuda_matches_an_autocast_reference(precision):
    torch.manual_seed(3)
    sn = SupernetModule(Tiny(), eval_subnets=None)
    ref = copy.deepcopy(sn).cuda()
    _fit(sn, precision=precision, accelerator="gpu")
    dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    assert sn.model.dtypes == [dtype, dtype]
    grads = _reference_grads(ref, dtype, "cuda")
    for name, p in sn.model.named_parameters():
        expected = dict(ref.model.named_parameters())[name] - grads.get(name, 0)
        torch.testing.assert_close(p, expected, atol=1e-4, rtol=1e-3, msg=name)
