"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A process killed at any moment leaves either the previous file or the new one, never a
truncated mix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        with contextlib.suppress(OSError):  # make the rename durable where supported
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Atomically replace ``path`` with whatever ``writer(tmp_path)`` writes to ``tmp_path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def check_writable_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Check, without creating anything, that ``path`` is or can become a writable folder.

    Expensive commands call it before they compute, so a bad ``--out`` fails at once instead
    of after the work. Returns ``path`` as a :class:`Path`.

    Raises:
        RunDirError: ``path`` (or a parent) is an existing file, or the nearest existing
            folder is not writable.
    """
    from fortify.errors import RunDirError

    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunDirError(
            f"cannot create or write the {what} {str(path)!r}: {str(probe)!r} is a file, not a "
            "folder; choose another location"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(
            f"cannot create or write the {what} {str(path)!r}: no write permission on "
            f"{str(probe)!r}; choose another location"
        )
    return path
