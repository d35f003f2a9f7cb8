"""The rules for resuming a run: what may change, what a checkpoint must hold, where to go on.

:func:`fit <fortify.train.loop.fit>` calls :func:`check_resume_config` before it opens the run
directory and :func:`resume_point` after it has built the model, optimiser, schedule and
scaler: that loads the ``last`` checkpoint and its training state into them and says which
epoch comes next. Every refusal is a :class:`~fortify.errors.FortifyError` that names the
way out (``--force`` or ``--overwrite``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fortify.config.loader import to_dict
from fortify.config.schema import ExperimentConfig
from fortify.errors import CheckpointError, ConfigError, RunDirError
from fortify.runs.checkpoint import read_sidecar
from fortify.runs.rundir import RunDir
from fortify.train.optim import LRSchedule
from fortify.train.state import load_state, restore_rng

log = logging.getLogger(__name__)

_ABSENT = object()  # RESUME_LOCATIONS: a field left out of the fingerprint

#: Epochs are numbered from 1 wherever people see them (metrics.jsonl, checkpoint metadata,
#: training-state file names, logs, :class:`~fortify.train.loop.FitResult`); checkpoints
#: record this as ``epoch_base`` so runs written when epochs counted from 0 still resume.
EPOCH_BASE = 1

# Config fields that may differ on resume without --force (they do not change the result; the
# experiment's ``name`` is a label that nothing in training reads).
RESUME_IGNORED = ("name", "device", "train.tensorboard", "eval")
#: Where and how the data are found, not which data: the data folder, permission to download
#: a missing dataset (the canonical, checksummed files) and the folder of the decoded-image
#: cache (hash-checked, so a hit equals decoding again). They may differ on resume too; the
#: training fingerprint sees them at their defaults, so fingerprints stay as they were.
RESUME_LOCATIONS: dict[str, Any] = {
    "data.root": None,
    "data.download": False,
    "data.options.cache_dir": _ABSENT,
}


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two config dicts differ, as ``path: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(f"{path}: {old.get(k, '<missing>')!r} -> {new.get(k, '<missing>')!r}")
            else:
                out.extend(config_diff(old[k], new[k], path))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def _ignored(path: str, fields: tuple[str, ...] = (*RESUME_IGNORED, *RESUME_LOCATIONS)) -> bool:
    return any(path == f or path.startswith(f + ".") for f in fields)


def training_changes(stored: Any, cfg: ExperimentConfig) -> list[str]:
    """Differences (``path: old -> new``) between a stored config dict and ``cfg`` that change
    what is trained (the name, device, TensorBoard, the ``eval`` section and where the data
    are found, :data:`RESUME_LOCATIONS`, do not)."""
    return [d for d in config_diff(stored, to_dict(cfg)) if not _ignored(d.split(":")[0])]


def _trained_part(data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        return data
    out = {}
    for k, v in data.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if _ignored(path, RESUME_IGNORED):
            continue
        if path in RESUME_LOCATIONS:  # at its default: the same hash as before it was ignored
            if RESUME_LOCATIONS[path] is not _ABSENT:
                out[str(k)] = RESUME_LOCATIONS[path]
            continue
        out[str(k)] = _trained_part(v, path)
    return out


def training_fingerprint(cfg: ExperimentConfig) -> str:
    """SHA-256 (hex) of what ``cfg`` trains: two configs have the same fingerprint when
    :func:`training_changes` between them is empty. Stored next to committed results, so that a
    later session can tell whether a result belongs to a config without its run directory."""
    blob = json.dumps(_trained_part(to_dict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_resume_config(stored: dict[str, Any], cfg: ExperimentConfig, force: bool) -> None:
    """Refuse (``ConfigError``) a resume whose config changes what is trained, unless forced
    (then log the differences). Differences that do not change what is trained are logged."""
    diffs = training_changes(stored, cfg)
    others = [d for d in config_diff(stored, to_dict(cfg)) if d not in diffs]
    if others:
        log.info("resuming with a changed config (not what is trained): %s", "; ".join(others))
    if not diffs:
        return
    listing = "; ".join(diffs)
    if not force:
        raise ConfigError(
            f"cannot resume: the config differs from the run's in {listing}. Resume with the "
            "run's own config, or pass --force (force=True) to continue with the new values"
        )
    log.warning("resuming with a changed config (forced): %s", listing)


def _global_batch(batch_size: int, world_size: int) -> int:
    """Images per optimiser step over all processes (each uses ``batch_size // world_size``)."""
    return batch_size // world_size * world_size


def check_resume_world_size(
    stored: int | None, current: int, batch_size: int, *, force: bool = False
) -> str | None:
    """Decide whether a run trained with ``stored`` processes may resume with ``current``.

    Model, optimiser, GradScaler and schedule state do not depend on the number of processes
    (gradients are averaged over processes, the schedule is a function of the epoch and of the
    fraction of it done), and every epoch's data order and random streams are pure functions
    of ``(seed, epoch, rank)``; so a resume with another number of processes is a correct,
    reproducible continuation. It cannot equal the uninterrupted run, though, because each
    epoch's samples fall into different per-process batches.

    Args:
        stored: the ``world_size`` in the checkpoint's metadata (None: unknown, not checked).
        current: processes of this resume.
        batch_size: ``train.batch_size``, the global batch split evenly across processes.
        force: accept a change of the effective global batch size (``--force``).
    Returns:
        None when nothing changes, else the warning to log: what changes and why the result
        will not be bit-identical to an uninterrupted run with ``stored`` processes.
    Raises:
        ConfigError: the effective global batch (``batch_size // n * n``) would change and
            ``force`` is false; the message lists the process counts that keep it.
    """
    if stored is None or int(stored) == current:
        return None
    stored = int(stored)
    old_per, new_per = batch_size // stored, batch_size // current
    old_global, new_global = _global_batch(batch_size, stored), _global_batch(batch_size, current)
    batch_note = f"the global batch stays {new_global} images"
    if old_global != new_global:
        keep = [
            n
            for n in range(1, min(batch_size, 64) + 1)
            if _global_batch(batch_size, n) == old_global
        ]
        if not force:
            raise ConfigError(
                f"cannot resume with {current} process(es): the run was trained with {stored} "
                f"process(es) of {old_per} images each (global batch {old_global}), and "
                f"train.batch_size {batch_size} split over {current} process(es) gives {new_per} "
                f"each (global batch {new_global}). Resume with a number of processes that keeps "
                f"the global batch at {old_global} ({', '.join(map(str, keep[:8]))}), or pass "
                f"--force (force=True) to continue with a global batch of {new_global}"
            )
        batch_note = f"the global batch changes from {old_global} to {new_global} images (forced)"
    ranks = "rank 0" if current == 1 else f"ranks 0..{current - 1}"
    return (
        f"the run was trained with {stored} process(es) and continues with {current}; "
        f"{batch_note} ({new_per} per process instead of {old_per}); epoch count, learning-rate "
        "schedule, optimiser/GradScaler state and best-checkpoint bookkeeping carry over. The "
        f"result will NOT be bit-identical to an uninterrupted {stored}-process run: every "
        "epoch's samples are split into different per-process batches (so BatchNorm batch "
        "statistics and the gradient summation order differ) and the random streams (attack "
        f"random starts) are those of {ranks}, seeded from (seed, epoch, rank). "
        f"Resuming this checkpoint again with {current} process(es) reproduces this "
        "continuation exactly on CPU"
    )


# key -> (allowed types, what it must be); what a resume reads from the training state
_STATE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "epoch": ((int,), "an integer"),
    "optimizer": ((dict,), "a mapping (optimizer.state_dict())"),
    "schedule": ((dict,), "a mapping"),
    "rng": ((dict,), "a mapping of RNG states"),
    "best_metric": ((int, float, type(None)), "a number or null"),
    "best_epoch": ((int, type(None)), "an integer or null"),
    "history": ((list,), "a list of per-epoch records"),
}


def check_state(state: Any, checkpoint: Path, epoch: int) -> None:
    """Refuse (``CheckpointError``, with the way out) a training state a resume cannot use:
    missing keys, wrong types, or an epoch other than the checkpoint's."""
    where = f"training state of {str(checkpoint)!r} (epoch {epoch})"
    way_out = "cannot resume exactly — start over with --overwrite"
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is a {type(state).__name__}, not a mapping; {way_out}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{where} lacks {missing}; {way_out}")
    for key, (types, what) in _STATE_KEYS.items():
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise CheckpointError(f"{where}: {key!r} must be {what}, got {value!r:.80}; {way_out}")
    if state["epoch"] != epoch:
        raise CheckpointError(
            f"training state epoch {state['epoch']} does not match the checkpoint's epoch "
            f"{epoch}; {way_out}"
        )
    rng = state["rng"]
    if not all(k in rng for k in ("python", "numpy", "torch")):
        raise CheckpointError(f"{where}: 'rng' lacks python/numpy/torch states; {way_out}")


def _reconcile_metrics(run: RunDir, history: list[dict[str, Any]]) -> None:
    """Make ``metrics.jsonl`` list exactly the checkpointed epochs before a resume continues.

    A kill between writing epoch ``e``'s checkpoint and appending its metrics line leaves the
    line missing (and a hand-edited file may hold extra or repeated lines); the training state's
    ``history`` is the authority, so the file is rewritten from it when the epochs differ.
    """
    if not history:  # nothing to go by: leave the file alone
        return
    logged = [r.get("epoch") for r in run.read_metrics()]
    wanted = [r.get("epoch") for r in history]
    if logged != wanted:
        log.warning(
            "%s does not list the checkpointed epochs 1..%d once each (%d lines); rewriting "
            "it from the checkpoint's history",
            run.metrics_path, len(history), len(logged),
        )  # fmt: skip
        run.write_metrics(history)


def _renumber_legacy(
    best_epoch: int | None, history: list[dict[str, Any]]
) -> tuple[int | None, list[dict[str, Any]]]:
    """Training state written when epochs counted from 0, renumbered to count from 1."""
    renumbered = []
    for r in history:
        r = dict(r)
        for key in ("epoch", "best_epoch"):
            if isinstance(r.get(key), int):
                r[key] += 1
        renumbered.append(r)
    return (None if best_epoch is None else best_epoch + 1), renumbered


@dataclass
class ResumePoint:
    """Where training (re)starts.

    Attributes:
        start_epoch: 0-based index of the next epoch (= epochs already done).
        best_metric: selection metric of the ``best`` checkpoint so far (None: none yet).
        best_epoch: its epoch, numbered from 1.
        history: one metrics record per epoch done.
        global_step: optimiser steps done (they depend on the number of processes).
    """

    start_epoch: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    global_step: int = 0


def _progress_without_last(run_dir: Path, last_path: Path) -> list[str]:
    """What shows that a run without ``last_path`` finished more than its first epoch: a
    training state, a ``best`` sidecar or a ``metrics.jsonl`` record of epoch 2 or later. (A
    kill during the first epoch's save can leave epoch 1's state, ``best`` and record behind;
    training from the first epoch rewrites them.)"""
    found = []
    folder = last_path.parent
    states = folder.glob("*.state-*.pt") if folder.is_dir() else []
    for p in sorted(states):
        m = re.search(r"\.state-(\d+)\.pt$", p.name)
        if m and int(m.group(1)) >= 2:
            found.append(f"checkpoints/{p.name}")
    epochs = [r.get("epoch") for r in RunDir(run_dir).read_metrics()]
    try:
        epochs.append(read_sidecar(folder / "best.safetensors").get("epoch"))
    except (CheckpointError, OSError):  # no or unreadable 'best': nothing shown by it
        pass
    later = [e for e in epochs if isinstance(e, int) and not isinstance(e, bool) and e >= 2]
    if later:
        found.append(f"epoch {max(later)} recorded")
    return found


def resume_point(
    run_dir: Path,
    last_path: Path,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    scaler: torch.amp.GradScaler | None,
    cfg: ExperimentConfig,
    world_size: int,
    is_main: bool,
    steps_per_epoch: int,
    force: bool,
    run: RunDir | None,
) -> ResumePoint:
    """Load the ``last`` checkpoint and its training state into ``module`` / ``optimizer`` /
    ``schedule`` / ``scaler`` (and the RNGs); return where training continues.

    On rank 0 (``run`` given) ``metrics.jsonl`` is made to list exactly the checkpointed
    epochs (:func:`_reconcile_metrics`).

    A run without a ``last`` checkpoint that shows no progress either (no other checkpoint
    file, no epoch in ``metrics.jsonl``: it stopped before its first epoch was saved) starts
    from the first epoch, as a new run would.

    Raises:
        RunDirError: no ``last`` checkpoint in a run that has progress (it was deleted).
        CheckpointError: a sidecar or training state a resume cannot use.
        ConfigError: another number of processes changes the global batch (without ``force``).
    """
    from fortify.runs import load_checkpoint

    tc = cfg.train
    if not last_path.is_file():  # stopped before its first epoch was saved: nothing to load
        progress = _progress_without_last(run_dir, last_path)
        if progress:
            raise RunDirError(
                f"cannot resume {str(run_dir)!r}: its 'last' checkpoint ({last_path.name}) is "
                f"missing but the run has progress ({', '.join(progress)}), so it was deleted "
                "or not copied; restore it, or start over with --overwrite (the run is moved "
                "aside, not deleted)"
            )
        if is_main:
            log.warning(
                "%s holds no 'last' checkpoint (the run stopped before its first epoch was "
                "saved); training it from the first epoch",
                run_dir,
            )
        return ResumePoint()
    try:
        meta = load_checkpoint(last_path, module)
    except CheckpointError as exc:  # corrupt, truncated, or another architecture
        raise CheckpointError(
            f"{exc}; cannot resume from it — restore the file, or start over with --overwrite "
            "(the run is moved aside, not deleted)"
        ) from exc
    stored = meta.get("epoch") if isinstance(meta, dict) else None
    if isinstance(stored, bool) or not isinstance(stored, int) or stored < 0:
        raise CheckpointError(
            f"{str(last_path)!r}: the sidecar's 'epoch' must be an integer >= 0, got "
            f"{stored!r}; the checkpoint was edited or not written by `fortify train` — "
            "cannot resume exactly, start over with --overwrite"
        )
    legacy = meta.get("epoch_base") != EPOCH_BASE  # written before epochs counted from 1
    state = load_state(last_path, stored)
    check_state(state, last_path, stored)
    epoch_done = stored + 1 if legacy else stored
    note = check_resume_world_size(meta.get("world_size"), world_size, tc.batch_size, force=force)
    if note is not None and is_main:
        log.warning("resuming %s after epoch %d: %s", run_dir, epoch_done, note)
    try:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CheckpointError(
            f"the training state of {str(last_path)!r} does not fit this run "
            f"({type(exc).__name__}: {exc}); cannot resume exactly — start over with "
            "--overwrite"
        ) from exc
    best_metric, best_epoch = state["best_metric"], state["best_epoch"]
    history = list(state.get("history", []))
    if legacy:
        best_epoch, history = _renumber_legacy(best_epoch, history)
        log.info("%s counted epochs from 0; its history is renumbered from 1", run_dir)
    # steps per epoch depend on the number of processes: count what was actually run
    global_step = int(state.get("global_step", epoch_done * steps_per_epoch))
    if run is not None:
        _reconcile_metrics(run, history)
    log.info("resuming %s after epoch %d of %d", run_dir, epoch_done, tc.epochs)
    return ResumePoint(epoch_done, best_metric, best_epoch, history, global_step)


__all__ = [
    "EPOCH_BASE",
    "RESUME_IGNORED",
    "ResumePoint",
    "check_resume_config",
    "check_resume_world_size",
    "check_state",
    "config_diff",
    "resume_point",
    "training_changes",
]
