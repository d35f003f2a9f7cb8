"""Two-process DistributedDataParallel (gloo, CPU) through the real CLI under torchrun."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from test_train_loop import BASE, assert_same_state

from fortify.runs import RunDir, load_model, read_checkpoint
from fortify.train.state import load_state

TINY = [*BASE, "train.objective=trades"]  # the single-process loop tests' tiny setup
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> list[str]:
    """``fortify train ARGS`` as 2 gloo processes under ``python -m torch.distributed.run``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "fortify.cli.main", "train", "--no-progress", *args,
    ]  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_torchrun(*args), capture_output=True, text=True, timeout=170, env=ENV)
    errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error:" in ln]
    assert proc.returncode == 0, "\n".join(errors[-20:]) or proc.stderr[-3000:]
    return proc


def test_two_process_gloo_run_trains_and_rank0_checkpoint_loads(tmp_path):
    run_dir = tmp_path / "ddp"
    proc = _run("--run-dir", str(run_dir), *TINY, "data.train_subset=400", "train.epochs=2")
    assert proc.stdout.count("run: ") == 1  # only rank 0 reports
    records = RunDir(run_dir).read_metrics()
    assert [r["epoch"] for r in records] == [1, 2]  # rank 0 logs once per epoch
    assert records[-1]["train/samples"] == 400  # two shards of 200 cover the subset
    assert records[-1]["val/n"] == 100  # sharded validation, counts all-reduced
    model, meta = load_model(run_dir, tag="last")
    assert meta["world_size"] == 2 and meta["epoch"] == 2
    x = torch.rand(4, 1, 8, 8)
    assert model(x).shape == (4, 10)
    assert RunDir(run_dir).state == "finished"


def _descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (from /proc; torchrun starts workers in their own sessions)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent started with ``start_new_session=True`` and all its workers."""
    workers = _descendants(proc.pid)  # each leads its own session (torchrun's Popen)
    for pgid in [proc.pid, *workers]:  # the agent first, so it cannot react
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers):  # orphans: reaped by init, not by us
        assert time.monotonic() < deadline, "killed workers did not exit"
        time.sleep(0.01)


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (from /proc)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes() and _alive(int(cmdline.parent.name)):
                out.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return out


def _wait_until_unlocked(run_dir: Path) -> None:
    """Kill whatever still runs on ``run_dir`` and wait until its lock file is free: a resume
    that follows must find the run as a killed job leaves it, not one still being written."""
    deadline = time.monotonic() + 60
    while True:
        fd = os.open(run_dir / ".fortify.lock", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = _processes_mentioning(str(run_dir))
            assert time.monotonic() < deadline, f"{run_dir} still locked; live writers: {left}"
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        finally:
            os.close(fd)


def _kill_after_first_epoch(cmd: list[str], run_dir: Path) -> None:
    """Run ``cmd`` in its own session and SIGKILL it as soon as epoch 1 is in the metrics."""
    proc = subprocess.Popen(
        cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not RunDir(run_dir).read_metrics():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no epoch finished within 120 s"
            time.sleep(0.01)
    finally:
        _kill_tree(proc)
        proc.stderr.close()
    _wait_until_unlocked(run_dir)


def _last_epoch(run_dir: Path) -> int:
    return int(read_checkpoint(run_dir / "checkpoints" / "last.safetensors")[2]["epoch"])


def kill_two_process_run(tmp_path: Path, config: list[str]) -> tuple[Path, int, int]:
    """Start ``config`` as 2 processes under torchrun and SIGKILL them after the first epoch.

    A kill that lands after the run has finished would prove nothing: then retry with more
    epochs (each epoch takes ~0.2 s here, the kill follows the first epoch's record at once).
    Returns ``(run_dir, epochs, last checkpointed epoch)``; ``train.epochs`` is set here.
    """
    for epochs in (6, 12, 24):
        cut = tmp_path / f"cut-{epochs}"
        cmd = _torchrun("--run-dir", str(cut), *config, f"train.epochs={epochs}")
        _kill_after_first_epoch(cmd, cut)
        if RunDir(cut).state != "finished" and _last_epoch(cut) < epochs:
            break
    else:
        raise AssertionError("every run finished before it could be killed")
    killed_at = _last_epoch(cut)
    assert RunDir(cut).state == "running"  # SIGKILL: no chance to record "failed"
    assert 1 <= killed_at < epochs
    assert [r["epoch"] for r in RunDir(cut).read_metrics()][-1] <= killed_at
    return cut, epochs, killed_at


def test_two_process_run_killed_mid_training_resumes_bit_identically(tmp_path):
    cut, epochs, killed_at = kill_two_process_run(tmp_path, [*TINY, "data.train_subset=1000"])
    config = [*TINY, "data.train_subset=1000", f"train.epochs={epochs}"]

    proc = _run("--resume", str(cut))
    assert f"epochs trained now: {epochs - killed_at} (of {epochs})" in proc.stdout
    full = tmp_path / "full"
    _run("--run-dir", str(full), *config)

    assert RunDir(cut).state == "finished"
    assert [r["epoch"] for r in RunDir(cut).read_metrics()] == list(range(1, epochs + 1))
    a, _, meta_a = read_checkpoint(full / "checkpoints" / "last.safetensors")
    b, _, meta_b = read_checkpoint(cut / "checkpoints" / "last.safetensors")
    assert meta_a["epoch"] == meta_b["epoch"] == epochs
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a killed + resumed DDP run"
    assert meta_a["metrics"]["val/clean"] == meta_b["metrics"]["val/clean"]
    assert meta_a["metrics"]["train/loss"] == meta_b["metrics"]["train/loss"]
    sa = load_state(full / "checkpoints" / "last.safetensors", epochs)
    sb = load_state(cut / "checkpoints" / "last.safetensors", epochs)
    for key in ("optimizer", "schedule", "rng", "best_metric", "best_epoch"):
        assert_same_state(sa[key], sb[key], key)


# The FPD structure before the release one (its phase mix at T = 0.1 is what the test needs).
FPD_EARLIER = (
    "width: 8, pyramid: denoised, decoder: activated, bn_stats: per-pass, denoise_scale: nc"
)


def test_two_process_fpd_run_takes_the_same_phase_on_every_rank(tmp_path):
    """FPD decides phase 1 / phase 2 per step from the restoration loss; the decision uses the
    loss averaged over ranks, otherwise ranks would take different numbers of DDP steps."""
    run_dir = tmp_path / "fpd"
    _run(
        "--run-dir", str(run_dir), *BASE, "data.train_subset=256", "train.epochs=2",
        "model.name=small-resnet", f"defenses=[{{kind: fpd, options: {{{FPD_EARLIER}}}}}]",
        "train.objective=fpd", "train.optimizer=adam", "train.lr=0.003",
        "train.options={threshold: 0.1}", "train.val_attack_steps=0",
    )  # fmt: skip
    records = RunDir(run_dir).read_metrics()
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["train/samples"] == 256
    # both phases ran in the second epoch (a quarter of the steps in phase 2 on this setup)
    assert 0.0 < records[-1]["train/fpd_phase2"] < 1.0
