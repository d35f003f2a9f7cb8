"""``fortify eval --model``: the report folder (``runs/<model>/reports`` or next to
``--weights``) is created only when the report is written; a refused or failed evaluation
leaves no folder behind."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from tiny_runs import cli_err

import fortify.evaluate
from fortify.errors import EvaluationError
from fortify.models import create

EVAL = ["eval", "--model", "small-cnn", "--dataset", "digits", "--n-points", "4"]
QUICK = ["--suite", "quick", "--no-checks", "--model-arg", "width=4"]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _fail_evaluation(*args: object, **kwargs: object) -> None:
    raise EvaluationError("simulated failure while attacking")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--norm", "l2"], "--norm l2 needs an explicit --eps"),  # a bad option
        (["--model-arg", "width=0"], "width=0"),  # a bad model option
        ([], "simulated failure while attacking"),  # the evaluation itself fails
    ],
    ids=["l2-without-eps", "bad-model-arg", "evaluation-fails"],
)
def test_failed_eval_of_a_model_leaves_no_runs_folder(
    tmp_path, capsys, monkeypatch, extra, needle
) -> None:
    monkeypatch.chdir(tmp_path)
    if not extra:
        monkeypatch.setattr(fortify.evaluate, "evaluate", _fail_evaluation)
    rc, err = cli_err(capsys, *EVAL, *QUICK, *extra)
    assert rc == 2 and needle in err, err
    assert _listing(tmp_path) == []


def test_eval_of_a_model_with_the_wrong_input_shape_leaves_no_folder(
    tmp_path, capsys, monkeypatch
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "linnet.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def build(num_classes=10):
                return nn.Sequential(nn.Flatten(), nn.Linear(7, num_classes))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["eval", "--model", "python:linnet:build", "--dataset", "digits", "--n-points", "4"]
    rc, err = cli_err(capsys, *argv)
    assert rc == 2 and "cannot process images of shape" in err, err
    assert _listing(work) == []


def test_eval_of_a_model_writes_its_reports_where_documented(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = cli_err(capsys, *EVAL, *QUICK)
    assert rc == 0, err
    assert _listing(tmp_path) == [
        "runs",
        "runs/small-cnn",
        "runs/small-cnn/reports",
        *(f"runs/small-cnn/reports/{f}" for f in ("eval-quick.json", "eval-quick.md")),
        *(f"runs/small-cnn/reports/{f}" for f in ("eval.json", "eval.md")),
    ]


def test_eval_with_weights_reports_next_to_them_only_on_success(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "w" / "net.pth"
    weights.parent.mkdir()
    torch.save(create("small-cnn", 10, 1, width=4).state_dict(), weights)
    argv = [*EVAL, *QUICK, "--weights", str(weights)]
    evaluate = fortify.evaluate.evaluate
    monkeypatch.setattr(fortify.evaluate, "evaluate", _fail_evaluation)
    rc, err = cli_err(capsys, *argv)
    assert rc == 2 and "simulated failure" in err, err
    assert _listing(tmp_path) == ["w", "w/net.pth"]
    monkeypatch.setattr(fortify.evaluate, "evaluate", evaluate)
    rc, err = cli_err(capsys, *argv)
    assert rc == 0, err
    assert (tmp_path / "w" / "reports" / "eval-quick.json").is_file()
    assert not (tmp_path / "runs").exists()
