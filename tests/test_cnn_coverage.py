"""CNN patterns on real torchvision/timm models: each checked by the contract in all four modes.

For each model: the supernet under the smallest and two random configs computes what ``extract(cfg)`` computes, in
eval mode with autograd on, under ``torch.no_grad()``, under ``torch.inference_mode()`` and in train mode (same
RNG, BatchNorm on batch statistics); ``cost(cfg)`` params equal the extracted model's; prioritization leaves the
full model's function unchanged; the smallest subnet has at most half the params. Models are built from their
configs (no weights), on 2×3×64×64 inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_supernet import SupernetModule
from lightning_supernet.cost import count_params
from lightning_supernet.ir.channels import Layout, back_through, through
from lightning_supernet.prioritize import magnitude_importance, reorder

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _trained_looking(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters away from their init, so eval outputs depend on them."""
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            if mod.weight is not None:
                mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.data.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
    return model.eval()


def _agree(sn: SupernetModule, cfg, x: torch.Tensor) -> None:
    small = sn.extract(cfg)
    assert sn.cost(cfg)["params"] == count_params(small)
    for train in (False, True):
        small.train(train)
        sn.model.train(train)
        contexts = (torch.enable_grad,) if train else (torch.enable_grad, torch.no_grad, torch.inference_mode)
        for ctx in contexts:
            torch.manual_seed(0)
            with ctx():
                expected = small(x)
            torch.manual_seed(0)
            with sn.subnet(cfg), ctx():
                got = sn(x)
            torch.testing.assert_close(got.clone(), expected.clone(), atol=1e-4, rtol=1e-4)
    sn.model.eval()


def contract(model: nn.Module, x: torch.Tensor = X, max_ratio: float = 0.5) -> SupernetModule:
    """Wrap ``model`` and check the contract (see the module docstring); returns the supernet."""
    model = _trained_looking(model)
    with torch.no_grad():
        original = model(x)
    sn = SupernetModule(model, F.cross_entropy, example_input=x).eval()
    space = sn.search_space
    with torch.no_grad():
        torch.testing.assert_close(sn(x), original)  # the largest subnet is the original model
        reorder(sn, magnitude_importance(sn))
        torch.testing.assert_close(sn(x), original, atol=1e-4, rtol=1e-4)  # function-preserving
    for cfg in (space.smallest(), space.sample(torch.Generator().manual_seed(0)),
                space.sample(torch.Generator().manual_seed(1))):
        _agree(sn, cfg, x)
    ratio = sn.cost(space.smallest())["params"] / count_params(sn.model)
    assert ratio <= max_ratio, (ratio, str(space))
    return sn


def _plain_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.2), nn.Flatten(), nn.Linear(32 * 16 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def test_flatten_before_a_linear_follows_the_channels() -> None:
    sn = contract(_plain_cnn())
    dims = sn.search_space.dims
    assert {"0.width", "4.width", "10.width"} <= set(dims)  # both conv widths: pooling and flatten keep them
    w = next(w for w in sn.discovery.widths if w.name == "4.width")
    assert w.consumers == ("10",) and w.scale("10") == 16 * 16  # 256 features a channel after flatten
    small = sn.extract(sn.search_space.config({"4.width": 8}))
    assert small[4].out_channels == 8 and small[5].num_features == 8 and small[10].in_features == 8 * 256
    assert set(sn.search_space.frozen) == {"0.in", "12.out"}  # only the model's input and output stay fixed


def test_the_last_channels_before_global_pooling_are_elastic_efficientnet_se() -> None:
    sn = contract(torchvision.models.efficientnet_b0(num_classes=10))
    dims = sn.search_space.dims
    assert "features.8.0.width" in dims  # the head conv before avgpool -> flatten -> classifier
    # expansion, depthwise, squeeze-and-excitation and projection read and write one group of channels
    w = next(w for w in sn.discovery.widths if w.name == "features.2.0.block.0.0.width")
    assert w.producers == ("features.2.0.block.0.0", "features.2.0.block.2.fc2")
    assert w.consumers == ("features.2.0.block.2.fc1", "features.2.0.block.3.0")
    assert "features.2.0.block.1.0" in w.channelwise  # the depthwise conv
    small = sn.extract(sn.search_space.config({"features.8.0.width": 640}))
    assert small.classifier[1].in_features == 640 and small.features[8][0].out_channels == 640


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "regnet_y_400mf", "mnasnet0_5"])
def test_squeeze_excitation_and_pooled_heads(name: str) -> None:
    contract(torchvision.models.get_model(name, num_classes=10))


def test_shufflenet_head_is_elastic_and_the_shuffle_is_left_fixed_in_words() -> None:
    sn = contract(torchvision.models.shufflenet_v2_x0_5(num_classes=10))
    assert "conv5.0.width" in sn.search_space.dims
    reasons = " ".join(sn.search_space.frozen.values())
    assert "channel shuffle" in reasons
    assert "Backward" not in reasons  # words, not autograd node names


def test_concatenated_branches_keep_their_own_widths_squeezenet() -> None:
    sn = contract(torchvision.models.squeezenet1_0(num_classes=10))
    dims = sn.search_space.dims
    # Fire modules: expand1x1 and expand3x3 are concatenated; each branch is its own dim, read as one segment of
    # the next squeeze conv's input
    assert {"features.3.expand1x1.width", "features.3.expand3x3.width"} <= set(dims)
    e1 = next(w for w in sn.discovery.widths if w.name == "features.3.expand1x1.width")
    e3 = next(w for w in sn.discovery.widths if w.name == "features.3.expand3x3.width")
    assert e1.offset("features.4.squeeze") == 0 and e3.offset("features.4.squeeze") == 64
    small = sn.extract(sn.search_space.config({"features.3.expand1x1.width": 16, "features.3.expand3x3.width": 32}))
    assert small.features[4].squeeze.in_channels == 48
    full = sn.model.features[4].squeeze.weight
    kept = torch.cat([full[:, :16], full[:, 64:96]], 1)  # the first 16 of branch 1, the first 32 of branch 2
    torch.testing.assert_close(small.features[4].squeeze.weight, kept)


def test_inception_branches_are_their_own_dims_googlenet() -> None:
    model = torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=False)
    sn = contract(model)
    dims = sn.search_space.dims
    assert {"inception5b.branch1.conv.width", "inception5b.branch4.1.conv.width"} <= set(dims)  # before the fc
    w = next(w for w in sn.discovery.widths if w.name == "inception5b.branch4.1.conv.width")
    assert w.offset("fc") == 384 + 384 + 128 and w.channelwise == ("inception5b.branch4.1.bn",)


def test_a_reduction_over_channels_freezes_the_producer() -> None:
    class SpatialGate(nn.Module):  # CBAM-style: the gate is a mean over the channels
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.gate = nn.Conv2d(1, 1, 3, padding=1)
            self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.bn(self.conv(x))
            h = h * torch.sigmoid(self.gate(h.mean(1, keepdim=True)))
            return self.head(h.mean((2, 3)))

    sn = SupernetModule(SpatialGate().eval(), F.cross_entropy, example_input=X[:, :, :8, :8])
    assert list(sn.search_space.dims) == ["head.0.width"]  # slicing conv would change the mean over the channels
    assert "reduced over its channels" in sn.search_space.frozen["conv.out"]


def test_layouts_through_ops() -> None:
    x = torch.randn(2, 6, 4, 4, requires_grad=True) * 1
    pooled = F.adaptive_avg_pool2d(x, 1)
    assert through(pooled.grad_fn, 0, Layout(1)) == Layout(1)
    flat = pooled.flatten(1)
    assert through(flat.grad_fn, 0, Layout(1)) == Layout(1)
    assert through(x.flatten(1).grad_fn, 0, Layout(1)) == Layout(1, 16)
    assert back_through(x.flatten(1).grad_fn, Layout(1)) == [(0, Layout(1, 16))]
    assert through(x.permute(0, 2, 3, 1).grad_fn, 0, Layout(1)) == Layout(3)
    assert through(F.pad(x, (1, 1, 1, 1)).grad_fn, 0, Layout(1)) == Layout(1)
    assert through(F.interpolate(x, scale_factor=2).grad_fn, 0, Layout(1)) == Layout(1)
    shuffle = x.view(2, 2, 3, 4, 4).transpose(1, 2)
    assert "channel shuffle" in through(shuffle.grad_fn.next_functions[0][0], 0, Layout(1))
    cat = torch.cat([x, x * 2], 1).grad_fn  # each input is a segment of the result's channels
    assert through(cat, 1, Layout(1)) == Layout(1, 1, offset=6, span=6)
    assert back_through(cat, Layout(1)) == [(0, Layout(1, 1, 0, 6)), (1, Layout(1, 1, 6, 6))]
    assert "concatenated" in through(cat, 0, Layout(1, 16))  # after a flatten: not a segment of whole channels
    assert through(torch.cat([x, x], 2).grad_fn, 0, Layout(1)) == Layout(1)
    assert "reduced over its channels" in through(x.amax(1).grad_fn, 0, Layout(1))
    assert "channels" in through(x.chunk(2, 1)[0].grad_fn, 0, Layout(1))


# -- timm -------------------------------------------------------------------------------------------------------------
timm = pytest.importorskip("timm")


def test_timm_batchnorm_act_is_an_elastic_op_regnetx() -> None:
    from lightning_supernet.elastic import ElasticBatchNormAct

    sn = contract(timm.create_model("regnetx_002", pretrained=False, num_classes=10))
    assert isinstance(sn.model.stem.bn, ElasticBatchNormAct)  # timm's BatchNorm + activation module, sliced
    assert any(isinstance(sn.model.get_submodule(p), ElasticBatchNormAct) for w in sn.discovery.widths
               for p in w.channelwise if sn.search_space.dims.get(w.name))
    small = sn.extract(sn.search_space.smallest())
    assert type(small.stem.bn).__name__ == "BatchNormAct2d" and small.stem.bn.num_features < 32


def test_timm_edgenext_builds_and_its_cross_covariance_heads_stay_fixed_in_words() -> None:
    x = X[:, :, :32, :32]
    with pytest.warns(UserWarning, match=r"xca\.heads`: the subnet crashes in .*xca\.proj"):
        sn = contract(timm.create_model("edgenext_xx_small", pretrained=False, num_classes=10), x)
    assert not [n for n in sn.search_space.dims if n.endswith("xca.heads")]
    assert any(n.endswith("mlp.fc1.width") for n in sn.search_space.dims)


def test_timm_levit_extracts_after_an_eval_forward_with_autograd_on() -> None:
    model = timm.create_model("levit_128s", pretrained=False, num_classes=10, img_size=64).eval()
    sn = contract(model)
    assert sum(d.kind == "width" for d in sn.search_space.dims.values()) >= 10
    cfg = sn.search_space.smallest()
    sn.model.eval()  # LeViT empties its cache on train()/eval()
    with sn.subnet(cfg):
        expected = sn(X)  # eval mode, autograd on
    # with elastic heads (elastic/timm_attention.py) the biases are gathered on every call: nothing is cached;
    # timm's own forward would cache them as autograd results, so put one there as it would
    caches = [m for m in model.modules() if isinstance(getattr(m, "attention_bias_cache", None), dict)]
    assert caches and not any(m.attention_bias_cache for m in caches)
    caches[0].attention_bias_cache["cpu"] = caches[0].attention_biases[:, caches[0].attention_bias_idxs]
    assert caches[0].attention_bias_cache["cpu"].grad_fn is not None
    small = sn.extract(cfg)  # deep-copies the cache as detached tensors instead of failing
    torch.testing.assert_close(small(X), expected)


def test_timm_linear_classifier_follows_the_head_channels_mobilenetv3() -> None:
    sn = contract(timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10), max_ratio=0.3)
    assert "conv_head.width" in sn.search_space.dims  # conv_head -> act -> flatten -> timm's Linear classifier
    small = sn.extract(sn.search_space.config({"conv_head.width": 256}))
    assert small.classifier.in_features == 256 and type(small.classifier).__module__ == "timm.layers.linear"
