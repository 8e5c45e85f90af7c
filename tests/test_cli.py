"""The ``lightning-supernet`` command: LightningCLI's help, config merging, --print_config, typos, validate,
--ckpt_path resume; search/export/demo on the same config; where files go; damaged weights."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from search_helpers import one_thread

from lightning_supernet.cli import main
from lightning_supernet.cost import count_params
from lightning_supernet.demo import DigitsViT
from lightning_supernet.files import load_module, load_weights

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
CONFIG = {
    "seed_everything": 0,
    "run_dir": "runs/cli",
    "model": {"class_path": "lightning_supernet.demo.DigitsViT",
              "init_args": {"dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}},
    "data": {"class_path": "lightning_supernet.demo.DigitsDataModule", "init_args": {"batch_size": 128}},
    "supernet": {"eval_subnets": ["largest"], "sandwich": 1},
    "trainer": {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 1, **QUIET},
    "search": {"n_trials": 4, "study_name": "cli", "limit_val_batches": 1},
    "export": {"top_k": 2},
}


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return _write(tmp_path / "config.yaml", CONFIG)


def test_entry_point_is_installed():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("lightning-supernet") == "lightning_supernet.cli:main"


def test_top_level_help_imports_neither_lightning_nor_transformers():
    code = ("import sys, time; t = time.perf_counter(); from lightning_supernet.cli import main; main(['--help']); "
            "print('SECONDS', time.perf_counter() - t); "
            "print('HEAVY', [m for m in ('lightning.pytorch', 'transformers', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert "search" in out and "--print_config" in out
    assert "HEAVY []" in out
    assert float(out.split("SECONDS")[1].split()[0]) < 2.0


def test_subcommand_help_lists_every_key(capsys):
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("--trainer.max_epochs", "--model CONFIG", "--supernet.sandwich", "--supernet.distillation",
                "--search.n_trials", "--export.top_k", "--ckpt_path", "--print_config", "--run_dir"):
        assert key in out, key
    assert main(["search", "--help"]) == 0
    assert "--search.objectives" in capsys.readouterr().out


def test_a_second_config_overrides_keys_not_sections(config, tmp_path, capsys):
    second = _write(tmp_path / "more.yaml", {"trainer": {"max_epochs": 5}, "search": {"n_trials": 9}})
    assert main(["fit", "--config", config, "--config", second, "--supernet.sandwich", "3", "--print_config"]) == 0
    merged = yaml.safe_load(capsys.readouterr().out)
    assert merged["trainer"]["max_epochs"] == 5 and merged["trainer"]["limit_train_batches"] == 3
    assert merged["search"]["n_trials"] == 9 and merged["search"]["study_name"] == "cli"
    assert merged["supernet"]["sandwich"] == 3 and merged["supernet"]["eval_subnets"] == ["largest"]
    assert merged["model"]["init_args"]["dim"] == 16


def test_demo_print_config_shows_the_demo_defaults(capsys):
    assert main(["demo", "--print_config", "--search.n_trials", "7"]) == 0
    demo = yaml.safe_load(capsys.readouterr().out)
    assert demo["model"]["class_path"] == "lightning_supernet.demo.DigitsViT"
    assert demo["search"]["n_trials"] == 7 and demo["mlflow"]["tracking_uri"] == "sqlite:///mlflow.db"


@pytest.mark.parametrize("argv, message", [
    (["fit", "--trainer.max_epocs", "3"], "unrecognized arguments: --trainer.max_epocs"),
    (["fit", "--trainer.max_epoch", "3"], "unrecognized arguments: --trainer.max_epoch"),  # no prefix matching
    (["fit", "--search.colour", "red"], "unrecognized arguments: --search.colour"),
    (["fit", "--supernet.sampler", "bogus"], "bogus"),
    (["fit", "--model.class_path", "no.such.Model"], "no.such.Model"),
])
def test_bad_input_exits_with_jsonargparse_messages(config, capsys, argv, message):
    assert main([argv[0], "--config", config, *argv[1:]]) == 2
    assert message in capsys.readouterr().err


def test_a_typo_in_the_config_file_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = _write(tmp_path / "bad.yaml", {**CONFIG, "trainer": {"max_epocs": 1}})
    assert main(["fit", "--config", bad]) == 2
    assert "max_epocs" in capsys.readouterr().err


def test_modules_in_the_current_directory_import(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_model_cli_test.py").write_text(
        "from lightning_supernet.demo import DigitsViT\n\nclass MyViT(DigitsViT):\n    pass\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    cfg = _write(tmp_path / "c.yaml", {**CONFIG, "model": {"class_path": "my_model_cli_test.MyViT"}})
    assert main(["fit", "--config", cfg, "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["class_path"] == "my_model_cli_test.MyViT"


def test_a_missing_module_gets_a_hint_about_the_current_directory(config, capsys):
    assert main(["fit", "--config", config, "--model.class_path", "my_missing_module.Model"]) == 2
    err = capsys.readouterr().err
    assert "No module named 'my_missing_module'" in err and "HINT: class paths are imported with the current" in err


def test_fit_refuses_unwritable_outputs_before_training(config, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    assert main(["fit", "--config", config, "--weights", "a-file/supernet.pt"]) == 2
    assert "`weights` 'a-file/supernet.pt' cannot be written" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "cli" / "lightning_logs").exists()  # nothing was trained


def test_search_without_weights_says_to_fit_first(config, capsys):
    assert main(["search", "--config", config]) == 2
    assert "run `lightning-supernet fit` with the same config first" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One `fit` for the tests below; each gets a fresh copy of its working directory."""
    root = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        config = _write(root / "config.yaml", CONFIG)
        assert main(["fit", "--config", config]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def fitted(trained, tmp_path, monkeypatch):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return "config.yaml", tmp_path / "runs" / "cli"


def test_fit_writes_every_file_under_run_dir(trained):
    run = trained / "runs" / "cli"
    assert sorted(os.listdir(trained)) == ["config.yaml", "runs"]  # nothing else in the working directory
    saved = yaml.safe_load((run / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["dim"] == 16 and saved["supernet"]["sandwich"] == 1
    assert list((run / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    weights = load_weights(run / "supernet.pt")
    assert weights["global_step"] == 3 and weights["config"]["model"]["init_args"]["dim"] == 16


def test_validate_uses_the_trained_weights(fitted):
    """The logged metric equals a hand-computed accuracy of the largest subnet with the saved weights."""
    from lightning_supernet.cli_lightning import SupernetCLI

    config, run = fitted
    weights = load_weights(run / "supernet.pt")
    cli = SupernetCLI(args=["validate", "--config", config])
    model = DigitsViT(dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
    model.load_state_dict({k.removeprefix("model."): v for k, v in weights["state_dict"].items()})
    x, y = next(iter(cli.datamodule.val_dataloader()))
    with torch.no_grad():
        acc = (model.eval()(x).argmax(-1) == y).float().mean()
    assert float(cli.trainer.callback_metrics["val_acc"]) == pytest.approx(float(acc), abs=1e-6)


def test_test_and_predict_use_the_trained_weights(fitted):
    from lightning_supernet.cli_lightning import SupernetCLI

    config, run = fitted
    weights = load_weights(run / "supernet.pt")
    model = DigitsViT(dim=16, depth=2, num_heads=2, mlp_ratio=2.0).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in weights["state_dict"].items()})
    cli = SupernetCLI(args=["predict", "--config", config, "--trainer.limit_predict_batches", "1"])
    x, _ = next(iter(cli.datamodule.predict_dataloader()))
    predictions = cli.trainer.predict_loop.predictions
    with torch.no_grad():
        assert torch.equal(predictions[0], model(x).argmax(-1))
    assert main(["test", "--config", config, "--trainer.limit_test_batches", "1"]) == 0


def test_search_reaches_its_total_then_export(fitted, capsys):
    config, run = fitted
    assert main(["search", "--config", config]) == 0
    assert "Pareto front" in capsys.readouterr().out
    assert main(["search", "--config", config]) == 0  # n_trials is the study's total: nothing is missing
    study = optuna.load_study(study_name="cli", storage=f"sqlite:///{run}/search.db")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 4
    assert main(["search", "--config", config, "--search.n_trials", "6"]) == 0  # extends the same study to 6
    study = optuna.load_study(study_name="cli", storage=f"sqlite:///{run}/search.db")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 6
    assert main(["export", "--config", config]) == 0
    written = sorted((run / "exported").glob("*.pt"))
    assert 1 <= len(written) <= 2
    for path in written:
        small = load_module(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        assert type(small) is DigitsViT and meta["study"] == "cli"
        assert count_params(small) == meta["metrics"]["params"]
        assert small(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert main(["export", "--config", config, "--export.trials", "[0]", "--export.out_dir", "one"]) == 0
    assert [p.name for p in Path("one").glob("*.pt")] == ["subnet-trial-0.pt"]
    assert sorted(os.listdir(".")) == ["config.yaml", "one", "runs"]


def test_damaged_weights_and_checkpoints_are_refused(fitted, capsys):
    """A weight overwritten with garbage is refused by its digest; truncated/random files name the file."""
    config, run = fitted
    state = torch.load(run / "supernet.pt", weights_only=True)
    state["state_dict"][next(iter(state["state_dict"]))].view(-1)[0] = 9.9e31
    torch.save(state, run / "supernet.pt")
    assert main(["search", "--config", config]) == 2
    assert "supernet.pt' is corrupted: its tensors hash to sha256" in capsys.readouterr().err
    (run / "supernet.pt").write_bytes((run / "supernet.pt").read_bytes()[:2000])
    assert main(["export", "--config", config]) == 2
    assert "supernet.pt' cannot be loaded: the file is truncated or corrupted" in capsys.readouterr().err
    ckpt = next((run / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    ckpt.write_bytes(os.urandom(3000))
    assert main(["validate", "--config", config, "--ckpt_path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt.name}' cannot be loaded" in err and "expected a Lightning checkpoint" in err


class KillAtStep(Callback):
    """Stops the process like a kill: raises KeyboardInterrupt before optimizer step ``step`` (no weights saved)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def _fit(config, run_dir, *extra, code=0):
    assert main(["fit", "--config", config, "--run_dir", run_dir, *extra]) == code
    return load_weights(os.path.join(run_dir, "supernet.pt"))["state_dict"] if code == 0 else None


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _callbacks(tmp_path, name, *specs):
    return ["--config", _write(tmp_path / f"{name}.yaml", {"trainer": {"callbacks": list(specs)}})]


SAVE_EVERY_2 = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"every_n_train_steps": 2, "save_top_k": -1}}


def _killed_then_resumed(config, tmp_path, kill_at, args, *callbacks):
    kill = {"class_path": f"{__name__}.KillAtStep", "init_args": {"step": kill_at}}
    _fit(config, "runs/b", *args, *_callbacks(tmp_path, "kill", *callbacks, kill), code=1)  # Lightning exits 1
    assert not os.path.exists("runs/b/supernet.pt")
    ckpts = sorted(glob.glob("runs/b/lightning_logs/version_0/checkpoints/*.ckpt"), key=os.path.getmtime)
    assert f"step={kill_at}" in ckpts[-1]
    return _fit(config, "runs/b", *args, *_callbacks(tmp_path, "keep", *callbacks), "--ckpt_path", ckpts[-1])


def test_ckpt_path_resume_mid_epoch_with_a_stateful_loader(config, tmp_path):
    """The README's claim: fit 6 steps == the same fit killed after step 2 (of a 4-batch epoch), resumed from
    ModelCheckpoint's step-2 checkpoint, when the loader's position is restored (StatefulDataLoader)."""
    pytest.importorskip("torchdata")
    args = ["--trainer.max_steps", "6", "--trainer.max_epochs", "-1", "--trainer.limit_train_batches", "4",
            "--data.init_args.stateful", "true"]
    straight = _fit(config, "runs/a", *args, *_callbacks(tmp_path, "save", SAVE_EVERY_2))
    resumed = _killed_then_resumed(config, tmp_path, 2, args, SAVE_EVERY_2)
    _assert_same(resumed, straight)
    other = _fit(config, "runs/c", *args, "--seed_everything", "1")  # the comparison can fail
    with pytest.raises(AssertionError):
        _assert_same(other, straight)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="Lightning 2.6 resumes a checkpoint taken at the end of the previous epoch "
                   "with a short next epoch (the README states this condition)")
def test_ckpt_path_resume_across_an_epoch_boundary_is_not_exact(config, tmp_path):
    args = ["--trainer.max_steps", "6", "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0"]
    straight = _fit(config, "runs/a", *args)
    _assert_same(_killed_then_resumed(config, tmp_path, 3, args), straight)


DEMO_SMALL = ["--search.n_trials", "3", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
              "--trainer.limit_val_batches", "1", "--model.init_args.dim", "16", "--model.init_args.depth", "2",
              "--model.init_args.num_heads", "2", "--export.top_k", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"]


def test_demo_runs_end_to_end_without_tracking(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *DEMO_SMALL, "--mlflow.enabled", "false"]) == 0
    out = capsys.readouterr().out
    assert "[3/3] exporting" in out
    saved = out.split("saved config: ")[1].split()[0]
    assert saved.startswith("runs/demo/") and yaml.safe_load(Path(saved).read_text())["model"]["init_args"]["dim"] == 16
    assert len(list((tmp_path / "runs" / "demo" / "exported").glob("*.pt"))) == 1
    assert {n for n in os.listdir(tmp_path) if not n.startswith("search.db")} == {"runs"}


@pytest.mark.slow
def test_demo_runs_end_to_end_and_says_where_to_look(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *DEMO_SMALL, "--mlflow.artifact_location", "runs/mlflow-artifacts"]) == 0
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "search.db").exists()
    assert len(list((tmp_path / "runs" / "demo" / "exported").glob("*.pt"))) == 1
    # only the stores the config names, and the run directory (MLflow's artifacts too)
    assert {n for n in os.listdir(tmp_path) if not n.startswith(("mlflow.db", "search.db"))} == {"runs"}
    assert any((tmp_path / "runs" / "mlflow-artifacts").rglob("*"))
    assert (tmp_path / "runs" / "demo" / "config.yaml").exists()


@pytest.mark.slow
def test_a_search_killed_with_sigkill_resumes_to_its_total(fitted):
    """`search` killed -9 after some trials; running it again completes the study to exactly n_trials."""
    import signal
    import time

    config, run = fitted
    total = 40  # trials of this tiny model take a fraction of a second: enough of them that the kill lands mid-study
    argv = [sys.executable, "-m", "lightning_supernet.cli", "search", "--config", config,
            "--search.n_trials", str(total)]
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage, deadline = f"sqlite:///{run}/search.db", time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="cli", storage=storage).trials
            except KeyError:  # the study is not created yet
                continue
            if sum(t.state.name == "COMPLETE" for t in trials) >= 3:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = sum(t.state.name == "COMPLETE" for t in optuna.load_study(study_name="cli", storage=storage).trials)
    assert 3 <= before < total
    from lightning_supernet.integrations.optuna import SubnetSearch

    # until its heartbeat goes stale, a killed trial looks like one another worker is running (it counts)
    time.sleep((getattr(SubnetSearch, "grace_period", None) or 0) + 2)
    assert main(["search", "--config", config, "--search.n_trials", str(total)]) == 0
    trials = optuna.load_study(study_name="cli", storage=storage).trials
    assert sum(t.state.name == "COMPLETE" for t in trials) == total


def _searches_check_weights() -> bool:
    import inspect

    from lightning_supernet.integrations.optuna import SubnetSearch

    return "resume" in inspect.signature(SubnetSearch).parameters


@pytest.mark.skipif(not _searches_check_weights(), reason="needs studies tied to their weights (SubnetSearch(resume=))")
def test_search_after_retraining_is_refused_then_starts_a_new_study(fitted, capsys):
    """The stale-study scenario end to end: fit, search, fit again (other weights), search -> a clear refusal;
    --search.resume new starts a fresh study measured on the new weights."""
    config, run = fitted
    assert main(["search", "--config", config, "--search.n_trials", "3"]) == 0
    assert main(["fit", "--config", config, "--seed_everything", "1"]) == 0  # retrained: other weights
    capsys.readouterr()
    assert main(["search", "--config", config, "--search.n_trials", "3"]) == 2
    err = capsys.readouterr().err
    assert "was measured on other supernet weights" in err and "--search.resume new" in err
    assert main(["search", "--config", config, "--search.n_trials", "3", "--search.resume", "new"]) == 0
    names = [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{run}/search.db")]
    assert len(names) == 2 and "cli" in names
