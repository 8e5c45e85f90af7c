"""Saving and reloading extracted subnets whose shape a model's own constructor cannot describe.

An extracted subnet is the user's class with smaller tensors (and fewer blocks). When the model's constructor
(a Hugging Face config, ``build_sam``'s arguments) cannot express its shape, e.g. a different MLP width in every
layer, the subnet is saved as three things: how to build a *reference* model of the same class (the full-size
constructor arguments), a *layout* (the blocks kept, every tensor shape and scalar attribute that differs from the
reference) and the weights. Reloading builds the reference, applies the layout and loads the weights strictly, so
a mismatch is an error, never a silent re-initialisation.

The integrations (:mod:`lightning_supernet.integrations.transformers`, ``segment_anything``) use this module; its
functions are the shared mechanism, not a user-facing API.

Example:
    >>> import torch, torch.nn as nn
    >>> full = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> small = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> layout = layout_diff(small, full)
    >>> layout["shapes"]["0.weight"], layout["attrs"]["0"]
    ([3, 4], {'out_features': 3})
    >>> rebuilt = apply_layout(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), layout)
    >>> rebuilt[0].weight.shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_supernet.errors import SupernetError

__all__ = ["FORMAT", "SubnetFormatError", "apply_layout", "keep_blocks", "layout_diff", "load_subnet_dir",
           "load_weights", "read_layout", "write_subnet"]

#: the ``format`` field of ``subnet.json``.
FORMAT = "lightning-supernet-subnet"
LAYOUT_FILE = "subnet.json"
WEIGHTS_FILE = "subnet.safetensors"
_SCALARS = (bool, int, float, str, type(None))


class SubnetFormatError(SupernetError, ValueError):
    """A subnet cannot be saved in the requested format, or a saved subnet cannot be reloaded.

    Example:
        >>> issubclass(SubnetFormatError, ValueError)
        True
    """


def _plain(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value)


def _tensors(mod: nn.Module) -> dict[str, torch.Tensor | None]:
    return {**mod._parameters, **mod._buffers}


def keep_blocks(model: nn.Module, kept: Mapping[str, Sequence[int]]) -> nn.Module:
    """Remove the blocks not listed in ``kept`` (``{container path: [indices to keep]}``) from ``model``, in place.

    Example:
        >>> m = nn.Sequential(nn.Identity(), nn.ReLU(), nn.Tanh())
        >>> [type(c).__name__ for c in keep_blocks(m, {"": [0, 2]})]
        ['Identity', 'Tanh']
    """
    from lightning_supernet.extract import _drop_children

    for path, indices in kept.items():
        container = model.get_submodule(path) if path else model
        names = [n for n, _ in container.named_children()]
        bad = [i for i in indices if not 0 <= int(i) < len(names)]
        if bad:
            raise SubnetFormatError(f"block index {bad[0]} of `{path}` is out of range; it has {len(names)} blocks")
        keep = {names[int(i)] for i in indices}
        if len(keep) < len(names):
            if not path:
                kept_mods = [m for n, m in container.named_children() if n in keep]
                container._modules.clear()
                for i, m in enumerate(kept_mods):
                    container._modules[str(i)] = m
            else:
                _drop_children(model, path, set(names) - keep)
    return model


def layout_diff(model: nn.Module, reference: nn.Module) -> dict[str, Any]:
    """What differs between ``model`` and a ``reference`` with the same module tree.

    Returns ``{"shapes": {tensor name: shape}, "attrs": {module path: {attribute: value}}}``: every parameter or
    persistent buffer whose shape differs, and every public scalar attribute (``out_features``, ``num_heads``,
    ``normalized_shape``...) whose value differs.

    Raises:
        SubnetFormatError: the module trees differ, or a non-persistent buffer changed shape (it is not saved, so
            it could not be restored).

    Example:
        >>> layout_diff(nn.Linear(2, 3), nn.Linear(2, 3))
        {'shapes': {}, 'attrs': {}}
    """
    ref_mods = dict(reference.named_modules())
    mods = dict(model.named_modules())
    missing = [p for p in mods if p not in ref_mods] + [p for p in ref_mods if p not in mods]
    if missing:
        raise SubnetFormatError(
            f"module `{missing[0]}` exists in only one of the subnet and the rebuilt reference "
            f"(`{type(model).__name__}`); their module trees must match to describe the subnet by a layout"
        )
    shapes: dict[str, list[int]] = {}
    attrs: dict[str, dict[str, Any]] = {}
    for path, mod in mods.items():
        ref = ref_mods[path]
        ref_t = _tensors(ref)
        for name, t in _tensors(mod).items():
            full = f"{path}.{name}" if path else name
            other = ref_t.get(name)
            if (t is None) != (other is None):
                raise SubnetFormatError(f"tensor `{full}` is {'absent' if t is None else 'present'} in the subnet "
                                        "but not in the rebuilt reference; the constructor arguments disagree")
            if t is None or tuple(t.shape) == tuple(other.shape):
                continue
            if name in mod._buffers and name in mod._non_persistent_buffers_set:
                raise SubnetFormatError(f"non-persistent buffer `{full}` has shape {tuple(t.shape)}, the reference "
                                        f"{tuple(other.shape)}; it is not saved, so the subnet cannot be rebuilt")
            shapes[full] = list(t.shape)
        ref_vars = vars(ref)
        for key, value in vars(mod).items():
            if key.startswith("_") or key == "training" or not _plain(value):
                continue
            if key not in ref_vars or ref_vars[key] != value:
                attrs.setdefault(path, {})[key] = list(value) if isinstance(value, tuple) else value
    return {"shapes": shapes, "attrs": attrs}


def apply_layout(reference: nn.Module, layout: Mapping[str, Any]) -> nn.Module:
    """Give ``reference`` the layout's blocks, attributes and (empty) tensor shapes, in place; returns it.

    The tensors of changed shape are uninitialised: load the subnet's weights next.

    Example:
        >>> layout = {"shapes": {"weight": [2, 4], "bias": [2]}, "attrs": {"": {"out_features": 2}}}
        >>> apply_layout(nn.Linear(4, 4), layout)
        Linear(in_features=4, out_features=2, bias=True)
    """
    keep_blocks(reference, layout.get("kept", {}))
    for path, values in layout.get("attrs", {}).items():
        mod = reference.get_submodule(path) if path else reference
        for key, value in values.items():
            current = getattr(mod, key, None)
            setattr(mod, key, tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value)
    for full, shape in layout.get("shapes", {}).items():
        path, _, name = full.rpartition(".")
        mod = reference.get_submodule(path) if path else reference
        old = _tensors(mod).get(name)
        if old is None:
            raise SubnetFormatError(f"the layout names tensor `{full}`, which the rebuilt model does not have")
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if name in mod._parameters:
            mod._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            mod._buffers[name] = new
    return reference


def write_subnet(model: nn.Module, path: str | os.PathLike, builder: Mapping[str, Any],
                 layout: Mapping[str, Any]) -> None:
    """Write ``subnet.json`` (builder + layout) and ``subnet.safetensors`` (the weights) into directory ``path``.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); write_subnet(nn.Linear(2, 2), d, {"kind": "test"}, {"shapes": {}, "attrs": {}})
        >>> sorted(os.listdir(d))
        ['subnet.json', 'subnet.safetensors']
    """
    from safetensors.torch import save_model

    from lightning_supernet.files import atomic_path, atomic_write

    os.makedirs(path, exist_ok=True)
    doc = {"format": FORMAT, "version": 1, "builder": dict(builder), **layout}
    with atomic_path(os.path.join(path, WEIGHTS_FILE)) as tmp:  # weights first: a layout always has its weights
        save_model(model, tmp)
    with atomic_write(os.path.join(path, LAYOUT_FILE), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)


def read_layout(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the ``subnet.json`` of a directory written by :func:`write_subnet`.

    Raises:
        SubnetFormatError: ``path`` is not such a directory.

    Example:
        >>> read_layout("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        SubnetFormatError: ...
    """
    file = os.path.join(path, LAYOUT_FILE)
    if not os.path.isfile(file):
        raise SubnetFormatError(f"`path` {str(path)!r} holds no {LAYOUT_FILE}; allowed: a directory written by "
                                "`save_subnet` (a `save_pretrained` directory loads with `from_pretrained`)")
    try:
        with open(file, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SubnetFormatError(f"{file} cannot be read ({type(err).__name__}: {err}); expected the JSON layout "
                                "written by `save_subnet` (the file is truncated or corrupted)") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("builder", {}), dict):
        raise SubnetFormatError(f"{file} holds a {type(doc).__name__} without a `builder` mapping; expected the JSON "
                                "layout written by `save_subnet`")
    if doc.get("format") != FORMAT:
        raise SubnetFormatError(f"{file} has format {doc.get('format')!r}; expected {FORMAT!r}")
    return doc


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load ``subnet.safetensors`` from directory ``path`` into ``model`` strictly; returns the model.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); write_subnet(nn.Linear(2, 2), d, {}, {})
        >>> isinstance(load_weights(nn.Linear(2, 2), d), nn.Linear)
        True
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise SubnetFormatError(f"{file} does not exist; expected the weights written by `save_subnet`")
    try:
        load_model(model, file, strict=True)
    except (SafetensorError, OSError, ValueError) as err:
        raise SubnetFormatError(f"{file} cannot be read ({type(err).__name__}: {err}); expected the safetensors "
                                "weights written by `save_subnet` (the file is truncated or corrupted)") from err
    except RuntimeError as err:
        raise SubnetFormatError(
            f"the weights in {path} do not fit the rebuilt `{type(model).__name__}`: {err}") from err
    return model


def load_subnet_dir(path: str | os.PathLike, build: Callable[[Mapping[str, Any], str], nn.Module]) -> nn.Module:
    """Rebuild a subnet saved by :func:`write_subnet`: ``build(builder, path)`` gives the reference model.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); small = nn.Linear(4, 2)
        >>> write_subnet(small, d, {"kind": "linear"}, layout_diff(small, nn.Linear(4, 8)))
        >>> load_subnet_dir(d, lambda builder, path: nn.Linear(4, 8)).out_features
        2
    """
    doc = read_layout(path)
    model = apply_layout(build(doc["builder"], str(path)), doc)
    return load_weights(model, path)
