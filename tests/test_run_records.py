"""What a run records and logs for the person reading it later.

- Thread count, device and precision go into the checkpoint metadata, every metrics.jsonl
  record and every evaluation report's settings (CPU results depend on the thread count).
- OOD results name the model, the corruption and the severity of every number, in the log and
  in the printed report.
- Plots name a model by its method (objective + defences), not by its folder.
- Long commands log an estimated duration before they start (``fortify eval`` with the paper,
  AutoAttack and full suites; ``fortify replicate fsr-table1``).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from fortify.cli.main import build_parser, main
from fortify.config import ExperimentConfig, load_config
from fortify.evaluate import evaluate
from fortify.evaluate.estimate import UnitCosts, log_suite_estimate, suite_seconds
from fortify.evaluate.ood import generated_ood
from fortify.models import create
from fortify.runs import read_checkpoint
from fortify.train import fit

TINY = [
    "data.name=digits",
    "data.val_size=200",
    "data.train_subset=128",
    "model.kwargs={width: 4}",
    "device=cpu",
    "train.batch_size=64",
    "train.attack.steps=1",
    "train.val_points=50",
    "train.val_attack_steps=1",
    "train.epochs=1",
]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def test_training_and_evaluation_record_threads_device_precision(tmp_path, two_threads) -> None:
    torch.set_num_threads(1)
    cfg = load_config(ExperimentConfig, None, [*TINY, "train.precision=bf16"])
    result = fit(cfg, tmp_path / "run", mode="new", progress=False)
    meta = read_checkpoint(tmp_path / "run" / "checkpoints" / "best.safetensors")[2]
    assert meta["compute"]["num_threads"] == 1
    assert meta["compute"]["device"] == "cpu" and meta["compute"]["precision"] == "bf16"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(r["threads"] == 1 for r in records)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    torch.set_num_threads(two_threads)
    report = evaluate(result.model.eval(), x, y, suite="quick", eps=0.1, checks=False)
    assert report.settings["num_threads"] == two_threads
    assert report.settings["precision"] == "fp32" and report.settings["device"] == "cpu"
    assert f"num_threads: {two_threads}" in report.to_markdown()


def _fmnist_like_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create("small-cnn", num_classes=10, in_channels=1, width=4).eval()


def test_ood_log_lines_name_model_corruption_and_severity(caplog) -> None:
    model = _fmnist_like_model()
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    with caplog.at_level("INFO", logger="fortify.evaluate.ood"):
        generated_ood(
            model, x, y, corruptions=["gaussian_noise", "contrast"], severities=(1, 3), label="AT"
        )
    lines = [r.getMessage() for r in caplog.records]
    assert any("OOD accuracy (%) of AT" in m and "columns s1 s3" in m for m in lines), lines
    rows = [m for m in lines if m.startswith("OOD AT | ")]
    assert [r.split("|")[1].strip() for r in rows] == ["gaussian_noise", "contrast"]
    assert all(re.search(r"s1 +\d+\.\d\s+s3 +\d+\.\d$", r) for r in rows), rows


def test_ood_report_prints_a_labelled_table() -> None:
    model = _fmnist_like_model()
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    opts = {"corruptions": ["gaussian_noise"], "severities": [2, 5], "label": "runs/at"}
    report = evaluate(model, x, y, suite="ood", eps=0.1, checks=False, suite_options=opts)
    md = report.to_markdown()
    assert "### OOD (common corruptions)" in md
    assert "| corruption | s2 | s5 | mean |" in md
    assert re.search(r"\| gaussian_noise \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", md)


def test_suite_seconds_follows_the_budget() -> None:
    c = UnitCosts(grad_s=1e-3, forward_s=1e-4)
    paper = suite_seconds(c, "paper", 100)
    full = suite_seconds(c, "full", 100, aa_points=10)
    assert paper == {"paper": pytest.approx(100 * 151 * 1e-3)}
    assert full is not None and full["paper"] == paper["paper"]
    assert suite_seconds(c, "full", 100, aa_points=20)["autoattack"] == pytest.approx(
        2 * full["autoattack"]
    )
    assert suite_seconds(c, "quick", 100) is None


def test_eval_logs_an_estimate_before_a_long_suite(tmp_path, caplog) -> None:
    argv = ["eval", "--model", "small-cnn", "--dataset", "digits", "--n-points", "4"]
    argv += ["--no-checks", "--out", str(tmp_path), "--model-arg", "width=4"]
    with caplog.at_level("INFO"):
        assert main([*argv, "--suite", "autoattack"]) == 0
    msgs = [r.getMessage() for r in caplog.records]
    first = next(i for i, m in enumerate(msgs) if m.startswith("estimated time:"))
    assert "suite autoattack on 4 points" in msgs[first] and "ms per input gradient" in msgs[first]
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main([*argv, "--suite", "quick"]) == 0
    assert not any(r.getMessage().startswith("estimated time:") for r in caplog.records)
    model = _fmnist_like_model()
    assert log_suite_estimate(model, torch.rand(3, 1, 28, 28), "quick") is None


def test_replicate_logs_an_estimate_for_its_grid(caplog) -> None:
    from fortify.data import load_from_config
    from fortify.replicate._fsr_recipe import row_config
    from fortify.replicate._fsr_table1_page import log_grid_estimate

    args = build_parser().parse_args(["replicate", "fsr-table1", "--test-points", "8"])
    splits = load_from_config(row_config("at", args, 0).data)
    with caplog.at_level("INFO", logger="fortify.replicate"):
        total = log_grid_estimate(args, ["at", "at-fsr"], [0, 1], splits)
    msg = next(r.getMessage() for r in caplog.records if "estimated time" in r.getMessage())
    assert total > 0 and "2 row(s) × 2 seed(s)" in msg


def test_plot_labels_name_the_method_not_the_folder() -> None:
    from fortify.evaluate.plot import model_label

    cfg = {"train": {"objective": "trades"}, "defenses": [{"kind": "fsr"}, {"kind": "cas"}]}
    assert model_label(cfg, "at") == "TRADES+FSR+CAS"
    assert model_label({"train": {"objective": "standard"}}, "x") == "standard"
    assert model_label(None, "my-folder") == "my-folder"
