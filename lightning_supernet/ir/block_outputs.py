"""What a block that returns a tuple gives back besides its hidden state, and what it returns when skipped.

Hugging Face layers return ``(hidden, attention weights)`` or pass a shared tensor on (T5 blocks return the
position bias they were given). A block stays skippable when each extra tensor output is read by nothing outside
it, or is one of its inputs returned unchanged (the skipped block then returns that input, so the next block gets
what it would have got).
"""

from __future__ import annotations


from lightning_supernet.ir.graph import Call, ModuleGraph, seq_nr

__all__ = ["extra_outputs_read", "skip_output"]


def extra_outputs_read(call: Call, graph: ModuleGraph) -> bool:
    """Whether a tuple-returning block's extra tensor outputs are read outside it; fine if not (HF layers return
    (hidden, attention weights)), or if the item is an input returned unchanged (the skipped block returns it).

    Example:
        >>> import torch
        >>> from lightning_supernet.ir.graph import trace
        >>> class Block(torch.nn.Module):
        ...     def forward(self, x, bias):
        ...         return x + bias, bias
        >>> blk, x = Block(), torch.randn(2, 3, requires_grad=True)
        >>> graph = trace(blk, (x, torch.randn(2, 3, requires_grad=True)))
        >>> extra_outputs_read(graph.calls[0], graph), skip_output(graph.calls[0])
        (False, ('hidden', ('arg', 1)))
    """
    if not all(t or o is None for t, o in zip(call.out_is_tensor, call.out_from_inputs, strict=False)):
        return True  # nested items: tensors and items cannot be matched up
    nodes = iter(call.out_nodes[1:])
    for is_tensor, source in zip(call.out_is_tensor[1:], call.out_from_inputs[1:], strict=True):
        node = next(nodes, None) if is_tensor else None
        if is_tensor and source is None and (node is None or node in graph.output_nodes or any(
                (seq := seq_nr(p)) is None or not call.owns(seq) for p in graph.parents.get(node, ()))):
            return True
    return False


def skip_output(call: Call) -> int | tuple | None:
    """What a skipped block returns: ``None`` (a tensor), a tuple length, or a template naming the inputs it
    passes on (``("hidden", None, ("arg", 2))``).

    Example:
        >>> import torch
        >>> from lightning_supernet.ir.graph import trace
        >>> blk = torch.nn.Linear(3, 3)
        >>> skip_output(trace(blk, torch.randn(2, 3)).calls[0]) is None  # a block returning one tensor
        True
    """
    if any(call.out_from_inputs[1:]):
        return ("hidden", *call.out_from_inputs[1:])
    return call.out_len
