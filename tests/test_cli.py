"""The ``lightning-supernet`` command: fit, search (resumable), export, demo, --print_config and bad input."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import optuna
import pytest
import torch
import yaml
from search_helpers import one_thread

from lightning_supernet.cli import main
from lightning_supernet.cost import count_params
from lightning_supernet.demo import DigitsViT

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

CONFIG = {
    "seed_everything": 0,
    "model": {"class_path": "lightning_supernet.demo.DigitsViT",
              "init_args": {"dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}},
    "data": {"class_path": "lightning_supernet.demo.DigitsDataModule", "init_args": {"batch_size": 128}},
    "supernet": {"eval_subnets": None},
    "trainer": {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 1, "enable_progress_bar": False,
                "enable_model_summary": False, "enable_checkpointing": False,
                "callbacks": [{"class_path": "lightning_supernet.callbacks.SandwichSampling",
                               "init_args": {"num_random": 1}}]},
    "mlflow": {"enabled": False},
    "checkpoint": "ck/supernet.pt",
    "search": {"n_trials": 4, "storage": "sqlite:///search.db", "study_name": "cli", "limit_val_batches": 1,
               "seed": 0},
    "export": {"top_k": 2, "out_dir": "exported"},
}


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return str(path)


def test_entry_point_is_installed():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("lightning-supernet") == "lightning_supernet.cli:main"


def test_print_config_merges_file_and_overrides(config, capsys):
    assert main(["search", "--config", config, "--search.n_trials=7", "--trainer.max_epochs", "3",
                 "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["search"]["n_trials"] == 7 and printed["trainer"]["max_epochs"] == 3
    assert printed["model"]["class_path"] == "lightning_supernet.demo.DigitsViT"
    assert main(["demo", "--print_config"]) == 0
    demo = yaml.safe_load(capsys.readouterr().out)
    assert demo["search"]["n_trials"] >= 30 and demo["mlflow"]["tracking_uri"] == "sqlite:///mlflow.db"


def test_fit_search_resume_and_export(config, tmp_path, capsys):
    assert main(["fit", "--config", config]) == 0
    assert (tmp_path / "ck" / "supernet.pt").exists()
    assert main(["search", "--config", config]) == 0
    assert "Pareto front" in capsys.readouterr().out
    assert main(["search", "--config", config, "--search.n_trials", "2"]) == 0  # resumes the same study
    study = optuna.load_study(study_name="cli", storage="sqlite:///search.db")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 6
    assert main(["export", "--config", config]) == 0
    written = sorted((tmp_path / "exported").glob("*.pt"))
    assert 1 <= len(written) <= 2
    for path in written:
        small = torch.load(path, weights_only=False)
        meta = json.loads(path.with_suffix(".json").read_text())
        assert type(small) is DigitsViT and meta["study"] == "cli"
        assert count_params(small) == meta["metrics"]["params"]
        assert small(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert main(["export", "--config", config, "--export.trials", "0", "--export.out_dir", "one"]) == 0
    assert [p.name for p in (tmp_path / "one").glob("*.pt")] == ["subnet-trial-0.pt"]


def test_demo_runs_end_to_end_and_says_where_to_look(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--search.n_trials", "3", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--model.init_args.dim", "16", "--model.init_args.depth", "2",
            "--model.init_args.num_heads", "2", "--export.top_k", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "search.db").exists()
    assert len(list((tmp_path / "runs" / "demo" / "exported").glob("*.pt"))) == 1


@pytest.mark.parametrize("argv, message", [
    (["fit", "--foo.bar", "1"], "config key 'foo' is unknown"),
    (["fit", "--model.class_path", "no.such.Model"], "`model.class_path` 'no.such.Model' cannot be imported"),
    (["search"], "run `lightning-supernet fit` first"),
    (["search", "--search.colour", "red"], "`search.colour` is unknown"),
    (["search", "--search.n_trials"], "has no value"),
])
def test_bad_input_exits_with_a_clear_message(config, capsys, argv, message):
    assert main([argv[0], "--config", config, *argv[1:]]) == 2
    assert message in capsys.readouterr().err


def test_a_command_without_config_is_refused(capsys):
    assert main(["fit"]) == 2
    assert "needs `--config PATH`" in capsys.readouterr().err
