"""The README's command-line path runs as written: its YAML config, its `lightning-supernet` commands
(fit, validate, search, export; with a second --config that only shrinks the sizes), then its Python block that
reloads the trained supernet, opens the study and extracts `front[0]["config"]`."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml
from search_helpers import one_thread

from lightning_supernet.cli import main
from lightning_supernet.cost import count_params

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = {"trainer": {"max_epochs": 1, "limit_train_batches": 4, "limit_val_batches": 1, "enable_progress_bar": False,
                     "enable_model_summary": False},
         "search": {"n_trials": 4, "limit_val_batches": 1}}


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"### {title}")
    end = text.find("\n### ", start + 1)
    return text[start:end if end > 0 else None]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _run_readme_path(tmp_path, monkeypatch, track: bool) -> str:
    monkeypatch.chdir(tmp_path)
    cli = _section("Command line")
    (config,) = _blocks(cli, "yaml")
    (commands,) = _blocks(cli, "bash")
    (tmp_path / "supernet.yaml").write_text(config)
    small = {**SMALL, "mlflow": {"enabled": track}}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    lines = [line for line in commands.splitlines() if line.strip()]
    assert [shlex.split(line)[1] for line in lines] == ["fit", "validate", "search", "export"]
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "lightning-supernet"
        assert main([*argv[1:], "--config", "small.yaml"]) == 0, line
    run = tmp_path / "runs" / "digits"
    assert (run / "supernet.pt").exists() and (run / "search.db").exists()
    exported = sorted((run / "exported").glob("subnet-trial-*.pt"))
    assert 1 <= len(exported) <= 3
    return yaml.safe_load(config)


def _run_python_block(tmp_path, config) -> None:
    (code,) = _blocks(_section("Saving, reloading and the best subnet"), "python")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    supernet, small, front = namespace["supernet"], namespace["small"], namespace["front"]
    full = count_params(supernet.extract(supernet.search_space.largest()))
    bound = config["search"]["constraints"]["params"]
    assert type(small).__name__ == "DigitsViT" and count_params(small) <= bound * full
    assert front[0]["val_acc"] == max(row["val_acc"] for row in front)
    assert (tmp_path / "runs" / "digits" / "copy.pt").exists()


def test_readme_cli_path_runs_as_written(tmp_path, monkeypatch):
    config = _run_readme_path(tmp_path, monkeypatch, track=False)
    assert sorted(os.listdir(tmp_path)) == ["runs", "small.yaml", "supernet.yaml"]  # no stray Lightning files
    _run_python_block(tmp_path, config)


@pytest.mark.slow
def test_readme_cli_path_with_mlflow_tracking(tmp_path, monkeypatch):
    import mlflow

    config = _run_readme_path(tmp_path, monkeypatch, track=True)
    mlflow.set_tracking_uri(config["mlflow"]["tracking_uri"])
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) >= 2  # the training run and the search's parent run (plus a nested run per trial)
    assert {n for n in os.listdir(tmp_path) if not n.startswith("mlflow.db")} == {"runs", "small.yaml",
                                                                                   "supernet.yaml"}
    _run_python_block(tmp_path, config)
