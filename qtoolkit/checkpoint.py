"""On-disk checkpoints: atomic writes, safe loading (no code execution), clear errors.

Two kinds, told apart by their first bytes:

* training checkpoints (`qtool train`): one `torch.save`d dict of plain values and tensors,
  loaded with `torch.load(..., weights_only=True)`:

    format: "qtoolkit"      kind: "train"       version: 1
    model_config            ModelConfig fields
    recipe                  the resolved recipe (policy included), so a run can be reproduced
    policy                  the policy's rules;  coverage: the per-layer assignment it produced
    tokenizer               the tokenizer as its JSON string (the checkpoint is self-contained)
    model                   state_dict (latent float weights + quantizer parameters)
    optimizer, step, rng    what `--resume` needs to continue bit-for-bit
    data                    fingerprints of the token caches the run used
    metrics                 the last eval (val_loss, val_ppl)

* packed checkpoints (`qtool pack`): safetensors (no code can run on load), see `qtoolkit.pack`.

Every write goes to a temporary file in the destination directory and is renamed into place, so a
crash mid-write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from qtoolkit.errors import CheckpointError

FORMAT = "qtoolkit"
VERSION = 1
KINDS = ("train", "packed")
CKPT_NAME = "ckpt.pt"  # the checkpoint file inside a run directory


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return _atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write a training checkpoint (torch zip, plain data + tensors only)."""
    if state.get("kind") != "train":
        raise ValueError("save_checkpoint writes training checkpoints; packed ones go through write_packed")
    return atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def write_packed(tensors: dict[str, torch.Tensor], meta: dict[str, Any], tokenizer: str, path: str | Path) -> Path:
    """Write a packed checkpoint: safetensors with the qtoolkit metadata in its header."""
    from safetensors.torch import save_file

    metadata = {"format": FORMAT, "kind": "packed", "version": str(VERSION), "meta": json.dumps(meta),
                "tokenizer": tokenizer}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        if not (path / CKPT_NAME).is_file():
            raise CheckpointError(f"{path}: is a directory without a {CKPT_NAME}")
        path = path / CKPT_NAME
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    return path


def _looks_like_safetensors(path: Path) -> bool:
    """8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < 100 * 2**20


def _check_version(path: Path, version: Any) -> None:
    if not isinstance(version, int) or version > VERSION or version < 1:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported by this qtoolkit "
            f"(supports 1..{VERSION}); upgrade qtoolkit or re-export the checkpoint"
        )


def _load_train(path: Path, map_location) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors and plain data, and loading "
            "those could execute code (qtoolkit checkpoints never do)"
        ) from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path}: corrupted or truncated checkpoint ({reason})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a qtoolkit checkpoint (no 'format: {FORMAT}' header)")
    _check_version(path, obj.get("version"))
    if obj.get("kind") != "train":
        raise CheckpointError(f"{path}: unknown checkpoint kind {obj.get('kind')!r}")
    missing = [k for k in ("model_config", "policy", "tokenizer", "model") if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return obj


def _load_packed(path: Path, map_location) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(f"{path}: a safetensors file, but not a qtoolkit packed checkpoint")
            version = metadata.get("version", "")
            _check_version(path, int(version) if version.isdigit() else version)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path}: corrupted or truncated packed checkpoint ({reason})") from None
    try:
        meta = json.loads(metadata["meta"])
        tokenizer = metadata["tokenizer"]
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: packed checkpoint with damaged metadata ({e})") from None
    missing = [k for k in ("model_config", "policy", "layers") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: incomplete packed checkpoint, missing {', '.join(missing)}")
    return {"format": FORMAT, "version": int(version), "kind": "packed", **meta, "tokenizer": tokenizer,
            "tensors": tensors}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a training (torch zip) or packed (safetensors) checkpoint.

    Any problem raises CheckpointError naming the file and what is wrong. The result always has
    `kind`, `model_config`, `policy`, `tokenizer` and `path`; training checkpoints add `model`
    (state dict) and resume state, packed ones `layers` (per-layer formats) and `tensors`.
    """
    path = _resolve(path)
    if zipfile.is_zipfile(path):
        obj = _load_train(path, map_location)
    elif _looks_like_safetensors(path):
        obj = _load_packed(path, map_location)
    else:
        raise CheckpointError(f"{path}: not a checkpoint (neither a torch zip archive nor safetensors; "
                              "truncated or another kind of file)")
    obj["path"] = str(path)
    return obj
