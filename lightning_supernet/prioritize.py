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
    >>> _ = torch.manual_seed(0)  # a group already in order is left out of the result
    >>> sn = SupernetModule(TinyViT(dim=32, depth=2, num_heads=2), F.cross_entropy,
    ...                     example_input=torch.randn(1, 1, 8, 8))
    >>> perms = reorder(sn, magnitude_importance(sn))
    >>> "blocks.0.mlp.fc1.width" in perms
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_supernet.errors import InvalidArgumentError
from lightning_supernet.ir.graph import call_model
from lightning_supernet.ops import op_for

if TYPE_CHECKING:
    from lightning_supernet.module import SupernetModule

__all__ = ["activation_importance", "group_tensors", "magnitude_importance", "reorder", "taylor_importance"]


def _head_index(spec, perm: torch.Tensor, blocks: int = 1, layout: str = "qkv") -> torch.Tensor:
    """Row indices for a permutation of (kv-)head groups: ``[blocks][heads][head_dim]`` rows, or head-major
    ``[heads][blocks][head_dim]`` rows (``layout="head"``, a fused q/k/v laid out per head)."""
    rep = spec.kv_group
    if layout == "group":  # fused [kv heads][queries of the group, k, v][head_dim] rows (Falcon): whole groups
        per_group = (rep + 2) * spec.head_dim
        return (perm[:, None] * per_group + torch.arange(per_group)).reshape(-1)
    heads = (perm[:, None] * rep + torch.arange(rep)).reshape(-1)  # query heads follow their kv head
    if layout == "head":  # rows per head: q, k, v of head_dim each, or LeViT's key_dim, key_dim, val_dim
        per_head = spec.head_rows or blocks * spec.head_dim
        return (heads[:, None] * per_head + torch.arange(per_head)).reshape(-1)
    rows = (heads[:, None] * spec.head_dim + torch.arange(spec.head_dim)).reshape(-1)
    per_block = spec.num_heads * spec.head_dim
    return torch.cat([rows + b * per_block for b in range(blocks)])


def _kv_index(spec, perm: torch.Tensor) -> torch.Tensor:
    return (perm[:, None] * spec.head_dim + torch.arange(spec.head_dim)).reshape(-1)


def _port_tensors(mod: nn.Module, port: str, index: Any) -> list[tuple[nn.Module, str, int, Any]]:
    """``(module, tensor, dim, index)`` for the tensors the registered op of ``mod`` slices on ``port``; a dim of
    equal blocks (MoE ``gate_up_proj``: gate, then up) gets the permutation in every block."""
    spec = op_for(mod).ports[port]
    blocks = getattr(mod, spec.blocks, 1) if spec.blocks else 1
    out = []
    for t, d in spec.tensors:
        tensor = getattr(mod, t, None)
        if tensor is None:
            continue
        idx = index
        if index is not None and blocks and blocks > 1 and tensor.shape[d] == blocks * len(index):
            idx = torch.cat([index + b * len(index) for b in range(blocks)])
        out.append((mod, t, d, idx))
    return out


def group_tensors(supernet: SupernetModule, name: str, perm: torch.Tensor | None = None) -> list[tuple[nn.Module, str, int, Any]]:
    """``(module, tensor name, dim, index)`` for every tensor of group ``name`` (index: rows for ``perm``).

    The tensors come from each member's registered op (:mod:`lightning_supernet.ops`): producers' ``out`` port,
    consumers' ``in`` port, channel-wise modules' ``ch`` port (BatchNorm statistics included). With ``perm=None``
    the index is ``None`` and the list just names the group's tensors and their channel dim.

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
        # a grouped convolution's channels move in whole groups (``multiple`` channels a unit)
        index = perm if perm is None or w.multiple == 1 else (
            perm[:, None] * w.multiple + torch.arange(w.multiple)).reshape(-1)
        for ports, port in ((w.producers, "out"), (w.consumers, "in"), (w.channelwise, "ch")):
            for path in ports:
                out += _port_tensors(model.get_submodule(path), port, _member_index(model, w, path, port, index))
        return out
    for h in found.heads:
        if h.name != name:
            continue
        anchor, spec = model.get_submodule(h.path) if h.path else model, h.spec
        q_idx = None if perm is None else _head_index(spec, perm)
        for path, blocks in ((spec.q, 1), (spec.qkv, 3), *((p, 1) for p in spec.extra_q)):
            if path is not None:
                idx = None if perm is None else _head_index(spec, perm, blocks, spec.layout)
                proj = anchor.get_submodule(path)
                out += _port_tensors(proj, "out", idx)
                if "out_separate" in op_for(proj).ports:  # nn.MultiheadAttention with separate q/k/v weights
                    out += _port_tensors(proj, "out_separate", q_idx)
        for path, rows in spec.extra_rows:  # [heads][rows] outputs or BatchNorm channels (LeViT)
            mod = anchor.get_submodule(path)
            idx = None if perm is None else (perm[:, None] * rows + torch.arange(rows)).reshape(-1)
            out += _port_tensors(mod, "out" if "out" in op_for(mod).ports else "ch", idx)
        for path in (spec.k, spec.v):
            if path is not None:
                out += _port_tensors(anchor.get_submodule(path), "out", None if perm is None else _kv_index(spec, perm))
        out += _port_tensors(anchor.get_submodule(spec.o), "in", q_idx)
        head_perm = None if perm is None else (perm[:, None] * spec.kv_group + torch.arange(spec.kv_group)).reshape(-1)
        for path, tensor_name, dim in spec.per_head:  # relative-position bias tables: one entry per query head
            out.append((anchor.get_submodule(path) if path else anchor, tensor_name, dim, head_perm))
        return out
    raise KeyError(f"no width or head group named `{name}`")


def _member_index(model: nn.Module, w: Any, path: str, port: str, index: torch.Tensor | None) -> Any:
    """The rows of member ``path`` that ``index`` (the group's rows) moves: a consumer after flatten reads a run of
    features a channel; a consumer of a concatenation reads the group as one segment and keeps its other rows."""
    if index is None or port != "in":
        return index
    scale, offset = w.scale(path), w.offset(path)
    if scale != 1:
        index = (index[:, None] * scale + torch.arange(scale)).reshape(-1)
    if offset is not None:
        mod = model.get_submodule(path)
        full = op_for(mod).port_size(mod, "in")
        index = torch.cat([torch.arange(offset), offset + index, torch.arange(offset + len(index), full)])
    return index


def _width_unit_ids(w: Any, path: str, port: str, rows: int) -> torch.Tensor:
    """The channel (or group of a grouped convolution) each of the ``rows`` rows of member ``path`` belongs to; -1
    for a concatenation consumer's rows outside the group's segment."""
    inside = torch.arange(rows)
    if port == "in":
        inside = (inside - (w.offset(path) or 0)) // w.scale(path)
    else:  # a dim of equal blocks (MoE ``gate_up_proj``: gate, then up) repeats the channels in every block
        inside = inside % w.size
    keep = (inside >= 0) & (inside < w.size)
    return torch.where(keep, inside.clamp(0, w.size - 1) // w.multiple, -1)


def _units(supernet: SupernetModule, name: str) -> int:
    """Channels of a width group (whole groups of a grouped convolution), or key/value head groups of a head group:
    the unit a permutation moves."""
    for w in supernet.discovery.widths:
        if w.name == name:
            return w.size // w.multiple
    for h in supernet.discovery.heads:
        if h.name == name:
            return h.spec.num_kv_heads
    raise KeyError(name)


def _unit_ids(supernet: SupernetModule, name: str) -> list[torch.Tensor]:
    """For each tensor of :func:`group_tensors` (same order): the unit (channel, or key/value head group) of each
    row along its dim."""
    tensors = group_tensors(supernet, name)
    for w in supernet.discovery.widths:
        if w.name == name:
            # rows per unit: a grouped convolution's channels per group, times the features a flattened consumer
            # reads per channel; the rows of a concatenation's consumer outside the group's segment belong to no
            # unit (-1)
            members = {(id(supernet.model.get_submodule(path)), t, d): (path, port)
                       for ports, port in ((w.producers, "out"), (w.consumers, "in"), (w.channelwise, "ch"))
                       for path in ports for t, d in op_for(supernet.model.get_submodule(path)).ports[port].tensors}
            return [_width_unit_ids(w, *members[(id(mod), t, d)], getattr(mod, t).shape[d])
                    for mod, t, d, _ in tensors]
    spec = next(h.spec for h in supernet.discovery.heads if h.name == name)
    d, rep, q_rows = spec.head_dim, spec.kv_group, spec.num_heads * spec.head_dim
    ids = []
    per_head = len(tensors) - len(spec.per_head)  # the per-head tensors come last
    for i, (mod, tensor_name, dim, _) in enumerate(tensors):
        n = getattr(mod, tensor_name).shape[dim]
        rows = torch.arange(n)
        if i >= per_head:
            ids.append(rows // rep)
        elif spec.head_rows:
            ids.append(rows // (n // spec.num_heads))  # every tensor laid out [heads][rows] (LeViT)
        elif rep > 1 and n == spec.num_kv_heads * d:
            ids.append(rows // d)  # key/value projections of grouped-query attention: one head per unit
        elif spec.layout == "group" and n > q_rows:
            ids.append(rows // ((rep + 2) * d))  # a fused projection laid out per kv-head group
        elif spec.layout == "head" and n > q_rows:
            ids.append(rows // (n // spec.num_heads) // rep)  # a fused projection laid out per head
        else:
            ids.append(rows % q_rows // d // rep)  # [blocks][heads][head_dim] rows, or an output's columns
    return ids


def _per_unit(supernet: SupernetModule, name: str, score_of: Any) -> torch.Tensor:
    """Sum ``score_of(module, tensor, dim)`` (a per-row score along ``dim``) over the group, per unit."""
    units = _units(supernet, name)
    total = torch.zeros(units, dtype=torch.float64)
    for (mod, tensor_name, dim, _), ids in zip(group_tensors(supernet, name), _unit_ids(supernet, name), strict=True):
        t = getattr(mod, tensor_name)
        if t is None or tensor_name.startswith("running_"):
            continue
        score = score_of(mod, tensor_name, dim)
        if score is None:
            continue
        keep = ids >= 0  # rows outside the group (a concatenation's other inputs) score for no unit
        total.index_add_(0, ids[keep], score.double().cpu()[keep])
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


def taylor_importance(supernet: SupernetModule, batches: Iterable[Any],
                      loss: Any = None) -> dict[str, torch.Tensor]:
    """First-order Taylor importance ``Σ |w · ∂L/∂w|`` over every tensor of each group, on the largest subnet.

    ``loss(supernet, batch, i) -> scalar`` replaces the task loss (the wrapped ``training_step`` or ``loss_fn``);
    :func:`lightning_supernet.importance.prioritize` uses it when the task loss has no signal. The model's
    existing gradients are kept aside and put back.

    Example:
        >>> import torch.nn.functional as F
        >>> from lightning_supernet import SupernetModule
        >>> from lightning_supernet.models import TinyViT
        >>> sn = SupernetModule(TinyViT(dim=16, depth=2, num_heads=2), F.cross_entropy,
        ...                     example_input=torch.randn(1, 1, 8, 8))
        >>> scores = taylor_importance(sn, [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))])
        >>> all(s.shape[0] > 1 and bool((s >= 0).all()) for s in scores.values())
        True
    """
    params = [p for p in supernet.model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with supernet.subnet(supernet.search_space.largest()), supernet.log_as("taylor", False, "train"):
            for i, batch in enumerate(batches):
                (supernet.task_loss(batch, i) if loss is None else loss(supernet, batch, i)).backward()

        def score(mod: nn.Module, tensor_name: str, dim: int) -> torch.Tensor | None:
            t = getattr(mod, tensor_name)
            return None if t.grad is None else _reduce(t.detach() * t.grad, dim)

        return {name: _per_unit(supernet, name, score) for name in _groups(supernet)}
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


def activation_importance(supernet: SupernetModule, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Mean absolute activation of each width group's producers' outputs; heads fall back to magnitude.

    Example:
        >>> import torch.nn.functional as F
        >>> from lightning_supernet import SupernetModule
        >>> from lightning_supernet.models import TinyViT
        >>> sn = SupernetModule(TinyViT(dim=16, depth=2, num_heads=2), F.cross_entropy,
        ...                     example_input=torch.randn(1, 1, 8, 8))
        >>> scores = activation_importance(sn, [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))])
        >>> sorted(scores) == sorted(magnitude_importance(sn))
        True
    """
    found, model = supernet.discovery, supernet.model
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for w in found.widths:
        if w.name not in supernet.search_space.dims:
            continue
        for path in w.producers:
            mod = model.get_submodule(path)
            channel_dim = op_for(mod).channel_dim

            def hook(_m, _a, out, name=w.name, cd=channel_dim):
                a = out.detach().abs().movedim(cd, 0).reshape(out.shape[cd], -1).double().sum(1).cpu()
                sums[name] = sums.get(name, 0) + a

            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad(), supernet.subnet(supernet.search_space.largest()):
            for batch in batches:
                call_model(model, move_data_to_device(supernet.batch_to_input(batch), supernet.device))
    finally:
        for h in handles:
            h.remove()
    result = magnitude_importance(supernet)
    multiples = {w.name: w.multiple for w in found.widths}
    result.update({name: a.reshape(-1, multiples[name]).sum(1) for name, a in sums.items()})  # per unit
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
    for w in supernet.discovery.widths:
        if w.name == name:
            per_unit = w.multiple
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

    Example:
        >>> import torch.nn.functional as F
        >>> from lightning_supernet import SupernetModule
        >>> from lightning_supernet.models import TinyViT
        >>> sn = SupernetModule(TinyViT(dim=16, depth=2, num_heads=2), F.cross_entropy,
        ...                     example_input=torch.randn(1, 1, 8, 8)).eval()
        >>> x = torch.randn(2, 1, 8, 8); before = sn(x)
        >>> perms = reorder(sn, magnitude_importance(sn))
        >>> torch.allclose(sn(x), before, atol=1e-5)  # function-preserving
        True
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
