"""Evaluator: suites, modes, report round-trip, checks, input validation, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fortify.errors import ConfigError, DataError, EvaluationError, FortifyError
from fortify.evaluate import EvalReport, evaluate, evaluate_split, plot_eps_curve, register_suite

EPS = 0.03


@pytest.fixture(scope="module")
def splits():
    import fortify.data

    return fortify.data.load_dataset("digits")


@pytest.fixture(scope="module")
def model(splits):
    return trained_cnn(splits, epochs=30)


def trained_cnn(splits, epochs: int) -> nn.Module:
    """small-cnn width 4 trained with Adam on the digits training set (seed 0), in eval mode."""
    import fortify.models

    torch.manual_seed(0)
    m = fortify.models.create("small-cnn", 10, 1, width=4)
    x, y = splits.train.floats()
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            b = perm[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[b]), y[b]).backward()
            opt.step()
    for p in m.parameters():
        p.grad = None
    return m.eval()


@pytest.fixture(scope="module")
def data(splits):
    x, y = splits.test.floats()
    return x[:96], y[:96]


@pytest.fixture(scope="module")
def both_report(model, data):
    x, y = data
    return evaluate(
        model,
        x,
        y,
        suite="paper",
        eps=EPS,
        mode="both",
        batch_size=48,
        check_points=64,
        square_queries=100,
    )


def test_paper_suite_layout_and_semantics(both_report, model, data):
    r = both_report
    assert r.columns == ["Natural", "FGSM", "PGD-20", "PGD-100", "C&W", "Ensemble"]
    t = r.table()
    assert set(t) == {"final", "best"}
    x, y = data
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item() * 100
    assert t["final"]["Natural"] == pytest.approx(clean)
    for col in r.columns[1:]:
        assert t["best"][col] <= t["final"][col] + 1e-9
        assert t["final"][col] <= clean + 1e-9
    assert t["final"]["PGD-20"] < clean  # the attack does something
    # Ensemble = per-sample worst case of all columns of the row
    for mode in ("final", "best"):
        ens = torch.ones(len(y), dtype=torch.bool)
        for col in ["Natural", "FGSM", "PGD-20", "PGD-100", "C&W"]:
            ens &= r.correct(col, mode)
        assert t[mode]["Ensemble"] == pytest.approx(100 * ens.float().mean().item())
        assert t[mode]["Ensemble"] <= min(v for k, v in t[mode].items() if k != "Ensemble")
    statuses = {c.name: c.status for c in r.checks}
    for name in (
        "robust ≤ clean",
        "best ≤ final",
        "zero gradients",
        "monotone in ε",
        "large ε → 0",
        "Square vs white-box",
    ):
        assert statuses[name] == "ok", (name, r.to_markdown())


def test_report_json_roundtrip_and_save(both_report, tmp_path):
    md, js = both_report.save(tmp_path)
    d = json.loads(js.read_text())
    assert (
        d["settings"]["eps"] == EPS
        and d["settings"]["mode"] == "both"
        and "torch" in d["settings"]["versions"]
    )
    per = {(o["name"], o["mode"]): o["correct"] for o in d["outcomes"]}
    assert len(per[("PGD-20", "final")]) == 96 and all(
        isinstance(v, bool) for v in per[("PGD-20", "final")]
    )
    # recompute Ensemble from the per-sample outcomes
    ens = [all(per[(c, m)][i] for c, m in per if m in ("final", "-")) for i in range(96)]
    assert d["table"]["final"]["Ensemble"] == pytest.approx(100 * sum(ens) / 96)
    again = EvalReport.load(tmp_path)
    assert again.table() == both_report.table()
    text = md.read_text()
    assert "| mode | Natural | FGSM | PGD-20 | PGD-100 | C&W | Ensemble |" in text
    assert "final (last PGD iterate counts)" in text and "best (" in text and "### Checks" in text
    assert not list(tmp_path.glob(".*tmp"))


def test_best_mode_alone_not_above_final(model, data):
    x, y = data
    kw = dict(suite="quick", eps=EPS, checks=False, batch_size=32)
    best = evaluate(model, x, y, mode="best", **kw).table()["best"]
    final = evaluate(model, x, y, mode="final", **kw).table()["final"]
    assert best["PGD-20"] <= final["PGD-20"]
    assert best["Ensemble"] <= final["Ensemble"]


def test_autoattack_suite_runs_pyautoattack(model, data):
    x, y = data
    r = evaluate(model, x[:24], y[:24], suite="full", eps=EPS, checks=False, batch_size=24)
    assert r.columns[-1] == "AutoAttack"
    t = r.table()["final"]
    assert t["AutoAttack"] <= t["Natural"]
    # AutoAttack is at least as strong as PGD-20 here (tiny undefended model)
    assert t["AutoAttack"] <= t["PGD-20"] + 100 / 24
    assert any(c.name == "AutoAttack's own checks" for c in r.checks)
    assert r.outcome("AutoAttack", "final").ensemble is False


class _Masked(nn.Module):
    """Quantised input → zero gradients almost everywhere (classic gradient masking)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


def test_autoattack_warnings_are_captured(model, data):
    x, y = data
    r = evaluate(
        _Masked(model), x[:8], y[:8], suite="autoattack", eps=0.1, checks=False, batch_size=8
    )
    msgs = [
        c.message for c in r.checks if c.name == "AutoAttack's own checks" and c.status == "warn"
    ]
    assert any("zero gradient" in m for m in msgs), r.to_markdown()
    assert "zero gradient" in r.to_markdown()


def test_checks_flag_gradient_masking(model, data):
    x, y = data
    r = evaluate(
        _Masked(model), x[:64], y[:64], suite="quick", eps=0.1, check_points=64, square_queries=200
    )
    st = {c.name: c.status for c in r.checks}
    assert st["zero gradients"] == "warn"
    assert st["large ε → 0"] == "warn"
    assert st["Square vs white-box"] == "warn", r.to_markdown()
    assert "WARN" in r.to_markdown()


def test_ball_violation_is_a_hard_error(model, data):
    x, y = data

    @register_suite("test-cheat")
    def cheat(ctx):
        ctx.run_attack("cheat", lambda xb, yb, sl: (xb + 2 * ctx.eps).clamp(0, 1))

    with pytest.raises(EvaluationError, match="outside"):
        evaluate(model, x[:8], y[:8], suite="test-cheat", eps=EPS, checks=False)

    @register_suite("test-box")
    def box(ctx):
        ctx.run_attack("box", lambda xb, yb, sl: xb + 0.5 * ctx.eps)

    with pytest.raises(EvaluationError, match=r"\[0, 1\]"):
        evaluate(model, torch.ones(4, 1, 8, 8), y[:4], suite="test-box", eps=EPS, checks=False)


def test_unknown_suite_lists_known(model, data):
    with pytest.raises(FortifyError, match="paper"):
        evaluate(model, *[t[:4] for t in data], suite="papr", eps=EPS)


def test_train_mode_model_is_evaluated_in_eval_and_restored(model, data):
    x, y = data
    model.train()
    model.features[0][1].eval()  # mixed modes must be restored per module
    try:
        mean = model.features[0][1].running_mean.clone()
        r = evaluate(model, x[:16], y[:16], suite="quick", eps=EPS, checks=False)
        assert (
            model.training and not model.features[0][1].training and model.features[1][1].training
        )
        assert torch.equal(mean, model.features[0][1].running_mean)
        assert any(
            c.name == "model mode" and c.status == "warn" and "eval mode" in c.message
            for c in r.checks
        )
    finally:
        model.eval()


def test_stochastic_model_refused(model, data):
    class Noisy(nn.Module):
        def forward(self, x):
            return model(x) + torch.randn(len(x), 10)

    with pytest.raises(EvaluationError, match="stochastic.*EOT"):
        evaluate(Noisy(), *[t[:8] for t in data], suite="quick", eps=EPS)


def _lin(k=10, d=64):
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k)).eval()


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda x, y: (x * 2, y), DataError, r"\[0, 1\]"),
        (lambda x, y: (x[:, 0], y), DataError, "4 dims"),
        (lambda x, y: ((x * 255).to(torch.uint8), y), DataError, "float"),
        (lambda x, y: (x, y + 10), DataError, r"labels must lie in \[0, 9\]"),
        (lambda x, y: (x, y[:-1]), DataError, "1-D tensor"),
        (
            lambda x, y: (x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y),
            DataError,
            "NaN",
        ),
        (
            lambda x, y: (x.clone().index_fill_(0, torch.tensor([1]), float("inf")), y),
            DataError,
            "NaN or Inf values in 1 image",
        ),
        (lambda x, y: (x[:, :, :6], y), DataError, r"cannot take images of shape.*\(8, 1, 6, 8\)"),
        (lambda x, y: (x.expand(-1, 3, -1, -1), y), DataError, r"shape.*\(8, 3, 8, 8\)"),
    ],
)
def test_bad_data(make, exc, words, data):
    x, y = make(*[t[:8] for t in data])
    with pytest.raises(exc, match=words):
        evaluate(_lin(), x, y, suite="quick", eps=EPS)


@pytest.mark.parametrize(
    "eps, norm, words",
    [
        (0.0, "linf", "positive"),
        (-0.1, "linf", "positive"),
        (8.0, "linf", "pixel units"),
        (9.0, "l2", "sqrt"),
        (0.1, "l1", "linf, l2"),
    ],
)
def test_bad_eps(eps, norm, words, data):
    with pytest.raises(ConfigError, match=words):
        evaluate(_lin(), *[t[:8] for t in data], suite="quick", eps=eps, norm=norm)


def test_bad_models(data):
    x, y = [t[:8] for t in data]
    lin = _lin()

    class Tup(nn.Module):
        def forward(self, x):
            return lin(x), [x]

    class Prob(nn.Module):
        def forward(self, x):
            return torch.softmax(lin(x), 1)

    class NaN(nn.Module):
        def forward(self, x):
            return lin(x) * float("nan")

    with pytest.raises(EvaluationError, match="tuple.*logits"):
        evaluate(Tup(), x, y, suite="quick", eps=EPS)
    with pytest.raises(EvaluationError, match="probabilities.*logits"):
        evaluate(Prob(), x, y, suite="quick", eps=EPS)
    with pytest.raises(EvaluationError, match="NaN or Inf logits"):
        evaluate(NaN(), x, y, suite="quick", eps=EPS)
    with pytest.raises(ConfigError, match="mode"):
        evaluate(lin, x, y, suite="quick", eps=EPS, mode="worst")


def test_evaluate_split_and_plot(model, splits, tmp_path):
    r = evaluate_split(model, splits.test, 16, eps=EPS, suite="quick", checks=False)
    assert r.settings["n_points"] == 16
    png = plot_eps_curve(
        {"small-cnn": [(0.0, 90.0), (0.03, 40.0), (0.1, 1.0)]}, tmp_path / "c.png", mark_eps=0.03
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _digits_run(model, run_dir):
    """A run directory holding ``model`` as its best checkpoint of a digits config."""
    from fortify.config import ExperimentConfig, to_dict
    from fortify.runs import save_checkpoint

    cfg = ExperimentConfig()
    cfg.data.name = "digits"
    cfg.model.kwargs = {"width": 4}
    meta = {"config": to_dict(cfg), "num_classes": 10, "image_shape": [1, 8, 8]}
    (run_dir / "checkpoints").mkdir(parents=True)
    save_checkpoint(run_dir / "checkpoints" / "best.safetensors", model, meta)
    return run_dir


def test_cli_eval_and_report(model, tmp_path, capsys):
    from fortify.cli.main import main

    runs = [_digits_run(model, tmp_path / name) for name in ("runA", "runB")]
    rc = main(
        [
            "eval",
            str(runs[0]),
            "--suite",
            "quick",
            "--n-points",
            "24",
            "--eps",
            str(EPS),
            "--mode",
            "both",
            "--no-checks",
            "--plot",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "PGD-20" in out and (runs[0] / "reports" / "eval.json").is_file()
    assert (runs[0] / "reports" / "eval-quick.md").is_file() and (
        runs[0] / "reports" / "eps_curve.png"
    ).is_file()
    ckpt = runs[1] / "checkpoints" / "best.safetensors"
    assert main(["eval", str(ckpt), "--suite", "quick", "--n-points", "24", "--no-checks"]) == 0
    capsys.readouterr()
    assert main(["report", str(runs[0]), str(runs[1]), "--checks"]) == 0
    table = capsys.readouterr().out
    assert "| runA | quick |" in table and "| runB | quick |" in table and "best" in table
    assert main(["eval", str(runs[0]), "--suite", "quick", "--eps", "-1"]) == 2
    assert "eps must be a positive" in capsys.readouterr().err


def test_cli_eval_refuses_data_that_does_not_fit_the_checkpoint(tmp_path, capsys):
    from fortify.cli.main import main
    from fortify.config import ExperimentConfig, to_dict
    from fortify.models import create
    from fortify.runs import save_checkpoint

    cfg = ExperimentConfig()
    cfg.data.name = "digits"
    cfg.model.kwargs = {"width": 4}
    cases = [
        ([1, 28, 28], 10, ["(1, 28, 28)", "(1, 8, 8)", "image size"]),
        ([1, 8, 8], 12, ["12 output classes", "has 10"]),
    ]
    for i, (shape, k, words) in enumerate(cases):
        ckpt = tmp_path / f"m{i}.safetensors"
        meta = {"config": to_dict(cfg), "num_classes": k, "image_shape": shape}
        save_checkpoint(ckpt, create("small-cnn", k, 1, width=4), meta)
        assert main(["eval", str(ckpt), "--suite", "quick", "--n-points", "8"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fortify eval: error:")
        for w in words:
            assert w in err


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bars_only_on_a_tty(model, data, capsys, monkeypatch, tty):
    import sys

    from fortify.train.loop import _progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    evaluate(model, *[t[:16] for t in data], suite="quick", eps=EPS, checks=False, batch_size=8)
    items = list(_progress(iter(range(3)), True, "epoch", 3))
    err = capsys.readouterr().err
    assert items == [0, 1, 2]
    assert ("it/s" in err or "%|" in err) == tty, err


# -- suite options ---------------------------------------------------------------------------


def test_unknown_suite_option_names_suite_key_and_allowed(model, data):
    x, y = data
    with pytest.raises(ConfigError) as exc:
        evaluate(model, x[:4], y[:4], suite="autoattack", eps=EPS, suite_options={"aa_pts": 3})
    msg = str(exc.value)
    assert "'autoattack'" in msg and "aa_pts" in msg and "allowed: autoattack_points" in msg
    with pytest.raises(ConfigError, match=r"'paper'.*autoattack_points.*allowed: none"):
        evaluate(model, x[:4], y[:4], eps=EPS, suite_options={"autoattack_points": 2})
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="autoattack_points must be an integer >= 1"):
            evaluate(
                model, x[:4], y[:4], suite="full", eps=EPS, suite_options={"autoattack_points": bad}
            )
    with pytest.raises(ConfigError, match="mapping"):
        evaluate(model, x[:4], y[:4], suite="quick", eps=EPS, suite_options=["steps"])


def test_registered_suite_receives_its_options(model, data):
    seen = {}

    @register_suite("test-options", options=("alpha", "beta"))
    def with_options(ctx):
        seen.update(ctx.options)

    x, y = data
    r = evaluate(
        model, x[:4], y[:4], suite="test-options", eps=EPS, checks=False, suite_options={"alpha": 2}
    )
    assert seen == {"alpha": 2}
    assert r.settings["suite_options"] == {"alpha": 2}
    assert (
        evaluate(model, x[:4], y[:4], suite="quick", eps=EPS, checks=False).settings[
            "suite_options"
        ]
        == {}
    )
    with pytest.raises(ConfigError, match="sequence of names"):
        register_suite("test-bad-options", lambda ctx: None, options="alpha")


def test_autoattack_points_attacks_only_the_first_k(model, data, monkeypatch):
    from pyautoattack import AutoAttack

    sizes = []
    original = AutoAttack.run_standard_evaluation

    def spy(self, x_orig, y_orig, /, **kw):
        sizes.append(len(x_orig))
        return original(self, x_orig, y_orig, **kw)

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", spy)
    x, y = data
    n, k = 16, 6
    r = evaluate(
        model,
        x[:n],
        y[:n],
        suite="autoattack",
        eps=0.1,
        checks=False,
        batch_size=n,
        suite_options={"autoattack_points": k},
    )
    assert sizes == [k]
    aa, clean = r.correct("AutoAttack"), r.correct("Natural")
    assert torch.equal(aa[k:], clean[k:])  # not attacked: the clean outcome
    assert int(aa[:k].sum()) < int(clean[:k].sum())  # attacked: some points broken
    assert r.settings["autoattack_points"] == k
    assert r.settings["suite_options"] == {"autoattack_points": k}
    note = r.outcome("AutoAttack", "final").note
    assert f"AutoAttack on the first {k} of {n} points" in note
    assert f"the other {n - k} were not attacked" in note
    assert f"AutoAttack on the first {k} of {n} points" in r.to_markdown()
    # a limit at or above the point count attacks every point and adds no note
    sizes.clear()
    r = evaluate(
        model,
        x[:4],
        y[:4],
        suite="autoattack",
        eps=0.1,
        checks=False,
        suite_options={"autoattack_points": 10},
    )
    assert sizes == [4] and r.settings["autoattack_points"] == 4
    assert "first" not in r.outcome("AutoAttack", "final").note


def test_adaptive_options_through_suite_options():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    torch.manual_seed(0)
    x = torch.rand(8, 1, 4, 4)
    with torch.no_grad():
        y = lin(x).argmax(1)
    r = evaluate(
        lin,
        x,
        y,
        suite="adaptive",
        eps=0.05,
        checks=False,
        suite_options={
            "steps": 3,
            "autoattack": "bounded",
            "autoattack_points": 2,
            "square_queries": 0,
        },
    )
    assert {"PGD-3 CE", "PGD-3 C&W", "PGD-3 DLR", "AutoAttack"} <= set(r.columns)
    assert "Square" not in r.columns
    assert r.settings["suite_options"]["steps"] == 3
    assert r.extras["adaptive"]["steps"] == 3 and r.settings["autoattack_points"] == 2
    assert "AutoAttack on the first 2 of 8 points" in r.outcome("AutoAttack", "final").note
    assert torch.equal(r.correct("AutoAttack")[2:], r.correct("Natural")[2:])
    with pytest.raises(ConfigError, match="allowed: .*steps"):
        evaluate(lin, x, y, suite="adaptive", eps=0.05, suite_options={"stepz": 3})
    with pytest.raises(ConfigError, match="adaptive steps"):
        evaluate(lin, x, y, suite="adaptive", eps=0.05, suite_options={"steps": 0})


def test_eval_config_autoattack_points(caplog):
    from fortify.config import EvalConfig, ExperimentConfig, from_dict
    from fortify.evaluate import eval_config_options

    with pytest.raises(ConfigError, match="eval.autoattack_points must be an integer >= 1"):
        from_dict(ExperimentConfig, {"eval": {"autoattack_points": 0}})
    assert eval_config_options(EvalConfig(suite="full", autoattack_points=5)) == {
        "autoattack_points": 5
    }
    assert eval_config_options(EvalConfig(suite="autoattack")) == {}
    with caplog.at_level("WARNING", logger="fortify.evaluate"):
        assert eval_config_options(EvalConfig(suite="paper", autoattack_points=5)) == {}
    assert "no effect" in caplog.text and "'paper'" in caplog.text


def test_cli_eval_aa_points(model, tmp_path, capsys):
    from fortify.cli.main import main

    run = _digits_run(model, tmp_path / "run")
    base = ["eval", str(run), "--n-points", "8", "--eps", "0.1", "--no-checks"]
    assert main([*base, "--suite", "autoattack", "--aa-points", "0"]) == 2
    assert "--aa-points must be an integer >= 1" in capsys.readouterr().err
    assert main([*base, "--suite", "quick", "--aa-points", "3"]) == 2
    err = capsys.readouterr().err
    assert "'quick'" in err and "autoattack_points" in err
    assert main([*base, "--suite", "autoattack", "--aa-points", "3"]) == 0
    assert "AutoAttack on the first 3 of 8 points" in capsys.readouterr().out
    saved = EvalReport.load(run / "reports")
    assert saved.settings["autoattack_points"] == 3
    assert saved.settings["suite_options"] == {"autoattack_points": 3}
