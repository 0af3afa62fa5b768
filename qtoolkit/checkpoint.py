"""On-disk checkpoints: atomic writes, safe loading (no code execution), clear errors.

A training checkpoint is one `torch.save`d dict of plain values and tensors, loadable with
`torch.load(..., weights_only=True)`:

    format: "qtoolkit"      kind: "train"       version: 1
    model_config            ModelConfig fields
    recipe                  the resolved recipe (policy included), so a run can be reproduced
    policy                  the policy's rules;  coverage: the per-layer assignment it produced
    tokenizer               the tokenizer as its JSON string (the checkpoint is self-contained)
    model                   state_dict (latent float weights + quantizer parameters)
    optimizer, step, rng    what `--resume` needs to continue bit-for-bit
    data                    fingerprints of the token caches the run used
    metrics                 the last eval (val_loss, val_ppl)

Every write goes to a temporary file in the destination directory and is renamed into place, so a
crash mid-write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qtoolkit.errors import CheckpointError

FORMAT = "qtoolkit"
VERSION = 1
KINDS = ("train", "packed")
CKPT_NAME = "ckpt.pt"  # the checkpoint file inside a run directory


def _atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return _atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    if state.get("kind") not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}")
    return atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; any problem raises CheckpointError naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        if (path / CKPT_NAME).is_file():
            path = path / CKPT_NAME
        else:
            raise CheckpointError(f"{path}: is a directory without a ckpt.pt")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a checkpoint (not a torch zip archive; truncated or another kind of file)")
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
    version = obj.get("version")
    if not isinstance(version, int) or version > VERSION or version < 1:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported by this qtoolkit "
            f"(supports 1..{VERSION}); upgrade qtoolkit or re-export the checkpoint"
        )
    if obj.get("kind") not in KINDS:
        raise CheckpointError(f"{path}: unknown checkpoint kind {obj.get('kind')!r}")
    missing = [k for k in ("model_config", "policy", "tokenizer", "model") if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    obj["path"] = str(path)
    return obj
