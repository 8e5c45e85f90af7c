"""In-place distillation: the subnets learn from a teacher — the largest subnet, or a frozen copy of the original.

BigNAS/AttentiveNAS use KL divergence to the teacher's softened distribution; AlphaNet's adaptive
α-divergence takes the larger of two α-divergences (one mass-covering, one mode-seeking) with the density ratio
clipped; ``"mse"`` and ``"bce"`` (sigmoid soft targets, for mask logits) cover regression and segmentation
outputs, ``"cosine"`` embeddings. ``balance=True`` scales the distillation term to the task loss's magnitude
(AmoebaLLM).

For a pretrained model, ``teacher="original"`` distils every subnet from a frozen copy of the model as it was when
training started (the largest subnet too, with ``anchor_weight``, so that it stays the pretrained model), and
``features=`` adds feature-level terms on named modules' outputs (hidden states, attention outputs, a pooled
embedding).

Example:
    >>> import torch
    >>> kd = InplaceDistillation(loss="kl", temperature=2.0)
    >>> t = torch.randn(4, 10)
    >>> kd.distill_loss(t.clone(), t).abs().item() < 1e-6
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_supernet.errors import ArgumentError, InvalidArgumentError
from lightning_supernet.ir.graph import call_model, flatten_tensors
from lightning_supernet.training import PlanItem

if TYPE_CHECKING:
    from lightning_supernet.module import SupernetModule

__all__ = ["InplaceDistillation", "alpha_divergence", "feature_loss", "pooled_embedding"]

_LOSSES = ("kl", "alpha_divergence", "mse", "bce", "cosine")
_FEATURE_LOSSES = ("mse", "cosine", "kl")
_TEACHERS = ("largest", "original")


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


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, loss: str = "mse", dim: int = -1,
                 temperature: float = 1.0) -> torch.Tensor:
    """Distance between a student's feature and the teacher's: ``"mse"``, ``"cosine"`` (``1 − cos`` along ``dim``,
    averaged) or ``"kl"`` (softmax along ``dim``, scaled by ``T²``).

    A width-sliced student feature (fewer channels than the teacher's) is compared with the teacher's first
    channels: the teacher is cut to the student's size along every dim where they differ (prioritization puts the
    most important channels first, and the teacher's order is the supernet's as long as no reorder happens after
    the teacher copy was taken).

    Example:
        >>> t = torch.randn(2, 3, 8)
        >>> round(feature_loss(t[..., :4] * 2, t, "cosine").item(), 6)
        0.0
    """
    if student.dim() != teacher.dim():
        raise InvalidArgumentError(f"student feature {tuple(student.shape)} and teacher feature "
                                   f"{tuple(teacher.shape)} have different ranks")
    if student.shape != teacher.shape:
        if any(s > t for s, t in zip(student.shape, teacher.shape)):
            raise InvalidArgumentError(f"student feature {tuple(student.shape)} is larger than the teacher's "
                                       f"{tuple(teacher.shape)}")
        teacher = teacher[tuple(slice(0, s) for s in student.shape)]
    student, teacher = student.float(), teacher.float()
    if loss == "mse":
        return F.mse_loss(student, teacher)
    if loss == "cosine":
        return 1 - F.cosine_similarity(student, teacher, dim=dim, eps=1e-8).mean()
    if loss == "kl":
        s, t = student.movedim(dim, -1), teacher.movedim(dim, -1)
        s, t = s.reshape(-1, s.shape[-1]) / temperature, t.reshape(-1, t.shape[-1]) / temperature
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean",
                        log_target=True) * temperature ** 2
    raise InvalidArgumentError(f"feature loss must be one of {_FEATURE_LOSSES}, got {loss!r}")


def pooled_embedding(dim: int = 1, normalize: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``output_transform`` for embedding models: mean over the token dim ``dim`` of a ``(B, T, D)`` output
    (``last_hidden_state``), optionally L2-normalised. Use it with ``loss="cosine"`` (or ``"mse"``), not ``"kl"``.

    Example:
        >>> pool = pooled_embedding()
        >>> pool(torch.ones(2, 5, 4)).shape
        torch.Size([2, 4])
    """
    def pool(x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim) if x.dim() > 2 else x
        return F.normalize(x, dim=-1) if normalize else x

    return pool


class InplaceDistillation(Callback):
    """Distil every subnet from a teacher: the largest subnet (in place) or a frozen copy of the original model.

    Args:
        loss: output loss: ``"kl"``, ``"alpha_divergence"``, ``"mse"``, ``"bce"`` or ``"cosine"`` (embeddings).
        temperature: softens both distributions for ``"kl"`` (the loss is scaled by ``T²``).
        weight: weight of the output distillation term for each student.
        student_task_weight: weight of the students' own task loss. BigNAS uses 0 (students learn from the
            teacher only); the default 1 keeps the task loss, which measured better on our digits benchmark
            (benchmarks/RESULTS.md, issue 3 section).
        balance: rescale each student's distillation term to its task loss's magnitude (AmoebaLLM).
        alpha_min, alpha_max: the two α of the adaptive α-divergence (AlphaNet: -1 and 1).
        clip: density-ratio clip of the α-divergence.
        class_dim: the dim that holds classes in the outputs (``-1`` for logits ``(B, C)`` or ``(B, T, V)``).
        teacher: ``"largest"`` (the plan's largest subnet, detached: today's in-place distillation),
            ``"original"`` (a frozen deep copy of the model taken when training starts — at the first batch, after
            ``ParameterPrioritization``'s reorder — with ``requires_grad=False`` and in eval mode; it shares no
            parameter or buffer with the supernet), or an ``nn.Module`` to use as the frozen teacher (same module
            paths as the model when ``features`` are given). **Memory**: ``"original"`` holds one extra copy of the
            model's parameters and buffers (no gradients, no optimizer state) and costs one no-grad forward per
            training batch.
        anchor_weight: with a frozen teacher, the largest subnet is distilled toward it with this weight (output
            and feature terms), which keeps the largest close to the pretrained model. 0: no anchor.
        largest_task_weight: weight of the largest subnet's own task loss (its "own term").
        features: module paths whose outputs are distilled too (forward hooks): a list (weight 1, loss
            ``feature_loss_kind``) or ``{path: weight}`` or ``{path: {"weight": w, "loss": "cosine", "dim": -1}}``.
            The student's output of a module is compared with the teacher's output of the same module; a
            width-sliced output against the teacher's first channels (residual-stream outputs keep full width).
            Terms of modules inside a skipped block are left out for that subnet.
        feature_loss_kind: default loss of the feature terms (``"mse"``, ``"cosine"``, ``"kl"``).
        output_transform: applied to the (selected) output of student and teacher before the output loss, e.g.
            :func:`pooled_embedding` for models returning token embeddings.

    Raises:
        ValueError: an unknown ``loss``/``teacher``/feature loss, a non-positive ``temperature``/``clip``, or an
            ``anchor_weight`` with ``teacher="largest"``.

    Example:
        >>> InplaceDistillation(loss="alpha_divergence").loss
        'alpha_divergence'
        >>> kd = InplaceDistillation(teacher="original", loss="cosine", anchor_weight=1.0,
        ...                          features={"blocks.3": 0.5}, output_transform=pooled_embedding())
        >>> kd.features
        {'blocks.3': {'weight': 0.5, 'loss': 'mse', 'dim': -1}}
    """

    plan_order = 10

    def __init__(self, loss: str = "kl", temperature: float = 1.0, weight: float = 1.0,
                 student_task_weight: float = 1.0, balance: bool = False, alpha_min: float = -1.0,
                 alpha_max: float = 1.0, clip: float = 5.0, class_dim: int = -1, *,
                 teacher: str | nn.Module = "largest", anchor_weight: float = 0.0, largest_task_weight: float = 1.0,
                 features: Sequence[str] | Mapping[str, Any] | None = None, feature_loss_kind: str = "mse",
                 output_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if loss not in _LOSSES:
            raise InvalidArgumentError(f"`loss` must be one of {_LOSSES}, got {loss!r}")
        if not temperature > 0:
            raise InvalidArgumentError(f"`temperature` must be > 0, got {temperature!r}")
        if not clip > 1:
            raise InvalidArgumentError(f"`clip` must be > 1, got {clip!r}")
        if not isinstance(teacher, nn.Module) and teacher not in _TEACHERS:
            raise InvalidArgumentError(f"`teacher` must be one of {_TEACHERS} or an nn.Module, got {teacher!r}")
        if feature_loss_kind not in _FEATURE_LOSSES:
            raise InvalidArgumentError(f"`feature_loss_kind` must be one of {_FEATURE_LOSSES}, got {feature_loss_kind!r}")
        if anchor_weight and teacher == "largest":
            raise InvalidArgumentError("`anchor_weight` needs a frozen teacher (`teacher='original'` or a module): the "
                                       "largest subnet cannot be anchored to itself")
        for name, value in (("anchor_weight", anchor_weight), ("largest_task_weight", largest_task_weight),
                            ("weight", weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise InvalidArgumentError(f"`{name}` must be a number >= 0, got {value!r}")
        self.loss = loss
        self.temperature = temperature
        self.weight = weight
        self.student_task_weight = student_task_weight
        self.balance = balance
        self.alpha_min = alpha_min
        self.alpha_max = alpha_max
        self.clip = clip
        self.class_dim = class_dim
        self.teacher = teacher
        self.anchor_weight = anchor_weight
        self.largest_task_weight = largest_task_weight
        self.features = _feature_spec(features, feature_loss_kind)
        self.output_transform = output_transform
        self.teacher_model: nn.Module | None = teacher if isinstance(teacher, nn.Module) else None
        self._warned = False
        self._warned_kl: set[str] = set()
        self._kl_checks: dict[str, int] = {}
        self._student_feats: dict[str, torch.Tensor] = {}
        self._teacher_feats: dict[str, torch.Tensor] = {}
        self._teacher_out: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._supernet: SupernetModule | None = None
        self._saved_teacher: dict[str, Any] | None = None

    # -- the frozen teacher and the feature hooks --------------------------------------------------------------
    @property
    def frozen_teacher(self) -> bool:
        """Whether the teacher is a frozen model (``"original"`` or a module) rather than the largest subnet."""
        return self.teacher != "largest"

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: SupernetModule) -> None:
        self._attach(pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: SupernetModule) -> None:
        self.detach()

    def _attach(self, supernet: SupernetModule) -> None:
        from lightning_supernet.module import SupernetModule

        if not isinstance(supernet, SupernetModule):
            raise ArgumentError(f"InplaceDistillation needs a SupernetModule, got {type(supernet).__name__}")
        self.detach()
        self._supernet = supernet
        if not self.features:
            return
        for path in self.features:
            try:
                mod = supernet.model.get_submodule(path)
            except AttributeError as err:
                raise InvalidArgumentError(f"`features` names module `{path}`, which the model has not") from err
            self._handles.append(mod.register_forward_hook(self._student_hook(path)))
        self._handles.append(supernet.model.register_forward_pre_hook(lambda *_: self._student_feats.clear()))

    def detach(self) -> None:
        """Remove the forward hooks (the frozen teacher is kept: ``teacher_model``)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _student_hook(self, path: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            t = _first(out)
            self._student_feats[path] = t
            sn = self._supernet
            if not self.frozen_teacher and sn is not None and sn.active_config == sn.search_space.largest():
                self._teacher_feats[path] = t.detach()

        return hook

    def make_teacher(self, supernet: SupernetModule) -> nn.Module:
        """The frozen teacher: a standalone copy of the largest subnet (``supernet.extract``), no gradients, eval
        mode. Called at the first training batch for ``teacher="original"``; call it earlier to pin the teacher.
        The teacher's weights are saved in the callback's checkpoint state, so a resumed run distils from the same
        original (not from the supernet's trained weights).

        Example:
            >>> import torch, torch.nn.functional as F
            >>> from lightning_supernet import SupernetModule
            >>> from lightning_supernet.models import TinyViT
            >>> sn = SupernetModule(TinyViT(dim=16, depth=2, num_heads=2), F.cross_entropy,
            ...                     example_input=torch.randn(1, 1, 8, 8))
            >>> t = InplaceDistillation(teacher="original").make_teacher(sn)
            >>> any(p.requires_grad for p in t.parameters()), t.training
            (False, False)
        """
        teacher = supernet.extract(supernet.search_space.largest())
        if self._saved_teacher is not None:  # resumed from a checkpoint: the original, not the trained weights
            teacher.load_state_dict(self._saved_teacher)
        teacher.requires_grad_(False).eval()
        self.teacher_model = teacher
        return teacher

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: SupernetModule, batch: Any, batch_idx: int) -> None:
        self._teacher_feats = {}
        self._teacher_out = None
        if not self.frozen_teacher:
            return
        if self._supernet is not pl_module:
            self._attach(pl_module)
        if self.teacher_model is None:
            self.make_teacher(pl_module)
        self.teacher_forward(pl_module, batch)

    def teacher_forward(self, supernet: SupernetModule, batch: Any) -> torch.Tensor:
        """Run the frozen teacher on a training batch (no grad); keeps its output and named features."""
        teacher = self.teacher_model
        teacher.to(supernet.device)
        handles = []
        for path in self.features:
            def hook(_m: nn.Module, _a: Any, out: Any, path: str = path) -> None:
                self._teacher_feats[path] = _first(out).detach()

            try:
                handles.append(teacher.get_submodule(path).register_forward_hook(hook))
            except AttributeError as err:
                raise InvalidArgumentError(f"`features` names module `{path}`, which the teacher has not") from err
        try:
            with torch.no_grad():
                out = call_model(teacher, move_data_to_device(supernet.batch_to_input(batch), supernet.device))
        finally:
            for h in handles:
                h.remove()
        self._teacher_out = supernet.select_output(out).detach()
        return self._teacher_out

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.teacher == "original" and self.teacher_model is not None:
            return {"teacher": {k: v.detach().cpu() for k, v in self.teacher_model.state_dict().items()}}
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_teacher = state_dict.get("teacher")

    # -- the plan ---------------------------------------------------------------------------------------------
    def supernet_plan(self, supernet: SupernetModule, plan: list[PlanItem], batch_idx: int) -> list[PlanItem]:
        """Mark the teacher and add the distillation terms (see the class docstring)."""
        largest = supernet.search_space.largest()
        first = next((i for i, p in enumerate(plan) if p.config == largest), None)
        if self.frozen_teacher:
            out = []
            for i, p in enumerate(plan):
                if i == first:
                    p = p.with_(task_weight=self.largest_task_weight)
                    if self.anchor_weight:
                        p = p.with_(distill_weight=self.anchor_weight, distill_fn=self.frozen_loss, own_teacher=True)
                else:
                    p = p.with_(distill_weight=1.0, task_weight=self.student_task_weight, distill_fn=self.frozen_loss,
                                balance=self.balance, own_teacher=True)
                out.append(p)
            return out
        if first is None:
            if not self._warned:
                rank_zero_warn("InplaceDistillation: the plan has no largest subnet to teach the others (e.g. "
                               "`SandwichSampling(largest=False)`); training without distillation")
                self._warned = True
            return plan
        plain = not self.features and self.output_transform is None
        fn, w = (self.distill_loss, self.weight) if plain else (self.student_loss, 1.0)
        students = [p.with_(distill_weight=w, task_weight=self.student_task_weight,
                            distill_fn=fn, balance=self.balance) for p in plan[first + 1:]]
        return plan[:first] + [plan[first].with_(teacher=True, task_weight=self.largest_task_weight)] + students

    # -- losses -----------------------------------------------------------------------------------------------
    def frozen_loss(self, student: torch.Tensor, _teacher: Any = None) -> torch.Tensor:
        """Output + feature terms of the active subnet against the frozen teacher's outputs on this batch (for the
        largest subnet, scaled by ``anchor_weight`` through its plan entry)."""
        if self._teacher_out is None:
            raise RuntimeError("InplaceDistillation: no teacher output for this batch (the frozen teacher runs in "
                               "`on_train_batch_start`; call `teacher_forward(supernet, batch)` when stepping by hand)")
        return self.student_loss(student, self._teacher_out)

    def student_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``weight`` × output loss + Σ feature weights × feature losses of the active subnet."""
        total = self.weight * self.distill_loss(self._transform(student), self._transform(teacher)) \
            if self.weight else student.sum() * 0.0  # zero, but in the graph (every term may be left out)
        skipped = self._skipped_blocks()
        for path, spec in self.features.items():
            if any(path == b or path.startswith(b + ".") for b in skipped):
                continue
            s, t = self._student_feats.get(path), self._teacher_feats.get(path)
            if s is None or t is None:
                continue
            if spec["loss"] == "kl":
                self._check_logits(t, f"feature `{path}`")
            total = total + spec["weight"] * feature_loss(s, t, spec["loss"], spec["dim"], self.temperature)
        return total

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_transform(x) if self.output_transform is not None else x

    def _skipped_blocks(self) -> list[str]:
        sn = self._supernet
        if sn is None:
            return []
        cfg = sn.active_config
        return [n[: -len(".keep")] for n, d in sn.search_space.dims.items() if d.kind == "depth" and not cfg[n]]

    def _check_logits(self, teacher: torch.Tensor, what: str) -> None:
        """Warn once when ``kl`` is used on something that is not logits (KL barely responds there); looks at the
        first few calls per term only."""
        checks = self._kl_checks.get(what, 0)
        if what in self._warned_kl or checks >= 8:
            return
        self._kl_checks[what] = checks + 1
        rows = teacher.detach().float().reshape(-1, teacher.shape[-1])
        unit = bool(((rows.norm(dim=-1) - 1).abs() < 1e-3).all())
        flat = float(rows.std(dim=-1).mean()) < 0.05
        if unit or flat:
            self._warned_kl.add(what)
            why = "rows of unit norm (a normalised embedding)" if unit else "values too close together for a softmax"
            rank_zero_warn(f"InplaceDistillation: loss 'kl' on {what}, whose teacher values look like no logits "
                           f"({why}): KL barely responds there. HINT: use loss='cosine' (or 'mse') for embeddings")

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
        if self.loss == "cosine":
            return feature_loss(student, teacher, "cosine", self.class_dim)
        if self.class_dim not in (-1, student.dim() - 1):
            student, teacher = student.movedim(self.class_dim, -1), teacher.movedim(self.class_dim, -1)
        student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        if self.loss == "kl":
            self._check_logits(teacher, "the output")
            t = self.temperature
            return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean",
                            log_target=True) * t * t
        return torch.maximum(alpha_divergence(student, teacher, self.alpha_min, self.clip),
                             alpha_divergence(student, teacher, self.alpha_max, self.clip))


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    tensors = flatten_tensors(out)
    if not tensors:
        raise InvalidArgumentError(f"a distilled feature module returned {type(out).__name__} with no tensor")
    return tensors[0]


def _feature_spec(features: Sequence[str] | Mapping[str, Any] | None, default: str) -> dict[str, dict[str, Any]]:
    if features is None:
        return {}
    if isinstance(features, str):
        raise InvalidArgumentError(f"`features` must be a list of module paths or a mapping, got the string "
                                   f"{features!r}. HINT: [{features!r}]")
    items = features.items() if isinstance(features, Mapping) else [(f, 1.0) for f in features]
    out = {}
    for path, value in items:
        spec = {"weight": 1.0, "loss": default, "dim": -1}
        if isinstance(value, Mapping):
            unknown = set(value) - set(spec)
            if unknown:
                raise InvalidArgumentError(f"`features[{path!r}]` has unknown key {sorted(unknown)[0]!r}; allowed: "
                                           "weight, loss, dim")
            spec.update(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            spec["weight"] = float(value)
        else:
            raise InvalidArgumentError(f"`features[{path!r}]` must be a weight or a dict, got {value!r}")
        if spec["loss"] not in _FEATURE_LOSSES:
            raise InvalidArgumentError(f"`features[{path!r}]` loss must be one of {_FEATURE_LOSSES}, got "
                                       f"{spec['loss']!r}")
        if not isinstance(spec["weight"], (int, float)) or spec["weight"] < 0:
            raise InvalidArgumentError(f"`features[{path!r}]` weight must be >= 0, got {spec['weight']!r}")
        out[str(path)] = spec
    return out
