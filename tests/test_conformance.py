"""The conformance harness (issue 9's contract) catches each kind of broken supernet, and the zoos pass it.

Harness tests break one clause at a time (a wrong extraction, a wrong cost, a reorder that changes the function,
a flattened train/eval mode, a construction that crashes late or does not roll back) and check the harness FAILs
at that step. The zoo tests run a fast slice of each zoo in the default run; the full zoos are ``slow``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_supernet.cost as cost_module
import lightning_supernet.module as module_module
import lightning_supernet.prioritize as prioritize_module
from lightning_supernet.extract import register_finalizer
from lightning_supernet.models import ResNetLike, TinyViT
from lightning_supernet.testing import Report, check_conformance, model_fingerprint, run_in_mode, summarize


def _vit() -> nn.Module:
    return TinyViT(img_size=8, patch_size=2, in_chans=1, dim=32, depth=3, num_heads=4, num_classes=10)


X = torch.randn(2, 1, 8, 8)


def test_a_correct_supernet_passes_with_every_clause_exercised():
    report = check_conformance(_vit, X, name="tiny_vit")
    assert report.outcome == "PASS", report.failures
    assert report.dims == {"depth": 3, "heads": 3, "width": 3}
    assert 0 < report.smallest_fraction <= 0.5
    assert report.ok and "PASS" in str(report)


def test_a_bn_resnet_passes_in_train_mode_with_batch_statistics():
    report = check_conformance(lambda: ResNetLike(in_chans=1, widths=(16, 32), depths=(2, 2)), X, n_random=2)
    assert report.outcome == "PASS", report.failures


def test_an_extraction_that_differs_from_the_supernet_fails():
    def perturb(small, cfg, supernet):
        with torch.no_grad():
            for p in small.parameters():
                p.mul_(1.05)

    register_finalizer(perturb)
    try:
        report = check_conformance(_vit, X, n_random=1, prioritize=False)
    finally:
        from lightning_supernet import extract

        extract._FINALIZERS.remove(perturb)
    assert report.outcome == "FAIL"
    assert report.step == "subnet==extract"
    assert {s for s, _ in report.failures} == {"subnet==extract"}
    # every mode caught it, for the smallest and the random config
    assert len(report.failures) == 2 * 4


def test_an_extraction_that_keeps_a_skipped_block_fails_on_cost(monkeypatch):
    import lightning_supernet.extract as extract

    monkeypatch.setattr(extract, "_drop_children", lambda root, path, names: None)  # blocks are never removed
    report = check_conformance(_vit, X, n_random=0, prioritize=False)
    assert report.outcome == "FAIL"
    assert "cost" in {s for s, _ in report.failures}
    assert any("params" in d for s, d in report.failures if s == "cost")


def test_a_cost_that_miscounts_fails(monkeypatch):
    real = cost_module.active_params
    monkeypatch.setattr(cost_module, "active_params", lambda m: real(m) + 1)
    report = check_conformance(_vit, X, n_random=0, prioritize=False)
    assert report.step == "cost" and "params" in report.detail


def test_a_reorder_that_changes_the_full_model_fails(monkeypatch):
    real = prioritize_module.group_tensors

    def producers_only(supernet, name, perm=None):  # forgets to permute the consumers' input columns
        return [t for t in real(supernet, name, perm) if t[2] == 0]

    monkeypatch.setattr(prioritize_module, "group_tensors", producers_only)
    report = check_conformance(_vit, X, n_random=0)
    assert report.outcome == "FAIL" and report.step == "prioritize"
    assert "outputs differ" in report.detail


def test_a_call_that_flattens_per_module_modes_fails(monkeypatch):
    real = cost_module.count_macs

    def flattening(model, example):
        model.eval()  # every submodule's own flag is lost
        return real(model, example)

    monkeypatch.setattr(cost_module, "count_macs", flattening)
    report = check_conformance(_vit, X, n_random=0, prioritize=False)
    assert report.outcome == "FAIL"
    assert any(s == "modes" and "cost()" in d for s, d in report.failures)


def test_a_late_crash_at_construction_fails_and_a_refusal_does_not(monkeypatch):
    def crash(supernet):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(module_module, "verify_supernet", crash)
    report = check_conformance(_vit, X)
    assert report.outcome == "FAIL" and report.step == "build" and "RuntimeError" in report.detail

    refused = check_conformance(lambda: nn.Sequential(nn.Conv2d(1, 4, 3)), X)
    assert refused.outcome == "REFUSED" and "`Sequential`" in refused.detail and refused.ok


def test_a_failed_construction_that_does_not_roll_back_fails(monkeypatch):
    from lightning_supernet.errors import UnsupportedModelError

    def refuse(supernet):
        raise UnsupportedModelError("`blocks.0` cannot be sliced")

    monkeypatch.setattr(module_module, "verify_supernet", refuse)
    assert check_conformance(_vit, X).outcome == "REFUSED"  # the library rolls back: a clean refusal
    monkeypatch.setattr(module_module.ModelSnapshot, "restore", lambda self: None)
    report = check_conformance(_vit, X)
    assert report.outcome == "FAIL" and report.step == "rollback"
    assert "modules" in report.detail


def test_a_wrong_largest_subnet_fails(monkeypatch):
    real = module_module.SupernetModule.activate

    def shifted(self, cfg):  # the "largest" config leaves one width at its smallest choice
        cfg = dict(self.search_space.validate(cfg))
        name = next(n for n, d in self.search_space.dims.items() if d.kind == "width")
        cfg[name] = self.search_space.dims[name].smallest
        return real(self, cfg)

    report_ok = check_conformance(_vit, X, n_random=0, prioritize=False)
    assert report_ok.outcome == "PASS"
    monkeypatch.setattr(module_module.SupernetModule, "activate", shifted)
    report = check_conformance(_vit, X, n_random=0, prioritize=False)
    assert report.outcome == "FAIL" and report.step == "largest"


def test_coverage_is_reported_when_the_smallest_keeps_most_params():
    # only a small hidden width is elastic; the big input projection and output layer stay fixed
    def model():
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 64))

    report = check_conformance(model, torch.randn(3, 64), space={"exclude": ["0.*"]}, n_random=1)
    assert report.outcome == "COVERAGE", report
    assert report.smallest_fraction > 0.5


def test_fingerprint_and_run_in_mode_keep_the_model():
    bn = nn.Sequential(nn.BatchNorm1d(3), nn.Dropout(0.5))
    bn[1].eval()
    fp = model_fingerprint(bn)
    run_in_mode(bn, torch.randn(4, 3) + 5, "train")
    assert model_fingerprint(bn) == fp
    with pytest.raises(ValueError, match="mode"):
        run_in_mode(bn, torch.randn(4, 3), "training")
    with pytest.raises(ValueError, match="modes"):
        check_conformance(_vit, X, modes=("eval", "predict"))
    assert summarize([Report("a", "PASS"), Report("b", "FAIL")])["FAIL"] == 1


# -- the zoos ---------------------------------------------------------------------------------------------------
def _zoo_params(fast: bool) -> list:
    from lightning_supernet.testing.zoo import ZOOS, get_zoo

    params = []
    for zoo in ZOOS:
        try:
            models = get_zoo(zoo)
        except ImportError as err:  # an optional library (timm, transformers) missing
            params.append(pytest.param(zoo, None, id=f"{zoo}-unavailable",
                                       marks=pytest.mark.skip(reason=f"{zoo} zoo unavailable: {err}")))
            continue
        for m in models:
            if m.fast or not fast:
                marks = [pytest.mark.skip(reason=m.skip)] if m.skip else []
                params.append(pytest.param(zoo, m, id=f"{zoo}-{m.name}", marks=marks))
    return params


def _check(model) -> Report:
    report = check_conformance(model.build, model.example(), name=model.name, space=model.space,
                               output=model.output)
    print(report)
    return report


@pytest.mark.parametrize(("zoo", "model"), _zoo_params(fast=True))
def test_fast_zoo_slice_meets_the_contract(zoo, model):
    # the fast slice are models the library slices today: a refusal here is a regression too
    report = _check(model)
    assert report.outcome in ("PASS", "COVERAGE"), report.failures or report.detail
    assert report.dims, "no elastic dim"


@pytest.mark.slow
@pytest.mark.parametrize(("zoo", "model"), _zoo_params(fast=False))
def test_full_zoo_has_no_wrong_answer_and_no_late_crash(zoo, model):
    report = _check(model)
    assert report.ok, report.failures
