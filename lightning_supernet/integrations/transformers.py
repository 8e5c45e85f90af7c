"""Hugging Face ``transformers``: configs of extracted subnets, saving/reloading them, and ``ModelOutput`` logits.

A supernet of a ``PreTrainedModel`` (BERT-style encoders with classification or question-answering heads, ViT,
Llama-style decoders with grouped-query attention) needs nothing from this module to train: discovery finds the
layers, MLP widths and heads by itself. This module makes the *extracted* subnet a good Hugging Face citizen:

* an extract finaliser (registered when this module is imported, or by :func:`install`) renumbers the
  ``layer_idx`` of the kept layers (the KV cache is indexed by it), sets ``num_hidden_layers`` (and
  ``layer_types``) and, when every kept layer has the same shape, ``intermediate_size``, ``num_attention_heads``,
  ``num_key_value_heads`` and ``head_dim``, so ``save_pretrained`` + ``from_pretrained`` give the same model. It
  proves this by building the model class from the updated config on the meta device and comparing every tensor
  shape and size attribute.
* a subnet the config cannot describe (layers of different widths; fewer heads in a config class that derives
  the head size from ``hidden_size // num_attention_heads``, as BERT and ViT do) refuses ``save_pretrained`` with a
  message saying why, and saves with :func:`save_subnet` / reloads with :func:`load_subnet`: the config, a layout
  of per-layer shapes and the weights; reloading builds the model from the config and shrinks it.
* :func:`output_logits` picks the logits out of a ``ModelOutput`` (``output_transform=`` of ``SupernetModule``);
  :func:`uniform_subnet` builds a config whose layers all have the same shape.

``transformers`` is imported only when a function here needs it.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from lightning_supernet import SupernetModule
    >>> bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=64, num_labels=2)).eval()
    >>> ids = torch.randint(0, 50, (1, 6))
    >>> sn = SupernetModule(bert, torch.nn.functional.cross_entropy, example_input={"input_ids": ids},
    ...                     output_transform=output_logits)
    >>> small = sn.extract(uniform_subnet(sn, intermediate_size=32))
    >>> small.config.intermediate_size
    32
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_supernet.files import atomic_write
from lightning_supernet.integrations._hf_config import (
    describe_issue,
    extracted_path,
    is_depth_key,
    meta_build,
    solve_config,
    stack_keys,
    with_value,
)
from lightning_supernet.integrations._subnet_io import (
    SubnetFormatError,
    apply_layout,
    layout_diff,
    load_weights,
    read_layout,
    write_subnet,
)

if TYPE_CHECKING:
    from lightning_supernet.module import SupernetModule
    from lightning_supernet.space import SubnetConfig

__all__ = ["NonUniformSubnetError", "config_space", "install", "is_pretrained_model", "load_subnet", "output_logits",
           "save_subnet", "uniform_subnet"]

_INSTALLED = False
_MISSING = object()
#: config attributes that hold the MLP width, by model family (BERT/Llama, OPT, DistilBERT, T5, GPT-2)
_INTERMEDIATE = ("intermediate_size", "ffn_dim", "hidden_dim", "d_ff", "n_inner")


class NonUniformSubnetError(SubnetFormatError):
    """``save_pretrained`` was called on a subnet that a Hugging Face config cannot describe.

    Example:
        >>> issubclass(NonUniformSubnetError, ValueError)
        True
    """


def _transformers() -> Any:
    from lightning_supernet.integrations import require

    return require("transformers", "transformers", "the Hugging Face integration")


def is_pretrained_model(module: Any) -> bool:
    """Whether ``module`` is a ``transformers.PreTrainedModel`` (without importing ``transformers``).

    Example:
        >>> is_pretrained_model(torch.nn.Linear(2, 2))
        False
    """
    hf = sys.modules.get("transformers")
    return hf is not None and isinstance(module, hf.PreTrainedModel)


def output_logits(output: Any) -> torch.Tensor:
    """The tensor of a ``ModelOutput`` to train and distil on: ``logits``, or ``start_logits``/``end_logits``
    stacked on a last dim of 2 (question answering), or ``last_hidden_state``; a tensor passes through.

    Use it as ``SupernetModule(..., output_transform=output_logits)``.

    Raises:
        TypeError: the output holds none of these.

    Example:
        >>> from transformers.modeling_outputs import QuestionAnsweringModelOutput
        >>> out = QuestionAnsweringModelOutput(start_logits=torch.zeros(2, 5), end_logits=torch.ones(2, 5))
        >>> output_logits(out).shape
        torch.Size([2, 5, 2])
    """
    if isinstance(output, torch.Tensor):
        return output
    get = output.get if isinstance(output, Mapping) else (lambda k: getattr(output, k, None))
    if get("logits") is not None:
        return get("logits")
    if get("start_logits") is not None and get("end_logits") is not None:
        return torch.stack([get("start_logits"), get("end_logits")], dim=-1)
    if get("last_hidden_state") is not None:
        return get("last_hidden_state")
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"`output` ({type(output).__name__}) has no `logits`, `start_logits`/`end_logits` or "
                    "`last_hidden_state`; pass your own `output_transform`")


# -- the extract finaliser ------------------------------------------------------------------------------------
def install() -> None:
    """Register the extract finaliser (idempotent; importing this module already does it).

    Cheap: it does not import ``transformers``; the finaliser returns at once when ``transformers`` was never
    imported, since the model cannot then hold a ``PreTrainedModel``.

    Example:
        >>> install(); install()
        >>> from lightning_supernet.extract import _FINALIZERS
        >>> sum(f is finalize_extracted for f in _FINALIZERS)
        1
    """
    global _INSTALLED
    if not _INSTALLED:
        from lightning_supernet.extract import register_finalizer

        register_finalizer(finalize_extracted)
        _INSTALLED = True


def _roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost ``PreTrainedModel`` instances in ``model`` (a ``BertForX`` holds a ``BertModel``)."""
    found: list[tuple[str, nn.Module]] = []
    for path, mod in model.named_modules():  # pre-order: an outer model comes before the models inside it
        if not any(p == "" or path.startswith(p + ".") for p, _ in found) and is_pretrained_model(mod):
            found.append((path, mod))
    return found


def finalize_extracted(small: nn.Module, cfg: SubnetConfig, supernet: SupernetModule) -> None:
    """Update the config of every Hugging Face model inside an extracted subnet (see the module docstring).

    Called by :meth:`SupernetModule.extract`; not meant to be called directly.

    Example:
        >>> finalize_extracted(torch.nn.Linear(2, 2), {}, None)  # no PreTrainedModel inside: nothing to do
    """
    if "transformers" not in sys.modules:
        return
    for path, hf in _roots(small):
        orig = supernet.model.get_submodule(path) if path else supernet.model
        _finalize_one(hf, orig, f"{path}." if path else "", cfg)


def _layer_stack(orig: nn.Module, n: Any) -> str | None:
    if not isinstance(n, int) or isinstance(n, bool):
        return None
    keys = [p for p, (k, i) in stack_keys(orig).items() if k == _depth_key(orig.config) and i is None]
    if len(keys) == 1:
        return keys[0]
    stacks = [p for p, m in orig.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) == n
              and p]
    return stacks[0] if len(stacks) == 1 else None


def _depth_key(config: Any) -> str:
    attribute_map = getattr(config, "attribute_map", {}) or {}
    return attribute_map.get("num_hidden_layers", "num_hidden_layers")


def _intermediate_key(config: Any) -> str | None:
    return next((k for k in _INTERMEDIATE if isinstance(getattr(config, k, None), int)), None)


def _meta_build(cls: type, config: Any) -> nn.Module:
    return meta_build(cls, config)


def _layer_shape(small_layer: nn.Module, orig_layer: nn.Module, intermediate: Any) -> dict[str, int]:
    from lightning_supernet.ir.heads import find_head_spec

    shape: dict[str, int] = {}
    for name, lin in orig_layer.named_modules():
        if isinstance(lin, nn.Linear) and lin.out_features == intermediate:
            try:
                shape["intermediate_size"] = small_layer.get_submodule(name).out_features
            except AttributeError:  # a sub-block of the layer was dropped
                pass
            break
    for mod in small_layer.modules():
        spec = find_head_spec(mod)
        if spec is not None:
            shape.update(num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                         head_dim=spec.head_dim)
            break
    return shape


def _finalize_one(hf: nn.Module, orig: nn.Module, prefix: str, cfg: Mapping[str, Any]) -> None:
    """Set the config keys that describe the subnet; never raises on a correct subnet: what the config cannot
    describe becomes the reason ``save_pretrained`` refuses (per stack, in words)."""
    config = hf.config
    candidate = copy.deepcopy(config)
    shapes: list[dict[str, int]] = []
    head_dim = None
    ikey = _intermediate_key(config)
    for stack, (key, index) in stack_keys(orig).items():
        n = len(orig.get_submodule(stack))
        kept = [i for i in range(n) if cfg.get(f"{prefix}{stack}.{i}.keep", True)]
        where = extracted_path(orig, stack, prefix, cfg)
        if where is None:  # the stack sits in a block that was dropped: the config key cannot say so
            continue
        layers, orig_layers = hf.get_submodule(where), orig.get_submodule(stack)
        if len(layers) != len(kept):
            continue
        for i, (layer, source) in enumerate(zip(layers, kept, strict=True)):
            for mod in layer.modules():  # the KV cache is indexed by layer_idx: number the kept layers 0..k-1
                if getattr(mod, "layer_idx", None) == source:
                    mod.layer_idx = i
            shape = _layer_shape(layer, orig_layers[source], getattr(config, ikey, None) if ikey else None)
            shapes.append(shape)
            head_dim = head_dim or shape.get("head_dim")
        candidate = with_value(candidate, key, index, len(kept))
        layer_types = getattr(config, "layer_types", None)
        if index is None and isinstance(layer_types, (list, tuple)) and len(layer_types) == n:
            candidate.layer_types = [layer_types[i] for i in kept]
    issue = None
    candidate, left = solve_config(hf, candidate, head_dim)
    try:
        diff = layout_diff(hf, _meta_build(type(hf), candidate))
    except (SubnetFormatError, RuntimeError, ValueError) as err:
        diff, left = {"shapes": {}, "attrs": {}}, left or {"<tree>": str(err)}
    if left:
        issue = describe_issue(hf, shapes, left)
    else:
        # same tensors everywhere: copy attributes that are stale copies of the old config (LlamaMLP keeps
        # `intermediate_size`) so the model equals what `from_pretrained` will build
        reference = _meta_build(type(hf), candidate)
        for path, attrs in diff["attrs"].items():
            mod, ref = hf.get_submodule(path), reference.get_submodule(path)
            for key in attrs:
                setattr(mod, key, getattr(ref, key))
    before = config.to_dict()
    for key, value in candidate.to_dict().items():  # setattr follows the config's `attribute_map`
        if before.get(key, _MISSING) != value and (not left or is_depth_key(candidate, key)):
            try:
                setattr(config, key, copy.deepcopy(getattr(candidate, key)))
            except AttributeError:  # a derived property of the config class
                pass
    _mark(hf, issue)


def _refuse_save_pretrained(issue: str, *args: Any, **kwargs: Any) -> None:
    raise NonUniformSubnetError(issue)


def _mark(hf: nn.Module, issue: str | None) -> None:
    """Record whether the model's config describes it; if not, its ``save_pretrained`` raises the reason."""
    hf.supernet_format_issue = issue
    if issue is not None:
        hf.save_pretrained = functools.partial(_refuse_save_pretrained, issue)
    else:
        hf.__dict__.pop("save_pretrained", None)


def config_space(model: nn.Module, example_input: Any, loss_fn: Any = None, space: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> dict[str, Any]:
    """``space=`` options that keep a Hugging Face model's search space describable by its config.

    Each group of dims (the same dim in every layer) is tried at its smallest value on a copy of the model; a
    group whose extracted subnet the config cannot describe (BERT's pooler width, heads of a config without
    ``head_dim``) is added to ``exclude``. A subnet of the returned space saves with ``save_pretrained`` when its
    layers agree (:func:`uniform_subnet`); any subnet saves with :func:`save_subnet`.

    Args:
        model: the ``PreTrainedModel`` (or a module holding one); not changed.
        example_input: as for ``SupernetModule``. loss_fn: as for ``SupernetModule`` (default: cross-entropy).
        space: your own options, extended. kwargs: more ``SupernetModule`` arguments.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from lightning_supernet import SupernetModule
        >>> bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64, num_labels=2)).eval()
        >>> ex = {"input_ids": torch.randint(0, 50, (1, 6))}
        >>> opts = config_space(bert, ex)
        >>> sn = SupernetModule(bert, torch.nn.functional.cross_entropy, example_input=ex, space=opts)
        >>> sn.extract(sn.search_space.smallest()).supernet_format_issue is None
        True
    """
    from lightning_supernet.integrations._hf_space import config_space_options

    return config_space_options(model, example_input, loss_fn or nn.functional.cross_entropy, space, **kwargs)


# -- configs with one shape in every layer --------------------------------------------------------------------
def uniform_subnet(supernet: SupernetModule, num_layers: int | None = None, *, layers: Sequence[int] | None = None,
                   intermediate_size: int | None = None, num_attention_heads: int | None = None) -> SubnetConfig:
    """A config of ``supernet`` (which wraps a Hugging Face model) whose kept layers all have the same shape.

    Such a subnet extracts to a model whose updated config describes it: ``save_pretrained`` works.

    Args:
        supernet: a ``SupernetModule`` around a ``PreTrainedModel`` (or a LightningModule holding one).
        num_layers: keep this many layers, evenly spread over the stack (default: all).
        layers: or keep exactly these layer indices.
        intermediate_size: every layer's MLP width (default: full); must be one of the dims' choices.
        num_attention_heads: every layer's query heads (default: full); must be one of the dims' choices.

    Raises:
        SearchSpaceError: a value that is not among the choices, or too few layers kept.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lightning_supernet import SupernetModule
        >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4,
        ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)).eval()
        >>> sn = SupernetModule(llama, torch.nn.functional.cross_entropy, output_transform=output_logits,
        ...                     example_input={"input_ids": torch.randint(0, 50, (1, 5)), "use_cache": False})
        >>> cfg = uniform_subnet(sn, num_layers=2, num_attention_heads=2)
        >>> sn.extract(cfg).config.num_key_value_heads
        1
    """
    roots = _roots(supernet.model)
    if not roots:
        raise TypeError(f"`supernet` wraps `{type(supernet.model).__name__}`, which holds no transformers "
                        "PreTrainedModel")
    path, hf = roots[0]
    prefix = f"{path}." if path else ""
    config = hf.config
    stack = _layer_stack(hf, getattr(config, "num_hidden_layers", None))
    values: dict[str, Any] = {}
    space = supernet.search_space
    if stack is not None and (num_layers is not None or layers is not None):
        n = config.num_hidden_layers
        if layers is None:
            if not 1 <= num_layers <= n:
                from lightning_supernet.errors import SearchSpaceError

                raise SearchSpaceError(f"`num_layers` is {num_layers}; allowed: 1..{n}")
            layers = sorted({round(i * (n - 1) / max(num_layers - 1, 1)) for i in range(num_layers)})
        for i in range(n):
            name = f"{prefix}{stack}.{i}.keep"
            if name in space.dims:
                values[name] = i in set(layers)
    inside = f"{prefix}{stack}." if stack is not None else prefix
    for name, dim in space.dims.items():
        if not name.startswith(inside):
            continue
        ikey = _intermediate_key(config)
        if dim.kind == "width" and intermediate_size is not None and ikey and dim.largest == getattr(config, ikey):
            values[name] = intermediate_size
        elif dim.kind == "heads" and num_attention_heads is not None:
            values[name] = num_attention_heads
    return space.config(values)


# -- saving and reloading any subnet --------------------------------------------------------------------------
def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> type:
    module, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as err:
        raise SubnetFormatError(f"the model class {path!r} in subnet.json cannot be imported ({err}); expected an "
                                "importable 'module:Class'") from err
    return obj


def _no_init_weights() -> Any:
    import contextlib

    for module in ("transformers.initialization", "transformers.modeling_utils"):
        fn = getattr(importlib.import_module(module), "no_init_weights", None) if _has(module) else None
        if fn is not None:
            return fn()
    return contextlib.nullcontext()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def save_subnet(model: nn.Module, path: str | os.PathLike) -> None:
    """Save an extracted Hugging Face subnet of any shape so that :func:`load_subnet` rebuilds it.

    Writes ``config.json`` (the model's config), ``subnet.json`` (the model class and the layout: every tensor
    shape and size attribute that differs from the model the config builds) and ``subnet.safetensors``. A
    subnet whose config describes it (``model.supernet_format_issue is None``) also saves with
    ``save_pretrained``.

    Args:
        model: the ``PreTrainedModel`` (for a LightningModule holding one, pass that attribute).
        path: a directory (created if needed).

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``.

    Example:
        >>> import tempfile, torch
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                             intermediate_size=64)).eval()
        >>> d = tempfile.mkdtemp(); save_subnet(bert, d)
        >>> type(load_subnet(d)).__name__
        'BertModel'
    """
    if not is_pretrained_model(model):
        raise TypeError(f"`model` must be a transformers PreTrainedModel, got `{type(model).__name__}`. HINT: for a "
                        "LightningModule that holds one, pass that attribute (e.g. `small.model`)")
    os.makedirs(path, exist_ok=True)
    with atomic_write(os.path.join(path, "config.json"), "w") as f:  # a full disk leaves no partial config
        f.write(model.config.to_json_string(use_diff=True))
    layout = layout_diff(model, _meta_build(type(model), copy.deepcopy(model.config)))
    builder = {"kind": "transformers", "class": _class_path(type(model)),
               "format_issue": getattr(model, "supernet_format_issue", None)}
    write_subnet(model, path, builder, layout)


def load_subnet(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a subnet saved by :func:`save_subnet`: build the model from its config, shrink it, load weights.

    Args:
        path: the directory written by :func:`save_subnet`.
        dtype: cast the loaded model to this dtype.

    Raises:
        SubnetFormatError: ``path`` holds no subnet; ``subnet.json``, ``config.json`` or ``subnet.safetensors`` is
            missing, truncated or corrupted; or the weights do not fit the layout.

    Example:
        >>> load_subnet("/does/not/exist")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        SubnetFormatError: `path` '/does/not/exist' holds no subnet.json ...
    """
    doc = read_layout(path)
    builder = doc.get("builder", {})
    if builder.get("kind") != "transformers" or not isinstance(builder.get("class"), str):
        raise SubnetFormatError(f"{path} holds a {builder.get('kind')!r} subnet, not a transformers one; load it "
                                "with that integration's loader")
    _transformers()
    cls = _import_class(builder["class"])
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):  # from_pretrained would fall back to a default config (bert-base...)
        raise SubnetFormatError(f"{config_file} does not exist; expected the model config written by `save_subnet`")
    try:
        config = cls.config_class.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SubnetFormatError(f"{config_file} cannot be read ({type(err).__name__}: {err}); expected the model "
                                "config written by `save_subnet` (the file is truncated or corrupted)") from err
    with _no_init_weights():
        model = cls(config)
    apply_layout(model, doc)
    load_weights(model, path)
    _mark(model, builder.get("format_issue"))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


install()
