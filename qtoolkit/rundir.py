"""Exclusive use of a run directory: one writer at a time, and what a crashed writer left behind.

A command that writes into a directory it owns (`qtool train --out DIR`, `qtool search --out DIR`)
holds `DIR/.qtool.lock` for as long as it runs:

    with run_dir_lock(out_dir, "qtool train"):
        ...                                   # no other qtool process writes into out_dir

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on that file, so it is released by the kernel when the
process exits however it exits (kill -9 included) and is never left stale. A second process fails at
once with `RunDirBusy` naming the directory and the holder (its pid and command, which the holder
writes into the lock file). The lock file itself stays (deleting it would let two processes lock two
different files of the same name), except in a directory the command created and then failed in
before writing anything: that directory is removed again.

While the lock is held nobody else writes into the directory, so the temporary files of
`qtoolkit.checkpoint.atomic_path` found there (`.NAME.XXXXXXXX.tmp`) were left by a crashed writer:
`run_dir_lock` removes them when it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path

from qtoolkit.errors import OutputError, RunDirBusy

LOCK_NAME = ".qtool.lock"
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_path: mkstemp(prefix=".NAME.", suffix=".tmp")


def stale_temp_files(directory: str | Path) -> list[Path]:
    """Temporary files of interrupted atomic writes in `directory` (not recursive)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _TEMP.match(p.name) and p.is_file())


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(errors="replace").strip()
    except OSError:
        return "another process"
    return text[:200] or "another process"


@contextlib.contextmanager
def run_dir_lock(directory: str | Path, command: str) -> Iterator[list[Path]]:
    """Hold the exclusive lock of `directory` (created if missing) for the `with` block; yields the
    stale temporary files it removed. Raises `RunDirBusy` at once if another process holds it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{directory}: is a file, not a directory; choose another output directory")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    failed = True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(
                f"{directory} is in use by {_holder(lock_path)}; wait for it to finish or choose another "
                "output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({command})\n".encode(), 0)
        removed = []
        for p in stale_temp_files(directory):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
        yield removed
        failed = False
    finally:
        if failed and created and [p.name for p in directory.iterdir()] == [LOCK_NAME]:
            lock_path.unlink()  # a command that failed before writing anything leaves no directory
            with contextlib.suppress(OSError):
                directory.rmdir()
        os.close(fd)  # closing the descriptor releases the lock


def is_locked(directory: str | Path) -> bool:
    """Whether some process holds `directory`'s lock now (for tests and status displays)."""
    lock_path = Path(directory) / LOCK_NAME
    if not lock_path.is_file():
        return False
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


__all__ = ["LOCK_NAME", "is_locked", "run_dir_lock", "stale_temp_files"]
