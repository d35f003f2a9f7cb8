"""Bad input at the command line, second audit: config YAML that never ends (aliases), deep
overrides, did-you-mean for unknown fields, exact ``--seeds`` / ``--rows`` lists, run files and
export metadata edited by hand, and numbers checked before any work. Every case exits with 2 (or
raises a FortifyError), names what was wrong, prints no traceback and changes no file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tiny_runs import cli_err, forbid_work, snapshot, tiny_config

from fortify.config import ExperimentConfig, load_config
from fortify.errors import CheckpointError, ConfigError


def _clean(err: str) -> None:
    assert "Traceback" not in err and "unexpected error" not in err, err


# ----------------------------------------------------------------------------- config files


def _bomb(levels: int) -> str:
    """A YAML 'billion laughs': ``levels`` anchors, each a list of ten aliases of the one before."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", ["", "\n  \n", "# only a comment\n", "---\n"])
def test_an_empty_config_file_is_refused_not_read_as_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture, text: str
) -> None:
    cfg = tmp_path / "blank.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match="is empty"):
        load_config(ExperimentConfig, cfg)
    rc, err = cli_err(capsys, "train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert rc == 2 and "blank.yaml" in err and "is empty" in err and "--config" in err, err
    _clean(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, words",
    [
        (  # 10**6 values once expanded: refused before anything copies them
            _bomb(6) + "model:\n  name: small-cnn\n  kwargs: {z: *l5}\n",
            "expands to more than 100000 values",
        ),
        ("model:\n  name: small-cnn\n  kwargs: &k {z: *k}\n", "contains it"),
        ("train:\n  options: &o [1, *o]\n", "contains it"),
    ],
    ids=["alias-bomb", "self-mapping", "self-list"],
)
def test_config_files_whose_aliases_never_end_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, text: str, words: str
) -> None:
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(ExperimentConfig, cfg)
    rc, err = cli_err(capsys, "train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert rc == 2 and "bomb.yaml" in err and words in err, err[:500]
    _clean(err)
    assert not (tmp_path / "run").exists()
    # aliases as people use them still work
    cfg.write_text("train: {epochs: &e 9, milestones: &m [3, 5]}\neval: {n_points: *e}\n")
    assert load_config(ExperimentConfig, cfg).eval.n_points == 9


def test_an_override_nested_too_deeply_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    deep = "train.options=" + "[" * 5000 + "]" * 5000
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(ExperimentConfig, None, [deep])
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_config(1))
    rc, err = cli_err(
        capsys, "train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), "--set", deep
    )
    assert rc == 2 and "nested too deeply" in err, err[:500]
    _clean(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epoch=3", r"did you mean 'epochs' for 'epoch'\?"),
        ("trian.lr=0.1", r"did you mean 'train' for 'trian'\?"),
        ("train.attack.stepz=3", r"did you mean 'steps' for 'stepz'\?"),
        ("data.val_sise=3", r"did you mean 'val_size' for 'val_sise'\?"),
    ],
)
def test_unknown_fields_suggest_the_close_name(override: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        load_config(ExperimentConfig, None, [override])
    assert "allowed fields" in str(info.value)


def test_unknown_sections_of_a_rift_config_suggest_the_close_name() -> None:
    from fortify.rift.config import load_rift_config

    with pytest.raises(ConfigError, match=r"did you mean 'mrc' for 'mcr'\?"):
        load_rift_config(None, ["mcr.n_points=4"])


# ----------------------------------------------------------------------------- run files


def test_resume_with_an_unreadable_stored_config_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--resume RUN --config FILE still compares with RUN/config.yaml: a binary one is named."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(bytes(range(256)))
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_config(1))
    before = snapshot(run)
    rc, err = cli_err(capsys, "train", "--resume", str(run), "--config", str(cfg))
    assert rc == 2 and "config.yaml" in err and "utf-8" in err, err
    _clean(err)
    assert snapshot(run) == before


@pytest.mark.parametrize("config", [[1], "all of it", 5])
def test_export_of_a_checkpoint_whose_sidecar_config_is_not_a_mapping(
    tmp_path: Path, capsys: pytest.CaptureFixture, config: object
) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.safetensors").write_bytes(b"weights")
    (run / "checkpoints" / "best.json").write_text(
        json.dumps({"format_version": 1, "config": config})
    )
    before = snapshot(run)
    out = tmp_path / "rb"
    rc, err = cli_err(capsys, "export", "robustbench", str(run), "--out", str(out), "--name", "A")
    assert rc == 2 and "best" in err, err
    _clean(err)
    assert snapshot(run) == before and not out.exists()


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"num_classes": "ten"}, "num_classes must be an integer >= 1, got 'ten'"),
        ({"num_classes": True}, "num_classes must be an integer >= 1, got True"),
        ({"image_shape": 3}, r"image_shape must be \[C, H, W\], got 3"),
        ({"image_shape": [1, "8", 8]}, r"image_shape must be \[C, H, W\]"),
        ({"config": 5}, "config must be a mapping, got int"),
        ({"config": {"model": {"name": "small-cnn", "widht": 4}}}, "cannot rebuild the model"),
    ],
)
def test_import_of_an_export_with_edited_metadata(
    tmp_path: Path, capsys: pytest.CaptureFixture, edit: dict, words: str
) -> None:
    import torch

    from fortify.interop.robustbench import load_robustbench_export, paths

    weights, info = paths(tmp_path / "rb", "digits", "Linf", "A")
    weights.parent.mkdir(parents=True)
    info.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, weights)
    block = {"config": {"data": {"name": "digits"}}, "num_classes": 10, "image_shape": [1, 8, 8]}
    info.write_text(json.dumps({"fortify": {**block, **edit}}))
    with pytest.raises(CheckpointError, match=words):
        load_robustbench_export(tmp_path / "rb", name="A", dataset="digits")
    before = snapshot(tmp_path / "rb")
    out = tmp_path / "imported"
    argv = ["import", "robustbench", str(tmp_path / "rb"), "--name", "A", "--dataset", "digits"]
    rc, err = cli_err(capsys, *argv, "--out", str(out))
    assert rc == 2 and re.search(words, err), err
    _clean(err)
    assert snapshot(tmp_path / "rb") == before and not out.exists()


# ----------------------------------------------------------------------------- numbers first


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--what", "features", "--k", "0"], r"--k must be an integer in \[1, --memory=5000\]"),
        (["--what", "features", "--k", "-3"], "--k.*got -3"),
        (["--what", "features", "--memory", "10", "--k", "20"], r"--memory=10\].*got 20"),
    ],
)
def test_analyze_checks_k_before_loading_or_attacking(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], words: str
) -> None:
    rc, err = cli_err(capsys, "analyze", str(tmp_path / "no-run"), *argv)
    assert rc == 2 and re.search(words, err), err
    _clean(err)


@pytest.mark.parametrize("eps", ["2", "8", "1.5"])
def test_eval_linf_eps_above_one_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture, eps: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rc, err = cli_err(capsys, "eval", str(run), "--eps", eps)
    assert rc == 2 and re.search(rf"--eps must be in \(0, 1\] for --norm linf.*got {eps}", err)
    _clean(err)
    assert list(run.iterdir()) == []


def test_model_mean_must_be_finite() -> None:
    """The config loader refuses ``model.mean=[.nan]``; ``create`` (the Python API) too."""
    from fortify.models import create

    with pytest.raises(ConfigError, match="mean values must be finite"):
        create("small-cnn", 10, 1, mean=[float("nan")], std=[0.5], width=4)


# ----------------------------------------------------------------------------- replicate lists


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_work(monkeypatch, "the lists")


@pytest.mark.parametrize(
    "name, argv, words",
    [
        ("fsr-table1", ["--seeds", "0,,1"], "--seeds '0,,1' has an empty item"),
        ("fsr-table1", ["--seeds", "0,"], "--seeds '0,' has an empty item"),
        ("fsr-table1", ["--seeds", ",1"], "--seeds ',1' has an empty item"),
        ("fsr-table1", ["--seeds", "9223372036854775808"], "in [0, 2**63 - 1]"),
        ("fsr-table1", ["--rows", "at,at"], "--rows names ['at'] more than once"),
        ("fsr-table1", ["--rows", "at,,at-fsr"], "--rows 'at,,at-fsr' has an empty item"),
        ("fsr-table1", ["--rows", "at-fsrr"], "unknown row 'at-fsrr'. Did you mean: at-fsr"),
        ("fsr-table4", ["--rows", "at,at-fsr,at"], "--rows names ['at'] more than once"),
        ("fsr-table4", ["--rows", "at,"], "--rows 'at,' has an empty item"),
        ("fsr-table4", ["--seeds", "1,,2"], "--seeds '1,,2' has an empty item"),
        ("fsr-ablations", ["--seeds", "0,,1"], "--seeds '0,,1' has an empty item"),
        ("bf16-parity", ["--seeds", "2,,3"], "--seeds '2,,3' has an empty item"),
        ("rift-table1", ["--seeds", "0,,1"], "--seeds '0,,1' has an empty item"),
        ("rift-table1", ["--bn", "adapt,,frozen"], "--bn 'adapt,,frozen' has an empty item"),
        ("rift-table1", ["--bn", "adapt,adapt"], "--bn names ['adapt'] more than once"),
        ("rift-table1", ["--bn", "frozn"], "unknown BN setting 'frozn'. Did you mean: frozen"),
    ],
)
def test_replicate_seed_and_row_lists_are_exact(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    argv: list[str],
    words: str,
) -> None:
    _no_work(monkeypatch)
    out = tmp_path / "out"
    rc, err = cli_err(capsys, "replicate", name, "--out", str(out), *argv)
    assert rc == 2 and words in err, err
    _clean(err)
    assert not out.exists()


# ----------------------------------------------------------------------------- report outputs


@pytest.fixture(scope="module")
def report_text() -> str:
    import torch

    from fortify.evaluate import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    return json.dumps(evaluate(model, x, y, eps=0.1, suite="quick", checks=False).to_dict())


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "{a}", "{b}", "--out", "{a}"],
        ["compare", "{a}", "{b}", "--json", "{b}"],
        ["compare", "{run}", "{b}", "--json", "{run}/reports/eval.json"],
        ["compare", "{run}", "{b}", "--suite", "quick", "--out", "{run}/reports/eval-quick.json"],
        ["report", "{a}", "{run}", "--out", "{run}/reports/eval.json"],
        ["report", "{a}", "{b}", "--compare", "--out", "{b}"],
    ],
)
def test_report_outputs_never_replace_the_reports_they_read(
    tmp_path: Path, capsys: pytest.CaptureFixture, report_text: str, argv: list[str]
) -> None:
    (tmp_path / "run" / "reports").mkdir(parents=True)
    for path in ("a.json", "b.json", "run/reports/eval.json", "run/reports/eval-quick.json"):
        (tmp_path / path).write_text(report_text)
    fill = {"a": tmp_path / "a.json", "b": tmp_path / "b.json", "run": tmp_path / "run"}
    before = snapshot(tmp_path)
    rc, err = cli_err(capsys, *[a.format(**fill) for a in argv])
    assert rc == 2 and "is one of the reports this command reads" in err, err
    _clean(err)
    assert snapshot(tmp_path) == before
