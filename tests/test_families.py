"""End-to-end checks on the five model families: discovery, the full model unchanged, extraction and cost.

For each family the supernet is built once (module-scoped); every check compares numbers: outputs against the
original model or the extracted subnet, parameter counts and MACs against the physical subnet.
"""

from __future__ import annotations

import pytest
import torch

from lightning_supernet.cost import count_macs, count_params
from lightning_supernet.elastic import is_elastic

NUM_RANDOM = 10


@pytest.fixture(scope="module")
def wrapped(family):
    """``(family, supernet, reference output, full params, original state)``, the reference taken before wrapping."""
    reference = family.run(family.model)
    full_params = count_params(family.model)
    original_class = type(family.model)
    original_types = {type(m) for m in family.model.modules()}
    state = {k: v.clone() for k, v in family.model.state_dict().items()}
    supernet = family.supernet()
    supernet.eval()
    return family, supernet, reference, full_params, (original_class, original_types), state


def _configs(space):
    """Largest, smallest and ``NUM_RANDOM`` random configs, labelled."""
    configs = [("largest", space.largest()), ("smallest", space.smallest())]
    configs += [(f"sample({seed})", space.sample(seed)) for seed in range(NUM_RANDOM)]
    return configs


def test_discovery_finds_depth_width_and_heads(wrapped):
    family, supernet, *_ = wrapped
    dims = supernet.search_space.dims

    keep = {n for n, d in dims.items() if d.kind == "depth"}
    assert keep == family.keep_dims

    widths = {n: d for n, d in dims.items() if d.kind == "width"}
    assert family.width_dims, "the family must expect at least one width dim"
    groups = {w.name: w for w in supernet.discovery.widths}
    for name, (size, members) in family.width_dims.items():
        assert name in widths, f"width dim {name} not discovered; found {sorted(widths)}"
        assert widths[name].largest == size
        assert len(widths[name].choices) > 1
        assert members <= set(groups[name].members), f"{name} couples {groups[name].members}, expected {members}"

    heads = {n: d for n, d in dims.items() if d.kind == "heads"}
    assert set(heads) == set(family.head_dims)
    for name, full in family.head_dims.items():
        assert heads[name].largest == full
        assert len(heads[name].choices) > 1
        assert all(h % family.head_multiple == 0 for h in heads[name].choices), heads[name].choices

    # each dim inside a skippable block is attributed to it (a skipped block makes its widths irrelevant)
    blocks = [k[: -len(".keep")] for k in family.keep_dims]
    for name in list(family.width_dims) + list(family.head_dims):
        expected = next((b for b in blocks if name.startswith(b + ".")), None)
        assert dims[name].block == expected, name


def test_largest_config_equals_original_model(wrapped):
    family, supernet, reference, full_params, _, state = wrapped
    assert supernet.active_config == supernet.search_space.largest()
    out = family.run(supernet)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert supernet.cost()["params"] == full_params
    # wrapping changed no parameter or buffer
    after = supernet.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert torch.equal(after[key], value), key


def test_extract_matches_supernet_and_cost(wrapped):
    family, supernet, reference, full_params, (original_class, original_types), _ = wrapped
    space = supernet.search_space
    supernet_ptrs = {p.data_ptr() for p in supernet.parameters()}
    configs = _configs(space)
    assert len({c for _, c in configs}) >= 6, "random configs should differ"
    param_counts = {}
    for label, cfg in configs:
        with supernet.subnet(cfg):
            expected = family.run(supernet)
        cost = supernet.cost(cfg)
        small = supernet.extract(cfg).eval()
        assert type(small) is original_class, label
        # every module got its own class back: no elastic mixin left in the exported copy
        assert {type(m) for m in small.modules()} <= original_types, label
        assert not any(is_elastic(m) for m in small.modules()), label
        torch.testing.assert_close(family.run(small), expected, msg=lambda m, label=label: f"{label}: {m}")
        assert count_params(small) == cost["params"], label
        assert count_macs(small, family.example) == cost["macs"], label
        # the subnet is a standalone copy: it shares no storage with the supernet
        assert not supernet_ptrs & {p.data_ptr() for p in small.parameters()}, label
        # blocks marked skipped are physically gone
        kept = sum(bool(cfg[n]) for n in family.keep_dims)
        small_keep = _count_blocks(small, family.keep_dims)
        big_keep = _count_blocks(family.model, family.keep_dims)
        assert small_keep == big_keep - (len(family.keep_dims) - kept), label
        param_counts[label] = cost["params"]
    # extracting left the supernet as it was
    assert supernet.active_config == space.largest()
    torch.testing.assert_close(family.run(supernet), reference, rtol=0, atol=0)
    assert param_counts["largest"] == full_params
    assert param_counts["smallest"] <= 0.5 * full_params, (param_counts["smallest"], full_params)
    assert all(param_counts["smallest"] <= n <= full_params for n in param_counts.values())


def test_cost_macs_shrink_with_the_subnet(wrapped):
    family, supernet, *_ = wrapped
    space = supernet.search_space
    big, small = supernet.cost(space.largest()), supernet.cost(space.smallest())
    assert big["macs"] == count_macs(family.model, family.example)
    assert 0 < small["macs"] < big["macs"]


def test_extracted_subnet_keeps_the_active_head_count(wrapped):
    family, supernet, *_ = wrapped
    if not family.head_dims:
        pytest.skip("the CNN family has no attention heads")
    space = supernet.search_space
    cfg = space.config({n: min(space.dims[n].choices) for n in family.head_dims})
    small = supernet.extract(cfg).eval()
    assert count_params(small) < count_params(family.model)
    assert len(supernet.discovery.heads) == len(family.head_dims)
    for group in supernet.discovery.heads:  # no block is skipped, so the paths are the same in the copy
        spec, heads = group.spec, cfg[group.name]
        assert heads < spec.num_heads
        anchor = small.get_submodule(group.path)
        assert anchor.get_submodule(spec.o).in_features == heads * spec.head_dim
        q = anchor.get_submodule(spec.qkv or spec.q)
        assert q.out_features == (3 if spec.qkv else 1) * heads * spec.head_dim
        if spec.k:
            assert anchor.get_submodule(spec.k).out_features == heads // spec.kv_group * spec.head_dim
        for path, attr in spec.head_attrs:
            assert getattr(anchor.get_submodule(path) if path else anchor, attr) == heads, (group.path, attr)
        for path, attr in spec.kv_attrs:
            assert getattr(anchor.get_submodule(path) if path else anchor, attr) == heads // spec.kv_group
    # the copy runs on its own, on another batch too
    other = _other_example(family)
    with supernet.subnet(cfg):
        expected = family.run(supernet, other)
    torch.testing.assert_close(family.run(small, other), expected)


def _other_example(family):
    ex = family.example
    if isinstance(ex, dict):
        ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(1))
        return {**ex, "input_ids": ids, **({"attention_mask": torch.ones_like(ids)} if "attention_mask" in ex else {})}
    return torch.randn(ex.shape, generator=torch.Generator().manual_seed(1))


def _count_blocks(model, keep_dims) -> int:
    """Children of the stacks the keep dims live in."""
    stacks = {name.rsplit(".", 2)[0] for name in keep_dims}
    return sum(len(model.get_submodule(s)) for s in stacks)


def test_random_configs_are_valid_and_varied(wrapped):
    family, supernet, *_ = wrapped
    space = supernet.search_space
    samples = [space.sample(seed) for seed in range(NUM_RANDOM)]
    for cfg in samples:
        assert space.validate(cfg.to_dict()) == cfg
    varied = [n for n in space.dims if len({c[n] for c in samples}) > 1]
    assert len(varied) >= len(space.dims) // 2, varied
    assert any(not c[n] for c in samples for n in family.keep_dims), "no sample skips a block"
