"""Presets: the callback set and defaults for common ways of training a supernet.

:func:`pretrained_recipe` is "fine-tune a pretrained model into a supernet": sort the model by importance measured
on data first (:func:`lightning_supernet.importance.prioritize`), then train the sandwich with every subnet
distilled from a frozen copy of the original and the largest anchored to it.

Example:
    >>> [type(cb).__name__ for cb in pretrained_recipe()]
    ['SandwichSampling', 'InplaceDistillation']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lightning_supernet.callbacks.distillation import InplaceDistillation
from lightning_supernet.callbacks.sandwich import SandwichSampling

__all__ = ["pretrained_recipe"]


def pretrained_recipe(loss: str = "kl", features: Sequence[str] | Mapping[str, Any] | None = None,
                      anchor_weight: float | None = None, largest_task_weight: float = 0.0,
                      student_task_weight: float = 0.0, num_random: int = 2, sampler: str = "uniform",
                      temperature: float = 1.0, feature_loss_kind: str = "cosine", feature_weight: float = 4.0,
                      output_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      seed: int = 0) -> list[Callback]:
    """Callbacks to fine-tune a pretrained model into a supernet whose largest subnet stays the original.

    Before ``fit``, call ``prioritize(supernet, train_loader)`` (:mod:`lightning_supernet.importance`): Taylor
    importance on a few batches sorts channels, neurons and heads, and the blocks are ranked so depth choices drop
    the least important first. Then train with these callbacks (no ``ParameterPrioritization``: the model is
    already sorted, and a reorder after the teacher copy would break feature terms on width-sliced outputs):

    - ``SandwichSampling(num_random)``: largest + ``num_random`` sampled + smallest per step.
    - ``InplaceDistillation(teacher="original")``: a frozen copy of the model, taken at the first batch (one extra
      copy of the parameters and buffers in memory, one no-grad forward per step), teaches every subnet; the
      largest is distilled toward it with ``anchor_weight`` and its own task term weighs
      ``largest_task_weight`` (0: the largest stays the pretrained model); students learn from the original only
      (``student_task_weight=0``, BigNAS) plus the feature terms.

    Args:
        loss: output loss: ``"kl"`` for logits, ``"cosine"`` (or ``"mse"``) for embedding models.
        features: module paths whose outputs are distilled too (see ``InplaceDistillation``), e.g. the final
            norm's output (residual stream, full width): ``["norm"]`` or ``["encoder.layer.5.output"]``.
        anchor_weight: weight of the largest's distillation toward the original; ``None``: as many as the
            students of a step (``num_random + 1``), so that the anchor balances the students' pull on the shared
            weights (tuning runs on the benchmark's model, 100 steps, Adam lr 3e-4: the largest's embedding
            cosine to the original 0.990 with weight 1, 0.994 with 3; benchmarks/RESULTS.md, issue 13).
        largest_task_weight, student_task_weight, temperature, output_transform: as in ``InplaceDistillation``.
        num_random, sampler, seed: as in ``SandwichSampling``.
        feature_loss_kind: loss of the feature terms (``"cosine"`` by default: scale-free).
        feature_weight: weight of each feature term when ``features`` is a list of paths (a mapping gives its own
            weights). 4 by default: on the benchmark's model (300 steps) weight 4 against 1 moved the 50 %-MLP
            subnet's embedding cosine from 0.9877 to 0.9899 and the 4-of-6-blocks subnet's from 0.9903 to 0.9931,
            the largest's from 0.9962 to 0.9965 (benchmarks/RESULTS.md, issue 13).

    Returns:
        ``[SandwichSampling, InplaceDistillation]`` for ``Trainer(callbacks=...)``.

    Example:
        >>> cbs = pretrained_recipe(loss="cosine", features=["blocks.5"])
        >>> term = cbs[1].features["blocks.5"]
        >>> cbs[1].teacher, cbs[1].anchor_weight, term["loss"], term["weight"]
        ('original', 3.0, 'cosine', 4.0)
    """
    if features is not None and not isinstance(features, Mapping):
        features = {path: feature_weight for path in features}
    return [SandwichSampling(num_random=num_random, sampler=sampler, seed=seed),
            InplaceDistillation(loss=loss, temperature=temperature, student_task_weight=student_task_weight,
                                teacher="original",
                                anchor_weight=float(num_random + 1) if anchor_weight is None else anchor_weight,
                                largest_task_weight=largest_task_weight, features=features,
                                feature_loss_kind=feature_loss_kind, output_transform=output_transform)]
