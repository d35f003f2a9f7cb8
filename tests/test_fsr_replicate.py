"""`fortify replicate fsr-table1` (configs, report) and `fortify analyze` on a tiny run."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from fortify.errors import ConfigError
from fortify.replicate import _fsr_recipe as recipe
from fortify.replicate import fsr_table1 as t1


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    t1.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_row_configs():
    args = _args("--epochs", "4", "--width", "4", "--fsr-hidden", "8")
    for row in t1.ROWS:
        cfg = recipe.row_config(row, args)
        assert cfg.train.objective == row.split("-")[0]
        assert cfg.train.attack.eps == pytest.approx(0.1)
        assert cfg.train.precision == "fp32" and not cfg.train.channels_last  # the default
        fast = recipe.row_config(row, _args("--epochs", "4", "--precision", "bf16"))
        assert fast.train.precision == "bf16" and fast.train.channels_last
        assert cfg.model.kwargs == {"width": 4}
        assert [d.kind for d in cfg.defenses] == (["fsr"] if row.endswith("fsr") else [])
        assert cfg.train.milestones == [3, 3]


def test_bad_rows_and_numbers_raise():
    from fortify.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown row"):
        t1.run(_args("--rows", "at,fsr"))
    with pytest.raises(ConfigError, match="--epochs"):
        t1.run(_args("--epochs", "0"))


def test_lr_schedule_text_says_what_runs():
    four = recipe.lr_schedule_text(4)
    assert four.startswith(
        "epoch 1: linear warm-up to 0.05; epochs 2–3: lr 0.05; epoch 4: lr 0.0005 (×0.01)"
    )
    assert "epoch 4: lr 0.005 (×0.1); epoch 5: lr 0.0005 (×0.01)" in recipe.lr_schedule_text(5)


def test_seeds_are_parsed_and_checked():
    assert recipe._seeds(_args("--seeds", "0,1,2")) == [0, 1, 2]
    assert recipe._seeds(_args("--seeds", "0,1", "--seed", "5")) == [5]
    assert recipe.row_config("at", _args("--seeds", "3,4")).seed == 3
    assert recipe.row_config("at", _args(), 7).seed == 7
    from fortify.errors import ConfigError

    for bad in ("0,0", "a", "-1", ""):
        with pytest.raises(ConfigError, match="--seeds"):
            t1.run(_args("--seeds", bad))


@pytest.mark.slow
def test_two_rows_two_seeds_end_to_end(tmp_path, capsys, monkeypatch):
    """Train and evaluate AT and AT+FSR with seeds 0 and 1 (tiny budget), then re-run: every
    (row, seed) job is reused and the page is regenerated from the intervals."""
    from fortify.replicate.seed_grid import SeedGrid

    monkeypatch.chdir(tmp_path)
    argv = [
        "--out", "runs", "--doc", "docs/t.md", "--epochs", "1", "--train-subset", "64",
        "--width", "2", "--fsr-hidden", "4", "--batch-size", "32", "--attack-steps", "2",
        "--test-points", "24", "--aa-points", "8", "--val-points", "50", "--rows", "at,at-fsr",
        "--seeds", "0,1",
        "--no-checks",
    ]  # fmt: skip
    assert t1.run(_args(*argv)) == 0
    first = (tmp_path / "docs" / "t.md").read_text()
    for row in ("at", "at-fsr"):
        for s in (0, 1):
            assert (tmp_path / "runs" / row / f"seed-{s}" / "checkpoints").is_dir()
            per_seed = tmp_path / "docs" / "t" / f"{row}-seed{s}.json"
            assert per_seed.stat().st_size < 20_000
    assert "| AT | 2 (0,1) |" in first and "| AT + FSR | 2 (0,1) |" in first
    assert "AutoAttack (n=8)" in first and "Worst case (n=8)" in first
    assert "| AT + FSR − AT | AutoAttack | 2 | 8 |" in first
    assert "| AT + FSR − AT | Natural | 2 | 24 |" in first
    assert "yes, in every pair" not in first
    summary = json.loads((tmp_path / "docs" / "t.json").read_text())
    verdicts = {r["column"]: r["verdict"] for r in summary["readings"]}
    assert set(verdicts) == {"Natural", "PGD-20", "Ensemble", "AutoAttack", "Worst case"}
    assert all(
        v in ("higher", "lower", "no detectable difference at this scale")
        for v in verdicts.values()
    )
    assert {j["training"] for j in summary["jobs"].values()} == {"new"}
    # second call: everything reused, same page body
    assert t1.run(_args(*argv)) == 0
    summary2 = json.loads((tmp_path / "docs" / "t.json").read_text())
    assert {j["training"] for j in summary2["jobs"].values()} == {"reused"}
    assert {j["evaluation"] for j in summary2["jobs"].values()} == {"reused"}
    assert summary2["readings"] == summary["readings"]
    grid = SeedGrid.load_per_seed(tmp_path / "docs" / "t", labels=t1.LABELS)
    assert sorted(grid.reports) == ["at", "at-fsr"] and sorted(grid.reports["at"]) == [0, 1]
    again = grid.reading("at", "at-fsr", "AutoAttack")
    assert again.to_dict() == summary["readings"][3]
    # a later session without the run directories: committed per-seed JSON stand for the jobs
    shutil.rmtree(tmp_path / "runs")
    assert t1.run(_args(*argv)) == 0
    summary3 = json.loads((tmp_path / "docs" / "t.json").read_text())
    assert {j["training"] for j in summary3["jobs"].values()} == {"committed"}
    assert summary3["readings"] == summary["readings"]
    assert not (tmp_path / "runs" / "at").exists()  # nothing was trained
    # a hand-written appendix is appended verbatim and named in the page's command
    (tmp_path / "notes.md").write_text("## Investigation\n\nWritten by hand.\n")
    assert t1.run(_args(*argv, "--appendix", "notes.md")) == 0
    page = (tmp_path / "docs" / "t.md").read_text()
    assert page.rstrip().endswith("Written by hand.") and "--appendix notes.md" in page
    with pytest.raises(ConfigError, match="--appendix"):
        t1.run(_args(*argv, "--appendix", "missing.md"))
    # a different evaluation setting is not taken from the JSON: that job runs again
    assert t1.run(_args(*[a if a != "24" else "20" for a in argv[:-3]], "--seeds", "0")) == 0
    assert (tmp_path / "runs" / "at" / "seed-0" / "checkpoints").is_dir()


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
