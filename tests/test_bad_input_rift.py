"""Bad input to `fortify rift` and the replicate commands fails at once with a clear message:
every RiFT option before any step runs, corrupt step files recomputed with a warning, output
paths checked before any work, and nonsense estimate/seed options refused."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import pytest

# the tiny AT run (digits 8×8, small-cnn width 4) and the fast RiFT options of the pipeline tests
from test_rift_pipeline import _opts, at_run  # noqa: F401 - at_run is a fixture
from tiny_runs import forbid_work

from fortify.errors import ConfigError, RunDirError

FAST = [
    "--device", "cpu", "--passes", "1", "--points", "32", "--batch-size", "32", "--epochs", "1",
    "--test-points", "8", "--suites", "pgd10", "--alpha-step", "0.5", "--val-points", "16",
]  # fmt: skip


# ------------------------------------------------------------------ 1. options checked up front


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--alpha-step", "0", "--alpha-step"),
        ("--alpha-step", "2", "--alpha-step"),
        ("--alpha-step", "-0.1", "--alpha-step"),
        ("--alpha-step", "0.3", "--alpha-step"),  # does not divide 1
        ("--val-points", "0", "--val-points .* must be an integer >= 1, got 0"),
        ("--test-points", "0", "--test-points .* must be an integer >= 1, got 0"),
        ("--points", "0", "--points .* must be an integer >= 1, got 0"),
        ("--suites", "nope", "--suites .*unknown evaluation suite 'nope'"),
        ("--suites", ",,", "--suites .* at least one"),
        ("--suites", "", "--suites .* at least one"),
        ("--suites", "pgd10,pgd10", "more than once"),
        ("--ft-batch-size", "0", "--ft-batch-size"),
        ("--attack-eps", "0", "--attack-eps"),
    ],
)
def test_rift_run_checks_every_option_before_any_step(
    at_run,  # noqa: F811
    tmp_path,
    capsys,
    flag,
    value,
    message,
):
    from fortify.cli.main import main

    out = tmp_path / "r"
    assert main(["rift", "run", str(at_run), "--out", str(out), *FAST, flag, value]) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert re.search(message, err), err
    assert not out.exists()  # no step ran, nothing was written or moved


def test_rift_force_with_a_bad_option_moves_nothing_aside(at_run, tmp_path, capsys):  # noqa: F811
    from fortify.cli.main import main

    out = tmp_path / "r"
    base = ["rift", "run", str(at_run), "--out", str(out), *FAST]
    assert main(base) == 0
    before = sorted(p.name for p in out.iterdir())
    for _ in range(2):
        assert main([*base, "--force", "--val-points", "0"]) == 2
    assert sorted(p.name for p in out.iterdir()) == before  # no finetune.old-* folders
    assert "--val-points" in capsys.readouterr().err


def test_rift_config_validate_names_the_option():
    from fortify.rift.config import RiftConfig, load_rift_config
    from fortify.rift.pipeline import RiftRun

    with pytest.raises(ConfigError, match="interpolate.n_points"):
        load_rift_config(None, ["interpolate.n_points=0"])
    with pytest.raises(ConfigError, match="interpolate.resamples"):
        load_rift_config(None, ["interpolate.resamples=10"])
    with pytest.raises(ConfigError, match="evaluate.autoattack_points"):
        load_rift_config(None, ["evaluate.autoattack_points=0"])
    with pytest.raises(ConfigError, match="finetune.gamma"):
        load_rift_config(None, ["finetune.gamma=0"])
    cfg = RiftConfig()
    cfg.evaluate.suites = ["paper", "bogus"]
    with pytest.raises(ConfigError, match="bogus"):  # a config built in Python: before loading
        RiftRun("/nonexistent-run", cfg)


# ------------------------------------------------------------------ 2. corrupt step files


CORRUPT = [
    ("mrc/done.json", "{bad"),
    ("mrc/done.json", "[]"),
    ("mrc/mrc.json", '{"x": 1}'),
    ("mrc/mrc.json", "garbage"),
    ("finetune/done.json", "garbage"),
    ("finetune/finetune.json", "[1]"),
    ("interpolate/grid.json", "{}"),
    ("interpolate/done.json", "3"),
    ("evaluate/summary.json", "garbage"),
]


@pytest.fixture(scope="module")
def finished(at_run, tmp_path_factory):  # noqa: F811
    from fortify.rift.pipeline import RiftRun

    out = tmp_path_factory.mktemp("rift") / "out"
    RiftRun(at_run, _opts(), out=out).run_all()
    return out


@pytest.mark.parametrize(("name", "text"), CORRUPT)
def test_a_corrupt_step_file_is_recomputed_with_a_warning(
    at_run,  # noqa: F811
    finished,
    tmp_path,
    caplog,
    name,
    text,
):
    from fortify.rift.pipeline import RiftRun

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / name).write_text(text)
    with caplog.at_level("WARNING", logger="fortify.rift"):
        summary = RiftRun(at_run, _opts(), out=out).run_all()
    assert set(summary["models"]) == {"AT", "RiFT"}
    step = name.split("/")[0]
    assert f"{step}: the " in caplog.text and "unreadable" in caplog.text
    assert str(out / step) in caplog.text  # the warning names the file or its folder
    json.loads((out / name).read_text())  # replaced by the recomputed result
    assert json.loads((out / step / "done.json").read_text())["step"] == step
    if step == "finetune":  # the old fine-tuning run is moved aside, never deleted
        (old,) = out.glob("finetune.old-*")
        assert (old / name.split("/")[1]).read_text() == text


def test_mrc_report_load_names_the_bad_file(tmp_path):
    from fortify.errors import DataError
    from fortify.rift.mrc_report import MRCReport

    (tmp_path / "mrc.json").write_text('{"x": 1}')
    with pytest.raises(DataError, match=r"mrc\.json.*unreadable.*modules"):
        MRCReport.load(tmp_path)


# ------------------------------------------------------------------ 3. output paths up front


def _t1_args(*argv: str) -> argparse.Namespace:
    from fortify.replicate import fsr_table1 as t1

    parser = argparse.ArgumentParser()
    t1.add_arguments(parser)
    return parser.parse_args(list(argv))


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_work(monkeypatch, "the output paths")


@pytest.mark.parametrize("option", ["--doc", "--per-seed-dir", "--out"])
def test_fsr_table1_checks_output_paths_before_any_work(tmp_path, monkeypatch, option):
    from fortify.replicate import fsr_table1 as t1

    _no_work(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("")
    bad = str(afile / ("x.md" if option == "--doc" else "x"))
    argv = ["--out", str(tmp_path / "out"), option, bad]
    with pytest.raises(RunDirError, match=rf"{option}.*is a file, not a folder"):
        t1.run(_t1_args(*argv))
    with pytest.raises(RunDirError, match=option):  # --workers: before the jobs start
        t1.jobs(_t1_args(*argv))
    assert not (tmp_path / "out").exists() or option == "--out"
    with pytest.raises(RunDirError, match="is a folder"):
        t1.run(_t1_args("--out", str(tmp_path / "out"), "--doc", str(tmp_path)))


@pytest.mark.parametrize("name", ["fsr-table4", "rift-table1"])
def test_other_tables_check_output_paths_before_any_work(tmp_path, monkeypatch, name):
    from fortify.cli.main import main

    _no_work(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("")
    argv = ["replicate", name, "--out", str(tmp_path / "out"), "--doc", str(afile / "x.md")]
    assert main(argv) == 2
    assert not (tmp_path / "out").exists()


def test_check_outputs_accepts_new_folders_and_refuses_files(tmp_path):
    from fortify.replicate.common import check_outputs

    check_outputs(
        files={"--doc": tmp_path / "a" / "b.md"}, folders={"--out folder": tmp_path / "c"}
    )
    assert list(tmp_path.iterdir()) == []  # nothing created
    (tmp_path / "f").write_text("")
    with pytest.raises(RunDirError, match="--out folder"):
        check_outputs(folders={"--out folder": tmp_path / "f" / "x"})


# ------------------------------------------------------------------ 4. estimate and seeds


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--estimate", "--rows", ""], "--rows names no row"),
        (["--estimate", "--rows", " , "], "--rows names no row"),
        (["--estimate", "--assume-robust", "nan"], "--assume-robust"),
        (["--estimate", "--assume-robust", "2"], "--assume-robust"),
        (["--estimate", "--assume-robust", "-0.1"], "--assume-robust"),
        (["--seeds", "0", "--seed", "1"], "--seeds.*--seed.*not both"),
        (["--seed", "-1"], "--seed must be"),
    ],
)
def test_fsr_table1_refuses_nonsense_estimate_and_seed_options(
    tmp_path, monkeypatch, argv, message
):
    from fortify.replicate import fsr_table1 as t1

    _no_work(monkeypatch)
    import fortify.replicate._fsr_table1_page as page

    monkeypatch.setattr(page, "estimate", lambda *a, **k: pytest.fail("estimated"))
    with pytest.raises(ConfigError, match=message):
        t1.run(_t1_args("--out", str(tmp_path / "out"), *argv))


def test_fsr_table1_single_seed_alone_is_fine():
    from fortify.replicate import _fsr_recipe as recipe
    from fortify.replicate import fsr_table1 as t1
    from fortify.replicate.common import seeds_given

    args = _t1_args("--seed", "3")
    assert not seeds_given(args) and t1._check_args(args) == list(t1.ROWS)
    assert recipe._seeds(args) == [3]
    assert seeds_given(_t1_args("--seeds", "0"))


def test_rift_table1_checks_its_rift_options_before_training(tmp_path, monkeypatch):
    from fortify.cli.main import main

    _no_work(monkeypatch)
    argv = ["replicate", "rift-table1", "--out", str(tmp_path / "out")]
    assert main([*argv, "--set", "interpolate.step=0"]) == 2
    assert main([*argv, "--set", "nope.x=1"]) == 2
    assert not (tmp_path / "out").exists()
