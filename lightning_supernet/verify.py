"""Numerical verification of a freshly built supernet: refuse early instead of failing late or answering wrong.

Discovery reads structure; it cannot see what a module's Python does with a head count, a fused fast path that
reads full weights under ``no_grad``, or a per-channel buffer. So before a supernet is handed to the user, each
elastic dim is checked by running the model on its example input:

1. **Runs** — the smallest subnet runs in eval and in train mode (train mode with every buffer and the RNG put
   back afterwards). A crash is traced to the dims that cause it by shrinking dims one at a time.
2. **Slicing equals removal** — shrinking widths and head counts must compute exactly what the full model
   computes with those channels/heads removed (their input columns in every consumer, the output projection's
   columns of the dropped heads, set to zero). This proves a head layout (``[3][heads][head_dim]`` vs head-major),
   a head-size attribute and every coupling numerically, never by name. Groups normalised by a LayerNorm over
   their own channels change statistics when sliced, so they are only checked to run.
3. **Same answer with autograd off** — the smallest subnet gives the same output under ``torch.no_grad()`` and
   ``torch.inference_mode()`` as with autograd on (a fused fast path that reads the full weights does not).

:func:`verify_supernet` returns ``{dim name: reason}`` for the dims that fail; ``SupernetModule`` leaves them fixed
(and says why in ``print(supernet.search_space)``), or refuses the model when nothing can fix it.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from lightning_supernet import SupernetModule
    >>> from lightning_supernet.models import TinyViT
    >>> sn = SupernetModule(TinyViT(dim=32, depth=2, num_heads=2), F.cross_entropy,
    ...                     example_input=torch.randn(2, 1, 8, 8))
    >>> verify_supernet(sn)
    {}
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_supernet.elastic.registry import original_class
from lightning_supernet.errors import UnsupportedModelError
from lightning_supernet.ir.graph import call_model, flatten_tensors
from lightning_supernet.ops import op_for
from lightning_supernet.state import ModelSnapshot, preserved_modes

if TYPE_CHECKING:
    from lightning_supernet.module import SupernetModule
    from lightning_supernet.space import SubnetConfig

__all__ = ["max_rel_diff", "verify_supernet"]

#: outputs that differ by more than this (relative to their scale) are different answers
TOLERANCE = 1e-3


def max_rel_diff(a: Any, b: Any) -> float:
    """Largest difference between two (nested) outputs, relative to the first's scale; ``inf`` if they differ in
    structure, shape or a non-float value. NaNs at the same places count as equal.

    Example:
        >>> max_rel_diff(torch.ones(2), torch.ones(2) * 1.5)
        0.5
    """
    ta, tb = flatten_tensors(a), flatten_tensors(b)
    if len(ta) != len(tb):
        return math.inf
    worst = 0.0
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return math.inf
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return math.inf
            continue
        x, y = x.detach().double(), y.detach().double()
        same_nan = torch.isnan(x) & torch.isnan(y)
        diff = torch.where(same_nan, 0.0, (x - y).abs())
        if diff.numel():
            scale = max(1.0, float(x.nan_to_num().abs().max()))
            worst = max(worst, float(diff.nan_to_num(math.inf).max()) / scale)
    return worst


class _Runner:
    """Runs the supernet's model on the example input under a config, a mode and a grad setting."""

    def __init__(self, supernet: SupernetModule, example: Any) -> None:
        self.supernet, self.model, self.example = supernet, supernet.model, example

    def __call__(self, cfg: Mapping[str, Any], train: bool = False, grad: str = "enable") -> Any:
        ctx = {"enable": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[grad]
        with preserved_modes(self.model), self.supernet.subnet(cfg), ctx():
            self.model.train(train)
            if not train:
                return call_model(self.model, self.example)
            snapshot = ModelSnapshot(self.model, buffers=True)  # train mode updates BatchNorm statistics
            devices = sorted({t.device for t in self.model.parameters() if t.device.type == "cuda"}, key=str)
            try:
                with torch.random.fork_rng(devices=devices):
                    return call_model(self.model, self.example)
            finally:
                snapshot.restore()


@contextlib.contextmanager
def _innermost_module(model: nn.Module) -> Iterator[list[str]]:
    """Track the module call stack; after an exception ``stack`` still holds the modules that were running."""
    stack: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}
    def enter(mod: nn.Module, _args: Any) -> None:
        stack.append(names.get(id(mod), "?"))

    def leave(_mod: nn.Module, _args: Any, _out: Any) -> None:  # must return None: a value replaces the output
        stack.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _describe_crash(runner: _Runner, cfg: Mapping[str, Any], train: bool) -> str | None:
    with _innermost_module(runner.model) as stack:
        try:
            runner(cfg, train=train, grad="no_grad")
        except Exception as err:  # noqa: BLE001 - becomes the reason the dim is left fixed
            where = next((p for p in reversed(stack) if p), type(runner.model).__name__)
            mode = "train" if train else "eval"
            return f"the subnet crashes in `{where}` ({mode} mode): {type(err).__name__}: {str(err).splitlines()[0]}"
    return None


def _shrink_one_at_a_time(space: Any, names: list[str], test: Callable[[SubnetConfig], str | None],
                          base: SubnetConfig, value: Callable[[str], Any]) -> dict[str, str]:
    """Shrink dims cumulatively in model order; a dim whose shrinking makes ``test`` fail is reverted and blamed."""
    bad: dict[str, str] = {}
    current = dict(base)
    for name in names:
        trial = dict(current)
        trial[name] = value(name)
        try:
            cfg = space.validate(trial)
        except ValueError:
            continue  # e.g. a keep flag that would break the minimum depth with the others already skipped
        why = test(cfg)
        if why is None:
            current = trial
        else:
            bad[name] = why
    return bad


def _smallest_value(space: Any, name: str) -> Any:
    return space.dims[name].smallest


def _masked_groups(supernet: SupernetModule) -> dict[str, list[tuple[nn.Module, str, int, int, int, int | None]]]:
    """For each width/head dim checkable by removal: ``(module, tensor, dim, units per step, offset, end)`` of the
    input columns its consumers read (zeroing columns ``offset + k*units`` to ``end`` removes the channels or heads
    beyond ``k``; ``end=None``: the whole dim; a consumer of a concatenation reads the group as one segment)."""
    found, dims, model = supernet.discovery, supernet.search_space.dims, supernet.model
    groups: dict[str, list[tuple[nn.Module, str, int, int, int, int | None]]] = {}
    for w in found.widths:
        if w.name not in dims:
            continue
        if any(isinstance(model.get_submodule(p), nn.LayerNorm) for p in w.channelwise):
            continue  # slicing changes the normalisation statistics: not equal to removal by design
        groups[w.name] = [
            (m, t, d, w.scale(p), w.offset(p) or 0, None if w.offset(p) is None else w.offset(p) + w.size)
            for p in w.consumers for m, t, d in _in_port(model.get_submodule(p))
        ]
    for h in found.heads:
        if h.name in dims:
            anchor = model.get_submodule(h.path) if h.path else model
            groups[h.name] = [(m, t, d, h.spec.head_dim, 0, None)
                              for m, t, d in _in_port(anchor.get_submodule(h.spec.o))]
    return groups


def _in_port(mod: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """The tensors (and their dims) through which ``mod`` reads its input channels, from its registered op."""
    return [(mod, t, d) for t, d in op_for(mod).ports["in"].tensors]


@contextlib.contextmanager
def _removed(groups: Mapping[str, list], cfg: Mapping[str, Any]) -> Iterator[None]:
    """The full model with the channels/heads ``cfg`` drops zeroed out in their consumers (restored on exit)."""
    saved = []
    with torch.no_grad():
        for name, members in groups.items():
            for mod, tensor_name, dim, unit, offset, end in members:
                t = getattr(mod, tensor_name)
                keep, end = offset + cfg[name] * unit, t.shape[dim] if end is None else end
                if keep < end:
                    saved.append((t, t.detach().clone()))
                    t.narrow(dim, keep, end - keep).zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in reversed(saved):  # a consumer of a concatenation is saved once per segment
                t.copy_(value)


def _enclosing(supernet: SupernetModule, name: str) -> str:
    """The innermost module holding every member of dim ``name``, described for an error message."""
    paths = _dim_members(supernet, name)
    parts = [p.split(".") for p in paths] or [[]]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    path = ".".join(common)
    if path in paths and "." in path:  # a single member: name the module around it
        path = path.rpartition(".")[0]
    return f"`{path or type(supernet.model).__name__}` ({original_class(supernet.model.get_submodule(path)).__name__})"


def verify_supernet(supernet: SupernetModule) -> dict[str, str]:
    """Check every elastic dim of ``supernet`` numerically (see the module docstring).

    Returns:
        ``{dim name: reason in words}`` for the dims that must stay fixed; empty when all pass.

    Raises:
        UnsupportedModelError: the model gives another answer without autograd in a module that holds no
            elastic dim of its own (nothing can be left fixed to repair it).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from lightning_supernet import SupernetModule
        >>> from lightning_supernet.models import TinyViT
        >>> sn = SupernetModule(TinyViT(dim=16, depth=2, num_heads=2), F.cross_entropy,
        ...                     example_input=torch.randn(1, 1, 8, 8))  # verified once at construction
        >>> verify_supernet(sn)  # every dim of this model slices correctly: nothing to leave fixed
        {}
    """
    space = supernet.search_space
    from lightning.fabric.utilities.apply_func import move_data_to_device

    example = move_data_to_device(supernet.example_input_array, supernet.device)
    runner = _Runner(supernet, example)
    largest, smallest = space.largest(), space.smallest()
    # widths and heads before keep flags: a dim inside a skipped block could not show its effect
    names = sorted(space.dims, key=lambda n: space.dims[n].kind == "depth")
    bad: dict[str, str] = {}

    # 1. the smallest subnet runs, in eval mode and in train mode
    for train in (False, True):
        if train and _describe_crash(runner, largest, True) is not None:
            continue  # the full model itself cannot run in train mode on this input (e.g. BatchNorm on batch 1)
        if _describe_crash(runner, smallest, train) is not None:
            bad.update(_shrink_one_at_a_time(space, names, lambda c, t=train: _describe_crash(runner, c, t),
                                             largest, lambda n: _smallest_value(space, n)))
            return bad

    # 2. slicing a width or head group computes what removing those channels/heads computes
    groups = _masked_groups(supernet)

    def removal_differs(cfg: SubnetConfig) -> str | None:
        # with every block kept, a dim may crash that the smallest subnet (with blocks skipped) never ran
        crash = _describe_crash(runner, cfg, False)
        if crash is not None:
            return crash
        sliced = runner(cfg)
        with _removed(groups, cfg):
            removed = runner(largest)
        diff = max_rel_diff(removed, sliced)
        if diff <= TOLERANCE:
            return None
        return (f"slicing it does not compute what removing those channels/heads computes (relative difference "
                f"{diff:.2g}): the module's layout or a size attribute is not what its adapter assumed")

    if groups:
        shrunk = space.validate({**largest, **{n: space.dims[n].smallest for n in groups}})
        if removal_differs(shrunk) is not None:
            bad.update(_shrink_one_at_a_time(space, list(groups), removal_differs, largest,
                                             lambda n: _smallest_value(space, n)))
            return bad

    # 3. the same answer with autograd off (how Lightning validates); hooks would switch fast paths off, so the
    # dims that cause a difference are found by shrinking them one at a time
    for grad, label in (("no_grad", "torch.no_grad()"), ("inference", "torch.inference_mode()")):
        def differs(cfg: SubnetConfig, grad: str = grad, label: str = label) -> str | None:
            diff = max_rel_diff(runner(cfg), runner(cfg, grad=grad))
            if diff <= TOLERANCE:
                return None
            return (f"under {label} the subnet computes another result than with autograd on (relative difference "
                    f"{diff:.2g}): a fused fast path inside {{where}} reads the full weights, not the sliced ones")

        if differs(smallest) is not None:
            found = _shrink_one_at_a_time(space, names, differs, largest, lambda n: _smallest_value(space, n))
            bad.update({n: why.format(where=_enclosing(supernet, n)) for n, why in found.items()})
            if not found:
                raise UnsupportedModelError(differs(smallest).format(where=f"`{type(supernet.model).__name__}`"))
            return bad
    return bad


def _dim_members(supernet: SupernetModule, name: str) -> list[str]:
    """The module paths dim ``name`` slices or skips."""
    found = supernet.discovery
    for w in found.widths:
        if w.name == name:
            return list(w.members)
    for h in found.heads:
        if h.name == name:
            return [h.path]
    for b in found.blocks:
        if b.name == name:
            return [b.path]
    return []
