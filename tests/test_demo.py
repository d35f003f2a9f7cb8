"""`fortify demo`: the FSR block's cost bounds, and an end-to-end run on a tiny digits budget."""

from __future__ import annotations

import json

import pytest

from fortify.analysis.cost import cost_report
from fortify.cli.cmd_demo import DEMO_CONFIG, fsr_hidden_for
from fortify.config import ExperimentConfig, from_dict
from fortify.config.schema import DefenseConfig
from fortify.factory import build_model


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8)])
def test_demo_fsr_block_is_sized_like_the_paper(shape: tuple[int, int, int]) -> None:
    """The block adds at most 25 % parameters and 10 % FLOPs to the demo's backbone (the paper's
    block adds 11 % / 3.6 % to ResNet-18), on Fashion-MNIST's and the digits' image size."""
    cfg = from_dict(ExperimentConfig, DEMO_CONFIG)
    hidden = fsr_hidden_for(cfg, shape, 10)
    plain = build_model(cfg.model, [], 10, shape)
    fsr = build_model(cfg.model, [DefenseConfig(kind="fsr", options={"hidden": hidden})], 10, shape)
    a, b = cost_report(plain, shape), cost_report(fsr, shape)
    assert b.params_total > a.params_total  # the block is really there
    assert b.params_total / a.params_total <= 1.25
    assert b.flops_total / a.flops_total <= 1.10


@pytest.mark.slow
def test_demo_end_to_end_on_digits(tmp_path) -> None:
    from fortify.cli.main import main

    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--dataset",
            "digits",
            "--run-dir",
            str(out),
            "--set",
            "train.epochs=1",
            "--set",
            "data.train_subset=256",
            "--set",
            "train.val_points=64",
            "--set",
            "eval.n_points=40",
        ]
    )
    assert code == 0
    for name in ("demo.md", "demo.json", "accuracy_per_attack.png", "robust_vs_eps.png"):
        assert (out / name).stat().st_size > 0, name
    for run in ("at", "at-fsr"):
        assert (out / run / "reports" / "eval.json").is_file()
    md = (out / "demo.md").read_text()
    header = md.splitlines()[2]
    assert "params" in header and "MFLOPs" in header
    assert "95 % CI" in md and "McNemar p" in md
    summary = json.loads((out / "demo.json").read_text())
    assert summary["n_points"] == 40
    paired = {r["column"]: r for r in summary["paired"]}
    # each paired column is computed on the points its attacks ran on, as the table's n says
    from fortify.evaluate import EvalReport

    at = EvalReport.load(out / "at" / "reports" / "eval.json")
    for col, r in paired.items():
        assert r["n"] == at.table_n()["final"][col], col
    assert {"Natural", "PGD-20", "Ensemble"} <= set(paired)
    for r in paired.values():
        lo, hi = r["ci95"]
        assert lo <= r["difference"] <= hi
        assert 0.0 <= r["mcnemar_p"] <= 1.0
        expected = (
            "higher" if lo > 0 else "lower" if hi < 0 else "no detectable difference at this scale"
        )
        assert r["verdict"] == expected
    # the ε-curve runs on exactly the table's points: its ε = 0 point is the table's clean
    # accuracy and its training-ε point is the table's PGD-20 (same attack settings)
    for label in ("AT", "AT+FSR"):
        curve = dict((e, acc) for e, acc in summary["curves"][label])
        row = summary["table"][label]["final"]
        assert curve[0.0] == pytest.approx(row["Natural"])
        assert curve[summary["eps"]] == pytest.approx(row["PGD-20"])
    cost = summary["cost"]
    assert cost["AT+FSR"]["params_total"] / cost["AT"]["params_total"] <= 1.25
