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
  The metadata carries `digest`: "sha256:<hex>" over the metadata and every tensor (`tensor_digest`).

Writes. Every write goes to a temporary file in the destination directory, is fsynced, renamed into
place, and the directory is fsynced, so a crash (or a power cut) mid-write never leaves a truncated
file behind and a finished rename survives. `atomic_path` refuses to replace a checkpoint with
anything but a checkpoint of the same kind (a report, a figure, a packed file over a training
checkpoint), and never writes over a directory.

Loads verify before they trust (`load_checkpoint`):
  * a torch zip must store its entries uncompressed (as torch.save does: no zip bomb) and every
    entry's CRC32 must match; a packed file's digest must match;
  * the model config must be valid and agree with the stored tensors' names and shapes before
    anything is built from it (`qtoolkit.verify`): a small file cannot ask for terabytes;
  * every floating-point weight must be finite.
Any failure is a `CheckpointError` that names the file.
"""

from __future__ import annotations

import contextlib
import hashlib
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

from qtoolkit import verify
from qtoolkit.errors import CheckpointError, OutputError, short_repr

FORMAT = "qtoolkit"
VERSION = 1
KINDS = ("train", "packed")
CKPT_NAME = "ckpt.pt"  # the checkpoint file inside a run directory
PACKED_METADATA = frozenset({"format", "kind", "version", "meta", "tokenizer", "digest"})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_kind(path: str | Path) -> str | None:
    """"train" for a torch zip archive (a training checkpoint or any torch.save file), "packed" for
    a safetensors file, None for anything else (or a missing file). Reads at most a few bytes."""
    path = Path(path)
    try:
        if not path.is_file():
            return None
        if zipfile.is_zipfile(path):
            return "train"
        return "packed" if _looks_like_safetensors(path) else None
    except OSError:
        return None


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and platforms) cannot fsync a directory
    finally:
        os.close(fd)


def check_replaceable(path: str | Path, kind: str | None = None) -> None:
    """Raise `OutputError` if writing a file of `kind` ("train", "packed", None = not a checkpoint)
    to `path` would destroy something: a directory, or a checkpoint of another kind."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file path")
    if path.parent.exists() and not path.parent.is_dir():
        raise OutputError(f"{path}: {path.parent} is a file, not a directory")
    existing = file_kind(path)
    if existing is not None and existing != kind:
        what = {"train": "a training checkpoint", "packed": "a packed checkpoint"}[existing]
        writing = {None: "this output", "train": "a training checkpoint", "packed": "a packed checkpoint"}[kind]
        raise OutputError(f"{path}: is {what}; refusing to replace it with {writing} (choose another path)")


@contextlib.contextmanager
def atomic_path(path: str | Path, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else remove it.

    `kind` says what is written ("train", "packed" or None for anything that is not a checkpoint);
    an existing checkpoint of another kind is never replaced (`check_replaceable`)."""
    path = Path(path)
    check_replaceable(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the file the user asked for, not our temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        check_replaceable(path, kind)  # again: the destination may have changed while we wrote
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, tmp):
            raise OSError(e.errno, e.strerror, str(path)) from None  # a full disk names the file being written
        raise
    _fsync_dir(path.parent)


def _atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None], kind: str | None = None) -> Path:
    with atomic_path(path, kind) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return _atomic_write(path, lambda f: torch.save(obj, f), kind="train")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write a training checkpoint (torch zip, plain data + tensors only)."""
    if state.get("kind") != "train":
        raise ValueError("save_checkpoint writes training checkpoints; packed ones go through write_packed")
    return atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def write_packed(tensors: dict[str, torch.Tensor], meta: dict[str, Any], tokenizer: str, path: str | Path) -> Path:
    """Write a packed checkpoint: safetensors with the qtoolkit metadata in its header."""
    from safetensors.torch import save_file

    meta_json = json.dumps(meta)
    metadata = {"format": FORMAT, "kind": "packed", "version": str(VERSION), "meta": meta_json,
                "tokenizer": tokenizer, "digest": tensor_digest(tensors, meta_json, tokenizer)}
    with atomic_path(path, kind="packed") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # save_file replaces the temporary file (mode 0600) with its own
    return Path(path)


def tensor_digest(tensors: dict[str, torch.Tensor], meta_json: str, tokenizer: str) -> str:
    """"sha256:<hex>" over the metadata and every tensor (name, dtype, shape, bytes; sorted by name)."""
    h = hashlib.sha256()
    for text in (meta_json, tokenizer):
        h.update(len(text).to_bytes(8, "little"))
        h.update(text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().data)
    return "sha256:" + h.hexdigest()


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


def _reason(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _check_zip(path: Path) -> None:
    """Every entry stored uncompressed, as torch.save writes them (so what the file can make us
    allocate is bounded by its size: no zip bomb), and every entry's CRC32 right."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
            if packed:
                raise CheckpointError(f"{path}: not written by torch.save (compressed entries such as "
                                      f"{packed[0][:80]}); refused")
            if sum(i.file_size for i in infos) > path.stat().st_size:
                raise CheckpointError(f"{path}: its zip directory claims more data than the file holds; refused")
            bad = z.testzip()  # reads every entry once and checks its CRC32
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: corrupted or truncated checkpoint ({_reason(e)})") from None
    if bad is not None:
        raise CheckpointError(
            f"{path}: damaged: the CRC32 of entry {bad[:80]} does not match its data (the file changed after "
            "it was written: a disk, copy or transfer error); use another copy"
        )


def _load_train(path: Path, map_location) -> dict[str, Any]:
    _check_zip(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors and plain data, and loading "
            "those could execute code (qtoolkit checkpoints never do)"
        ) from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError, RecursionError, MemoryError) as e:
        raise CheckpointError(f"{path}: corrupted or truncated checkpoint ({_reason(e)})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a qtoolkit checkpoint (no 'format: {FORMAT}' header)")
    _check_version(path, obj.get("version"))
    if obj.get("kind") != "train":
        raise CheckpointError(f"{path}: unknown checkpoint kind {short_repr(obj.get('kind'))}")
    missing = [k for k in ("model_config", "policy", "tokenizer", "model") if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    for key, types in (("recipe", dict), ("tokenizer", str), ("metrics", dict), ("step", int)):
        if key in obj and obj[key] is not None and not isinstance(obj[key], types):
            raise CheckpointError(f"{path}: damaged checkpoint: {key} is a {type(obj[key]).__name__}")
    verify.check_train(path, obj)
    return obj


def _load_packed(path: Path, map_location) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(f"{path}: a safetensors file, but not a qtoolkit packed checkpoint")
            unknown = sorted(set(metadata) - PACKED_METADATA)
            if metadata.get("kind") != "packed" or unknown:  # a damaged key could hide the digest
                raise CheckpointError(f"{path}: packed checkpoint with damaged metadata (kind "
                                      f"{short_repr(metadata.get('kind'))}, unknown keys {short_repr(unknown)})")
            version = metadata.get("version", "")
            _check_version(path, int(version) if version.isdigit() else version)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{path}: corrupted or truncated packed checkpoint ({_reason(e)})") from None
    try:
        meta_json, tokenizer = metadata["meta"], metadata["tokenizer"]
        meta = json.loads(meta_json)
    except (KeyError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: packed checkpoint with damaged metadata ({_reason(e)})") from None
    digest = metadata.get("digest")
    if digest is not None and digest != tensor_digest(tensors, meta_json, tokenizer):
        raise CheckpointError(
            f"{path}: damaged: its tensors or metadata do not match the digest written with them (the file "
            "changed after it was written: a disk, copy or transfer error); use another copy or pack again"
        )
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: packed checkpoint with damaged metadata (not a mapping)")
    missing = [k for k in ("model_config", "policy", "layers") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: incomplete packed checkpoint, missing {', '.join(missing)}")
    obj = {"format": FORMAT, "version": int(version), "kind": "packed", **meta, "tokenizer": tokenizer,
           "tensors": tensors, "verified_digest": digest is not None}
    verify.check_packed(path, obj)
    return obj


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a training (torch zip) or packed (safetensors) checkpoint.

    Verified before it is returned (module docstring): CRC32s or digest, config against tensor
    shapes, finite weights. Any problem raises CheckpointError naming the file and what is wrong.
    The result always has
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
