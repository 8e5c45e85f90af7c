"""Run-lifecycle hooks of :class:`~lightning_supernet.SupernetModule`: take the Trainer's clipping/accumulation
flags, and re-apply the active subnet after Lightning replaced modules.

Lightning refuses ``Trainer(gradient_clip_val=...)`` and ``Trainer(accumulate_grad_batches=...)`` under manual
optimisation, which the multi-subnet step needs; ``configure_callbacks`` runs just before that check, so the wrapper
takes the values there (its step loop clips after AMP unscaling and accumulates itself) and gives them back in
``teardown``. ``Trainer(sync_batchnorm=True)`` (and other plugins) replace modules in the strategy's set-up, after
the wrapper's ``setup`` hook; the ``on_*_start`` hooks re-apply every dim of the active subnet, which makes the
replaced modules elastic again even when a smaller subnet is pinned (``with supernet.subnet(cfg): trainer.validate``).

Example:
    >>> from lightning_supernet import SupernetModule
    >>> issubclass(SupernetModule, LifecycleMixin)
    True
"""

from __future__ import annotations

from typing import Any

from lightning_supernet.errors import InvalidArgumentError

__all__ = ["LifecycleMixin"]


class LifecycleMixin:
    """Trainer-flag takeover and module-replacement refresh of ``SupernetModule`` (see the module docstring).

    Example:
        >>> from lightning_supernet import SupernetModule
        >>> issubclass(SupernetModule, LifecycleMixin)
        True
    """

    def configure_callbacks(self) -> Any:
        """Take the Trainer's ``gradient_clip_val`` / ``accumulate_grad_batches`` (Lightning refuses them under
        the manual optimisation the multi-subnet step needs, and this hook runs just before it checks); then the
        wrapped module's ``configure_callbacks``."""
        trainer = self.trainer
        taken = {"gradient_clip_val": trainer.gradient_clip_val, "accumulate_grad_batches":
                 trainer.accumulate_grad_batches, "gradient_clip_algorithm": trainer.gradient_clip_algorithm}
        mine = {"gradient_clip_val": self.gradient_clip_val, "accumulate_grad_batches": self.accumulate_grad_batches,
                "gradient_clip_algorithm": self.gradient_clip_algorithm}
        default = {"gradient_clip_val": None, "accumulate_grad_batches": 1, "gradient_clip_algorithm": "norm"}
        for key in ("gradient_clip_val", "accumulate_grad_batches"):
            if taken[key] in (None, default[key]) or (key == "gradient_clip_val" and not taken[key]) \
                    or taken[key] == mine[key]:
                continue
            if mine[key] != default[key]:
                raise InvalidArgumentError(
                    f"`Trainer({key}={taken[key]!r})` and `SupernetModule({key}={mine[key]!r})` disagree: set it "
                    "in one place"
                )
            setattr(self, key, taken[key])
            if key == "gradient_clip_val" and taken["gradient_clip_algorithm"] is not None:
                self.gradient_clip_algorithm = str(getattr(taken["gradient_clip_algorithm"], "value",
                                                           taken["gradient_clip_algorithm"]))
        if taken["gradient_clip_val"] not in (None, 0) or taken["accumulate_grad_batches"] != 1:
            self._taken_from_trainer = (taken, mine)
            trainer.gradient_clip_val, trainer.gradient_clip_algorithm = None, None
            trainer.accumulate_grad_batches = 1
        if self._inner_lm is not None:
            return self._inner("configure_callbacks")
        return []

    def teardown(self, stage: str) -> None:
        """Give the Trainer back its clipping/accumulation flags; then the wrapped module's ``teardown``."""
        taken = self.__dict__.pop("_taken_from_trainer", None)
        if taken is not None:
            trainer_flags, mine = taken
            for key, value in trainer_flags.items():
                setattr(self.trainer, key, value)
            for key, value in mine.items():
                setattr(self, key, value)
        if self._inner_lm is not None:
            self._inner("teardown", stage)

    def refresh(self) -> None:
        """Re-apply every dim of the active subnet (modules replaced since, e.g. by ``sync_batchnorm``, become
        elastic again at the active sizes).

        Example:
            >>> import torch, torch.nn.functional as F
            >>> from lightning_supernet import SupernetModule
            >>> from lightning_supernet.models import ResNetLike
            >>> sn = SupernetModule(ResNetLike(), F.cross_entropy, example_input=torch.randn(1, 1, 8, 8))
            >>> sn.refresh()
        """
        for name, apply in self._appliers.items():
            apply(self._active[name])

    def _refresh_then(self, hook: str) -> Any:
        self.refresh()
        if self._inner_lm is not None:
            return self._inner(hook)
        return None

    def on_fit_start(self) -> Any:
        """Re-apply the active subnet (see :meth:`refresh`); then the wrapped module's hook."""
        return self._refresh_then("on_fit_start")

    def on_validation_start(self) -> Any:
        """Re-apply the active subnet (see :meth:`refresh`); then the wrapped module's hook."""
        return self._refresh_then("on_validation_start")

    def on_test_start(self) -> Any:
        """Re-apply the active subnet (see :meth:`refresh`); then the wrapped module's hook."""
        return self._refresh_then("on_test_start")

    def on_predict_start(self) -> Any:
        """Re-apply the active subnet (see :meth:`refresh`); then the wrapped module's hook."""
        return self._refresh_then("on_predict_start")
