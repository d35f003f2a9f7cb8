"""Injected faults: a full disk part-way through a write, kills and signals during training,
files left by killed writers. Nothing already saved is lost or truncated, errors name the file
that could not be written, and a resume ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_runs import cli_err, snapshot, tiny_config

from fortify.config import ExperimentConfig, from_dict, load_config, to_dict
from fortify.errors import RunDirError
from fortify.factory import build_model
from fortify.runs import RunDir, load_checkpoint, read_sidecar, save_checkpoint
from fortify.train import fit

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENOSPC = os.strerror(errno.ENOSPC)


# ----------------------------------------------------------------------------- helpers


class _HalfWriter:
    """A file opened for writing whose first ``write`` writes half of the data, then fails as
    a full disk does."""

    def __init__(self, fh: Any):
        self._fh = fh

    def write(self, data: Any) -> int:
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise OSError(errno.ENOSPC, ENOSPC)

    def __getattr__(self, key: str) -> Any:
        return getattr(self._fh, key)

    def __enter__(self) -> _HalfWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def _full_disk(monkeypatch: pytest.MonkeyPatch, under: Path, spare: int = 0) -> list[str]:
    """From now on, files opened for writing under ``under`` (after the first ``spare`` of
    them) get half their bytes, then ENOSPC. Returns the names of the files that failed."""
    real = io.open
    failed: list[str] = []
    opened = [0]

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real(file, mode, *args, **kwargs)
        inside = isinstance(file, (str, os.PathLike)) and str(Path(file).resolve()).startswith(
            str(under.resolve())
        )
        if inside and any(c in mode for c in "wax+"):
            opened[0] += 1
            if opened[0] > spare:
                failed.append(Path(file).name)
                return _HalfWriter(fh)
        return fh

    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(builtins, "open", fake_open)
    return failed


def _temp_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if ".tmp" in p.name)


def _cfg(folder: Path, *overrides: str) -> ExperimentConfig:
    """The tiny config, three epochs."""
    path = folder / "tiny.yaml"
    path.write_text(tiny_config(3))
    return load_config(ExperimentConfig, path, list(overrides))


@pytest.fixture()
def two_checkpoints(tmp_path: Path) -> Path:
    """A run folder with different weights in ``best`` and ``last`` (no training)."""
    cfg = from_dict(
        ExperimentConfig,
        {"name": "tiny", "data": {"name": "digits"}, "model": {"name": "small-cnn"}},
    )
    cfg.model.kwargs = {"width": 4}
    meta = {"config": to_dict(cfg), "num_classes": 10, "image_shape": [1, 8, 8]}
    with RunDir.open(tmp_path / "run", mode="new", config=to_dict(cfg)) as rd:
        for seed, tag in ((0, "best"), (1, "last")):
            torch.manual_seed(seed)
            model = build_model(cfg.model, cfg.defenses, 10, (1, 8, 8))
            save_checkpoint(rd.checkpoint_path(tag), model, meta)
    return tmp_path / "run"


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_names_the_file_not_its_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fortify.utils.atomic import atomic_write_text

    target = tmp_path / "report.md"
    atomic_write_text(target, "first version\n")
    _full_disk(monkeypatch, tmp_path)
    with pytest.raises(OSError) as info:
        atomic_write_text(target, "second version, longer than the first\n")
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "first version\n"
    assert _temp_files(tmp_path) == []


def test_a_metrics_line_cut_short_by_a_full_disk_is_taken_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunDir.open(tmp_path / "run", config={"train": {"epochs": 3}})
    run.log_metrics({"epoch": 1, "loss": 2.5})
    run.log_metrics({"epoch": 2, "loss": 2.25})
    before = run.metrics_path.read_bytes()
    _full_disk(monkeypatch, tmp_path)
    with pytest.raises(RunDirError, match=rf"metrics\.jsonl \({ENOSPC}\).*intact"):
        run.log_metrics({"epoch": 3, "loss": 2.0, "note": "x" * 200})
    monkeypatch.undo()
    assert run.metrics_path.read_bytes() == before  # no half line appended
    with caplog.at_level(logging.WARNING):
        run.log_metrics({"epoch": 3, "loss": 2.0})
        assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3]
    assert "not valid JSON" not in caplog.text
    run.close()


def test_a_full_disk_while_logging_metrics_during_training_then_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    saved: dict[str, bytes] = {}
    real_log = RunDir.log_metrics

    def log_on_a_full_disk(self: RunDir, record: Any) -> None:
        with pytest.MonkeyPatch.context() as mp:
            _full_disk(mp, run)
            real_log(self, record)

    def fill_disk_after_epoch_1(epoch: int, record: dict[str, Any]) -> None:
        if epoch == 1:  # epoch 2 writes its state and checkpoints, then its metrics line fails
            saved.update(snapshot(run))
            monkeypatch.setattr(RunDir, "log_metrics", log_on_a_full_disk)

    with pytest.raises(RunDirError, match=rf"metrics\.jsonl \({ENOSPC}\)"):
        fit(_cfg(tmp_path), run, progress=False, callbacks=[fill_disk_after_epoch_1])
    monkeypatch.undo()
    # the epoch-1 line is byte for byte what it was; no temporary file is left
    assert (run / "metrics.jsonl").read_bytes() == saved["metrics.jsonl"]
    assert _temp_files(run) == []
    result = fit(_cfg(tmp_path), run, mode="resume", progress=False)
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1, 2, 3]
    assert result.epochs_run == 1  # epoch 2 was checkpointed before its line failed


def test_an_export_cut_short_by_a_full_disk_keeps_the_earlier_export(
    two_checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from fortify.interop.robustbench import load_robustbench_export

    out = tmp_path / "rb"
    argv = ["export", "robustbench", str(two_checkpoints), "--out", str(out), "--name", "A"]
    assert cli_err(capsys, *argv)[0] == 0
    before = snapshot(out)
    model_before, _ = load_robustbench_export(out, name="A", dataset="digits")
    for spare in (0, 1):  # the first file written fails, then the second one
        failed = _full_disk(monkeypatch, out, spare=spare)
        rc, err = cli_err(capsys, *argv, "--overwrite", "--tag", "last")
        monkeypatch.undo()
        assert rc == 2 and len(failed) == 1, err
        target = re.sub(r"^\.(.+)\.[a-z0-9_]{8}\.tmp$", r"\1", failed[0])  # A.pt or A.json
        assert f"/{target}: {ENOSPC}" in err, err
        assert ".tmp" not in err, err
        assert snapshot(out) == before
        assert _temp_files(out) == []
        model, _ = load_robustbench_export(out, name="A", dataset="digits")
        for k, v in model.state_dict().items():
            assert torch.equal(v, model_before.state_dict()[k])


def test_export_checks_its_folder_first(two_checkpoints: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["export", "robustbench", str(two_checkpoints), "--out", str(blocker), "--name", "A"]
    rc, err = cli_err(capsys, *argv)
    assert rc == 2 and "export folder (--out)" in err and "is a file" in err, err
    assert blocker.read_text() == "x"


def test_a_full_disk_while_writing_the_training_state_says_so(tmp_path: Path) -> None:
    """torch.save reports a failed write as "unexpected pos"; the message gives the reason."""
    code = """
        import resource, signal, sys
        from pathlib import Path
        import torch
        from fortify.errors import RunDirError
        from fortify.train.state import save_state
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            save_state(Path(sys.argv[1]) / "last.safetensors", 2, {"x": torch.zeros(100_000)})
        except RunDirError as exc:
            print(exc)
    """
    out = _python(code, str(tmp_path))
    assert "last.state-2.pt" in out and "File too large" in out, out
    assert "unexpected pos" not in out and _temp_files(tmp_path) == []


# ----------------------------------------------------------------------------- leftovers


def test_temporary_files_of_a_killed_writer_do_not_block_a_new_run(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".config.yaml.k1ll3d_0.tmp").write_text("name: half")  # killed before its rename
    with RunDir.open(folder, mode="new", config={"name": "x"}) as run:
        assert run.read_config() == {"name": "x"}
    assert sorted(p.name for p in folder.iterdir()) == [".fortify.lock", "config.yaml"]


def test_a_resume_removes_temporary_files_a_killed_writer_left(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    leftovers = [
        ".status.json.abcd1234.tmp",
        "checkpoints/.last.safetensors.q2w3e4r5.tmp",
        "checkpoints/.last.json.z_9y8x7w.tmp",
        "checkpoints/.last.state-2.pt.mnbv0987.tmp",
        "checkpoints/.tmpA1b2C3",  # safetensors' own temporary file
    ]
    kept = ["notes.tmp", ".hidden.txt", "reports/.eval.json.abcd1234.tmp"]
    for name in leftovers + kept:
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="fortify.runs"):
        RunDir.open(run, mode="resume").close()
    assert f"removed {len(leftovers)} temporary file(s)" in caplog.text
    assert all(not (run / n).exists() for n in leftovers)
    assert all((run / n).read_bytes() == b"partial" for n in kept)
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k not in kept} == before


# ----------------------------------------------------------------------------- checkpoint bytes


def test_identical_weights_give_identical_checkpoint_files(tmp_path: Path) -> None:
    """Equal runs must give equal files (SHA-256), with the usual permissions."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    old = os.umask(0o022)
    try:
        files = [save_checkpoint(tmp_path / f"c{i}.safetensors", model, {}) for i in range(8)]
    finally:
        os.umask(old)
    assert len({p.read_bytes() for p in files}) == 1
    assert len({read_sidecar(p)["sha256"] for p in files}) == 1
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


def test_ctrl_c_between_the_two_files_of_a_checkpoint_waits_for_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if ignored here
    path = tmp_path / "last.safetensors"
    torch.manual_seed(0)
    save_checkpoint(path, torch.nn.Linear(3, 2), {"epoch": 1})
    torch.manual_seed(1)
    new = torch.nn.Linear(3, 2)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        if str(dst).endswith(".safetensors"):  # weights in place, sidecar not yet
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(path, new, {"epoch": 2})
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGINT, previous)
    check = torch.nn.Linear(3, 2)
    assert load_checkpoint(path, check)["epoch"] == 2  # the pair is complete and matches
    assert torch.equal(check.weight, new.weight)
    assert _temp_files(tmp_path) == []


# ----------------------------------------------------------------------------- kills


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    full = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.stdout + proc.stderr + f"\nexit status {proc.returncode}"


# `fortify train` that SIGKILLs itself right after the N-th os.replace onto a file matching
# PATTERN (a real kill: no cleanup, no finally blocks)
KILLED_TRAIN = """
    import fnmatch, os, signal, sys
    pattern, n = sys.argv[1], int(sys.argv[2])
    real, seen = os.replace, [0]
    def replace(src, dst):
        real(src, dst)
        if fnmatch.fnmatch(str(dst), pattern):
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    from fortify.cli.main import main
    sys.exit(main(sys.argv[3:]))
"""

# every epoch improves (select: last), so every epoch writes both 'best' and 'last'
SELECT_LAST = ["train.select=last"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 3-epoch run (every epoch saves best and last)."""
    folder = tmp_path_factory.mktemp("reference")
    fit(_cfg(folder, *SELECT_LAST), folder / "run", progress=False)
    return folder / "run"


def _killed_then_resumed(tmp_path: Path, pattern: str, n: int, capsys: Any) -> tuple[Path, str]:
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_config(3) + "  select: last\n")
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--run-dir", str(run), "--no-progress"]
    out = _python(KILLED_TRAIN, pattern, str(n), *argv)
    assert out.endswith(f"exit status {-signal.SIGKILL}"), out
    rc, err = cli_err(capsys, "train", "--resume", str(run), "--no-progress")
    assert rc == 0, err
    return run, err


def _same_result(run: Path, reference: Path) -> None:
    for tag in ("best", "last"):
        name = f"checkpoints/{tag}.safetensors"
        assert (run / name).read_bytes() == (reference / name).read_bytes(), tag
        assert read_sidecar(run / name)["epoch"] == read_sidecar(reference / name)["epoch"]
    strip = ("time/", "train/images_per_s")
    lines = [
        {k: v for k, v in r.items() if not k.startswith(strip)} for r in RunDir(run).read_metrics()
    ]
    assert lines == [
        {k: v for k, v in r.items() if not k.startswith(strip)}
        for r in RunDir(reference).read_metrics()
    ]
    assert _temp_files(run) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "pattern, n",
    [
        # between the weights and the sidecar of 'last', epoch 2
        ("*/checkpoints/last.safetensors", 2),
        # between the weights and the sidecar of 'best', epoch 2
        ("*/checkpoints/best.safetensors", 2),
        # after the first of the two checkpoints of the final epoch (3 × best + last)
        ("*/checkpoints/*.json", 5),
        # before the first checkpoint was saved (only the training state is there)
        ("*/checkpoints/last.state-1.pt", 1),
    ],
)
def test_a_run_killed_while_checkpointing_resumes_bit_identically(
    tmp_path: Path, reference: Path, capsys, pattern: str, n: int
) -> None:
    run, _ = _killed_then_resumed(tmp_path, pattern, n, capsys)
    _same_result(run, reference)


@pytest.mark.slow
def test_sigterm_stops_training_gracefully(tmp_path: Path, capsys) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_config(30))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    argv = ["train", "--config", str(config), "--run-dir", str(run), "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fortify.cli.main", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated" in err, err
    assert "Traceback" not in err
    assert RunDir(run).state == "failed"
    assert (run / ".fortify.lock").read_text() == ""  # released by the process itself
    assert _temp_files(run) == []
    done = [r["epoch"] for r in RunDir(run).read_metrics()]
    assert done and done == list(range(1, len(done) + 1)) and len(done) < 30
    rc, err = cli_err(capsys, "train", "--resume", str(run), "--no-progress")
    assert rc == 0, err
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == list(range(1, 31))


# ----------------------------------------------------------------------------- damaged files


RESUME = ["train", "--resume"]


def _half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _cut_metrics(run: Path) -> None:
    (run / "metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes()[:-30])


EXPORT = ["export", "robustbench", "{run}", "--out", "{tmp}/rb", "--name", "A"]
CKPT = Path("checkpoints")


@pytest.mark.parametrize(
    "damage, argv, rc_want, words, changes",
    [
        # recoverable: the run resumes and rewrites what it owns
        (lambda r: (r / "status.json").write_text(""), RESUME, 0, None, True),
        (lambda r: (r / "status.json").write_text('{"state": '), RESUME, 0, None, True),
        (_cut_metrics, RESUME, 0, "line 1 is not valid JSON", True),
        # refused, naming the file, changing nothing
        (lambda r: (r / "config.yaml").write_text("train: {epochs: [\n"), RESUME, 2,
         r"config\.yaml.*not valid YAML", False),
        (lambda r: _half(r / CKPT / "last.safetensors"), RESUME, 2,
         r"last\.safetensors does not match its sidecar.*start over with --overwrite", False),
        (lambda r: _half(r / CKPT / "last.json"), RESUME, 2,
         r"last\.json is unreadable or not valid JSON", False),
        (lambda r: _half(r / CKPT / "best.safetensors"), ["eval"], 2,
         r"best\.safetensors does not match its sidecar.*truncated", False),
        (lambda r: _half(r / CKPT / "best.safetensors"), EXPORT, 2,
         r"best\.safetensors does not match its sidecar", False),
    ],
    ids=["status-empty", "status-cut", "metrics-cut", "config-invalid", "last-cut",
         "last-sidecar-cut", "eval-best-cut", "export-best-cut"],
)  # fmt: skip
def test_damaged_run_files(
    finished_run: Path,
    tmp_path: Path,
    capsys,
    caplog: pytest.LogCaptureFixture,
    damage: Any,
    argv: list[str],
    rc_want: int,
    words: str | None,
    changes: bool,
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    before = snapshot(run)
    if "{run}" in argv:
        args = [a.format(run=run, tmp=tmp_path) for a in argv]
    else:
        args = [*argv, str(run)]
    with caplog.at_level(logging.WARNING):
        rc, err = cli_err(capsys, *args)
    assert rc == rc_want, err
    assert "Traceback" not in err and "unexpected error" not in err
    if words is not None:
        assert re.search(words, err + caplog.text), err + caplog.text
    if not changes:
        assert snapshot(run) == before
    else:  # recovered: the run is whole again
        assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1]
        assert RunDir(run).state == "finished"


def test_truncated_reports_are_named_by_report_and_compare(tmp_path: Path, capsys) -> None:
    from fortify.evaluate import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps(evaluate(model, x, y, eps=0.1, suite="quick", checks=False).to_dict())
    )
    bad = tmp_path / "bad.json"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out = tmp_path / "out.md"
    out.write_text("earlier output\n")
    for argv in (["report", str(good), str(bad)], ["compare", str(good), str(bad)]):
        rc, err = cli_err(capsys, *argv, "--out", str(out))
        assert rc == 2 and "bad.json is not a valid fortify eval.json" in err, err
        assert out.read_text() == "earlier output\n"


def test_a_run_whose_last_checkpoint_was_deleted_is_not_restarted(
    reference: Path, tmp_path: Path, capsys
) -> None:
    """Only a run that stopped during its first epoch's save starts over on resume; a run
    with later epochs whose ``last`` is gone (deleted, not copied) is refused, nothing changed."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for p in (run / "checkpoints").glob("last.*"):
        if p.suffix in (".safetensors", ".json"):
            p.unlink()
    before = snapshot(run)
    rc, err = cli_err(capsys, "train", "--resume", str(run), "--no-progress")
    assert rc != 0
    assert "last" in err and "missing" in err and "--overwrite" in err, err
    assert snapshot(run) == before
