"""Physical export of a subnet: a deep copy of the user's model, same classes, smaller tensors.

Each elastic module clones its active slices into new parameters and gets its own class back (``nn.Linear`` with
the smaller ``in_features``/``out_features``...), attention modules keep the active head count in their head
attribute, and skipped blocks are removed from their ``ModuleList``/``Sequential``. Integrations register
finalisers (e.g. to update a Hugging Face config) with :func:`register_finalizer`.

Example:
    >>> import torch
    >>> from lightning_supernet import SupernetModule
    >>> from lightning_supernet.models import TinyViT
    >>> import torch.nn.functional as F
    >>> sn = SupernetModule(TinyViT(dim=32, depth=2, num_heads=2), F.cross_entropy, example_input=torch.randn(1, 1, 8, 8))
    >>> small = sn.extract(sn.search_space.smallest()); type(small).__name__
    'TinyViT'
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_supernet.elastic.base import ElasticMixin
from lightning_supernet.elastic.depth import SkippableBlock
from lightning_supernet.elastic.registry import is_elastic, restore

if TYPE_CHECKING:
    from lightning_supernet.module import SupernetModule
    from lightning_supernet.space import SubnetConfig

__all__ = ["extract_model", "register_finalizer"]

Finalizer = Callable[[nn.Module, "SubnetConfig", "SupernetModule"], None]
_FINALIZERS: list[Finalizer] = []


def register_finalizer(fn: Finalizer) -> Finalizer:
    """Register ``fn(small_model, cfg, supernet)``, run on every extracted model before it is returned.

    Example:
        >>> @register_finalizer
        ... def note(small, cfg, supernet):
        ...     small.extracted_from = cfg
        >>> _FINALIZERS.remove(note)
    """
    _FINALIZERS.append(fn)
    return fn


def extract_model(supernet: SupernetModule, cfg: SubnetConfig) -> nn.Module:
    """The subnet ``cfg`` of ``supernet`` as a standalone model (see the module docstring).

    Args:
        supernet: the supernet; its own state is unchanged.
        cfg: a validated config of its search space.

    Example:
        >>> import torch
        >>> from lightning_supernet import SupernetModule
        >>> from lightning_supernet.models import ResNetLike
        >>> import torch.nn.functional as F
        >>> sn = SupernetModule(ResNetLike(), F.cross_entropy, example_input=torch.randn(1, 1, 8, 8))
        >>> extract_model(sn, sn.search_space.smallest()).layers[0][0].conv1.out_channels
        2
    """
    with supernet.subnet(cfg):
        small = copy.deepcopy(supernet.model, _detached_caches(supernet.model))
    skipped: dict[str, list[int]] = {}
    for path, mod in list(small.named_modules()):
        if isinstance(mod, SkippableBlock) and mod.skipped:
            stack, _, name = path.rpartition(".")
            skipped.setdefault(stack, []).append(name)
    # inner stacks first: dropping an outer stack's blocks renumbers the paths of the stacks inside it
    for stack in sorted(skipped, key=lambda p: p.count(".") + bool(p), reverse=True):
        _drop_children(small, stack, set(skipped[stack]))
    for mod in small.modules():  # pre-order: a container exports before the modules inside it
        if isinstance(mod, ElasticMixin) or hasattr(type(mod), "export_"):
            mod.export_()
        exported_as = mod.__dict__.pop("_exported_as", None)  # a class that can hold the smaller shape
        if is_elastic(mod):
            restore(mod)
        if exported_as is not None:
            mod.__class__ = exported_as
    _clear_trainer(small)
    for fn in _FINALIZERS:
        fn(small, cfg, supernet)
    return small


def _detached_caches(model: nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo that copies tensors a module caches outside its parameters and buffers (timm LeViT's
    ``attention_bias_cache``, filled by an eval-mode forward with autograd on) as detached copies: autograd results
    cannot be deep-copied."""
    memo: dict[int, Any] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for mod in model.modules():
        for key, value in mod.__dict__.items():
            if key not in ("_parameters", "_buffers", "_modules"):
                visit(value)
    return memo


def _drop_children(root: nn.Module, path: str, names: set[str]) -> None:
    """Remove the skipped children ``names`` of the container at ``path`` (``""``: the model itself is the stack),
    renumbering the kept ones ``0..k-1`` like a freshly built ``ModuleList``/``Sequential``."""
    container = root.get_submodule(path) if path else root
    if not isinstance(container, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f"cannot remove blocks from `{path or type(root).__name__}` ({type(container).__name__})")
    kept = [m for n, m in container.named_children() if n not in names]
    # in place: the container object may be the model itself, or be referenced elsewhere in the copy
    container._modules = OrderedDict((str(i), m) for i, m in enumerate(kept))


def _clear_trainer(model: nn.Module) -> None:
    for mod in model.modules():
        if "_trainer" in mod.__dict__:
            mod._trainer = None
