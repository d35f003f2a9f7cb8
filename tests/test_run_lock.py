"""Run directories are locked (one writer at a time) and write failures while checkpointing —
a full disk included — surface as RunDirError with the previous 'last' checkpoint intact."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from fortify.config import ExperimentConfig, load_config
from fortify.errors import RunDirError
from fortify.runs import RunDir, load_checkpoint, read_sidecar
from fortify.runs import lock as lock_module
from fortify.runs.lock import LOCK_NAME
from fortify.train import fit
from fortify.train.state import load_state

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = [
    "name=tiny",
    "device=cpu",
    "data.name=digits",
    "data.val_size=100",
    "data.train_subset=256",
    "model.kwargs={width: 4}",
    "train.batch_size=64",
    "train.lr=0.05",
    "train.milestones=[1]",
    "train.attack.eps=0.1",
    "train.attack.step_size=0.04",
    "train.attack.steps=1",
    "train.val_points=32",
    "train.val_attack_steps=1",
]


def _cfg(*extra: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, None, TINY + list(extra))


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _start_together(procs: list[subprocess.Popen], go: Path, timeout: float = 300) -> None:
    """Touch ``go`` once every process has written its ``<go>.ready-<pid>`` file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [Path(f"{go}.ready-{p.pid}").exists() or p.poll() is not None for p in procs]
        if all(ready):
            break
        time.sleep(0.01)
    go.touch()


# Waits for a "go" file so that both processes start the contested step at the same instant.
WAIT = """
import os, sys, time, pathlib
go = pathlib.Path(sys.argv[2])
pathlib.Path(f"{go}.ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.001)
"""
OPEN_NEW = (
    """
import sys, time, pathlib
from fortify.runs import RunDir
from fortify.errors import RunDirError
"""
    + WAIT
    + """
try:
    run = RunDir.open(sys.argv[1], mode="new", config={"who": sys.argv[3]})
except RunDirError as exc:
    print("REFUSED", exc)
    sys.exit(2)
run.log_metrics({"epoch": 0, "who": sys.argv[3]})
time.sleep(0.5)  # hold the run for a while, as a real writer does
print("OPENED")
"""
)


@pytest.mark.parametrize("trial", range(2))
def test_two_processes_creating_one_run_exactly_one_proceeds(tmp_path: Path, trial: int) -> None:
    run, go = tmp_path / "run", tmp_path / "go"
    procs = [_python(OPEN_NEW, str(run), str(go), who) for who in ("a", "b")]
    _start_together(procs, go)
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = next(o for o, p in zip(outs, procs) if p.returncode == 2)[0]
    assert "REFUSED" in refused and str(run) in refused
    assert "is in use by process" in refused or "already holds a run" in refused
    winner = RunDir(run).read_config()["who"]
    assert RunDir(run).read_metrics() == [{"epoch": 0, "who": winner}]


RESUME = (
    """
import sys, time, pathlib
from fortify.cli.main import main
import fortify.train
"""
    + WAIT
    + """
sys.exit(main(["train", "--resume", sys.argv[1], "--no-progress"]))
"""
)


def test_two_processes_resuming_one_run_exactly_one_proceeds(tmp_path: Path) -> None:
    # the winner trains long enough that a loser delayed by a loaded machine still meets its lock
    run, go = tmp_path / "run", tmp_path / "go"
    cfg = _cfg("train.epochs=4", "data.train_subset=2048", "train.val_points=64")

    def stop(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, run, progress=False, callbacks=[stop])
    procs = [_python(RESUME, str(run), str(go)) for _ in range(2)]
    _start_together(procs, go)
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(o for o, p in zip(outs, procs) if p.returncode == 2)[1]
    assert "fortify train: error:" in loser and "in use by process" in loser, loser
    assert "Traceback" not in loser
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1, 2, 3, 4]
    assert RunDir(run).state == "finished"
    assert read_sidecar(run / "checkpoints" / "last.safetensors")["epoch"] == 4


HOLD = """
import sys, time
from fortify.runs import RunDir
run = RunDir.open(sys.argv[1], mode="resume")
print("HELD", flush=True)
time.sleep(60)
"""


def test_a_held_run_is_refused_naming_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock_module, "STALE_GRACE_S", 0.5)  # the inheriting child never exits
    run = tmp_path / "run"
    RunDir.open(run, config={"v": 1}).close()
    holder = _python(HOLD, str(run))
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(RunDirError, match=rf"in use by process {holder.pid}"):
            RunDir.open(run, mode="resume")
        with pytest.raises(RunDirError, match="in use"):
            RunDir.open(run, mode="overwrite")  # never moves a running run aside
        with pytest.raises(RunDirError, match="in use"):
            RunDir.lock(run)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
        # The lock file claims a process that has exited while the lock is still held (a
        # child that inherited it): the message says so and how to find the holder.
        info = json.loads((run / LOCK_NAME).read_text())
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
        info["pid"] = int(dead.stdout)
        (run / LOCK_NAME).write_text(json.dumps(info))
        with pytest.raises(RunDirError, match=r"has exited.*fuser"):
            RunDir.open(run, mode="resume")
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the lock of the killed holder: the run opens again
    RunDir.open(run, mode="resume").close()


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    RunDir.open(run, config={"v": 1}).close()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    record = {"pid": int(dead.stdout), "host": "here", "command": "fortify train (killed)"}
    (run / LOCK_NAME).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="fortify.runs"):
        reopened = RunDir.open(run, mode="resume")
    assert "stale lock" in caplog.text and str(record["pid"]) in caplog.text
    assert reopened.locked
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    reopened.close()
    assert (run / LOCK_NAME).read_text() == ""  # released cleanly: nothing stale left


# The holder takes the lock, forks a child that keeps the lock file open for a moment, and dies
# by SIGKILL: the state right after `kill -9` of a run whose forked workers are still exiting.
KILLED_WITH_A_LINGERING_CHILD = """
    import os, signal, sys, time
    from fortify.runs import RunDir
    run = RunDir.open(sys.argv[1], mode="resume")
    if os.fork() == 0:
        time.sleep(1.5)
        os._exit(0)
    print("HELD", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_holder_whose_child_is_still_exiting_is_waited_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    RunDir.open(run, config={"v": 1}).close()
    holder = _python(KILLED_WITH_A_LINGERING_CHILD, str(run))
    assert holder.stdout.readline().strip() == "HELD"
    holder.wait()
    fd = os.open(run / LOCK_NAME, os.O_RDONLY)
    try:  # the child still holds the lock file open, hence the lock
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    with caplog.at_level(logging.WARNING, logger="fortify.runs"):
        reopened = RunDir.open(run, mode="resume")  # waits for the child, then takes over
    assert "stale lock" in caplog.text and str(holder.pid) in caplog.text
    reopened.close()


def test_threads_of_one_process_cannot_both_start_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    results: list[str] = []
    barrier = threading.Barrier(4)

    def start(i: int) -> None:
        barrier.wait()
        try:
            RunDir.open(run, mode="new", config={"who": i})
            results.append("ok")
        except RunDirError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1, results
    assert all("already holds a run" in r for r in results if r != "ok")


def test_fit_releases_the_lock_even_when_training_fails(tmp_path: Path) -> None:
    run = tmp_path / "run"

    def crash(epoch, record):
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        fit(_cfg("train.epochs=2"), run, progress=False, callbacks=[crash])
    # the same process (and any other) can resume at once
    result = fit(_cfg("train.epochs=2"), run, mode="resume", progress=False)
    assert result.epochs_run == 1
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1, 2]


# ----------------------------------------------------------------------------- disk full

DISK_FULL = """
import resource, signal, sys, json
import fortify.train.checkpointer as checkpointer
from fortify.config import ExperimentConfig, load_config
from fortify.errors import RunDirError
from fortify.train import fit

run, where, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as the CLI does: EFBIG instead of a kill
LIMIT = 2048  # bytes per file: below the size of either file of a checkpoint

def full_disk():
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))

if where == "state":  # the disk fills up after epoch 1: the torch.save state file fails
    callbacks = [lambda epoch, record: full_disk()]
else:  # the state file still fits; the safetensors weights do not
    callbacks = []
    real = checkpointer.save_state
    def save_state(checkpoint, epoch, state):
        out = real(checkpoint, epoch, state)
        if epoch == 2:  # epochs are numbered from 1
            full_disk()
        return out
    checkpointer.save_state = save_state
cfg = load_config(ExperimentConfig, None, overrides)
try:
    fit(cfg, run, progress=False, callbacks=callbacks)
except RunDirError as exc:
    print("RunDirError:", exc)
    sys.exit(2)
print("no error")
"""


@pytest.mark.parametrize("where", ["state", "weights"])
def test_disk_full_while_checkpointing(tmp_path: Path, where: str) -> None:
    run = tmp_path / "run"
    overrides = [*TINY, "train.epochs=3"]
    proc = _python(DISK_FULL, str(run), where, json.dumps(overrides))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (out, err)
    assert "RunDirError" in out and "the previous 'last' checkpoint is intact" in out, out
    assert ("File too large" in out) or ("unexpected pos" in out), out
    ckpt = run / "checkpoints"
    names = sorted(p.name for p in ckpt.iterdir())
    # no temporary files, no state file of the epoch that was not saved
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")], names
    assert "last.state-2.pt" not in names, names
    # both files of the previous 'last' (epoch 1) are intact and consistent
    model, _ = __import__("fortify.runs", fromlist=["load_model"]).load_model(run, tag="last")
    meta = load_checkpoint(ckpt / "last.safetensors", model)
    assert meta["epoch"] == 1
    state = load_state(ckpt / "last.safetensors", 1)
    assert state["epoch"] == 1 and isinstance(state["optimizer"], dict)
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1]
    # ... and the run resumes from there once space is back
    result = fit(load_config(ExperimentConfig, None, overrides), run, mode="resume", progress=False)
    assert result.epochs_run == 2
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1, 2, 3]
    assert torch.isfinite(torch.tensor([r["train/loss"] for r in result.history])).all()
