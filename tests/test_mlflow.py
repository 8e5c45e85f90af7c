"""MLflow: the search as a parent run with nested trial runs, the Pareto plot, logged subnets that reload and
match, training through MLFlowLogger, and a tracking server that is down."""

from __future__ import annotations

import lightning.pytorch as pl
import mlflow
import mlflow.pytorch
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from search_helpers import digits, free_port, one_thread, tiny_supernet

from lightning_supernet.callbacks import SandwichSampling
from lightning_supernet.cost import count_params
from lightning_supernet.demo import DigitsViT
from lightning_supernet.integrations.mlflow import MlflowTracking, mlflow_logger
from lightning_supernet.integrations.optuna import SubnetSearch

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def supernet():
    return tiny_supernet()


@pytest.fixture(scope="module")
def dm():
    return digits()


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An empty MLflow sqlite store, made once: creating its tables takes 5-12 s here; copying it, milliseconds."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store):
    """A temporary MLflow store (sqlite) with artifacts under tmp_path; no tracking URI is left set (MLflow's
    `set_tracking_uri` also sets MLFLOW_TRACKING_URI, which would turn tracking on for every later search)."""
    import shutil

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    yield uri
    mlflow.set_tracking_uri(None)
    assert "MLFLOW_TRACKING_URI" not in __import__("os").environ


def _children(client, tracking):
    return client.search_runs([tracking.experiment_id], f"tags.mlflow.parentRunId = '{tracking.parent_run_id}'")


def test_search_is_a_parent_run_with_nested_trials_a_figure_and_models(supernet, dm, store, tmp_path):
    client = MlflowClient(store)
    training = client.create_run(client.create_experiment("fit")).info.run_id  # stands in for the training run
    tracking = MlflowTracking(tracking_uri=store, experiment_name="search", top_k=2, training_run_id=training)
    search = SubnetSearch(supernet, dm, storage=f"sqlite:///{tmp_path / 's.db'}", limit_val_batches=1, seed=0,
                          mlflow=tracking, constraints={"params": 0.9})
    study, front = search.run(n_trials=6)
    parent = client.get_run(tracking.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["training_run_id"] == training and parent.data.tags["weights_digest"] == search.weights
    assert "mlflow.parentRunId" not in parent.data.tags  # the training run is in another experiment
    assert client.get_experiment(tracking.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.params["objectives"] == "val_acc,params"
    assert parent.data.metrics["trials_complete"] == 6
    runs = _children(client, tracking)
    assert sorted(int(r.data.tags["trial_number"]) for r in runs) == list(range(6))
    dims = set(supernet.search_space.dims)
    for r in runs:
        trial = study.trials[int(r.data.tags["trial_number"])]
        assert set(r.data.params) == dims
        assert r.data.params == {k: str(v) for k, v in trial.user_attrs.get("config", trial.params).items()}
        assert r.data.metrics["val_acc"] == pytest.approx(trial.values[0])
        assert r.data.metrics["params"] == trial.values[1]
        assert "constraint/params" in r.data.metrics
        assert r.data.tags["trial_state"] == "COMPLETE" and r.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.png", "pareto_front.json", "search_space.json"} <= artifacts
    assert len(tracking.model_uris) == min(2, len(front))
    trial_runs = {int(r.data.tags["trial_number"]): r.info.run_id for r in runs}
    for row in list(front)[:2]:  # each logged model carries its own trial's metrics, config and signature
        model = client.get_logged_model(tracking.model_uris[row["trial"]].split("/")[-1])
        assert model.source_run_id == trial_runs[row["trial"]] and model.name == f"subnet-trial-{row['trial']}"
        trial = study.trials[row["trial"]]
        own = {**row["metrics"], **{f"constraint/{k}": v for k, v in trial.constraints.items()}}
        assert len(model.metrics) == len(own) and {m.key: m.value for m in model.metrics} == pytest.approx(own)
        assert {m.key: m.value for m in model.metrics}["params"] == trial.values[1]
        assert model.params == {k: str(v) for k, v in row["config"].items()}
        info = mlflow.models.get_model_info(tracking.model_uris[row["trial"]])
        assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 8, 8)
        assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 10)
        assert info.saved_input_example_info is not None
    mlflow.set_tracking_uri(store)
    x = torch.stack([dm.val_set[i][0] for i in range(5)])
    for row in list(front)[:2]:
        loaded = mlflow.pytorch.load_model(tracking.model_uris[row["trial"]])
        assert type(loaded) is DigitsViT
        assert count_params(loaded) == row["metrics"]["params"]
        supernet.eval()
        with torch.no_grad(), supernet.subnet(row["config"]):
            expected = supernet(x)
        loaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)


def test_search_tracks_by_default_where_mlflow_is_set_up(dm, store, monkeypatch):
    import os
    from types import SimpleNamespace

    sn = tiny_supernet()
    os.rename("mlflow.db", "kept.db")  # no MLflow store in the working directory, no tracking URI: no tracking
    assert SubnetSearch(sn, dm, storage=None).tracking is None
    os.rename("kept.db", "mlflow.db")  # MLflow's default store is here: the search is tracked
    logger = mlflow_logger(tracking_uri="sqlite:///mlflow.db", experiment_name="lightning-supernet-search")
    assert logger.run_id  # the training run exists
    sn._trainer = SimpleNamespace(loggers=[logger])  # as `trainer.fit(sn)` leaves it
    search = SubnetSearch(sn, dm, storage=None, limit_val_batches=1, seed=0)
    assert search.tracking is not None and search.tracking.tracking_uri == "sqlite:///mlflow.db"
    search.tracking.top_k, search.tracking.log_figure = 0, False
    search.run(n_trials=2)
    client = MlflowClient(store)
    parent = client.get_run(search.tracking.parent_run_id)
    assert parent.info.status == "FINISHED" and len(_children(client, search.tracking)) == 2
    assert parent.data.tags["training_run_id"] == logger.run_id == parent.data.tags["mlflow.parentRunId"]
    assert SubnetSearch(sn, dm, storage=None, mlflow=False).tracking is None  # opt-out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    assert SubnetSearch(sn, dm, storage=None).tracking.tracking_uri == "sqlite:///other.db"


class _Flaky(SubnetSearch):
    catch = (RuntimeError,)
    enqueue_extremes = False

    def should_evaluate(self, trial, cfg):
        return trial.number != 1

    def objective(self, trial):
        if trial.number == 2:
            raise RuntimeError("boom")
        return super().objective(trial)


def test_pruned_and_failed_trials_are_marked(supernet, dm, store):
    tracking = MlflowTracking(tracking_uri=store, experiment_name="flaky", top_k=0, log_figure=False)
    search = _Flaky(supernet, dm, storage=None, limit_val_batches=1, seed=1, mlflow=tracking)
    study, _ = search.run(n_trials=4)
    states = [t.state for t in study.trials]
    assert states[1] == optuna.trial.TrialState.PRUNED and states[2] == optuna.trial.TrialState.FAIL
    runs = {int(r.data.tags["trial_number"]): r for r in _children(MlflowClient(store), tracking)}
    assert len(runs) == 4
    assert runs[1].data.tags["trial_state"] == "PRUNED" and runs[1].info.status == "KILLED"
    assert runs[2].data.tags["trial_state"] == "FAIL" and runs[2].info.status == "FAILED"
    assert "boom" in runs[2].data.tags["fail_reason"]
    assert runs[0].info.status == "FINISHED"


class _Crashing(SubnetSearch):
    enqueue_extremes = False

    def objective(self, trial):
        if trial.number == 1:
            raise ValueError("a bug in user code")
        return super().objective(trial)


def test_a_crashing_search_marks_its_parent_run_failed(supernet, dm, store):
    tracking = MlflowTracking(tracking_uri=store, experiment_name="crash", top_k=0, log_figure=False)
    with pytest.raises(ValueError, match="a bug in user code"):
        _Crashing(supernet, dm, storage=None, limit_val_batches=1, mlflow=tracking).run(n_trials=3)
    client = MlflowClient(store)
    assert client.get_run(tracking.parent_run_id).info.status == "FAILED"
    runs = {int(r.data.tags["trial_number"]): r for r in _children(client, tracking)}
    assert sorted(runs) == [0, 1]
    assert runs[1].data.tags["trial_state"] == "FAIL" and "a bug in user code" in runs[1].data.tags["fail_reason"]


def test_search_goes_on_when_the_tracking_server_is_down(supernet, dm):
    tracking = MlflowTracking(tracking_uri=f"http://127.0.0.1:{free_port()}")
    search = SubnetSearch(supernet, dm, storage=None, limit_val_batches=1, seed=0, mlflow=tracking)
    with pytest.warns(UserWarning, match="is not reachable.*going on without MLflow"):
        study, front = search.run(n_trials=3)
    assert len(study.trials) == 3 and front and not tracking.enabled


def _fit(supernet, dm, logger, **kwargs):
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=logger,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         log_every_n_steps=1, **kwargs)
    trainer.fit(supernet, datamodule=dm)
    return trainer


def test_training_logs_the_search_space_and_callback_settings(dm, store):
    supernet = tiny_supernet()
    logger = mlflow_logger(tracking_uri=store, experiment_name="fit")
    _fit(supernet, dm, logger, callbacks=[SandwichSampling(num_random=1)])
    run = MlflowClient(store).get_run(logger.run_id)
    params = run.data.params
    assert params["supernet/num_subnets"] == str(supernet.search_space.num_subnets)
    assert params["supernet/fingerprint"] == supernet.search_space.fingerprint
    assert params["callbacks/SandwichSampling/num_random"] == "1"
    assert params["model/dim"] == "16"
    assert "val_acc" in run.data.metrics and "train_loss" in run.data.metrics
    assert "search_space.json" in {a.path for a in MlflowClient(store).list_artifacts(logger.run_id)}
    assert run.info.status == "FINISHED"


def test_training_goes_on_when_the_tracking_server_is_down(dm):
    with pytest.warns(UserWarning, match="is not reachable"):
        logger = mlflow_logger(tracking_uri=f"http://127.0.0.1:{free_port()}")
    trainer = _fit(tiny_supernet(), dm, logger)
    assert trainer.state.finished and trainer.global_step > 0


def _server_went_away(*args, **kwargs):
    """What MLflow's REST client raises when the server stops answering mid-run."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        raise requests.exceptions.ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries "
                                                  "exceeded (Caused by NewConnectionError: Connection refused)")
    except requests.exceptions.ConnectionError as err:
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with exception "
                              f"{err}") from err


def test_training_goes_on_when_the_server_goes_away_but_a_client_error_raises(dm, store, monkeypatch):
    import warnings

    from mlflow.exceptions import MlflowException

    logger = mlflow_logger(tracking_uri=store, experiment_name="flaky")
    logger.log_hyperparams({"lr": 0.1})
    with pytest.raises(MlflowException, match="lr"):  # a client-side error (changing a logged param) is a bug
        logger.log_hyperparams({"lr": 0.2})
    assert not logger.disabled
    monkeypatch.setattr(logger._mlflow_client, "log_batch", _server_went_away)  # now the server goes away
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(tiny_supernet(), dm, logger, max_steps=3)
    down = [w for w in caught if "is not reachable" in str(w.message)]
    assert len(down) == 1 and "Max retries exceeded" in str(down[0].message)  # warned once
    assert trainer.state.finished and trainer.global_step == 2 and logger.disabled  # limit_train_batches=2


def test_search_goes_on_when_the_server_goes_away_but_a_client_error_raises(supernet, dm, store, monkeypatch):
    import warnings

    from mlflow.exceptions import MlflowException

    from mlflow.exceptions import RestException

    def bad_value(*args, **kwargs):  # what a tracking server answers to a metric value that is not a number
        raise RestException({"error_code": "INVALID_PARAMETER_VALUE",
                             "message": "Invalid value 'abc' for parameter 'metrics[0].value' supplied"})

    bad = MlflowTracking(tracking_uri=store, experiment_name="bad", top_k=0, log_figure=False)
    search = SubnetSearch(supernet, dm, storage=None, limit_val_batches=1, seed=0, mlflow=bad)
    search.setup()
    monkeypatch.setattr(bad.client, "log_batch", bad_value)
    with pytest.raises(MlflowException, match="Invalid value 'abc'"):  # a client-side error is not swallowed
        search.run(n_trials=2)
    assert bad.enabled
    tracking = MlflowTracking(tracking_uri=store, experiment_name="away", top_k=0, log_figure=False)
    search = SubnetSearch(supernet, dm, storage=None, limit_val_batches=1, seed=0, mlflow=tracking)
    search.setup()  # the parent run exists; then the server goes away
    monkeypatch.setattr(tracking.client, "create_run", _server_went_away)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study, front = search.run(n_trials=4)
    assert len([w for w in caught if "is not reachable" in str(w.message)]) == 1
    assert len(study.trials) == 4 and front and not tracking.enabled


def test_missing_mlflow_names_the_extra(monkeypatch):
    import sys

    from lightning_supernet.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'lightning-supernet\[mlflow\]'"):
        mlflow_logger()
