"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A process killed at any moment leaves either the previous file or the new one, never a
truncated mix. A write that fails (a full disk, ``ulimit -f``, permissions) raises an
``OSError`` whose ``filename`` is the file that was to be written, not the temporary one, and
leaves no temporary file behind. A process killed by SIGKILL can leave its temporary file
(``.<name>.<8 random characters>.tmp``, see :data:`TEMP_RE`); the next writer of a run directory
removes such leftovers (:meth:`fortify.runs.RunDir.open`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Names of the temporary files :func:`atomic_path` creates (``mkstemp``'s eight random
#: characters); group ``target`` is the name of the file being written.
TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched; an
    ``OSError`` (raised by the body or by the final fsync / rename) is re-raised naming
    ``path`` (its ``errno`` and ``strerror`` kept), so that messages say which file could not
    be written rather than naming the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            # mkstemp makes 0600 files, and some writers (safetensors) replace the file with
            # their own 0600 one: give the result the usual permissions
            os.chmod(tmp_path, 0o666 & ~_umask())
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, path)
        except OSError as exc:
            if exc.errno is None or exc.filename not in (None, str(tmp_path), tmp_path):
                raise
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        with contextlib.suppress(OSError):  # make the rename durable where supported
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then deliver them.

    For writes that must not stop half-way (the two files of a checkpoint): Ctrl-C or a
    ``kill`` during the block takes effect right after it. Only the main thread can install
    signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is None:  # installed outside Python: it could not be put back
            continue
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, lambda signum, frame: pending.append(signum))
            previous[sig] = handler
    try:
        yield
    finally:
        # block both while the handlers go back, so a signal arriving in between cannot stop
        # the loop half-way (leaving the other signal collected here for good); the OS
        # delivers it to the restored handler when unblocked
        block = getattr(signal, "pthread_sigmask", None)
        if block is not None and previous:
            block(signal.SIG_BLOCK, set(previous))
        try:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        finally:
            if block is not None and previous:
                block(signal.SIG_UNBLOCK, set(previous))
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


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
