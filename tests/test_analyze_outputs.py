"""``fortify analyze`` creates its report folder only when it has something to write: a command
that fails (bad input found before or during the analysis) leaves no new folder behind."""

from __future__ import annotations

import shutil
from pathlib import Path

from tiny_runs import cli_err, snapshot

BAD_SHAPE = ["--model", "small-cnn", "--input-shape", "1", "1", "1", "--num-classes", "10"]


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_failing_analyze_of_a_model_creates_no_runs_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a model that is not a run reports into ./runs/<name>/reports
    rc, err = cli_err(capsys, "analyze", *BAD_SHAPE)
    assert rc == 2 and "cannot take images of shape" in err, err
    assert _tree(tmp_path) == []


def test_failing_analyze_creates_no_out_folder(tmp_path, capsys):
    out = tmp_path / "out" / "reports"
    rc, err = cli_err(capsys, "analyze", *BAD_SHAPE, "--out", str(out))
    assert rc == 2 and "cannot take images of shape" in err, err
    assert _tree(tmp_path) == []


def test_failing_analyze_of_a_run_adds_nothing_to_it(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _tree(run), snapshot(run)
    rc, err = cli_err(capsys, "analyze", str(run), "--what", "features", "--block", "nope")
    assert rc == 2 and "no FSR block" in err, err
    assert (_tree(run), snapshot(run)) == before


def test_a_successful_analyze_still_writes_its_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "small-cnn", "--input-shape", "1", "8", "8", "--num-classes", "10"]
    assert cli_err(capsys, "analyze", *argv, "--layers")[0] == 0
    assert _tree(tmp_path) == []  # a layer listing of a model that is not a run is only printed
    assert cli_err(capsys, "analyze", *argv)[0] == 0
    reports = tmp_path / "runs" / "small-cnn" / "reports"
    assert sorted(p.name for p in reports.iterdir()) == ["analysis.json", "cost.md"]


def test_analyses_on_data_write_their_reports_and_bad_ones_write_nothing(tmp_path, capsys):
    from tiny_runs import tiny_config

    from fortify.config import ExperimentConfig, load_config
    from fortify.train import fit

    (tmp_path / "tiny.yaml").write_text(tiny_config(1))
    cfg = load_config(ExperimentConfig, tmp_path / "tiny.yaml", ["defenses=[{kind: fsr}]"])
    run = tmp_path / "run"
    fit(cfg, run, progress=False)
    small = ["--attack", "pgd", "--points", "16", "--memory", "64", "--steps", "2"]
    argv = ["analyze", str(run), "--what", "features", "--what", "masks", *small]
    assert cli_err(capsys, *argv, "--images", "2")[0] == 0
    reports = sorted(p.name for p in (run / "reports").iterdir())
    assert reports == ["analysis.json", "fsr_features.md", "fsr_masks.png"]
    before = _tree(tmp_path)
    for bad, words in (
        (["--what", "selection"], "no CAS or CIFS block"),  # checked before params/flops run
        (["--what", "masks", "--block", "nope"], "no FSR block after 'nope'"),
    ):
        argv = ["analyze", str(run), "--what", "params", *bad, "--out", str(tmp_path / "out")]
        rc, err = cli_err(capsys, *argv)
        assert rc == 2 and words in err, err
        assert _tree(tmp_path) == before
