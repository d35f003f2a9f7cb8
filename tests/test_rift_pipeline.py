"""The whole RiFT workflow on a tiny AT run (digits 8×8, small-cnn width 4): files, resume, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from fortify.config import ExperimentConfig
from fortify.config.loader import from_dict


@pytest.fixture(scope="module")
def at_run(tmp_path_factory):
    from fortify.train import fit

    d = tmp_path_factory.mktemp("at") / "run"
    cfg = from_dict(
        ExperimentConfig,
        {
            "name": "tiny-at",
            "device": "cpu",
            "data": {"name": "digits", "val_size": 200},
            "model": {"name": "small-cnn", "kwargs": {"width": 4}},
            "train": {
                "objective": "at",
                "epochs": 2,
                "lr": 0.05,
                "milestones": [],
                "attack": {"eps": 0.1, "step_size": 0.025, "steps": 3},
                "val_points": 100,
                "val_attack_steps": 2,
            },
        },
    )
    fit(cfg, d, progress=False)
    return d


BN_BUFFERS = {"running_mean", "running_var", "num_batches_tracked"}


def _opts(extra: list[str] | None = None):
    from fortify.rift.config import load_rift_config

    return load_rift_config(
        None,
        [
            "device=cpu",
            "mrc.passes=2",
            "mrc.n_points=64",
            "mrc.batch_size=64",
            "finetune.epochs=1",
            "finetune.lr=0.01",
            "interpolate.step=0.5",
            "interpolate.n_points=64",
            "evaluate.suites=[pgd10, ood]",
            "evaluate.n_points=32",
            "evaluate.checks=false",
            *(extra or []),
        ],
    )


def test_full_workflow_and_resume(at_run, caplog):
    from fortify.rift.pipeline import RiftRun

    rr = RiftRun(at_run, _opts())
    summary = rr.run_all()
    out = at_run / "rift"
    for step in ("mrc", "finetune", "interpolate", "evaluate"):
        assert (out / step / "done.json").is_file()
    for f in (
        "mrc/mrc.json",
        "mrc/mrc.png",
        "interpolate/grid.json",
        "interpolate/tradeoff.png",
        "interpolate/rift.safetensors",
        "evaluate/summary.md",
        "finetune/finetune.json",
    ):
        assert (out / f).stat().st_size > 0, f
    mrc = json.loads((out / "mrc/mrc.json").read_text())
    assert mrc["extra"]["split"] == "validation" and mrc["n_points"] == 64
    grid = json.loads((out / "interpolate/grid.json").read_text())
    assert [p["alpha"] for p in grid["points"]] == [0.0, 0.5, 1.0]
    assert grid["rule"]["rule"] == "paired" and grid["rule"]["n_points"] == 64
    assert all(len(p["clean_ci"]) == 2 and len(p["robust_ci"]) == 2 for p in grid["points"])
    assert grid["points"][0]["robust_ci"] == [0.0, 0.0]  # α = 0 is θ_AT itself
    ft = json.loads((out / "finetune/finetune.json").read_text())
    # default BN adapt (the release): the module's weight and BN running statistics change
    assert ft["options"]["bn"] == "adapt" and ft["module"] + ".weight" in ft["changed_tensors"]
    others = set(ft["changed_tensors"]) - {ft["module"] + ".weight"}
    assert others and all(k.rsplit(".", 1)[1] in BN_BUFFERS for k in others)
    assert "auto: chose" in ft["reason"]
    assert set(summary["models"]) == {"AT", "RiFT"}
    assert summary["models"]["AT"]["ood_mean"] is not None
    # α = 0 grid point equals the AT model's validation accuracy: the endpoint is the AT model
    stamp = (out / "mrc/done.json").stat().st_mtime_ns
    assert "not adversarially" not in caplog.text
    caplog.set_level("INFO")
    RiftRun(at_run, _opts()).run_all()  # everything is skipped
    assert (out / "mrc/done.json").stat().st_mtime_ns == stamp
    assert "reusing the finished result" in caplog.text and "options changed" not in caplog.text


def test_rerun_with_changed_options_redoes_the_step_and_says_so(at_run, tmp_path, caplog):
    from fortify.rift.pipeline import RiftRun

    out = tmp_path / "r"
    first = RiftRun(at_run, _opts(), out=out)
    with caplog.at_level("INFO", logger="fortify.rift"):
        first.interpolate()
    assert "reusing" not in caplog.text  # a step just computed is not announced as reused
    stamp = (out / "finetune/done.json").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO", logger="fortify.rift"):
        grid = RiftRun(at_run, _opts(["interpolate.step=0.25"]), out=out).interpolate()
    assert [p["alpha"] for p in grid["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert "interpolate: options changed" in caplog.text and "step: 0.5 -> 0.25" in caplog.text
    assert (out / "finetune/done.json").stat().st_mtime_ns == stamp  # unchanged: reused
    caplog.clear()
    with caplog.at_level("INFO", logger="fortify.rift"):
        RiftRun(at_run, _opts(["finetune.lr=0.02"]), out=out).interpolate()
    assert "finetune: options changed" in caplog.text and "lr: 0.01 -> 0.02" in caplog.text
    assert "interpolate: options changed" in caplog.text  # depends on the fine-tuned weights


def test_cli_mrc_with_given_module_error(at_run, tmp_path, capsys):
    from fortify.cli.main import main

    code = main(
        [
            "rift",
            "mrc",
            str(at_run),
            "--out",
            str(tmp_path / "r"),
            "--passes",
            "1",
            "--points",
            "32",
            "--device",
            "cpu",
            "--variant",
            "first-projection",
        ]
    )
    assert code == 0
    assert "| 1 |" in capsys.readouterr().out
    rep = json.loads((tmp_path / "r/mrc/mrc.json").read_text())
    assert rep["variant"] == "first-projection" and rep["passes"] == 1
    code = main(
        [
            "rift",
            "finetune",
            str(at_run),
            "--out",
            str(tmp_path / "r"),
            "--module",
            "features.9",
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["standard", "fpd"])
def test_non_adversarial_run_warns(tmp_path, caplog, objective):
    from fortify.config.loader import to_dict
    from fortify.models import create
    from fortify.rift.pipeline import RiftRun
    from fortify.runs import RunDir, save_checkpoint

    cfg = from_dict(
        ExperimentConfig,
        {
            "data": {"name": "digits"},
            "train": {"objective": objective},
            "model": {"name": "small-cnn", "kwargs": {"width": 4}},
        },
    )
    run = RunDir.open(tmp_path / "std", "new", to_dict(cfg))
    save_checkpoint(
        run.checkpoint_path("best"),
        create("small-cnn", 10, 1, width=4),
        {"config": to_dict(cfg), "num_classes": 10, "image_shape": [1, 8, 8]},
    )
    caplog.set_level("WARNING")
    rr = RiftRun(tmp_path / "std", _opts())
    assert "not adversarially" in caplog.text and repr(objective) in caplog.text
    assert rr.eps == pytest.approx(0.1)  # dataset default for a standard run
    torch.manual_seed(0)


def test_replicate_runs_both_bn_settings_side_by_side(at_run, tmp_path, capsys):
    """rift-table1 --bn adapt,frozen: one AT model, two RiFT runs; the second reuses the MRC
    step and the AT model's reports; the page puts both rows and their difference side by side."""
    from fortify.cli.main import main

    doc = tmp_path / "rift.md"
    argv = [
        "replicate", "rift-table1", "--run", str(at_run), "--out", str(tmp_path / "out"),
        "--doc", str(doc), "--bn", "adapt,frozen", "--device", "cpu",
        "--set", "mrc.passes=2", "--set", "mrc.n_points=64", "--set", "mrc.batch_size=64",
        "--set", "finetune.epochs=1", "--set", "finetune.lr=0.01",
        "--set", "interpolate.step=0.5", "--set", "interpolate.n_points=64",
        "--set", "evaluate.suites=[pgd10, ood]", "--set", "evaluate.n_points=32",
        "--set", "evaluate.checks=false",
    ]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "out"
    adapt, frozen = out / "rift-adapt", out / "rift-frozen"
    assert json.loads((adapt / "finetune" / "finetune.json").read_text())["options"]["bn"] == (
        "adapt"
    )
    assert json.loads((frozen / "finetune" / "finetune.json").read_text())["options"]["bn"] == (
        "frozen"
    )
    # shared work: the same MRC result and the same AT-model report (copied, not recomputed)
    assert (adapt / "mrc" / "done.json").read_bytes() == (frozen / "mrc" / "done.json").read_bytes()
    for name in ("at-pgd10.json", "at-ood.json"):
        assert (adapt / "evaluate" / name).read_bytes() == (frozen / "evaluate" / name).read_bytes()
    text = doc.read_text()
    assert "| AT + RiFT (BN adapt) |" in text and "| AT + RiFT (BN frozen) |" in text
    assert "rift_seed0_adapt.md" in text and (tmp_path / "rift_seed0_frozen.md").is_file()
    assert "| method | seeds | OOD |" in text
    alpha_rows = [ln for ln in text.splitlines() if ln.startswith("| 0 | ")]
    assert [ln.split(" | ")[1] for ln in alpha_rows] == ["adapt", "frozen"], alpha_rows
    assert all(ln.count("[") == 2 for ln in alpha_rows)  # clean and PGD-10 CIs at α = 1
    adapt_page = (tmp_path / "rift_seed0_adapt.md").read_text()
    assert "wall time of this call" in adapt_page and "steps reused" not in adapt_page
    assert main(argv) == 0  # everything reused: the page says that its time is not included
    assert "finished steps reused" in (tmp_path / "rift_seed0_adapt.md").read_text()
    # the BN setting is chosen with --bn, not with --set
    assert main([*argv, "--set", "finetune.bn=frozen"]) == 2
    assert "--bn" in capsys.readouterr().err


def test_stored_report_is_reused_only_for_the_same_weights_points_and_settings(tmp_path):
    from torch import nn

    import fortify.data
    from fortify.evaluate import evaluate
    from fortify.rift.evaluation import stored_report

    x, y = fortify.data.load_dataset("digits").test.head(16).floats()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    evaluate(model, x, y, suite="pgd10", eps=0.1, seed=0, checks=False, batch_size=8).save(
        tmp_path, "at-pgd10"
    )
    want = {"suite": "pgd10", "eps": 0.1, "seed": 0, "checks": False, "batch_size": 8}
    assert stored_report(tmp_path, "at-pgd10", model, x, y, want) is not None
    assert stored_report(tmp_path, "at-pgd10", model, x, y, {**want, "batch_size": 16}) is None
    assert stored_report(tmp_path, "at-pgd10", model, x, y, {**want, "seed": 1}) is None
    assert stored_report(tmp_path, "at-pgd10", model, x[:8], y[:8], want) is None
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    assert stored_report(tmp_path, "at-pgd10", other, x, y, want) is None
    assert stored_report(tmp_path, "missing", model, x, y, want) is None


def test_a_model_with_the_weights_of_another_reuses_its_reports(tmp_path, monkeypatch):
    """RiFT with α* = 0 is the AT model: its test reports are the AT model's, not recomputed."""
    import copy

    from torch import nn

    import fortify.data
    import fortify.evaluate
    from fortify.rift.config import EvalOptions
    from fortify.rift.evaluation import evaluate_models

    splits = fortify.data.load_dataset("digits")
    torch.manual_seed(0)
    at = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    moved = copy.deepcopy(at)
    with torch.no_grad():
        moved[1].bias += 1.0
    calls: list[int] = []
    real = fortify.evaluate.evaluate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fortify.evaluate, "evaluate", counting)
    opts = EvalOptions(suites=["pgd10"], n_points=16, batch_size=8, checks=False)
    models = {"AT": at, "RiFT": copy.deepcopy(at), "Moved": moved}
    out = evaluate_models(models, splits, eps=0.1, opts=opts, out_dir=tmp_path)
    assert len(calls) == 2  # AT and Moved; RiFT reuses AT's report
    assert out["models"]["RiFT"]["pgd10"] == out["models"]["AT"]["pgd10"]
    assert (tmp_path / "rift-pgd10.json").is_file()
    evaluate_models(models, splits, eps=0.1, opts=opts, out_dir=tmp_path, reuse=False)
    assert len(calls) == 5  # without reuse every model is evaluated
