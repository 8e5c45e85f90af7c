"""Regression tests for the silent wrong answers and late crashes of issue 9 (each failed before its fix)."""

from __future__ import annotations

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
