"""The Optuna subnet search: end to end on digits, motif reuse, constraints, samplers, resume, workers, errors."""

from __future__ import annotations

import multiprocessing
import sqlite3
import sys
import warnings

import optuna
import pytest
import torch
from search_helpers import PostgresCluster, digits, kill_when, one_thread, tiny_supernet

from lightning_supernet.errors import (
    InfeasibleConstraintsError,
    MissingDependencyError,
    SearchError,
    StorageError,
)
from lightning_supernet.integrations._objectives import Constraint, parse_constraints, resolve_objectives
from lightning_supernet.integrations.optuna import SubnetSearch, search_subnets

COMPLETE = optuna.trial.TrialState.COMPLETE


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def supernet():
    return tiny_supernet()


@pytest.fixture(scope="module")
def dm():
    return digits()


def _search(supernet, dm, **kwargs) -> SubnetSearch:
    kwargs.setdefault("storage", None)
    kwargs.setdefault("limit_val_batches", 1)
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("mlflow", False)
    return SubnetSearch(supernet, dm, **kwargs)


def _dominates(a, b, directions) -> bool:
    better = [(x >= y) if d == "maximize" else (x <= y) for x, y, d in zip(a, b, directions, strict=True)]
    return all(better) and a != b


# -- end to end ---------------------------------------------------------------------------------------------------
def test_search_end_to_end_on_sqlite(supernet, dm, tmp_path):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    study, front = search_subnets(supernet, dm, objectives=("val_acc", "params"), constraints={"params": 0.8},
                                  n_trials=8, storage=storage, limit_val_batches=1, seed=0, show_progress_bar=False,
                                  mlflow=False)
    trials = study.get_trials(states=(COMPLETE,))
    assert len(trials) == 8
    largest = supernet.search_space.largest()
    assert study.trials[0].params == largest.to_dict()  # the extremes are enqueued first
    assert study.trials[0].user_attrs["reused_from"] == "reference"  # ... and reuse the reference validation
    for t in trials:
        assert set(t.params) == set(supernet.search_space.dims)
        assert {"motif", "metrics"} <= set(t.user_attrs)
        assert t.values[1] == supernet.cost(t.user_attrs.get("config", t.params))["params"]
        assert set(t.constraints) == {"params"}
    assert front, "the Pareto front is empty"
    values = [(r["val_acc"], r["params"]) for r in front]
    assert all(r["feasible"] for r in front)
    assert not any(_dominates(a, b, ["maximize", "minimize"]) for a in values for b in values)
    assert values == sorted(values, key=lambda v: -v[0])
    assert "val_acc" in str(front) and str(front[0]["trial"]) in str(front)
    reloaded = optuna.load_study(study_name=study.study_name, storage=storage)
    assert len(reloaded.trials) == 8


def test_motif_reuse_copies_metrics_instead_of_validating(supernet, dm):
    search = _search(supernet, dm)
    search.setup()
    space = supernet.search_space
    a = space.config({"net.blocks.0.keep": False, "net.blocks.0.mlp.fc1.width": min(
        space.dims["net.blocks.0.mlp.fc1.width"].choices)})
    b = space.config({"net.blocks.0.keep": False, "net.blocks.0.attn.heads": 1})
    assert search.motif(a) == search.motif(b) and a != b
    search.study.enqueue_trial(a.to_dict())
    search.study.enqueue_trial(b.to_dict())
    before = search.evaluations
    study, _ = search.run(n_trials=4, show_progress_bar=False)  # extremes, then a, then b
    t_a, t_b = study.trials[2], study.trials[3]
    assert t_a.params == a.to_dict() and t_b.params == b.to_dict()
    assert t_b.user_attrs["reused_from"] == t_a.number
    assert t_b.values == t_a.values and t_b.user_attrs["metrics"] == t_a.user_attrs["metrics"]
    assert search.evaluations - before == 2  # smallest and a; largest reused the reference, b reused a


def test_min_depth_is_repaired_and_recorded(supernet, dm):
    search = _search(supernet, dm)
    search.enqueue_extremes = False
    values = dict(supernet.search_space.largest())
    values.update({"net.blocks.0.keep": False, "net.blocks.1.keep": False})  # the stack must keep one block
    cfg = search.repair(values)
    assert cfg["net.blocks.0.keep"] is True and cfg["net.blocks.1.keep"] is False
    study, _ = search.run(n_trials=0)
    study.enqueue_trial(values)
    search.run(n_trials=1)
    assert study.trials[-1].user_attrs["config"] == cfg.to_dict()


@pytest.mark.parametrize("sampler", ["nsga2", "gp", "random"])
def test_samplers_accept_constraints(supernet, dm, sampler):
    search = _search(supernet, dm, sampler=sampler, constraints={"params": 0.7, "val_loss": 100.0},
                     objectives=("val_acc", "macs"))
    search.enqueue_extremes = False
    study, front = search.run(n_trials=12 if sampler == "gp" else 5)
    assert len(study.get_trials(states=(COMPLETE,))) == (12 if sampler == "gp" else 5)
    assert all(set(t.constraints) == {"params", "val_loss"} for t in study.trials)
    limit = 0.7 * search.reference["params"]
    for t in study.trials:
        assert (t.constraints["params"] <= 0) == (t.user_attrs["metrics"]["params"] <= limit)
    assert all(r["metrics"]["params"] <= limit for r in front)


def test_latency_objective_is_measured(supernet, dm):
    search = _search(supernet, dm, objectives=("val_acc", "latency_ms"))
    search.latency_repeats = 2
    study, front = search.run(n_trials=3)
    assert all(t.values[1] > 0 for t in study.trials)
    assert front and "latency_ms" in front[0]


def test_bn_subnets_are_recalibrated_and_the_supernet_is_restored(dm, monkeypatch):
    import torch.nn.functional as F

    from lightning_supernet import SupernetModule
    from lightning_supernet.callbacks import bn_recalibration
    from lightning_supernet.models import ResNetLike

    sn = SupernetModule(ResNetLike(in_chans=1, widths=(16,), depths=(2,)), F.cross_entropy,
                        example_input=torch.randn(1, 1, 8, 8), eval_subnets=None)
    calls = []
    real = bn_recalibration.recalibrate_bn
    monkeypatch.setattr(bn_recalibration, "recalibrate_bn", lambda s, b, n: calls.append(n) or real(s, b, n))
    before = {k: v.clone() for k, v in sn.state_dict().items() if "running" in k}
    search = _search(sn, dm, bn_recalibration_batches=2)
    search.run(n_trials=3)
    assert calls and set(calls) == {2} and len(calls) == search.evaluations
    after = sn.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


# -- storage: resume after SIGKILL, forked workers, PostgreSQL ------------------------------------------------------
class _SlowSearch(SubnetSearch):
    def evaluate(self, cfg):
        import time

        time.sleep(0.3)
        return super().evaluate(cfg)


def _run_forever(supernet, dm, storage):
    torch.set_num_threads(1)
    _SlowSearch(supernet, dm, storage=storage, study_name="resume", limit_val_batches=1, seed=0,
                mlflow=False).run(n_trials=500)


def test_resume_after_sigkill_loses_no_completed_trial(supernet, dm, tmp_path):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    proc = multiprocessing.get_context("fork").Process(target=_run_forever, args=(supernet, dm, storage))
    proc.start()

    def completed():  # read-only poll with sqlite3: no schema creation racing the worker
        try:
            with sqlite3.connect(tmp_path / "search.db", timeout=30) as con:
                return con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0] >= 4
        except sqlite3.OperationalError:  # the tables do not exist yet
            return False

    kill_when(proc, completed)
    assert proc.exitcode == -9
    before = {t.number: t.values for t in optuna.load_study(study_name="resume", storage=storage).trials
              if t.state == COMPLETE}
    study, _ = _search(supernet, dm, storage=storage, study_name="resume").run(n_trials=3)
    after = {t.number: t.values for t in study.trials if t.state == COMPLETE}
    assert all(after[n] == v for n, v in before.items())
    assert len(after) == len(before) + 3


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_forked_workers_share_a_study(supernet, dm, tmp_path, kind):
    storage = f"sqlite:///{tmp_path / 'search.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'search.log'}"
    study, _ = _search(supernet, dm, storage=storage).run(n_trials=8, n_jobs=2)
    numbers = [t.number for t in study.trials if t.state == COMPLETE]
    assert len(numbers) == 8 == len(set(numbers))


def _pg_worker(supernet, dm, url, n):
    torch.set_num_threads(1)
    _search(supernet, dm, storage=url, study_name="pg", seed=None).run(n_trials=n)


@pytest.mark.parametrize("workers, each", [(2, 4), pytest.param(4, 25, marks=pytest.mark.slow)])
def test_postgres_workers_share_a_study(supernet, dm, workers, each):
    why = PostgresCluster.available()
    if why:
        pytest.skip(why)
    import tempfile
    from pathlib import Path

    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="pg-")))
    url = cluster.start()
    try:
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_pg_worker, args=(supernet, dm, url, each)) for _ in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
        assert [p.exitcode for p in procs] == [0] * workers
        study = optuna.load_study(study_name="pg", storage=url)
        numbers = [t.number for t in study.trials]
        complete = [t for t in study.trials if t.state == COMPLETE]
        assert len(complete) == workers * each
        assert len(numbers) == len(set(numbers)) == workers * each
        assert sorted(numbers) == list(range(workers * each))
        planned = [t.system_attrs.get("fixed_params") for t in study.trials]  # the workers started together
        space = supernet.search_space
        assert planned.count(space.largest().to_dict()) == 1 and planned.count(space.smallest().to_dict()) == 1
    finally:
        cluster.stop()


# -- bad input ----------------------------------------------------------------------------------------------------
def test_unknown_objective_names_the_metric_and_what_exists(supernet, dm):
    with pytest.raises(SearchError, match=r"`objectives` has 'val_accuracy'.*did you mean 'val_acc'.*allowed:.*macs"):
        _search(supernet, dm, objectives=("val_accuracy", "params")).run(n_trials=1)


def test_constraint_on_missing_metric(supernet, dm):
    with pytest.raises(SearchError, match=r"`constraints` bounds 'val_f1'.*allowed: .*val_acc"):
        _search(supernet, dm, constraints={"val_f1": 0.5}).run(n_trials=1)


def test_infeasible_constraints_fail_before_any_trial(supernet, dm):
    search = _search(supernet, dm, constraints={"params": 0.01})
    with pytest.raises(InfeasibleConstraintsError, match=r"`constraints\['params'\]` = 0.01 .* smallest subnet has"):
        search.run(n_trials=5)
    assert search.study is None


@pytest.mark.parametrize("url, match", [
    ("postgresql+psycopg2://bob:secret@127.0.0.1:{port}/nodb", r"cannot be opened.*HINT"),
    ("sqlite:////no/such/folder/search.db", r"folder of the SQLite file"),
    ("not a url", r"not a database URL"),
])
def test_unreachable_storage(supernet, dm, url, match):
    from search_helpers import free_port

    url = url.format(port=free_port())
    with pytest.raises((StorageError, MissingDependencyError), match=match) as info:
        _search(supernet, dm, storage=url).run(n_trials=1)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"objectives": ()}, "at least one metric"),
    ({"objectives": ("val_acc", "val_acc")}, "repeats"),
    ({"directions": ["up", "minimize"]}, "direction 'up'"),
    ({"directions": ["maximize"]}, "1 entries for 2 objectives"),
    ({"sampler": "cmaes"}, "`sampler` is 'cmaes'"),
    ({"limit_val_batches": 0}, "`limit_val_batches` is 0"),
    ({"constraints": {"params": "about half"}}, r"constraints\['params'\]"),
    ({"constraints": [("params", 0.5)]}, "must be a mapping"),
    ({"mlflow": 3}, "`mlflow` is 3"),
    ({"resume": "yes"}, "`resume` is 'yes'; allowed: 'check', 'new', 'ignore_weights'"),
])
def test_bad_arguments_name_the_argument(supernet, dm, kwargs, match):
    with pytest.raises(SearchError, match=match):
        _search(supernet, dm, **kwargs)


def test_run_arguments_and_resuming_with_other_objectives(supernet, dm, tmp_path):
    search = _search(supernet, dm)
    with pytest.raises(SearchError, match="`n_jobs`=2 needs a storage"):
        search.run(n_trials=2, n_jobs=2)
    with pytest.raises(SearchError, match="`n_trials` is -1"):
        search.run(n_trials=-1)
    with pytest.raises(SearchError, match="`total_trials` is 2.5"):
        search.run(total_trials=2.5)
    with pytest.raises(SearchError, match="`n_trials` and `total_trials` are both None"):
        search.run(n_trials=None)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _search(supernet, dm, storage=storage, study_name="x").run(n_trials=1)
    with pytest.raises(SearchError, match="HINT: pass another `study_name`"):
        _search(supernet, dm, storage=storage, study_name="x", objectives=("val_acc", "macs")).run(n_trials=1)


def test_empty_front_warns_when_no_trial_is_feasible(supernet, dm):
    with pytest.warns(UserWarning, match="no completed trial meets the constraints"):
        _, front = _search(supernet, dm, constraints={"val_acc": ">= 1.01"}).run(n_trials=2)
    assert not front and "empty" in str(front)


# -- objectives and constraints (no model) ------------------------------------------------------------------------
def test_constraint_parsing():
    objs = resolve_objectives(("val_acc", "latency_ms"), None)
    assert [o.direction for o in objs] == ["maximize", "minimize"]
    parsed = {c.metric: c for c in parse_constraints(
        {"params": 0.5, "macs": 2_000_000, "latency_ms": "<= 80%", "val_acc": 0.9, "val_loss": ">= 0.1"}, objs)}
    assert parsed["params"].relative and parsed["params"].sense == "<="
    assert not parsed["macs"].relative and parsed["macs"].bound == 2e6
    assert parsed["latency_ms"].relative and parsed["latency_ms"].bound == pytest.approx(0.8)
    assert parsed["val_acc"].sense == ">=" and parsed["val_loss"].sense == ">="
    c = parsed["params"].resolve({"params": 1000})
    assert c.bound == 500 and c.violation(400) < 0 < c.violation(600)
    assert Constraint("x", 1.0, ">=").violation(1.0) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SearchError, match="must be > 0"):
            parse_constraints({"params": "<= 0%"}, objs)


def test_missing_optuna_names_the_extra(supernet, dm, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'lightning-supernet\[optuna\]'"):
        _search(supernet, dm).run(n_trials=1)
