"""The one training loop: ``fit(cfg, run_dir)`` for every objective, defence and precision.

Per epoch: reseed from ``(seed, epoch, rank)``, iterate the sharded :class:`TensorLoader`, let the
objective take its steps, validate on the validation split, then (rank 0) write the training
state, the ``last`` model checkpoint, the ``best`` one when the selection metric improved, and a
line of ``metrics.jsonl``. Because every epoch's randomness is a pure function of
``(seed, epoch, rank)`` and the optimiser/schedule/scaler state is checkpointed, resuming from
``last`` reproduces an uninterrupted run bit for bit on CPU — with the same number of processes.
A resume with a different number of processes continues the same run (see
:func:`check_resume_world_size`) but cannot reproduce the original one.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fortify.config.loader import to_dict
from fortify.config.schema import ExperimentConfig
from fortify.data.base import DataSplits
from fortify.errors import CheckpointError, ConfigError, FortifyError, RunDirError
from fortify.train import distributed as D
from fortify.train.objectives.base import StepContext, get_objective, set_train_mode
from fortify.train.optim import LRSchedule, build_optimizer
from fortify.train.state import capture_rng, load_state, prune_states, restore_rng, save_state
from fortify.train.validate import validate
from fortify.utils.runtime import compute_record

log = logging.getLogger("fortify.train")

#: Epochs are numbered from 1 wherever people see them (metrics.jsonl, checkpoint metadata,
#: training-state file names, logs, :class:`FitResult`); checkpoints record this as
#: ``epoch_base`` so runs written when epochs counted from 0 still resume.
EPOCH_BASE = 1

EpochCallback = Callable[[int, dict[str, Any]], None]
# Config fields that may differ on resume without --force (they do not change the result).
RESUME_IGNORED = ("device", "train.tensorboard", "eval")


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        run_dir: the run directory.
        model: the trained model (unwrapped, last epoch's weights, eval mode).
        epochs_run: epochs trained by this call (0 if the run was already complete).
        last_epoch: number of the final epoch (= ``train.epochs``).
        best_epoch: number of the epoch saved as ``best`` (None if never selected).
        best_metric: its selection metric.
        history: one metrics dict per epoch (including epochs from before a resume).
    """

    run_dir: Path
    model: nn.Module
    epochs_run: int
    last_epoch: int
    best_epoch: int | None
    best_metric: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    ss = np.random.SeedSequence([seed % 2**63, epoch, rank, 0x7EA1])
    return int(ss.generate_state(1, dtype=np.uint64)[0] % 2**63)


def _reseed(seed: int, device: torch.device) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed ^ 0x5DEECE66D)


def apply_trainable(
    model: nn.Module, prefixes: Sequence[str], freeze_bn: bool
) -> list[nn.Parameter]:
    """Set ``requires_grad`` from ``train.trainable`` / ``train.freeze_bn``; return trainables.

    A parameter is trainable when ``prefixes`` is empty or its name equals a prefix or starts
    with ``prefix + "."`` (so ``layer2.1.conv2`` selects ``layer2.1.conv2.weight``). With
    ``freeze_bn`` BatchNorm affine parameters are frozen too.
    """
    names = [n for n, _ in model.named_parameters()]
    for p in prefixes:
        stem = p.rstrip(".")
        if not any(n == stem or n.startswith(stem + ".") for n in names):
            import difflib

            close = difflib.get_close_matches(p, names, n=5, cutoff=0.4)
            raise ConfigError(
                f"train.trainable: prefix {p!r} matches no parameter of the model"
                + (f"; close matches: {', '.join(close)}" if close else "")
            )
    bn_params = set()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                bn_params.update(id(q) for q in m.parameters(recurse=False))
    out = []
    for name, param in model.named_parameters():
        stems = [p.rstrip(".") for p in prefixes]
        on = not prefixes or any(name == s or name.startswith(s + ".") for s in stems)
        on = on and id(param) not in bn_params
        param.requires_grad_(on)
        if on:
            out.append(param)
    return out


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


def _ignored(path: str) -> bool:
    return any(path == f or path.startswith(f + ".") for f in RESUME_IGNORED)


def training_changes(stored: Any, cfg: ExperimentConfig) -> list[str]:
    """Differences (``path: old -> new``) between a stored config dict and ``cfg`` that change
    what is trained (device, TensorBoard and the ``eval`` section do not)."""
    return [d for d in config_diff(stored, to_dict(cfg)) if not _ignored(d.split(":")[0])]


def _progress(iterable: Any, enabled: bool, desc: str, total: int) -> Any:
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


class _Checkpointer:
    """Rank-0 writer of ``last``/``best`` checkpoints, training state and metrics."""

    def __init__(
        self,
        run: Any,
        cfg: ExperimentConfig,
        splits: DataSplits,
        world_size: int,
        device: str | torch.device = "cpu",
    ):
        self.run = run
        self.cfg = cfg
        self.base_meta = {
            "compute": compute_record(device, cfg.train.precision),
            "config": to_dict(cfg),
            "num_classes": splits.num_classes,
            "image_shape": list(splits.image_shape),
            "seed": cfg.seed,
            "dataset": splits.name,
            "objective": cfg.train.objective,
            "world_size": world_size,
        }
        self.last = Path(run.checkpoint_path("last"))
        self.best = Path(run.checkpoint_path("best"))

    def meta(self, epoch: int, metrics: dict[str, Any], tag: str) -> dict[str, Any]:
        return {
            **self.base_meta,
            "epoch": epoch,
            "epoch_base": EPOCH_BASE,
            "metrics": metrics,
            "tag": tag,
        }

    def save(
        self, module: nn.Module, epoch: int, metrics: dict[str, Any], state: dict, best: bool
    ) -> None:
        from fortify.runs import save_checkpoint

        written = None
        try:
            written = save_state(self.last, epoch, state)
            save_checkpoint(self.last, module, self.meta(epoch, metrics, "last"))
            written = None  # now part of the 'last' checkpoint
            prune_states(self.last, epoch)
            if best:
                save_checkpoint(self.best, module, self.meta(epoch, metrics, "best"))
        except (RunDirError, OSError, RuntimeError) as exc:
            if written is not None:  # a state file of an epoch 'last' never reached
                written.unlink(missing_ok=True)
            raise RunDirError(
                f"could not write a checkpoint in {str(self.last.parent)!r} ({exc}); the previous "
                "'last' checkpoint is intact — free disk space / fix permissions and resume"
            ) from exc


def _open_run(run_dir: Path, mode: str, cfg: ExperimentConfig, force: bool) -> Any:
    from fortify.runs import RunDir

    if mode == "resume":
        stored = RunDir(run_dir).read_config() if run_dir.is_dir() else None
        if stored is None:
            raise RunDirError(
                f"nothing to resume in {str(run_dir)!r}: no config.yaml from an earlier run"
            )
        _check_resume_config(stored, cfg, force)  # before RunDir.open replaces config.yaml
    return RunDir.open(run_dir, mode=mode, config=to_dict(cfg))


def _check_resume_config(stored: dict[str, Any], cfg: ExperimentConfig, force: bool) -> None:
    diffs = training_changes(stored, cfg)
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


def fit(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    mode: Literal["new", "resume", "overwrite"] = "new",
    splits: DataSplits | None = None,
    model: nn.Module | None = None,
    progress: bool = True,
    force: bool = False,
    callbacks: Sequence[EpochCallback] = (),
) -> FitResult:
    """Train ``cfg`` into ``run_dir``.

    Args:
        cfg: the experiment (``data``, ``model``, ``defenses``, ``train`` sections are used).
        run_dir: run directory (created for ``new``; must hold a ``last`` checkpoint for
            ``resume``; wiped for ``overwrite``).
        mode: ``new``, ``resume`` or ``overwrite``.
        splits: data to use instead of ``fortify.data.load_dataset(cfg.data...)``.
        model: a model to train instead of ``fortify.factory.build_model(...)`` (its checkpoint
            can then only be reloaded by passing the same architecture).
        progress: show a tqdm bar per epoch (only on a TTY, only on rank 0).
        force: resume even if ``cfg`` differs from the run's stored config, or if a different
            number of processes changes the effective global batch size (a different number
            of processes alone only logs a warning; see :func:`check_resume_world_size`).
        callbacks: ``cb(epoch, record)`` (epoch numbered from 1) called after each epoch's
            checkpoint (rank 0 and others alike); an exception aborts training, leaving the
            checkpoints as written.
    Returns:
        :class:`FitResult`.
    Raises:
        ConfigError: bad or changed (on resume) configuration.
        NonFiniteLossError: the loss became NaN/Inf (checkpoints keep the last good epoch).
        RunDirError / CheckpointError: unusable run directory or checkpoint.
    """
    if mode not in ("new", "resume", "overwrite"):
        raise FortifyError(f"fit: mode must be 'new', 'resume' or 'overwrite', got {mode!r}")
    tc = cfg.train
    objective = get_objective(tc.objective, tc)
    info = D.setup(cfg.device)
    try:
        result = _fit(
            cfg, Path(run_dir), mode, splits, model, progress, force, callbacks, objective, info
        )
        D.finish(info)  # see there: without it a rank can abort at exit
        return result
    finally:
        D.teardown(info)


def _fit(
    cfg: ExperimentConfig,
    run_dir: Path,
    mode: str,
    splits: DataSplits | None,
    model: nn.Module | None,
    progress: bool,
    force: bool,
    callbacks: Sequence[EpochCallback],
    objective: Any,
    info: D.DistInfo,
) -> FitResult:
    from fortify.data import TensorLoader, load_from_config

    tc = cfg.train
    device = info.device
    if not info.distributed:  # a refused run directory fails before the data are loaded
        from fortify.runs import RunDir

        RunDir.check_can_open(run_dir, mode)  # type: ignore[arg-type]
    if splits is None:
        splits = load_from_config(cfg.data)
    if tc.batch_size % info.world_size:
        log.warning(
            "train.batch_size %d is not divisible by %d processes; each uses %d",
            tc.batch_size, info.world_size, tc.batch_size // info.world_size,
        )  # fmt: skip
    per_rank = tc.batch_size // info.world_size
    if per_rank < 1:
        raise ConfigError(
            f"train.batch_size {tc.batch_size} is smaller than the number of processes "
            f"({info.world_size}); it is the global batch size"
        )

    # -- the model: built (and probed) before anything is written, so that a bad model name
    # or option leaves no run directory behind --------------------------------------------
    if model is None:
        from fortify.factory import build_model

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        model = build_model(  # a resumed run's checkpoint replaces pretrained source weights
            cfg.model, cfg.defenses, splits.num_classes, splits.image_shape,
            load_weights=mode != "resume",
        )  # fmt: skip
    probe_model(model, splits.image_shape, splits.num_classes)

    # -- parameters, optimiser, batches (still nothing written) -----------------------------
    module = model.to(device)
    if tc.channels_last:
        module = module.to(memory_format=torch.channels_last)
    params = apply_trainable(module, tc.trainable, tc.freeze_bn)
    optimizer = build_optimizer(params, tc)
    augment = cfg.data.augment if cfg.data.augment != "auto" else splits.default_augment
    loader = TensorLoader(
        splits.train, per_rank, shuffle=True, drop_last=tc.drop_last, augment=augment,
        crop_padding=cfg.data.crop_padding, device=device, seed=cfg.seed,
        rank=info.rank, world_size=info.world_size,
    )  # fmt: skip
    if len(loader) == 0:
        raise ConfigError(
            f"no training batches: {len(splits.train)} images, batch {per_rank} per process, "
            f"drop_last={tc.drop_last}"
        )
    schedule = LRSchedule(optimizer, tc, len(loader))
    scaler = torch.amp.GradScaler(device.type) if tc.precision == "fp16" else None
    parts = _Parts(module, params, optimizer, loader, schedule, scaler)

    # -- the run directory (rank 0 decides; others follow or fail with the same message) ---
    run = None
    err: str | None = None
    ckpt: _Checkpointer | None = None
    paths: tuple[str, str] | None = None
    if info.is_main:
        try:
            run = _open_run(run_dir, mode, cfg, force)
            ckpt = _Checkpointer(run, cfg, splits, info.world_size, info.device)
            paths = (str(ckpt.last), str(ckpt.best))
        except FortifyError as exc:
            err = f"{type(exc).__name__}: {exc}"
            if run is not None:
                run.close()
            if not info.distributed:
                raise
        except OSError as exc:
            err = f"RunDirError: cannot use run directory {str(run_dir)!r}: {exc}"
            if run is not None:
                run.close()
            if not info.distributed:
                raise RunDirError(err.split(": ", 1)[1]) from exc
    err, paths = D.broadcast_object(info, (err, paths))
    if err is not None:
        if run is not None:
            run.close()
        raise RunDirError(err)

    try:
        return _train(
            cfg, run_dir, mode, splits, parts, progress, force, callbacks, objective, info,
            run, ckpt, Path(paths[0]),
        )  # fmt: skip
    finally:
        if run is not None and hasattr(run, "close"):
            run.close()  # release the run directory's lock


@dataclass
class _Parts:
    """What :func:`_fit` builds before it touches the run directory."""

    module: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    loader: Any
    schedule: LRSchedule
    scaler: Any


def probe_model(model: nn.Module, image_shape: Sequence[int], num_classes: int) -> None:
    """One forward pass of a blank image in eval mode (no gradient, no RNG, mode restored):
    a model that cannot process the data's images or returns no (1, K) logits fails here with
    a :class:`ConfigError`, before a run directory is created."""
    was_training = model.training
    shape = tuple(int(v) for v in image_shape)
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros((1, *shape)))
    except FortifyError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"the model cannot process the data's images of shape (C, H, W) = {shape}: "
            f"{first[:300]}; check model.name / model.kwargs (e.g. width >= 1) against the "
            "dataset's image size"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"the model must return logits of shape (N, {num_classes}) for the data's "
            f"{num_classes} classes, got {got} for one image"
        )


def _train(
    cfg: ExperimentConfig,
    run_dir: Path,
    mode: str,
    splits: DataSplits,
    parts: _Parts,
    progress: bool,
    force: bool,
    callbacks: Sequence[EpochCallback],
    objective: Any,
    info: D.DistInfo,
    run: Any,
    ckpt: _Checkpointer | None,
    last_path: Path,
) -> FitResult:
    tc = cfg.train
    device = info.device
    per_rank = tc.batch_size // info.world_size
    module, params, optimizer, loader = parts.module, parts.params, parts.optimizer, parts.loader
    schedule, scaler = parts.schedule, parts.scaler

    # -- resume ----------------------------------------------------------------------------
    start_epoch, best_metric, best_epoch, history = 0, None, None, []
    global_step = 0
    if mode == "resume":
        from fortify.runs import load_checkpoint

        if not last_path.is_file():
            raise RunDirError(
                f"nothing to resume in {str(run_dir)!r}: no 'last' checkpoint ({last_path.name}; "
                "the run stopped before its first epoch ended) — start over with --overwrite"
            )
        meta = load_checkpoint(last_path, module)
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
        note = check_resume_world_size(
            meta.get("world_size"), info.world_size, tc.batch_size, force=force
        )
        if note is not None and info.is_main:
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
        start_epoch = epoch_done  # 0-based index of the next epoch
        best_metric, best_epoch = state["best_metric"], state["best_epoch"]
        history = list(state.get("history", []))
        if legacy:
            best_epoch, history = _renumber_legacy(best_epoch, history)
            log.info("%s counted epochs from 0; its history is renumbered from 1", run_dir)
        # steps per epoch depend on the number of processes: count what was actually run
        global_step = int(state.get("global_step", start_epoch * len(loader)))
        if run is not None:
            _reconcile_metrics(run, history)
        log.info("resuming %s after epoch %d of %d", run_dir, epoch_done, tc.epochs)

    if tc.sync_bn and info.distributed:
        if device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        elif info.is_main:
            log.warning(
                "train.sync_bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only); "
                "ignored on %s: BatchNorm statistics stay per process",
                device.type,
            )
    net: nn.Module = module
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=objective.ddp_find_unused_parameters,
        )
    writer = _tensorboard(run_dir) if tc.tensorboard and info.is_main else None
    if info.is_main and run is not None and hasattr(run, "set_state"):
        run.set_state("running")

    ctx = StepContext(
        cfg=tc, optimizer=optimizer, device=device, params=params, module=module,
        scaler=scaler, global_step=global_step, rank=info.rank,
        world_size=info.world_size,
    )  # fmt: skip
    epochs_run = 0
    try:
        for index in range(start_epoch, tc.epochs):  # 0-based index; people see index + 1
            record = _train_epoch(
                objective, net, module, loader, schedule, ctx, cfg, index, info, progress
            )
            epoch = index + 1
            # every rank continues from the buffers rank 0 checkpoints (what a resume loads)
            D.broadcast_buffers(info, module)
            if epoch % tc.val_every == 0 or epoch == tc.epochs:
                t0 = time.perf_counter()
                record.update(
                    validate(
                        module,
                        splits.val,
                        tc,
                        info,
                        batch_size=max(per_rank, 64),
                        channels_last=tc.channels_last,
                    )  # fmt: skip
                )
                record["time/val"] = time.perf_counter() - t0
            sel = _selection_metric(tc.select, record)
            schedule.end_epoch(sel)
            improved = tc.select == "last" or (
                sel is not None and (best_metric is None or sel > best_metric)
            )
            if improved:
                best_metric = sel
                best_epoch = epoch
            record["best_epoch"] = best_epoch
            history.append(record)
            if info.is_main and ckpt is not None:
                state = {
                    "epoch": epoch,
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "rng": capture_rng(),
                    "best_metric": best_metric,
                    "best_epoch": best_epoch,
                    "history": history,
                    "global_step": ctx.global_step,
                }
                ckpt.save(module, epoch, record, state, best=improved)
                run.log_metrics(record)
                if writer is not None:
                    for k, v in record.items():
                        if isinstance(v, (int, float)) and k not in (
                            "epoch",
                            "world_size",
                            "threads",
                        ):
                            writer.add_scalar(k, v, epoch)
                    writer.flush()  # a killed run keeps the curves of its checkpointed epochs
            if info.is_main:
                saved = None if ckpt is None else ("last + best" if improved else "last")
                _log_epoch(record, tc.epochs, saved)
            epochs_run += 1
            for cb in callbacks:
                cb(epoch, record)
    except BaseException:
        if info.is_main and run is not None and hasattr(run, "set_state"):
            try:
                run.set_state("failed")
            except Exception:  # noqa: BLE001 - never mask the original error
                log.debug("could not mark the run failed", exc_info=True)
        raise
    finally:
        if writer is not None:
            writer.close()
    if info.is_main and run is not None and hasattr(run, "set_state"):
        run.set_state("finished")
    module.eval()
    return FitResult(
        run_dir=run_dir,
        model=module,
        epochs_run=epochs_run,
        last_epoch=tc.epochs,
        best_epoch=best_epoch,
        best_metric=best_metric,
        history=history,
    )


def _train_epoch(
    objective: Any,
    net: nn.Module,
    module: nn.Module,
    loader: Any,
    schedule: LRSchedule,
    ctx: StepContext,
    cfg: ExperimentConfig,
    epoch: int,
    info: D.DistInfo,
    progress: bool,
) -> dict[str, Any]:
    tc = cfg.train
    ctx.generator = _reseed(_epoch_seed(cfg.seed, epoch, info.rank), info.device)
    ctx.epoch = epoch
    loader.set_epoch(epoch)
    set_train_mode(net, tc.freeze_bn)
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    t0, c0 = time.perf_counter(), time.process_time()
    lr = schedule.apply(epoch, 0)
    desc = f"epoch {epoch + 1}/{tc.epochs}"
    batches = _progress(loader, progress and info.is_main, desc, len(loader))
    for i, (x, y) in enumerate(batches):
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = schedule.apply(epoch, i)
        metrics = objective.train_step(net, x, y, ctx)
        ctx.global_step += 1
        n = len(y)
        seen += n
        for k, v in metrics.items():
            v = v.detach().double() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + v.cpu() * n
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    keys = sorted(sums)
    flat = torch.stack([sums[k] for k in keys] + [torch.tensor(float(seen), dtype=torch.float64)])
    flat = D.all_reduce_sum(info, flat.to(info.device)).cpu()
    total = float(flat[-1])
    record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
    for k, v in zip(keys, flat[:-1]):
        record[f"train/{k}"] = float(v) / max(total, 1.0)
    record["train/samples"] = int(total)
    record["world_size"] = info.world_size  # a resume may use another number of processes
    record["threads"] = torch.get_num_threads()  # CPU results depend on it (reduction order)
    record["time/train"] = elapsed
    record["time/train_cpu"] = cpu  # this process's CPU seconds (all its threads)
    record["train/images_per_s"] = total / max(elapsed, 1e-9)
    return record


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


def _reconcile_metrics(run: Any, history: list[dict[str, Any]]) -> None:
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


def _selection_metric(select: str, record: dict[str, Any]) -> float | None:
    if select == "robust":
        return record.get("val/robust", record.get("val/clean"))
    if select == "clean":
        return record.get("val/clean")
    return None


def _log_epoch(record: dict[str, Any], epochs: int, saved: str | None = None) -> None:
    parts = [f"epoch {record['epoch']}/{epochs}", f"lr {record['lr']:.4g}"]
    for k in ("train/loss", "val/clean", "val/robust"):
        if k in record and math.isfinite(record[k]):
            parts.append(f"{k} {record[k]:.4f}")
    parts.append(f"{record['train/images_per_s']:.0f} img/s")
    if saved:
        parts.append(f"saved {saved}")
    log.info(" | ".join(parts))


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        log.warning(
            "train.tensorboard is on but tensorboard is not installed; "
            "pip install 'fortify[tensorboard]'. Continuing without it."
        )
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


__all__ = [
    "FitResult",
    "apply_trainable",
    "check_resume_world_size",
    "config_diff",
    "fit",
    "training_changes",
]
