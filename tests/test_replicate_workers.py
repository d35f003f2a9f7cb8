"""``fortify replicate NAME --workers N``: independent jobs in worker processes, resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fortify.errors import ConfigError
from fortify.replicate.workers import (
    Job,
    JobsFailedError,
    check_workers,
    run_jobs,
    threads_per_worker,
)

TINY = [
    "--epochs", "1", "--train-subset", "256", "--width", "2", "--fsr-hidden", "4",
    "--batch-size", "64", "--attack-steps", "1", "--test-points", "16", "--aa-points", "0",
    "--no-checks",
]  # fmt: skip


def test_cores_split_and_bad_worker_counts():
    assert threads_per_worker(2, cores=8) == 4 and threads_per_worker(3, cores=2) == 1
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="--workers must be an integer >= 1"):
            check_workers(bad)


def test_failed_job_is_named_with_its_log_and_the_others_finish(tmp_path):
    jobs = [
        Job("ok", ("report", "--help")),
        Job("bad target", ("eval", str(tmp_path / "missing"))),
    ]
    with pytest.raises(JobsFailedError) as exc:
        run_jobs(jobs, 2, tmp_path / "logs", threads=1, progress=False)
    msg = str(exc.value)
    assert "1 of 2 job(s) failed" in msg and "bad target (exit 2" in msg and "re-run" in msg
    log = next((tmp_path / "logs").glob("01-bad_target.log")).read_text()
    assert "does not exist" in log
    assert "usage:" in next((tmp_path / "logs").glob("00-ok.log")).read_text()


def _replicate(out, *extra, threads=1):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "fortify.cli.main", "replicate", "fsr-table1", *TINY]
    cmd += ["--out", str(out), "--doc", str(out) + ".md", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_fsr_table1_two_workers_equal_two_manual_processes(tmp_path):
    threads = threads_per_worker(2)
    # by hand: two processes with disjoint rows, then the table from the finished rows
    manual = tmp_path / "manual"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    base = [sys.executable, "-m", "fortify.cli.main", "replicate", "fsr-table1", *TINY]
    base += ["--out", str(manual), "--doc", str(manual) + ".md"]
    procs = [
        subprocess.Popen(
            [*base, "--rows", row],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for row in ("at", "at-fsr")
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:] if p.stderr else ""
    _replicate(manual, "--rows", "at,at-fsr", threads=threads)
    # the same with --workers 2
    par = tmp_path / "workers"
    out = _replicate(par, "--rows", "at,at-fsr", "--workers", "2").stdout
    assert "2 job(s) finished in 2 worker(s)" in out
    a = json.loads((manual / "fsr_table1.json").read_text())["jobs"]
    b = json.loads((par / "fsr_table1.json").read_text())["jobs"]
    assert list(a) == list(b) == ["at/seed-0", "at-fsr/seed-0"]
    for job in a:
        assert a[job]["final_epoch"]["train/loss"] == b[job]["final_epoch"]["train/loss"], job
    table = [ln for ln in (tmp_path / "manual.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(table) >= 4  # header, rule and the two rows
    assert table == [
        ln for ln in (tmp_path / "workers.md").read_text().splitlines() if ln.startswith("| ")
    ]
    # the page says how it was run: the command with --workers and the processes/threads
    page = (tmp_path / "workers.md").read_text()
    assert "--workers 2" in page
    assert f"2 worker processes running one (row, seed) job each at a time, {threads} " in page
    manual_page = (tmp_path / "manual.md").read_text()
    assert "--workers" not in manual_page and "one process, " in manual_page
    assert json.loads((par / "fsr_table1.json").read_text())["settings"]["workers"] == 2
    logs = sorted(p.name for p in (par / "jobs").glob("*.log"))
    assert logs == ["00-at.log", "01-at-fsr.log"]
    # resumable: a second call reuses both finished jobs (no training, cached evaluations)
    again = _replicate(par, "--rows", "at,at-fsr", "--workers", "2")
    assert "finished run reused" in (par / "jobs" / "00-at.log").read_text()
    c = json.loads((par / "fsr_table1.json").read_text())["jobs"]
    assert all(j["training"] == "reused" and j["evaluation"] == "reused" for j in c.values())
    assert "2 job(s) finished" in again.stdout


def test_estimate_with_workers_measures_and_starts_no_job(tmp_path):
    out = tmp_path / "est"
    proc = _replicate(out, "--rows", "at", "--workers", "2", "--estimate")
    assert "estimated total" in proc.stdout
    assert not (out / "jobs").exists() and not (out / "at").exists()
