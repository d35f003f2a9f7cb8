"""The run-directory lock: one writer per run directory, across processes and hosts' views.

:class:`RunLock` takes an exclusive advisory lock (``fcntl.flock`` on ``<run>/.fortify.lock``,
which records the holder's pid, host, command and start time) and keeps it until
:meth:`RunLock.release` (or the process ends: the kernel releases it even after SIGKILL, once
every process that inherited the open file has exited). A second writer gets a
:class:`~fortify.errors.RunDirError` naming the holder. A lock record left by a process that died
is detected (its pid no longer runs, or is a zombie), logged, and taken over; while the processes
it forked are still exiting after a kill, :meth:`RunLock.acquire` waits up to
``STALE_GRACE_S`` seconds for them before it refuses.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fortify.errors import RunDirError
from fortify.utils.clock import utc_now

log = logging.getLogger(__name__)

LOCK_NAME = ".fortify.lock"
# seconds a lock whose recorded holder has died may stay busy (its forked children still
# exiting after a SIGKILL) before acquire() gives up
STALE_GRACE_S = 15.0
# seconds a fresh holder gets to write its record (pid, command) before a refusal names nobody
RECORD_WAIT_S = 2.0


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host; a zombie (exited, not yet reaped — common for orphans
    in containers whose init does not reap) counts as dead: it holds no open files."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return False
    except OSError:
        pass
    else:
        return stat.rsplit(")", 1)[-1].split()[:1] not in (["Z"], ["X"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _lock_info(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _holder_died(info: dict[str, Any]) -> bool:
    pid = info.get("pid")
    same_host = info.get("host") in (None, socket.gethostname())
    return isinstance(pid, int) and pid != os.getpid() and same_host and not _pid_alive(pid)


def _flock_or_wait_for_dead_holder(fd: int, shared: bool = False) -> None:
    """``flock(fd, LOCK_EX | LOCK_NB)`` (``LOCK_SH`` if ``shared``: a probe); raises the
    ``OSError`` if the lock stays busy.

    A busy lock whose recorded holder has died is still held by processes that inherited the
    open file (forked workers); after a kill they exit within moments, so wait for them up to
    ``STALE_GRACE_S`` seconds instead of refusing at once. A lock whose holder has not written
    its record yet gets ``RECORD_WAIT_S`` to do so (the message then names it).
    """
    import fcntl

    op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    started = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, op)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            info = _lock_info(fd)
            if info and not _holder_died(info):
                raise  # a live holder: refuse now
            limit = STALE_GRACE_S if info else RECORD_WAIT_S
            if time.monotonic() - started >= limit:
                raise
            time.sleep(0.02)


class _Held:
    """A lock this process holds: its file descriptor and how many :class:`RunLock` share it."""

    def __init__(self, fd: int, pid: int):
        self.fd, self.pid, self.count = fd, pid, 1


# (st_dev, st_ino) of a run directory -> the lock this process holds on it. Opening a run the
# process already holds shares that lock (flock would otherwise refuse the process itself);
# GUARD serialises RunDir.open within the process, so two threads still cannot both start a
# new run in one folder (the second sees the first's files).
_HELD: dict[tuple[int, int], _Held] = {}
GUARD = threading.RLock()


class RunLock:
    """An exclusive advisory lock on a run directory (see the module doc).

    Acquire with :meth:`acquire` (non-blocking); :meth:`release` unlocks and empties the lock
    file, so a non-empty lock file that nobody holds was left by a process that died. Within one
    process the lock is shared (counted) by every :class:`RunLock` of the same directory.
    """

    def __init__(self, run_path: Path):
        self.path = Path(run_path) / LOCK_NAME
        self.key: tuple[int, int] | None = None

    @property
    def held(self) -> bool:
        return self.key is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunDirError` naming the process that holds it."""

        if self.key is not None:
            return self
        with GUARD:
            try:
                st = os.stat(self.path.parent)
            except OSError as exc:
                raise RunDirError(
                    f"cannot use the run directory {self.path.parent}: {exc.strerror or exc}"
                ) from exc
            key = (st.st_dev, st.st_ino)
            held = _HELD.get(key)
            if held is not None and held.pid == os.getpid():
                held.count += 1
                self.key = key
                return self
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RunDirError(
                    f"cannot create the lock file {self.path}: {exc.strerror or exc}; choose a "
                    "writable run directory"
                ) from exc
            try:
                _flock_or_wait_for_dead_holder(fd)
            except OSError as exc:
                info = _lock_info(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirError(self._busy_message(info)) from exc
                log.warning(
                    "cannot lock %s (%s): this filesystem does not support advisory locks; the "
                    "run directory is NOT protected against a second concurrent writer",
                    self.path, exc.strerror or exc,
                )  # fmt: skip
                return self
            previous = _lock_info(fd)
            pid = previous.get("pid")
            if isinstance(pid, int) and pid != os.getpid():
                host = previous.get("host")
                where = f" on host {host}" if host and host != socket.gethostname() else ""
                log.warning(
                    "stale lock in %s: process %s%s (%s) took it and ended without releasing "
                    "it (killed?); nobody holds it now, taking the run directory over",
                    self.path.parent, pid, where, previous.get("command", "?"),
                )  # fmt: skip
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": " ".join(sys.argv)[:500],
                "since": utc_now(),
            }
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
            except OSError:  # the lock itself holds; the record is only for messages
                log.debug("could not record the lock holder in %s", self.path, exc_info=True)
            _HELD[key] = _Held(fd, os.getpid())
            self.key = key
            return self

    def holder(self) -> str | None:
        """The :class:`RunDirError` message if another process holds this lock now, else None
        (creates nothing: a folder without a lock file is not locked)."""

        with GUARD:
            try:
                st = os.stat(self.path.parent)
                held = _HELD.get((st.st_dev, st.st_ino))
                if held is not None and held.pid == os.getpid():
                    return None
                fd = os.open(self.path, os.O_RDONLY)
            except OSError:
                return None
            try:
                _flock_or_wait_for_dead_holder(fd, shared=True)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return self._busy_message(_lock_info(fd))
                return None
            finally:
                os.close(fd)  # closing also drops the shared lock taken for the probe
            return None

    def _busy_message(self, info: dict[str, Any]) -> str:
        pid, host = info.get("pid"), info.get("host")
        holder = f"process {pid}" if pid is not None else "another process"
        if info.get("command"):
            holder += f" ({info['command'][:120]})"
        if info.get("since"):
            holder += f", since {info['since']}"
        same_host = host in (None, socket.gethostname())
        if _holder_died(info):
            return (
                f"run directory {self.path.parent} is locked although {holder} that took the "
                "lock has exited: a process it started still holds the lock file open. Find it "
                f"with `fuser -v {self.path}` (or `lsof {self.path}`), stop it, then retry"
            )
        where = f" on host {host}" if host and not same_host else ""
        return (
            f"run directory {self.path.parent} is in use by {holder}{where}; two writers never "
            "share a run directory. Wait for it to finish (or stop it), or use another "
            "directory"
        )

    def release(self) -> None:
        """Unlock (idempotent; the last holder in the process really unlocks)."""
        import fcntl

        with GUARD:
            key, self.key = self.key, None
            held = _HELD.get(key) if key is not None else None
            if key is None or held is None or held.pid != os.getpid():
                return
            held.count -= 1
            if held.count > 0:
                return
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.ftruncate(held.fd, 0)
            with contextlib.suppress(OSError):
                fcntl.flock(held.fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(held.fd)
