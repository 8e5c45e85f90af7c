"""SearchSpace and SubnetConfig: immutability, sampling, minimum depth, motifs, counting, printing."""

from __future__ import annotations

import itertools
import json
import pickle

import pytest
import torch
import torch.nn.functional as F

from lightning_supernet import SearchSpace, SubnetConfig, SupernetModule
from lightning_supernet.errors import SearchSpaceError
from lightning_supernet.models import TinyViT
from lightning_supernet.space import Dim


def _small_space(keep_prob: float = 0.5) -> SearchSpace:
    """A stack of 4 skippable blocks (at least 2 kept), each with a width; one width and one head dim outside."""
    dims = [Dim("stem.width", "width", (8, 16))]
    for i in range(4):
        dims += [Dim(f"blocks.{i}.keep", "depth", (True, False), stack="blocks"),
                 Dim(f"blocks.{i}.attn.heads", "heads", (2, 4), block=f"blocks.{i}"),
                 Dim(f"blocks.{i}.fc1.width", "width", (16, 32, 48), block=f"blocks.{i}")]
    dims.append(Dim("head.width", "width", (4, 8, 12)))
    return SearchSpace(dims, stacks={"blocks": (4, 2)}, keep_prob=keep_prob)


def _brute_force_count(space: SearchSpace) -> int:
    names = list(space.dims)
    count = 0
    for values in itertools.product(*(space.dims[n].choices for n in names)):
        try:
            space.validate(dict(zip(names, values, strict=True)))
        except SearchSpaceError:
            continue
        count += 1
    return count


@pytest.fixture(scope="module")
def vit_supernet() -> SupernetModule:
    torch.manual_seed(0)
    return SupernetModule(TinyViT(img_size=8, patch_size=2, dim=32, depth=4, num_heads=4), F.cross_entropy,
                          example_input=torch.randn(2, 1, 8, 8))


# -- SubnetConfig ---------------------------------------------------------------------------------------------------
def test_subnet_config_is_frozen():
    cfg = SubnetConfig({"a.width": 8, "b.keep": True})
    with pytest.raises(TypeError):
        cfg["a.width"] = 4
    with pytest.raises(TypeError):
        del cfg["a.width"]
    with pytest.raises(AttributeError):
        cfg.extra = 1
    plain = cfg.to_dict()
    plain["a.width"] = 4  # a copy: changing it leaves the config alone
    assert cfg["a.width"] == 8
    assert not hasattr(cfg, "__dict__")


def test_subnet_config_is_hashable_and_order_free():
    a = SubnetConfig({"a.width": 8, "b.keep": True})
    b = SubnetConfig({"b.keep": True, "a.width": 8})
    c = SubnetConfig({"a.width": 4, "b.keep": True})
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2
    assert {a: "x"}[b] == "x"
    assert a == {"a.width": 8, "b.keep": True}


def test_subnet_config_dict_round_trip(vit_supernet):
    space = vit_supernet.search_space
    for cfg in (space.largest(), space.smallest(), space.sample(3)):
        plain = cfg.to_dict()
        assert type(plain) is dict and list(plain) == list(space.dims)
        back = SubnetConfig.from_dict(json.loads(json.dumps(plain)))
        assert back == cfg and hash(back) == hash(cfg)
        # a config rebuilt from plain values is accepted by the space and means the same subnet
        assert space.validate(back) == cfg
        assert vit_supernet.cost(back) == vit_supernet.cost(cfg)
        unpickled = pickle.loads(pickle.dumps(cfg))
        assert unpickled == cfg and unpickled.fingerprint == cfg.fingerprint == space.fingerprint


# -- sampling ----------------------------------------------------------------------------------------------------------
def test_sample_is_deterministic_for_a_seed(vit_supernet):
    space = vit_supernet.search_space
    assert [space.sample(s) for s in range(5)] == [space.sample(s) for s in range(5)]
    assert len({space.sample(s) for s in range(20)}) >= 15
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    seq1 = [space.sample(g1) for _ in range(5)]
    assert seq1 == [space.sample(g2) for _ in range(5)]
    assert len(set(seq1)) > 1, "a generator must advance between samples"


def test_sample_never_touches_the_global_rng(vit_supernet):
    space = vit_supernet.search_space
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected_next = torch.rand(3)
    torch.set_rng_state(state)
    for seed in (0, 1, None, torch.Generator().manual_seed(5)):
        space.sample(seed)
    _small_space().sample(0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(3), expected_next)


def test_sample_is_uniform_over_choices():
    space = _small_space()
    samples = [space.sample(s) for s in range(600)]
    counts = {v: sum(c["head.width"] == v for c in samples) for v in (4, 8, 12)}
    assert all(150 < n < 250 for n in counts.values()), counts


# -- minimum depth -----------------------------------------------------------------------------------------------------
def _kept(cfg, space, stack="blocks") -> int:
    return sum(bool(cfg[n]) for n in space.stack_blocks(stack))


def test_min_depth_in_smallest_sample_and_validate():
    space = _small_space(keep_prob=0.1)  # mostly-skipping samples must be repaired
    assert _kept(space.smallest(), space) == 2
    assert [space.smallest()[f"blocks.{i}.keep"] for i in range(4)] == [True, True, False, False]
    kept = [_kept(space.sample(s), space) for s in range(300)]
    assert min(kept) == 2, "sampling must repair to the minimum depth, not below it"
    assert max(kept) >= 3
    bad = {**space.largest(), **{f"blocks.{i}.keep": i == 0 for i in range(4)}}
    with pytest.raises(SearchSpaceError, match=r"stack `blocks` keeps 1 of 4 blocks.*at least 2"):
        space.validate(bad)
    ok = {**space.largest(), **{f"blocks.{i}.keep": i in (1, 3) for i in range(4)}}
    assert _kept(space.validate(ok), space) == 2


def test_min_depth_counts_blocks_that_cannot_be_skipped():
    # a stack of 3 blocks, keep at least 2, only 2 of them skippable: one skippable block must stay
    space = SearchSpace([Dim("s.1.keep", "depth", (True, False), stack="s"),
                         Dim("s.2.keep", "depth", (True, False), stack="s")], stacks={"s": (3, 2)})
    assert _kept(space.smallest(), space, "s") == 1
    assert all(_kept(space.sample(k), space, "s") >= 1 for k in range(50))
    with pytest.raises(SearchSpaceError, match="at least 2"):
        space.validate({"s.1.keep": False, "s.2.keep": False})
    assert space.num_subnets == 3 == _brute_force_count(space)


@pytest.mark.parametrize("min_depth,kept", [(0.5, 2), (0.75, 3), (3, 3), (1, 1)])
def test_min_depth_option_reaches_the_supernet(min_depth, kept):
    torch.manual_seed(0)
    sn = SupernetModule(TinyViT(img_size=8, patch_size=2, dim=16, depth=4, num_heads=2), F.cross_entropy,
                        example_input=torch.randn(1, 1, 8, 8), space={"min_depth": min_depth})
    space = sn.search_space
    assert _kept(space.smallest(), space) == kept
    assert min(_kept(space.sample(s), space) for s in range(40)) == kept
    assert len(sn.extract(space.smallest()).blocks) == kept


# -- motifs ------------------------------------------------------------------------------------------------------------
def test_canonical_merges_widths_of_skipped_blocks():
    space = _small_space()
    base = {**space.largest(), "blocks.2.keep": False, "blocks.3.keep": False}
    a = {**base, "blocks.2.fc1.width": 16, "blocks.2.attn.heads": 2}
    b = {**base, "blocks.2.fc1.width": 48, "blocks.3.attn.heads": 2}
    assert space.canonical(a) == space.canonical(b)
    assert hash(space.canonical(a)) == hash(space.canonical(b))
    # widths of kept blocks, or outside any block, still tell configs apart
    assert space.canonical({**a, "blocks.0.fc1.width": 16}) != space.canonical(a)
    assert space.canonical({**a, "stem.width": 8}) != space.canonical(a)
    # a config with nothing skipped is its own motif
    full = space.sample(0)
    if all(full[f"blocks.{i}.keep"] for i in range(4)):
        assert space.canonical(full) == full
    assert space.canonical(space.largest()) == space.largest()


def test_canonical_configs_extract_to_the_same_network(vit_supernet):
    space = vit_supernet.search_space
    base = {**space.largest(), "blocks.1.keep": False}
    a = space.config({**base, "blocks.1.mlp.fc1.width": 32, "blocks.1.attn.heads": 1})
    b = space.config({**base, "blocks.1.mlp.fc1.width": 128})
    assert a != b and space.canonical(a) == space.canonical(b)
    x = torch.randn(3, 1, 8, 8)
    ma, mb = vit_supernet.extract(a).eval(), vit_supernet.extract(b).eval()
    assert torch.equal(ma(x), mb(x))
    assert vit_supernet.cost(a) == vit_supernet.cost(b)
    c = space.config({**base, "blocks.0.mlp.fc1.width": 32})
    assert space.canonical(c) != space.canonical(a)


# -- counting and printing ---------------------------------------------------------------------------------------------
def test_num_subnets_equals_brute_force():
    space = _small_space()
    # 2 stem widths x 3 head widths x 11 keep patterns with >= 2 of 4 blocks x (2 heads x 3 widths) per block
    assert space.num_subnets == 2 * 3 * 11 * 6**4 == _brute_force_count(space)


def test_num_subnets_of_a_discovered_space_equals_brute_force():
    torch.manual_seed(0)
    sn = SupernetModule(TinyViT(img_size=8, patch_size=2, dim=16, depth=3, num_heads=2, mlp_ratio=2.0),
                        F.cross_entropy, example_input=torch.randn(1, 1, 8, 8),
                        space={"width_ratios": [0.5, 1.0], "min_depth": 2})
    space = sn.search_space
    assert {d.kind for d in space.dims.values()} == {"width", "heads", "depth"}
    assert space.num_subnets == _brute_force_count(space)
    assert space.to_dict()["num_subnets"] == space.num_subnets


def test_printed_table_lists_every_dim(vit_supernet):
    space = vit_supernet.search_space
    text = str(space)
    lines = text.splitlines()
    assert lines[0] == f"SearchSpace: {len(space.dims)} elastic dims, {space.num_subnets:,} subnets"
    assert len(space.dims) == 12
    for name, d in space.dims.items():
        rows = [line for line in lines if line.split() and line.split()[0] == name]
        assert len(rows) == 1, name
        assert rows[0].split()[1] == d.kind
        listed = rows[0].split(None, 2)[2]
        assert sorted(v.strip() for v in listed.split(",")) == sorted(str(v) for v in d.choices), rows[0]
    assert "stack `blocks`: 4 blocks, 4 skippable, keeps at least 2" in text
    assert repr(space) == text
