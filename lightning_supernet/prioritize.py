"""Parameter prioritisation: reorder channels/neurons/heads so that the first ``k`` are the most important ``k``.

One permutation per coupled group (a width group or an attention module's heads) is applied to every tensor of
the group — producers' output rows, consumers' input columns, BatchNorm weights and running statistics — and to
the optimizer state of those tensors (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``). The full model computes
the same function after a reorder, and the optimizer's next step is the permuted version of the step it would
have taken.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from lightning_supernet import SupernetModule
    >>> from lightning_supernet.models import TinyViT
    >>> sn = SupernetModule(TinyViT(dim=32, depth=2, num_heads=2), F.cross_entropy,
    ...                     example_input=torch.randn(1, 1, 8, 8))
    >>> perms = reorder(sn, magnitude_importance(sn))
    >>> sorted(perms)[:1]
    ['blocks.0.attn.heads']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_supernet.errors import InvalidArgumentError

if TYPE_CHECKING:
    from lightning_supernet.module import SupernetModule

__all__ = ["activation_importance", "group_tensors", "magnitude_importance", "reorder", "taylor_importance"]


def _head_index(spec, perm: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """Row indices of a [blocks][heads][head_dim] layout for a permutation of (kv-)head groups."""
    rep = spec.kv_group
    heads = (perm[:, None] * rep + torch.arange(rep)).reshape(-1)  # query heads follow their kv head
    rows = (heads[:, None] * spec.head_dim + torch.arange(spec.head_dim)).reshape(-1)
    per_block = spec.num_heads * spec.head_dim
    return torch.cat([rows + b * per_block for b in range(blocks)])


def _kv_index(spec, perm: torch.Tensor) -> torch.Tensor:
    return (perm[:, None] * spec.head_dim + torch.arange(spec.head_dim)).reshape(-1)


def group_tensors(supernet: SupernetModule, name: str, perm: torch.Tensor | None = None) -> list[tuple[nn.Module, str, int, Any]]:
    """``(module, tensor name, dim, index)`` for every tensor of group ``name`` (index: rows for ``perm``).

    With ``perm=None`` the index is ``None`` and the list just names the group's tensors and their channel dim.

    Example:
        >>> import torch.nn.functional as F
        >>> from lightning_supernet import SupernetModule
        >>> from lightning_supernet.models import TinyViT
        >>> sn = SupernetModule(TinyViT(dim=32, depth=1, num_heads=2), F.cross_entropy,
        ...                     example_input=torch.randn(1, 1, 8, 8))
        >>> [(t, d) for _, t, d, _ in group_tensors(sn, "blocks.0.mlp.fc1.width")]
        [('weight', 0), ('bias', 0), ('weight', 1)]
    """
    model, found = supernet.model, supernet.discovery
    out: list[tuple[nn.Module, str, int, Any]] = []
    for w in found.widths:
        if w.name != name:
            continue
        for path in w.producers:
            mod = model.get_submodule(path)
            out += [(mod, t, 0, perm) for t in ("weight", "bias") if getattr(mod, t, None) is not None]
        for path in w.consumers:
            out.append((model.get_submodule(path), "weight", 1, perm))
        for path in w.channelwise:
            mod = model.get_submodule(path)
            out += [(mod, t, 0, perm) for t in ("weight", "bias", "running_mean", "running_var")
                    if getattr(mod, t, None) is not None]
        return out
    for h in found.heads:
        if h.name != name:
            continue
        anchor, spec = model.get_submodule(h.path), h.spec
        q_idx = None if perm is None else _head_index(spec, perm)
        for path, blocks in ((spec.q, 1), (spec.qkv, 3)):
            if path:
                mod = anchor.get_submodule(path)
                idx = None if perm is None else _head_index(spec, perm, blocks)
                out += [(mod, t, 0, idx) for t in ("weight", "bias") if getattr(mod, t, None) is not None]
        for path in (spec.k, spec.v):
            if path:
                mod = anchor.get_submodule(path)
                idx = None if perm is None else _kv_index(spec, perm)
                out += [(mod, t, 0, idx) for t in ("weight", "bias") if getattr(mod, t, None) is not None]
        out.append((anchor.get_submodule(spec.o), "weight", 1, q_idx))
        return out
    raise KeyError(f"no width or head group named `{name}`")


def _units(supernet: SupernetModule, name: str) -> int:
    """Channels of a width group, or key/value head groups of a head group (the unit a permutation moves)."""
    for w in supernet.discovery.widths:
        if w.name == name:
            return w.size
    for h in supernet.discovery.heads:
        if h.name == name:
            return h.spec.num_kv_heads
    raise KeyError(name)


def _per_unit(supernet: SupernetModule, name: str, score_of: Any) -> torch.Tensor:
    """Sum ``score_of(module, tensor, dim)`` (a per-row score along ``dim``) over the group, per unit."""
    units = _units(supernet, name)
    total = torch.zeros(units, dtype=torch.float64)
    for mod, tensor_name, dim, _ in group_tensors(supernet, name):
        t = getattr(mod, tensor_name)
        if t is None or tensor_name.startswith("running_"):
            continue
        score = score_of(mod, tensor_name, dim)
        if score is None:
            continue
        blocks = (getattr(mod, "out_blocks", None) or 1) if dim == 0 else 1
        total += score.double().cpu().reshape(blocks, units, -1).sum((0, 2))
    return total


def _reduce(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.abs().transpose(0, dim).reshape(t.shape[dim], -1).sum(1)


def magnitude_importance(supernet: SupernetModule) -> dict[str, torch.Tensor]:
    """L1 norm of each unit's consumer weights (OFA): the input columns that read the channel/head.

    Example:
        >>> import torch.nn.functional as F
        >>> from lightning_supernet import SupernetModule
        >>> from lightning_supernet.models import TinyViT
        >>> sn = SupernetModule(TinyViT(dim=32, depth=1, num_heads=2), F.cross_entropy,
        ...                     example_input=torch.randn(1, 1, 8, 8))
        >>> magnitude_importance(sn)["blocks.0.mlp.fc1.width"].shape
        torch.Size([128])
    """
    def score(mod: nn.Module, tensor_name: str, dim: int) -> torch.Tensor | None:
        return _reduce(getattr(mod, tensor_name).detach(), dim) if dim == 1 else None

    return {name: _per_unit(supernet, name, score) for name in _groups(supernet)}


def taylor_importance(supernet: SupernetModule, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """First-order Taylor importance ``Σ |w · ∂L/∂w|`` over every tensor of each group, on the largest subnet.

    The model's existing gradients are kept aside and put back.
    """
    params = [p for p in supernet.model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with supernet._using(supernet.search_space.largest()), supernet._log_as("taylor", False, "train"):
            for i, batch in enumerate(batches):
                supernet._task_loss(batch, i).backward()

        def score(mod: nn.Module, tensor_name: str, dim: int) -> torch.Tensor | None:
            t = getattr(mod, tensor_name)
            return None if t.grad is None else _reduce(t.detach() * t.grad, dim)

        return {name: _per_unit(supernet, name, score) for name in _groups(supernet)}
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


def activation_importance(supernet: SupernetModule, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Mean absolute activation of each width group's producers' outputs; heads fall back to magnitude."""
    found, model = supernet.discovery, supernet.model
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for w in found.widths:
        if w.name not in supernet.search_space.dims:
            continue
        for path in w.producers:
            mod = model.get_submodule(path)
            channel_dim = 1 if isinstance(mod, nn.Conv2d) else -1

            def hook(_m, _a, out, name=w.name, cd=channel_dim):
                a = out.detach().abs().movedim(cd, 0).reshape(out.shape[cd], -1).double().sum(1).cpu()
                sums[name] = sums.get(name, 0) + a

            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad(), supernet._using(supernet.search_space.largest()):
            for batch in batches:
                from lightning_supernet.cost import _to
                from lightning_supernet.ir.graph import call_model

                call_model(model, _to(supernet.batch_to_input(batch), supernet.device))
    finally:
        for h in handles:
            h.remove()
    result = magnitude_importance(supernet)
    result.update(sums)
    return result


def _groups(supernet: SupernetModule) -> list[str]:
    dims = supernet.search_space.dims
    return [g.name for g in (*supernet.discovery.widths, *supernet.discovery.heads) if g.name in dims]


def _bands(supernet: SupernetModule, name: str, units: int) -> list[tuple[int, int]]:
    dim = supernet.search_space.dims[name]
    per_unit = 1
    for h in supernet.discovery.heads:
        if h.name == name:
            per_unit = h.spec.kv_group
    cuts = sorted({c // per_unit for c in dim.choices if c // per_unit < units})
    edges = [0] + [c for c in cuts if c > 0] + [units]
    return list(zip(edges[:-1], edges[1:], strict=True))


def reorder(supernet: SupernetModule, importance: Mapping[str, torch.Tensor],
            optimizers: Iterable[torch.optim.Optimizer] = (), protect: bool = False) -> dict[str, torch.Tensor]:
    """Sort every group by ``importance`` (descending) and permute its tensors and optimizer state in place.

    Args:
        supernet: the supernet.
        importance: group name -> score per unit (channel, or key/value head group).
        optimizers: optimizers whose state tensors of the permuted parameters are permuted too.
        protect: sort only within the bands between consecutive width choices, so the channels the smaller
            widths were trained on stay in those widths (OFA's progressive shrinking).

    Returns:
        group name -> the permutation applied (``new[i] = old[perm[i]]``).
    """
    states = [opt.state for opt in optimizers]
    applied = {}
    for name, score in importance.items():
        units = _units(supernet, name)
        if score.shape != (units,):
            raise InvalidArgumentError(f"importance of `{name}` has shape {tuple(score.shape)}; expected ({units},)")
        bands = _bands(supernet, name, units) if protect else [(0, units)]
        perm = torch.cat([lo + torch.argsort(score[lo:hi], descending=True, stable=True) for lo, hi in bands])
        if torch.equal(perm, torch.arange(units)):
            continue
        applied[name] = perm
        with torch.no_grad():
            for mod, tensor_name, dim, index in group_tensors(supernet, name, perm):
                t = getattr(mod, tensor_name)
                index = index.to(t.device)
                t.copy_(t.index_select(dim, index))
                for state in states:
                    for value in state.get(t, {}).values():
                        if isinstance(value, torch.Tensor) and value.shape == t.shape:
                            value.copy_(value.index_select(dim, index))
    return applied
