"""Evaluator: suites, modes, report round-trip, checks, input validation, CLI."""

from __future__ import annotations

import copy
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
    assert r.columns == [
        "Natural",
        "FGSM",
        "PGD-20",
        "PGD-100",
        "C&W",
        "Ensemble",
        "Check attacks",
        "Worst case",
    ]
    t = r.table()
    n = r.table_n()["final"]
    assert n["Ensemble"] == 96 and n["Check attacks"] == 64 and n["Worst case"] == 64
    assert set(t) == {"final", "best"}
    x, y = data
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item() * 100
    assert t["final"]["Natural"] == pytest.approx(clean)
    for col in r.columns[1:6]:
        assert t["best"][col] <= t["final"][col] + 1e-9
        assert t["final"][col] <= clean + 1e-9
    assert t["final"]["PGD-20"] < clean  # the attack does something
    # Ensemble = per-sample worst case of all columns of the row
    for mode in ("final", "best"):
        ens = torch.ones(len(y), dtype=torch.bool)
        for col in ["Natural", "FGSM", "PGD-20", "PGD-100", "C&W"]:
            ens &= r.correct(col, mode)
        assert t[mode]["Ensemble"] == pytest.approx(100 * ens.float().mean().item())
        assert t[mode]["Ensemble"] <= min(
            v for k, v in t[mode].items() if k not in ("Ensemble", "Check attacks", "Worst case")
        )
        # Worst case: every column, the checks' attacks included, on the 64 checked points
        worst = ens[:64] & r.correct("Check attacks", mode)[:64]
        assert t[mode]["Worst case"] == pytest.approx(100 * worst.float().mean().item())
    assert r.reliable and r.ok and r.checks_status() == "ok"
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
    from fortify.evaluate.outcome import unpack_bits

    assert d["format"] == "fortify-eval/2" and d["reliable"] is True
    per = {
        (o["name"], o["mode"]): unpack_bits(o["correct"], o["points"])
        for o in d["outcomes"]
        if o["ensemble"]
    }
    assert len(per[("PGD-20", "final")]) == 96
    assert len(d["outcomes"][1]["correct"]) == 16  # 96 points in 12 bytes, base64
    # recompute Ensemble from the per-sample outcomes
    ens = [all(per[(c, m)][i] for c, m in per if m in ("final", "-")) for i in range(96)]
    assert d["table"]["final"]["Ensemble"] == pytest.approx(100 * sum(ens) / 96)
    checked = next(o for o in d["outcomes"] if o["name"] == "Check attacks")
    assert checked["n"] == 64 and unpack_bits(checked["ran"], 96).sum() == 64
    assert d["table_n"]["final"]["Worst case"] == 64
    again = EvalReport.load(tmp_path)
    assert again.table() == both_report.table()
    assert again.table_n() == both_report.table_n()
    for a, b in zip(again.outcomes, both_report.outcomes):
        assert torch.equal(a.correct, b.correct) and a.n == b.n
    text = md.read_text()
    assert (
        "| mode | Natural | FGSM | PGD-20 | PGD-100 | C&W | Ensemble | Check attacks (n=64) "
        "| Worst case (n=64) |" in text
    )
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
    assert r.columns[-2:] == ["AutoAttack", "Worst case"]
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


class _Wrong(nn.Module):
    """An untrained stand-in: always predicts class ``k``."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = -torch.ones(len(x), 10) + self.w * x.flatten(1).mean(1, keepdim=True)
        logits[:, self.k] = 3.0
        return logits


def test_checks_say_when_an_untrained_model_leaves_nothing_to_test(data):
    x, y = data
    keep = y != 3
    r = evaluate(_Wrong(3), x[keep][:32], y[keep][:32], suite="quick", eps=0.1, check_points=32)
    st = {c.name: (c.status, c.message) for c in r.checks}
    assert st["anything to test"][0] == "warn" and "test nothing" in st["anything to test"][1]
    assert st["PGD increases the loss"][0] == "warn"  # constant logits: the loss cannot rise
    assert "did not increase the CE loss for 32/32" in st["PGD increases the loss"][1]


def test_progress_is_logged_periodically_without_a_terminal(data, monkeypatch, caplog):
    import fortify.evaluate.context as context

    x, y = data
    monkeypatch.setattr(context, "PROGRESS_LOG_SECONDS", 0.0)
    monkeypatch.setattr(context.sys.stderr, "isatty", lambda: False, raising=False)
    with caplog.at_level("INFO", logger="fortify.evaluate"):
        evaluate(_Wrong(3), x[:32], y[:32], suite="quick", eps=0.1, batch_size=8, checks=False)
    lines = [r.getMessage() for r in caplog.records if "batches" in r.getMessage()]
    assert lines and all("s so far, about" in m and "s left" in m for m in lines), lines
    assert any(m.split(":")[1].strip().startswith("1/4 batches") for m in lines), lines


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
    assert int(aa[:k].sum()) < int(clean[:k].sum())  # attacked: some points broken
    # not attacked: not counted, in the column and in the worst case
    assert r.ran("AutoAttack").tolist() == [True] * k + [False] * (n - k)
    t, counts = r.table()["final"], r.table_n()["final"]
    assert counts["AutoAttack"] == k and counts["Worst case"] == k and counts["Natural"] == n
    assert t["AutoAttack"] == pytest.approx(100 * aa[:k].float().mean().item())
    assert f"AutoAttack (n={k})" in r.to_markdown()
    assert r.settings["autoattack_points"] == k
    assert r.settings["suite_options"] == {"autoattack_points": k}
    note = r.outcome("AutoAttack", "final").note
    assert f"AutoAttack on the first {k} of {n} points" in note
    assert f"the other {n - k} were not attacked" in note and f"counts only those {k}" in note
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
    assert r.table_n()["final"]["AutoAttack"] == 2 and r.table_n()["final"]["Ensemble"] == 2
    assert r.extras["adaptive"]["headline_points"] == 2
    assert r.extras["adaptive"]["headline"] == pytest.approx(r.table()["final"]["Ensemble"])
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
    out = capsys.readouterr().out
    assert "AutoAttack on the first 3 of 8 points" in out and "AutoAttack (n=3)" in out
    saved = EvalReport.load(run / "reports")
    assert saved.table_n()["final"]["AutoAttack"] == 3  # the 5 unattacked points not counted
    assert main(["report", str(run)]) == 0
    assert "(n=3)" in capsys.readouterr().out
    assert saved.settings["autoattack_points"] == 3
    assert saved.settings["suite_options"] == {"autoattack_points": 3}


class _ZeroGrad(nn.Module):
    """Logits of ``inner`` with an input gradient that is exactly zero everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.no_grad():
            out = self.inner(x)
        return out + 0.0 * x.sum(dim=(1, 2, 3)).unsqueeze(1)


@pytest.mark.parametrize("wrap", [_ZeroGrad, _Masked], ids=["zero-gradient", "quantised-input"])
def test_masking_makes_the_report_unreliable_and_square_counts(model, data, wrap):
    x, y = data
    r = evaluate(
        wrap(model), x[:64], y[:64], suite="paper", eps=0.1, check_points=48, square_queries=200
    )
    assert not r.reliable and not r.ok
    assert "zero gradients" in r.unreliable_reasons
    assert r.checks_status().startswith("unreliable (")
    assert "**UNRELIABLE:**" in r.to_markdown()
    d = r.to_dict()
    assert d["reliable"] is False and "zero gradients" in d["unreliable_reasons"]
    # the checks' attacks (Square among them) count in the worst case, on the points they ran on
    t, counts = r.table()["final"], r.table_n()["final"]
    assert counts["Check attacks"] == 48 and counts["Worst case"] == 48
    ens, checked = r.correct("Ensemble"), r.correct("Check attacks")
    worst = ens[:48] & checked[:48]
    assert t["Worst case"] == pytest.approx(100 * worst.float().mean().item())
    broken_only_by_checks = int((ens[:48] & ~checked[:48]).sum())
    assert broken_only_by_checks > 0, r.to_markdown()
    assert t["Worst case"] < 100 * ens[:48].float().mean().item()
    again = EvalReport.from_dict(json.loads(r.to_json()))
    assert not again.reliable and again.table_n() == r.table_n()


def test_cli_eval_exit_status_on_masking(model, tmp_path, capsys, monkeypatch):
    import fortify.runs
    from fortify.cli.main import main

    run = _digits_run(model, tmp_path / "run")
    real_load = fortify.runs.load_model

    def load_masked(*a, **kw):
        m, meta = real_load(*a, **kw)
        return _ZeroGrad(m), meta

    monkeypatch.setattr(fortify.runs, "load_model", load_masked)
    base = ["eval", str(run), "--suite", "quick", "--n-points", "32", "--eps", "0.1"]
    assert main(base) == 3
    captured = capsys.readouterr()
    assert "UNRELIABLE" in captured.out and "exit status 3" in captured.err
    assert main([*base, "--allow-unreliable"]) == 0
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert "unreliable (zero gradients" in capsys.readouterr().out
    monkeypatch.setattr(fortify.runs, "load_model", real_load)
    assert main(base) == 0  # the same model without masking is reliable


class _WrongOn(nn.Module):
    """``inner``, except that it predicts the wrong class on the given (clean) images."""

    def __init__(self, inner: nn.Module, bad: torch.Tensor):
        super().__init__()
        self.inner, self.bad = inner, bad.flatten(1)

    def forward(self, x):
        out = self.inner(x)
        hit = (x.flatten(1)[:, None, :] == self.bad[None]).all(-1).any(1)
        if hit.any():
            out = out.clone()
            out[hit] = -out[hit]  # the former top class becomes the lowest
        return out


def test_compare_identical_and_worse_copy(model, splits):
    from fortify.evaluate import compare_reports
    from fortify.stats import LOWER, NO_DIFFERENCE

    x, y = splits.test.floats()
    x, y = x[:300], y[:300]
    kw = dict(suite="quick", eps=EPS, checks=False, batch_size=150)
    a = evaluate(model, x, y, **kw)
    same = compare_reports(a, evaluate(model, x, y, **kw))
    for r in same.rows:
        iv = r.interval
        assert (iv.estimate, iv.low, iv.high, r.p_value) == (0.0, 0.0, 0.0, 1.0), r
        assert r.verdict == NO_DIFFERENCE
    # a copy wrong on a fixed extra 5 % of the points (15 of 300, all correct for A)
    with torch.no_grad():
        right = torch.nonzero(model(x).argmax(1) == y).flatten()[:15]
    b = evaluate(_WrongOn(model, x[right]), x, y, **kw)
    comp = compare_reports(a, b, labels=("model", "copy"))
    nat = comp.get("Natural")
    assert nat.n == 300 and nat.b - nat.a == pytest.approx(-5.0)
    assert nat.interval.estimate == pytest.approx(-5.0)
    assert nat.interval.low < -5.0 < nat.interval.high and nat.interval.high < 0
    assert nat.p_value < 0.01 and (nat.a_only, nat.b_only) == (15, 0)
    assert nat.verdict == LOWER
    assert {r.column for r in comp.rows} == {"Natural", "PGD-20", "Ensemble"}
    text = comp.to_markdown()
    assert "| final | Natural | 300 |" in text and "lower" in text
    assert json.loads(comp.to_json())["rows"][0]["difference"]["verdict"] == LOWER


def test_compare_refuses_mismatched_evaluations(model, data):
    from fortify.errors import ComparisonError
    from fortify.evaluate import compare_reports

    x, y = data
    kw = dict(suite="quick", checks=False, batch_size=48)
    a = evaluate(model, x[:40], y[:40], eps=EPS, **kw)
    cases = {
        "ε": evaluate(model, x[:40], y[:40], eps=2 * EPS, **kw),
        "number of points": evaluate(model, x[:30], y[:30], eps=EPS, **kw),
        "different points": evaluate(model, x[40:80], y[40:80], eps=EPS, **kw),
        "mode": evaluate(model, x[:40], y[:40], eps=EPS, mode="best", **kw),
        "suite": evaluate(model, x[:40], y[:40], eps=EPS, suite="paper", checks=False),
        "norm": evaluate(model, x[:40], y[:40], eps=EPS, norm="l2", **kw),
    }
    for words, b in cases.items():
        with pytest.raises(ComparisonError, match=words):
            compare_reports(a, b)
    with pytest.raises(ComparisonError, match="not in both"):
        compare_reports(a, a, columns=["AutoAttack"])


def test_compare_autoattack_on_a_subset(model, data):
    from fortify.evaluate import compare_reports

    x, y = data
    kw = dict(suite="autoattack", eps=0.1, checks=False, batch_size=16)
    a = evaluate(model, x[:16], y[:16], suite_options={"autoattack_points": 6}, **kw)
    b = evaluate(model, x[:16], y[:16], suite_options={"autoattack_points": 10}, **kw)
    comp = compare_reports(a, b)
    aa = comp.get("AutoAttack")
    assert aa.n == 6 and aa.interval.n == 6  # only the points both attacked
    assert any("compared on the 6 points where both ran" in n for n in comp.notes)


def test_cli_compare_and_report_compare(model, tmp_path, capsys):
    from fortify.cli.main import main

    torch.manual_seed(1)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    runs = [_digits_run(m, tmp_path / n) for m, n in ((model, "base"), (other, "noisy"))]
    for r in runs:
        assert main(["eval", str(r), "--suite", "quick", "--n-points", "60", "--no-checks"]) == 0
    capsys.readouterr()
    js = tmp_path / "cmp.json"
    assert main(["compare", str(runs[0]), str(runs[1]), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "## noisy − base" in out and "| final | Ensemble | 60 |" in out
    d = json.loads(js.read_text())
    assert d["rows"][0]["column"] == "Natural" and d["rows"][0]["n"] == 60
    assert main(["report", str(runs[0]), str(runs[1]), "--compare"]) == 0
    assert "## noisy − base" in capsys.readouterr().out
    assert main(["eval", str(runs[1]), "--suite", "quick", "--n-points", "50", "--no-checks"]) == 0
    capsys.readouterr()
    assert main(["compare", str(runs[0]), str(runs[1])]) == 2
    assert "number of points" in capsys.readouterr().err
    assert main(["compare", str(runs[0]), str(runs[0]), "--resamples", "10"]) == 2
    assert "resamples must be" in capsys.readouterr().err


def test_legacy_reports_do_not_count_unattacked_points(model, data):
    """A fortify-eval/1 report (lists of booleans, unattacked AutoAttack points holding their
    clean outcome) is read with its AutoAttack column restricted to the attacked points."""
    x, y = data
    r = evaluate(
        model,
        x[:12],
        y[:12],
        suite="full",
        eps=0.1,
        checks=False,
        batch_size=12,
        suite_options={"autoattack_points": 5},
    )
    d = r.to_dict()
    d["format"] = "fortify-eval/1"
    for o in d["outcomes"]:
        bits = r.outcome(o["name"], o["mode"]).correct
        o["correct"] = [bool(v) for v in bits.tolist()]
        del o["ran"], o["points"], o["n"]
    old = EvalReport.from_dict(d)
    assert old.table_n()["final"]["AutoAttack"] == 5 and old.table_n()["final"]["PGD-20"] == 12
    assert old.table() == r.table()
