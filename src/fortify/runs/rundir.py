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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml

from fortify.errors import RunDirError
from fortify.runs.jsonio import dumps, write_json_atomic
from fortify.utils.atomic import atomic_write_text

log = logging.getLogger("fortify.runs")

MODES = ("new", "resume", "overwrite")
STATES = ("running", "finished", "failed")
RUN_MARKERS = ("config.yaml", "status.json", "metrics.jsonl", "checkpoints")
CHECKPOINT_SUFFIX = ".safetensors"
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

Mode = Literal["new", "resume", "overwrite"]
State = Literal["running", "finished", "failed"]


def utc_now() -> str:
    """The current UTC time as ISO-8601 with seconds, e.g. ``2026-11-22T00:07:01Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


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


class RunDir:
    """A run folder. Create it with :meth:`RunDir.open`; the constructor only wraps a path."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
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
        path = Path(path).expanduser()
        if path.exists() and not path.is_dir():
            raise RunDirError(f"run directory {path} exists but is not a directory")
        contents = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        has_run = any(m in contents for m in RUN_MARKERS)
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
        if mode == "overwrite" and contents:
            moved = cls._move_aside(path)
            log.warning(
                "moved the existing run folder %s aside to %s (nothing deleted)", path, moved
            )
        cls._make_writable_dir(path)
        run = cls(path)
        if config is not None:
            new_cfg = _config_to_dict(config)
            if mode == "resume":
                old_cfg = run.read_config()
                changed = _diff_keys(old_cfg, new_cfg)
                if changed:
                    log.warning("resuming %s with a changed config: %s", path, ", ".join(changed))
            run.write_config(new_cfg)
        if mode == "resume":
            log.info("resuming run in %s (state: %s)", path, run.state or "unknown")
        return run

    @staticmethod
    def _move_aside(path: Path) -> Path:
        base = path.with_name(f"{path.name}.old-{_utc_stamp()}")
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
            fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
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
        if not isinstance(tag, str) or not _TAG_RE.match(tag):
            raise RunDirError(
                f"bad checkpoint tag {tag!r}; use letters, digits, '_', '.', '-' (e.g. 'best')"
            )
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
            text = yaml.safe_dump(json.loads(dumps(data, "config", indent=None)), sort_keys=False)
        except (TypeError, ValueError) as exc:
            raise RunDirError(f"cannot write the run config: {exc}") from exc
        atomic_write_text(self.config_path, text)

    def read_config(self) -> dict[str, Any] | None:
        """The stored config as a dict, or None when there is no ``config.yaml``."""
        if not self.config_path.is_file():
            return None
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
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
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    prefix = "\n"
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(prefix + line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_metrics(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Atomically replace ``metrics.jsonl`` with ``records``, one JSON line each (a resumed
        run uses it to make the file match its checkpointed history)."""
        atomic_write_text(self.metrics_path, "".join(_metrics_line(r) + "\n" for r in records))

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
