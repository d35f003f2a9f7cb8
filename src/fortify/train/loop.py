"""The one training loop: ``fit(cfg, run_dir)`` for every objective, defence and precision.

Per epoch: reseed from ``(seed, epoch, rank)``, iterate the sharded :class:`TensorLoader`, let the
objective take its steps, validate on the validation split, then (rank 0) write the training
state, the ``last`` model checkpoint, the ``best`` one when the selection metric improved, and a
line of ``metrics.jsonl``. Because every epoch's randomness is a pure function of
``(seed, epoch, rank)`` and the optimiser/schedule/scaler state is checkpointed, resuming from
``last`` reproduces an uninterrupted run bit for bit on CPU — with the same number of processes.
A resume with a different number of processes continues the same run (see
:func:`~fortify.train.resume.check_resume_world_size`) but cannot reproduce the original one.

:func:`fit` is a sequence of named steps over one :class:`_Training` state: build
(:mod:`fortify.train.build`, nothing written yet), open the run directory, resume
(:mod:`fortify.train.resume`), distribute (SyncBatchNorm, DDP), the epoch loop, finish.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fortify.config.loader import to_dict
from fortify.config.schema import ExperimentConfig
from fortify.data.base import DataSplits
from fortify.errors import EvaluationError, FortifyError, RunDirError
from fortify.runs.rundir import Mode, RunDir
from fortify.train import distributed as D
from fortify.train.build import Built, apply_trainable, build, probe_model
from fortify.train.checkpointer import Checkpointer
from fortify.train.objectives.base import (
    NonFiniteLossError,
    Objective,
    StepContext,
    get_objective,
    set_train_mode,
)
from fortify.train.resume import (
    EPOCH_BASE,
    ResumePoint,
    check_resume_config,
    check_resume_world_size,
    check_state,
    config_diff,
    resume_point,
    training_changes,
)
from fortify.train.state import capture_rng
from fortify.train.validate import validate

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, Any]], None]


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


def _progress(iterable: Any, enabled: bool, desc: str, total: int) -> Any:
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


@dataclass
class _Training:
    """One :func:`fit` call: its inputs, what :func:`build` made, and where training stands.

    The steps of :func:`fit` fill it in order: :func:`_open_run_dir` sets ``run``, ``ckpt``
    (rank 0 only) and ``last_path``; :func:`_resume` sets ``point``; :func:`_distribute` sets
    ``net``; :func:`_epoch_loop` advances ``point`` and ``epochs_run``.
    """

    cfg: ExperimentConfig
    run_dir: Path
    mode: Mode
    info: D.DistInfo
    objective: Objective
    built: Built
    progress: bool = True
    force: bool = False
    callbacks: Sequence[EpochCallback] = ()
    run: RunDir | None = None  # rank 0 only
    ckpt: Checkpointer | None = None  # rank 0 only
    last_path: Path = Path()
    point: ResumePoint = field(default_factory=ResumePoint)
    net: nn.Module | None = None  # the module, wrapped in DDP when distributed
    epochs_run: int = 0


def fit(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    mode: Mode = "new",
    splits: DataSplits | None = None,
    model: nn.Module | None = None,
    progress: bool = True,
    force: bool = False,
    callbacks: Sequence[EpochCallback] = (),
) -> FitResult:
    """Train ``cfg`` into ``run_dir``.

    Args:
        cfg: the experiment (``data``, ``model``, ``defenses``, ``train`` sections are used).
        run_dir: run directory (created for ``new``; ``resume`` continues from its ``last``
            checkpoint, or from the first epoch if it stopped before saving one; moved aside
            for ``overwrite``).
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
        NonFiniteLossError: training diverged — the loss, the weights or the model's outputs
            became NaN/Inf (checkpoints keep the last good epoch; the message names the
            epoch, the step and what to change).
        RunDirError / CheckpointError: unusable run directory or checkpoint.
    """
    if mode not in ("new", "resume", "overwrite"):
        raise FortifyError(f"fit: mode must be 'new', 'resume' or 'overwrite', got {mode!r}")
    objective = get_objective(cfg.train.objective, cfg.train)
    info = D.setup(cfg.device)
    try:
        path = Path(run_dir)
        if not info.distributed:  # a refused run directory fails before the data are loaded
            RunDir.check_can_open(path, mode)
        if mode == "resume":
            _check_stored_config(path, cfg, force)
        # a resume that finds no 'last' checkpoint starts over: build the model as a new run
        last = path / "checkpoints" / "last.safetensors"
        build_mode: Mode = "new" if mode == "resume" and not last.is_file() else mode
        t = _Training(
            cfg, path, mode, info, objective, build(cfg, build_mode, info, splits, model),
            progress=progress, force=force, callbacks=callbacks,
        )  # fmt: skip
        _open_run_dir(t)
        try:
            if mode == "resume":
                _resume(t)
            _distribute(t)
            _epoch_loop(t)
            result = _finish(t)
        finally:
            if t.run is not None:
                t.run.close()  # release the run directory's lock
        D.finish(info)  # see there: without it a rank can abort at exit
        return result
    finally:
        D.teardown(info)


def _open_run_dir(t: _Training) -> None:
    """Rank 0 opens (locks) the run directory; the others learn its checkpoint paths, or fail
    with rank 0's message."""
    run_dir, info = t.run_dir, t.info
    err: str | None = None
    paths: tuple[str, str] | None = None
    if info.is_main:
        try:
            t.run = _open_run(run_dir, t.mode, t.cfg)
            t.ckpt = Checkpointer(t.run, t.cfg, t.built.splits, info.world_size, info.device)
            paths = (str(t.ckpt.last), str(t.ckpt.best))
        except FortifyError as exc:
            err = f"{type(exc).__name__}: {exc}"
            _close(t)
            if not info.distributed:
                raise
        except OSError as exc:
            err = f"RunDirError: cannot use run directory {str(run_dir)!r}: {exc}"
            _close(t)
            if not info.distributed:
                raise RunDirError(err.split(": ", 1)[1]) from exc
    err, paths = D.broadcast_object(info, (err, paths))
    if err is not None or paths is None:
        _close(t)
        raise RunDirError(err or f"cannot use run directory {str(run_dir)!r}")
    t.last_path = Path(paths[0])


def _close(t: _Training) -> None:
    if t.run is not None:
        t.run.close()
        t.run = None


def _check_stored_config(run_dir: Path, cfg: ExperimentConfig, force: bool) -> None:
    """Refuse a resume without a stored config, or whose config changes what is trained
    (unless forced); read only, before the data are loaded."""
    stored = RunDir(run_dir).read_config() if run_dir.is_dir() else None
    if stored is None:
        config = run_dir / "config.yaml"
        what = "its config.yaml is empty" if config.is_file() else "no config.yaml"
        raise RunDirError(
            f"nothing to resume in {str(run_dir)!r}: {what} (no config from an earlier run); "
            "restore the run's config.yaml, or start over with --overwrite"
        )
    check_resume_config(stored, cfg, force)


def _open_run(run_dir: Path, mode: Mode, cfg: ExperimentConfig) -> RunDir:
    """Open (lock) the run directory. ``new`` / ``overwrite`` write ``config.yaml`` now; a
    resume writes it only in :func:`_resume`, after every resume check passed."""
    if mode == "resume":
        return RunDir.open(run_dir, mode=mode)
    return RunDir.open(run_dir, mode=mode, config=to_dict(cfg))


def _resume(t: _Training) -> None:
    """Load the ``last`` checkpoint and training state (see :mod:`fortify.train.resume`), then
    (rank 0) write the resumed config to ``config.yaml``: a refused resume changes no file."""
    b = t.built
    t.point = resume_point(
        t.run_dir, t.last_path, module=b.module, optimizer=b.optimizer, schedule=b.schedule,
        scaler=b.scaler, cfg=t.cfg, world_size=t.info.world_size, is_main=t.info.is_main,
        steps_per_epoch=len(b.loader), force=t.force, run=t.run,
    )  # fmt: skip
    if t.run is not None:
        t.run.write_config(to_dict(t.cfg))


def _distribute(t: _Training) -> None:
    """SyncBatchNorm (CUDA only) and the DDP wrapper when several processes train."""
    info, device = t.info, t.info.device
    module = t.built.module
    if t.cfg.train.sync_bn and info.distributed:
        if device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # type: ignore[no-untyped-call]
            t.built.module = module
        elif info.is_main:
            log.warning(
                "train.sync_bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only); "
                "ignored on %s: BatchNorm statistics stay per process",
                device.type,
            )
    t.net = module
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        t.net = DDP(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=t.objective.ddp_find_unused_parameters,
        )


def _epoch_loop(t: _Training) -> None:
    """Train the remaining epochs; rank 0 checkpoints and logs each one. The run is marked
    ``running`` first and ``failed`` when anything (also a callback) raises."""
    tc, info, b, p = t.cfg.train, t.info, t.built, t.point
    writer = _tensorboard(t.run_dir) if tc.tensorboard and info.is_main else None
    if info.is_main and t.run is not None:
        t.run.set_state("running")
    ctx = StepContext(
        cfg=tc, optimizer=b.optimizer, device=info.device, params=b.params, module=b.module,
        scaler=b.scaler, global_step=p.global_step, rank=info.rank,
        world_size=info.world_size,
    )  # fmt: skip
    try:
        for index in range(p.start_epoch, tc.epochs):  # 0-based index; people see index + 1
            record = _train_epoch(t, ctx, index)
            epoch = index + 1
            # every rank continues from the buffers rank 0 checkpoints (what a resume loads)
            D.broadcast_buffers(info, b.module)
            if epoch % tc.val_every == 0 or epoch == tc.epochs:
                v0 = time.perf_counter()
                val_batch = max(tc.batch_size // info.world_size, 64)
                try:
                    scores = validate(
                        b.module, b.splits.val, tc, info, batch_size=val_batch,
                        channels_last=tc.channels_last,
                    )  # fmt: skip
                except EvaluationError as exc:  # its attack met non-finite logits?
                    x_val = b.splits.val.head(val_batch).floats(info.device)[0]
                    what = _non_finite(b.module, x_val, "validation")
                    if what is None:
                        raise
                    raise _diverged(t, index, "while validating it", record["lr"], what) from exc
                record.update(scores)
                record["time/val"] = time.perf_counter() - v0
            sel = _selection_metric(tc.select, record)
            b.schedule.end_epoch(sel)
            improved = tc.select == "last" or (
                sel is not None and (p.best_metric is None or sel > p.best_metric)
            )
            if improved:
                p.best_metric = sel
                p.best_epoch = epoch
            record["best_epoch"] = p.best_epoch
            p.history.append(record)
            p.global_step = ctx.global_step
            if info.is_main and t.ckpt is not None and t.run is not None:
                _checkpoint(t, epoch, record, improved, writer)
            if info.is_main:
                saved = None if t.ckpt is None else ("last + best" if improved else "last")
                _log_epoch(record, tc.epochs, saved)
            t.epochs_run += 1
            for cb in t.callbacks:
                cb(epoch, record)
    except BaseException:
        if info.is_main and t.run is not None:
            try:
                t.run.set_state("failed")
            except Exception:  # noqa: BLE001 - never mask the original error
                log.debug("could not mark the run failed", exc_info=True)
        raise
    finally:
        if writer is not None:
            writer.close()


def _checkpoint(
    t: _Training, epoch: int, record: dict[str, Any], improved: bool, writer: Any
) -> None:
    """Rank 0: training state + ``last`` (+ ``best``), the metrics line, TensorBoard scalars."""
    assert t.ckpt is not None and t.run is not None
    b, p = t.built, t.point
    state = {
        "epoch": epoch,
        "optimizer": b.optimizer.state_dict(),
        "schedule": b.schedule.state_dict(),
        "scaler": b.scaler.state_dict() if b.scaler is not None else {},
        "rng": capture_rng(),
        "best_metric": p.best_metric,
        "best_epoch": p.best_epoch,
        "history": p.history,
        "global_step": p.global_step,
    }
    t.ckpt.save(b.module, epoch, record, state, best=improved)
    t.run.log_metrics(record)
    if writer is not None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "world_size", "threads"):
                writer.add_scalar(k, v, epoch)
        writer.flush()  # a killed run keeps the curves of its checkpointed epochs


def _finish(t: _Training) -> FitResult:
    """Mark the run ``finished``; the model in eval mode and the :class:`FitResult`."""
    if t.info.is_main and t.run is not None:
        t.run.set_state("finished")
    module = t.built.module
    module.eval()
    return FitResult(
        run_dir=t.run_dir,
        model=module,
        epochs_run=t.epochs_run,
        last_epoch=t.cfg.train.epochs,
        best_epoch=t.point.best_epoch,
        best_metric=t.point.best_metric,
        history=t.point.history,
    )


def _train_epoch(t: _Training, ctx: StepContext, epoch: int) -> dict[str, Any]:
    """One epoch (0-based ``epoch``) of the objective's steps; the record of its mean metrics
    over all processes."""
    cfg, info, b = t.cfg, t.info, t.built
    assert t.net is not None
    tc = cfg.train
    ctx.generator = _reseed(_epoch_seed(cfg.seed, epoch, info.rank), info.device)
    ctx.epoch = epoch
    b.loader.set_epoch(epoch)
    set_train_mode(t.net, tc.freeze_bn)
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    t0, c0 = time.perf_counter(), time.process_time()
    lr = b.schedule.apply(epoch, 0)
    desc = f"epoch {epoch + 1}/{tc.epochs}"
    steps = len(b.loader)
    batches = _progress(b.loader, t.progress and info.is_main, desc, steps)
    x: torch.Tensor | None = None
    for i, (x, y) in enumerate(batches):
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = b.schedule.apply(epoch, i)
        try:
            metrics = t.objective.train_step(t.net, x, y, ctx)
        except NonFiniteLossError as exc:
            loss = exc.what or "the training loss is NaN/Inf"
            first = ctx.global_step == 0
            raise _diverged(t, epoch, f"step {i + 1}/{steps}", lr, loss, first=first) from exc
        except EvaluationError as exc:  # e.g. the inner attack refusing NaN/Inf logits
            # the first step of a run has not updated anything: the attack's error stands
            found = None if ctx.global_step == 0 else _non_finite(b.module, x, "training")
            if found is None:
                raise
            raise _diverged(t, epoch, f"step {i + 1}/{steps}", lr, found) from exc
        ctx.global_step += 1
        n = len(y)
        seen += n
        for k, v in metrics.items():
            v = v.detach().double() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + v.cpu() * n
    if x is not None:  # the epoch's last update may have blown up what is about to be saved
        _check_finite_after_epoch(t, x, epoch, f"after its last step ({steps}/{steps})", lr)
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


def _non_finite(module: nn.Module, x: torch.Tensor, images: str) -> str | None:
    """What of ``module`` is NaN/Inf: its parameters or buffers, else its outputs on ``x`` in
    eval mode (no gradient, the modules' train/eval flags and the CPU RNG restored afterwards);
    None when everything is finite, or when the forward itself fails (nothing to diagnose)."""
    named = itertools.chain(module.named_parameters(), module.named_buffers())
    bad = [n for n, v in named if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        return f"the weights are NaN/Inf ({', '.join(bad[:3])}{more})"
    modes = [(m, m.training) for m in module.modules()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            module.eval()
            out = module(x)
    except Exception:  # noqa: BLE001 - only a diagnosis: the caller's own error stands
        log.debug("forward for the non-finite check failed", exc_info=True)
        return None
    finally:
        for m, mode in modes:
            m.training = mode
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        if not bool(torch.isfinite(out).all()):
            return f"the model's outputs on the {images} images are NaN/Inf"
    return None


def _check_finite_after_epoch(
    t: _Training, x: torch.Tensor, epoch: int, where: str, lr: float
) -> None:
    """Raise the divergence error (on every rank) if the weights, or the outputs on the last
    training batch ``x``, became NaN/Inf: checked before the epoch is validated and saved, so
    diverged weights never replace the ``last`` / ``best`` checkpoints."""
    what = _non_finite(t.built.module, x, "training")
    flag = torch.tensor([0.0 if what is None else 1.0], dtype=torch.float64, device=x.device)
    if float(D.all_reduce_sum(t.info, flag)[0]) > 0:
        what = what or "the model's outputs are NaN/Inf on another process"
        raise _diverged(t, epoch, where, lr, what)


def _diverged(
    t: _Training, epoch: int, where: str, lr: float, what: str, *, first: bool = False
) -> NonFiniteLossError:
    """The one error for a run whose loss, weights or outputs became NaN/Inf at 0-based
    ``epoch`` (``where`` in it): what happened, what is kept on disk and what to do.
    ``first``: at the run's very first step, before any update — not a divergence."""
    tc = t.cfg.train
    fp32 = f"train.precision=fp32 (now {tc.precision})" if tc.precision != "fp32" else None
    if first:
        hint = "; or " + fp32 if fp32 else ""
        return NonFiniteLossError(
            f"training cannot start: {what} at epoch {epoch + 1}/{tc.epochs}, {where}, before "
            "any parameter update, so the model or its inputs give non-finite values from the "
            f"outset: check the model's initialisation and the data{hint}. No checkpoint was "
            "written",
            what,
        )
    fixes = [f"a lower train.lr ({lr:.3g} at that step)"]
    if tc.grad_clip is None:
        fixes.append("train.grad_clip (e.g. 1.0)")
    else:
        fixes.append(f"a smaller train.grad_clip (now {tc.grad_clip:g})")
    if fp32:
        fixes.append(fp32)
    if tc.warmup_epochs == 0 and tc.epochs > 1:
        fixes.append("a warm-up (train.warmup_epochs=1)")
    if epoch == 0:
        kept = "no checkpoint had been written yet"
        then = "then start over (fortify train --overwrite, fit(mode='overwrite'))"
    else:
        kept = (
            f"the last good checkpoint is kept ('last' and its state stay at epoch {epoch}; "
            f"nothing of epoch {epoch + 1} was saved)"
        )
        then = (
            f"then continue from epoch {epoch} (fortify train --resume {t.run_dir} --force "
            "--set train.lr=..., fit(mode='resume', force=True)) or start over (--overwrite)"
        )
    return NonFiniteLossError(
        f"training diverged at epoch {epoch + 1}/{tc.epochs}, {where}: {what}; {kept}. "
        f"Try {', '.join(fixes[:-1])} or {fixes[-1]}; {then}",
        what,
    )


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
    "EPOCH_BASE",
    "FitResult",
    "apply_trainable",
    "check_resume_world_size",
    "check_state",
    "config_diff",
    "fit",
    "probe_model",
    "training_changes",
]
