"""What Linux's /proc says about memory: one `Key:  N kB` field of /proc/self/status (VmRSS, VmHWM)
or /proc/meminfo (MemAvailable), in bytes. The inference benchmark and the training-memory plan both
read them here; None where the file or the field is missing (not Linux)."""

from __future__ import annotations

from pathlib import Path

STATUS = "/proc/self/status"
MEMINFO = "/proc/meminfo"


def proc_bytes(path: str, field: str) -> int | None:
    """The `field` line of a /proc file (`VmRSS:  1234 kB`) in bytes, or None."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


__all__ = ["MEMINFO", "STATUS", "proc_bytes"]
