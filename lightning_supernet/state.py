"""Leaving a user's model as it was: per-module train/eval modes, device, and the state construction changes.

``model.train(flag)`` sets every submodule to ``flag``, which erases a user's deliberate mix (a frozen BatchNorm
kept in eval mode inside a training model, a Dropout switched off). Everything in the library that needs a mode
for a moment (tracing, counting MACs, timing latency, verifying a supernet) goes through :func:`preserved_modes`,
which restores each module's own flag. :class:`ModelSnapshot` records what wrapping changes (module classes,
elastic attributes, head-count attributes, ``requires_grad``, buffers) so that a construction that fails leaves
the model exactly as it was.

Example:
    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Dropout()); _ = m[1].eval()
    >>> with preserved_modes(m):
    ...     _ = m.train()
    >>> m.training, m[1].training
    (True, False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["ModelSnapshot", "model_device", "preserved_modes"]


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body, then give every submodule back its own ``training`` flag (not one flag for all).

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout()); _ = m[1].eval()
        >>> with preserved_modes(m):
        ...     _ = m.eval()
        >>> m[0].training, m[1].training
        (True, False)
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without tensors.

    Example:
        >>> import torch.nn as nn
        >>> model_device(nn.Linear(1, 1)).type
        'cpu'
    """
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class ModelSnapshot:
    """What wrapping may change in a model, recorded so it can be put back exactly.

    Records each module's class, its ``training`` flag and the attributes in its ``__dict__`` that are not
    tensors or modules (elastic widths, head counts such as ``num_heads``), each parameter's ``requires_grad``
    and, with ``buffers=True``, a copy of every buffer (BatchNorm statistics a train-mode pass updates).

    Example:
        >>> import torch.nn as nn
        >>> m = nn.MultiheadAttention(8, 2); snap = ModelSnapshot(m)
        >>> m.num_heads = 1; m.__class__ = nn.Module; snap.restore()
        >>> type(m).__name__, m.num_heads
        ('MultiheadAttention', 2)
    """

    def __init__(self, model: nn.Module, buffers: bool = False) -> None:
        self.model = model
        self.modules = [(m, type(m), m.training, _plain_attrs(m)) for m in model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.buffers = [(m, name, b.detach().clone()) for m in model.modules()
                        for name, b in m._buffers.items() if b is not None] if buffers else []

    def restore(self) -> None:
        """Put every recorded class, flag, attribute, ``requires_grad`` and buffer back."""
        for m, cls, training, attrs in self.modules:
            if type(m) is not cls:
                m.__class__ = cls
            for key in [k for k in _plain_attrs(m) if k not in attrs]:
                del m.__dict__[key]
            m.__dict__.update(attrs)
            m.training = training
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        with torch.no_grad():
            for m, name, value in self.buffers:
                m._buffers[name].copy_(value)


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    skip = ("_parameters", "_buffers", "_modules", "training")
    return {k: v for k, v in module.__dict__.items()
            if k not in skip and not k.startswith("_") and not isinstance(v, (torch.Tensor, nn.Module))}
