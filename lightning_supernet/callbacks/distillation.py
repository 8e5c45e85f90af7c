"""In-place distillation: the largest subnet's detached outputs are the soft targets of the other subnets.

BigNAS/AttentiveNAS use KL divergence to the teacher's softened distribution; AlphaNet's adaptive
α-divergence takes the larger of two α-divergences (one mass-covering, one mode-seeking) with the density ratio
clipped; ``"mse"`` and ``"bce"`` (sigmoid soft targets, for mask logits) cover regression and segmentation
outputs. ``balance=True`` scales the distillation term to the task loss's magnitude (AmoebaLLM).

Example:
    >>> import torch
    >>> kd = InplaceDistillation(loss="kl", temperature=2.0)
    >>> t = torch.randn(4, 10)
    >>> kd.distill_loss(t.clone(), t).abs().item() < 1e-6
    True
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_supernet.errors import InvalidArgumentError
from lightning_supernet.training import PlanItem

if TYPE_CHECKING:
    from lightning_supernet.module import SupernetModule

__all__ = ["InplaceDistillation", "alpha_divergence"]

_LOSSES = ("kl", "alpha_divergence", "mse", "bce")


def alpha_divergence(student: torch.Tensor, teacher: torch.Tensor, alpha: float, clip: float = 5.0) -> torch.Tensor:
    """Amari α-divergence ``D_α(p‖q)`` between teacher ``p`` and student ``q`` (logits over the last dim).

    ``α → 1`` is ``KL(p‖q)``, ``α → 0`` is ``KL(q‖p)``; the density ratio ``p/q`` is clipped to
    ``[1/clip, clip]`` for stability (AlphaNet).

    Example:
        >>> x = torch.randn(3, 5)
        >>> alpha_divergence(x, x, alpha=-1.0).abs().item() < 1e-6
        True
    """
    logq = F.log_softmax(student, dim=-1)
    logp = F.log_softmax(teacher, dim=-1)
    if abs(alpha - 1.0) < 1e-6:
        return (logp.exp() * (logp - logq)).sum(-1).mean()
    if abs(alpha) < 1e-6:
        return (logq.exp() * (logq - logp)).sum(-1).mean()
    log_ratio = (logp - logq).clamp(-math.log(clip), math.log(clip))
    return ((logq.exp() * (torch.exp(alpha * log_ratio) - 1)).sum(-1) / (alpha * (alpha - 1))).mean()


class InplaceDistillation(Callback):
    """Make the plan's first subnet (the largest) the teacher of the others.

    Args:
        loss: ``"kl"``, ``"alpha_divergence"``, ``"mse"`` or ``"bce"``.
        temperature: softens both distributions for ``"kl"`` (the loss is scaled by ``T²``).
        weight: weight of the distillation term for each student.
        student_task_weight: weight of the students' own task loss. BigNAS uses 0 (students learn from the
            teacher only); the default 1 keeps the task loss, which measured better on our digits benchmark
            (benchmarks/RESULTS.md, issue 3 section).
        balance: rescale each student's distillation term to its task loss's magnitude (AmoebaLLM).
        alpha_min, alpha_max: the two α of the adaptive α-divergence (AlphaNet: -1 and 1).
        clip: density-ratio clip of the α-divergence.
        class_dim: the dim that holds classes in the outputs (``-1`` for logits ``(B, C)`` or ``(B, T, V)``).

    Raises:
        ValueError: an unknown ``loss`` or a non-positive ``temperature``/``clip``.

    Example:
        >>> InplaceDistillation(loss="alpha_divergence").loss
        'alpha_divergence'
    """

    plan_order = 10

    def __init__(self, loss: str = "kl", temperature: float = 1.0, weight: float = 1.0,
                 student_task_weight: float = 1.0, balance: bool = False, alpha_min: float = -1.0,
                 alpha_max: float = 1.0, clip: float = 5.0, class_dim: int = -1) -> None:
        if loss not in _LOSSES:
            raise InvalidArgumentError(f"`loss` must be one of {_LOSSES}, got {loss!r}")
        if not temperature > 0:
            raise InvalidArgumentError(f"`temperature` must be > 0, got {temperature!r}")
        if not clip > 1:
            raise InvalidArgumentError(f"`clip` must be > 1, got {clip!r}")
        self.loss = loss
        self.temperature = temperature
        self.weight = weight
        self.student_task_weight = student_task_weight
        self.balance = balance
        self.alpha_min = alpha_min
        self.alpha_max = alpha_max
        self.clip = clip
        self.class_dim = class_dim
        self._warned = False

    def supernet_plan(self, supernet: SupernetModule, plan: list[PlanItem], batch_idx: int) -> list[PlanItem]:
        """Mark the largest subnet as teacher and add the distillation term to the subnets after it."""
        largest = supernet.search_space.largest()
        first = next((i for i, p in enumerate(plan) if p.config == largest), None)
        if first is None:
            if not self._warned:
                rank_zero_warn("InplaceDistillation: the plan has no largest subnet to teach the others (e.g. "
                               "`SandwichSampling(largest=False)`); training without distillation")
                self._warned = True
            return plan
        students = [p.with_(distill_weight=self.weight, task_weight=self.student_task_weight,
                            distill_fn=self.distill_loss, balance=self.balance) for p in plan[first + 1:]]
        return plan[:first] + [plan[first].with_(teacher=True)] + students

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The distillation loss of one student's output against the teacher's (detached) output."""
        if student.shape != teacher.shape:
            raise InvalidArgumentError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} "
                             "differ: in-place distillation needs outputs of the same shape")
        student, teacher = student.float(), teacher.float()
        if self.loss == "mse":
            return F.mse_loss(student, teacher)
        if self.loss == "bce":  # Bernoulli KL: cross-entropy to the soft targets minus their entropy
            target = torch.sigmoid(teacher)
            return (F.binary_cross_entropy_with_logits(student, target)
                    - F.binary_cross_entropy_with_logits(teacher, target))
        if self.class_dim not in (-1, student.dim() - 1):
            student, teacher = student.movedim(self.class_dim, -1), teacher.movedim(self.class_dim, -1)
        student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        if self.loss == "kl":
            t = self.temperature
            return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean",
                            log_target=True) * t * t
        return torch.maximum(alpha_divergence(student, teacher, self.alpha_min, self.clip),
                             alpha_divergence(student, teacher, self.alpha_max, self.clip))
