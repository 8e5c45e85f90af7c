"""Regression tests for the silent wrong answers and late crashes of issue 9 (each failed before its fix)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from lightning_supernet import SupernetModule
from lightning_supernet.models import TinyViT


def _vit12() -> SupernetModule:
    return SupernetModule(TinyViT(dim=32, depth=12, num_heads=2), F.cross_entropy,
                          example_input=torch.randn(1, 1, 8, 8))


def test_blocks_are_ordered_by_model_order_not_as_strings():
    sn = _vit12()
    space = sn.search_space
    assert space.stack_blocks("blocks") == [f"blocks.{i}.keep" for i in range(12)]
    kept = [n for n, v in space.smallest().items() if n.endswith(".keep") and v]
    assert kept == [f"blocks.{i}.keep" for i in range(6)]
    middle = [n for n, v in space.middle().items() if n.endswith(".keep") and v]
    assert middle == [f"blocks.{i}.keep" for i in range(9)]
    repaired = space.repair({n: (False if n.endswith(".keep") else v) for n, v in space.largest().items()})
    assert [n for n, v in repaired.items() if n.endswith(".keep") and v] == [f"blocks.{i}.keep" for i in range(6)]
    # the dims inside a block follow its keep flag, blocks in model order
    names = list(space.dims)
    assert names.index("blocks.2.keep") < names.index("blocks.2.mlp.fc1.width") < names.index("blocks.10.keep")
    # the extracted smallest model holds exactly blocks 0-5 (the same weights)
    small = sn.extract(space.smallest())
    assert len(small.blocks) == 6
    for i in range(6):
        assert torch.equal(small.blocks[i].norm1.weight, sn.model.blocks[i].norm1.weight)


# -- defect 2: fused fast paths ------------------------------------------------------------------------------------
import pytest  # noqa: E402
from torch import nn  # noqa: E402

from lightning_supernet.errors import ArgumentError, SearchSpaceError, UnsupportedModelError  # noqa: E402
from lightning_supernet.ir.graph import call_model  # noqa: E402


def _modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def _classes(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def _agree_in_every_mode(sn: SupernetModule, cfg, x) -> None:
    """supernet under cfg == extract(cfg) in eval mode with autograd on, under no_grad and inference_mode."""
    small = sn.extract(cfg).eval()
    with torch.no_grad():
        expected = small(x)
    sn.eval()
    with sn.subnet(cfg):
        for ctx in (torch.enable_grad, torch.no_grad, torch.inference_mode):
            with ctx():
                got = sn(x)
            torch.testing.assert_close(got.clone(), expected, atol=1e-5, rtol=1e-4)


class _TorchEncoder(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


def test_a_fused_fast_path_never_gives_the_full_models_answer_for_a_subnet():
    x = torch.randn(2, 7, 32)
    model = _TorchEncoder().eval()
    sn = SupernetModule(model, F.cross_entropy, example_input=x, space={"elastic": ["width", "depth"]})
    for cfg in (sn.search_space.smallest(), sn.search_space.sample(0), sn.search_space.sample(1)):
        _agree_in_every_mode(sn, cfg, x)


# -- defect 3: the model itself is the stack -----------------------------------------------------------------------
class _Residual(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


def test_extract_drops_skipped_blocks_when_the_model_itself_is_the_stack():
    from lightning_supernet.cost import count_params

    sn = SupernetModule(nn.Sequential(*[_Residual() for _ in range(12)]), F.mse_loss, example_input=torch.randn(2, 8))
    x = torch.randn(3, 8)
    for cfg in (sn.search_space.smallest(), sn.search_space.sample(3)):
        small = sn.extract(cfg)
        kept = [i for i in range(12) if cfg[f"{i}.keep"]]
        assert len(small) == len(kept)
        assert all(small[j].fc2.bias.data_ptr() != sn.model[i].fc2.bias.data_ptr() and
                   torch.equal(small[j].fc2.bias, sn.model[i].fc2.bias) for j, i in enumerate(kept))
        assert count_params(small) == sn.cost(cfg)["params"]
        with sn.subnet(cfg), torch.no_grad():
            torch.testing.assert_close(small(x), sn(x))


# -- defect 4: head layouts are verified numerically, not guessed by name ------------------------------------------
class _FusedAttention(nn.Module):
    """A fused qkv under timm's names whose rows are laid out ``[heads][3][head_dim]`` (GPT-NeoX style) or
    ``[3][head_dim][heads]`` (a layout no adapter proposes)."""

    def __init__(self, layout: str, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.layout, self.num_heads, self.head_dim = layout, heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x)
        if self.layout == "head":
            q, k, v = qkv.reshape(B, N, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        else:
            q, k, v = qkv.reshape(B, N, 3, self.head_dim, self.num_heads).permute(2, 0, 4, 1, 3).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1))


class _AttnBlock(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(32), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


def _attention_model(make) -> nn.Module:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*[_AttnBlock(make()) for _ in range(3)])
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.blocks(x).mean(1))

    return Model()


def _preserves_function_when_reordered(sn: SupernetModule, x: torch.Tensor, expect: bool = True) -> None:
    from lightning_supernet.prioritize import magnitude_importance, reorder

    with torch.no_grad():
        before = sn(x)
        perms = reorder(sn, magnitude_importance(sn))
        assert bool(perms) == expect
        torch.testing.assert_close(sn(x), before, atol=1e-5, rtol=1e-5)


def test_a_head_major_fused_layout_is_recognised_numerically_and_sliced_right():
    model = _attention_model(lambda: _FusedAttention("head")).eval()
    x = torch.randn(2, 5, 32)
    sn = SupernetModule(model, F.cross_entropy, example_input=x)
    assert [h.spec.layout for h in sn.discovery.heads] == ["head"] * 3  # the [3][heads][head_dim] guess failed
    _preserves_function_when_reordered(sn, x)
    for cfg in (sn.search_space.smallest(), sn.search_space.sample(0), sn.search_space.sample(1)):
        _agree_in_every_mode(sn, cfg, x)


def test_a_head_layout_no_candidate_matches_is_never_sliced():
    model = _attention_model(lambda: _FusedAttention("dim-major")).eval()
    x = torch.randn(2, 5, 32)
    with pytest.warns(UserWarning, match=r"blocks\.0\.attn\.heads.*slicing it does not compute what removing"):
        sn = SupernetModule(model, F.cross_entropy, example_input=x)
    assert not [d for d in sn.search_space.dims.values() if d.kind == "heads"]
    assert "slicing it does not compute" in sn.discovery.frozen["blocks.0.attn.heads"]
    shown = str(sn.search_space)  # the user sees what was left fixed and why, one line for the three blocks
    assert "left fixed: 12 dims" in shown and "blocks.*.attn.heads (x3): slicing it does not compute" in shown
    _preserves_function_when_reordered(sn, x, expect=False)  # nothing to reorder: the heads stay as they are
    with pytest.raises(UnsupportedModelError, match=r"`blocks\.0\.attn\.heads` was asked for.*slicing it does not"):
        SupernetModule(_attention_model(lambda: _FusedAttention("dim-major")), F.cross_entropy, example_input=x,
                       space={"choices": {"*.heads": [2, 4]}})


# -- defect 5: timm's own Attention -----------------------------------------------------------------------------------
def test_timm_vision_transformer_never_crashes_at_a_smaller_subnet():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=12, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    sn = SupernetModule(model, F.cross_entropy, example_input=x)
    assert len(sn.search_space.stack_blocks("blocks")) == 12
    for cfg in (sn.search_space.smallest(), sn.search_space.sample(0), sn.search_space.sample(1)):
        _agree_in_every_mode(sn, cfg, x)


# -- defect 6: accepted, then a raw shape error later ----------------------------------------------------------------
class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)


class _SharedTwice(_Mlp):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fc1 and fc2 each called twice (weight sharing)
        return self.fc2(F.relu(self.fc1(self.fc2(F.relu(self.fc1(x))))))


class _BufferScale(_Mlp):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.rand(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)) * self.scale)


class _ParamShift(_Mlp):
    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.rand(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x) + self.shift))


class _Branch(_Mlp):
    def __init__(self) -> None:
        super().__init__()
        self.alt = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        return self.fc2(h) if x.shape[0] < 4 else self.alt(h)


@dataclasses.dataclass
class _Out:
    y: torch.Tensor


class _DataclassOut(_Mlp):
    def forward(self, x: torch.Tensor) -> _Out:
        return _Out(self.fc2(F.relu(self.fc1(x))))


def _refused_or_correct(model: nn.Module, x: torch.Tensor, pick=lambda o: o) -> SupernetModule | None:
    classes, modes, state = _classes(model), _modes(model), {k: v.clone() for k, v in model.state_dict().items()}
    try:
        sn = SupernetModule(model, F.mse_loss, example_input=x, output_transform=pick)
    except UnsupportedModelError:
        assert _classes(model) == classes and _modes(model) == modes
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        return None
    for cfg in (sn.search_space.smallest(), sn.search_space.sample(0), sn.search_space.sample(1)):
        with sn.subnet(cfg), torch.no_grad():
            torch.testing.assert_close(pick(sn.extract(cfg)(x)), pick(sn(x)))
    return sn


def test_weight_sharing_works():
    sn = _refused_or_correct(_SharedTwice(), torch.randn(3, 8))
    assert sn is not None and list(sn.search_space.dims) == ["fc1.width"]


@pytest.mark.parametrize("make", [_BufferScale, _ParamShift])
def test_a_per_channel_tensor_on_a_hidden_dim_keeps_it_fixed(make):
    assert _refused_or_correct(make(), torch.randn(3, 8)) is None  # the only dim is left fixed: nothing elastic


def test_a_branch_the_example_does_not_take_is_refused_naming_the_module():
    model = _Branch()
    with pytest.raises(UnsupportedModelError, match=r"`alt` \(Linear\) never ran on the example input"):
        SupernetModule(model, F.mse_loss, example_input=torch.randn(3, 8))
    assert _refused_or_correct(model, torch.randn(3, 8)) is None


def test_a_dataclass_output_is_traced_and_extracted():
    sn = _refused_or_correct(_DataclassOut(), torch.randn(3, 8), pick=lambda o: o.y)
    assert sn is not None and list(sn.search_space.dims) == ["fc1.width"]


# -- defect 7: a failed construction rolls back; a wrapped model is named as such ---------------------------------
def test_failed_construction_leaves_the_model_exactly_as_it_was():
    model = TinyViT(dim=32, depth=3, num_heads=2)
    model.blocks[1].norm1.eval()
    classes, modes = _classes(model), _modes(model)
    with pytest.raises(ValueError, match="eval_subnets"):  # fails after the modules became elastic
        SupernetModule(model, F.cross_entropy, example_input=torch.randn(2, 1, 8, 8), eval_subnets=("tiniest",))
    assert _classes(model) == classes and _modes(model) == modes
    assert not any(hasattr(m, "active_out_features") or hasattr(m, "skipped") for m in model.modules())
    SupernetModule(model, F.cross_entropy, example_input=torch.randn(2, 1, 8, 8))  # and can be wrapped after


def test_wrapping_an_already_wrapped_model_says_so():
    sn = _vit12()
    with pytest.raises(ArgumentError, match=r"`model` is already elastic"):
        SupernetModule(sn.model, F.cross_entropy, example_input=torch.randn(1, 1, 8, 8))


# -- defect 8: per-module modes and the device survive every call --------------------------------------------------
def test_per_module_modes_survive_cost_latency_extract_and_construction():
    from lightning_supernet.cost import measure_latency

    model = TinyViT(dim=32, depth=4, num_heads=2)
    model.blocks[0].norm1.eval()   # a user's deliberate mix
    model.blocks[2].mlp.eval()
    modes = _modes(model)
    sn = SupernetModule(model, F.cross_entropy, example_input=torch.randn(2, 1, 8, 8))
    assert _modes(model) == modes
    cfg = sn.search_space.smallest()
    sn.cost(cfg)
    sn.extract(cfg)
    with sn.subnet(cfg):
        measure_latency(sn.model, torch.randn(2, 1, 8, 8), repeats=1, warmup=0)
    assert _modes(model) == modes
    assert next(model.parameters()).device.type == "cpu"


# -- defect 9: the space= argument ---------------------------------------------------------------------------------
@pytest.mark.parametrize("space,pattern", [
    ({"exclude": ["blocks.*.attn.head"]}, r"`space\['exclude'\]` pattern 'blocks\.\*\.attn\.head' matches no dim"),
    ({"choices": {"blocks.*.mlp.fc.width": [16]}}, r"`space\['choices'\]` pattern .* matches no dim; did you mean"),
    ({"choices": {"*.fc1.width": []}}, r"`space\['choices'\]\['\*\.fc1\.width'\]` is empty"),
    ({"choices": {"*.fc1.width": [64, 64]}}, r"repeats a value: \[64, 64\]"),
    ({"choices": {"*.fc1.width": [16.0, 32]}}, r"must be ints \(widths or head counts\), got \[16\.0, 32\]"),
    ({"choices": {"*.fc1.width": "64"}}, r"`space\[\"choices'\]\['\*\.fc1\.width'\"\]` must be a list of ints|must be a list of ints"),
    ({"min_depth": 20}, r"`space\['min_depth'\]` is 20 blocks but stack `blocks` has 12"),
    ({"min_depth": 1.5}, r"`space\['min_depth'\]` must be a fraction in \[0, 1\] of each stack's length or an int"),
    ({"exclude": "blocks.0.*"}, r"`space\['exclude'\]` must be a list of fnmatch patterns.*HINT: \['blocks\.0\.\*'\]"),
    ({"elastic": "width"}, r"`space\['elastic'\]` must be a list among width, heads, depth, got 'width'"),
    ({"width_ratios": 0.5}, r"`space\['width_ratios'\]` must be fractions in \(0, 1\], got 0\.5"),
    ({"residual": "yes"}, r"`space\['residual'\]` must be True or False"),
])
def test_bad_space_options_name_the_option_the_value_and_what_is_allowed(space, pattern):
    model = TinyViT(dim=32, depth=12, num_heads=2)
    classes = _classes(model)
    with pytest.raises(SearchSpaceError, match=pattern):
        SupernetModule(model, F.cross_entropy, example_input=torch.randn(1, 1, 8, 8), space=space)
    assert _classes(model) == classes


# -- depth: a residual written by the caller -------------------------------------------------------------------------
class _ParentResidual(nn.Module):
    """``for layer in self.layers: h = h + drop(layer(h))``: the layers hold no residual of their own."""

    def __init__(self, depth: int = 12) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
                                    for _ in range(depth))
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.layers:
            h = h + self.drop(layer(h))
        return self.head(h)


def test_blocks_whose_caller_adds_the_residual_are_skippable():
    x = torch.randn(3, 16)
    sn = SupernetModule(_ParentResidual(), F.cross_entropy, example_input=x)
    assert sn.search_space.stack_blocks("layers") == [f"layers.{i}.keep" for i in range(12)]
    for cfg in (sn.search_space.smallest(), sn.search_space.sample(4)):
        small = sn.extract(cfg)
        assert len(small.layers) == sum(cfg[f"layers.{i}.keep"] for i in range(12))
        with sn.subnet(cfg), torch.no_grad():
            torch.testing.assert_close(small(x), sn(x))
    # the skipped layers really contribute nothing: equal to the model run with those layers removed by hand
    cfg = sn.search_space.smallest()
    manual = _ParentResidual()
    manual.load_state_dict(sn.state_dict())
    manual.layers = nn.ModuleList(manual.layers[i] for i in range(12) if cfg[f"layers.{i}.keep"])
    with sn.subnet(sn.search_space.config({n: v for n, v in cfg.items() if n.endswith(".keep")})), torch.no_grad():
        torch.testing.assert_close(sn(x), manual(x))
