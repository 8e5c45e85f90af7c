"""torchvision's Swin / Swin-v2 window attention gets elastic heads (issue 10).

The heads are sliced by :mod:`lightning_supernet.elastic.tv_window_attention`: the supernet passes the conformance
contract with ``...attn.heads`` dims, a subnet with fewer heads equals its extracted model (a pruned torchvision
class), its parameters drop by exactly the removed q/k/v rows, output-projection columns and per-head position-bias
entries, and the re-implemented window attention equals torchvision's at the full head count.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

torchvision = pytest.importorskip("torchvision")
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2  # noqa: E402

from lightning_supernet import SupernetModule  # noqa: E402
from lightning_supernet.elastic.tv_window_attention import window_attention  # noqa: E402
from lightning_supernet.testing import check_conformance  # noqa: E402

X = torch.randn(2, 3, 64, 64)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_passes_the_contract_with_elastic_heads(name):
    torch.manual_seed(0)
    report = check_conformance(lambda: getattr(torchvision.models, name)(num_classes=10), X, name=name, n_random=2)
    assert report.outcome == "PASS", report.failures
    assert report.dims["heads"] == 12  # one per block: 2 + 2 + 6 + 2


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_fewer_heads_remove_exactly_their_rows_columns_and_bias_entries(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    sn = SupernetModule(model, F.cross_entropy, example_input=X)
    assert sum(d.kind == "heads" for d in sn.search_space.dims.values()) == 12
    assert not any(k.endswith(".heads") for k in sn.search_space.frozen)
    cfg = dict(sn.search_space.largest())
    cfg["features.1.0.attn.heads"] = 1  # of 3 heads of 32 features, residual width 96
    cfg["features.5.2.attn.heads"] = 6  # of 12, width 384
    full, small = sn.extract(sn.search_space.largest()), sn.extract(cfg)
    v2 = name == "swin_v2_t"
    # q/k/v rows (weights and bias) + output-projection columns; v1: a bias-table column of 15x15 (window 8 for
    # v2, 13x13 for v1's window 7); v2: a cpb_mlp.2 row of 512 and a logit_scale entry
    per_head = 512 + 1 if v2 else 13 * 13
    removed = sum(r * (3 * 32 * (c + 1) + 32 * c + per_head) for r, c in ((2, 96), (6, 384)))
    assert _count(full) - _count(small) == removed
    assert sn.cost(cfg)["params"] == _count(small)
    attn = small.features[1][0].attn
    assert type(attn).__name__ == ("PrunedShiftedWindowAttentionV2" if v2 else "PrunedShiftedWindowAttention")
    assert attn.num_heads == 1 and attn.qkv.weight.shape == (96, 96) and attn.proj.weight.shape == (96, 32)
    with torch.no_grad(), sn.subnet(cfg):
        expected = sn.model(X)
    torch.testing.assert_close(small.eval()(X), expected, rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(small, buffer)  # the pruned class pickles by name
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(X), expected, rtol=1e-5, atol=1e-5)


def test_a_pruned_block_gets_gradients_only_in_its_active_heads():
    torch.manual_seed(0)
    sn = SupernetModule(torchvision.models.swin_t(num_classes=10), F.cross_entropy, example_input=X)
    cfg = dict(sn.search_space.largest())
    cfg["features.1.0.attn.heads"] = 2
    with sn.subnet(cfg):
        sn.model(X).sum().backward()
    attn = sn.model.features[1][0].attn
    qkv = attn.qkv.weight.grad.view(3, 3, 32, 96)
    assert qkv[:, :2].abs().sum() > 0 and qkv[:, 2:].abs().sum() == 0
    assert attn.proj.weight.grad[:, 64:].abs().sum() == 0 and attn.proj.weight.grad[:, :64].abs().sum() > 0
    table = attn.relative_position_bias_table.grad
    assert table[:, 2:].abs().sum() == 0 and table[:, :2].abs().sum() > 0


@pytest.mark.parametrize("cls", [ShiftedWindowAttention, ShiftedWindowAttentionV2])
@pytest.mark.parametrize("hw,shift", [((8, 8), [2, 2]), ((7, 10), [2, 2]), ((4, 12), [2, 2]), ((8, 8), [0, 0])])
def test_window_attention_equals_torchvision_at_the_full_head_count(cls, hw, shift):
    torch.manual_seed(0)
    attn = cls(24, [4, 4], shift, num_heads=3).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_() if cls is ShiftedWindowAttention else attn.logit_scale.normal_()
    x = torch.randn(2, *hw, 24)
    scale = getattr(attn, "logit_scale", None)
    ours = window_attention(x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                            attn.get_relative_position_bias(), attn.window_size, attn.shift_size, 3, 8, scale)
    torch.testing.assert_close(ours, attn(x), rtol=1e-5, atol=1e-6)


def test_a_subclass_with_its_own_forward_keeps_its_heads_fixed():
    class Custom(ShiftedWindowAttention):
        def forward(self, x):
            return super().forward(x) * 2

    from lightning_supernet.elastic.tv_window_attention import accepts_window_attention
    attn = Custom(16, [4, 4], [0, 0], num_heads=2)
    assert not accepts_window_attention(attn)
    assert accepts_window_attention(ShiftedWindowAttention(16, [4, 4], [0, 0], num_heads=2))


def _tiny_maxvit() -> torch.nn.Module:
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[32, 64],
                  block_layers=[1, 2], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)


def test_maxvit_passes_the_contract_with_elastic_heads():
    torch.manual_seed(0)
    report = check_conformance(_tiny_maxvit, torch.randn(2, 3, 32, 32), name="tiny_maxvit", n_random=2)
    assert report.outcome == "PASS", report.failures
    assert report.dims["heads"] == 6  # block and grid attention of 3 layers


def test_maxvit_fewer_heads_remove_exactly_their_rows_columns_and_table_columns():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    sn = SupernetModule(_tiny_maxvit().eval(), F.cross_entropy, example_input=x)
    path = "blocks.1.layers.0.layers.window_attention.attn_layer.1"
    cfg = dict(sn.search_space.largest())
    cfg[f"{path}.heads"] = 2  # of 8 heads of 8 features, width 64; a 3x3 bias table (partition 2)
    full, small = sn.extract(sn.search_space.largest()), sn.extract(cfg)
    assert _count(full) - _count(small) == 6 * (3 * 8 * (64 + 1) + 8 * 64 + 9)
    assert sn.cost(cfg)["params"] == _count(small)
    attn = small.get_submodule(path)
    assert type(attn).__name__ == "PrunedRelativePositionalMultiHeadAttention" and attn.n_heads == 2
    with torch.no_grad(), sn.subnet(cfg):
        expected = sn.model(x)
    buffer = io.BytesIO()
    torch.save(small, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False).eval()(x), expected, rtol=1e-5, atol=1e-5)
