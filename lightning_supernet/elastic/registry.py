"""Turning a module into its elastic form in place, and back.

An elastic op is a mixin put in front of the module's own class (``type(m)`` becomes
``ElasticLinear(torch/nn/modules/linear:Linear)``, a subclass of the original), so the module keeps its
object identity, its parameters, its ``state_dict`` keys and ``isinstance`` checks; only ``forward`` reads the
active widths. :func:`restore` puts the original class back. The generated classes pickle by name through this
module's ``__getattr__``, so wrapped models survive ``torch.save``, ``deepcopy`` and ``ddp_spawn``.

Example:
    >>> import torch.nn as nn
    >>> from lightning_supernet.elastic.linear import ElasticLinear
    >>> lin = nn.Linear(4, 8)
    >>> make_elastic(lin, ElasticLinear)
    >>> isinstance(lin, nn.Linear), is_elastic(lin)
    (True, True)
    >>> restore(lin); type(lin) is nn.Linear
    True
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

__all__ = ["elastic_class", "is_elastic", "make_elastic", "original_class", "restore"]

_MIXINS: dict[str, type] = {}
_CLASSES: dict[tuple[type, type], type] = {}


def _encode(cls: type) -> str:
    return f"{cls.__module__.replace('.', '/')}:{cls.__qualname__.replace('.', '/')}"


def _decode(text: str) -> type:
    module_name, qualname = text.split(":")
    obj: Any = importlib.import_module(module_name.replace("/", "."))
    for part in qualname.split("/"):
        obj = getattr(obj, part)
    return obj


def elastic_class(mixin: type | tuple[type, ...], base: type) -> type:
    """Return the (cached) class ``mixins + base`` used for an elastic module.

    Args:
        mixin: an elastic mixin such as :class:`~lightning_supernet.elastic.linear.ElasticLinear`, or several
            (outermost first: a skippable block that is also a fast-path guard).
        base: the module's original class.

    Example:
        >>> from lightning_supernet.elastic.linear import ElasticLinear
        >>> elastic_class(ElasticLinear, nn.Linear).__name__
        'ElasticLinear(torch/nn/modules/linear:Linear)'
    """
    mixins = mixin if isinstance(mixin, tuple) else (mixin,)
    key = (mixins, base)
    if key not in _CLASSES:
        for m in mixins:
            _MIXINS[m.__name__] = m
        name = f"{'+'.join(m.__name__ for m in mixins)}({_encode(base)})"
        cls = type(name, (*mixins, base), {"__module__": __name__, "__qualname__": name, "_original_class": base,
                                           "_mixins": mixins})
        _CLASSES[key] = cls
    return _CLASSES[key]


def __getattr__(name: str) -> type:  # PEP 562: lets pickle find generated classes by name
    if "(" in name and name.endswith(")"):
        mixin_names, base = name[:-1].split("(", 1)
        names = mixin_names.split("+")
        if any(n not in _MIXINS for n in names):  # a fresh process (spawn, torch.load): register the built-in mixins
            elastic = importlib.import_module("lightning_supernet.elastic")
            for attr in elastic.__all__:
                obj = getattr(elastic, attr)
                if isinstance(obj, type) and hasattr(obj, "init_elastic"):
                    _MIXINS.setdefault(obj.__name__, obj)
        missing = [n for n in names if n not in _MIXINS]
        if missing:
            raise AttributeError(f"unknown elastic mixin {missing[0]!r} (defined in a module not imported here?)")
        return elastic_class(tuple(_MIXINS[n] for n in names), _decode(base))
    raise AttributeError(name)


def make_elastic(module: nn.Module, mixin: type, **state: Any) -> None:
    """Put the elastic ``mixin`` in front of ``module``'s class and initialise its state (full widths).

    A module that is elastic already keeps its mixins and gains this one (outermost); a mixin it has is not added
    twice.

    Args:
        module: the module to change in place.
        mixin: the elastic mixin.
        **state: extra attributes for the mixin (e.g. ``out_blocks=3`` for a fused qkv projection).

    Example:
        >>> from lightning_supernet.elastic.linear import ElasticLinear
        >>> m = nn.Linear(2, 2); make_elastic(m, ElasticLinear); m.active_out_features is None
        True
    """
    mixins = type(module).__dict__.get("_mixins", ())
    if mixin not in mixins:
        module.__class__ = elastic_class((mixin, *mixins), original_class(module))
        init = mixin.__dict__.get("init_elastic")
        if init is not None:
            init(module)
        for key in mixin.__dict__.get("_elastic_attrs", ()):
            if key not in module.__dict__:
                setattr(module, key, None)  # every elastic attribute starts at None: the full module
    for key, value in state.items():
        setattr(module, key, value)


def is_elastic(module: nn.Module) -> bool:
    """Whether ``module`` has been made elastic.

    Example:
        >>> is_elastic(nn.Linear(2, 2))
        False
    """
    return "_original_class" in type(module).__dict__


def original_class(module: nn.Module) -> type:
    """The class the module had before :func:`make_elastic`.

    Example:
        >>> original_class(nn.ReLU()) is nn.ReLU
        True
    """
    return type(module).__dict__.get("_original_class", type(module))


def restore(module: nn.Module) -> None:
    """Put the original class back; the mixin's attributes are removed.

    Example:
        >>> from lightning_supernet.elastic.linear import ElasticLinear
        >>> m = nn.Linear(2, 2); make_elastic(m, ElasticLinear); restore(m); hasattr(m, "active_out_features")
        False
    """
    if not is_elastic(module):
        return
    for mixin in type(module).__dict__["_mixins"]:
        for key in mixin.__dict__.get("_elastic_attrs", ()):
            module.__dict__.pop(key, None)
    module.__class__ = original_class(module)
