"""Bad input to training found by fuzzing: every case fails with exit code 2 (CLI) or a
ConfigError / CheckpointError (API) naming the bad value, before any file of a run is written,
changed or moved."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_runs import cli_err as _cli
from tiny_runs import snapshot

from fortify.config import ExperimentConfig, load_config
from fortify.config.schema import TrainConfig
from fortify.defenses.fd import FDBlock, FDOptions, attach_fd
from fortify.defenses.fpd_options import FPDOptions
from fortify.defenses.fsr import FSRBlock, attach_fsr
from fortify.errors import ConfigError, FortifyError
from fortify.models import create
from fortify.runs import RunDir
from fortify.train import get_objective
from fortify.train.distributed import check_env


@pytest.fixture()
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# ------------------------------------------------------------------ 1, 9: resumes change no file


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    "damage, overrides, words",
    [
        (None, ["model.kwargs={width: 8}"], "does not fit the model"),
        ("missing", ["train.epochs=2"], r"last\.state-1\.pt.*is missing"),
        ("truncated", ["train.epochs=2"], r"last\.state-1\.pt.*is corrupt"),
        ("garbage", ["train.epochs=2"], r"last\.state-1\.pt.*is corrupt"),
    ],
)
def test_failed_forced_resume_changes_no_file(
    run_copy: Path,
    capsys: pytest.CaptureFixture,
    damage: str | None,
    overrides: list[str],
    words: str,
) -> None:
    state = run_copy / "checkpoints" / "last.state-1.pt"
    if damage == "missing":
        state.unlink()
    elif damage == "truncated":
        _truncate(state)
    elif damage == "garbage":
        state.write_bytes(b"garbage\n")
    before = snapshot(run_copy)
    rc, err = _cli(capsys, "train", "--resume", str(run_copy), "--force", *overrides)
    assert rc == 2 and re.search(words, err), err
    assert snapshot(run_copy) == before  # config.yaml too: the run can still be resumed


def test_corrupt_training_state_is_one_line_without_unsafe_advice(
    run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    (run_copy / "checkpoints" / "last.state-1.pt").write_bytes(b"garbage\n")
    rc, err = _cli(capsys, "train", "--resume", str(run_copy), "--force", "train.epochs=2")
    line = [x for x in err.splitlines() if x.startswith("fortify train: error:")]
    assert rc == 2 and len(line) == 1, err
    assert "last.state-1.pt" in line[0] and "--overwrite" in line[0]
    assert "weights_only" not in err and "will likely succeed" not in err


def test_forced_resume_writes_the_new_config_once_it_resumed(
    run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    rc, err = _cli(capsys, "train", "--resume", str(run_copy), "--force", "train.epochs=2")
    assert rc == 0, err
    assert RunDir(run_copy).read_config()["train"]["epochs"] == 2


def test_resume_with_an_empty_config_says_so(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    (run_copy / "config.yaml").write_text("")
    before = snapshot(run_copy)
    rc, err = _cli(capsys, "train", "--resume", str(run_copy))
    assert rc == 2 and "config.yaml' is empty" in err, err
    assert "no config.yaml" not in err
    assert snapshot(run_copy) == before


# ------------------------------------------------------------------ 2: FSR numbers and inputs


@pytest.mark.parametrize(
    "option, value",
    [
        ("lambda_sep", ".nan"),
        ("lambda_rec", ".inf"),
        ("lambda_sep", "-.inf"),
        ("tau", ".nan"),
        ("tau", ".inf"),
    ],
)
def test_fsr_non_finite_option_is_refused_before_the_old_run_is_moved(
    run_copy: Path, tiny: Path, capsys: pytest.CaptureFixture, option: str, value: str
) -> None:
    before = snapshot(run_copy)
    override = f"defenses=[{{kind: fsr, options: {{{option}: {value}}}}}]"
    rc, err = _cli(
        capsys, "train", "--config", str(tiny), "--run-dir", str(run_copy), "--overwrite", override
    )
    assert rc == 2 and re.search(f"FSR option {option} must be a finite number", err), err
    assert snapshot(run_copy) == before
    assert [p.name for p in run_copy.parent.iterdir() if ".old-" in p.name] == []


def test_fsr_api_refuses_bad_numbers_and_inputs() -> None:
    model = create("small-cnn", 10, 1, width=4)
    with pytest.raises(ConfigError, match="lambda_sep.*nan"):
        attach_fsr(model, "features.1", 10, (1, 28, 28), lambda_sep=math.nan)
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 2, got '10'"):
        attach_fsr(model, "features.1", "10", (1, 28, 28))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="lambda_rec.*inf"):
        FSRBlock(4, 10, lambda_rec=math.inf)
    block = FSRBlock(4, 10, hidden=4).eval()
    with pytest.raises(FortifyError, match=r"built for 4 channels.*\(2, 3, 5, 5\)"):
        block(torch.rand(2, 3, 5, 5))


# ------------------------------------------------------------------ 3: FPD options


@pytest.mark.parametrize(
    "options, words",
    [
        ({"width": math.nan}, "width.*nan"),
        ({"width": "4"}, "width.*'4'"),
        ({"width": 4.0}, "width.*4.0"),
        ({"restore_weight": -1}, "restore_weight.*-1"),
        ({"restore_weight": math.inf}, "restore_weight.*inf"),
        ({"dropout": math.nan}, "dropout.*nan"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"lateral_norm": "yes"}, "lateral_norm.*'yes'"),
        ({"stages": "layer1"}, "stages.*'layer1'"),
        ({"denoise_at": [3]}, "denoise_at"),
        ({"classifier": ""}, "classifier"),
    ],
)
def test_fpd_options_are_checked(options: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=f"FPD option {words}"):
        FPDOptions.from_dict(options)


def test_fpd_default_options_are_valid() -> None:
    FPDOptions.from_dict({"stages": ["layer1"], "denoise_at": ["stem"], "classifier": "fc"})


# ------------------------------------------------------------------ 4: FD options object


def test_fd_refuses_options_of_another_class() -> None:
    model = create("small-cnn", 10, 1, width=4)
    with pytest.raises(ConfigError, match="options must be an FDOptions, got dict"):
        attach_fd(model, ["features.1"], (1, 28, 28), options={"x": 1})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="options must be an FDOptions, got dict"):
        FDBlock(4, {"window": 3})  # type: ignore[arg-type]
    attach_fd(model, ["features.1"], (1, 28, 28), options=FDOptions(operation="mean"))


# ------------------------------------------------------------------ 5, 6: config checks


def test_unknown_eval_suite_is_refused_before_training(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    rc, err = _cli(
        capsys, "train", "--config", str(tiny), "--run-dir", str(run), "eval.suite=quikc"
    )
    assert rc == 2 and re.search(r"eval\.suite.*'quikc'.*Did you mean: quick", err), err
    assert not run.exists()
    with pytest.raises(ConfigError, match="eval.suite.*'nope'"):
        load_config(ExperimentConfig, None, ["eval.suite=nope"])
    assert load_config(ExperimentConfig, None, ["eval.suite=pgd10"]).eval.suite == "pgd10"


@pytest.mark.parametrize("override", ["train.val_points=0", "data.val_size=0"])
@pytest.mark.parametrize("select", ["robust", "clean"])
def test_selection_without_validation_points_is_refused(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture, override: str, select: str
) -> None:
    run = tmp_path / "run"
    rc, err = _cli(
        capsys, "train", "--config", str(tiny), "--run-dir", str(run), override,
        f"train.select={select}",
    )  # fmt: skip
    assert rc == 2 and f"train.select='{select}'" in err and "train.select=last" in err, err
    assert not run.exists()


def test_select_last_trains_without_validation_points_and_saves_best(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    rc, err = _cli(
        capsys, "train", "--config", str(tiny), "--run-dir", str(run), "--no-progress",
        "data.val_size=0", "train.select=last",
    )  # fmt: skip
    assert rc == 0, err
    assert "best" in RunDir(run).checkpoint_tags()


# ------------------------------------------------------------------ 7: FPD objective options


@pytest.mark.parametrize(
    "options, words",
    [
        ({"warn_after_epochs": "x"}, "warn_after_epochs.*'x'"),
        ({"warn_after_epochs": -1}, "warn_after_epochs.*-1"),
        ({"warn_after_epochs": 1.5}, "warn_after_epochs.*1.5"),
        ({"second_step": "yes"}, "second_step.*'yes'"),
        ({"clamp": 1}, "clamp.*1"),
        ({"threshold": "3"}, "threshold.*'3'"),
        ({"noise": math.nan}, "noise.*nan"),
        ({"second_weight": True}, "second_weight.*True"),
    ],
)
def test_fpd_objective_options_are_checked(options: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=f"train.options.{words}"):
        get_objective("fpd", TrainConfig(objective="fpd", options=options))


# ------------------------------------------------------------------ 8: environment


@pytest.mark.parametrize(
    "env, words",
    [
        ({"WORLD_SIZE": "1", "RANK": "3"}, "RANK=3.*WORLD_SIZE=1"),
        ({"RANK": "1"}, "RANK=1.*WORLD_SIZE=1"),
    ],
)
def test_rank_must_be_below_world_size(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], words: str
) -> None:
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=words):
        check_env()


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "abc"])
def test_train_refuses_bad_thread_counts(
    tmp_path: Path,
    tiny: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    value: str,
) -> None:
    monkeypatch.setenv("FORTIFY_THREADS", value)
    threads = torch.get_num_threads()
    run = tmp_path / "run"
    rc, err = _cli(capsys, "train", "--config", str(tiny), "--run-dir", str(run))
    assert rc == 2 and f"FORTIFY_THREADS={value!r}" in err, err
    assert torch.get_num_threads() == threads and not run.exists()


def test_every_command_checks_and_applies_fortify_threads(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORTIFY_THREADS", "0")
    rc, err = _cli(capsys, "report", str(tmp_path / "missing"))
    assert rc == 2 and "FORTIFY_THREADS='0'" in err, err
    threads = torch.get_num_threads()
    monkeypatch.setenv("FORTIFY_THREADS", "1")
    try:
        _cli(capsys, "report", str(tmp_path / "missing"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
