"""The contract every elastic op passes (one parametrised suite, in the spirit of Optuna's sampler tests).

For each op: at the full config it is the dense layer bit for bit; under an active config it equals a dense
layer built by hand from the active rows/columns (an independent reference, not ``slice_dim``); the exported
layer equals the sliced one; gradients land only in the active slice; ``state_dict`` keys are unchanged;
prefix slices are views of the full weights; the module survives ``pickle`` and ``copy.deepcopy``.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from lightning_supernet.elastic import (
    ElasticConv1D,
    ElasticMultiheadAttention,
    ElasticBatchNorm,
    ElasticConv2d,
    ElasticLayerNorm,
    ElasticLinear,
    is_elastic,
    make_elastic,
    original_class,
    restore,
)


@dataclass
class Case:
    """One elastic op under test.

    Attributes:
        dense: builds the full dense layer. small: builds the dense layer of the active shape (the reference).
        mixin / state: what ``make_elastic`` gets. active: the elastic attributes of the tested subnet.
        index: tensor name -> per-dim indices of the active region (``None``: the whole dim).
        full_shape / active_shape: input shapes for the full layer and for the active subnet.
        size_attrs: constructor attributes the exported layer must have (e.g. ``{"out_features": 6}``).
        view_active: a config whose every sliced tensor is a prefix (so a view) for the view test.
        copies: tensors sliced in several blocks, so copied once per forward (MoE ``gate_up_proj``).
    """

    name: str
    dense: Callable[[], nn.Module]
    small: Callable[[], nn.Module]
    mixin: type
    active: dict[str, Any]
    index: dict[str, tuple]
    full_shape: tuple[int, ...]
    active_shape: tuple[int, ...]
    size_attrs: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    view_active: dict[str, Any] | None = None
    copies: tuple[str, ...] = ()  # tensors whose slice is one copy by design (a dim of several blocks)

    def __str__(self) -> str:
        return self.name


def _rows(*ranges: range) -> list[int]:
    return [i for r in ranges for i in r]


CASES = [
    Case("linear", lambda: nn.Linear(12, 10), lambda: nn.Linear(8, 6), ElasticLinear,
         active={"active_in_features": 8, "active_out_features": 6},
         index={"weight": (range(6), range(8)), "bias": (range(6),)},
         full_shape=(3, 12), active_shape=(3, 8), size_attrs={"in_features": 8, "out_features": 6}),
    # fused q/k/v: 3 blocks of 8 rows ([3][heads][head_dim] with 4 heads of 2); 2 heads keep rows 0-3, 8-11, 16-19
    Case("fused_qkv_linear", lambda: nn.Linear(8, 24), lambda: nn.Linear(8, 12), ElasticLinear,
         state={"out_blocks": 3}, active={"active_out_features": 4},
         index={"weight": (_rows(range(4), range(8, 12), range(16, 20)), None),
                "bias": (_rows(range(4), range(8, 12), range(16, 20)),)},
         full_shape=(2, 5, 8), active_shape=(2, 5, 8), size_attrs={"in_features": 8, "out_features": 12},
         view_active={"active_in_features": 6}),
    Case("conv2d", lambda: nn.Conv2d(6, 8, 3, padding=1), lambda: nn.Conv2d(4, 5, 3, padding=1), ElasticConv2d,
         active={"active_in_channels": 4, "active_out_channels": 5},
         index={"weight": (range(5), range(4), None, None), "bias": (range(5),)},
         full_shape=(2, 6, 7, 7), active_shape=(2, 4, 7, 7), size_attrs={"in_channels": 4, "out_channels": 5}),
    Case("depthwise_conv2d", lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8),
         lambda: nn.Conv2d(5, 5, 3, padding=1, groups=5), ElasticConv2d,
         active={"active_out_channels": 5},
         index={"weight": (range(5), None, None, None), "bias": (range(5),)},
         full_shape=(2, 8, 6, 6), active_shape=(2, 5, 6, 6),
         size_attrs={"in_channels": 5, "out_channels": 5, "groups": 5}),
    Case("batchnorm2d", lambda: nn.BatchNorm2d(8), lambda: nn.BatchNorm2d(5), ElasticBatchNorm,
         active={"active_num_features": 5},
         index={"weight": (range(5),), "bias": (range(5),), "running_mean": (range(5),),
                "running_var": (range(5),)},
         full_shape=(4, 8, 3, 3), active_shape=(4, 5, 3, 3), size_attrs={"num_features": 5}),
    Case("layernorm", lambda: nn.LayerNorm(8), lambda: nn.LayerNorm(5), ElasticLayerNorm,
         active={"active_num_features": 5},
         index={"weight": (range(5),), "bias": (range(5),)},
         full_shape=(2, 3, 8), active_shape=(2, 3, 5), size_attrs={"normalized_shape": (5,)}),
    # grouped (ResNeXt/RegNet): 4 groups of 3 channels; 2 groups keep channels 0-5 and the weight's first 6 rows
    Case("grouped_conv2d", lambda: nn.Conv2d(12, 12, 3, padding=1, groups=4),
         lambda: nn.Conv2d(6, 6, 3, padding=1, groups=2), ElasticConv2d,
         active={"active_out_channels": 6},
         index={"weight": (range(6), None, None, None), "bias": (range(6),)},
         full_shape=(2, 12, 5, 5), active_shape=(2, 6, 5, 5),
         size_attrs={"in_channels": 6, "out_channels": 6, "groups": 2}),
    Case("batchnorm1d", lambda: nn.BatchNorm1d(8), lambda: nn.BatchNorm1d(5), ElasticBatchNorm,
         active={"active_num_features": 5},
         index={"weight": (range(5),), "bias": (range(5),), "running_mean": (range(5),),
                "running_var": (range(5),)},
         full_shape=(4, 8), active_shape=(4, 5), size_attrs={"num_features": 5}),
    Case("sync_batchnorm", lambda: nn.SyncBatchNorm(8), lambda: nn.SyncBatchNorm(5), ElasticBatchNorm,
         active={"active_num_features": 5},
         index={"weight": (range(5),), "bias": (range(5),), "running_mean": (range(5),),
                "running_var": (range(5),)},
         full_shape=(4, 8, 3, 3), active_shape=(4, 5, 3, 3), size_attrs={"num_features": 5}),
]


def _conv1d_case() -> Case | None:
    """GPT-2's ``Conv1D`` (weight ``[in, out]``): only when ``transformers`` is installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Case("hf_conv1d", lambda: Conv1D(10, 12), lambda: Conv1D(6, 8), ElasticConv1D,
                active={"active_in_features": 8, "active_out_features": 6},
                index={"weight": (range(8), range(6)), "bias": (range(6),)},
                full_shape=(3, 12), active_shape=(3, 8), size_attrs={"nx": 8, "nf": 6})


def _batchnorm_act_case() -> Case | None:
    """timm's ``BatchNormAct2d`` (BatchNorm, then its own activation): only when ``timm`` is installed."""
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return None
    from lightning_supernet.elastic import ElasticBatchNormAct

    return Case("timm_batchnorm_act2d", lambda: BatchNormAct2d(8, act_layer=nn.SiLU),
                lambda: BatchNormAct2d(5, act_layer=nn.SiLU), ElasticBatchNormAct,
                active={"active_num_features": 5},
                index={"weight": (range(5),), "bias": (range(5),), "running_mean": (range(5),),
                       "running_var": (range(5),)},
                full_shape=(4, 8, 3, 3), active_shape=(4, 5, 3, 3), size_attrs={"num_features": 5})


def _timm_linear_case() -> Case | None:
    """timm's ``Linear`` (an ``nn.Linear`` with a TorchScript cast): only when ``timm`` is installed."""
    try:
        from timm.layers import Linear
    except ImportError:
        return None
    return Case("timm_linear", lambda: Linear(12, 10), lambda: Linear(8, 6), ElasticLinear,
                active={"active_in_features": 8, "active_out_features": 6},
                index={"weight": (range(6), range(8)), "bias": (range(6),)},
                full_shape=(3, 12), active_shape=(3, 8), size_attrs={"in_features": 8, "out_features": 6})



try:
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    class RoutedExperts(MixtralExperts):
        """Mixtral's experts with a fixed routing (every token to experts 0 and 2): callable on one tensor."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            idx = torch.tensor([0, 2]).expand(x.shape[0], 2)
            weights = torch.tensor([0.7, 0.3]).expand(x.shape[0], 2)
            return super().forward(x, idx, weights)
except ImportError:
    RoutedExperts = None


def _experts_case() -> Case | None:
    """Mixtral's experts (3-D ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``): only with ``transformers``.
    A fixed routing (every token to experts 0 and 2) makes the module callable on one tensor."""
    if RoutedExperts is None:
        return None
    from transformers import MixtralConfig

    from lightning_supernet.elastic.moe import ElasticExperts

    def build(inter: int) -> nn.Module:
        return RoutedExperts(MixtralConfig(hidden_size=8, intermediate_size=inter, num_local_experts=3))

    return Case("mixtral_experts", lambda: build(6), lambda: build(4), ElasticExperts,
                active={"active_intermediate": 4},
                index={"gate_up_proj": (None, _rows(range(4), range(6, 10)), None),
                       "down_proj": (None, None, range(4))},
                full_shape=(5, 8), active_shape=(5, 8), size_attrs={"intermediate_dim": 4},
                copies=("gate_up_proj",))  # two blocks (gate, up): its slice is one copy; down_proj's a view


CASES += [c for c in (_conv1d_case(), _batchnorm_act_case(), _timm_linear_case(), _experts_case())
          if c is not None]


def test_every_registered_op_has_a_contract_case():
    """A new op is one file plus its case here: this fails until the case is written."""
    from lightning_supernet.ops import registered_ops

    covered = {c.mixin for c in CASES} | {ElasticMultiheadAttention}  # MHA: tests/test_elastic_attention.py
    missing = [op.name for op in registered_ops() if op.mixin not in covered]
    assert not missing, f"ops without a contract case: {missing}"


@pytest.fixture(params=CASES, ids=str)
def case(request) -> Case:
    return request.param


def _dense(case: Case) -> nn.Module:
    """The dense layer with random parameters and (for BatchNorm) random running statistics."""
    torch.manual_seed(0)
    layer = case.dense()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 and "Norm" in type(layer).__name__ else 0.0))
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    return layer


def _elastic(case: Case, active: dict[str, Any] | None = None) -> nn.Module:
    layer = _dense(case)
    make_elastic(layer, case.mixin, **case.state)
    for key, value in (case.active if active is None else active).items():
        setattr(layer, key, value)
    return layer


def _select(t: torch.Tensor, index: tuple) -> torch.Tensor:
    for dim, idx in enumerate(index):
        if idx is not None:
            t = t.index_select(dim, torch.as_tensor(list(idx), dtype=torch.long))
    return t


def _mask(t: torch.Tensor, index: tuple) -> torch.Tensor:
    """Boolean mask of the active region of ``t``."""
    mask = torch.ones_like(t, dtype=torch.bool)
    for dim, idx in enumerate(index):
        if idx is None:
            continue
        keep = torch.zeros(t.shape[dim], dtype=torch.bool)
        keep[list(idx)] = True
        shape = [1] * t.dim()
        shape[dim] = -1
        mask &= keep.view(shape)
    return mask


def _reference(case: Case) -> nn.Module:
    """A dense layer of the active shape holding the active region of the full layer's tensors."""
    full = _dense(case)
    small = case.small()
    tensors = dict(full.named_parameters()) | dict(full.named_buffers())
    with torch.no_grad():
        for name, t in list(small.named_parameters()) + list(small.named_buffers()):
            if name in case.index:
                t.copy_(_select(tensors[name], case.index[name]))
            elif t.dim() > 0:
                raise AssertionError(f"case {case.name} gives no index for `{name}`")
    return small


def _inputs(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_max_config_equals_dense_bit_for_bit(case, training):
    dense, elastic = _dense(case).train(training), _elastic(case, active={}).train(training)
    x = _inputs(case.full_shape)
    assert torch.equal(elastic(x), dense(x))
    for (name, a), (_, b) in zip(elastic.named_buffers(), dense.named_buffers(), strict=True):
        assert torch.equal(a, b), name  # BatchNorm's running statistics updated alike


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_active_config_equals_dense_layer_of_the_active_shape(case, training):
    elastic, small = _elastic(case).train(training), _reference(case).train(training)
    before = {n: b.clone() for n, b in elastic.named_buffers()}
    x = _inputs(case.active_shape)
    out, ref = elastic(x), small(x)  # one call each: in training BatchNorm updates its statistics per call
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    # running statistics: the active channels move like the small layer's, the others do not move at all
    small_buffers = dict(small.named_buffers())
    for name, buf in elastic.named_buffers():
        if name not in case.index:
            continue
        mask = _mask(buf, case.index[name])
        torch.testing.assert_close(buf[mask], small_buffers[name].flatten())
        assert torch.equal(buf[~mask], before[name][~mask]), name
        if training:
            assert not torch.equal(buf[mask], before[name][mask]), f"{name} was not updated in training"


def test_exported_layer_equals_the_sliced_one(case):
    elastic = _elastic(case).eval()
    x = _inputs(case.active_shape)
    exported = copy.deepcopy(elastic)
    sizes = exported.export_()
    restore(exported)
    assert type(exported) is original_class(elastic) is type(case.dense())
    assert not is_elastic(exported)
    for attr, value in case.size_attrs.items():
        assert getattr(exported, attr) == value, attr
        if attr in sizes:
            assert sizes[attr] == (value[0] if isinstance(value, tuple) else value)
    assert torch.equal(exported(x), elastic(x))
    # physically small: same tensors and shapes as the hand-built reference, in fresh contiguous storage
    reference = _reference(case).state_dict()
    state = exported.state_dict()
    assert list(state) == list(reference)
    full_ptrs = {t.untyped_storage().data_ptr() for t in elastic.state_dict().values()}
    for key, value in state.items():
        assert value.shape == reference[key].shape, key
        assert torch.equal(value, reference[key]), key
        if value.dim() > 0:
            assert value.is_contiguous() and value.untyped_storage().data_ptr() not in full_ptrs, key


def test_gradients_only_in_the_active_slice(case):
    elastic, small = _elastic(case).train(), _reference(case).train()
    x = _inputs(case.active_shape)
    out, ref = elastic(x), small(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    small_grads = dict(small.named_parameters())
    checked = 0
    for name, p in elastic.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        mask = _mask(p, case.index[name])
        assert mask.any() and not mask.all(), f"{name}: the active slice must be a strict part"
        assert torch.count_nonzero(p.grad[~mask]) == 0, f"{name}: gradient outside the active slice"
        assert torch.count_nonzero(p.grad[mask]) > 0, f"{name}: no gradient in the active slice"
        torch.testing.assert_close(p.grad[mask], small_grads[name].grad.flatten())
        checked += 1
    assert checked == len(list(small.parameters())) > 0


def test_state_dict_keys_unchanged_by_make_elastic(case):
    dense = _dense(case)
    before = dense.state_dict()
    keys, shapes = list(before), {k: v.shape for k, v in before.items()}
    values = {k: v.clone() for k, v in before.items()}
    layer = _dense(case)
    make_elastic(layer, case.mixin, **case.state)
    for key, value in case.active.items():
        setattr(layer, key, value)
    after = layer.state_dict()
    assert list(after) == keys
    assert {k: v.shape for k, v in after.items()} == shapes
    for key, value in after.items():
        assert torch.equal(value, values[key]), key
    assert [n for n, _ in layer.named_parameters()] == [n for n, _ in dense.named_parameters()]
    # the dense layer's checkpoint loads strictly into the elastic one and back
    layer.load_state_dict(before, strict=True)
    dense.load_state_dict(layer.state_dict(), strict=True)


def test_prefix_slices_are_views_not_copies(case):
    active = case.view_active or case.active
    layer = _elastic(case, active=active)
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    checked = 0
    for name, t in tensors.items():
        if t is None or t.dim() == 0 or name in case.copies:
            continue
        sliced = layer.active_tensor(name, t)
        assert sliced.untyped_storage().data_ptr() == t.untyped_storage().data_ptr(), f"{name} was copied"
        assert sliced.data_ptr() == t.data_ptr(), name
        if sliced.shape != t.shape:
            checked += 1
    assert checked > 0, "the config must slice at least one tensor"
    # writes through the parameter are seen by the next forward: the op holds no copy of its own
    x = _inputs(case.full_shape if not active else _active_shape(case, active))
    before = layer(x)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(2)
    assert not torch.allclose(layer(x), before)


def _active_shape(case: Case, active: dict[str, Any]) -> tuple[int, ...]:
    if active == case.active:
        return case.active_shape
    # fused qkv with only its input sliced: 6 of 8 input features
    return (*case.full_shape[:-1], active["active_in_features"])


def test_pickle_and_deepcopy_keep_the_elastic_module(case):
    layer = _elastic(case).eval()
    x = _inputs(case.active_shape)
    expected = layer(x)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert type(clone) is type(layer)
        assert is_elastic(clone) and isinstance(clone, type(case.dense()))
        for key, value in {**case.active, **case.state}.items():
            assert getattr(clone, key) == value, key
        assert torch.equal(clone(x), expected)
        ptrs = {p.data_ptr() for p in layer.parameters()}
        assert not ptrs & {p.data_ptr() for p in clone.parameters()}, "the clone shares storage"
    # torch.save of the whole module goes through pickle as well
    import io

    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(layer) and torch.equal(loaded(x), expected)


def test_restore_gives_back_the_dense_layer(case):
    layer = _elastic(case).eval()
    restore(layer)
    assert type(layer) is type(case.dense())
    assert not any(hasattr(layer, key) for key in case.active)
    x = _inputs(case.full_shape)
    assert torch.equal(layer(x), _dense(case).eval()(x))
