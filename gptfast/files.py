"""Writing files atomically, with the permissions the user's umask gives (no torch here).

A reader sees either the old file or the whole new one, never a half-written file; a failed write
leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_json"]


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Write ``path`` through a temporary file beside it, renamed into place only once complete.

    The file gets the permissions of a file created the ordinary way (``0o666 & ~umask``), not
    ``mkstemp``'s 0600. A failure removes the temporary file and leaves any old ``path`` untouched.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())
