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

__all__ = ["FAST_PATH_TYPES", "FastPathGuard", "guard_fast_paths", "is_sliced", "register_fast_path"]

#: module types whose forward may read their children's weights on a fused path
FAST_PATH_TYPES: list[type] = [nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                               nn.TransformerDecoder, nn.Transformer]


class FastPathGuard:
    """Mixin: while a subnet smaller than the full model is active inside the module, run the module's own
    ``forward`` with PyTorch's fused transformer fast path switched off (at the full size nothing changes).

    ``nn.TransformerEncoder`` with a key padding mask runs its layers on nested tensors and returns zeros at the
    padded positions; the guarded encoder gives those zeros too, exactly when torch's own encoder (and so the
    extracted subnet) would take that path.

    Example:
        >>> FastPathGuard._elastic_attrs
        ()
    """

    _elastic_attrs: tuple[str, ...] = ()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not is_sliced(self):
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        nested = isinstance(self, nn.TransformerEncoder) and _nests(self, *args, **kwargs)
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            if nested:
                return _encoder_with_padding_zeroed(self, *args, **kwargs)
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)

    def export_(self) -> dict[str, Any]:
        """An encoder whose attention loses heads cannot use torch's nested-tensor path (its kernels assume
        ``heads * head_dim == embed_dim``): the extracted encoder keeps to the ordinary path."""
        if isinstance(self, nn.TransformerEncoder) and _heads_sliced(self):
            self.use_nested_tensor = False
        return {}


def is_sliced(module: nn.Module) -> bool:
    """Whether any elastic module inside ``module`` runs smaller than its full size (or a block is skipped).

    Example:
        >>> is_sliced(nn.Linear(2, 2))
        False
    """
    for m in module.modules():
        if getattr(m, "skipped", False) is True:
            return True
        if type(m).__dict__.get("_mixins") and any(
            key.startswith("active_") and value is not None for key, value in vars(m).items()
        ):
            return True
    return False


def _heads_sliced(encoder: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) and getattr(m, "active_out_features", None) is not None
               for layer in encoder.layers if not getattr(layer, "skipped", False) for m in layer.modules())


def _nests(encoder: nn.TransformerEncoder, src: torch.Tensor, mask: Any = None, src_key_padding_mask: Any = None,
           is_causal: Any = None) -> bool:
    """Whether torch's own ``TransformerEncoder.forward`` would run on nested tensors (the conditions of torch
    2.x's fast path), for a subnet whose extracted encoder could."""
    layer = encoder.layers[0]
    attn = layer.self_attn
    if (not torch.backends.mha.get_fastpath_enabled() or not getattr(encoder, "use_nested_tensor", False)
            or _heads_sliced(encoder) or layer.training or src.dim() != 3 or src_key_padding_mask is None
            or src.is_nested or mask is not None or torch.is_autocast_enabled()):
        return False
    if getattr(encoder, "mask_check", True) and not torch._nested_tensor_from_mask_left_aligned(
            src, src_key_padding_mask.logical_not()):
        return False
    tensors = (src, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
               layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias, layer.linear1.weight,
               layer.linear1.bias, layer.linear2.weight, layer.linear2.bias)
    if torch.overrides.has_torch_function(tensors) or src.device.type not in ("cpu", "cuda", "xpu"):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _encoder_with_padding_zeroed(encoder: nn.TransformerEncoder, src: torch.Tensor, mask: Any = None,
                                 src_key_padding_mask: Any = None, is_causal: Any = None) -> torch.Tensor:
    output = src
    for layer in encoder.layers:
        output = layer(output, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    padded = src_key_padding_mask if encoder.layers[0].self_attn.batch_first else src_key_padding_mask.transpose(0, 1)
    output = output.masked_fill(padded.unsqueeze(-1), 0.0)
    return encoder.norm(output) if encoder.norm is not None else output


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
