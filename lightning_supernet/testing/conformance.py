"""The conformance contract (issue 9) as a reusable check: one call per model, one :class:`Report` back.

For a model and an example input, in train mode, eval mode, under ``torch.no_grad()`` and under
``torch.inference_mode()``:

1. **build** — ``SupernetModule(model)`` either succeeds or raises ``UnsupportedModelError`` naming a module (any
   other exception is a late crash); a failed construction leaves the model exactly as it was (module classes,
   per-module train/eval flags, plain attributes, ``requires_grad``, device, ``state_dict`` bytes);
2. **largest** — the largest subnet computes what a copy of the original model computes;
3. **subnet==extract** — for the smallest subnet and ``n_random`` random ones, the supernet under the config
   computes what ``supernet.extract(cfg)`` computes; **cost** — ``supernet.cost(cfg)`` equals the extracted
   model's parameter count and MACs;
4. **coverage** — the smallest subnet has at most half the parameters (else the outcome is ``COVERAGE``);
   **depth-order** — each stack's keep-dims are in model order and the smallest subnet keeps a prefix;
5. **prioritize** — a magnitude reorder (:func:`lightning_supernet.prioritize.reorder`), then a random reorder of
   every group, leaves the full model's function unchanged (eval mode, ``no_grad``) (checked in float64, so a deep BatchNorm net's float32 noise does not hide or fake a
   difference) and the reordered supernet still equals its extraction;
6. **modes** — every module's own ``training`` flag is unchanged after construction and after each public call
   (``subnet``, ``cost``, ``extract``, ``reorder``).

Train-mode comparisons switch dropout off (``p = 0`` on dropout modules and float ``*dropout*``/``drop_prob``
attributes) and run both sides from the same RNG seed; BatchNorm then uses batch statistics on both sides, and
its running statistics are put back after each train-mode pass. Outputs are compared with
:func:`lightning_supernet.verify.max_rel_diff` (relative to the output's scale).

Example:
    >>> import torch
    >>> from lightning_supernet.models import TinyViT
    >>> report = check_conformance(lambda: TinyViT(dim=32, depth=2, num_heads=2), torch.randn(2, 1, 8, 8),
    ...                            n_random=1)
    >>> report.outcome
    'PASS'
"""

from __future__ import annotations

import copy
import hashlib
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_supernet.cost import count_macs, count_params
from lightning_supernet.errors import UnsupportedModelError
from lightning_supernet.ir.graph import call_model, flatten_tensors
from lightning_supernet.prioritize import magnitude_importance, reorder
from lightning_supernet.state import ModelSnapshot, preserved_modes
from lightning_supernet.testing.report import Report
from lightning_supernet.verify import TOLERANCE, max_rel_diff

__all__ = ["MODES", "check_conformance", "disable_dropout", "model_fingerprint", "run_in_mode"]

#: the four ways a model is run: train mode, eval mode, eval under ``no_grad``, eval under ``inference_mode``
MODES = ("train", "eval", "no_grad", "inference_mode")
#: tolerance of the float64 prioritization check (relative to the output's scale)
TOLERANCE_F64 = 1e-6


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability in ``model`` to 0 (dropout modules, timm ``DropPath.drop_prob``, and float
    attributes named ``*dropout*``/``*drop_prob*``/``layerdrop`` that functional code reads); returns ``model``.

    Example:
        >>> m = disable_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
        >>> m[1].p
        0.0
    """
    for mod in model.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            mod.p = 0.0
        for key, value in list(vars(mod).items()):
            low = key.lower()
            if (isinstance(value, float) and not isinstance(value, bool) and 0.0 < value < 1.0
                    and ("dropout" in low or "drop_prob" in low or low in ("layerdrop", "drop_rate", "drop_path"))):
                setattr(mod, key, 0.0)
    return model


def _tensor_hash(t: torch.Tensor) -> str:
    flat = t.detach().cpu().reshape(-1).contiguous()
    return hashlib.blake2b(flat.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest() + str(t.dtype)


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None))) or (
        isinstance(value, tuple) and all(isinstance(v, (int, float, str, bool)) for v in value))


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What "the model exactly as it was" means: per-module class, ``training`` flag and plain attributes (ints,
    floats, strings, tuples of them), each parameter's ``requires_grad`` and device, and a hash of every
    ``state_dict`` tensor's bytes.

    Example:
        >>> m = nn.Linear(2, 2); fp = model_fingerprint(m)
        >>> with torch.no_grad():
        ...     _ = m.weight.add_(1)
        >>> model_fingerprint(m) == fp
        False
    """
    modules = {n: (type(m), m.training, tuple(sorted((k, repr(v)) for k, v in vars(m).items()
                                                      if not k.startswith("_") and _plain(v))))
               for n, m in model.named_modules()}
    params = {n: (p.requires_grad, str(p.device)) for n, p in model.named_parameters()}
    state = {k: _tensor_hash(v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return {"modules": modules, "params": params, "state": state}


def _fingerprint_diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> str | None:
    for part in ("modules", "params", "state"):
        a, b = before[part], after[part]
        if a.keys() != b.keys():
            extra = sorted(set(a) ^ set(b))[:3]
            return f"{part} differ: {extra}"
        for key in a:
            if a[key] != b[key]:
                return f"{part} `{key}` changed: {a[key]!r:.120} -> {b[key]!r:.120}"
    return None


def _modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def run_in_mode(model: nn.Module, example: Any, mode: str, seed: int = 0) -> Any:
    """Call ``model`` on ``example`` in one of :data:`MODES`; every module's own flag, the global RNG and (in
    train mode) every buffer are put back afterwards.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> _ = run_in_mode(bn, torch.randn(4, 3), "train")
        >>> bn.training, bool(bn.running_mean.abs().sum() == 0)
        (True, True)
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    grad = {"train": torch.enable_grad, "eval": torch.enable_grad, "no_grad": torch.no_grad,
            "inference_mode": torch.inference_mode}[mode]
    with preserved_modes(model):
        model.train(mode == "train")
        snapshot = ModelSnapshot(model, buffers=True) if mode == "train" else None
        try:
            with torch.random.fork_rng(devices=[]), grad():
                torch.manual_seed(seed)
                return call_model(model, example)
        finally:
            if snapshot is not None:
                snapshot.restore()


def _to_double(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_double(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to_double(v) for v in obj)
    return obj


def _err(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _output_energy(output: Any, target: Any) -> torch.Tensor:
    """The loss a plain ``nn.Module`` needs to be wrapped (the contract never trains): the mean square of every
    tensor the model returns; the target is not read."""
    return sum((t.float().pow(2).mean() for t in flatten_tensors(output) if t.is_floating_point()),
               torch.zeros(()))


class _Checker:
    """One run of the contract; collects failures instead of stopping at the first."""

    def __init__(self, report: Report, modes: tuple[str, ...], tolerance: float,
                 output: Callable[[Any], Any] | None) -> None:
        self.report, self.modes, self.tol = report, modes, tolerance
        self.pick = output or (lambda o: o)

    def fail(self, step: str, detail: str) -> None:
        self.report.failures.append((step, detail))

    def compare(self, step: str, label: str, mode: str, ref: Callable[[], Any], got: Callable[[], Any],
                tol: float | None = None) -> bool:
        """Run both sides; a crash or a difference above the tolerance is a failure of ``step``."""
        try:
            a = self.pick(ref())
        except Exception as err:  # noqa: BLE001 - every crash is a finding
            self.fail(step, f"{label} {mode}: the reference crashes: {_err(err)}")
            return False
        try:
            b = self.pick(got())
        except Exception as err:  # noqa: BLE001
            self.fail(step, f"{label} {mode}: crashes: {_err(err)}")
            return False
        diff = max_rel_diff(a, b)
        if not diff <= (self.tol if tol is None else tol):
            self.fail(step, f"{label} {mode}: outputs differ (relative difference {diff:.3g})")
            return False
        return True

    def modes_kept(self, model: nn.Module, expected: Mapping[str, bool], after: str) -> None:
        now = _modes(model)
        changed = [n or "<root>" for n, flag in expected.items() if n in now and now[n] != flag]
        if changed:
            self.fail("modes", f"after {after}: the train/eval flag of {len(changed)} modules changed "
                               f"(e.g. `{changed[0]}`)")


def _mix_modes(model: nn.Module) -> None:
    """A deliberate per-module mix of flags (a user's frozen-in-eval modules inside a training model)."""
    model.train()
    for i, (_, mod) in enumerate(model.named_modules()):
        if i % 3 == 2:
            mod.training = False


def check_conformance(model_fn: Callable[[], nn.Module] | nn.Module, example: Any, *, name: str | None = None,
                      modes: tuple[str, ...] = MODES, n_random: int = 3, loss: Callable[..., Any] | None = None,
                      space: Mapping[str, Any] | None = None, output: Callable[[Any], Any] | None = None,
                      seed: int = 0, tolerance: float = TOLERANCE, prioritize: bool = True) -> Report:
    """Run the conformance contract (see the module docstring) on one model.

    Args:
        model_fn: builds a fresh model (or the model itself). example: its input (tensor, tuple of args, dict of
            kwargs). name: the report's name (default: the model's class).
        modes: a subset of :data:`MODES`. n_random: random configs checked beside the smallest.
        loss: ``loss_fn`` for a plain ``nn.Module`` (never called). space: passed to ``SupernetModule``.
        output: picks what to compare from the model's output (default: every tensor in it).
        seed: random configs are ``search_space.sample(seed + i)``; train-mode passes run from this RNG seed.
        tolerance: largest relative difference counted as equal (float32). prioritize: run the reorder check.

    Returns:
        a :class:`Report` (``PASS``, ``REFUSED``, ``FAIL`` or ``COVERAGE``).

    Example:
        >>> import torch.nn as nn, torch
        >>> mlp = lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> check_conformance(mlp, torch.randn(3, 4), n_random=1).outcome
        'PASS'
    """
    from lightning_supernet.module import SupernetModule

    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes or not modes:
        raise ValueError(f"`modes` must be a non-empty subset of {MODES}, got {modes!r}")
    if not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"`n_random` must be an int >= 0, got {n_random!r}")
    t0 = time.perf_counter()
    model = model_fn if isinstance(model_fn, nn.Module) else model_fn()
    report = Report(name or type(model).__name__, "PASS")
    check = _Checker(report, tuple(modes), tolerance, output)
    disable_dropout(model)
    _mix_modes(model)
    reference = copy.deepcopy(model)
    before = model_fingerprint(model)
    flags = _modes(model)

    def done() -> Report:
        report.seconds = time.perf_counter() - t0
        if report.failures:
            report.outcome = "FAIL"
            report.step, report.detail = report.failures[0]
        elif report.outcome == "PASS" and report.smallest_fraction is not None and report.smallest_fraction > 0.5:
            report.outcome = "COVERAGE"
        return report

    # 1. build: succeed, or refuse cleanly and leave the model as it was
    try:
        sn = SupernetModule(model, loss or _output_energy, example_input=example, space=space)
    except Exception as err:  # noqa: BLE001
        changed = _fingerprint_diff(before, model_fingerprint(model))
        if changed is not None:
            check.fail("rollback", f"construction failed ({_err(err)}) and left the model changed: {changed}")
        if isinstance(err, UnsupportedModelError):
            report.outcome, report.detail = "REFUSED", str(err).strip().splitlines()[0][:300]
            if "`" not in str(err):
                check.fail("refusal", f"the refusal names no module: {report.detail}")
        else:
            check.fail("build", f"late crash: {_err(err)} at "
                                f"{traceback.extract_tb(err.__traceback__)[-1].filename.rsplit('/', 1)[-1]}:"
                                f"{traceback.extract_tb(err.__traceback__)[-1].lineno}")
        return done()
    check.modes_kept(sn.model, flags, "construction")
    space_ = sn.search_space
    report.dims = {}
    for d in space_.dims.values():
        report.dims[d.kind] = report.dims.get(d.kind, 0) + 1

    # 2. the largest subnet is the original model
    largest = space_.largest()
    for mode in modes:
        def got(mode: str = mode) -> Any:
            with sn.subnet(largest):
                return run_in_mode(sn.model, example, mode, seed)
        check.compare("largest", "largest", mode, lambda mode=mode: run_in_mode(reference, example, mode, seed), got)
    check.modes_kept(sn.model, flags, "subnet()")
    del reference

    # 3. smallest + random subnets: supernet under cfg == extract(cfg); cost == the extracted model's
    configs = [("smallest", space_.smallest())]
    for i in range(n_random):
        cfg = space_.sample(seed + i)
        if all(cfg != c for _, c in configs):
            configs.append((f"random{i}", cfg))
    for label, cfg in configs:
        _check_config(check, sn, label, cfg, example, modes, seed, flags)

    # 4. coverage and depth order
    try:
        full, small = sn.cost(largest)["params"], sn.cost(space_.smallest())["params"]
        report.smallest_fraction = small / full
    except Exception as err:  # noqa: BLE001
        check.fail("cost", f"cost() crashes: {_err(err)}")
    _check_depth_order(check, sn)

    # 5. prioritization keeps the full model's function (float64)
    if prioritize:
        _check_prioritization(check, sn, example, seed, flags)
    return done()


def _check_config(check: _Checker, sn: Any, label: str, cfg: Any, example: Any, modes: tuple[str, ...],
                  seed: int, flags: Mapping[str, bool]) -> None:
    try:
        small = sn.extract(cfg)
    except Exception as err:  # noqa: BLE001
        check.fail("extract", f"{label}: extract() crashes: {_err(err)}")
        return
    check.modes_kept(sn.model, flags, "extract()")
    for mode in modes:
        def got(mode: str = mode) -> Any:
            with sn.subnet(cfg):
                return run_in_mode(sn.model, example, mode, seed)
        check.compare("subnet==extract", label, mode, lambda mode=mode: run_in_mode(small, example, mode, seed), got)
    try:
        cost = sn.cost(cfg)
    except Exception as err:  # noqa: BLE001
        check.fail("cost", f"{label}: cost() crashes: {_err(err)}")
        return
    check.modes_kept(sn.model, flags, "cost()")
    try:
        params, macs = count_params(small), count_macs(small, example)
    except Exception as err:  # noqa: BLE001
        check.fail("cost", f"{label}: counting the extracted model crashes: {_err(err)}")
        return
    if cost["params"] != params:
        check.fail("cost", f"{label}: cost() says {cost['params']} params, the extracted model has {params}")
    if cost["macs"] != macs:
        check.fail("cost", f"{label}: cost() says {cost['macs']} MACs, the extracted model does {macs}")


def _check_depth_order(check: _Checker, sn: Any) -> None:
    space = sn.search_space
    order = {n: i for i, (n, _) in enumerate(sn.model.named_modules())}
    smallest = space.smallest()
    for stack in space.stacks:
        names = space.stack_blocks(stack)
        index = [order.get(n.removesuffix(".keep"), -1) for n in names]
        if -1 not in index and index != sorted(index):
            check.fail("depth-order", f"stack `{stack}`: keep-dims not in model order: {names[:4]}...")
        kept = [bool(smallest[n]) for n in names]
        if kept != sorted(kept, reverse=True):
            check.fail("depth-order", f"stack `{stack}`: the smallest subnet does not keep a prefix of the blocks: "
                                      f"{[n for n, k in zip(names, kept) if k][:4]}")


def _check_prioritization(check: _Checker, sn: Any, example: Any, seed: int, flags: Mapping[str, bool]) -> None:
    largest, smallest = sn.search_space.largest(), sn.search_space.smallest()
    ex, tol = _to_double(example), TOLERANCE_F64
    try:
        sn.to(torch.float64)
        with sn.subnet(largest):
            before = check.pick(run_in_mode(sn.model, ex, "no_grad", seed))
    except Exception:  # noqa: BLE001 - a model that cannot run in float64: check in float32
        sn.to(torch.float32)
        ex, tol = example, check.tol
        with sn.subnet(largest):
            before = check.pick(run_in_mode(sn.model, ex, "no_grad", seed))
    try:
        importance = magnitude_importance(sn)
        perms = reorder(sn, importance)
        # and a random order of every group, so a group magnitude leaves in place is permuted too
        gen = torch.Generator().manual_seed(seed)
        perms.update(reorder(sn, {n: torch.rand(len(s), generator=gen) for n, s in importance.items()}))
    except Exception as err:  # noqa: BLE001
        check.fail("prioritize", f"reorder crashes: {_err(err)}")
        return
    check.modes_kept(sn.model, flags, "reorder()")
    if not perms:
        return

    def after() -> Any:
        with sn.subnet(largest):
            return run_in_mode(sn.model, ex, "no_grad", seed)
    check.compare("prioritize", f"full model after reordering {len(perms)} groups", "no_grad", lambda: before, after,
                  tol=tol)
    try:
        small = sn.extract(smallest)
    except Exception as err:  # noqa: BLE001
        check.fail("prioritize", f"extract() after reorder crashes: {_err(err)}")
        return

    def sub() -> Any:
        with sn.subnet(smallest):
            return run_in_mode(sn.model, ex, "no_grad", seed)
    check.compare("prioritize", "smallest after reorder", "no_grad", lambda: run_in_mode(small, ex, "no_grad", seed), sub,
                  tol=max(tol, 1e-5))
