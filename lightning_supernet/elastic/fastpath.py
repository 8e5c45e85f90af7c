"""Guards for modules whose ``forward`` has a fused fast path that reads their children's weights directly.

``nn.TransformerEncoderLayer`` in eval mode with autograd off (how Lightning validates) calls one fused kernel
with ``linear1.weight``, ``linear2.weight`` and the attention's ``in_proj_weight`` — the full tensors, whatever
width or head count is active — and ``nn.TransformerEncoder`` may switch to nested tensors. A guard puts such a
module on its ordinary path (``torch.backends.mha.set_fastpath_enabled(False)`` for the duration of its forward),
so its children's elastic ops run. Extracted subnets have no guard: their weights are physically small, so the
fast path is right for them.

:func:`~lightning_supernet.build.make_appliers` guards every module of :data:`FAST_PATH_TYPES` that holds an elastic
module; :func:`register_fast_path` adds a type. A fast path nobody registered is still caught: the supernet checks
at construction that every subnet gives the same answer with autograd on and off (:mod:`lightning_supernet.verify`).

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_supernet.elastic.registry import make_elastic
    >>> layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True); make_elastic(layer, FastPathGuard)
    >>> with torch.no_grad():
    ...     layer.eval()(torch.randn(1, 3, 8)).shape
    torch.Size([1, 3, 8])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_supernet.elastic.registry import is_elastic, make_elastic, original_class

__all__ = ["FAST_PATH_TYPES", "FastPathGuard", "guard_fast_paths", "register_fast_path"]

#: module types whose forward may read their children's weights on a fused path
FAST_PATH_TYPES: list[type] = [nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                               nn.TransformerDecoder, nn.Transformer]


class FastPathGuard:
    """Mixin: run the module's own ``forward`` with PyTorch's fused transformer fast path switched off.

    Example:
        >>> FastPathGuard._elastic_attrs
        ()
    """

    _elastic_attrs: tuple[str, ...] = ()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)


def register_fast_path(cls: type) -> type:
    """Declare that ``cls``'s forward may read its children's weights on a fast path (see the module docstring).

    Example:
        >>> class MyFusedBlock(nn.Module):
        ...     pass
        >>> register_fast_path(MyFusedBlock) is MyFusedBlock; FAST_PATH_TYPES.remove(MyFusedBlock)
        True
    """
    if cls not in FAST_PATH_TYPES:
        FAST_PATH_TYPES.append(cls)
    return cls


def guard_fast_paths(model: nn.Module) -> list[str]:
    """Guard every module of :data:`FAST_PATH_TYPES` in ``model`` that holds an elastic module; returns their paths.

    Example:
        >>> guard_fast_paths(nn.TransformerEncoderLayer(8, 2, 16))  # nothing elastic inside: nothing to guard
        []
    """
    guarded = []
    for path, mod in model.named_modules():
        if issubclass(original_class(mod), tuple(FAST_PATH_TYPES)) and any(
            is_elastic(m) and not isinstance(m, FastPathGuard) for m in mod.modules()
        ):
            make_elastic(mod, FastPathGuard)
            guarded.append(path)
    return guarded
