"""Bad input raises the library's own errors, and each message names the thing and what is allowed."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_supernet import SupernetModule
from lightning_supernet.elastic import HeadSpec, register_head_adapter
from lightning_supernet.ir.heads import _ADAPTERS
from lightning_supernet.errors import (
    ConfigMismatchError,
    DiscoveryError,
    SearchSpaceError,
    SupernetError,
    UnsupportedModelError,
)
from lightning_supernet.models import TinyViT


def _vit(**kwargs) -> SupernetModule:
    torch.manual_seed(0)
    model = TinyViT(img_size=8, patch_size=2, dim=kwargs.pop("dim", 32), depth=kwargs.pop("depth", 2), num_heads=2)
    return SupernetModule(model, F.cross_entropy, example_input=torch.randn(1, 1, 8, 8), **kwargs)


@pytest.fixture(scope="module")
def supernet() -> SupernetModule:
    return _vit()


def test_error_classes_subclass_builtin_errors():
    assert issubclass(SearchSpaceError, ValueError) and issubclass(SearchSpaceError, SupernetError)
    assert issubclass(ConfigMismatchError, SearchSpaceError)
    assert issubclass(DiscoveryError, ValueError) and issubclass(DiscoveryError, SupernetError)
    assert issubclass(UnsupportedModelError, TypeError) and issubclass(UnsupportedModelError, SupernetError)


# -- configs ---------------------------------------------------------------------------------------------------------
def test_unknown_dim(supernet):
    with pytest.raises(SearchSpaceError) as info:
        supernet.search_space.config({"blocks.0.mlp.fc9.width": 32})
    assert type(info.value) is SearchSpaceError
    msg = str(info.value)
    assert "`blocks.0.mlp.fc9.width`" in msg
    assert "did you mean blocks.0.mlp.fc1.width" in msg  # the closest real dim
    assert "this space has 6 dims" in msg
    # the same through activate(), and the supernet stays on its previous config
    before = supernet.active_config
    with pytest.raises(SearchSpaceError, match=r"unknown dim `blocks\.0\.mlp\.fc9\.width`"):
        supernet.activate({**supernet.search_space.largest(), "blocks.0.mlp.fc9.width": 32})
    assert supernet.active_config == before


@pytest.mark.parametrize("dim,value,allowed", [
    ("blocks.0.mlp.fc1.width", 50, "allowed: 32, 64, 96, 128"),
    ("blocks.0.mlp.fc1.width", 256, "allowed: 32, 64, 96, 128"),
    ("blocks.0.attn.heads", 3, "allowed: 1, 2"),
    ("blocks.1.keep", 1, "allowed: False, True"),
    ("blocks.0.mlp.fc1.width", 32.0 + 0.5, "allowed: 32, 64, 96, 128"),
])
def test_choice_outside_the_allowed_list(supernet, dim, value, allowed):
    for call in (supernet.search_space.config, supernet.activate, supernet.cost, supernet.extract):
        cfg = {**supernet.search_space.largest(), dim: value}
        with pytest.raises(SearchSpaceError) as info:
            call(cfg)
        assert str(info.value) == f"dim `{dim}` has value {value!r}; {allowed}"


def test_missing_dim(supernet):
    cfg = supernet.search_space.largest().to_dict()
    del cfg["blocks.1.attn.heads"]
    with pytest.raises(SearchSpaceError, match=r"no value for dim `blocks\.1\.attn\.heads`.*search_space\.config"):
        supernet.activate(cfg)


def test_bool_is_not_a_width_and_int_is_not_a_keep_flag():
    sn = SupernetModule(_resnet(), F.cross_entropy, example_input=torch.randn(1, 1, 8, 8))
    width = next(n for n, d in sn.search_space.dims.items() if d.kind == "width" and 1 in d.choices)
    with pytest.raises(SearchSpaceError, match=rf"dim `{re.escape(width)}` has value True; allowed: 1, 2"):
        sn.search_space.config({width: True})


def _resnet() -> nn.Module:
    from lightning_supernet.models import ResNetLike

    torch.manual_seed(0)
    return ResNetLike(in_chans=1, widths=(16,), depths=(2,))


def test_config_from_another_supernet(supernet):
    other = _vit(dim=48, depth=3)
    for cfg in (supernet.search_space.largest(), supernet.search_space.smallest(), supernet.search_space.sample(0)):
        for call in (other.activate, other.extract, other.cost, other.search_space.validate,
                     other.search_space.canonical):
            with pytest.raises(ConfigMismatchError) as info:
                call(cfg)
            msg = str(info.value)
            assert "made for another supernet" in msg
            assert supernet.search_space.fingerprint in msg and other.search_space.fingerprint in msg
            assert "`search_space`" in msg  # what to use instead
    with pytest.raises(ConfigMismatchError), other.subnet(supernet.search_space.smallest()):
        pass
    assert other.active_config == other.search_space.largest()


def test_plain_dict_from_another_model(supernet):
    # mostly unknown names: a config for another model, even without the fingerprint of a SubnetConfig
    foreign = {f"bert.encoder.layer.{i}.keep": True for i in range(4)}
    with pytest.raises(ConfigMismatchError, match=r"4 of the config's 4 dims are unknown here.*another model"):
        supernet.activate(foreign)


def test_generator_of_the_wrong_type(supernet):
    with pytest.raises(SearchSpaceError, match=r"`generator` must be a torch\.Generator, an int seed or None, "
                                               r"got 'abc'"):
        supernet.search_space.sample("abc")


def test_config_that_is_not_a_mapping(supernet):
    with pytest.raises(SearchSpaceError, match="must be a mapping of dim -> value, got list"):
        supernet.activate([("blocks.0.keep", True)])


# -- models that cannot be wrapped -------------------------------------------------------------------------------------
class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def test_no_example_input():
    with pytest.raises(DiscoveryError) as info:
        SupernetModule(_TwoLayers(), F.mse_loss)
    msg = str(info.value)
    assert "`_TwoLayers`" in msg and "`example_input_array`" in msg and "`example_input=`" in msg


def test_example_input_array_is_used_when_set():
    model = _TwoLayers()
    model.example_input_array = torch.randn(2, 4)
    sn = SupernetModule(model, F.mse_loss)
    assert list(sn.search_space.dims) == ["fc1.width"]


class _Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in forward")


def test_model_that_cannot_be_traced():
    with pytest.raises(DiscoveryError) as info:
        SupernetModule(_Raises(), F.mse_loss, example_input=torch.randn(2, 4))
    msg = str(info.value)
    assert "`_Raises`" in msg and "tensor of shape (2, 4)" in msg and "RuntimeError: boom in forward" in msg
    assert isinstance(info.value.__cause__, RuntimeError)


def test_example_input_of_the_wrong_shape():
    with pytest.raises(DiscoveryError) as info:
        SupernetModule(TinyViT(), F.cross_entropy, example_input=torch.randn(2, 4))
    assert "`TinyViT`" in str(info.value) and "(2, 4)" in str(info.value)
    with pytest.raises(DiscoveryError, match=r"dict with keys pixels"):
        SupernetModule(TinyViT(), F.cross_entropy, example_input={"pixels": torch.randn(1, 1, 8, 8)})


class _Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ids.shape[0], 3)  # ignores its input and its parameters


def test_model_whose_output_depends_on_nothing_trainable():
    with pytest.raises(DiscoveryError, match=r"`_Constant` does not depend on any parameter"):
        SupernetModule(_Constant(), F.mse_loss, example_input=torch.randint(0, 10, (2, 3)))
    # frozen parameters are fine (the trace unfreezes them for its one pass), even behind an integer input
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).requires_grad_(False)
    sn = SupernetModule(model, F.mse_loss, example_input=torch.randint(0, 10, (2, 3)))
    assert list(sn.search_space.dims) == ["1.width"]
    assert not any(p.requires_grad for p in model.parameters())
    frozen = _TwoLayers().requires_grad_(False)
    assert list(SupernetModule(frozen, F.mse_loss, example_input=torch.randn(2, 4)).search_space.dims) == ["fc1.width"]


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3)
        self.lstm = nn.LSTM(8, 16, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.conv(x).transpose(1, 2))[0]


def test_unsupported_layer_types():
    with pytest.raises(UnsupportedModelError) as info:
        SupernetModule(_Recurrent(), F.mse_loss, example_input=torch.randn(2, 3, 10))
    msg = str(info.value)
    assert "`_Recurrent`" in msg
    assert "Conv1d" in msg and "LSTM" in msg  # the layer types it could not handle
    assert "(supported: " in msg and "Linear" in msg and "Conv2d" in msg  # what is allowed


class _CustomAttention(nn.Module):
    """Separate projections under names no built-in adapter knows (``to_q``/``to_k``/``to_v``/``to_out``)."""

    def __init__(self, dim: int = 16, num_heads: int = 2) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, nh, N, hd)
            return t.view(B, N, self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x)))
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


class _AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _CustomAttention()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.attn(x)))).mean(1)


def test_attention_layout_no_adapter_knows():
    with pytest.raises(UnsupportedModelError) as info:
        SupernetModule(_AttentionNet(), F.mse_loss, example_input=torch.randn(2, 5, 16))
    msg = str(info.value)
    assert "`attn` (_CustomAttention)" in msg
    assert "register_head_adapter" in msg
    assert "space={'elastic': ['width', 'depth']}" in msg
    # the second way out the message offers works
    sn = SupernetModule(_AttentionNet(), F.mse_loss, example_input=torch.randn(2, 5, 16),
                        space={"elastic": ["width", "depth"]})
    assert sn.search_space.dims and all(d.kind != "heads" for d in sn.search_space.dims.values())


def test_registering_a_head_adapter_makes_the_attention_elastic():
    def custom(module: nn.Module) -> HeadSpec | None:
        if not isinstance(module, _CustomAttention):
            return None
        head_dim = module.to_q.out_features // module.num_heads
        return HeadSpec(module.num_heads, module.num_heads, head_dim, o="to_out", q="to_q", k="to_k", v="to_v",
                        head_attrs=(("", "num_heads"),))

    register_head_adapter(custom)
    try:
        torch.manual_seed(0)
        model = _AttentionNet().eval()
        x = torch.randn(2, 5, 16)
        reference = model(x)
        sn = SupernetModule(model, F.mse_loss, example_input=x)
        assert sn.search_space.dims["attn.heads"].choices == (2, 1)
        torch.testing.assert_close(sn(x), reference, rtol=0, atol=0)
        cfg = sn.search_space.config({"attn.heads": 1})
        with sn.subnet(cfg):
            y = sn(x)
        small = sn.extract(cfg).eval()
        assert small.attn.num_heads == 1 and small.attn.to_q.out_features == 8
        torch.testing.assert_close(small(x), y)
        assert not torch.allclose(y, reference)
        assert model.attn.num_heads == 2  # restored after the subnet
    finally:
        _ADAPTERS.remove(custom)


# -- the space= argument -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space,pattern", [
    ({"min_dept": 1}, r"`space` has unknown key 'min_dept'; allowed keys: .*\bmin_depth\b"),
    ({"width_ratios": (0, 1.5)}, r"`space\['width_ratios'\]` must be a non-empty list of fractions in \(0, 1\], got \(0, 1\.5\)"),
    ({"head_ratios": []}, r"`space\['head_ratios'\]` must be a non-empty list of fractions in \(0, 1\], got \(\)"),
    ({"elastic": ["widths"]}, r"`space\['elastic'\]` has 'widths'; allowed: a non-empty list among width, heads, depth"),
    ({"keep_prob": 0}, r"`space\['keep_prob'\]` must be in \(0, 1\], got 0"),
    ({"round_to": 0}, r"`space\['round_to'\]` must be a positive int, got 0"),
    ({"min_depth": -1}, r"`space\['min_depth'\]` must be a fraction in \[0, 1\] of each stack's length or an int count of blocks, got -1"),
    (5, r"`space` must be a dict or SpaceOptions, got int"),
    ({"choices": {"*.fc1.width": [1000]}},
     r"`space\['choices'\]` gives dim `blocks\.0\.mlp\.fc1\.width` the choice 1000; allowed: ints in \[1, 128\]"),
    ({"choices": {"*.attn.heads": [0, 2]}},
     r"`space\['choices'\]` gives dim `blocks\.0\.attn\.heads` the choice 0; allowed: ints in \[1, 2\]"),
    ({"include": ["nothing.*"]},
     r"`space\['include'\]` pattern 'nothing\.\*' matches no dim; dims are e\.g\. `blocks\.0\.keep`"),
])
def test_bad_space_option(space, pattern):
    with pytest.raises(SearchSpaceError, match=pattern):
        _vit(space=space)


def test_space_options_that_are_allowed():
    sn = _vit(space={"elastic": ["width"], "choices": {"*.fc1.width": [64, 128]}, "exclude": ["blocks.1.*"]})
    assert {n: d.choices for n, d in sn.search_space.dims.items()} == {"blocks.0.mlp.fc1.width": (64, 128)}


# -- plain nn.Module -------------------------------------------------------------------------------------------------
def test_plain_module_without_loss_fn():
    with pytest.raises(TypeError) as info:
        SupernetModule(TinyViT(), example_input=torch.randn(1, 1, 8, 8))
    msg = str(info.value)
    assert "`loss_fn`" in msg and "`TinyViT`" in msg and "LightningModule" in msg


def test_plain_module_without_loss_fn_raises_a_library_error():
    with pytest.raises(SupernetError, match="`loss_fn` is required"):
        SupernetModule(TinyViT(), example_input=torch.randn(1, 1, 8, 8))


def test_not_a_module():
    with pytest.raises(TypeError, match=r"`model` must be a LightningModule or nn\.Module, got function"):
        SupernetModule(lambda x: x, F.mse_loss, example_input=torch.randn(1))


def test_wrapping_a_supernet_twice(supernet):
    with pytest.raises(TypeError, match="already a SupernetModule"):
        SupernetModule(supernet, F.mse_loss)
