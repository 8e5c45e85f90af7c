"""Elastic mixture-of-experts MLPs of Hugging Face ``transformers`` 5 (Mixtral): every expert's MLP width.

In ``transformers`` 5 the experts of a layer are one module holding 3-D parameters, ``gate_up_proj``
``[experts, 2 * intermediate, hidden]`` (gate rows, then up rows) and ``down_proj`` ``[experts, hidden,
intermediate]``, and its forward (whichever experts implementation the config selects) indexes them per expert.
The op's width is internal to the module (``internal=True``: its producer and consumer are the module itself,
both ports on the same attribute): during ``forward`` the parameters are replaced by views
of their first ``k`` intermediate units (of the gate and of the up half), so every implementation computes the
smaller MLP; export clones the slices and sets ``intermediate_dim``.

Only the concatenated ``[gate; up]``, untransposed, gated layout is covered (``accepts``); others keep their width.

Example:
    >>> ElasticExperts._elastic_attrs
    ('active_intermediate', 'gate_up_blocks')
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_supernet.elastic.base import ElasticMixin
from lightning_supernet.ops import ElasticOp, Port, class_named, register_op

__all__ = ["EXPERTS", "ElasticExperts"]

_NAMES = ("transformers.models.mixtral.modeling_mixtral.MixtralExperts",)


class ElasticExperts(ElasticMixin):
    """Mixin for ``MixtralExperts`` (see the module docstring).

    Attributes:
        active_intermediate: intermediate units kept in every expert (``None``: all).
        gate_up_blocks: ``gate_up_proj`` holds 2 equal blocks (gate, up).

    Example:
        >>> ElasticExperts._elastic_attrs[0]
        'active_intermediate'
    """

    _elastic_attrs = ("active_intermediate", "gate_up_blocks")

    def init_elastic(self) -> None:
        """Start full; ``gate_up_proj`` is two blocks."""
        self.active_intermediate = None
        self.gate_up_blocks = 2

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.active_intermediate is None:
            return super().forward(*args, **kwargs)
        full = {n: self._parameters[n] for n in ("gate_up_proj", "down_proj")}
        for name, t in full.items():
            self._parameters[name] = self.active_tensor(name, t)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._parameters.update(full)

    def export_(self) -> dict[str, int]:
        super().export_()
        self.intermediate_dim = self.down_proj.shape[-1]
        return {"intermediate_dim": self.intermediate_dim}


def _accepts(module: nn.Module) -> bool:
    cls = next((c for n in _NAMES if (c := class_named(module, n)) is not None), None)
    return (cls is not None and getattr(module, "is_concatenated", True) and not getattr(module, "is_transposed", False)
            and getattr(module, "has_gate", True) and not getattr(module, "has_bias", False)
            and isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) and module.gate_up_proj.dim() == 3)


#: Mixtral's experts: the intermediate units of every expert (rows of both halves of ``gate_up_proj``, columns of
#: ``down_proj``); producer and consumer are the module itself.
EXPERTS = register_op(ElasticOp(
    "transformers.MixtralExperts", _NAMES, "transform",
    {"out": Port((("gate_up_proj", 1),), "active_intermediate", "intermediate_dim", blocks="gate_up_blocks"),
     "in": Port((("down_proj", 2),), "active_intermediate", "intermediate_dim")},
    ElasticExperts, accepts=_accepts, channel_dim=-1, internal=True,
))
