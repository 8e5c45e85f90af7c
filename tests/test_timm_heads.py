"""timm's LeViT attention gets elastic heads (issue 10).

``timm.models.levit.Attention`` lays its fused ``qkv`` (a Linear + BatchNorm1d) out head-major
``[heads][key_dim, key_dim, val_dim]``; ``AttentionDownsample`` has a fused ``kv`` (``[heads][key_dim, val_dim]``)
and a query ``q.ln`` (``[heads][key_dim]``). The heads are sliced by the head setter (rows, BN channels,
output-projection columns, ``attention_biases`` rows) and :mod:`lightning_supernet.elastic.timm_attention` bypasses
timm's eval-mode bias cache. The supernet passes the conformance contract with one heads dim per attention, a
subnet with fewer heads loses exactly the removed rows/entries/columns and equals its extracted model, and
gradients reach only the active heads. (EfficientViT's attention keeps its heads fixed.)
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from lightning_supernet import SupernetModule  # noqa: E402
from lightning_supernet.testing import check_conformance  # noqa: E402

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
BLOCK = "stages.0.blocks.0.attn"  # 4 heads, key_dim 16, val_dim 32 (64 qkv rows per head), width 128, 4x4 tokens


def _levit() -> torch.nn.Module:
    return timm.create_model("levit_128s", pretrained=False, img_size=64, num_classes=10).eval()


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def levit_supernet() -> SupernetModule:
    torch.manual_seed(0)
    return SupernetModule(_levit(), F.cross_entropy, example_input=X)


def test_levit_passes_the_contract_with_elastic_heads():
    torch.manual_seed(0)
    report = check_conformance(_levit, X, name="levit_128s", n_random=2)
    assert report.outcome == "PASS", report.failures
    assert report.dims["heads"] == 11  # one per LevitBlock (2 + 3 + 4) and per AttentionDownsample (2)


def test_levit_fewer_heads_remove_exactly_their_rows_bn_entries_columns_and_biases(levit_supernet):
    sn = levit_supernet
    heads = {k: d for k, d in sn.search_space.dims.items() if d.kind == "heads"}
    assert len(heads) == 11 and heads[f"{BLOCK}.heads"].largest == 4
    cfg = dict(sn.search_space.largest())
    cfg[f"{BLOCK}.heads"] = 2
    full, small = sn.extract(sn.search_space.largest()), sn.extract(cfg)
    # per removed head: 64 qkv rows of 128 inputs (no bias) + 64 BN weights and biases + 32 proj columns of 128
    # outputs + a 16-entry attention-bias row
    assert _count(full) - _count(small) == 2 * (64 * 128 + 2 * 64 + 32 * 128 + 16)
    assert sn.cost(cfg)["params"] == _count(small)
    attn = small.get_submodule(BLOCK)
    assert type(attn).__name__ == "Attention" and attn.num_heads == 2 and attn.val_attn_dim == 64
    assert attn.qkv.linear.weight.shape == (128, 128) and attn.qkv.bn.running_mean.shape == (128,)
    assert attn.proj.ln.linear.weight.shape == (128, 64) and attn.attention_biases.shape == (2, 16)
    with torch.no_grad(), sn.subnet(cfg):
        expected = sn.model(X)
    torch.testing.assert_close(small(X), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small(X), expected, rtol=1e-5, atol=1e-5)  # timm's cache, filled, stays right
    buffer = io.BytesIO()
    torch.save(small, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(X), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the full model after an eval-mode subnet: no stale bias cache
        torch.testing.assert_close(sn.model(X), full(X), rtol=1e-5, atol=1e-5)


def test_levit_gradients_reach_only_the_active_heads(levit_supernet):
    sn = levit_supernet
    sn.model.zero_grad()
    attn = sn.model.get_submodule(BLOCK)
    with torch.no_grad():  # timm starts the output projection's BatchNorm at weight 0: no gradient would flow
        attn.proj.ln.bn.weight.fill_(1.0)
    cfg = dict(sn.search_space.largest())
    cfg[f"{BLOCK}.heads"] = 3
    sn.model.train()
    try:
        with sn.subnet(cfg):
            # squared: in train mode the head's BatchNorm1d makes the plain sum of the logits over the batch
            # independent of its input (zero gradients everywhere)
            sn.model(X).pow(2).sum().backward()
    finally:
        sn.model.eval()
    qkv = attn.qkv.linear.weight.grad.view(4, 64, 128)
    assert qkv[3].abs().sum() == 0 and qkv[:3].abs().sum() > 0
    bn = attn.qkv.bn.weight.grad
    assert bn[192:].abs().sum() == 0 and bn[:192].abs().sum() > 0
    proj = attn.proj.ln.linear.weight.grad
    assert proj[:, 96:].abs().sum() == 0 and proj[:, :96].abs().sum() > 0
    biases = attn.attention_biases.grad
    assert biases[3:].abs().sum() == 0 and biases[:3].abs().sum() > 0


DOWN = "stages.1.downsample.attn_downsample"  # 8 heads, key_dim 16, val_dim 64, 128 -> 256, 4x4 keys


def test_levit_downsampling_attention_drops_exactly_its_kv_q_bn_columns_and_biases(levit_supernet):
    sn = levit_supernet
    cfg = dict(sn.search_space.largest())
    cfg[f"{DOWN}.heads"] = 4
    full, small = sn.extract(sn.search_space.largest()), sn.extract(cfg)
    # per removed head: 80 kv rows + 16 q rows of 128 inputs (no biases), their BN weights and biases, 64 proj
    # columns of 256 outputs, a 16-entry attention-bias row
    assert _count(full) - _count(small) == 4 * ((80 + 16) * 128 + 2 * (80 + 16) + 64 * 256 + 16)
    assert sn.cost(cfg)["params"] == _count(small)
    attn = small.get_submodule(DOWN)
    assert type(attn).__name__ == "AttentionDownsample" and attn.num_heads == 4 and attn.val_attn_dim == 256
    assert attn.kv.linear.weight.shape == (320, 128) and attn.q.ln.bn.running_var.shape == (64,)
    with torch.no_grad(), sn.subnet(cfg):
        expected = sn.model(X)
    torch.testing.assert_close(small(X), expected, rtol=1e-5, atol=1e-5)
