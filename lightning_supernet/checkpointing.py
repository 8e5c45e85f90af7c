"""What a ``SupernetModule`` checkpoint stores so that ``SupernetModule.load_from_checkpoint(path)`` rebuilds it.

Lightning rebuilds a module from ``checkpoint["hyper_parameters"]`` (``cls(**hparams)``), then loads the state dict.
The wrapper's hyper-parameters are:

* ``model``: ``{"class_path": "pkg.Module", "init_args": {...}}`` when the wrapped model can be rebuilt: a
  LightningModule that called ``save_hyperparameters()`` (its ``hparams`` are the ``init_args``) or whose class takes
  no required argument, or a model that was itself given as such a mapping. Otherwise ``None``, and loading needs
  ``load_from_checkpoint(path, model=MyNet(...))``.
* ``loss_fn``, ``output_transform``, ``optimizer``: the callable's import path (``"torch.nn.functional.cross_entropy"``)
  when it has one, else ``None`` (pass it again when loading).
* ``example_input`` (only when the wrapped model has no ``example_input_array``), ``space``, ``eval_subnets``,
  ``gradient_clip_val``, ``gradient_clip_algorithm``, ``accumulate_grad_batches``.

As Lightning guards its own ``class_path``, classes and callables are resolved only from modules already imported
(import your model's module before loading), so a checkpoint cannot make the loader import new code.

Example:
    >>> import torch.nn.functional as F
    >>> callable_path(F.cross_entropy)
    'torch.nn.functional.cross_entropy'
    >>> resolve("torch.nn.functional.cross_entropy", "loss_fn") is F.cross_entropy
    True
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_supernet.errors import ArgumentError

__all__ = ["build_model", "callable_path", "model_spec", "resolve"]


def _lookup(path: str) -> Any:
    """The object at dotted ``path`` from an already imported module, or ``None``."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if module is None:
            continue
        obj: Any = module
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def callable_path(fn: Any) -> str | None:
    """``"module.qualname"`` of a function or class that can be found again by that path, else ``None``.

    Example:
        >>> callable_path(lambda x: x) is None
        True
    """
    if fn is None or isinstance(fn, str):
        return fn
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not name or "<" in name:
        return None
    path = f"{module}.{name}"
    return path if _lookup(path) is fn else None


def resolve(value: Any, argument: str) -> Any:
    """``value`` itself, or the callable a dotted path names (from an already imported module).

    Raises:
        ArgumentError: the path names nothing imported.

    Example:
        >>> resolve(None, "loss_fn") is None
        True
    """
    if not isinstance(value, str):
        return value
    obj = _lookup(value)
    if obj is None or not callable(obj):
        raise ArgumentError(f"`{argument}={value!r}` names nothing callable in an imported module. HINT: import the "
                            f"module that defines it before loading, or pass `{argument}=` the object itself")
    return obj


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` that rebuilds ``model``, or ``None`` when its constructor arguments are unknown.

    Example:
        >>> from lightning_supernet.models import TinyViT
        >>> model_spec(TinyViT()) is None  # a plain nn.Module: its arguments were not recorded
        True
    """
    import lightning.pytorch as pl

    path = callable_path(type(model))
    if path is None or not isinstance(model, pl.LightningModule):
        return None
    hparams = dict(model.hparams)
    required = [p for p in list(inspect.signature(type(model).__init__).parameters.values())[1:]
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not hparams and required:
        return None
    return {"class_path": path, "init_args": hparams}


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Instantiate ``{"class_path": ..., "init_args": {...}}`` (the class must already be imported).

    Raises:
        ArgumentError: a malformed mapping, or a class that is not an imported ``nn.Module``.

    Example:
        >>> import lightning_supernet.models
        >>> type(build_model({"class_path": "lightning_supernet.models.TinyViT", "init_args": {"dim": 16}})).__name__
        'TinyViT'
    """
    if set(spec) - {"class_path", "init_args"} or "class_path" not in spec:
        raise ArgumentError(f"`model` as a mapping must be {{'class_path': 'pkg.Module', 'init_args': {{...}}}}, got "
                            f"keys {sorted(spec)}")
    cls = _lookup(str(spec["class_path"]))
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ArgumentError(f"`model['class_path']={spec['class_path']!r}` is not an nn.Module class of an imported "
                            "module. HINT: import the module that defines it first, or pass `model=` an instance")
    return cls(**dict(spec.get("init_args") or {}))


def supernet_hparams(model: Any, loss_fn: Any, example_input: Any, space: Any, output_transform: Any,
                     optimizer: Any, eval_subnets: Any, clip: Any, algorithm: str, accumulate: int) -> dict[str, Any]:
    """The hyper-parameters a ``SupernetModule`` saves (see the module docstring); plain, checkpoint-safe values.

    Example:
        >>> supernet_hparams(None, None, None, None, None, None, ("largest",), None, "norm", 1)["eval_subnets"]
        ['largest']
    """
    import dataclasses

    spec = dict(model) if isinstance(model, Mapping) else model_spec(model)
    has_example = getattr(model, "example_input_array", None) is not None if isinstance(model, nn.Module) else False
    if isinstance(eval_subnets, Mapping):
        evals: Any = {str(k): v if isinstance(v, str) else dict(v) for k, v in eval_subnets.items()}
    else:
        evals = None if eval_subnets is None else list(eval_subnets)
    return {"model": spec, "loss_fn": callable_path(loss_fn), "example_input": None if has_example else example_input,
            "space": dataclasses.asdict(space) if dataclasses.is_dataclass(space) else space,
            "output_transform": callable_path(output_transform), "optimizer": callable_path(optimizer),
            "eval_subnets": evals, "gradient_clip_val": clip, "gradient_clip_algorithm": algorithm,
            "accumulate_grad_batches": accumulate}
