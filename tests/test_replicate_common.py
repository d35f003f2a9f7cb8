"""Shared replicate machinery: seeds, prefix reports, tables over seeds, generated readings."""

from __future__ import annotations

import pytest
import torch

from fortify.errors import ComparisonError, ConfigError
from fortify.evaluate.outcome import Outcome, first_mask
from fortify.evaluate.report import EvalReport
from fortify.replicate.common import extend_with_prefix, job_dir, parse_seeds
from fortify.replicate.seed_grid import SeedGrid
from fortify.stats import LOWER, NO_DIFFERENCE

N = 400


def _report(clean: torch.Tensor, attacked: torch.Tensor, aa: int | None = None) -> EvalReport:
    """A report with Natural, one attack column and (optionally) AutoAttack on the first ``aa``
    points; ``points_sha256`` is the same for all (same points)."""
    outs = [Outcome("Natural", clean.clone()), Outcome("PGD-20", attacked & clean, "final")]
    if aa is not None:
        outs.append(Outcome("AutoAttack", attacked & clean, ensemble=False, ran=first_mask(N, aa)))
    return EvalReport({"n_points": N, "points_sha256": "same"}, outs)


def _bits(p: float, seed: int) -> torch.Tensor:
    return torch.rand(N, generator=torch.Generator().manual_seed(seed)) < p


def test_parse_seeds_and_layout(tmp_path):
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "1,1", "x", "-2"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    assert job_dir(tmp_path, "at", 2) == tmp_path / "at" / "seed-2"
    import argparse

    from fortify.replicate.common import per_seed_args

    plain = argparse.Namespace(seed=4, seeds=None, out="runs/x")
    assert per_seed_args(plain) == [plain]
    many = per_seed_args(argparse.Namespace(seed=4, seeds="0,2", out="runs/x"))
    assert [(a.seed, a.out) for a in many] == [(0, "runs/x/seed-0"), (2, "runs/x/seed-2")]


def test_table_mean_sd_and_column_n():
    grid = SeedGrid(labels={"base": "Base"})
    for s, frac in ((0, 0.5), (1, 0.6)):
        clean = torch.zeros(N, dtype=torch.bool)
        clean[: int(frac * N)] = True
        grid.add("base", s, _report(clean, torch.ones(N, dtype=torch.bool), aa=100))
    lines = grid.table(["Natural", "PGD-20", "AutoAttack", "Worst case"])
    assert lines[0] == (
        "| method | seeds | Natural | PGD-20 | AutoAttack (n=100) | Worst case (n=100) | checks |"
    )
    # clean 50 % and 60 %: mean 55, sample sd sqrt(50) = 7.07; AutoAttack on the first 100
    # points, all clean-correct in both seeds: 100 ± 0
    assert lines[2] == "| Base | 2 (0,1) | 55.00 ± 7.07 | 55.00 ± 7.07 | 100.00 ± 0.00 | " + (
        "100.00 ± 0.00 | ok |"
    )


def test_readings_known_answers():
    grid = SeedGrid(labels={"a": "A", "b": "B"})
    for s in range(3):
        clean = _bits(0.8, s)
        worse = clean.clone()
        worse[torch.nonzero(clean).flatten()[:20]] = False  # wrong on a fixed extra 5 %
        grid.add("a", s, _report(clean, clean, aa=200))
        grid.add("b", s, _report(worse, worse, aa=200))
        grid.add("c", s, _report(clean, clean, aa=200))
    r = grid.reading("a", "b", "Natural")
    assert r.seeds == (0, 1, 2) and r.n == N
    assert r.interval.estimate == pytest.approx(-5.0) and r.method_mean - r.baseline_mean == (
        pytest.approx(-5.0)
    )
    assert r.interval.low < -5.0 < r.interval.high and r.verdict == LOWER
    same = grid.reading("a", "c", "PGD-20")
    assert (same.interval.low, same.interval.high) == (0.0, 0.0)
    assert same.verdict == NO_DIFFERENCE
    aa = grid.reading("a", "b", "AutoAttack")
    assert aa.n == 200  # only the points AutoAttack ran on
    rows = grid.readings_markdown(grid.readings([("a", "b")], ["Natural", "AutoAttack"]))
    assert rows[2].startswith("| B − A | Natural | 3 | 400 | ")
    assert rows[2].endswith("| lower |") and "| B − A | AutoAttack | 3 | 200 |" in rows[3]
    assert grid.reading("a", "missing", "Natural") is None


def test_readings_refuse_different_points():
    grid = SeedGrid()
    grid.add("a", 0, _report(_bits(0.8, 0), _bits(0.5, 1)))
    other = _report(_bits(0.8, 0), _bits(0.5, 1))
    other.settings["points_sha256"] = "different"
    grid.add("b", 0, other)
    with pytest.raises(ComparisonError, match="same points"):
        grid.reading("a", "b", "Natural")


def test_extend_with_prefix_counts_only_the_prefix():
    clean = _bits(0.9, 3)
    main = _report(clean, _bits(0.7, 4))
    aa = EvalReport(
        {"suite": "autoattack", "n_points": 50},
        [
            Outcome("Natural", clean[:50].clone()),
            Outcome("AutoAttack", clean[:50] & _bits(0.5, 5)[:50], ensemble=False),
        ],
    )
    both = extend_with_prefix(main, aa)
    assert both.table_n()["final"]["AutoAttack"] == 50
    assert both.table_n()["final"]["Worst case"] == 50
    assert both.table_n()["final"]["Ensemble"] == N
    assert both.columns[-2:] == ["AutoAttack", "Worst case"]
    bad = EvalReport({}, [Outcome("Natural", ~clean[:50])])
    with pytest.raises(ComparisonError, match="same points"):
        extend_with_prefix(main, bad)


def test_per_seed_files_roundtrip(tmp_path):
    grid = SeedGrid()
    for s in (0, 1):
        grid.add("a", s, _report(_bits(0.8, s), _bits(0.6, s + 10), aa=100))
    paths = grid.save_per_seed(tmp_path)
    assert sorted(p.name for p in paths) == ["a-seed0.json", "a-seed1.json"]
    assert all(p.stat().st_size < 3000 for p in paths)  # 400 points, 4 columns
    again = SeedGrid.load_per_seed(tmp_path)
    assert again.table(["Natural", "AutoAttack"]) == grid.table(["Natural", "AutoAttack"])


def test_rift_pipeline_reports_become_a_grid(tmp_path):
    """The RiFT replicate reads the pipeline's per-suite reports (PGD-10 on every point,
    AutoAttack on a prefix) into one report per model and seed."""
    from torch import nn

    import fortify.data
    from fortify.evaluate import evaluate
    from fortify.replicate.rift_table1 import READING_COLUMNS, add_eval_reports

    x, y = fortify.data.load_dataset("digits").test.head(16).floats()
    grid = SeedGrid()
    for seed in (0, 1):
        for i, name in enumerate(("at", "rift")):
            torch.manual_seed(10 * seed + i)
            model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
            kw = dict(eps=0.1, checks=False, seed=seed)
            evaluate(model, x, y, suite="pgd10", **kw).save(tmp_path / str(seed), f"{name}-pgd10")
            evaluate(model, x[:6], y[:6], suite="autoattack", **kw).save(
                tmp_path / str(seed), f"{name}-autoattack"
            )
        add_eval_reports(grid, seed, tmp_path / str(seed))
    assert sorted(grid.reports) == ["AT", "RiFT"] and sorted(grid.reports["AT"]) == [0, 1]
    counts = grid.reports["AT"][0].table_n()["final"]
    assert counts["PGD-10"] == 16 and counts["AutoAttack"] == 6 and counts["Worst case"] == 6
    readings = grid.readings([("AT", "RiFT")], READING_COLUMNS)
    assert [(r.column, r.n, len(r.seeds)) for r in readings] == [
        ("Natural", 16, 2),
        ("PGD-10", 16, 2),
        ("Ensemble", 16, 2),
        ("AutoAttack", 6, 2),
    ]


def test_cached_work_is_keyed_by_settings_and_the_checkpoints_bytes(tmp_path):
    import os

    from fortify.replicate.common import cached, cached_report, checkpoint_key

    ckpt = tmp_path / "last.safetensors"
    ckpt.write_bytes(b"weights-1")
    calls: list[int] = []

    def compute() -> dict:
        calls.append(1)
        return {"accuracy": 50.0 + len(calls)}

    path = tmp_path / "reports" / "eval.json"
    key = checkpoint_key({"eps": 0.1}, checkpoint=ckpt, surrogate=None)
    assert key["checkpoint_sha256"] and key["surrogate_sha256"] is None
    assert cached(path, key, compute) == ({"accuracy": 51.0}, False)
    assert cached(path, checkpoint_key({"eps": 0.1}, checkpoint=ckpt), compute)[1] is False
    key = checkpoint_key({"eps": 0.1}, checkpoint=ckpt)
    assert cached(path, key, compute) == ({"accuracy": 52.0}, True)  # same key: reused
    assert cached(path, key, compute, reuse=False) == ({"accuracy": 53.0}, False)
    # new weights with the old modification time: the hash, not the mtime, decides
    stat = ckpt.stat()
    ckpt.write_bytes(b"weights-2")
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cached(path, checkpoint_key({"eps": 0.1}, checkpoint=ckpt), compute)[1] is False
    assert cached(path, checkpoint_key({"eps": 0.2}, checkpoint=ckpt), compute)[1] is False
    path.write_text("{not json")  # an unreadable file is computed again
    assert cached(path, {"k": 1}, compute) == ({"accuracy": 56.0}, False)
    assert len(calls) == 6

    rep = _report(_bits(0.9, 0), _bits(0.5, 1))
    out, reused = cached_report(tmp_path / "r.json", {"k": 1}, lambda: rep)
    again, reused2 = cached_report(tmp_path / "r.json", {"k": 1}, lambda: 1 / 0)
    assert (reused, reused2) == (False, True)
    assert torch.equal(again.correct("PGD-20", "final"), rep.correct("PGD-20", "final"))
