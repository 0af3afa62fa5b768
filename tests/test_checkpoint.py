from __future__ import annotations

import os

import pytest
import torch

from qtoolkit.checkpoint import (
    FORMAT,
    atomic_torch_save,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from qtoolkit.errors import CheckpointError

from .conftest import save_untrained_checkpoint


def minimal():
    return {"kind": "train", "model_config": {}, "policy": {}, "tokenizer": "{}", "model": {"w": torch.ones(2)}}


def test_round_trip_with_weights_only(tmp_path):
    path = save_untrained_checkpoint(tmp_path / "c.pt", mutate=lambda m: m.norm.weight.fill_(2.0))
    obj = load_checkpoint(path)
    assert obj["format"] == FORMAT and obj["version"] == 1
    assert torch.equal(obj["model"]["norm.weight"], torch.full((64,), 2.0))
    save_untrained_checkpoint(tmp_path / "ckpt.pt")
    assert load_checkpoint(tmp_path)["path"] == str(tmp_path / "ckpt.pt")  # a run directory works too


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    atomic_write_text(tmp_path / "f.txt", "old")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"x": Unpicklable()}, tmp_path / "f.txt")
    assert (tmp_path / "f.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_truncated_file(tmp_path):
    path = save_checkpoint(minimal(), tmp_path / "c.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="c.pt: not a checkpoint"):
        load_checkpoint(path)
    path.write_bytes(data[:-30])  # zip directory intact enough to be recognised, data cut
    with pytest.raises(CheckpointError, match="c.pt: (corrupted or truncated|not a checkpoint)"):
        load_checkpoint(path)


def test_garbage_empty_and_missing(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="g.pt: not a checkpoint"):
        load_checkpoint(tmp_path / "g.pt")
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_foreign_torch_file_and_code_execution_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a qtoolkit checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="could execute code"):
        load_checkpoint(tmp_path / "evil.pt")


def test_newer_version_is_refused(tmp_path):
    torch.save({**minimal(), "format": FORMAT, "version": 99}, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        load_checkpoint(tmp_path / "v.pt")


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_every_output_follows_the_umask(tmp_path, umask):
    """Text, torch and safetensors (packed) files alike get 0666 & ~umask, as a plain open() would."""
    from qtoolkit.checkpoint import write_packed

    old = os.umask(umask)
    try:
        paths = [atomic_write_text(tmp_path / "a.txt", "x"), save_checkpoint(minimal(), tmp_path / "c.pt"),
                 write_packed({"w": torch.ones(2)}, {}, "{}", tmp_path / "p.safetensors")]
    finally:
        os.umask(old)
    for path in paths:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path.name
