"""Forward every LightningModule hook of :class:`~lightning_supernet.SupernetModule` to the wrapped module.

The table is Lightning's own: every public method of ``ModelHooks``, ``DataHooks`` and ``CheckpointHooks``
(:mod:`lightning.pytorch.core.hooks`) plus the LightningModule hooks that drive optimisation
(:data:`EXTRA_HOOKS`). A hook the wrapped LightningModule overrides is called on it (with the trainer and the
current hook name visible, so its ``self.log`` works); a hook it does not override keeps Lightning's default
on the wrapper. Forwarding is decided per call, so ``is_overridden(name, supernet)`` answers as it would for
the wrapped module: a module that defines ``train_dataloader`` trains with ``trainer.fit(supernet)``, and one
that does not keeps Lightning's "no dataloader" behaviour.

Hooks the wrapper implements itself (:data:`CHAINED_HOOKS`: it does its own work there, e.g. clipping in
``on_before_optimizer_step``) call the wrapped module's hook too.

Example:
    >>> "train_dataloader" in lightning_hook_names() and "on_after_backward" in lightning_hook_names()
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.core.hooks import CheckpointHooks, DataHooks, ModelHooks
from lightning.pytorch.utilities.model_helpers import is_overridden

__all__ = ["CHAINED_HOOKS", "EXTRA_HOOKS", "HOOK_CLASSES", "forward_hooks", "lightning_hook_names"]

HOOK_CLASSES = (ModelHooks, DataHooks, CheckpointHooks)

#: LightningModule hooks outside the three hook classes that the step loop calls (so users' overrides apply).
EXTRA_HOOKS = ("configure_callbacks", "lr_scheduler_step", "optimizer_step", "optimizer_zero_grad",
               "configure_gradient_clipping")

#: hooks ``SupernetModule`` implements itself; each also calls the wrapped module's hook.
CHAINED_HOOKS = ("on_before_optimizer_step", "on_train_epoch_end", "on_validation_epoch_start",
                 "on_test_epoch_start", "on_save_checkpoint", "on_load_checkpoint", "configure_callbacks",
                 "teardown", "on_fit_start", "on_validation_start", "on_test_start", "on_predict_start")


def lightning_hook_names() -> list[str]:
    """Every hook name of Lightning's ``ModelHooks``, ``DataHooks``, ``CheckpointHooks`` and :data:`EXTRA_HOOKS`.

    Example:
        >>> "on_before_zero_grad" in lightning_hook_names()
        True
    """
    names = [n for cls in HOOK_CLASSES for n, v in vars(cls).items() if callable(v) and not n.startswith("_")]
    return list(dict.fromkeys(names + list(EXTRA_HOOKS)))


def _forwarder(name: str) -> property:
    base = getattr(pl.LightningModule, name)

    def get(self: Any) -> Callable[..., Any]:
        if name in self.__dict__:  # set on the instance (e.g. ``mock.patch.object``): that wins
            return self.__dict__[name]
        inner = self._inner_lm
        if inner is not None and is_overridden(name, inner):

            def forward(*args: Any, **kwargs: Any) -> Any:
                return self._inner(name, *args, **kwargs)

            forward.__name__ = forward.__qualname__ = name
            return forward
        return base.__get__(self)

    def set_(self: Any, value: Any) -> None:
        self.__dict__[name] = value

    def del_(self: Any) -> None:
        self.__dict__.pop(name, None)

    return property(get, set_, del_,
                    doc=f"The wrapped LightningModule's ``{name}`` when it overrides it, else Lightning's.")


def forward_hooks(cls: type) -> type:
    """Class decorator: every hook of :func:`lightning_hook_names` that ``cls`` does not define itself becomes a
    property returning the wrapped module's override (or Lightning's default); hooks ``cls`` (or a base below
    ``LightningModule``) defines are left alone. ``cls`` needs ``_inner_lm`` (the
    wrapped LightningModule or ``None``) and ``_inner(name, *args)`` (calls it).

    Example:
        >>> import lightning.pytorch as pl
        >>> @forward_hooks
        ... class Wrapper(pl.LightningModule):
        ...     def __init__(self, inner):
        ...         super().__init__()
        ...         self.inner = inner
        ...     _inner_lm = property(lambda self: self.inner)
        ...     def _inner(self, name, *args, **kwargs):
        ...         return getattr(self.inner, name)(*args, **kwargs)
        >>> class User(pl.LightningModule):
        ...     def prepare_data(self):
        ...         return "prepared"
        >>> Wrapper(User()).prepare_data()
        'prepared'
    """
    own = set()
    for base in cls.__mro__:
        if base is pl.LightningModule:
            break
        own.update(vars(base))
    for name in lightning_hook_names():
        if name not in own:  # the wrapper's own hooks (CHAINED_HOOKS) call the wrapped module's themselves
            setattr(cls, name, _forwarder(name))
    return cls
