"""Bad input found by fuzzing the Python API and the report/compare/export/analyze commands:
each case raises a FortifyError subclass (exit code 2 on the command line) whose message names
the bad value and what is allowed, before any work is done or any file is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_cnn
from torch import nn

from fortify import stats
from fortify.attacks import fgsm, fgsm_attack, pgd, pgd_attack
from fortify.cli.main import main
from fortify.errors import (
    ComparisonError,
    ConfigError,
    DataError,
    EvaluationError,
    FortifyError,
)
from fortify.evaluate import EvalReport, evaluate

EPS = 0.1


def _cnn(k: int = 3) -> nn.Module:
    return tiny_cnn(k)


@pytest.fixture()
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 0])


ATTACKS = {
    "pgd": lambda m, x, y, **kw: pgd(m, x, y, eps=EPS, steps=2, **kw),
    "pgd_attack": lambda m, x, y, **kw: pgd_attack(m, x, y, eps=EPS, steps=2, **kw),
    "fgsm": lambda m, x, y, **kw: fgsm(m, x, y, eps=EPS, **kw),
    "fgsm_attack": lambda m, x, y, **kw: fgsm_attack(m, x, y, eps=EPS, **kw),
    "evaluate": lambda m, x, y, **kw: evaluate(m, x, y, eps=EPS, suite="quick", checks=False),
}


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- 1. dtypes


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize(
    "x_dtype, model_dtype, words",
    [
        (torch.float64, torch.float32, r"float64.*float32.*x\.float\(\)"),
        (torch.float16, torch.float32, r"float16.*float32.*x\.float\(\)"),
        (torch.bfloat16, torch.float32, r"bfloat16.*float32.*x\.float\(\)"),
        (torch.float32, torch.float64, r"float32.*float64.*x\.double\(\)"),
        (torch.float32, torch.float16, r"float32.*float16.*x\.half\(\)"),
    ],
)
def test_dtype_mismatch_names_both_dtypes(attack, x_dtype, model_dtype, words, xy):
    x, y = xy
    model = _cnn().to(model_dtype)
    with pytest.raises(DataError, match=words):
        ATTACKS[attack](model, x.to(x_dtype), y)


def test_matching_dtypes_still_attack(xy):
    x, y = xy
    model = _cnn().double()
    assert pgd(model, x.double(), y, eps=EPS, steps=2).dtype == torch.float64


# ----------------------------------------------------------------------------- 2.-4. evaluate


@pytest.mark.parametrize("device", ["gpu", 0, "cuda:x"])
def test_evaluate_refuses_unknown_devices(device, xy):
    with pytest.raises(ConfigError, match=f"device {device!r}.*allowed: auto"):
        evaluate(_cnn(), *xy, eps=EPS, suite="quick", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_evaluate_refuses_cuda_without_a_gpu(xy):
    with pytest.raises(ConfigError, match="no usable CUDA GPU"):
        evaluate(_cnn(), *xy, eps=EPS, suite="quick", device="cuda")


@pytest.mark.parametrize(
    "settings, exc, words",
    [
        ([1], ConfigError, r"settings must be a dict.*\[1\]"),
        ({1: "a"}, ConfigError, "str keys"),
        ({"n_points": 1000}, ConfigError, r"\['n_points'\].*reserved keys: suite"),
        (
            {"eps": 0.5, "suite": "full", "points_sha256": "abc"},
            ConfigError,
            r"\['eps', 'points_sha256', 'suite'\]",
        ),
    ],
)
def test_evaluate_settings_add_and_never_replace(settings, exc, words, xy):
    with pytest.raises(exc, match=words):
        evaluate(_cnn(), *xy, eps=EPS, suite="quick", checks=False, settings=settings)


def test_reserved_settings_cover_what_evaluate_records(xy):
    from fortify.evaluate.driver import RESERVED_SETTINGS

    report = evaluate(
        _cnn(),
        *xy,
        eps=EPS,
        suite="quick",
        check_points=4,
        square_queries=5,
        settings={"dataset": "digits"},
    )
    assert report.settings["dataset"] == "digits"
    assert set(report.settings) - {"dataset"} <= set(RESERVED_SETTINGS)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"seed": -1}, r"seed.*\[0, 2\*\*63 - 1\].*-1"),
        ({"seed": "a"}, r"seed.*'a'"),
        ({"seed": 1.5}, r"seed.*1\.5"),
        ({"check_points": 0}, r"check_points.*>= 1.*got 0"),
        ({"check_points": -1}, r"check_points.*>= 1.*got -1"),
        ({"square_queries": 0}, r"square_queries.*>= 1.*got 0"),
        ({"square_queries": -5}, r"square_queries.*>= 1.*got -5"),
        ({"batch_size": True}, r"batch_size.*>= 1.*True"),
        ({"checks": "no"}, r"checks must be True or False.*'no'"),
    ],
)
def test_evaluate_counts_and_seed_are_checked_up_front(kwargs, words, xy):
    with pytest.raises(ConfigError, match=words):
        evaluate(_cnn(), *xy, eps=EPS, suite="quick", **kwargs)


def test_check_points_need_not_be_valid_without_checks(xy):
    report = evaluate(_cnn(), *xy, eps=EPS, suite="quick", checks=False, check_points=0)
    assert report.settings["check_points"] == 0


# ----------------------------------------------------------------------------- 5. attacks


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("model", [None, 5])
def test_a_model_that_cannot_be_called_is_named(attack, model, xy):
    with pytest.raises(ConfigError, match=f"model must be an nn.Module.*{type(model).__name__}"):
        ATTACKS[attack](model, *xy)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_images_the_model_cannot_take_are_named(attack):
    x, y = torch.rand(4, 1, 1, 1), torch.zeros(4, dtype=torch.long)
    with pytest.raises(DataError, match=r"cannot take images of shape.*\(4, 1, 1, 1\): .*Kernel"):
        ATTACKS[attack](_cnn(), x, y)


def test_other_failures_of_the_model_become_evaluation_errors(xy):
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("bad\nthing")

    with pytest.raises(EvaluationError, match=r"failed on inputs of shape.*ValueError: bad thing"):
        pgd(broken, *xy, eps=EPS, steps=1)


@pytest.mark.parametrize("attack", ["pgd", "pgd_attack", "fgsm", "fgsm_attack"])
def test_x_is_checked_before_y(attack, xy):
    x, y = xy
    with pytest.raises(DataError, match=r"x must be a tensor \(N, C, H, W\).*\(1, 8, 8\)"):
        ATTACKS[attack](_cnn(), x[0], y)


@pytest.mark.parametrize("attack", ["pgd", "pgd_attack", "fgsm", "fgsm_attack"])
@pytest.mark.parametrize(
    "forward, words",
    [
        (lambda m, x: m(x) * float("nan"), "NaN or Inf logits for 4 of 4"),
        (lambda m, x: m(x).round().long(), "logits of dtype torch.int64.*float"),
    ],
)
def test_non_float_or_nan_logits_are_refused(attack, forward, words, xy):
    model = _cnn()
    with pytest.raises(EvaluationError, match=words):
        ATTACKS[attack](lambda x: forward(model, x), *xy)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda m, x, y: pgd(m, x, y, eps=EPS, steps=1, random_start="no"), "random_start.*'no'"),
        (lambda m, x, y: pgd(m, x, y, eps=EPS, steps=1, targeted=1, target=y), "targeted.*1"),
        (lambda m, x, y: fgsm(m, x, y, eps=EPS, targeted="yes", target=y), "targeted.*'yes'"),
        (lambda m, x, y: pgd(m, x, y, eps=EPS, steps=1, target=y), "target= was given.*targeted"),
        (lambda m, x, y: fgsm_attack(m, x, y, eps=EPS, target=y), "target= was given"),
        (
            lambda m, x, y: pgd(m, x, y, eps=EPS, steps=1, step_size=float("inf")),
            r"step_size.*\(0, inf\), got inf",
        ),
    ],
)
def test_attack_options(call, words, xy):
    with pytest.raises(ConfigError, match=words):
        call(_cnn(), *xy)


# ----------------------------------------------------------------------------- 6. stats


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: stats.mean_sd(["a", "b"]), "mean_sd values must be numbers.*'a'"),
        (lambda: stats.mean_sd(None), "mean_sd needs a list of numbers.*NoneType"),
        (lambda: stats.mean_sd("12"), "mean_sd needs a list of numbers.*str"),
        (lambda: stats.verdict(None), "verdict needs an Interval.*NoneType"),
        (lambda: stats.seed_point_bootstrap(5, 5), "a_per_seed must be a list.*int"),
        (lambda: stats.seed_point_bootstrap(None, None), "a_per_seed must be a list.*NoneType"),
        (
            lambda: stats.seed_point_bootstrap([[1, 0]], (r for r in [[1, 0]])),
            "b_per_seed must be a list.*generator",
        ),
    ],
)
def test_stats_arguments(call, words):
    with pytest.raises(DataError, match=words):
        call()


def test_stats_still_take_arrays_and_tensors():
    assert stats.mean_sd(torch.tensor([1.0, 3.0])).mean == 2.0
    iv = stats.seed_point_bootstrap(torch.zeros(2, 5), torch.ones(2, 5))
    assert iv.estimate == 100.0


# ----------------------------------------------------------------------------- 7. attach


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Pool(nn.Module):
    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(f, 2)


class _Pair(nn.Module):
    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return f, f


@pytest.mark.parametrize(
    "factory, words",
    [
        (lambda s: None, r"factory returned a NoneType for 'features.1'.*nn.Module"),
        (lambda s: "block", r"factory returned a str"),
        (lambda s: _Pool(), r"returns a tensor of shape \(2, 4, 3, 3\).*\(2, 4, 6, 6\)"),
        (lambda s: _Pair(), r"returns a tuple.*same shape"),
        (lambda s: nn.Conv2d(3, 3, 1), r"fails on its feature map.*\(2, 4, 6, 6\).*RuntimeError"),
    ],
)
def test_attach_checks_the_factory_result_before_changing_the_model(factory, words):
    from fortify.defenses.attach import DEFENSES_ATTR, attach

    model = _Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FortifyError, match=words):
        attach(model, factory, "features.1", (1, 8, 8))
    assert not hasattr(model, DEFENSES_ATTR)
    assert not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_attach_dry_pass_keeps_the_rng_and_the_block_mode():
    from fortify.defenses.attach import attach

    block, net = nn.Sequential(nn.BatchNorm2d(4), nn.Dropout(0.5)).train(), _Net()
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    attach(net, lambda s: block, "features.1", (1, 8, 8))
    assert torch.equal(torch.rand(1), expected) and block.training


# ----------------------------------------------------------------------------- 8. --model-arg


def test_model_arg_with_invalid_yaml(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = _cli(
        capsys, "eval", "--model", "small-cnn", "--dataset", "digits", "--model-arg", "width=[1,"
    )
    assert rc == 2 and "width=[1," in err and "not valid YAML" in err
    assert "Traceback" not in err and "ParserError" not in err


# ----------------------------------------------------------------------------- 9.-10. report


@pytest.fixture(scope="module")
def report_dict() -> dict:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    return evaluate(_cnn(), x, y, eps=EPS, suite="quick", checks=False).to_dict()


def _write(folder: Path, name: str, data: object) -> Path:
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def _edit(d: dict, **changes: object) -> dict:
    out = json.loads(json.dumps(d))
    for key, value in changes.items():
        if key.startswith("settings_"):
            out["settings"][key[len("settings_") :]] = value
        elif value is _DROP:
            del out[key]
        else:
            out[key] = value
    return out


_DROP = object()


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: [], "a JSON object.*got a list"),
        (lambda d: None, "a JSON object.*got nothing"),
        (lambda d: _edit(d, settings=[]), "no 'settings' object.*got a list"),
        (lambda d: _edit(d, outcomes=_DROP), "no 'outcomes'.*got nothing"),
        (lambda d: _edit(d, outcomes={}), "no 'outcomes'.*got an object.*no column"),
        (lambda d: _edit(d, outcomes=[]), "no 'outcomes'.*got a list"),
        (lambda d: _edit(d, outcomes=[{"name": "Natural"}]), "lacks the key 'points'"),
        (lambda d: _edit(d, settings_eps="x"), "eps 'x'.*number > 0"),
        (lambda d: _edit(d, settings_n_points="x"), "n_points 'x'.*integer >= 1"),
        (lambda d: _edit(d, settings_n_points=0), "n_points 0.*integer >= 1"),
        (lambda d: _edit(d, format="other"), "format is 'other'"),
    ],
)
@pytest.mark.parametrize("command", ["report", "compare"])
def test_report_files_that_are_not_reports(command, make, words, report_dict, tmp_path, capsys):
    bad = _write(tmp_path, "bad.json", make(report_dict))
    good = _write(tmp_path, "good.json", report_dict)
    argv = [command, str(bad)] if command == "report" else [command, str(good), str(bad)]
    rc, err = _cli(capsys, *argv)
    assert rc == 2, err
    assert "bad.json is not a valid fortify eval.json" in err
    assert len(err.strip().splitlines()) == 1 and __import__("re").search(words, err), err


def test_stored_report_still_loads(report_dict, tmp_path):
    again = EvalReport.load(_write(tmp_path, "eval.json", report_dict))
    assert again.table() == EvalReport.from_dict(report_dict).table()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--columns", ",,"], "--columns ',,' names no column"),
        (["--columns", " , "], "names no column"),
        (["--resamples", "5"], "resamples must be an integer in"),
        (["--level", "7"], "level must be a number in"),
        (["--ci-seed", "-1"], "seed must be an integer >= 0"),
    ],
)
@pytest.mark.parametrize("command", ["report", "report-compare", "compare"])
def test_compare_options_are_always_checked(command, extra, words, report_dict, tmp_path, capsys):
    path = str(_write(tmp_path, "eval.json", report_dict))
    argv = {
        "report": ["report", path, path],
        "report-compare": ["report", path, path, "--compare"],
        "compare": ["compare", path, path],
    }[command]
    rc, err = _cli(capsys, *argv, *extra)
    assert rc == 2 and words in err, err


def test_report_refuses_columns_it_does_not_have(report_dict, tmp_path, capsys):
    path = str(_write(tmp_path, "eval.json", report_dict))
    rc, err = _cli(capsys, "report", path, "--columns", "nope")
    assert rc == 2 and "['nope'] not in the report" in err and "PGD-20" in err, err
    assert _cli(capsys, "report", path, "--columns", "PGD-20")[0] == 0


def test_compare_reports_refuses_an_empty_column_list(report_dict):
    r = EvalReport.from_dict(report_dict)
    from fortify.evaluate.compare import compare_reports

    with pytest.raises(ComparisonError, match="non-empty list of column names"):
        compare_reports(r, r, columns=[])


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_compare_output_paths_are_checked_before_the_work(
    flag, report_dict, tmp_path, capsys, monkeypatch
):
    import fortify.cli.cmd_compare as cmd

    path = str(_write(tmp_path, "eval.json", report_dict))
    monkeypatch.setattr(cmd, "compare_paths", lambda *a: pytest.fail("compared before checking"))
    rc, err = _cli(capsys, "compare", path, path, flag, str(tmp_path))
    assert rc == 2 and f"{flag} {str(tmp_path)!r} is a folder" in err and ".tmp" not in err, err
    (tmp_path / "file").write_text("")
    rc, err = _cli(capsys, "compare", path, path, flag, str(tmp_path / "file" / "x.md"))
    assert rc == 2 and "is a file, not a folder" in err, err


# ----------------------------------------------------------------------------- 11. export


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    from fortify.config import ExperimentConfig, from_dict, to_dict
    from fortify.factory import build_model
    from fortify.runs import RunDir, save_checkpoint

    cfg = from_dict(
        ExperimentConfig,
        {"name": "tiny", "data": {"name": "digits"}, "model": {"name": "small-cnn"}},
    )
    cfg.model.kwargs = {"width": 4}
    model = build_model(cfg.model, cfg.defenses, 10, (1, 8, 8))
    rd = RunDir.open(tmp_path / "run", mode="new", config=to_dict(cfg))
    meta = {"config": to_dict(cfg), "num_classes": 10, "image_shape": [1, 8, 8]}
    save_checkpoint(rd.checkpoint_path("best"), model, meta)
    return rd.path


@pytest.mark.parametrize("content, words", [([], "a JSON list"), (None, "null"), ({}, "table")])
def test_export_refuses_a_report_without_accuracies(content, words, run_dir, tmp_path, capsys):
    report = _write(tmp_path, "list.json", content)
    out = tmp_path / "rb"
    argv = ["export", "robustbench", str(run_dir), "--out", str(out), "--name", "A"]
    rc, err = _cli(capsys, *argv, "--report", str(report))
    assert rc == 2 and "list.json is not an evaluation report" in err and words in err, err
    assert not out.exists()


def test_export_needs_overwrite_to_replace_an_export(run_dir, tmp_path, capsys):
    out = tmp_path / "rb"
    argv = ["export", "robustbench", str(run_dir), "--out", str(out), "--name", "A"]
    assert _cli(capsys, *argv)[0] == 0
    info = out / "model_info" / "digits" / "Linf" / "A.json"
    info.write_text(info.read_text().replace('"venue": ""', '"venue": "kept"'))
    rc, err = _cli(capsys, *argv)
    assert rc == 2 and "A.pt already exists" in err and "--overwrite" in err, err
    assert '"venue": "kept"' in info.read_text()
    assert _cli(capsys, *argv, "--overwrite")[0] == 0
    assert '"venue": "kept"' not in info.read_text()
    assert _cli(capsys, *argv[:-1], "B")[0] == 0  # another name is another export


# ----------------------------------------------------------------------------- 12. analyze


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--what", "features", "--eps", "0"], r"--eps must be a number in \(0, 1\].*got 0"),
        (["--what", "features", "--eps", "-0.1"], r"--eps must be.*got -0.1"),
        (["--what", "features", "--eps", "nan"], r"--eps must be.*got nan"),
        (["--what", "features", "--memory", "0"], "--memory must be an integer >= 1, got 0"),
        (["--what", "features", "--memory", "-1"], "--memory must be an integer >= 1, got -1"),
    ],
)
def test_analyze_numbers_are_checked_before_loading(extra, words, tmp_path, capsys):
    rc, err = _cli(capsys, "analyze", str(tmp_path / "no-run"), *extra)
    assert rc == 2 and __import__("re").search(words, err), err


def test_analyze_names_an_input_shape_the_model_cannot_take(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a model that is not a run reports into ./runs/<name>
    argv = ["analyze", "--model", "small-cnn", "--input-shape", "1", "1", "1"]
    rc, err = _cli(capsys, *argv, "--num-classes", "10")
    assert rc == 2 and "cannot take images of shape (N, C, H, W) = (1, 1, 1, 1)" in err, err


# ----------------------------------------------------------------------------- 13. data root

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="needs the Debian Fashion-MNIST copy")
def test_an_explicit_data_root_that_does_not_exist_is_an_error(tmp_path):
    from fortify.data import load_dataset

    with pytest.raises(DataError, match=r"nope \(does not exist\)") as e:
        load_dataset("fashion-mnist", str(tmp_path / "nope"))
    assert str(DEBIAN_FASHION) not in str(e.value)


def test_a_data_root_that_is_a_file_is_an_error(tmp_path):
    from fortify.data import load_dataset

    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"data root .*file' is a file"):
        load_dataset("mnist", str(tmp_path / "file"))


def test_eval_with_a_missing_data_root_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", "small-cnn", "--dataset", "fashion-mnist"]
    rc, err = _cli(capsys, *argv, "--data-root", str(tmp_path / "nope"), "--n-points", "4")
    assert rc == 2 and "nope (does not exist)" in err, err
