"""Independent replication jobs in N worker processes (``fortify replicate NAME --workers N``).

A replication plugin that can be split exposes ``jobs(args) -> list[Job]``: independent pieces
(e.g. one per (row, seed)), each a complete ``fortify ...`` command line that is itself
resumable (finished training and evaluations are reused). :func:`run_jobs` runs them in ``N``
processes with the CPU cores split between them (``OMP_NUM_THREADS`` = cores // N) and, on a GPU
machine, one GPU per worker (``CUDA_VISIBLE_DEVICES``); each job's output goes to its own log
file and the caller sees one progress display. The plugin then runs once more in-process: every
piece is finished, so it only assembles the table.

Re-running the same command after an interruption resumes: finished jobs return at once.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fortify.errors import ConfigError, FortifyError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Job:
    """One independent piece of a replication: ``fortify <argv>`` (label names it in logs)."""

    label: str
    argv: tuple[str, ...]


@dataclass
class JobResult:
    """How a job ended: ``returncode`` 0 is success; ``log`` holds its stdout and stderr."""

    job: Job
    returncode: int
    seconds: float
    log: Path


class JobsFailedError(FortifyError):
    """Some jobs of a parallel replication failed (their logs say why)."""


def check_workers(workers: object) -> int:
    """``workers`` as an int >= 1, else :class:`ConfigError`."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be an integer >= 1, got {workers!r}")
    return workers


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """The cores split between ``workers`` processes (at least one thread each)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // workers)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA: CPU workers
        return 0


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def run_jobs(
    jobs: list[Job],
    workers: int,
    log_dir: str | Path,
    *,
    threads: int | None = None,
    progress: bool | None = None,
) -> list[JobResult]:
    """Run ``jobs`` with at most ``workers`` at a time; one progress bar; logs in ``log_dir``.

    Args:
        threads: intra-op threads per worker (None: the machine's cores split evenly).
        progress: tqdm bar over jobs (None: only when stderr is a TTY).

    Returns:
        one :class:`JobResult` per job, in the order of ``jobs``.

    Raises:
        JobsFailedError: after every job has ended, if any failed (naming them and their logs).
    """
    from tqdm.auto import tqdm

    workers = check_workers(workers)
    threads = threads or threads_per_worker(workers)
    gpus = _gpu_count()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = list(enumerate(jobs))
    running: dict[int, tuple[subprocess.Popen[bytes], float, Path, IO[str], int]] = {}
    results: dict[int, JobResult] = {}
    free_slots = list(range(workers))
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    bar = tqdm(total=len(jobs), desc="jobs", disable=disable)
    log.info(
        "%d job(s) in %d worker(s), %d thread(s) each%s",
        len(jobs),
        workers,
        threads,
        f", GPUs {gpus}" if gpus else "",
    )
    try:
        while pending or running:
            while pending and free_slots:
                i, job = pending.pop(0)
                slot = free_slots.pop(0)
                env = {
                    **os.environ,
                    "OMP_NUM_THREADS": str(threads),
                    "MKL_NUM_THREADS": str(threads),
                }
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                path = log_dir / f"{i:02d}-{_safe(job.label)}.log"
                fh: IO[str] = path.open("w")
                cmd = [sys.executable, "-m", "fortify.cli.main", *job.argv]
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
                running[i] = (proc, time.perf_counter(), path, fh, slot)
                log.info("started %s (log %s)", job.label, path)
                bar.set_postfix_str(", ".join(jobs[k].label for k in sorted(running)))
            time.sleep(POLL_SECONDS)
            for i in [k for k, v in running.items() if v[0].poll() is not None]:
                proc, t0, path, fh, slot = running.pop(i)
                fh.close()
                free_slots.append(slot)
                rc = int(proc.returncode)
                results[i] = JobResult(jobs[i], rc, time.perf_counter() - t0, path)
                (log.info if rc == 0 else log.error)(
                    "%s %s in %.0f s (log %s)",
                    jobs[i].label,
                    "finished" if rc == 0 else f"FAILED (exit {rc})",
                    results[i].seconds,
                    path,
                )
                bar.update(1)
                bar.set_postfix_str(", ".join(jobs[k].label for k in sorted(running)))
    finally:
        for proc, _, _, fh, _ in running.values():  # interrupted: stop our own children
            proc.terminate()
            proc.wait()
            fh.close()
        bar.close()
    out = [results[i] for i in range(len(jobs))]
    failed = [r for r in out if r.returncode != 0]
    if failed:
        raise JobsFailedError(
            f"{len(failed)} of {len(out)} job(s) failed: "
            + "; ".join(f"{r.job.label} (exit {r.returncode}, log {r.log})" for r in failed)
            + ". Fix the cause and re-run the same command: finished jobs are reused"
        )
    return out
