"""``SupernetModule``: wrap a LightningModule (or an ``nn.Module`` plus a loss) as a weight-sharing supernet.

The wrapper traces the model once, discovers its search space, turns the modules that can shrink into elastic
ops in place (same objects, same parameter names) and delegates Lightning's hooks to the user's module, so the
user's ``training_step``, ``validation_step``, ``configure_optimizers`` and ``self.log`` calls run unchanged on
whichever subnet is active. ``state_dict()`` has the wrapped model's keys, without a prefix.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from lightning_supernet.models import TinyViT
    >>> sn = SupernetModule(TinyViT(dim=32, depth=2, num_heads=2), F.cross_entropy,
    ...                     example_input=torch.randn(1, 1, 8, 8))
    >>> cfg = sn.search_space.smallest()
    >>> with sn.subnet(cfg):
    ...     y = sn(torch.randn(2, 1, 8, 8))
    >>> sn.cost(cfg)["params"] < sn.cost(sn.search_space.largest())["params"]
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_supernet import cost as _cost
from lightning_supernet.build import build_space, candidate_dims, make_appliers
from lightning_supernet.checkpointing import build_model, resolve, supernet_hparams
from lightning_supernet.elastic import mixin_for
from lightning_supernet.ops import registered_ops
from lightning_supernet.errors import ArgumentError, DiscoveryError, InvalidArgumentError, SearchSpaceError, UnsupportedModelError
from lightning_supernet.elastic.registry import is_elastic
from lightning_supernet.extract import extract_model
from lightning_supernet.hooks import forward_hooks
from lightning_supernet.integrations.transformers import install as install_hf_finalizer
from lightning_supernet.ir.checks import check_discovery
from lightning_supernet.lifecycle import LifecycleMixin
from lightning_supernet.ir.discover import Discovery, discover
from lightning_supernet.ir.graph import ModuleGraph, trace
from lightning_supernet.space import SpaceOptions, SubnetConfig
from lightning_supernet.state import ModelSnapshot
from lightning_supernet.training import StepLoopMixin, capture_outputs
from lightning_supernet.verify import verify_supernet

__all__ = ["SupernetModule"]

install_hf_finalizer()  # Hugging Face extract finaliser (cheap: transformers is imported only if a model uses it)


@forward_hooks
class SupernetModule(StepLoopMixin, LifecycleMixin, pl.LightningModule):
    """A weight-sharing supernet around an unchanged model.

    Args:
        model: a ``LightningModule`` (its hooks are used as they are) or a plain ``nn.Module`` (then give
            ``loss_fn``), or ``{"class_path": ..., "init_args": {...}}`` to build one (what checkpoints store: see
            :mod:`lightning_supernet.checkpointing` for what ``load_from_checkpoint`` needs).
        loss_fn: ``loss_fn(output, target)`` for a plain ``nn.Module`` whose batches are ``(input, target)``.
        example_input: input for the discovery trace; defaults to ``model.example_input_array``.
        space: restrict or override the search space: a dict of :class:`~lightning_supernet.space.SpaceOptions`
            fields, e.g. ``{"elastic": ["width"], "min_depth": 2, "exclude": ["blocks.0.*"]}``.
        output_transform: picks the tensor used for distillation out of structured outputs (``ModelOutput``,
            dicts); by default the first tensor.
        optimizer: for a plain ``nn.Module``, ``optimizer(params)`` builds the optimizer (default AdamW, lr 1e-3).
        eval_subnets: subnets validated every epoch: names among ``"largest"``, ``"smallest"``, ``"middle"`` and/or
            ``{name: config}``; their metrics are logged as ``val/<metric>/<name>`` (the first also under the
            user's own names). Inside ``with supernet.subnet(cfg):`` only ``cfg`` is validated.
        gradient_clip_val: clip gradients to this norm/value before each optimizer step (Trainer's own flag is
            off under the manual optimisation the multi-subnet step needs).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        accumulate_grad_batches: step the optimizer every this many batches (replaces the Trainer's flag).

    Raises:
        DiscoveryError: no example input, or the model cannot be run on it.
        UnsupportedModelError: nothing sliceable was found, or an attention module no adapter knows.
        SearchSpaceError: a bad ``space`` override.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from lightning_supernet.models import ResNetLike
        >>> sn = SupernetModule(ResNetLike(), F.cross_entropy, example_input=torch.randn(1, 1, 8, 8))
        >>> sorted({d.kind for d in sn.search_space.dims.values()})
        ['depth', 'width']
    """

    def __init__(self, model: nn.Module | Mapping[str, Any] | None,
                 loss_fn: Callable[..., torch.Tensor] | str | None = None, *,
                 example_input: Any = None, space: SpaceOptions | Mapping[str, Any] | None = None,
                 output_transform: Callable[[Any], torch.Tensor] | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 eval_subnets: Any = ("largest", "smallest", "middle"), gradient_clip_val: float | None = None,
                 gradient_clip_algorithm: str = "norm", accumulate_grad_batches: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise InvalidArgumentError(f"`accumulate_grad_batches` must be an int >= 1, got {accumulate_grad_batches!r}")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise InvalidArgumentError(f"`gradient_clip_algorithm` must be 'norm' or 'value', got {gradient_clip_algorithm!r}")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise InvalidArgumentError(f"`gradient_clip_val` must be > 0 or None, got {gradient_clip_val!r}")
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.accumulate_grad_batches = accumulate_grad_batches
        self._pinned = 0
        self._metric_copies: dict[str, Any] = {}
        if model is None:
            raise ArgumentError("`model` is required. A checkpoint of a supernet around a model whose constructor "
                                "arguments are unknown (a plain nn.Module) does not store how to build it: use "
                                "`SupernetModule.load_from_checkpoint(path, model=MyNet(...))`")
        given = model
        if isinstance(model, Mapping):
            model = build_model(model)
        loss_fn, output_transform = resolve(loss_fn, "loss_fn"), resolve(output_transform, "output_transform")
        optimizer = resolve(optimizer, "optimizer")
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"`model` must be a LightningModule or nn.Module, got {type(model).__name__}")
        if isinstance(model, SupernetModule):
            raise ArgumentError("`model` is already a SupernetModule; wrap the original model instead")
        elastic = next((p for p, m in model.named_modules() if is_elastic(m)), None)
        if elastic is not None:
            raise ArgumentError(
                f"`model` is already elastic (its module `{elastic or type(model).__name__}` belongs to a "
                "SupernetModule): wrap the original model, or a plain copy of it such as "
                "`supernet.extract(supernet.search_space.largest())`"
            )
        if not isinstance(model, pl.LightningModule) and loss_fn is None:
            raise ArgumentError(f"`loss_fn` is required to wrap a plain nn.Module (`{type(model).__name__}`): "
                            "pass e.g. `loss_fn=torch.nn.functional.cross_entropy`, or wrap a LightningModule")
        self.model = model
        self.loss_fn = loss_fn
        self.output_transform = output_transform
        self._optimizer_factory = optimizer
        example = example_input if example_input is not None else getattr(model, "example_input_array", None)
        if example is None:
            raise DiscoveryError(
                f"`{type(model).__name__}` has no `example_input_array` and no `example_input` was given; the "
                "search space is discovered from one traced forward pass. HINT: set "
                "`model.example_input_array = torch.randn(1, ...)` or pass `example_input=`"
            )
        self.example_input_array = example
        self.space_options = SpaceOptions.from_any(space)
        self.save_hyperparameters(supernet_hparams(
            given, loss_fn, example_input, self.space_options, output_transform, optimizer, eval_subnets,
            gradient_clip_val, gradient_clip_algorithm, accumulate_grad_batches), logger=False)
        if isinstance(model, pl.LightningModule) and not model.automatic_optimization:
            raise ArgumentError(f"`{type(model).__name__}` uses manual optimisation; SupernetModule runs backward and the "
                            "optimizer itself (one step per multi-subnet plan): wrap a module with automatic "
                            "optimisation whose `training_step` returns the loss")
        snapshot = ModelSnapshot(model)
        try:
            self._build(model, example)
            self.eval_subnets = eval_subnets
            self._eval_subnet_configs = self._resolve_eval_subnets(eval_subnets)
        except BaseException:
            snapshot.restore()  # a construction that fails leaves the model exactly as it was
            raise

    # -- construction -----------------------------------------------------------------------------------------
    def _build(self, model: nn.Module, example: Any) -> None:
        """Trace, discover, check, build the space, make the modules elastic and verify them numerically.

        Dims that fail verification are left fixed (their reason shows in ``print(search_space)``), unless the
        user asked for them by name, which raises. The model is rebuilt without them and verified again.
        """
        graph = trace(model, example)
        graph = self._trace_uncalled(model, example, graph)
        found = discover(model, graph, residual=self.space_options.residual)
        check_discovery(model, graph, found)
        self._check_supported(found, graph)
        graph.release()
        self.ir: ModuleGraph = graph
        self._check_uncalled(model, graph, found)
        classes = ModelSnapshot(model)
        left_fixed: dict[str, str] = {}
        for _ in range(16):
            self.search_space = build_space(found, self.space_options)
            if not self.search_space.dims:
                raise UnsupportedModelError(self._nothing_elastic(found))
            self.discovery: Discovery = found
            self._appliers = make_appliers(model, found, self.search_space)
            self._active = None
            self._active = self.activate(self.search_space.largest())
            failed = verify_supernet(self)
            if not failed:
                if left_fixed:
                    rank_zero_warn("lightning-supernet left these dims fixed (see `print(supernet.search_space)`): "
                                   + "; ".join(f"`{n}`: {why}" for n, why in left_fixed.items()))
                return
            # a head layout that failed gives way to the adapter's next candidate; anything else stays fixed
            retry = {h.name for h in found.heads if h.name in failed and h.candidates}
            frozen = {n: why for n, why in failed.items() if n not in retry}
            asked = [n for n in frozen if self.space_options.asked_for(n)]
            if asked:
                raise UnsupportedModelError(f"dim `{asked[0]}` was asked for in `space=` but cannot be sliced: "
                                            f"{frozen[asked[0]]}")
            left_fixed.update(frozen)
            classes.restore()
            found = found.retry(retry).without(frozen)
        raise UnsupportedModelError(f"`{type(model).__name__}`: verification kept failing; last: {failed}")

    def _trace_uncalled(self, model: nn.Module, example: Any, graph: ModuleGraph) -> ModuleGraph:
        """Modules that run only in training (auxiliary classifiers): trace in train mode if that covers more."""
        if not _uncalled(model, graph):
            return graph
        snapshot = ModelSnapshot(model, buffers=True)
        try:
            with torch.random.fork_rng():
                train_graph = trace(model, example, train=True)
        except DiscoveryError:
            return graph
        finally:
            snapshot.restore()
        return train_graph if len(_uncalled(model, train_graph)) < len(_uncalled(model, graph)) else graph

    def _check_uncalled(self, model: nn.Module, graph: ModuleGraph, found: Discovery) -> None:
        """A module the example never runs (a data-dependent branch) may read dims that would shrink: refuse."""
        sizes = {w.size for w in found.widths} | {h.spec.num_heads * h.spec.head_dim for h in found.heads}
        for path in _uncalled(model, graph):
            mod = model.get_submodule(path)
            dims = {getattr(mod, a) for a in ("in_features", "out_features", "in_channels", "out_channels",
                                               "num_features", "embed_dim") if isinstance(getattr(mod, a, None), int)}
            if dims & sizes and self.space_options.elastic != ("depth",):
                raise UnsupportedModelError(
                    f"`{path}` ({type(mod).__name__}) never ran on the example input (a branch the example does "
                    f"not take), so its couplings are unknown and it may read dims that would shrink. HINT: give "
                    f"an `example_input` that runs it, or keep the dims it may read fixed with `space={{'exclude': "
                    f"[...]}}` / `space={{'include': [...]}}`"
                )

    # -- discovery errors -------------------------------------------------------------------------------------
    def _check_supported(self, found: Discovery, graph: ModuleGraph) -> None:
        if found.unsupported and "heads" in self.space_options.elastic:
            path, cls = next(iter(found.unsupported.items()))
            raise UnsupportedModelError(
                f"attention module `{path}` ({cls}) has a head count but no head adapter recognises its layout. "
                "HINT: register one with `lightning_supernet.elastic.register_head_adapter(fn)` (fn returns a "
                "HeadSpec naming its q/k/v or qkv and output projections), or keep heads fixed with "
                "`space={'elastic': ['width', 'depth']}`"
            )
        names = [d.name for d in candidate_dims(found)]
        self.space_options.check_patterns(names)
        self.space_options.check_depth(found.stacks)

    def _nothing_elastic(self, found: Discovery) -> str:
        opaque = sorted({type(m).__name__ for m in self.model.modules()
                         if not list(m.children()) and list(m.parameters(recurse=False)) and mixin_for(m) is None})
        return (f"found no elastic dim in `{type(self.model).__name__}`"
                + (f": its layers of type {', '.join(opaque)} are not supported" if opaque else "")
                + f" (supported: {', '.join(sorted({op.name for op in registered_ops()}))}; attention through head "
                  "adapters); frozen dims: "
                + ("; ".join(f"{k} {v}" for k, v in list(found.frozen.items())[:4]) or "none"))

    # -- the active subnet ------------------------------------------------------------------------------------
    @property
    def active_config(self) -> SubnetConfig:
        """The config the supernet currently runs."""
        return self._active

    def activate(self, cfg: Mapping[str, Any]) -> SubnetConfig:
        """Make ``cfg`` the active subnet (until the next call); returns it validated.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> from lightning_supernet.models import TinyViT
            >>> sn = SupernetModule(TinyViT(dim=32, depth=2, num_heads=2), F.cross_entropy,
            ...                     example_input=torch.randn(1, 1, 8, 8))
            >>> sn.activate(sn.search_space.smallest()) == sn.active_config
            True
        """
        cfg = self.search_space.validate(cfg)
        active = self._active
        for name, apply in self._appliers.items():
            if active is None or cfg[name] != active[name]:  # only dims that change (cheap in the step loop)
                apply(cfg[name])
        self._active = cfg
        return cfg

    @contextlib.contextmanager
    def subnet(self, cfg: Mapping[str, Any]) -> Iterator[SubnetConfig]:
        """Run the body under ``cfg``; the previous config is restored on exit.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> from lightning_supernet.models import TinyViT
            >>> sn = SupernetModule(TinyViT(dim=32, depth=2, num_heads=2), F.cross_entropy,
            ...                     example_input=torch.randn(1, 1, 8, 8))
            >>> with sn.subnet(sn.search_space.smallest()) as cfg:
            ...     pass
            >>> sn.active_config == sn.search_space.largest()
            True
        """
        self._pinned += 1
        try:
            with self._using(cfg) as active:
                yield active
        finally:
            self._pinned -= 1

    @contextlib.contextmanager
    def _using(self, cfg: Mapping[str, Any] | None) -> Iterator[SubnetConfig]:
        previous = self._active
        active = self.activate(cfg) if cfg is not None else previous
        try:
            yield active
        finally:
            if active is not previous:
                self.activate(previous)

    def _capture(self) -> Any:
        return capture_outputs(self.model)

    def refresh_eval_subnets(self) -> dict[str, SubnetConfig]:
        """Re-resolve the named evaluation subnets after the block ranking changed (``set_block_priority``).

        Example:
            >>> from lightning_supernet.models import TinyViT
            >>> sn = SupernetModule(TinyViT(dim=16, depth=2, num_heads=2), torch.nn.functional.cross_entropy,
            ...                     example_input=torch.randn(1, 1, 8, 8), eval_subnets=["largest", "smallest"])
            >>> sorted(sn.refresh_eval_subnets())
            ['largest', 'smallest']
        """
        self._eval_subnet_configs = configs = self._resolve_eval_subnets(self.eval_subnets)
        return dict(configs)

    def _resolve_eval_subnets(self, eval_subnets: Any) -> dict[str, SubnetConfig]:
        named = {n: getattr(self.search_space, n) for n in ("largest", "smallest", "middle")}
        if eval_subnets is None:
            return {}
        items = eval_subnets.items() if isinstance(eval_subnets, Mapping) else [(e, e) for e in eval_subnets]
        out = {}
        for name, value in items:
            if isinstance(value, str):
                if value not in named:
                    raise InvalidArgumentError(f"`eval_subnets` has {value!r}; allowed names: largest, smallest, "
                                               "middle, or a {name: config} mapping")
                out[name] = named[value]()
            else:
                out[str(name)] = self.search_space.validate(value)
        return out

    def cost(self, cfg: Mapping[str, Any] | None = None) -> dict[str, int]:
        """``{"params": ..., "macs": ...}`` of a subnet (default: the active one), on the example input.

        Params are exact (they equal the extracted model's); MACs come from ``torch.utils.flop_counter``.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> from lightning_supernet.models import TinyViT
            >>> sn = SupernetModule(TinyViT(dim=32, depth=2, num_heads=2), F.cross_entropy,
            ...                     example_input=torch.randn(1, 1, 8, 8))
            >>> sorted(sn.cost())
            ['macs', 'params']
        """
        with self.subnet(cfg if cfg is not None else self._active):
            return {"params": _cost.active_params(self.model),
                    "macs": _cost.count_macs(self.model, self._example_on_device())}

    def extract(self, cfg: Mapping[str, Any] | None = None) -> nn.Module:
        """A standalone, physically smaller deep copy of the user's model for ``cfg`` (default: active).

        ``extract(cfg)(x)`` equals ``supernet(x)`` under ``cfg`` to float tolerance.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> from lightning_supernet.models import TinyViT
            >>> sn = SupernetModule(TinyViT(dim=32, depth=4, num_heads=2), F.cross_entropy,
            ...                     example_input=torch.randn(1, 1, 8, 8))
            >>> len(sn.extract(sn.search_space.smallest()).blocks)
            2
        """
        return extract_model(self, self.search_space.validate(cfg if cfg is not None else self._active))

    def _example_on_device(self) -> Any:
        return move_data_to_device(self.example_input_array, self.device)

    # -- forward and checkpoints ------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped model's ``state_dict`` (same keys, no ``model.`` prefix)."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a state dict of the wrapped model (no prefix)."""
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    # -- Lightning hooks delegated to the user's module -------------------------------------------------------
    @property
    def _inner_lm(self) -> pl.LightningModule | None:
        return self.model if isinstance(self.model, pl.LightningModule) else None

    def _inner(self, name: str, *args: Any, **kwargs: Any) -> Any:
        inner = self.model
        previous = inner._current_fx_name
        inner._current_fx_name = self._current_fx_name
        try:
            return getattr(inner, name)(*args, **kwargs)
        finally:
            inner._current_fx_name = previous

    def predict_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        if self._inner_lm is not None:
            return self._inner("predict_step", batch, batch_idx, *args)
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def batch_to_input(self, batch: Any) -> Any:
        """The model input inside a training batch (used by BN recalibration); override for other layouts.

        Default: the first item of a tuple/list batch, a dict without label keys, or the batch itself.

        Example:
            >>> import torch
            >>> SupernetModule.batch_to_input(None, (torch.ones(1), torch.zeros(1))).item()
            1.0
        """
        if isinstance(batch, (tuple, list)):
            return batch[0]
        if isinstance(batch, Mapping):
            return {k: v for k, v in batch.items() if k not in ("labels", "label", "target", "targets", "y")}
        return batch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the search space's fingerprint and the active config; then the wrapped module's hook."""
        checkpoint["supernet"] = {"fingerprint": self.search_space.fingerprint, "active": self._active.to_dict()}
        if self._inner_lm is not None:
            self._inner("on_save_checkpoint", checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint's search space matches; then the wrapped module's hook."""
        meta = checkpoint.get("supernet")
        if meta is not None and meta["fingerprint"] != self.search_space.fingerprint:
            raise SearchSpaceError(
                f"the checkpoint was saved from a supernet with search space {meta['fingerprint']}, this one is "
                f"{self.search_space.fingerprint}: build the SupernetModule with the same model and `space=`"
            )
        if self._inner_lm is not None:
            self._inner("on_load_checkpoint", checkpoint)

    def configure_optimizers(self) -> Any:
        if self._inner_lm is not None:
            return self._inner("configure_optimizers")
        factory = self._optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        return factory(self.model.parameters())

    def _plain_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self.select_output(self(x)), y)

    def _plain_eval(self, batch: Any, stage: str, subnet: str | None = None, plain: bool = True) -> torch.Tensor:
        x, y = batch
        out = self.select_output(self(x))
        values = {"loss": self.loss_fn(out, y)}
        if out.dim() == 2 and not torch.is_floating_point(y):
            values["acc"] = (out.argmax(-1) == y).float().mean()
        for key, value in values.items():
            if plain:
                self.log(f"{stage}_{key}", value, prog_bar=True)
            if subnet is not None:
                self.log(f"{stage}/{key}/{subnet}", value)
        return values["loss"]

    def select_output(self, output: Any) -> torch.Tensor:
        """The tensor of a model output used for losses and distillation (``output_transform`` or the first).

        Example:
            >>> import torch
            >>> SupernetModule.select_output(None, {"logits": torch.ones(1)}).shape  # doctest: +SKIP
        """
        if self is not None and self.output_transform is not None:
            return self.output_transform(output)
        if isinstance(output, torch.Tensor):
            return output
        from lightning_supernet.ir.graph import flatten_tensors

        if hasattr(output, "logits"):
            return output.logits
        tensors = flatten_tensors(output)
        if not tensors:
            raise TypeError(f"the model output ({type(output).__name__}) holds no tensor; pass `output_transform`")
        return tensors[0]


def _uncalled(model: nn.Module, graph: ModuleGraph) -> list[str]:
    """Leaf modules holding trainable parameters that the traced forward never used (neither called the module
    nor read its weights, as ``nn.MultiheadAttention`` reads ``out_proj.weight``)."""
    out = []
    for path, node in graph.modules.items():
        if not node.is_leaf or not node.params or node.calls:
            continue
        params = [t for t in model.get_submodule(path).parameters(recurse=False) if t.requires_grad]
        if params and not any(id(t) in graph.used_params for t in params):
            out.append(path)
    return out
