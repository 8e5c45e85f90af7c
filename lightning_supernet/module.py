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
from torch import nn

from lightning_supernet import cost as _cost
from lightning_supernet.elastic import SkippableBlock, make_elastic, mixin_for
from lightning_supernet.errors import DiscoveryError, SearchSpaceError, UnsupportedModelError
from lightning_supernet.extract import extract_model
from lightning_supernet.ir.checks import check_discovery
from lightning_supernet.ir.discover import Discovery, discover
from lightning_supernet.ir.graph import ModuleGraph, trace
from lightning_supernet.space import Dim, SearchSpace, SpaceOptions, SubnetConfig

__all__ = ["SupernetModule"]

_SUPPORTED = "Linear, Conv2d (groups=1 or depthwise), BatchNorm1d/2d, LayerNorm; attention through head adapters"


class SupernetModule(pl.LightningModule):
    """A weight-sharing supernet around an unchanged model.

    Args:
        model: a ``LightningModule`` (its hooks are used as they are) or a plain ``nn.Module`` (then give
            ``loss_fn``).
        loss_fn: ``loss_fn(output, target)`` for a plain ``nn.Module`` whose batches are ``(input, target)``.
        example_input: input for the discovery trace; defaults to ``model.example_input_array``.
        space: restrict or override the search space: a dict of :class:`~lightning_supernet.space.SpaceOptions`
            fields, e.g. ``{"elastic": ["width"], "min_depth": 2, "exclude": ["blocks.0.*"]}``.
        output_transform: picks the tensor used for distillation out of structured outputs (``ModelOutput``,
            dicts); by default the first tensor.
        optimizer: for a plain ``nn.Module``, ``optimizer(params)`` builds the optimizer (default AdamW, lr 1e-3).

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

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor] | None = None, *,
                 example_input: Any = None, space: SpaceOptions | Mapping[str, Any] | None = None,
                 output_transform: Callable[[Any], torch.Tensor] | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a LightningModule or nn.Module, got {type(model).__name__}")
        if isinstance(model, SupernetModule):
            raise TypeError("`model` is already a SupernetModule; wrap the original model instead")
        if not isinstance(model, pl.LightningModule) and loss_fn is None:
            raise TypeError(f"`loss_fn` is required to wrap a plain nn.Module (`{type(model).__name__}`): "
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
        graph = trace(model, example)
        found = discover(model, graph, residual=self.space_options.residual)
        check_discovery(model, graph, found)
        self._check_supported(found, graph)
        self.search_space = _build_space(found, self.space_options)
        graph.release()
        self.ir: ModuleGraph = graph
        self.discovery: Discovery = found
        if not self.search_space.dims:
            raise UnsupportedModelError(self._nothing_elastic(found))
        self._appliers = _make_elastic(model, found, self.search_space)
        self._active = self.search_space.largest()

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
        names = [d.name for d in _candidate_dims(found)]
        for pattern in self.space_options.include:
            import fnmatch

            if not any(fnmatch.fnmatch(n, pattern) for n in names):
                frozen = "; ".join(f"{k} {v}" for k, v in list(found.frozen.items())[:3])
                raise SearchSpaceError(f"`space['include']` pattern {pattern!r} matches no elastic dim; "
                                       f"elastic dims are e.g. {names[:3]}; frozen: {frozen}")

    def _nothing_elastic(self, found: Discovery) -> str:
        opaque = sorted({type(m).__name__ for m in self.model.modules()
                         if not list(m.children()) and list(m.parameters(recurse=False)) and mixin_for(m) is None})
        return (f"found no elastic dim in `{type(self.model).__name__}`"
                + (f": its layers of type {', '.join(opaque)} are not supported" if opaque else "")
                + f" (supported: {_SUPPORTED}); frozen dims: "
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
        for name, apply in self._appliers.items():
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
        previous = self._active
        cfg = self.activate(cfg)
        try:
            yield cfg
        finally:
            self.activate(previous)

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
        from lightning_supernet.cost import _to

        return _to(self.example_input_array, self.device)

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

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self._inner_lm is not None:
            return self._inner("training_step", batch, batch_idx)
        loss = self._plain_loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        if self._inner_lm is not None:
            return self._inner("validation_step", batch, batch_idx, *args)
        return self._plain_eval(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        if self._inner_lm is not None:
            return self._inner("test_step", batch, batch_idx, *args)
        return self._plain_eval(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        if self._inner_lm is not None:
            return self._inner("predict_step", batch, batch_idx, *args)
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def configure_optimizers(self) -> Any:
        if self._inner_lm is not None:
            return self._inner("configure_optimizers")
        factory = self._optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        return factory(self.model.parameters())

    def _plain_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self.select_output(self(x)), y)

    def _plain_eval(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        out = self.select_output(self(x))
        loss = self.loss_fn(out, y)
        self.log(f"{stage}_loss", loss, prog_bar=True)
        if out.dim() == 2 and not torch.is_floating_point(y):
            self.log(f"{stage}_acc", (out.argmax(-1) == y).float().mean(), prog_bar=True)
        return loss

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


for _hook in ("on_fit_start", "on_fit_end", "on_train_start", "on_train_end", "on_train_epoch_start",
              "on_train_epoch_end", "on_validation_start", "on_validation_end", "on_validation_epoch_start",
              "on_validation_epoch_end", "on_test_epoch_start", "on_test_epoch_end", "on_predict_epoch_end"):

    def _delegate(self, *args, _name=_hook, **kwargs):
        if self._inner_lm is not None:
            return self._inner(_name, *args, **kwargs)
        return None

    _delegate.__name__ = _hook
    _delegate.__doc__ = f"Calls the wrapped LightningModule's ``{_hook}``."
    setattr(SupernetModule, _hook, _delegate)


# -- building the space and the elastic modules -------------------------------------------------------------------
def _candidate_dims(found: Discovery) -> list[Dim]:
    dims = [Dim(b.name, "depth", (True, False), stack=b.stack) for b in found.blocks]
    dims += [Dim(h.name, "heads", (h.spec.num_heads,), block=h.block) for h in found.heads]
    dims += [Dim(w.name, "width", (w.size,), block=w.block) for w in found.widths]
    return dims


def _ratios_to_choices(full: int, ratios: tuple[float, ...], step: int) -> tuple[int, ...]:
    values = set()
    for r in ratios:
        v = int(round(r * full / step)) * step
        values.add(min(full, max(step, v)))
    values.add(full)
    return tuple(sorted(values, reverse=True))


def _build_space(found: Discovery, opts: SpaceOptions) -> SearchSpace:
    dims: list[Dim] = []
    order: list[tuple[str, Dim]] = []
    for h in found.heads:
        if opts.selects(h.name, "heads"):
            g = h.spec.kv_group
            choices = opts.explicit_choices(h.name) or _ratios_to_choices(h.spec.num_heads, opts.head_ratios, g)
            _check_choices(h.name, choices, h.spec.num_heads, g)
            order.append((h.path, Dim(h.name, "heads", tuple(choices), block=h.block)))
    for w in found.widths:
        if opts.selects(w.name, "width"):
            step = opts.round_to if w.size % opts.round_to == 0 and w.size >= 4 * opts.round_to else 1
            choices = opts.explicit_choices(w.name) or _ratios_to_choices(w.size, opts.width_ratios, step)
            _check_choices(w.name, choices, w.size, 1)
            order.append((w.producers[0], Dim(w.name, "width", tuple(choices), block=w.block)))
    stacks: dict[str, tuple[int, int]] = {}
    for b in found.blocks:
        if opts.selects(b.name, "depth"):
            order.append((b.path, Dim(b.name, "depth", (True, False), stack=b.stack)))
            length = found.stacks[b.stack]
            stacks[b.stack] = (length, opts.min_kept(length))
    # model order: a block's keep flag first, then the dims inside it
    order.sort(key=lambda item: (item[0].split("."), item[1].kind != "depth"))
    dims = [d for _, d in order]
    return SearchSpace(dims, stacks, keep_prob=opts.keep_prob)


def _check_choices(name: str, choices: tuple, full: int, multiple: int) -> None:
    for v in choices:
        if not isinstance(v, int) or isinstance(v, bool) or not (1 <= v <= full) or v % multiple:
            allowed = f"ints in [1, {full}]" + (f" that are multiples of {multiple}" if multiple > 1 else "")
            raise SearchSpaceError(f"`space['choices']` gives dim `{name}` the choice {v!r}; allowed: {allowed}")


_OUT = {"linear": "active_out_features", "conv": "active_out_channels"}
_IN = {"linear": "active_in_features", "conv": "active_in_channels"}


def _port_attr(mod: nn.Module, port: str) -> str:
    if port == "ch":
        return "active_out_channels" if isinstance(mod, nn.Conv2d) else "active_num_features"
    kind = "linear" if isinstance(mod, nn.Linear) else "conv"
    return (_OUT if port == "out" else _IN)[kind]


def _setter(targets: list[tuple[nn.Module, str]], full: int) -> Callable[[int], None]:
    def apply(value: int) -> None:
        v = None if value == full else value
        for mod, attr in targets:
            setattr(mod, attr, v)

    return apply


def _head_setter(anchor: nn.Module, spec) -> Callable[[int], None]:
    q, k, v, qkv, o = (anchor.get_submodule(p) if p else None for p in (spec.q, spec.k, spec.v, spec.qkv, spec.o))
    originals = {(p, a): getattr(anchor.get_submodule(p) if p else anchor, a)
                 for p, a in spec.head_attrs + spec.size_attrs + spec.kv_attrs}
    if qkv is not None:
        qkv.out_blocks = 3

    def apply(heads: int) -> None:
        full = heads == spec.num_heads
        width = None if full else heads * spec.head_dim
        kv = None if full else heads // spec.kv_group * spec.head_dim
        for lin, w in ((q, width), (qkv, width), (k, kv), (v, kv)):
            if lin is not None:
                lin.active_out_features = w
        o.active_in_features = width
        values = {**{key: heads for key in spec.head_attrs}, **{key: heads * spec.head_dim for key in spec.size_attrs},
                  **{key: heads // spec.kv_group for key in spec.kv_attrs}}
        for (p, a), value in values.items():
            setattr(anchor.get_submodule(p) if p else anchor, a, originals[(p, a)] if full else value)

    return apply


def _make_elastic(model: nn.Module, found: Discovery, space: SearchSpace) -> dict[str, Callable[[Any], None]]:
    appliers: dict[str, Callable[[Any], None]] = {}
    for w in found.widths:
        if w.name not in space.dims:
            continue
        targets = []
        for ports, port in ((w.producers, "out"), (w.consumers, "in"), (w.channelwise, "ch")):
            for path in ports:
                mod = model.get_submodule(path)
                make_elastic(mod, mixin_for(mod))
                targets.append((mod, _port_attr(mod, port)))
        appliers[w.name] = _setter(targets, w.size)
    for h in found.heads:
        if h.name not in space.dims:
            continue
        anchor = model.get_submodule(h.path)
        for p in (h.spec.q, h.spec.k, h.spec.v, h.spec.qkv, h.spec.o):
            if p:
                make_elastic(anchor.get_submodule(p), mixin_for(anchor.get_submodule(p)))
        appliers[h.name] = _head_setter(anchor, h.spec)
    for b in found.blocks:
        if b.name not in space.dims:
            continue
        block = model.get_submodule(b.path)
        make_elastic(block, SkippableBlock, skip_output_len=b.out_len)

        def keep(value: bool, block=block) -> None:
            block.skipped = not value

        appliers[b.name] = keep
    return appliers
