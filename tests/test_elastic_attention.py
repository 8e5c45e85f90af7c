"""PyTorch's own attention as an elastic op: ``nn.MultiheadAttention`` (packed projection, fused fast path),
``nn.TransformerEncoder``/``nn.Transformer`` and torchvision's ViT, checked against independent references.

The reference for ``h`` of ``H`` heads is torch's own full module with the other heads removed: their columns of
``out_proj.weight`` set to zero (attention heads are independent until the output projection).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_supernet import SupernetModule
from lightning_supernet.cost import count_params
from lightning_supernet.elastic import ElasticMultiheadAttention, HeadSetter, PrunedMultiheadAttention, restore
from lightning_supernet.elastic.registry import make_elastic
from lightning_supernet.ir.heads import find_head_spec

E, H = 16, 4


def _removed(mha: nn.MultiheadAttention, heads: int) -> nn.MultiheadAttention:
    ref = copy.deepcopy(mha)
    with torch.no_grad():
        ref.out_proj.weight[:, heads * (E // H):] = 0
    return ref


def _masks(batch_first: bool):
    g = torch.Generator().manual_seed(3)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    per_head = torch.randn(2 * H, 5, 5, generator=g)
    return [
        {},
        {"key_padding_mask": pad},
        {"attn_mask": causal},
        {"attn_mask": causal, "key_padding_mask": pad, "need_weights": True, "average_attn_weights": False},
        {"attn_mask": per_head},
        {"need_weights": False, "is_causal": True, "attn_mask": causal},
    ]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("grad", ["enable", "no_grad", "inference"])
def test_sliced_heads_equal_torch_with_those_heads_removed(batch_first, grad):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    x = torch.randn(2, 5, E) if batch_first else torch.randn(5, 2, E)
    ctx = {"enable": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[grad]
    for heads in (1, 2, 3):
        ref = _removed(mha, heads)
        elastic = copy.deepcopy(mha)
        HeadSetter(elastic, "", find_head_spec(elastic))(heads)
        for kwargs in _masks(batch_first):
            if "attn_mask" in kwargs and kwargs["attn_mask"].dim() == 3:
                kwargs = {**kwargs, "attn_mask": kwargs["attn_mask"]}  # per-head masks: the first h heads'
                ref_mask = kwargs["attn_mask"].view(2, H, 5, 5).clone()
                ref_mask[:, heads:] = 0
                ref_kwargs = {**kwargs, "attn_mask": ref_mask.view(2 * H, 5, 5)}
            else:
                ref_kwargs = kwargs
            with ctx():
                out, w = elastic(x, x, x, **kwargs)
                expected, w_ref = ref(x, x, x, **ref_kwargs)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            if kwargs.get("need_weights", True) and not kwargs.get("average_attn_weights", True):
                torch.testing.assert_close(w, w_ref[:, :heads])  # the kept heads' weights are the same


def test_unbatched_input_and_full_heads_use_torchs_own_forward():
    mha = nn.MultiheadAttention(E, H).eval()
    elastic = copy.deepcopy(mha)
    setter = HeadSetter(elastic, "", find_head_spec(elastic))
    x = torch.randn(5, E)
    setter(H)
    assert torch.equal(elastic(x, x, x)[0], mha(x, x, x)[0])
    setter(2)
    torch.testing.assert_close(elastic(x, x, x)[0], _removed(mha, 2)(x, x, x)[0], atol=1e-5, rtol=1e-5)


def test_gradients_land_only_in_the_active_heads():
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    HeadSetter(mha, "", find_head_spec(mha))(2)
    x = torch.randn(2, 5, E)
    mha(x, x, x, need_weights=False)[0].square().sum().backward()
    rows = torch.zeros(3 * E, dtype=torch.bool)
    for block in range(3):
        rows[block * E: block * E + 2 * (E // H)] = True
    assert torch.count_nonzero(mha.in_proj_weight.grad[~rows]) == 0 and torch.count_nonzero(mha.in_proj_weight.grad[rows])
    assert torch.count_nonzero(mha.out_proj.weight.grad[:, 2 * (E // H):]) == 0


def test_export_gives_a_pruned_multihead_attention_that_pickles():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    elastic = copy.deepcopy(mha)
    HeadSetter(elastic, "", find_head_spec(elastic))(3)
    small = copy.deepcopy(elastic)
    small.out_proj.export_()
    small.export_()
    cls = small.__dict__.pop("_exported_as")
    restore(small)
    restore(small.out_proj)
    small.__class__ = cls
    assert isinstance(small, PrunedMultiheadAttention) and isinstance(small, nn.MultiheadAttention)
    assert small.in_proj_weight.shape == (3 * 3 * (E // H), E)
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        expected = elastic(x, x, x)[0]
        torch.testing.assert_close(small(x, x, x)[0], expected)
        torch.testing.assert_close(pickle.loads(pickle.dumps(small))(x, x, x)[0], expected)


class _Encoder(nn.Module):
    def __init__(self, depth: int = 12, norm_first: bool = False) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


def _check_every_mode(sn: SupernetModule, x, configs, call=lambda m, x: m(x)) -> None:
    for cfg in configs:
        small = sn.extract(cfg)
        assert count_params(small) == sn.cost(cfg)["params"]
        for train in (False, True):
            small.train(train)
            sn.train(train)
            for ctx in (torch.enable_grad, torch.no_grad, torch.inference_mode):
                with ctx():
                    expected = call(small, x)
                with sn.subnet(cfg), ctx():
                    got = call(sn, x)
                torch.testing.assert_close(got.clone(), expected.clone(), atol=1e-5, rtol=1e-4)
    sn.eval()


@pytest.mark.parametrize("norm_first", [False, True])
def test_a_12_layer_torch_transformer_encoder_is_elastic_in_heads_width_and_depth(norm_first):
    x = torch.randn(2, 7, 32)
    sn = SupernetModule(_Encoder(12, norm_first).eval(), F.cross_entropy, example_input=x)
    kinds = [d.kind for d in sn.search_space.dims.values()]
    assert kinds.count("heads") == kinds.count("width") == kinds.count("depth") == 12
    space = sn.search_space
    heads2 = space.config({n: 2 for n, d in space.dims.items() if d.kind == "heads"})  # even: the fused kernel's case
    _check_every_mode(sn, x, [space.smallest(), heads2, space.sample(0), space.sample(1)])
    assert sn.cost(space.smallest())["params"] <= 0.5 * sn.cost(space.largest())["params"]


def test_torch_transformer_encoder_decoder():
    model = nn.Transformer(32, 4, num_encoder_layers=3, num_decoder_layers=3, dim_feedforward=64, dropout=0.0,
                           batch_first=True).eval()
    src, tgt = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    sn = SupernetModule(model, F.mse_loss, example_input=(src, tgt))
    heads = [n for n, d in sn.search_space.dims.items() if d.kind == "heads"]
    assert len(heads) == 3 + 2 * 3  # encoder self-attention, decoder self- and cross-attention
    _check_every_mode(sn, (src, tgt), [sn.search_space.smallest(), sn.search_space.sample(2)],
                      call=lambda m, x: m(*x))


def test_torchvision_vit_12_layers():
    pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=12, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    sn = SupernetModule(model, F.cross_entropy, example_input=x)
    kinds = [d.kind for d in sn.search_space.dims.values()]
    assert kinds.count("heads") == 12 and kinds.count("depth") == 12
    _check_every_mode(sn, x, [sn.search_space.smallest(), sn.search_space.sample(0)])
    assert make_elastic and ElasticMultiheadAttention  # the public names exist


def test_padded_torch_encoder_matches_torch_and_the_extracted_subnet_on_its_nested_tensor_path():
    """With a key padding mask, torch's encoder (eval, no grad) runs on nested tensors and returns zeros at padded
    positions: the full supernet is torch's own forward, and every subnet equals its extracted model."""
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=True).eval()
    x, pad = torch.randn(2, 6, 16), torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    original = copy.deepcopy(encoder)
    sn = SupernetModule(encoder, F.mse_loss, example_input=(x, None, pad))
    space = sn.search_space
    with torch.no_grad():
        assert original(x, src_key_padding_mask=pad)[1, 4:].abs().max() == 0  # the nested path was taken
        torch.testing.assert_close(sn(x, src_key_padding_mask=pad), original(x, src_key_padding_mask=pad))
    widths = space.config({n: min(d.choices) for n, d in space.dims.items() if d.kind == "width"})
    for cfg in (widths, space.smallest(), space.sample(0)):
        small = sn.extract(cfg).eval()
        for ctx in (torch.no_grad, torch.enable_grad, torch.inference_mode):
            with ctx():
                expected = small(x, src_key_padding_mask=pad)
            with sn.subnet(cfg), ctx():
                got = sn(x, src_key_padding_mask=pad)
            torch.testing.assert_close(got.clone(), expected.clone(), atol=1e-5, rtol=1e-4)


def test_macs_of_torch_attention_are_counted_on_its_fast_path_too():
    from lightning_supernet.cost import count_macs

    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 5, E)
    L = 5
    expected = 2 * (L * (3 * E * E + E * E) + 2 * L * L * E)  # batch x (projections + q k^T and attn v)
    assert count_macs(Wrap(), x) == expected


def test_cross_attention_with_separate_key_value_dims():
    """``kdim``/``vdim`` != ``embed_dim``: separate q/k/v weights, sliced and prioritised like the packed ones."""
    from lightning_supernet.prioritize import magnitude_importance, reorder

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, kdim=12, vdim=10, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_v: torch.Tensor) -> torch.Tensor:
            return self.head(x + self.attn(x, ctx, ctx_v, need_weights=False)[0])

    inputs = (torch.randn(2, 5, 16), torch.randn(2, 7, 12), torch.randn(2, 7, 10))
    sn = SupernetModule(Cross().eval(), F.cross_entropy, example_input=inputs)
    assert sn.search_space.dims["attn.heads"].choices == (4, 3, 2, 1)
    with torch.no_grad():
        before = sn(*inputs)
        assert reorder(sn, magnitude_importance(sn))
        torch.testing.assert_close(sn(*inputs), before, atol=1e-5, rtol=1e-5)
    _check_every_mode(sn, inputs, [sn.search_space.smallest(), sn.search_space.config({"attn.heads": 2})],
                      call=lambda m, x: m(*x))
