"""Torch-Pruning on the same models, for comparison: can it prune a model to about half its parameters, with a
forward that still runs?

Used the way its README shows: ``DependencyGraph`` + ``MagnitudePruner`` with group magnitude importance, the
output layer ignored, ``num_heads`` given for attention projections it can find (``nn.MultiheadAttention`` it
handles natively, given its head count; for other attention modules the child q/k/v/qkv projections of a module with a head-count
attribute), head dims pruned, head counts kept, channels rounded to a multiple of the largest head count (so an
embedding dim stays divisible by the heads). The channel ratio is raised until the model is at most 60 % of
its parameters (or 0.9 is reached). The result is one short string:

* ``OK 48%`` — pruned to 48 % of the params and the pruned model's forward runs (eval and train mode);
* ``FAIL graph: ...`` / ``FAIL prune: ...`` / ``FAIL forward: ...`` — where it broke;
* ``NO-OP 100%`` — nothing it could prune; ``WEAK 83%`` — runs, but not near half.

Example:
    >>> import torch, torch.nn as nn
    >>> torch_pruning_result(lambda: nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2)),
    ...                      torch.randn(2, 8)).split()[0]
    'OK'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_supernet.ir.graph import call_model, flatten_tensors

__all__ = ["torch_pruning_result"]

_HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_head", "n_heads", "num_attention_heads_per_partition")
_QKV_NAMES = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "q", "k", "v", "qkv", "c_attn",
              "query_key_value", "Wqkv", "in_proj")


def _num_heads(model: nn.Module) -> dict[nn.Module, int]:
    heads: dict[nn.Module, int] = {}
    for mod in model.modules():
        if isinstance(mod, nn.MultiheadAttention):
            heads[mod] = mod.num_heads
            continue
        count = next((getattr(mod, a) for a in _HEAD_ATTRS if isinstance(getattr(mod, a, None), int)), None)
        if not count:
            continue
        for name, child in mod.named_children():
            if name in _QKV_NAMES and hasattr(child, "weight"):
                heads[child] = count
    return heads


def _first(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    tensors = flatten_tensors(out)
    return tensors[0]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _err(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:160]


def torch_pruning_result(model_fn: Callable[[], nn.Module], example: Any, target: float = 0.6) -> str:
    """Try Torch-Pruning on a fresh model from ``model_fn`` (see the module docstring); returns the result string.

    Example:
        >>> import torch
        >>> mlp = lambda: nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
        >>> torch_pruning_result(mlp, torch.randn(2, 8)).split()[0]
        'OK'
    """
    import torch_pruning as tp

    ratio, result = 0.3, "NO-OP 100%"
    while ratio <= 0.9 + 1e-9:
        model = model_fn().eval()
        full = _count(model)
        with torch.no_grad():
            out = _first(call_model(model, example))
        n_out = out.shape[-1]
        ignored = [m for m in model.modules()
                   if getattr(m, "out_features", None) == n_out or getattr(m, "out_channels", None) == n_out]
        forward = (lambda m, x: call_model(m, x))
        heads = _num_heads(model)
        try:
            pruner = tp.pruner.MagnitudePruner(
                model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                ignored_layers=ignored, num_heads=heads, round_to=max(heads.values(), default=None),
                forward_fn=forward, output_transform=_first)
        except Exception as err:  # noqa: BLE001 - its failure is the measurement
            return f"FAIL graph: {_err(err)}"
        try:
            pruner.step()
        except Exception as err:  # noqa: BLE001
            return f"FAIL prune: {_err(err)}"
        frac = _count(model) / full
        try:
            with torch.no_grad():
                for train in (False, True):
                    model.train(train)
                    _first(call_model(model, example))
        except Exception as err:  # noqa: BLE001
            return f"FAIL forward: {_err(err)} ({frac:.0%} params)"
        if frac <= target:
            return f"OK {frac:.0%}"
        result = f"WEAK {frac:.0%}" if frac < 0.99 else f"NO-OP {frac:.0%}"
        ratio += 0.2
    return result
