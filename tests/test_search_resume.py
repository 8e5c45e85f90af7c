"""Resuming a search safely: studies tied to their weights, trials killed with SIGKILL (heartbeats, the largest
subnet enqueued again), `total_trials` over kills and resumes, and extremes enqueued once by workers that start
together."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time

import optuna
import pytest
import torch
from search_helpers import digits, kill_when, one_thread, tiny_supernet

from lightning_supernet.errors import SearchError
from lightning_supernet.integrations._resume import weights_digest
from lightning_supernet.integrations.optuna import SubnetSearch, search_subnets

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def supernet():
    return tiny_supernet()


@pytest.fixture(scope="module")
def dm():
    return digits()


# -- stale studies: a study is tied to the weights it measured ------------------------------------------------------
def test_a_study_measured_on_other_weights_is_refused_or_started_anew(dm, tmp_path):
    sn = tiny_supernet()
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    kwargs = dict(storage=storage, limit_val_batches=1, seed=0, show_progress_bar=False, mlflow=False)
    old_study, old_front = search_subnets(sn, dm, n_trials=4, **kwargs)
    old = weights_digest(sn)
    assert old_study.user_attrs["lightning_supernet"]["weights"] == old
    assert {t.user_attrs["weights"] for t in old_study.trials} == {old}
    again, _ = search_subnets(sn, dm, n_trials=1, **kwargs)  # same weights: resumed
    assert again.study_name == old_study.study_name and len(again.trials) == 5
    with torch.no_grad():  # "training" changes the weights
        for p in sn.parameters():
            p.add_(0.5 * torch.randn_like(p))
    new = weights_digest(sn)
    assert new != old
    with pytest.raises(SearchError) as info:
        search_subnets(sn, dm, n_trials=2, **kwargs)
    text = str(info.value)
    for part in (repr(old_study.study_name), str(tmp_path / "search.db"), old, new, "resume='new'",
                 "resume='ignore_weights'"):
        assert part in text
    assert len(optuna.load_study(study_name=old_study.study_name, storage=storage).trials) == 5  # untouched

    fresh, fresh_front = search_subnets(sn, dm, n_trials=3, resume="new", **kwargs)
    assert fresh.study_name == f"{old_study.study_name}-w{new[:8]}"
    assert len(fresh.trials) == 3 and {t.user_attrs["weights"] for t in fresh.trials} == {new}
    assert {t.user_attrs.get("reused_from", 0) for t in fresh.trials} <= {"reference", 0, 1, 2}
    assert fresh.trials[0].user_attrs["metrics"] != old_study.trials[0].user_attrs["metrics"]
    assert [r["metrics"] for r in fresh_front] != [r["metrics"] for r in old_front]
    resumed, _ = search_subnets(sn, dm, n_trials=1, resume="new", **kwargs)  # the same call resumes the new study
    assert resumed.study_name == fresh.study_name and len(resumed.trials) == 4

    search = SubnetSearch(sn, dm, resume="ignore_weights", **{k: v for k, v in kwargs.items()
                                                             if k != "show_progress_bar"})
    study = search.setup()
    smallest = old_study.trials[1]
    assert smallest.params == sn.search_space.smallest().to_dict()
    study.enqueue_trial(smallest.params)  # a motif measured on the old weights
    before = search.evaluations
    search.run(n_trials=1, show_progress_bar=False)
    t = study.trials[-1]
    assert t.params == smallest.params and "reused_from" not in t.user_attrs and search.evaluations == before + 1
    assert t.user_attrs["weights"] == new and t.user_attrs["metrics"] != smallest.user_attrs["metrics"]
    with pytest.warns(UserWarning, match=f"measured on other supernet weights \\(digest {old}\\)"):
        SubnetSearch(sn, dm, storage=storage, study_name=old_study.study_name, mlflow=False).load_study()


class _Beating(SubnetSearch):
    heartbeat_interval, grace_period = 1, 2  # a killed trial is stale after 2 s (sqlite's clock has 1 s steps)


class _HangsOnTrial(_Beating):
    hang_on = 0

    def objective(self, trial):
        if trial.number == self.hang_on:
            time.sleep(600)
        return super().objective(trial)


def _run_and_hang(supernet, dm, storage, hang_on, total_trials=None):
    torch.set_num_threads(1)
    cls = type("Hangs", (_HangsOnTrial,), {"hang_on": hang_on})
    search = cls(supernet, dm, storage=storage, study_name="hb", limit_val_batches=1, seed=0, mlflow=False)
    if total_trials is None:
        search.run(n_trials=50)
    else:
        search.run(n_trials=None, total_trials=total_trials)


def _kill_in_trial(supernet, dm, tmp_path, hang_on, total_trials=None):
    """Start a search in a forked process, SIGKILL it while trial `hang_on` runs (after its first heartbeat)."""
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    proc = multiprocessing.get_context("fork").Process(
        target=_run_and_hang, args=(supernet, dm, storage, hang_on, total_trials))
    proc.start()

    def hanging():
        try:
            with sqlite3.connect(tmp_path / "search.db", timeout=30) as con:
                return con.execute("SELECT count(*) FROM trial_heartbeats h JOIN trials t USING (trial_id) "
                                   "WHERE t.number = ? AND t.state = 'RUNNING'", (hang_on,)).fetchone()[0] > 0
        except sqlite3.OperationalError:  # the tables do not exist yet
            return False

    kill_when(proc, hanging)
    assert proc.exitcode == -9
    return storage


def test_a_trial_killed_while_running_the_largest_subnet_is_failed_and_the_largest_enqueued_again(
        supernet, dm, tmp_path):
    storage = _kill_in_trial(supernet, dm, tmp_path, hang_on=0)
    study = optuna.load_study(study_name="hb", storage=storage)
    assert [t.state.name for t in study.trials] == ["RUNNING", "WAITING"]  # the largest was running, then killed
    time.sleep(3.2)  # past the grace period
    search = _Beating(supernet, dm, storage=storage, study_name="hb", limit_val_batches=1, seed=0, mlflow=False)
    study, front = search.run(n_trials=2)
    largest, smallest = supernet.search_space.largest().to_dict(), supernet.search_space.smallest().to_dict()
    assert study.trials[0].state.name == "FAIL" and "fail_reason" not in study.trials[0].user_attrs
    planned = [t.system_attrs.get("fixed_params", t.params) for t in study.trials]  # also before `suggest` ran
    assert [t.state.name for t, p in zip(study.trials, planned) if p == largest] == ["FAIL", "COMPLETE"]
    assert [t.state.name for t, p in zip(study.trials, planned) if p == smallest] == ["COMPLETE"]
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    assert front


def test_total_trials_is_reached_over_a_kill_and_resumes_without_overshooting(supernet, dm, tmp_path):
    storage = _kill_in_trial(supernet, dm, tmp_path, hang_on=3, total_trials=6)  # killed inside its 4th trial
    time.sleep(3.2)  # past the grace period: the killed trial is stale

    def resume(**kwargs):
        search = _Beating(supernet, dm, storage=storage, study_name="hb", limit_val_batches=1, seed=0, mlflow=False)
        return search.run(**kwargs).study

    study = resume(n_trials=None, total_trials=6)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 6 and states.count("FAIL") == 1 and len(states) == 7
    assert study.trials[3].state.name == "FAIL"  # the killed one: redone, not counted
    assert len(resume(n_trials=50, total_trials=6).trials) == 7  # the total is reached: nothing more runs
    assert len(resume(n_trials=2, total_trials=20).trials) == 9  # n_trials caps one call
    assert len(resume(n_trials=None, total_trials=10).trials) == 11  # 10 counted + the killed one


def test_workers_that_saw_the_same_empty_study_enqueue_the_extremes_once(tmp_path):
    from lightning_supernet.integrations._resume import ensure_extremes
    from lightning_supernet.integrations._storage import make_storage

    url = f"sqlite:///{tmp_path / 'search.db'}"
    (_, a), (_, b) = make_storage(url), make_storage(url)  # two connections, as two processes have
    study_a = optuna.create_study(storage=a, study_name="x")
    study_b = optuna.load_study(storage=b, study_name="x")
    extremes = {"largest": {"w": 8}, "smallest": {"w": 2}}
    seen = study_a.get_trials()  # both checked before either enqueued
    assert ensure_extremes(study_a, a, extremes, seen) == ["largest", "smallest"]
    assert ensure_extremes(study_b, b, extremes, seen) == []
    assert [t.system_attrs["fixed_params"] for t in study_b.get_trials()] == [{"w": 8}, {"w": 2}]


class _StartTogether(SubnetSearch):
    barrier = None

    def make_sampler(self, seed):  # called right before the study is created or loaded
        self.barrier.wait(60)
        return super().make_sampler(seed)


def _start_together(supernet, dm, storage, barrier, seed):
    torch.set_num_threads(1)
    cls = type("Together", (_StartTogether,), {"barrier": barrier})
    cls(supernet, dm, storage=storage, study_name="two", limit_val_batches=1, seed=seed,
        mlflow=False).run(n_trials=3)


def test_two_processes_starting_together_enqueue_the_extremes_once(supernet, dm, tmp_path):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_start_together, args=(supernet, dm, storage, barrier, i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    study = optuna.load_study(study_name="two", storage=storage)
    planned = [t.system_attrs.get("fixed_params") for t in study.trials]
    space = supernet.search_space
    assert planned.count(space.largest().to_dict()) == 1 and planned.count(space.smallest().to_dict()) == 1
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6


def test_switching_to_wal_waits_for_a_writer_instead_of_failing_locked(tmp_path):
    """Switching a new SQLite file to WAL needs an exclusive lock, and SQLite answers "database is locked" at once
    (its busy timeout does not apply) while another worker writes, as when two workers open a new study file
    together: the storage's connection setup waits for the writer instead of failing."""
    import threading

    from lightning_supernet.integrations._storage import _wal

    path = tmp_path / "search.db"
    holding, release = threading.Event(), threading.Event()

    def writer():
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("CREATE TABLE other (i INTEGER)")
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO other VALUES (1)")
        holding.set()
        release.wait(10)
        con.execute("COMMIT")
        con.close()

    thread = threading.Thread(target=writer)
    thread.start()
    assert holding.wait(10)
    con = sqlite3.connect(path, timeout=5, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # what SQLite itself does
        con.execute("PRAGMA journal_mode=WAL")
    threading.Timer(0.5, release.set).start()
    try:
        _wal(con.cursor())
    finally:
        release.set()
        thread.join(10)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
