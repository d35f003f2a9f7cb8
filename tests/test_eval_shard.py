"""Sharded evaluation: 1 process, 3 merged ``--shard`` slices and 2 torchrun ranks agree bit for
bit (paper suite, AutoAttack); mismatched slices are refused; AutoAttack's robust scope keeps
the worst case."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_evaluate import _digits_run, trained_cnn
from torch import nn

from fortify.errors import ConfigError, DataError
from fortify.evaluate import EvalReport, evaluate
from fortify.evaluate.shard import Shard, finalize, merge_partials, points_fingerprint

EPS = 0.1
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def digits():
    import fortify.data

    return fortify.data.load_dataset("digits")


@pytest.fixture(scope="module")
def model(digits):
    return trained_cnn(digits, epochs=10)


def _same(a: EvalReport, b: EvalReport) -> None:
    """Equal per-point outcomes, tables and checks."""
    assert [(o.name, o.mode, o.computed) for o in a.outcomes] == [
        (o.name, o.mode, o.computed) for o in b.outcomes
    ]
    for oa, ob in zip(a.outcomes, b.outcomes, strict=True):
        assert torch.equal(oa.correct, ob.correct), (oa.name, oa.mode)
    assert a.table() == b.table()
    assert [(c.name, c.status, c.message) for c in a.checks] == [
        (c.name, c.status, c.message) for c in b.checks
    ]
    for key in ("eps_sweep", "large_eps", "square"):
        assert a.extras.get(key) == b.extras.get(key)


def _merge(parts: list[EvalReport]) -> EvalReport:
    # through JSON, as `fortify report --merge` reads the slices
    return finalize(merge_partials([EvalReport.from_dict(json.loads(p.to_json())) for p in parts]))


def test_shard_parse_and_chunks():
    assert Shard.parse("2/3") == Shard(2, 3) and str(Shard(1, 4)) == "1/4"
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError, match="i/n"):
            Shard.parse(bad)
    masks = [Shard(i, 3).mask(20, 4) for i in range(3)]
    assert torch.equal(sum(m.long() for m in masks), torch.ones(20, dtype=torch.long))
    assert masks[1].nonzero().flatten().tolist() == [4, 5, 6, 7, 16, 17, 18, 19]


def test_paper_suite_three_slices_equal_one_process(model, digits):
    x, y = digits.test.floats()
    x, y = x[:44], y[:44]  # 6 chunks of 8, the last one partial
    kw = dict(suite="paper", eps=EPS, batch_size=8, mode="both", check_points=30)
    kw["square_queries"] = 60
    one = evaluate(model, x, y, **kw)
    parts = [evaluate(model, x, y, shard=f"{i}/3", **kw) for i in range(3)]
    for i, p in enumerate(parts):
        assert p.settings["shard"] == f"{i}/3"
        own = Shard(i, 3).mask(44, 8)
        assert not bool(p.outcomes[1].correct[~own].any())  # other slices' points untouched
    merged = _merge(parts)
    _same(one, merged)
    assert merged.settings["slices"] == 3 and "shard" not in merged.settings
    assert 0 < one.table()["final"]["Ensemble"] < one.table()["final"]["Natural"]


def test_autoattack_slices_equal_one_process_and_robust_scope_keeps_worst_case(model, digits):
    x, y = digits.test.floats()
    # 12 test points of which one survives the paper suite at ε = 0.08 and AutoAttack breaks it
    # (a point AutoAttack cannot break costs its whole budget: kept out to stay fast)
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15])
    x, y = x[idx], y[idx]
    kw = dict(suite="full", eps=0.08, batch_size=4, checks=False)
    one = evaluate(model, x, y, **kw)
    _same(one, _merge([evaluate(model, x, y, shard=f"{i}/3", **kw) for i in range(3)]))
    aa = one.correct("AutoAttack")
    assert aa is not None and bool((one.correct("Natural") & ~aa).any())  # AA broke points
    robust = evaluate(model, x, y, suite_options={"autoattack_scope": "robust"}, **kw)
    worst = one.correct("Ensemble") & aa  # the paper attacks and AutoAttack, per point
    assert torch.equal(robust.correct("Ensemble"), worst)
    assert bool((one.correct("Ensemble") & ~aa).any())  # AutoAttack changed the worst case
    assert "AutoAttack" not in robust.table()["final"]
    assert "| not computed |" in robust.to_markdown()
    assert robust.settings["autoattack_scope"] == "robust"
    # the standalone AutoAttack suite: slices agree too, and scope robust is refused
    kw["suite"] = "autoattack"
    one = evaluate(model, x, y, **kw)
    _same(one, _merge([evaluate(model, x, y, shard=f"{i}/3", **kw) for i in range(3)]))
    with pytest.raises(ConfigError, match="suite 'full'"):
        evaluate(model, x, y, suite_options={"autoattack_scope": "robust"}, **kw)


def test_mismatched_or_incomplete_slices_are_refused(model, digits):
    x, y = digits.test.floats()
    x, y = x[:12], y[:12]
    kw = dict(suite="quick", eps=EPS, batch_size=4, checks=False)
    parts = [evaluate(model, x, y, shard=f"{i}/2", **kw) for i in range(2)]
    _merge(parts)  # the matching pair joins
    other_seed = evaluate(model, x, y, shard="1/2", seed=5, **kw)
    with pytest.raises(DataError, match=r"slice 1/2 .* seed"):
        _merge([parts[0], other_seed])
    other_model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(DataError, match="model_digest"):
        _merge([parts[0], evaluate(other_model, x, y, shard="1/2", **kw)])
    with pytest.raises(DataError, match="different eps"):
        _merge([parts[0], evaluate(model, x, y, shard="1/2", **{**kw, "eps": 0.05})])
    with pytest.raises(DataError, match="missing 1/2"):
        _merge([parts[0]])
    with pytest.raises(DataError, match="given twice 0/2"):
        _merge([parts[0], parts[0]])
    third = evaluate(model, x, y, shard="2/3", **kw)
    with pytest.raises(DataError, match="different splits"):
        _merge([*parts, third])
    with pytest.raises(ConfigError, match="cannot be sharded"):
        evaluate(model, x, y, suite="ood", eps=EPS, shard="0/2", checks=False)


def test_slices_of_other_points_are_refused(model, digits):
    """Slices join only when they evaluated the same points (``points_sha256``, the one digest
    of the evaluated data, which ``fortify compare`` checks too)."""
    x, y = digits.test.floats()
    kw = dict(suite="quick", eps=EPS, batch_size=4, checks=False)
    first = evaluate(model, x[:12], y[:12], shard="0/2", **kw)
    assert first.settings["points_sha256"] == points_fingerprint(x[:12], y[:12])
    assert "data_digest" not in first.settings
    other = evaluate(model, x[12:24], y[12:24], shard="1/2", **kw)
    with pytest.raises(DataError, match="points_sha256"):
        _merge([first, other])
    _merge([first, evaluate(model, x[:12], y[:12], shard="1/2", **kw)])


def _cli(*args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    launch = [sys.executable]
    if torchrun:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd = [*launch, "-m", "fortify.cli.main", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return proc


def test_cli_torchrun_and_merged_shards_equal_one_process(model, tmp_path):
    """`fortify eval` as 1 process, as 2 gloo ranks under torchrun and as 3 merged slices."""
    run = _digits_run(model, tmp_path / "run")
    # ε = 0.25: APGD-CE breaks nearly every point, so AutoAttack stays cheap in this plumbing test
    common = ["eval", str(run), "--suite", "full", "--eps", "0.25", "--n-points", "24"]
    common += ["--batch-size", "6", "--aa-points", "12", "--mode", "both", "--device", "cpu"]
    common += ["--no-checks"]  # the checks' merge is tested above, in-process
    reports = {}
    for name, torchrun in (("one", False), ("ranks", True)):
        _cli(*common, "--out", str(tmp_path / name), torchrun=torchrun)
        reports[name] = EvalReport.load(tmp_path / name / "eval-full.json")
    for i in range(3):
        _cli(*common, "--out", str(tmp_path / "slices"), "--shard", f"{i}/3")
    files = sorted((tmp_path / "slices").glob("eval-full.shard-*-of-3.json"))
    assert len(files) == 3 and not (tmp_path / "slices" / "eval.json").exists()
    proc = _cli("report", "--merge", str(tmp_path / "slices"))
    assert "joined 3 slices" in proc.stdout
    reports["slices"] = EvalReport.load(tmp_path / "slices" / "eval-full.json")
    _same(reports["one"], reports["ranks"])
    _same(reports["one"], reports["slices"])
    assert reports["ranks"].settings["slices"] == 2
    # a slice of another evaluation is refused with the reason
    other = json.loads(files[1].read_text())
    other["settings"]["seed"] = 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "eval-full.shard-1-of-3.json").write_text(json.dumps(other))
    proc = subprocess.run(
        [sys.executable, "-m", "fortify.cli.main", "report", "--merge", str(files[0]),
         str(tmp_path / "other" / "eval-full.shard-1-of-3.json"), str(files[2])],
        capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 2 and "seed" in proc.stderr and "slice 1/3" in proc.stderr
