"""Where a command may write: checked before any work, so a bad output path costs nothing.

`check_outputs(outputs, inputs)` refuses, with an `OutputError` naming the option and the path:

* an output that resolves to one of the command's inputs (`qtool pack RUN -o RUN/ckpt.pt`,
  `qtool analyze RUN --json RUN/ckpt.pt`): the same file reached through a run directory, a
  relative path, `..`, a symlink or a hard link counts as the same;
* two outputs of one command on the same path;
* an output that is a directory, or whose parent is a file;
* an output that would replace a checkpoint with a file of another kind (`atomic_path` enforces
  the same rule again at the moment of writing, for writers that do not call this).

Every function that writes what a user named calls it: `pack_checkpoint`, `run_search`, `train`
(through its run directory), and the CLI for the reports it writes itself (`--json`, `--markdown`,
`--plot`, `--html`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from qtoolkit.checkpoint import CKPT_NAME, check_replaceable
from qtoolkit.errors import OutputError

Output = tuple[str, "str | Path | None", "str | None"]  # (option, path, kind: "train" | "packed" | None)


def _input_files(inputs: Iterable[str | Path | None]) -> list[Path]:
    files = []
    for p in inputs:
        if p is None:
            continue
        p = Path(p)
        files.append(p)
        if p.is_dir():  # a run directory stands for its checkpoint
            files.append(p / CKPT_NAME)
    return files


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether `a` and `b` name the same file (existing: same inode; else the same resolved path)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_outputs(outputs: Iterable[Output], inputs: Iterable[str | Path | None] = ()) -> None:
    """Raise `OutputError` if writing `outputs` could destroy an input or a checkpoint (module docstring)."""
    inputs = _input_files(inputs)
    seen: list[tuple[str, Path]] = []
    for option, path, kind in outputs:
        if path is None:
            continue
        path = Path(path)
        for src in inputs:
            if same_path(path, src):
                raise OutputError(f"{option} {path}: is {src}, which this command reads; refusing to overwrite "
                                  "it (choose another output path)")
        for other_option, other in seen:
            if same_path(path, other):
                raise OutputError(f"{option} {path}: the same file as {other_option}; give each output its own path")
        try:
            check_replaceable(path, kind)
        except OutputError as e:
            raise OutputError(f"{option} {e}") from None
        seen.append((option, path))


__all__ = ["check_outputs", "same_path"]
