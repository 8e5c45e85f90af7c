"""A search space a Hugging Face config can describe: which dims to leave fixed so ``save_pretrained`` works.

Measured, not named: the model is wrapped on a copy, its dims are grouped by their name with the layer index
replaced by ``*`` (``bert.encoder.layer.*.intermediate.dense.width``), each group is set to its smallest value
in every layer at once, the subnet is extracted, and the group is kept only if the extracted model's config
describes it (the export finaliser found config values that rebuild every tensor). Dims outside the layer stacks
that no config key sets (BERT's pooler width, a classification head's hidden width) are left fixed.

Per-layer dims stay per layer: a subnet is describable when every layer of a stack has the same value (use
:func:`lightning_supernet.integrations.transformers.uniform_subnet`); others save with ``save_subnet``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["config_space_options"]

_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def _pattern(name: str) -> str:
    return _INDEX.sub("*", name)


def config_space_options(model: nn.Module, example_input: Any, loss_fn: Callable[..., Any],
                         space: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """``space=`` options for ``SupernetModule(model, ...)`` whose uniform subnets the model's config describes.

    Args:
        model: the model to wrap later (a copy is wrapped here; ``model`` is not changed).
        example_input, loss_fn, kwargs: as for ``SupernetModule``.
        space: the user's own options, extended with ``exclude`` patterns.

    Returns:
        the options dict (``{"exclude": [...], ...}``).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64, num_labels=2)).eval()
        >>> opts = config_space_options(bert, {"input_ids": torch.randint(0, 50, (1, 6))},
        ...                             torch.nn.functional.cross_entropy, space={"elastic": ["width", "depth"]})
        >>> opts["exclude"]
        ['bert.pooler.dense.width']
    """
    from lightning_supernet.module import SupernetModule

    options = dict(space or {})
    probe = SupernetModule(copy.deepcopy(model), loss_fn, example_input=example_input, space=options, **kwargs)
    search = probe.search_space
    groups: dict[str, list[str]] = {}
    for name in search.dims:
        groups.setdefault(_pattern(name), []).append(name)
    excluded: list[str] = []
    smallest = search.smallest()  # depth: the smallest subnet's keep flags (a valid prefix of each stack)
    for pattern, names in groups.items():
        cfg = search.config({n: smallest[n] for n in names})
        small = probe.extract(cfg)
        if any(getattr(m, "supernet_format_issue", None) for m in small.modules()):
            excluded.append(pattern)
    options["exclude"] = [*options.get("exclude", ()), *excluded]
    return options
