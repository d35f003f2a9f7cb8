"""`fortify replicate fsr-table1` (configs, report) and `fortify analyze` on a tiny run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from fortify.replicate import fsr_table1 as t1


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    t1.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_row_configs():
    args = _args("--epochs", "4", "--width", "4", "--fsr-hidden", "8")
    for row in t1.ROWS:
        cfg = t1.row_config(row, args)
        assert cfg.train.objective == row.split("-")[0]
        assert cfg.train.attack.eps == pytest.approx(0.1)
        assert cfg.train.precision == "bf16" and cfg.train.channels_last
        assert cfg.model.kwargs == {"width": 4}
        assert [d.kind for d in cfg.defenses] == (["fsr"] if row.endswith("fsr") else [])
        assert cfg.train.milestones == [3, 3]


def test_bad_rows_and_numbers_raise():
    from fortify.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown row"):
        t1.run(_args("--rows", "at,fsr"))
    with pytest.raises(ConfigError, match="--epochs"):
        t1.run(_args("--epochs", "0"))


def test_report_and_verdict(tmp_path):
    args = _args("--test-points", "10", "--aa-points", "5")
    rows = {}
    for i, row in enumerate(t1.ROWS):
        acc = {c: 50.0 + i for c in t1.COLUMNS}
        rows[row] = {"accuracy": acc, "seconds": {"train_total": 60, "paper": 6, "autoattack": 6}}
    results = {
        "rows": rows,
        "wall_time_min": 7.2,
        "wall_time_this_call_min": 1.0,
        "settings": {"machine": "test"},
    }
    text = t1.write_report(results, args, tmp_path / "t.md", t1._command(args))
    assert "| AT + FSR | 51.00 |" in text
    assert "yes, in every pair" in text and "+1.00 points (AutoAttack)" in text
    assert "fortify replicate fsr-table1 --out" in text
    assert (
        json.loads((tmp_path / "t.json").read_text())["rows"]["mart"]["accuracy"]["Natural"] == 54.0
    )
    rows["mart-fsr"]["accuracy"]["AutoAttack"] = 10.0
    assert "mixed: in 2 of 3 pairs" in t1._verdict(results)


def test_analyze_cli_params_on_saved_checkpoint(tmp_path, capsys):
    from fortify.cli.main import main
    from fortify.config.loader import to_dict
    from fortify.config.schema import DefenseConfig, ExperimentConfig, ModelConfig
    from fortify.factory import build_model
    from fortify.runs import save_checkpoint

    cfg = ExperimentConfig(
        model=ModelConfig(name="small-resnet", kwargs={"width": 4}),
        defenses=[DefenseConfig(kind="fsr", options={"hidden": 8})],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.defenses, 10, (1, 28, 28))
    path = tmp_path / "run" / "checkpoints" / "best.safetensors"
    path.parent.mkdir(parents=True)
    save_checkpoint(
        path, model, {"config": to_dict(cfg), "num_classes": 10, "image_shape": [1, 28, 28]}
    )
    assert main(["analyze", str(tmp_path / "run"), "--what", "params", "--what", "flops"]) == 0
    out = capsys.readouterr().out
    assert "+ defences" in out
    report = json.loads((tmp_path / "run" / "reports" / "analysis.json").read_text())
    assert report["cost"]["params_total"] > report["cost"]["params_backbone"]
    assert main(["analyze", str(tmp_path / "nope")]) == 2
