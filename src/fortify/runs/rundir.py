"""Run directories: one folder per experiment run.

Layout::

    <run>/config.yaml          the experiment configuration (written atomically)
    <run>/status.json          {"state": "running"|"finished"|"failed", "updated": UTC ISO, ...}
    <run>/metrics.jsonl        one JSON object per line, appended with flush + fsync
    <run>/checkpoints/<tag>.safetensors  (+ <tag>.json sidecar, see fortify.runs.checkpoint)
    <run>/reports/             evaluation reports and plots

Opening modes: ``new`` refuses a folder that already holds anything (a finished run, an
unfinished run, or unrelated files), ``resume`` requires an existing run (its ``config.yaml``),
``overwrite`` never deletes: it renames an existing non-empty folder to
``<run>.old-<UTC timestamp>`` and logs where it went.

Locking: :meth:`RunDir.open` takes an exclusive advisory lock (``fcntl.flock`` on
``<run>/.fortify.lock``, which records the holder's pid, host and command) and keeps it until
:meth:`RunDir.close` (or the process ends: the kernel releases it even after SIGKILL). A second
writer — another ``fortify train``/``--resume``, an import, an evaluation writing into the run —
gets a :class:`RunDirError` naming the holder instead of interleaving its writes. A lock file
left by a process that died is detected (its pid no longer runs), logged, and taken over (see
:mod:`fortify.runs.lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from fortify.config.loader import ConfigDumper, parse_yaml, plain
from fortify.errors import RunDirError
from fortify.runs.jsonio import dumps, write_json_atomic
from fortify.runs.lock import GUARD, LOCK_NAME, RunLock
from fortify.utils.atomic import TEMP_RE, atomic_write_text, check_writable_dir
from fortify.utils.clock import utc_now, utc_stamp

log = logging.getLogger(__name__)

MODES = ("new", "resume", "overwrite")
STATES = ("running", "finished", "failed")
RUN_MARKERS = ("config.yaml", "status.json", "metrics.jsonl", "checkpoints")
CHECKPOINT_SUFFIX = ".safetensors"
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

# transient file a writer creates and removes at once to test a folder; never run contents
WRITE_PROBE_PREFIX = ".write-probe."
# files of the run folder itself that are written atomically (through a temporary file)
_RUN_FILES = ("config.yaml", "status.json", "metrics.jsonl")
# the temporary file safetensors writes next to its target (Rust ``tempfile``: ".tmp" + 6)
_ST_TEMP_RE = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")

Mode = Literal["new", "resume", "overwrite"]
State = Literal["running", "finished", "failed"]


def _read_state(path: Path) -> str | None:
    try:
        data = json.loads((path / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    state = data.get("state") if isinstance(data, dict) else None
    return state if isinstance(state, str) else None


def _config_to_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        from fortify.config import to_dict

        config = to_dict(config)
    if not isinstance(config, Mapping):
        raise RunDirError(
            f"the run config must be a mapping or a config dataclass, got {type(config).__name__}"
        )
    return dict(config)


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _metrics_line(record: Mapping[str, Any]) -> str:
    if not isinstance(record, Mapping):
        raise RunDirError(
            f"metrics must be a mapping of name -> value, got {type(record).__name__}"
        )
    try:
        return dumps(dict(record), "metrics", indent=None)
    except TypeError as exc:
        raise RunDirError(f"cannot log metrics: {exc}") from exc


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write (full disk, ``ulimit -f``, permissions) into :class:`RunDirError`."""
    try:
        yield
    except OSError as exc:
        raise RunDirError(
            f"cannot write {path} ({exc.strerror or exc}); the previous version of the file is "
            "intact — free disk space / fix permissions and retry"
        ) from exc


def _leftover(name: str, checkpoints: bool = False) -> bool:
    """Whether ``name`` is the temporary file of an atomic write to a run file (in the run
    folder, or any file in its ``checkpoints/`` folder) — left behind only by a killed writer."""
    m = TEMP_RE.match(name)
    if m is not None:
        return checkpoints or m["target"] in _RUN_FILES
    return checkpoints and _ST_TEMP_RE.match(name) is not None


def _clean_leftovers(path: Path) -> None:
    """Under the run directory's lock: finish checkpoint saves a killed process left between
    their two renames, then remove the temporary files killed writers left behind."""
    from fortify.runs.checkpoint import complete_interrupted_saves

    ckpt = path / "checkpoints"
    if ckpt.is_dir():
        complete_interrupted_saves(ckpt)
    removed = []
    for folder, in_ckpt in ((path, False), (ckpt, True)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if _leftover(p.name, in_ckpt) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p.name)
    if removed:
        log.warning(
            "removed %d temporary file(s) an interrupted process left in %s: %s",
            len(removed), path, ", ".join(sorted(removed)),
        )  # fmt: skip


def check_tag(tag: object) -> str:
    """Return ``tag`` if it is a valid checkpoint tag (``best``, ``last``, ``epoch-12``: letters,
    digits, ``_ . -``, no path separators), else raise :class:`RunDirError`."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or ".." in tag:
        raise RunDirError(
            f"bad checkpoint tag {tag!r}; use letters, digits, '_', '.', '-' (e.g. 'best'), "
            "no path separators"
        )
    return tag


class RunDir:
    """A run folder. Create it with :meth:`RunDir.open`; the constructor only wraps a path.

    A :class:`RunDir` from :meth:`open` holds the directory's lock until :meth:`close`; use it
    as a context manager (``with RunDir.open(...) as run:``) to release it promptly.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock: RunLock | None = None

    def close(self) -> None:
        """Release the run directory's lock (idempotent; the files stay)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    @property
    def locked(self) -> bool:
        """True while this object holds the directory's lock."""
        return self._lock is not None and self._lock.held

    @classmethod
    def lock(cls, path: str | os.PathLike[str]) -> RunDir:
        """Lock the existing run folder ``path`` for writing into it (e.g. reports) without
        opening it as a run; release with :meth:`close`. Raises :class:`RunDirError` when
        another process holds it."""
        run = cls(Path(path).expanduser())
        run._lock = RunLock(run.path).acquire()
        return run

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        mode: Mode = "new",
        config: Mapping[str, Any] | Any | None = None,
    ) -> RunDir:
        """Create or reopen the run folder ``path`` and (if given) write ``config.yaml``.

        Args:
            path: the run folder.
            mode: ``"new"`` (refuse non-empty folders), ``"resume"`` (require an existing run)
                or ``"overwrite"`` (move an existing non-empty folder aside, never delete).
            config: the experiment configuration as a dict or config dataclass; written to
                ``config.yaml`` atomically. On resume a differing config is logged (keys that
                changed) and replaces the stored one.
        Raises:
            RunDirError: bad mode, refused folder, nothing to resume, unwritable location.
        """
        if mode not in MODES:
            raise RunDirError(f"unknown run-directory mode {mode!r}; allowed: {', '.join(MODES)}")
        new_cfg = _config_to_dict(config) if config is not None else None
        path = Path(path).expanduser()
        with GUARD:
            return cls._open_locked(path, mode, new_cfg)

    @classmethod
    def _open_locked(cls, path: Path, mode: Mode, new_cfg: dict[str, Any] | None) -> RunDir:
        cls.check_can_open(path, mode)  # refuse before creating anything (even a lock file)
        cls._make_writable_dir(path)
        lock = RunLock(path).acquire()
        try:
            # Re-check under the lock: another process may have started a run meanwhile.
            cls._check_contents(path, mode)
            if mode == "overwrite" and cls._listing(path):
                moved = cls._move_aside(path)
                lock.release()  # it moved with the folder
                log.warning(
                    "moved the existing run folder %s aside to %s (nothing deleted)", path, moved
                )
                cls._make_writable_dir(path)
                lock = RunLock(path).acquire()
            _clean_leftovers(path)
            run = cls(path)
            run._lock = lock
            if new_cfg is not None:
                if mode == "resume":
                    old_cfg = run.read_config()
                    changed = _diff_keys(old_cfg, new_cfg)
                    if changed:
                        log.warning(
                            "resuming %s with a changed config: %s", path, ", ".join(changed)
                        )
                run.write_config(new_cfg)
        except BaseException:
            lock.release()
            raise
        if mode == "resume":
            log.info("resuming run in %s (state: %s)", path, run.state or "unknown")
        return run

    @staticmethod
    def _listing(path: Path) -> list[str]:
        try:
            return sorted(
                p.name
                for p in path.iterdir()
                if p.name != LOCK_NAME
                and not p.name.startswith(WRITE_PROBE_PREFIX)
                and not _leftover(p.name)
            )
        except OSError as exc:
            raise RunDirError(
                f"cannot list the run directory {path}: {exc.strerror or exc}"
            ) from exc

    @classmethod
    def check_can_open(cls, path: str | os.PathLike[str], mode: Mode = "new") -> None:
        """Raise the :class:`RunDirError` that :meth:`open` would raise for ``path`` in ``mode``
        because of the folder's contents, without creating anything. Commands call it before
        long work (loading data, building models) so that a refused folder fails at once."""
        if mode not in MODES:
            raise RunDirError(f"unknown run-directory mode {mode!r}; allowed: {', '.join(MODES)}")
        cls._check_contents(Path(path).expanduser(), mode)
        check_writable_dir(path, "run directory")

    @classmethod
    def _check_contents(cls, path: Path, mode: str) -> None:
        if path.exists() and not path.is_dir():
            raise RunDirError(f"run directory {path} exists but is not a directory")
        contents = cls._listing(path) if path.is_dir() else []
        has_run = any(m in contents for m in RUN_MARKERS)
        busy = RunLock(path).holder() if contents else None
        if busy is not None:  # another process is writing this run right now
            raise RunDirError(busy)
        if mode == "new" and contents:
            state = _read_state(path)
            if state == "finished":
                raise RunDirError(
                    f"{path} already holds a finished run; use --resume to continue it or "
                    "--overwrite to start over (the old run is moved aside, not deleted); in "
                    "Python: fit(..., mode='resume') or mode='overwrite'"
                )
            if has_run:
                raise RunDirError(
                    f"{path} already holds a run (state: {state or 'unknown'}); use --resume to "
                    "continue it or --overwrite to start over (the old run is moved aside); in "
                    "Python: fit(..., mode='resume') or mode='overwrite'"
                )
            shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
            raise RunDirError(
                f"{path} is not empty ({shown}); choose a new or empty folder, or use "
                "--overwrite (in Python: mode='overwrite') to move the existing folder aside"
            )
        if mode == "resume" and not (path / "config.yaml").is_file():
            raise RunDirError(
                f"nothing to resume in {path}: no config.yaml from an earlier run; "
                "start a new run instead (mode 'new')"
            )

    @staticmethod
    def _move_aside(path: Path) -> Path:
        base = path.with_name(f"{path.name}.old-{utc_stamp()}")
        target, n = base, 0
        while target.exists():
            n += 1
            target = base.with_name(f"{base.name}-{n}")
        try:
            os.rename(path, target)
        except OSError as exc:
            raise RunDirError(
                f"cannot move the existing run folder {path} aside to {target}: "
                f"{exc.strerror or exc}; move or remove it yourself"
            ) from exc
        return target

    @staticmethod
    def _make_writable_dir(path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=WRITE_PROBE_PREFIX, dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise RunDirError(
                f"cannot create or write the run directory {path}: {exc.strerror or exc}; "
                "choose a writable location (e.g. --run-dir runs/<name>)"
            ) from exc

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def reports_dir(self) -> Path:
        """``<run>/reports`` (created on first access)."""
        d = self.path / "reports"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def checkpoint_path(self, tag: str) -> Path:
        """``<run>/checkpoints/<tag>.safetensors`` (folder created); tags like ``best``, ``last``,
        ``epoch-12``: letters, digits, ``_ . -``, no path separators."""
        check_tag(tag)
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        return self.checkpoints_dir / f"{tag}{CHECKPOINT_SUFFIX}"

    def checkpoint_tags(self) -> list[str]:
        """Tags of the checkpoints saved in this run (sorted)."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(
            p.name[: -len(CHECKPOINT_SUFFIX)]
            for p in self.checkpoints_dir.glob(f"*{CHECKPOINT_SUFFIX}")
        )

    # ------------------------------------------------------------------ config and state
    def write_config(self, config: Mapping[str, Any] | Any) -> None:
        """Atomically write ``config.yaml`` (keys in the given order)."""
        data = _config_to_dict(config)
        try:
            plain_data = json.loads(dumps(data, "config", indent=None))
            text = yaml.dump(plain_data, Dumper=ConfigDumper, sort_keys=False)
        except (TypeError, ValueError) as exc:
            raise RunDirError(f"cannot write the run config: {exc}") from exc
        with _writing(self.config_path):
            atomic_write_text(self.config_path, text)

    def read_config(self) -> dict[str, Any] | None:
        """The stored config as a dict, or None when there is no ``config.yaml``."""
        if not self.config_path.is_file():
            return None
        try:
            data = plain(parse_yaml(self.config_path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as exc:
            raise RunDirError(f"cannot read {self.config_path}: {exc}") from exc
        if data is not None and not isinstance(data, dict):
            raise RunDirError(f"{self.config_path} does not hold a mapping")
        return data

    @property
    def state(self) -> str | None:
        """``running`` / ``finished`` / ``failed`` from ``status.json``, or None if unset."""
        return _read_state(self.path)

    def set_state(self, state: State, **info: Any) -> None:
        """Atomically write ``status.json`` = {"state", "updated", **info}."""
        if state not in STATES:
            raise RunDirError(f"unknown run state {state!r}; allowed: {', '.join(STATES)}")
        try:
            with _writing(self.status_path):
                write_json_atomic(self.status_path, {"state": state, "updated": utc_now(), **info})
        except TypeError as exc:
            raise RunDirError(f"cannot record run state: {exc}") from exc

    # ------------------------------------------------------------------ metrics
    def log_metrics(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one JSON line to ``metrics.jsonl`` (flushed and fsynced).

        Tensors / NumPy scalars become numbers. If a previous process died mid-line, the new
        record starts on a fresh line (the broken line is skipped by :meth:`read_metrics`).
        """
        line = _metrics_line(record)
        path = self.metrics_path
        prefix = ""
        with _writing(path):
            size = path.stat().st_size if path.exists() else None
            if size:
                with open(path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        prefix = "\n"
            try:
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(prefix + line + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError:  # e.g. a full disk part-way: take the partial line back out
                with contextlib.suppress(OSError):
                    if size is None:
                        path.unlink()
                    else:
                        os.truncate(path, size)
                raise

    def write_metrics(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Atomically replace ``metrics.jsonl`` with ``records``, one JSON line each (a resumed
        run uses it to make the file match its checkpointed history)."""
        text = "".join(_metrics_line(r) + "\n" for r in records)
        with _writing(self.metrics_path):
            atomic_write_text(self.metrics_path, text)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All records of ``metrics.jsonl`` in order; malformed (e.g. half-written) lines are
        skipped with a warning."""
        if not self.metrics_path.exists():
            return []
        out: list[dict[str, Any]] = []
        with open(self.metrics_path, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    log.warning(
                        "%s line %d is not valid JSON (interrupted write?); skipped",
                        self.metrics_path,
                        i,
                    )
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
                else:
                    log.warning("%s line %d is not a JSON object; skipped", self.metrics_path, i)
        return out

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"
