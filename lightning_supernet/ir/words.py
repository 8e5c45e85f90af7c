"""Reasons in words: why discovery left a dim fixed, phrased for the user (not autograd node names)."""

from __future__ import annotations

from typing import Any

__all__ = ["op_in_words"]

_WORDS = (
    (("View", "Reshape", "Permute", "Transpose", "Expand", "Squeeze", "Unflatten", "Flatten", "T"),
     "is reshaped or permuted outside a module (`.view`/`.reshape`/`.permute`), which mixes channels with "
     "other dims"),
    (("Mean", "Sum", "Max", "Amax", "Min", "Amin", "Norm", "Std", "Var", "Prod", "Logsumexp"),
     "is reduced over a dim outside a module (mean/sum/max)"),
    (("Cat", "Stack"), "is concatenated with other tensors"),
    (("Split", "Slice", "Select", "Index", "Gather", "Narrow", "Chunk", "Unbind"), "is split or indexed"),
    (("Mm", "Bmm", "Matmul", "Addmm", "Baddbmm", "Einsum", "ScaledDotProduct", "Convolution", "Linear"),
     "enters a matrix product or convolution outside a module (a weight read directly or functional attention)"),
)


def op_in_words(node: Any) -> str:
    """Why a walk stopped at an autograd ``node``, in words (the node's name only as a hint at the end).

    Example:
        >>> import torch
        >>> op_in_words(torch.randn(2, 3, requires_grad=True).mean(1).grad_fn)
        'is reduced over a dim outside a module (mean/sum/max) [mean]'
    """
    name = type(node).__name__
    base = name.split("Backward")[0].removeprefix("Unsafe")
    for stems, words in _WORDS:
        if any(base == s or (base.startswith(s) and not base[len(s):len(s) + 1].islower()) for s in stems):
            return f"{words} [{base.lower()}]"
    return f"goes through `{base.lower()}`, an operation the library cannot slice"
