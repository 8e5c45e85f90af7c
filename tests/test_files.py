"""Files a user can trust: every loader turns missing, truncated, random-bytes and wrong-kind files into the
library's error naming the file; writes are atomic; the weights digest catches changed tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lightning_supernet.errors import CheckpointError
from lightning_supernet.files import (atomic_write, check_writable, load_checkpoint, load_module, load_weights,
                                      save_module, save_weights)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random":
        path.write_bytes(os.urandom(len(data)))
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "random", "empty"])
def test_damaged_weights_and_checkpoints_name_the_file(tmp_path, how):
    path = tmp_path / "w.pt"
    save_weights(path, {"w": torch.randn(64, 64)}, fingerprint="x")
    _damage(path, how)
    for loader in (load_weights, load_checkpoint):
        with pytest.raises(CheckpointError, match=rf"'{path}' cannot be loaded: .*expected"):
            loader(path)


def test_non_dict_missing_and_directory_are_explained(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match=r"holds a list; expected a Lightning checkpoint"):
        load_checkpoint(path, "a Lightning checkpoint")
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_weights(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=r"is a directory"):
        load_weights(tmp_path)
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)  # a dict, but not our weights file
    with pytest.raises(CheckpointError, match=r"has format None .*expected supernet weights"):
        load_weights(path)


def test_pickled_objects_are_refused_by_the_safe_load(tmp_path):
    path = tmp_path / "module.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(CheckpointError, match=r"safe \(weights_only=True\) load"):
        load_checkpoint(path)


def test_digest_catches_changed_tensors(tmp_path):
    """A weight overwritten with garbage (the 9.9e31 case) is refused, not searched."""
    path = tmp_path / "w.pt"
    digest = save_weights(path, {"w": torch.ones(8), "b": torch.zeros(2)}, fingerprint="x")
    state = torch.load(path, weights_only=True)
    assert state["sha256"] == digest
    state["state_dict"]["w"][3] = 9.9e31
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"is corrupted: its tensors hash to sha256"):
        load_weights(path)
    del state["sha256"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"stores no sha256 digest"):
        load_weights(path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "w.pt"
    save_weights(path, {"w": torch.ones(4)})
    before = path.read_bytes()

    class DiskFull(OSError):
        pass

    with pytest.raises(DiskFull):
        with atomic_write(path) as f:
            f.write(b"partial")
            raise DiskFull(28, "No space left on device")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]  # no temporary file left behind
    torch.testing.assert_close(load_weights(path)["state_dict"]["w"], torch.ones(4))


def test_check_writable_fails_before_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=r"`weights` '.*a-file/w.pt' cannot be written"):
        check_writable(blocker / "w.pt", "weights")
    assert check_writable(tmp_path / "new" / "w.pt", "weights").parent.is_dir()


@pytest.mark.parametrize("how", ["truncated", "random"])
def test_exported_models_are_digest_checked(tmp_path, how):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    path = save_module(model, tmp_path / "m.pt", {"trial": 1})
    x = torch.randn(2, 4)
    torch.testing.assert_close(load_module(path)(x), model(x))
    assert json.loads(path.with_suffix(".json").read_text())["trial"] == 1
    _damage(path, how)
    with pytest.raises(CheckpointError, match=r"is corrupted: its sha256 differs"):
        load_module(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match=r"m.json.*cannot be read"):
        load_module(path)


# -- Hugging Face save_subnet / load_subnet -------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_subnet(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from lightning_supernet import SupernetModule
    from lightning_supernet.integrations.transformers import save_subnet

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=2)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    model = transformers.BertForSequenceClassification(config).eval()
    supernet = SupernetModule(model, lambda out, y: out.logits.sum(), example_input={"input_ids": ids})
    space = supernet.search_space
    widths = [n for n, d in space.dims.items() if d.kind == "width" and d.largest == 64]
    small = supernet.extract(space.config({widths[0]: 16})).eval()
    path = tmp_path_factory.mktemp("hf") / "subnet"
    save_subnet(small, path)
    return path, small, ids


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("file, how, message", [
    ("subnet.safetensors", "truncated", r"subnet.safetensors cannot be read"),
    ("subnet.safetensors", "random", r"subnet.safetensors cannot be read"),
    ("subnet.json", "truncated", r"subnet.json cannot be read"),
    ("subnet.json", "random", r"subnet.json cannot be read"),
    ("config.json", "truncated", r"config.json cannot be read"),
    ("config.json", "missing", r"config.json does not exist"),
    ("subnet.safetensors", "missing", r"subnet.safetensors does not exist"),
])
def test_hf_load_subnet_reports_damaged_files(hf_subnet, tmp_path, file, how, message):
    from lightning_supernet.integrations._subnet_io import SubnetFormatError
    from lightning_supernet.integrations.transformers import load_subnet

    src, small, ids = hf_subnet
    copy = _copy(src, tmp_path / "copy")
    torch.testing.assert_close(load_subnet(copy)(input_ids=ids).logits, small(input_ids=ids).logits)
    if how == "missing":
        (copy / file).unlink()
    else:
        _damage(copy / file, how)
    with pytest.raises(SubnetFormatError, match=message):
        load_subnet(copy)


def test_hf_save_subnet_failing_midway_keeps_the_previous_config(hf_subnet, tmp_path, monkeypatch):
    """A config write that fails midway (transformers' own ``save_pretrained`` opens, truncates, then serialises)
    leaves the previous ``config.json`` whole and no temporary file behind."""
    from lightning_supernet.integrations.transformers import load_subnet, save_subnet

    src, small, ids = hf_subnet
    copy = _copy(src, tmp_path / "copy")
    before = {f.name: f.read_bytes() for f in copy.iterdir()}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(small.config), "to_json_string", fail)
    with pytest.raises(OSError, match="No space left"):
        save_subnet(small, copy)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == before
    torch.testing.assert_close(load_subnet(copy)(input_ids=ids).logits, small(input_ids=ids).logits)
