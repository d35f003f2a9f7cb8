"""Run directories and safetensors checkpoints: round trips, integrity, atomicity, refusals."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fortify.runs.checkpoint as ckpt_mod
from fortify.config import ExperimentConfig, to_dict
from fortify.errors import CheckpointError, RunDirError
from fortify.models import create
from fortify.runs import (
    RunDir,
    file_sha256,
    load_checkpoint,
    load_model,
    read_checkpoint,
    save_checkpoint,
    sidecar_path,
    write_json_atomic,
)


def _model(width: int = 4, seed: int = 0, name: str = "small-resnet") -> nn.Module:
    torch.manual_seed(seed)
    model = create(name, num_classes=10, in_channels=1, width=width)
    with torch.no_grad():  # non-trivial BN statistics so buffers matter for the logits
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


X = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- checkpoints
def test_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    src, dst = _model(seed=0), _model(seed=1)
    assert not torch.equal(_logits(src), _logits(dst))
    path = save_checkpoint(tmp_path / "best.safetensors", src, {"epoch": 3})
    meta = load_checkpoint(path, dst)
    assert torch.equal(_logits(src), _logits(dst))
    assert meta["epoch"] == 3
    assert int(dst.bn1.num_batches_tracked) == 7
    assert _files(tmp_path) == ["best.json", "best.safetensors"]


def test_sidecar_content(tmp_path: Path) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(
        path,
        _model(),
        {"epoch": np.int64(5), "acc": torch.tensor(0.25)},
        extra={"ema_step": torch.tensor([4])},
    )
    side = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path) == tmp_path / "last.json"
    assert side["epoch"] == 5 and side["acc"] == 0.25
    assert side["format_version"] == 1
    assert side["sha256"] == file_sha256(path) and side["size_bytes"] == path.stat().st_size
    assert set(side["package_versions"]) == {
        "fortify",
        "torch",
        "torchvision",
        "numpy",
        "safetensors",
        "python",
    }
    assert side["package_versions"]["torch"] == torch.__version__
    assert side["created"].endswith("Z") and side["extra_keys"] == ["ema_step"]
    state, extra, meta = read_checkpoint(path)
    assert torch.equal(extra["ema_step"], torch.tensor([4]))
    assert not any(k.startswith("extra::") for k in state) and meta["epoch"] == 5


def test_shared_and_tied_tensors(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight  # tied
            self.register_buffer("view", self.a.bias.detach()[1:])  # a view into another tensor

    src, dst = Tied(), Tied()
    save_checkpoint(tmp_path / "t.safetensors", src, {})
    load_checkpoint(tmp_path / "t.safetensors", dst)
    assert torch.equal(dst.a.weight, src.a.weight) and dst.b.weight is dst.a.weight
    assert torch.equal(dst.view, src.a.bias[1:])


def test_corrupt_and_truncated_files_raise_checkpoint_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", _model(), {})
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="does not match its sidecar"):
        load_checkpoint(path, _model())
    path.write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match="corrupt or\\s+truncated|truncated"):
        load_checkpoint(path, _model())
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path, _model(), verify=False)  # the parser's error is wrapped too
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, _model(), verify=False)


def test_missing_or_broken_sidecar(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "s.safetensors", _model(), {})
    sidecar_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path, _model())
    sidecar_path(path).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path, _model())
    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="sidecar .* is missing"):
        load_checkpoint(path, _model())
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "nope.safetensors", _model())
    with pytest.raises(CheckpointError, match="never unpickled"):
        load_checkpoint(tmp_path / "model.pth", _model())


def test_architecture_mismatch_names_keys(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "a.safetensors", _model(width=4), {})
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatches: .*conv1\.weight: checkpoint \(4, 1, 3, 3\) vs model \(8, 1, 3, ",
    ):
        load_checkpoint(path, _model(width=8))
    other = _model(name="small-cnn")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, other)
    msg = str(info.value)
    assert "missing keys" in msg and "features.0.0.weight" in msg
    assert "unexpected keys" in msg and "layer1.0.bn1.bias" in msg and "in total" in msg


def test_non_strict_load_skips_extra_keys(tmp_path: Path) -> None:
    src = _model()
    src.extra_head = nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / "n.safetensors", src, {})
    dst = _model(seed=3)
    with pytest.raises(CheckpointError, match="extra_head.weight"):
        load_checkpoint(path, dst)
    load_checkpoint(path, dst, strict=False)
    assert torch.equal(_logits(dst), _logits(src))


def test_meta_validation(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path / "m.safetensors", _model(), {"sha256": "x"})
    with pytest.raises(CheckpointError, match="JSON-serialisable.*meta.fn"):
        save_checkpoint(tmp_path / "m.safetensors", _model(), {"fn": object()})
    assert _files(tmp_path) == []


def _pair_ok(path: Path, expected: torch.Tensor) -> None:
    model = _model(seed=9)
    load_checkpoint(path, model)
    assert torch.equal(_logits(model), expected)


def test_interrupted_weights_write_keeps_previous_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _model(seed=0)
    path = save_checkpoint(tmp_path / "best.safetensors", old, {"epoch": 1})
    real_save = ckpt_mod.st_save_file

    def half_then_crash(tensors, filename, metadata=None):  # noqa: ANN001
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "st_save_file", half_then_crash)
    with pytest.raises(RunDirError, match="disk full.*is intact"):
        save_checkpoint(path, _model(seed=5), {"epoch": 2})
    assert _files(tmp_path) == ["best.json", "best.safetensors"]  # no temp files left
    _pair_ok(path, _logits(old))
    assert json.loads(sidecar_path(path).read_text())["epoch"] == 1


def test_failed_rename_keeps_previous_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _model(seed=0)
    path = save_checkpoint(tmp_path / "best.safetensors", old, {"epoch": 1})

    def fail(*args: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(RunDirError, match="rename failed"):
        save_checkpoint(path, _model(seed=5), {"epoch": 2})
    monkeypatch.undo()
    assert _files(tmp_path) == ["best.json", "best.safetensors"]
    _pair_ok(path, _logits(old))


def test_crash_between_renames_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights renamed, sidecar not: the stale sidecar's hash exposes the mismatch."""
    path = save_checkpoint(tmp_path / "best.safetensors", _model(seed=0), {"epoch": 1})
    real_replace = os.replace
    calls: list[str] = []

    def replace_weights_only(src: str, dst: str) -> None:
        calls.append(Path(dst).name)
        if Path(dst).suffix == ".json":
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_weights_only)
    with pytest.raises(RunDirError, match="killed.*after its weights were replaced"):
        save_checkpoint(path, _model(seed=5), {"epoch": 2})
    monkeypatch.undo()
    assert calls == ["best.safetensors", "best.json"]  # weights first, then sidecar
    assert _files(tmp_path) == ["best.json", "best.safetensors"]
    with pytest.raises(CheckpointError, match="interrupted"):
        load_checkpoint(path, _model())


# ----------------------------------------------------------------------------- load_model
def _config(width: int = 4) -> ExperimentConfig:
    cfg = ExperimentConfig(name="t")
    cfg.model.name = "small-resnet"
    cfg.model.kwargs = {"width": width}
    cfg.model.mean, cfg.model.std = [0.5], [0.25]
    return cfg


def test_load_model_rebuilds_from_run_dir(tmp_path: Path) -> None:
    cfg = _config()
    run = RunDir.open(tmp_path / "run", config=cfg)
    model = create("small-resnet", 10, 1, width=4, mean=[0.5], std=[0.25])
    with torch.no_grad():
        model.linear.bias.add_(1.0)
    meta = {"config": to_dict(cfg), "num_classes": 10, "image_shape": [1, 8, 8]}
    save_checkpoint(run.checkpoint_path("best"), model, meta)
    save_checkpoint(run.checkpoint_path("dc"), model, {**meta, "config": cfg})  # dataclass config
    assert json.loads(sidecar_path(run.checkpoint_path("dc")).read_text())["config"] == to_dict(cfg)
    loaded, got = load_model(tmp_path / "run")
    assert not loaded.training and got["num_classes"] == 10
    assert torch.equal(_logits(loaded), _logits(model))
    assert torch.equal(loaded.normalize.std, torch.tensor([0.25]).view(1, 1, 1, 1))
    loaded2, _ = load_model(run.checkpoint_path("best"))
    assert torch.equal(_logits(loaded2), _logits(model))
    with pytest.raises(CheckpointError, match="no checkpoint tagged 'last'.*best"):
        load_model(run, tag="last")


def test_load_model_needs_rebuild_meta(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "x.safetensors", _model(), {"epoch": 1})
    with pytest.raises(CheckpointError, match="lacks \\['config', 'num_classes', 'image_shape'\\]"):
        load_model(path)
    bad = {
        "config": {"model": {"name": "resnet-9000"}},
        "num_classes": 10,
        "image_shape": [1, 8, 8],
    }
    path = save_checkpoint(tmp_path / "y.safetensors", _model(), bad)
    with pytest.raises(CheckpointError, match="cannot rebuild.*resnet-9000"):
        load_model(path)


# ----------------------------------------------------------------------------- run dirs
def test_new_run_writes_config_and_files(tmp_path: Path) -> None:
    run = RunDir.open(
        tmp_path / "a" / "run", mode="new", config={"lr": 0.1, "model": {"name": "x"}}
    )
    assert run.read_config() == {"lr": 0.1, "model": {"name": "x"}}
    assert run.state is None
    run.set_state("running", epoch=0)
    assert run.state == "running"
    assert json.loads(run.status_path.read_text())["epoch"] == 0
    assert run.checkpoint_path("epoch-3") == run.path / "checkpoints" / "epoch-3.safetensors"
    assert run.reports_dir.is_dir()
    run.log_metrics({"epoch": 1, "loss": torch.tensor(0.5), "acc": np.float32(0.25)})
    run.log_metrics({"epoch": 2, "loss": 0.25})
    assert run.read_metrics() == [
        {"epoch": 1, "loss": 0.5, "acc": 0.25},
        {"epoch": 2, "loss": 0.25},
    ]
    with pytest.raises(RunDirError, match="unknown run state 'done'"):
        run.set_state("done")  # type: ignore[arg-type]
    with pytest.raises(RunDirError, match="bad checkpoint tag"):
        run.checkpoint_path("../escape")
    with pytest.raises(RunDirError, match="not JSON-serialisable"):
        run.log_metrics({"bad": object()})


def test_new_mode_refuses_existing_runs(tmp_path: Path) -> None:
    run = RunDir.open(tmp_path / "run", config={"a": 1})
    with pytest.raises(
        RunDirError, match="already holds a run \\(state: unknown\\).*--resume.*--overwrite"
    ):
        RunDir.open(tmp_path / "run")
    run.set_state("finished")
    with pytest.raises(RunDirError, match="finished run.*--resume.*--overwrite"):
        RunDir.open(tmp_path / "run", mode="new")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(RunDirError, match="not empty \\(notes.txt\\)"):
        RunDir.open(tmp_path / "other")
    (tmp_path / "empty").mkdir()
    RunDir.open(tmp_path / "empty")  # an empty folder is fine
    with pytest.raises(RunDirError, match="unknown run-directory mode 'append'"):
        RunDir.open(tmp_path / "x", mode="append")  # type: ignore[arg-type]


def test_resume_keeps_history(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(RunDirError, match="nothing to resume"):
        RunDir.open(tmp_path / "run", mode="resume")
    run = RunDir.open(tmp_path / "run", config={"train": {"epochs": 10}})
    run.log_metrics({"epoch": 1})
    with caplog.at_level(logging.WARNING, logger="fortify.runs"):
        again = RunDir.open(tmp_path / "run", mode="resume", config={"train": {"epochs": 20}})
    assert "train.epochs" in caplog.text
    assert again.read_metrics() == [{"epoch": 1}]
    assert again.read_config() == {"train": {"epochs": 20}}


def test_overwrite_moves_old_run_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = RunDir.open(tmp_path / "run", config={"v": 1})
    run.log_metrics({"epoch": 1})
    run.set_state("finished")
    with caplog.at_level(logging.WARNING, logger="fortify.runs"):
        fresh = RunDir.open(tmp_path / "run", mode="overwrite", config={"v": 2})
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and moved[0].name.endswith("Z")
    assert str(moved[0]) in caplog.text
    old = RunDir(moved[0])
    assert (
        old.read_config() == {"v": 1}
        and old.state == "finished"
        and old.read_metrics() == [{"epoch": 1}]
    )
    assert fresh.read_config() == {"v": 2} and fresh.state is None and fresh.read_metrics() == []
    RunDir.open(tmp_path / "run", mode="overwrite", config={"v": 3})  # same second: unique name
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]) == 2


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match="cannot create or write the run directory"):
        RunDir.open(blocker / "run")
    with pytest.raises(RunDirError, match="not a directory"):
        RunDir.open(blocker)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_parent(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="writable"):
            RunDir.open(ro / "run")
    finally:
        ro.chmod(0o700)


def test_half_written_metrics_line_is_skipped(tmp_path: Path) -> None:
    run = RunDir.open(tmp_path / "run")
    run.log_metrics({"epoch": 1})
    with open(run.metrics_path, "a") as fh:
        fh.write('{"epoch": 2, "lo')  # process killed mid-line
    run.log_metrics({"epoch": 3})
    assert run.read_metrics() == [{"epoch": 1}, {"epoch": 3}]


def test_write_json_atomic(tmp_path: Path) -> None:
    path = write_json_atomic(
        tmp_path / "r" / "report.json", {"acc": np.float64(0.5), "n": np.arange(3)}
    )
    assert json.loads(path.read_text()) == {"acc": 0.5, "n": [0, 1, 2]}
    with pytest.raises(TypeError, match="report.json.bad"):
        write_json_atomic(tmp_path / "r" / "report.json", {"bad": object()})
    assert _files(tmp_path / "r") == ["report.json"]
