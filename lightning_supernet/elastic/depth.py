"""Elastic depth: a residual block that can be skipped (module-wise pruning by edge contraction).

A skipped block that adds its own residual returns its input unchanged; one whose caller adds the residual
(``for layer in self.layers: h = h + layer(h)``) returns zeros. Either way it returns, in the output structure the block had when it was traced (a tensor,
or a tuple whose first item is the hidden state), so the caller's loop ``for blk in self.blocks: x = blk(x)``
needs no change.

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_supernet.elastic.registry import make_elastic
    >>> blk = nn.Linear(3, 3); make_elastic(blk, SkippableBlock); blk.skipped = True
    >>> x = torch.randn(2, 3); blk(x) is x
    True
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SkippableBlock"]

_HIDDEN_KWARGS = ("hidden_states", "x", "input", "inputs_embeds")


class SkippableBlock:
    """Mixin for a residual block whose output has its input's shape.

    Attributes:
        skipped: when ``True`` the block is the identity (or returns zeros, with ``skip_mode="zero"``: its caller
            adds the residual).
        skip_output_len: ``None`` if the traced block returned a tensor, else the length of the tuple it returned
            (the skipped block returns ``(x, None, ...)`` of that length), or a template
            ``("hidden", None, ("arg", 2), ("kw", "bias"))`` naming the inputs it returned unchanged (passed on).

    Example:
        >>> import torch.nn as nn
        >>> from lightning_supernet.elastic.registry import make_elastic
        >>> blk = nn.Identity(); make_elastic(blk, SkippableBlock); blk.skipped
        False
    """

    _elastic_attrs = ("skipped", "skip_output_len", "skip_mode")

    def init_elastic(self) -> None:
        """Start kept, returning a tensor."""
        self.skipped = False
        self.skip_output_len = None
        self.skip_mode = "identity"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.skipped:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        hidden = _first_tensor(args, kwargs)
        if self.skip_mode == "zero":  # the caller adds the residual (h = h + block(h)): contribute nothing
            hidden = torch.zeros_like(hidden)
        if self.skip_output_len is None:
            return hidden
        if isinstance(self.skip_output_len, tuple):  # a template: inputs the block passes on unchanged (T5)
            return (hidden, *(None if e is None else args[e[1]] if e[0] == "arg" else kwargs.get(e[1])
                              for e in self.skip_output_len[1:]))
        return (hidden,) + (None,) * (self.skip_output_len - 1)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for key in _HIDDEN_KWARGS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError("a skipped block was called without a tensor argument to pass through")
