"""Importance from data, before training: reorder widths/heads and rank blocks of a (pretrained) supernet.

:func:`prioritize` runs standalone on a data loader — no ``Trainer`` — so a pretrained model is sorted before
``fit``: channels, neurons and head groups by importance (function-preserving reorder,
:mod:`lightning_supernet.prioritize`), and skippable blocks by the measured effect of removing each one
(:func:`block_importance`), stored in the search space so that depth choices drop the least important blocks
first (:meth:`~lightning_supernet.space.SearchSpace.set_block_priority`).

Example:
    >>> import torch, torch.nn.functional as F
    >>> from lightning_supernet import SupernetModule
    >>> from lightning_supernet.models import TinyViT
    >>> sn = SupernetModule(TinyViT(dim=16, depth=4, num_heads=2), F.cross_entropy,
    ...                     example_input=torch.randn(1, 1, 8, 8))
    >>> data = [(torch.randn(8, 1, 8, 8), torch.randint(10, (8,)))]
    >>> report = prioritize(sn, data, kind="magnitude")
    >>> sorted(report)
    ['blocks', 'kind', 'permutations', 'signal']
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn

from lightning_supernet import prioritize as _prio
from lightning_supernet.errors import InvalidArgumentError
from lightning_supernet.ir.graph import call_model

if TYPE_CHECKING:
    from lightning_supernet.module import SupernetModule

__all__ = ["DEFAULT_KIND", "DEFAULT_LOSS", "block_importance", "perturbation_loss", "prioritize", "task_signal",
           "taylor_scores"]

KINDS = ("taylor", "activation", "magnitude")
#: the importance :func:`prioritize` uses by default (see its docstring for the measurement behind it)
DEFAULT_KIND = "taylor"
#: what the default Taylor importance differentiates: the output's sensitivity (see :func:`prioritize`)
DEFAULT_LOSS = "output"
#: below these the task loss is taken to carry no signal (round-off-size gradients)
LOSS_EPS = 1e-6
GRAD_EPS = 1e-7


def _batches(data: Iterable[Any], n: int, device: torch.device) -> list[Any]:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidArgumentError(f"`batches` must be an int >= 1, got {n!r}")
    try:
        out = [move_data_to_device(b, device) for b in itertools.islice(iter(data), n)]
    except TypeError as err:
        raise InvalidArgumentError(f"`dataloader` must be an iterable of training batches (a DataLoader), got "
                                   f"{type(data).__name__}") from err
    if not out:
        raise InvalidArgumentError("`dataloader` yielded no batch")
    return out


def _output(supernet: SupernetModule, batch: Any) -> torch.Tensor:
    return supernet.select_output(call_model(supernet.model, supernet.batch_to_input(batch)))


def perturbation_loss(seed: int = 0) -> Any:
    """A loss with signal where the task loss has none: ``⟨f(x), r⟩ / B`` with a fresh Gaussian ``r`` per batch
    (seeded), so ``|w · ∂L/∂w|`` measures how much the output moves along a random direction when ``w`` is
    removed — a first-order sensitivity of the output itself, whatever the task.

    Example:
        >>> fn = perturbation_loss(seed=1)
        >>> callable(fn)
        True
    """
    def loss(supernet: SupernetModule, batch: Any, i: int) -> torch.Tensor:
        out = _output(supernet, batch).float()
        gen = torch.Generator().manual_seed(seed * 7919 + i)
        r = torch.randn(out.shape, generator=gen).to(out.device)
        return (out * r).sum() / max(out.shape[0], 1)

    return loss


def task_signal(supernet: SupernetModule, batch: Any) -> tuple[float, float]:
    """``(|task loss|, ‖∂L/∂θ‖ / ‖θ‖)`` of the largest subnet on one batch; ``.grad`` is untouched.

    A model distilled toward itself (step 0 of a fine-tune whose loss is the distance to the original) gives
    ``(~0, ~1e-8)``: Taylor importance computed from it would rest on round-off.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from lightning_supernet import SupernetModule
        >>> from lightning_supernet.models import TinyViT
        >>> sn = SupernetModule(TinyViT(dim=16, depth=2, num_heads=2), F.cross_entropy,
        ...                     example_input=torch.randn(1, 1, 8, 8))
        >>> loss, grad = task_signal(sn, (torch.randn(4, 1, 8, 8), torch.randint(10, (4,))))
        >>> loss > 0 and grad > 0
        True
    """
    params = [p for p in supernet.model.parameters() if p.requires_grad]
    with torch.enable_grad(), supernet.subnet(supernet.search_space.largest()), \
            supernet.log_as("importance", False, "train"):
        loss = supernet.task_loss(batch, 0)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    gnorm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    pnorm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params)) or 1.0
    return abs(float(loss.detach())), gnorm / pnorm


def taylor_scores(supernet: SupernetModule, batches: list[Any], loss: Any = None) -> dict[str, torch.Tensor]:
    """``Σ_batches (Σ_unit |w·∂L/∂w|)²`` per unit of each group (``loss``: as in
    :func:`~lightning_supernet.prioritize.taylor_importance`, ``None`` for the task loss).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from lightning_supernet import SupernetModule
        >>> from lightning_supernet.models import TinyViT
        >>> sn = SupernetModule(TinyViT(dim=16, depth=1, num_heads=2), F.cross_entropy,
        ...                     example_input=torch.randn(1, 1, 8, 8))
        >>> s = taylor_scores(sn, [(torch.randn(4, 1, 8, 8), torch.randint(10, (4,)))])
        >>> s["blocks.0.mlp.fc1.width"].shape
        torch.Size([64])
    """
    total: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        one = None if loss is None else (lambda sn, b, _j, i=i: loss(sn, b, i))
        for name, score in _prio.taylor_importance(supernet, [batch], loss=one).items():
            total[name] = total.get(name, 0) + score.pow(2)
    return total


def block_importance(supernet: SupernetModule, batches: Iterable[Any]) -> dict[str, float]:
    """The measured effect of removing each skippable block: ``Σ‖f₋ᵦ(x) − f(x)‖² / Σ‖f(x)‖²`` over the batches,
    the largest subnet with only block ``b`` skipped against the largest (normalised output error, as Nemotron
    Elastic ranks layers). Higher: more important. Runs in eval mode under ``no_grad``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from lightning_supernet import SupernetModule
        >>> from lightning_supernet.models import TinyViT
        >>> sn = SupernetModule(TinyViT(dim=16, depth=4, num_heads=2), F.cross_entropy,
        ...                     example_input=torch.randn(1, 1, 8, 8))
        >>> scores = block_importance(sn, [(torch.randn(4, 1, 8, 8), None)])
        >>> sorted(scores)[:1], all(v > 0 for v in scores.values())
        (['blocks.0.keep'], True)
    """
    space = supernet.search_space
    names = [n for n, d in space.dims.items() if d.kind == "depth"]
    batches = list(batches)
    was_training = supernet.model.training
    supernet.model.eval()
    try:
        with torch.no_grad():
            with supernet.subnet(space.largest()):
                ref = [_output(supernet, b).float() for b in batches]
            norm = sum(float(r.pow(2).sum()) for r in ref) or 1.0
            scores = {}
            for name in names:
                with supernet.subnet(space.config({name: False})):
                    err = sum(float((_output(supernet, b).float() - r).pow(2).sum()) for b, r in zip(batches, ref))
                scores[name] = err / norm
    finally:
        supernet.model.train(was_training)
    return scores


def prioritize(supernet: SupernetModule, dataloader: Iterable[Any], kind: str = DEFAULT_KIND, batches: int = 4,
               depth: bool = True, loss: Any = DEFAULT_LOSS, optimizers: Iterable[torch.optim.Optimizer] = (),
               protect: bool = False) -> dict[str, Any]:
    """Sort a supernet by importance measured on data, before (or between) training — no ``Trainer`` needed.

    Widths and heads: one function-preserving reorder per group (the full model computes the same function).
    Depth (``depth=True``): :func:`block_importance` ranks the skippable blocks and the search space keeps the
    most important ones in depth choices (``smallest()``/``middle()`` keep them, in model order).

    **Taylor** scores a unit by ``(Σ_unit |w·∂L/∂w|)²`` summed over the batches (first-order Taylor, squared per
    batch as Molchanov et al. 2019, so that gradients that cancel across batches do not cancel the score).
    **The default for pretrained models is ``kind="taylor", loss="output"``** — Taylor on the output's
    sensitivity (:func:`perturbation_loss`), not on the task loss — because it kept the first-k 50 %-MLP subnet
    of a pretrained model best where we measured (benchmarks/RESULTS.md, issue 13: the benchmark's pretrained
    6-block ViT, embedding cosine to the original with no training: output-Taylor 0.988 (4 batches), magnitude
    0.983, task-loss Taylor 0.94 (0.98 with 16 batches), activation 0.95, unsorted 0.94; on issue 13's pretrained
    sentence-embedding transformer, task-loss Taylor 0.80 beat activation 0.71 and magnitude 0.66). At a pretrained
    optimum the task gradient averages to about zero, so task-loss Taylor rests on a few batches' noise; the
    output's sensitivity is what distilling the subnets toward the original needs to keep. ``loss="task"``
    uses the task loss; when it has no signal — ``|loss| < 1e-6`` or gradients at round-off scale, as for a model
    distilled toward itself at step 0 — it falls back to the output's sensitivity and warns.

    Args:
        supernet: the supernet (a ``SupernetModule``), not yet attached to a Trainer or attached.
        dataloader: training batches, as the wrapped ``training_step`` takes them.
        kind: ``"taylor"``, ``"activation"`` (mean |activation|; heads by magnitude) or ``"magnitude"``.
        batches: how many batches of ``dataloader`` to use.
        depth: also rank the skippable blocks (store the ranking in ``supernet.search_space``).
        loss: what Taylor differentiates: ``"output"`` (the output's sensitivity, :func:`perturbation_loss`),
            ``"task"`` (the wrapped ``training_step``'s loss or ``loss_fn``), or ``loss(supernet, batch, i) ->
            scalar``.
        optimizers: optimizers whose state moves with the reordered parameters.
        protect: sort only within the bands between width choices (see :func:`~lightning_supernet.prioritize.reorder`).

    Returns:
        ``{"kind", "permutations": {group: perm}, "blocks": {keep-dim: score}, "signal"}``; ``signal`` is the loss
        Taylor used: ``"output"``, ``"task"``, ``"given"``, ``"output (the task loss had none)"``, or ``None``.

    Raises:
        ValueError: unknown ``kind``, bad ``batches``, or a ``dataloader`` that yields nothing.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from lightning_supernet import SupernetModule
        >>> from lightning_supernet.models import TinyViT
        >>> sn = SupernetModule(TinyViT(dim=16, depth=4, num_heads=2), F.cross_entropy,
        ...                     example_input=torch.randn(1, 1, 8, 8))
        >>> x = torch.randn(1, 1, 8, 8)
        >>> with torch.no_grad(): before = sn(x)
        >>> _ = prioritize(sn, [(torch.randn(16, 1, 8, 8), torch.randint(10, (16,)))], batches=1)
        >>> with torch.no_grad(): torch.allclose(sn(x), before, atol=1e-5)
        True
    """
    if kind not in KINDS:
        raise InvalidArgumentError(f"`kind` must be one of {KINDS}, got {kind!r}")
    data = _batches(dataloader, batches, supernet.device)
    signal = None
    if kind == "magnitude":
        scores = _prio.magnitude_importance(supernet)
    elif kind == "activation":
        scores = _prio.activation_importance(supernet, data)
    else:
        if not callable(loss) and loss not in ("output", "task"):
            raise InvalidArgumentError(f"`loss` must be 'output', 'task' or a callable, got {loss!r}")
        signal = loss if isinstance(loss, str) else "given"
        if loss == "task":
            value, grad = task_signal(supernet, data[0])
            if value < LOSS_EPS or grad < GRAD_EPS:
                rank_zero_warn(f"prioritize: the task loss has no signal to rank units by (loss {value:.2e}, "
                               f"relative gradient {grad:.2e}: a model distilled toward itself?); Taylor importance "
                               "uses the output's sensitivity to random directions instead (`loss='output'`). "
                               "HINT: pass `loss=` with a task loss that has signal")
                loss, signal = "output", "output (the task loss had none)"
        fn = perturbation_loss() if loss == "output" else None if loss == "task" else loss
        scores = taylor_scores(supernet, data, fn)
    perms = _prio.reorder(supernet, scores, optimizers, protect)
    blocks: dict[str, float] = {}
    if depth and any(d.kind == "depth" for d in supernet.search_space.dims.values()):
        blocks = block_importance(supernet, data)
        supernet.search_space.set_block_priority(blocks)
        # validation's named subnets ("smallest", "middle") follow the new ranking
        supernet.refresh_eval_subnets()
    return {"kind": kind, "permutations": perms, "blocks": blocks, "signal": signal}
