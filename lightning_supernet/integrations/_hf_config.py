"""Finding the Hugging Face config values that describe an extracted subnet (used by the extract finaliser).

Nothing here trusts an attribute name. Which config key sets the length of which layer stack, and how a key
sizes the tensors, is *measured*: the model class is built on the meta device from the config with one key
changed, and the module trees and tensor shapes are compared. So a model with several stacks (BART's encoder and
decoder, ConvNeXt's and Swin's stages with ``depths=[...]``, Wav2Vec2's feature convolutions beside its layers)
has each stack matched to its own key, and a key such as ``encoder_ffn_dim`` or ``num_key_value_heads`` is solved
for from the subnet's shapes. Whatever no config value reproduces is reported, never guessed.

Example:
    >>> from transformers import BartConfig, BartModel
    >>> bart = BartModel(BartConfig(vocab_size=40, d_model=16, encoder_layers=2, decoder_layers=3,
    ...     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32))
    >>> sorted(stack_keys(bart).items())
    [('decoder.layers', ('decoder_layers', None)), ('encoder.layers', ('encoder_layers', None))]
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["describe_issue", "extracted_path", "is_depth_key", "meta_build", "solve_config", "stack_keys",
           "tensor_shapes", "with_value"]

#: key names (substrings) probed as per-layer sizes; a probe only proposes a value, the rebuilt model decides
_SIZE_WORDS = ("ffn", "intermediate", "inner", "d_ff", "hidden_dim", "heads", "head", "mlp", "experts")


def meta_build(cls: type, config: Any) -> nn.Module:
    """``cls(config)`` on the meta device (no memory, no initialisation).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> meta_build(BertModel, BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
        ...     intermediate_size=16, vocab_size=10)).pooler.dense.weight.device.type
        'meta'
    """
    with torch.device("meta"):
        return cls(config)


def tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter's and buffer's shape by name.

    Example:
        >>> tensor_shapes(nn.Linear(2, 3))
        {'weight': (3, 2), 'bias': (3,)}
    """
    out = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    out.update({n: tuple(b.shape) for n, b in model.named_buffers(remove_duplicate=False)})
    return out


def _lists(model: nn.Module) -> dict[str, int]:
    return {p: len(m) for p, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and p}


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _set(config: Any, key: str, index: int | None, value: int) -> Any:
    """A copy of ``config`` with the value set (:func:`with_value` sets it in place)."""
    return with_value(copy.deepcopy(config), key, index, value)


def _get(config: Any, key: str, index: int | None) -> int:
    value = getattr(config, key)
    return value if index is None else value[index]


def _try_build(cls: type, config: Any, key: str | None = None, index: int | None = None,
               value: int = 0) -> nn.Module | None:
    try:
        return meta_build(cls, config if key is None else _set(config, key, index, value))
    except Exception:  # noqa: BLE001 - a probe value the class refuses tells nothing
        return None


def stack_keys(hf: nn.Module) -> dict[str, tuple[str, int | None]]:
    """Which config key (and list index, for ``depths=[...]``) sets the length of each layer stack of ``hf``.

    Measured: a key whose value equals a stack's length is raised by one on a meta-device copy; the stacks whose
    length grows by exactly one are its. Cached on the model's class and config values.

    Example:
        >>> from transformers import ConvNextConfig, ConvNextModel
        >>> m = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 2], num_stages=2))
        >>> stack_keys(m)["encoder.stages.1.layers"]
        ('depths', 1)
    """
    config, cls = hf.config, type(hf)
    lengths = _lists(hf)
    found: dict[str, tuple[str, int | None]] = {}
    for key, value in config.to_dict().items():
        probes: list[tuple[int | None, int]] = []
        if _int(value) and value in lengths.values():
            probes.append((None, value))
        elif isinstance(value, (list, tuple)) and all(_int(v) for v in value) and 0 < len(value) <= 16:
            probes += [(i, v) for i, v in enumerate(value) if v in lengths.values()]
        for index, v in probes:
            if not hasattr(config, key):
                continue
            base = config
            layer_types = getattr(config, "layer_types", None)
            if index is None and isinstance(layer_types, (list, tuple)) and len(layer_types) == v:
                base = copy.deepcopy(config)  # one type per layer (Qwen2, Gemma): the probe needs one more
                base.layer_types = [*layer_types, layer_types[-1]]
            probe = _try_build(cls, base, key, index, v + 1)
            if probe is None:
                continue
            grown = [p for p, n in _lists(probe).items() if lengths.get(p) == v and n == v + 1]
            for p in grown:
                if not any(p.startswith(q + ".") for q in grown if q != p):  # the outermost list that grew
                    found.setdefault(p, (key, index))
    return found


def solve_config(hf: nn.Module, candidate: Any, extra_heads_dim: int | None = None) -> tuple[Any, dict]:
    """Change per-layer size keys of ``candidate`` until the model it builds has ``hf``'s tensor shapes.

    Each key whose name suggests a size (``*ffn*``, ``*intermediate*``, ``*heads*``...) is probed at twice its
    value; the tensors it resizes give a linear rule ``size = a * value + b``, solved for the subnet's sizes. A
    value is kept only if every tensor it resizes agrees on it. ``extra_heads_dim``: the head size to pin as
    ``head_dim`` first when the config derives it from ``hidden_size // num_attention_heads`` and the class
    reads ``config.head_dim`` (Qwen2, Phi, Mixtral), kept only if the model it builds is unchanged.

    Returns:
        ``(config, shapes)``: the updated config and the tensors whose shapes still differ (name -> (subnet,
        rebuilt)); empty when the config describes the subnet.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> cfg = BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16,
        ...                  vocab_size=10)
        >>> small = BertModel(BertConfig(**{**cfg.to_dict(), "intermediate_size": 4}))
        >>> new, left = solve_config(small, cfg)
        >>> new.intermediate_size, left
        (4, {})
    """
    cls = type(hf)
    want = tensor_shapes(hf)

    def remaining(config: Any) -> dict[str, tuple]:
        ref = _try_build(cls, config)
        if ref is None:
            return {"<build>": ((), ())}
        got = tensor_shapes(ref)
        keys = set(want) | set(got)
        return {k: (want.get(k), got.get(k)) for k in sorted(keys) if want.get(k) != got.get(k)}

    left = remaining(candidate)
    if not left:
        return candidate, left
    if extra_heads_dim and getattr(candidate, "head_dim", None) in (None, extra_heads_dim):
        try:
            pinned = _set(candidate, "head_dim", None, extra_heads_dim)
        except (AttributeError, TypeError, ValueError):  # a derived property (Falcon): nothing to pin
            pinned = None
        if pinned is not None and remaining(pinned) == left:  # pinning changed nothing: the class reads it, or ignores it harmlessly
            candidate = pinned
    base = _try_build(cls, candidate)
    if base is None:
        return candidate, left
    base_shapes = tensor_shapes(base)
    for key, value in candidate.to_dict().items():
        if not _int(value) or value <= 0 or not any(w in key.lower() for w in _SIZE_WORDS) or not left:
            continue
        probe = _try_build(cls, candidate, key, None, 2 * value)
        if probe is None:
            continue
        solved = _solve(base_shapes, tensor_shapes(probe), want, value)
        if solved is not None and solved != value:
            try:
                trial = _set(candidate, key, None, solved)
            except (AttributeError, TypeError, ValueError):
                continue
            new_left = remaining(trial)
            if len(new_left) < len(left):
                candidate, left = trial, new_left
                base_shapes = tensor_shapes(_try_build(cls, candidate))
    return candidate, left


def _solve(base: Mapping[str, tuple], probe: Mapping[str, tuple], want: Mapping[str, tuple], value: int) -> int | None:
    """The value of a key that gives ``want``'s sizes, by ``size = a * value + b`` over every tensor it resizes."""
    answers: set[int] = set()
    for name, shape in base.items():
        other, target = probe.get(name), want.get(name)
        if other is None or target is None or len(other) != len(shape) or len(target) != len(shape):
            continue
        for s, s2, t in zip(shape, other, target, strict=True):
            if s == s2:
                continue
            a = (s2 - s) / value
            v = (t - s) / a + value
            if v <= 0 or abs(v - round(v)) > 1e-9:
                return None
            answers.add(round(v))
    return answers.pop() if len(answers) == 1 else None


def extracted_path(orig: nn.Module, path: str, prefix: str, cfg: Mapping[str, Any]) -> str | None:
    """Where the module at ``path`` of the original model sits in the extracted one (outer stacks lose their
    dropped blocks and are renumbered), or ``None`` if it was dropped.

    Example:
        >>> stages = nn.ModuleList([nn.Sequential(nn.Linear(1, 1)), nn.Sequential(nn.Linear(1, 1), nn.ReLU())])
        >>> extracted_path(stages, "1.0", "", {"0.keep": False})
        '0.0'
    """
    parts, out, mod = path.split("."), [], orig
    for i, part in enumerate(parts):
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            parent = ".".join(parts[:i]) + "." if i else ""
            kept = [j for j in range(len(mod)) if cfg.get(f"{prefix}{parent}{j}.keep", True)]
            if int(part) not in kept:
                return None
            out.append(str(kept.index(int(part))))
        else:
            out.append(part)
        mod = mod.get_submodule(part)
    return ".".join(out)


def with_value(config: Any, key: str, index: int | None, value: int) -> Any:
    """Set ``config.key`` (or ``config.key[index]``) to ``value`` in place; returns ``config``.

    Example:
        >>> from transformers import ConvNextConfig
        >>> with_value(ConvNextConfig(depths=[1, 2]), "depths", 1, 1).depths
        [1, 1]
    """
    if index is None:
        setattr(config, key, value)
    else:
        seq = list(getattr(config, key))
        seq[index] = value
        setattr(config, key, seq)
    return config


def is_depth_key(config: Any, key: str) -> bool:
    """Whether ``key`` holds a stack length (set even when the widths cannot be described).

    Example:
        >>> is_depth_key(None, "encoder_layers"), is_depth_key(None, "intermediate_size")
        (True, False)
    """
    return key in ("layer_types", "depths") or key.endswith(("layers", "num_hidden_layers")) or key == "n_layer"


def describe_issue(hf: nn.Module, shapes: list[dict[str, int]], left: Mapping[str, Any]) -> str:
    """Why ``save_pretrained`` cannot describe the extracted ``hf``, in words, with the way out.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> m = BertModel(BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, vocab_size=10))
        >>> "save_subnet" in describe_issue(m, [], {"pooler.dense.weight": ((4, 8), (8, 8))})
        True
    """
    config_name = type(hf.config).__name__
    reasons = []
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
        values = [s.get(key) for s in shapes]
        if len(set(values)) > 1:
            reasons.append(f"the kept layers have {key} {values}, and a `{config_name}` holds one value for all "
                           "layers")
    heads = getattr(hf.config, "num_attention_heads", None)
    if "head_dim" not in hf.config.to_dict() and any(s.get("num_attention_heads", heads) != heads for s in shapes):
        reasons.append(f"`{config_name}` has no `head_dim`: it derives the head size as hidden_size // "
                       "num_attention_heads, so fewer heads of the same size cannot be described (keep heads fixed "
                       "with `space={'elastic': ['width', 'depth']}` to stay within it)")
    name, (shape, ref) = next(iter(left.items())) if not isinstance(next(iter(left.values())), str) else (
        next(iter(left)), (None, None))
    example = (f"`{name}` has shape {tuple(shape)}, which no value of the config gives (it builds "
               f"{tuple(ref) if ref else 'none'})" if shape is not None else f"`{name}`: {left[name]}")
    reasons = "; ".join(reasons) + f" (e.g. {example})" if reasons else example
    return (f"this subnet of `{type(hf).__name__}` cannot be saved with `save_pretrained`: {reasons}; so "
            "`from_pretrained` could not rebuild it. HINT: save it with "
            "`lightning_supernet.integrations.transformers.save_subnet(model, path)` and reload it with "
            "`load_subnet(path)`, or extract a subnet with the same shape in every layer "
            "(`uniform_subnet(supernet, ...)`)")
