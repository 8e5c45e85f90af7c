"""The multi-subnet step loop and multi-subnet validation of :class:`~lightning_supernet.SupernetModule`.

Callbacks are policies: each step the module asks the trainer's callbacks for the step's *plan* (which subnets,
with which loss terms and weights), then runs the subnets one at a time — forward through the user's own
``training_step``, ``manual_backward`` — so peak memory is that of one subnet. Under DDP every backward but the
last is inside ``block_backward_sync()``, so gradients are synchronised once per step. Then it clips, steps the
optimizer(s) once and steps the LR schedulers as ``configure_optimizers`` declared them (manual optimisation
turns off Lightning's own clipping, accumulation and scheduling, so the module provides all three).

Example:
    >>> item = PlanItem("largest", None, teacher=True)
    >>> item.task_weight, item.distill_weight
    (1.0, 0.0)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

from lightning_supernet.errors import ArgumentError, InvalidArgumentError

if TYPE_CHECKING:
    from lightning_supernet.space import SubnetConfig

__all__ = ["PlanItem", "StepLoopMixin"]


@dataclass(frozen=True)
class PlanItem:
    """One subnet of a training step's plan.

    Attributes:
        name: a label for logs (``"largest"``, ``"smallest"``, ``"random"``).
        config: the subnet.
        task_weight: weight of the user's task loss for this subnet.
        distill_weight: weight of the distillation term (0: none).
        teacher: this subnet's detached outputs become the soft targets of the later ones.
        distill_fn: ``distill_fn(student_output, teacher_output) -> loss``.
        balance: scale the distillation term to the task loss's magnitude (AmoebaLLM).
        own_teacher: ``distill_fn`` brings its own targets (e.g. a frozen copy of the original model): it is
            called, with ``None`` as the teacher output when no plan entry taught yet, whenever ``distill_weight``
            is set — the largest subnet included.

    Example:
        >>> PlanItem("smallest", None, task_weight=0.0, distill_weight=1.0).name
        'smallest'
    """

    name: str
    config: SubnetConfig | None
    task_weight: float = 1.0
    distill_weight: float = 0.0
    teacher: bool = False
    distill_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    balance: bool = False
    own_teacher: bool = False

    def with_(self, **changes: Any) -> PlanItem:
        """A copy with some fields changed."""
        return replace(self, **changes)


class StepLoopMixin:
    """Training and validation behaviour of ``SupernetModule`` (see the module docstring).

    Example:
        >>> from lightning_supernet import SupernetModule
        >>> issubclass(SupernetModule, StepLoopMixin)
        True
    """

    # set by SupernetModule.__init__
    gradient_clip_val: float | None
    gradient_clip_algorithm: str
    accumulate_grad_batches: int

    # -- the plan ---------------------------------------------------------------------------------------------
    def _policy_callbacks(self, hook: str) -> list[Any]:
        trainer = self._trainer
        return [cb for cb in (trainer.callbacks if trainer is not None else []) if hasattr(cb, hook)]

    def make_plan(self, batch_idx: int = 0) -> list[PlanItem]:
        """The subnets of this step: starts as ``[largest]``; each callback with ``supernet_plan`` rewrites it.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> from lightning_supernet import SupernetModule
            >>> from lightning_supernet.models import TinyViT
            >>> sn = SupernetModule(TinyViT(dim=32, depth=2, num_heads=2), F.cross_entropy,
            ...                     example_input=torch.randn(1, 1, 8, 8))
            >>> [p.name for p in sn.make_plan()]
            ['largest']
        """
        plan = [PlanItem("largest", self.search_space.largest())]
        policies = sorted(self._policy_callbacks("supernet_plan"), key=lambda cb: getattr(cb, "plan_order", 50))
        for cb in policies:
            plan = cb.supernet_plan(self, plan, batch_idx)
        if not plan:
            raise InvalidArgumentError("the training plan is empty: a callback's `supernet_plan` returned no subnet")
        return plan

    # -- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        plan = self.make_plan(batch_idx)
        self._batches_this_epoch = batch_idx + 1
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        boundary = (batch_idx + 1) % self.accumulate_grad_batches == 0 or bool(self.trainer.is_last_batch)
        fork = self._fork_join()
        mine = fork.my_share(self, plan) if fork is not None else list(range(len(plan)))
        teacher, owner = None, None
        first = next((i for i, p in enumerate(plan) if p.teacher), None)
        shared = fork is not None and first is not None and any(p.distill_weight for p in plan)
        if shared and fork.teacher_outputs == "broadcast":
            owner = next(r for r, share in enumerate(fork.assign(self, plan)) if first in share)
            if owner != fork.subnet_rank:
                teacher = fork.share_teacher(None, owner)
        elif shared:
            teacher = self._remote_teacher(plan, mine, batch, batch_idx)
        # under fork-join only one rank of a data group trains plan item 0, whose `self.log` calls are the user's:
        # record them and replay them on every rank after the loop, so all ranks enter the same collectives
        recorded: list[Any] | None = [] if fork is not None else None
        total, losses = 0.0, {}
        for pos, i in enumerate(mine):
            item = plan[i]
            sync = fork is None and boundary and pos == len(mine) - 1
            with self._using(item.config), self._capture() as captured, \
                    self.log_as(item.name, i == 0, "train", recorded):
                task = self.task_loss(batch, batch_idx)
                loss = task * item.task_weight if item.task_weight else task.new_zeros(())
                distil = bool(item.distill_weight) and (teacher is not None or item.own_teacher)
                if item.teacher or distil:
                    output = self.select_output(captured.output(self, item))
                    if distil:
                        kd = item.distill_fn(output, teacher)
                        if item.balance:
                            kd = kd * (task.detach() / kd.detach().clamp_min(1e-12))
                        loss = loss + item.distill_weight * kd
                    if item.teacher:
                        teacher = output.detach()
                        if owner is not None:
                            fork.share_teacher(teacher, owner)
                if sync:
                    loss = loss + self._touch_skipped()
                with contextlib.nullcontext() if sync or fork is not None else self._no_sync():
                    self.manual_backward(loss / self.accumulate_grad_batches)
            losses.setdefault(item.name, []).append(loss.detach())
            total = total + loss.detach()
        if fork is not None:
            recorded, losses = fork.gather_logs(recorded, losses)
            for key, value, args, kwargs in recorded:
                self.log(key, value, *args, **kwargs)
        # a one-subnet plan is plain training (the user's own logs say it all); Lightning decides when to write
        if len(plan) > 1:
            for name, values in losses.items():
                self.log(f"train/loss/{name}", torch.stack([torch.as_tensor(v) for v in values]).mean(),
                         batch_size=_batch_size(batch))
        if boundary:
            if fork is not None:
                fork.join(self.model)
            self._optimizer_steps(optimizers, batch_idx)
            self._step_schedulers("step")
        return total if isinstance(total, torch.Tensor) else torch.zeros(())

    def _optimizer_steps(self, optimizers: list[Any], batch_idx: int) -> None:
        """Step and zero each optimizer through Lightning's hooks, as automatic optimisation would."""
        trainer = self.trainer
        for opt in optimizers:
            self.optimizer_step(trainer.current_epoch, batch_idx, opt, None)
            for cb in trainer.callbacks:
                cb.on_before_zero_grad(trainer, self, opt)
            self.on_before_zero_grad(opt)
            self.optimizer_zero_grad(trainer.current_epoch, batch_idx, opt)

    def _fork_join(self) -> Any:
        from lightning_supernet.strategies.fork_join import ForkJoinDDPStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategy if isinstance(strategy, ForkJoinDDPStrategy) else None

    def _remote_teacher(self, plan: list[PlanItem], mine: list[int], batch: Any, batch_idx: int) -> Any:
        """Soft targets for students whose teacher another rank trains: a no-grad forward of the teacher."""
        first = next((i for i, p in enumerate(plan) if p.teacher), None)
        if first in mine or not any(plan[i].distill_weight for i in mine):
            return None
        with torch.no_grad(), self._using(plan[first].config), self._capture() as captured, \
                self.log_as("teacher", False, "train"):
            self.task_loss(batch, batch_idx)
        return self.select_output(captured.output(self, plan[first])).detach()

    def task_loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The task loss of the active subnet on ``batch``: the wrapped module's ``training_step`` (its ``self.log``
        calls go where :meth:`log_as` routes them), or ``loss_fn(model(x), y)`` for a plain model.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> from lightning_supernet import SupernetModule
            >>> from lightning_supernet.models import TinyViT
            >>> sn = SupernetModule(TinyViT(dim=16, depth=2, num_heads=2), F.cross_entropy,
            ...                     example_input=torch.randn(1, 1, 8, 8))
            >>> sn.task_loss((torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])), 0).shape
            torch.Size([])
        """
        if self._inner_lm is None:
            return self._plain_loss(batch)
        out = self._inner("training_step", batch, batch_idx)
        loss = out["loss"] if isinstance(out, dict) else out
        if not isinstance(loss, torch.Tensor):
            raise ArgumentError(
                f"`{type(self.model).__name__}.training_step` returned {type(out).__name__}; SupernetModule needs "
                "the loss (a tensor or a dict with 'loss'). The wrapped module must use automatic optimisation: "
                "SupernetModule runs backward and the optimizer itself"
            )
        return loss

    def _no_sync(self) -> Any:
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else contextlib.nullcontext()

    def _touch_skipped(self) -> torch.Tensor | float:
        """Under DDP the synchronised backward must reach every parameter: add 0 × the skipped blocks' params."""
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(self.trainer.strategy.model, DistributedDataParallel):
            return 0.0
        zero = 0.0
        for name, dim in self.search_space.dims.items():
            if dim.kind == "depth" and not self._active[name]:
                block = self.model.get_submodule(name[: -len(".keep")])
                for p in block.parameters():
                    if p.requires_grad:
                        zero = zero + p.reshape(-1)[:1].sum() * 0.0
        return zero

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip here (after AMP unscaling), then call the wrapped module's hook."""
        if self.gradient_clip_val:
            self.configure_gradient_clipping(optimizer, gradient_clip_val=self.gradient_clip_val,
                                             gradient_clip_algorithm=self.gradient_clip_algorithm)
        if self._inner_lm is not None:
            self._inner("on_before_optimizer_step", optimizer)

    def _step_schedulers(self, interval: str) -> None:
        trainer = self.trainer
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            count = trainer.global_step if interval == "step" else trainer.current_epoch + 1
            if count % config.frequency:
                continue
            if config.reduce_on_plateau:
                value = trainer.callback_metrics.get(config.monitor)
                if value is None:
                    if config.strict:
                        raise InvalidArgumentError(f"ReduceLROnPlateau monitors `{config.monitor}`, which was not logged; "
                                         f"logged metrics: {sorted(trainer.callback_metrics)}")
                    continue
                self.lr_scheduler_step(config.scheduler, value)
            else:
                self.lr_scheduler_step(config.scheduler, None)

    def on_train_epoch_end(self) -> None:
        if self._inner_lm is not None:
            self._inner("on_train_epoch_end")
        # like Lightning's automatic optimisation: epoch schedulers step only after a complete epoch
        if self._trainer is not None and getattr(self, "_batches_this_epoch", 0) >= self.trainer.num_training_batches:
            self._step_schedulers("epoch")

    # -- validation of several subnets ------------------------------------------------------------------------
    def eval_configs(self) -> dict[str, SubnetConfig]:
        """The subnets validated each epoch, by name (``eval_subnets``); just the active one while pinned.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> from lightning_supernet import SupernetModule
            >>> from lightning_supernet.models import TinyViT
            >>> sn = SupernetModule(TinyViT(dim=32, depth=2, num_heads=2), F.cross_entropy,
            ...                     example_input=torch.randn(1, 1, 8, 8))
            >>> list(sn.eval_configs())
            ['largest', 'smallest', 'middle']
        """
        if self._pinned or not self.eval_subnets:
            return {"active": self._active}
        return dict(self._eval_subnet_configs)

    def _validate_subnets(self, hook: str, batch: Any, batch_idx: int, *args: Any) -> Any:
        configs = self.eval_configs()
        result = None
        for i, (name, cfg) in enumerate(configs.items()):
            with self._using(cfg), self.log_as(name, i == 0, "val" if hook == "validation_step" else "test"), \
                    self._metrics_of(name, i == 0), self._eval_hooks(name, cfg):
                if self._inner_lm is not None:
                    out = self._inner(hook, batch, batch_idx, *args)
                else:
                    out = self._plain_eval(batch, "val" if hook == "validation_step" else "test",
                                           None if name == "active" else name, i == 0)
            result = out if result is None else result
        return result

    def validation_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        return self._validate_subnets("validation_step", batch, batch_idx, *args)

    def test_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        return self._validate_subnets("test_step", batch, batch_idx, *args)

    def on_validation_epoch_start(self) -> None:
        self._metric_copies = {}
        if self._inner_lm is not None:
            self._inner("on_validation_epoch_start")

    def on_test_epoch_start(self) -> None:
        self._metric_copies = {}
        if self._inner_lm is not None:
            self._inner("on_test_epoch_start")

    @contextlib.contextmanager
    def _eval_hooks(self, name: str, cfg: SubnetConfig) -> Iterator[None]:
        callbacks = self._policy_callbacks("supernet_eval_enter")
        for cb in callbacks:
            cb.supernet_eval_enter(self, name, cfg)
        try:
            yield
        finally:
            for cb in reversed(callbacks):
                cb.supernet_eval_exit(self, name, cfg)

    @contextlib.contextmanager
    def _metrics_of(self, name: str, plain: bool = False) -> Iterator[None]:
        """Give each validated subnet but the first its own copies of the wrapped module's torchmetrics objects.

        The first subnet logs under the user's own names with the user's own metric objects, exactly as a pinned
        validation (``with supernet.subnet(cfg)``) does, so the Trainer sees the same logging arguments either way.
        """
        from torchmetrics import Metric

        if name == "active" or plain or self._inner_lm is None:
            yield
            return
        slots = [(path, m) for path, m in self.model.named_modules() if isinstance(m, Metric) and path]
        if name not in self._metric_copies:  # one copy per subnet and epoch, made on its first batch
            self._metric_copies[name] = {p: _fresh_copy(m) for p, m in slots}
        copies = self._metric_copies[name]
        for path, _ in slots:
            _set_module(self.model, path, copies[path])
        try:
            yield
        finally:
            for path, original in slots:
                _set_module(self.model, path, original)

    @contextlib.contextmanager
    def log_as(self, name: str, plain: bool, stage: str, record: list[Any] | None = None) -> Iterator[None]:
        """Route the wrapped module's ``self.log`` calls: the first subnet keeps the user's names (and also
        logs ``<stage>/<metric>/<name>``); the others log ``<stage>/<metric>/<name>`` only. With ``record`` (a
        list), the first subnet's tensor logs are appended to it as ``(key, value, args, kwargs)`` instead.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> from lightning_supernet import SupernetModule
            >>> from lightning_supernet.models import TinyViT
            >>> sn = SupernetModule(TinyViT(dim=16, depth=2, num_heads=2), F.cross_entropy,
            ...                     example_input=torch.randn(1, 1, 8, 8))
            >>> with sn.log_as("smallest", False, "val"):  # a plain model: nothing to route
            ...     pass
        """
        inner = self._inner_lm
        if inner is None or name == "active":
            yield
            return
        original = type(inner).log.__get__(inner)
        if stage == "train" and not plain:
            inner.log = lambda *a, **k: None  # students' task logs would overwrite the largest's
        else:
            from torchmetrics import Metric

            def log(key: str, value: Any, *args: Any, **kwargs: Any) -> None:
                if isinstance(value, Metric) and not plain:  # a copy: not an attribute Lightning can find
                    kwargs.setdefault("metric_attribute", f"{key}@{name}")
                if plain and record is not None and not isinstance(value, Metric):
                    record.append((key, torch.as_tensor(value).detach(), args, kwargs))
                elif plain:
                    original(key, value, *args, **kwargs)
                if stage != "train":
                    original(_subnet_key(key, stage, name), value, *args, **kwargs)

            inner.log = log
        try:
            yield
        finally:
            inner.__dict__.pop("log", None)


def _subnet_key(key: str, stage: str, name: str) -> str:
    for prefix in (f"{stage}_", f"{stage}/"):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return f"{stage}/{key}/{name}"


def _fresh_copy(metric: Any) -> Any:
    """A deep copy of a torchmetrics object with its state reset (the original may hold this epoch's updates)."""
    fresh = copy.deepcopy(metric)
    fresh.reset()
    return fresh


def _set_module(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _batch_size(batch: Any) -> int | None:
    from lightning_supernet.ir.graph import flatten_tensors

    tensors = flatten_tensors(batch)
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else None


class _Captured:
    def __init__(self) -> None:
        self.value: Any = None

    def output(self, module: Any, item: PlanItem) -> Any:
        if self.value is None:
            raise RuntimeError(
                f"no model output was captured while training subnet `{item.name}`: distillation reads the output "
                f"of `{type(module.model).__name__}.__call__`; the wrapped `training_step` must compute its "
                "predictions by calling the module itself (`self(x)`)"
            )
        return self.value


def capture_outputs(model: torch.nn.Module) -> contextlib.AbstractContextManager[_Captured]:
    """Context manager: the last output of ``model``'s forward calls inside it.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> with capture_outputs(lin) as c:
        ...     _ = lin(torch.ones(1, 2))
        >>> c.value.shape
        torch.Size([1, 2])
    """

    @contextlib.contextmanager
    def ctx() -> Iterator[_Captured]:
        captured = _Captured()

        def hook(_module, _args, output):
            captured.value = output

        handle = model.register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    return ctx()


_ = pl  # the mixin is used with pl.LightningModule
