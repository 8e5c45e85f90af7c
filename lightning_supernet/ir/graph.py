"""The IR: a hierarchical graph of the model's modules, recorded from one traced forward pass.

Forward hooks on every module record the hierarchy, the call order and the input/output shapes of each call
(the nodes, with enough metadata to rebuild each leaf module); the autograd graph of the same pass records how
data flows between calls. Every autograd node created inside a call has a sequence number between the call's
start and end markers, so "which call owns this op" is an interval lookup, whatever the model's code does.

Example:
    >>> import torch, torch.nn as nn
    >>> g = trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4))
    >>> [c.path for c in g.calls]
    ['', '0', '1', '2']
    >>> g.modules["0"].meta
    {'in_features': 4, 'out_features': 8}
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_supernet.errors import DiscoveryError
from lightning_supernet.state import preserved_modes

__all__ = ["Call", "ModuleGraph", "ModuleNode", "call_model", "flatten_tensors", "trace"]

_META_ATTRS = (
    "in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding", "groups",
    "num_features", "normalized_shape", "num_embeddings", "embedding_dim", "eps",
)


@dataclass
class ModuleNode:
    """One module of the hierarchy.

    Attributes:
        path: dotted name in ``model.named_modules()`` (``""`` is the root).
        cls_name: the module's class name.
        children: paths of direct children.
        params: direct parameters' names and shapes.
        meta: constructor attributes needed to rebuild a leaf module (``in_features``, ``kernel_size``...).
        calls: indices of this module's calls in :attr:`ModuleGraph.calls`.

    Example:
        >>> ModuleNode("fc", "Linear").is_leaf
        True
    """

    path: str
    cls_name: str
    children: list[str] = field(default_factory=list)
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    calls: list[int] = field(default_factory=list)

    @property
    def is_leaf(self) -> bool:
        """A module with no child modules."""
        return not self.children


@dataclass
class Call:
    """One call of one module during the traced forward.

    Attributes:
        index: position in call order.
        path: the module called.
        in_shapes / out_shapes: shapes of the tensors passed in / returned (flattened).
        out_len: ``None`` when the call returned a tensor, else the length of the returned tuple/list.
        start / end: autograd sequence numbers bracketing the ops the call created.
        out_from_inputs: for a tuple output, per item: ``("arg", j)`` / ``("kw", name)`` if the item is that input
            tensor itself, returned unchanged (T5 blocks pass the shared position bias on), else ``None``.

    Example:
        >>> Call(0, "fc", ((2, 4),), ((2, 8),), None, 0, 3).owns(1)
        True
    """

    index: int
    path: str
    in_shapes: tuple[tuple[int, ...], ...]
    out_shapes: tuple[tuple[int, ...], ...]
    out_len: int | None
    start: int
    end: int
    in_nodes: tuple[Any, ...] = ()
    out_nodes: tuple[Any, ...] = ()
    out_is_tensor: tuple[bool, ...] = ()
    out_from_inputs: tuple[Any, ...] = ()

    def owns(self, seq: int) -> bool:
        """Whether an autograd node with sequence number ``seq`` was created inside this call."""
        return self.start < seq < self.end


class ModuleGraph:
    """The traced IR: module nodes, calls in order, and the autograd graph that links them.

    The autograd part (``parents``, the calls' ``in_nodes``/``out_nodes``) is only needed for discovery; call
    :meth:`release` afterwards so the activations it holds can be freed.

    Example:
        >>> g = trace(nn.Linear(2, 3), torch.randn(1, 2)); print(g)
        Linear [in (1, 2) -> out (1, 3)]
    """

    def __init__(self, modules: dict[str, ModuleNode], calls: list[Call], outputs: tuple, inputs: tuple) -> None:
        self.modules = modules
        self.calls = calls
        self.output_nodes = {n for n in outputs if n is not None}
        self.input_nodes = {n for n in inputs if n is not None}
        self.parents: dict[Any, list[Any]] = {}
        #: ``id`` of every parameter (and tracked input) the traced forward read, wherever it was read
        self.used_params: set[int] = set()
        #: modules that own parameters while none of their descendants do (a leaf ``Linear``, or timm's
        #: ``BatchNormAct2d`` around its parameter-free activation): the units an elastic op slices
        self.param_leaves = {path for path, n in modules.items() if n.params and not self._params_below(path)}
        # parameter-free modules (ReLU, Dropout) are transparent ops
        self._leaf_calls = sorted((c for c in calls if c.path in self.param_leaves), key=lambda c: c.start)
        self._starts = [c.start for c in self._leaf_calls]
        self._build_parents()

    def _build_parents(self) -> None:
        stack, seen = list(self.output_nodes), set(self.output_nodes)
        while stack:
            node = stack.pop()
            variable = getattr(node, "variable", None)
            if variable is not None:
                self.used_params.add(id(variable))
            for child, _ in getattr(node, "next_functions", ()):
                if child is None:
                    continue
                self.parents.setdefault(child, []).append(node)
                if child not in seen:
                    seen.add(child)
                    stack.append(child)

    def _params_below(self, path: str) -> bool:
        node = self.modules[path]
        return any(self.modules[c].params or self._params_below(c) for c in node.children)

    def is_unit(self, path: str) -> bool:
        """A leaf module, or one that owns parameters around parameter-free children (see :attr:`param_leaves`).

        Example:
            >>> g = trace(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2)); g.is_unit("0"), g.is_unit("")
            (True, False)
        """
        return self.modules[path].is_leaf or path in self.param_leaves

    def leaf_call_owning(self, node: Any) -> Call | None:
        """The call of a parameter-owning leaf module inside which ``node`` was created, if any."""
        seq = seq_nr(node)
        if seq is None:
            return None
        i = bisect.bisect_left(self._starts, seq) - 1
        if i >= 0 and self._leaf_calls[i].owns(seq):
            return self._leaf_calls[i]
        return None

    def release(self) -> None:
        """Drop the references to the autograd graph (and the activations it saved)."""
        self.parents.clear()
        self.output_nodes.clear()
        self.input_nodes.clear()
        for c in self.calls:
            c.in_nodes = c.out_nodes = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view: modules with class, params, meta and call shapes."""
        return {
            path: {"class": n.cls_name, "params": n.params, "meta": n.meta,
                   "calls": [{"in": self.calls[i].in_shapes, "out": self.calls[i].out_shapes} for i in n.calls]}
            for path, n in self.modules.items()
        }

    def __str__(self) -> str:
        lines = []
        for path, node in self.modules.items():
            depth = 0 if not path else path.count(".") + 1
            shapes = ""
            if node.calls:
                c = self.calls[node.calls[0]]
                shapes = f" [in {', '.join(map(str, c.in_shapes[:2]))} -> out {', '.join(map(str, c.out_shapes[:1]))}]"
            name = path.rsplit(".", 1)[-1] + ": " if path else ""
            lines.append("  " * depth + f"{name}{node.cls_name}{shapes}")
        return "\n".join(lines)


def seq_nr(node: Any) -> int | None:
    """Autograd sequence number of ``node`` (``None`` for leaves' AccumulateGrad).

    Example:
        >>> a = torch.ones(2, requires_grad=True)
        >>> first, second = (a * 2).grad_fn, (a + 1).grad_fn
        >>> seq_nr(second) > seq_nr(first), seq_nr(None)
        (True, None)
    """
    if node is None or type(node).__name__ == "AccumulateGrad":
        return None
    return node._sequence_nr()


def _marker() -> int:
    return (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr()


def flatten_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nested tuple/list/dict/dataclass/``ModelOutput``, in order.

    Example:
        >>> len(flatten_tensors({"a": torch.ones(1), "b": (torch.ones(2), 3)}))
        2
    """
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in flatten_tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in flatten_tensors(v)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in flatten_tensors(getattr(obj, f.name))]
    return []


def call_model(model: nn.Module, example: Any) -> Any:
    """Call ``model`` the way Lightning treats ``example_input_array``: tuple → ``*args``, dict → ``**kwargs``.

    Example:
        >>> call_model(nn.Identity(), torch.ones(1)).shape
        torch.Size([1])
    """
    if isinstance(example, tuple):
        return model(*example)
    if isinstance(example, Mapping):
        return model(**example)
    return model(example)


def _track(example: Any) -> Any:
    """Float inputs become non-leaf tensors so that they have an autograd node of their own."""
    if isinstance(example, torch.Tensor):
        return example.detach().requires_grad_(True) * 1 if example.is_floating_point() else example
    if isinstance(example, Mapping):
        return type(example)({k: _track(v) for k, v in example.items()}) if type(example) is dict else example
    if isinstance(example, tuple):
        return tuple(_track(v) for v in example)
    return example


def trace(model: nn.Module, example: Any, train: bool = False) -> ModuleGraph:
    """Run one forward pass of ``model`` on ``example`` (eval mode, grad on) and record the IR.

    Every module's own train/eval flag is restored afterwards. A train-mode trace (``train=True``, for modules
    that only run in training, such as auxiliary classifiers) updates BatchNorm statistics: callers that need the
    model unchanged snapshot its buffers (:class:`lightning_supernet.state.ModelSnapshot`).

    Args:
        model: any ``nn.Module``.
        example: a tensor, a tuple of positional arguments or a dict of keyword arguments.
        train: trace in training mode instead of eval mode.

    Raises:
        DiscoveryError: the forward pass failed, naming the model class and the original error.

    Example:
        >>> g = trace(nn.Linear(2, 3), torch.randn(1, 2)); g.calls[0].out_shapes
        ((1, 3),)
    """
    modules: dict[str, ModuleNode] = {}
    path_of: dict[int, str] = {}
    for path, mod in model.named_modules(remove_duplicate=True):
        path_of[id(mod)] = path
        node = ModuleNode(path, type(mod).__name__)
        node.params = {n: tuple(p.shape) for n, p in mod.named_parameters(recurse=False)}
        node.meta = {a: _plain(getattr(mod, a)) for a in _META_ATTRS if hasattr(mod, a)}
        modules[path] = node
        if path:
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            modules[parent].children.append(path)

    calls: list[Call] = []
    open_calls: dict[int, list[tuple[int, tuple, int]]] = {}

    def pre_hook(mod, args, kwargs):
        tensors = flatten_tensors((args, kwargs))
        open_calls.setdefault(id(mod), []).append((len(calls), tuple(tensors), _marker()))
        calls.append(None)  # placeholder keeps call order = order of entry

    def post_hook(mod, args, kwargs, output):
        index, ins, start = open_calls[id(mod)].pop()
        outs = flatten_tensors(output)
        calls[index] = Call(
            index=index, path=path_of[id(mod)],
            in_shapes=tuple(tuple(t.shape) for t in ins), out_shapes=tuple(tuple(t.shape) for t in outs),
            out_len=None if isinstance(output, torch.Tensor) else len(output) if isinstance(output, (tuple, list)) else -1,
            start=start, end=_marker(),
            in_nodes=tuple(t.grad_fn for t in ins), out_nodes=tuple(t.grad_fn for t in outs),
            out_is_tensor=tuple(isinstance(o, torch.Tensor) for o in output) if isinstance(output, (tuple, list)) else (),
            out_from_inputs=_from_inputs(args, kwargs, output),
        )

    handles = []
    for mod in model.modules():
        handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(mod.register_forward_hook(post_hook, with_kwargs=True))
    # frozen parameters would leave holes in the autograd graph (a frozen per-channel bias couples dims too)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        with preserved_modes(model), torch.enable_grad():
            model.train(train)
            for p in frozen:
                p.requires_grad_(True)
            tracked = _track(example)
            output = call_model(model, tracked)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise DiscoveryError(
            f"could not trace `{type(model).__name__}` with the example input ({_describe(example)}): "
            f"{type(err).__name__}: {err}. HINT: the example input (`example_input_array` or `example_input=`) "
            "must be what `model(...)` accepts: a tensor, a tuple of positional arguments or a dict of keyword "
            "arguments."
        ) from err
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise DiscoveryError(f"module calls {missing} never returned while tracing `{type(model).__name__}`")
    for c in calls:
        modules[c.path].calls.append(c.index)
    inputs = tuple(t.grad_fn for t in flatten_tensors(tracked))
    outputs = tuple(t.grad_fn for t in flatten_tensors(output))
    if not any(o is not None for o in outputs):
        raise DiscoveryError(
            f"the output of `{type(model).__name__}` does not depend on any parameter or on its input; "
            "nothing to discover"
        )
    return ModuleGraph(modules, calls, outputs, inputs)


def _from_inputs(args: tuple, kwargs: dict, output: Any) -> tuple[Any, ...]:
    """Which items of a tuple ``output`` are input tensors returned unchanged (see ``Call.out_from_inputs``)."""
    if not isinstance(output, (tuple, list)):
        return ()
    where = {id(a): ("arg", j) for j, a in enumerate(args) if isinstance(a, torch.Tensor)}
    where.update({id(v): ("kw", k) for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    return tuple(where.get(id(o)) if isinstance(o, torch.Tensor) else None for o in output)


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, torch.Size)) else value


def _describe(example: Any) -> str:
    if isinstance(example, torch.Tensor):
        return f"tensor of shape {tuple(example.shape)}"
    if isinstance(example, Mapping):
        return "dict with keys " + ", ".join(map(str, example))
    if isinstance(example, tuple):
        return f"tuple of {len(example)}"
    return type(example).__name__
