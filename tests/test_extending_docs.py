"""docs/extending.md runs as written: a user's own layer registered as an elastic op gets elastic widths, and its
subnets equal their extracted models (outputs, params)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_supernet.cost import count_params
from lightning_supernet.ir import heads
from lightning_supernet.ops import registered_ops

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture
def doc_namespace():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    before_ops, before_adapters = registered_ops(), list(heads.find_head_specs.__globals__["_ADAPTERS"])
    ns: dict = {"__name__": "extending_doc"}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), ns)  # noqa: S102 - the documentation's own examples
    yield ns
    from lightning_supernet import ops

    for op in registered_ops():
        if op not in before_ops:
            ops.__dict__["_OPS"].remove(op)
    heads.find_head_specs.__globals__["_ADAPTERS"][:] = before_adapters


def test_the_documented_op_makes_a_users_layer_elastic_and_exact(doc_namespace):
    sn, model = doc_namespace["supernet"], doc_namespace["model"]
    space = sn.search_space
    assert "0.width" in space.dims and max(space.dims["0.width"].choices) == 64
    x = torch.randn(3, 16)
    full = count_params(model)
    for cfg in (space.smallest(), space.sample(0), space.sample(1)):
        small = sn.extract(cfg)
        for mode in ("train", "eval"):
            getattr(sn, mode)(), getattr(small, mode)()
            with sn.subnet(cfg), torch.no_grad():
                torch.testing.assert_close(sn(x), small(x))
        assert sn.cost(cfg)["params"] == count_params(small)
    smallest = sn.extract(space.smallest())
    assert smallest[0].weight.shape[0] == space.smallest()["0.width"] < 64
    assert count_params(smallest) <= 0.5 * full
