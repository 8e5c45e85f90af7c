"""Cost model: exact parameter counts, MACs from ``torch.utils.flop_counter``, measured latency.

Example:
    >>> import torch, torch.nn as nn
    >>> count_params(nn.Linear(3, 2)), count_macs(nn.Linear(3, 2), torch.randn(4, 3))
    (8, 24)
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lightning_supernet.errors import InvalidArgumentError
from lightning_supernet.elastic.base import ElasticMixin
from lightning_supernet.elastic.depth import SkippableBlock
from lightning_supernet.ir.graph import call_model
from lightning_supernet.state import model_device, preserved_modes

__all__ = ["active_params", "count_macs", "count_params", "measure_latency"]


def count_params(model: nn.Module) -> int:
    """Parameters of a (physical) model, shared tensors counted once.

    Example:
        >>> count_params(nn.Conv2d(1, 4, 3))
        40
    """
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def active_params(model: nn.Module) -> int:
    """Parameters of the active subnet of an elastic model: sliced shapes, skipped blocks excluded.

    Equals :func:`count_params` of the extracted subnet.

    Example:
        >>> from lightning_supernet.elastic import ElasticLinear, make_elastic
        >>> lin = nn.Linear(4, 4); make_elastic(lin, ElasticLinear); lin.active_out_features = 2
        >>> active_params(lin)
        10
    """
    seen: set[int] = set()
    total = 0
    stack = [model]
    while stack:
        mod = stack.pop()
        if isinstance(mod, SkippableBlock) and mod.skipped:
            continue
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += (mod.active_tensor(name, p) if isinstance(mod, ElasticMixin) else p).numel()
        stack.extend(mod.children())
    return total


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:
    """The CPU kernel of ``scaled_dot_product_attention`` does the same matmuls as the CUDA ones (torch's flop
    counter knows only those)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_macs(model: nn.Module, example: Any) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (``FlopCounterMode`` flops / 2).

    Counts matmuls, convolutions and attention (``scaled_dot_product_attention``); element-wise ops are free.

    Example:
        >>> count_macs(nn.Conv2d(1, 2, 1, bias=False), torch.randn(1, 1, 3, 3))
        18
    """
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    # PyTorch's fused transformer kernels (nn.MultiheadAttention/TransformerEncoderLayer in eval without grad) are
    # invisible to the flop counter: count the same computation on their ordinary path
    torch.backends.mha.set_fastpath_enabled(False)
    # the counter's module tracker hooks every input that requires grad; a view of a parameter made under no_grad
    # (timm CaiT's ``cls_token.expand``) requires grad without a grad_fn and trips it: count with grads off
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with preserved_modes(model), torch.no_grad(), counter:
            model.eval()
            call_model(model, example)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for p in trainable:
            p.requires_grad_(True)
    return counter.get_total_flops() // 2


def measure_latency(model: nn.Module, example: Any, *, device: str | torch.device | None = None,
                    warmup: int = 3, repeats: int = 10, dtype: torch.dtype | None = None) -> float:
    """Median wall time of a no-grad forward pass, in milliseconds, after ``warmup`` passes.

    Args:
        model: the (extracted) model to time; it is moved to ``device`` for the measurement and back after it,
            and every module keeps its own train/eval mode.
        example: its input (tensor, tuple of args or dict of kwargs).
        device: where to run (default: the model's device).
        warmup: untimed passes first. repeats: timed passes (the median is returned).
        dtype: run under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16`` on a GPU).

    Example:
        >>> measure_latency(nn.Linear(4, 4), torch.randn(2, 4), repeats=3) > 0
        True
    """
    if repeats < 1 or warmup < 0:
        raise InvalidArgumentError(f"`repeats` must be >= 1 and `warmup` >= 0, got repeats={repeats}, warmup={warmup}")
    home = model_device(model)
    device = torch.device(device) if device is not None else home
    model.to(device)
    example = move_data_to_device(example, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else _null()
    times = []
    try:
        with preserved_modes(model), torch.no_grad(), autocast:
            model.eval()
            for i in range(warmup + repeats):
                sync()
                t0 = time.perf_counter()
                call_model(model, example)
                sync()
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.to(home)  # the caller's model stays where it was
    return statistics.median(times)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


